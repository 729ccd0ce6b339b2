"""Structured Bayesian Pruning (Neklyudov, Molchanov, Ashukha, Vetrov, NeurIPS 2017):
:class:`SBPDropout`, multiplicative log-normal noise per unit that learns to remove whole
neurons and convolution channels, and its functional forms.

Each unit i multiplies its values by θᵢ = exp(xᵢ), xᵢ ~ N(μᵢ, σᵢ²) truncated to [a, b]
(default [−20, 0]), with a log-uniform prior on θ over the same range. Training draws θ
per example and unit by the inverse CDF; the loss adds the KL term (:meth:`SBPDropout.kl`,
included by :func:`sparsevd.kl_divergence` and :class:`sparsevd.SGVLBLoss`). A unit is
kept when the signal-to-noise ratio SNR = E[θ]/sd(θ) exceeds ``threshold`` (1); eval mode
multiplies by E[θ]·mask, so the pruned units output 0 and :func:`sparsevd.sparsify` folds
the multiplier into a neighbouring layer and cuts them: a smaller dense network.

Where the noise multiplies: SBPDropout multiplies whatever it is given, so after a layer
with a bias it scales the bias too (the authors multiply before the bias: conv without
bias → SBP → bias → ReLU). ``convert(model, sbp=True)`` puts it right after each layer
(``nn.Sequential(layer, SBPDropout)``), where sparsify folds E[θ]·mask into the layer's
output rows (weight and bias) exactly. Anywhere else in an ``nn.Sequential`` (after a
ReLU or pooling, before a layer, after a BatchNorm) sparsify folds it into the next or the
previous linear/convolution where that is exact, and otherwise keeps it as a fixed scale.

The math is the SBP section of :mod:`sparsevd.reference`; the kernels are the ops
``sbp_kl`` and ``sbp_sample`` (C++ on CPU, Triton on CUDA, the reference elsewhere).
"""

from __future__ import annotations

import torch
from torch import nn

from . import backends, reference  # noqa: F401  (importing backends registers the kernels)
from ._validate import flag, floating_dtype, integer, interval, module, real
from .functional import _as_seed, _check_same, _check_tensor
from .layers import adopt_frozen_mask

__all__ = ["SBPDropout", "sbp_kl", "sbp_sample", "sbp_noise", "sbp_modules"]


def _check_params(op, mu, log_sigma):
    _check_tensor("mu", mu, op)
    _check_tensor("log_sigma", log_sigma, op)
    if mu.dim() != 1 or log_sigma.shape != mu.shape:
        raise ValueError(f"{op}: mu and log_sigma must be 1-D tensors of one shape [units], got "
                         f"{tuple(mu.shape)} and {tuple(log_sigma.shape)}")
    _check_same(op, "mu", mu, log_sigma=log_sigma)


def sbp_kl(mu, log_sigma, bounds=reference.SBP_BOUNDS):
    """Σ over the units of KL(q(θᵢ) ‖ p(θᵢ)): a differentiable 0-dim float32 tensor (float64
    for float64 parameters). μ and log σ are clipped to [−20, 5] first."""
    _check_params("sbp_kl", mu, log_sigma)
    a, b = reference.sbp_check_bounds(bounds)
    return torch.ops.sparsevd.sbp_kl(mu, log_sigma, a, b)[0]


def _check_finite(op, mu, log_sigma):
    # per call only where no kernel reads the parameters (the kernels check them themselves)
    if bool(torch.isnan(mu).any()) or bool(torch.isnan(log_sigma).any()):
        raise ValueError(f"{op}: mu or log_sigma contains NaN")


def _check_batch(op, batch):
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"{op}: batch must be an int ≥ 0, got {batch!r}")


def sbp_sample(mu, log_sigma, batch, bounds=reference.SBP_BOUNDS, *, seed=None, generator=None):
    """θ of shape [batch, units], one draw per example and unit, differentiable in μ and log σ
    (reparameterized: θ = exp(F⁻¹(u)) with F the truncated normal's CDF). The uniforms come
    from ``seed`` (an int or int64 tensor), drawn from torch's CPU generator (or
    ``generator``) when not given; :func:`sbp_noise` gives them back. float32 (float64 for
    float64 parameters)."""
    op = "sbp_sample"
    _check_params(op, mu, log_sigma)
    _check_batch(op, batch)
    a, b = reference.sbp_check_bounds(bounds)
    with_grad = torch.is_grad_enabled() and (mu.requires_grad or log_sigma.requires_grad)
    return torch.ops.sparsevd.sbp_sample(mu, log_sigma, _as_seed(op, seed, generator), batch, a, b, with_grad)[0]


def sbp_noise(mu, batch, seed):
    """The float32 uniforms [batch, units] that ``sbp_sample(mu, ..., batch, seed=seed)`` used."""
    _check_tensor("mu", mu, "sbp_noise")
    _check_batch("sbp_noise", batch)
    return torch.ops.sparsevd.sbp_noise(mu, _as_seed("sbp_noise", seed, None), batch)


class SBPDropout(nn.Module):
    """Log-normal multiplicative noise on the units along ``dim`` (Structured Bayesian Pruning).

    Args:
        num_features: number of units (the size of the input along ``dim``).
        dim: the units' dimension of the input (default 1: channels of ``[B, C, ...]``, the
            features of ``[B, C]``; ``-1`` for ``[B, T, C]``). θ is drawn per example (index
            along dim 0) and unit and shared over the other dimensions; with ``dim=0`` the
            input is one example.
        threshold: keep a unit when SNR = E[θ]/sd(θ) > threshold (default 1).
        bounds: the truncation range [a, b] of log θ (default (−20, 0)).
        mu_init, log_sigma_init: initial μ and log σ (default 0 and −5: θ ≈ 1, almost no noise).

    Parameters ``mu`` and ``log_sigma`` have shape [num_features]; both are clipped to
    [−20, 5] where used (no gradient beyond). Training mode multiplies by θ sampled per
    example and unit; eval mode by E[θ]·mask (computed once per parameter update).
    """

    def __init__(self, num_features, *, dim=1, threshold=reference.SBP_THRESHOLD, bounds=reference.SBP_BOUNDS,
                 mu_init=0.0, log_sigma_init=-5.0, device=None, dtype=None):
        super().__init__()
        self.num_features = integer("SBPDropout", "num_features", num_features, 1)
        self.dim = dim
        self.threshold = threshold
        self.bounds = bounds
        self.mu_init = real("SBPDropout", "mu_init", mu_init)
        self.log_sigma_init = real("SBPDropout", "log_sigma_init", log_sigma_init)
        factory = {"device": device, "dtype": floating_dtype("SBPDropout", dtype)}
        self.mu = nn.Parameter(torch.empty(self.num_features, **factory))
        self.log_sigma = nn.Parameter(torch.empty(self.num_features, **factory))
        self.register_buffer("frozen_mask", None)  # set by freeze_mask, for fine-tuning
        self.frozen_noise = False
        self._eval_cache = None
        self.reset_parameters()

    # dim, threshold and bounds are read by every forward, so a bad value is refused when
    # it is set: later it would prune every unit (NaN) or fail deep inside torch
    @property
    def dim(self):
        """The units' dimension of the input: an int (negative counts from the end)."""
        return self._dim

    @dim.setter
    def dim(self, value):
        self._dim = integer("SBPDropout", "dim", value)

    @property
    def threshold(self):
        """Keep a unit when SNR > threshold: a finite number (stored as a float)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value):
        self._threshold = real("SBPDropout", "threshold", value)

    @property
    def bounds(self):
        """(a, b): the truncation range of log θ, two finite numbers a < b (stored as floats)."""
        return self._bounds

    @bounds.setter
    def bounds(self, value):
        self._bounds = interval("SBPDropout", "bounds", value, ("a", "b"))

    def __setstate__(self, state):
        # a layer pickled before dim, threshold and bounds were checked properties
        for name in ("dim", "threshold", "bounds"):
            if name in state:
                state["_" + name] = state.pop(name)
        super().__setstate__(state)

    def reset_parameters(self):
        with torch.no_grad():
            self.mu.fill_(self.mu_init)
            self.log_sigma.fill_(self.log_sigma_init)

    def _units_dim(self, input):
        _check_tensor("input", input, "SBPDropout")
        if not -input.dim() <= self.dim < input.dim():
            raise ValueError(f"SBPDropout: dim={self.dim} is out of range for an input of shape {tuple(input.shape)}")
        dim = self.dim % input.dim()
        if input.shape[dim] != self.num_features:
            raise ValueError(f"SBPDropout: expected {self.num_features} units along dim {self.dim}, got input of "
                             f"shape {tuple(input.shape)}")
        return dim

    def forward(self, input):
        dim = self._units_dim(input)
        shape = [1] * input.dim()
        shape[dim] = self.num_features
        frozen = self.frozen_mask
        if self.training and (frozen is None or self.frozen_noise):
            batch = input.shape[0] if dim != 0 else 1
            if dim != 0:
                shape[0] = batch
            theta = sbp_sample(self.mu, self.log_sigma, batch, self.bounds)
            if frozen is not None:
                theta = theta * frozen
        else:  # eval, or fine-tuning without noise: the deterministic E[θ]·mask
            theta = self.eval_scale()
        return input * theta.reshape(shape).to(input.dtype)

    def eval_scale(self):
        """E[θ]·mask per unit, what eval mode multiplies by (no gradient), in the parameters'
        dtype (the mask fixed by :meth:`freeze_mask`, if any). Cached until ``mu`` or
        ``log_sigma`` change in place (an optimizer step, ``load_state_dict``); a change
        through ``.data`` is not seen, so call :meth:`reset_parameters` or assign new
        parameters instead."""
        mu, log_sigma, frozen = self.mu, self.log_sigma, self.frozen_mask
        compiling = torch.compiler.is_compiling()
        if not compiling:
            key = (mu._version, log_sigma._version, mu.data_ptr(), log_sigma.data_ptr(), mu.dtype, mu.device,
                   self.threshold, self.bounds, None if frozen is None else (frozen._version, frozen.data_ptr()))
            if self._eval_cache is not None and self._eval_cache[0] == key:
                return self._eval_cache[1]
        # not inference tensors even under inference_mode (a later call with autograd saves
        # them for backward); no_grad inside, as inference_mode(False) turns grad mode on
        with torch.inference_mode(False), torch.no_grad():
            if not compiling:
                _check_finite("SBPDropout", mu, log_sigma)
            scale = reference.sbp_eval_scale(mu, log_sigma, self.threshold, self.bounds, mask=frozen).to(mu.dtype)
        if not compiling:
            self._eval_cache = (key, scale)
        return scale

    def kl(self):
        """Σ KL(q‖p) over the units: a 0-dim float32 tensor (float64 for float64 parameters),
        differentiable in ``mu`` and ``log_sigma``."""
        return sbp_kl(self.mu, self.log_sigma, self.bounds)

    def snr(self):
        """SNR = E[θ]/sd(θ) per unit, float64 (a unit with σ at the bottom of the clip range
        reaches ~1e9; above ~3e4 the value is the first-order expansion, to ~1e-4)."""
        with torch.no_grad():
            _check_finite("SBPDropout.snr", self.mu, self.log_sigma)
            return reference.sbp_snr(self.mu, self.log_sigma, self.bounds)

    def expected_theta(self):
        """E[θ] per unit, in the parameters' dtype (no gradient)."""
        with torch.no_grad():
            _check_finite("SBPDropout.expected_theta", self.mu, self.log_sigma)
            return reference.sbp_mean(self.mu, self.log_sigma, self.bounds).to(self.mu.dtype)

    def mask(self):
        """Boolean mask of the units kept: SNR > threshold, or the mask fixed by :meth:`freeze_mask`."""
        if self.frozen_mask is not None:
            return self.frozen_mask
        return reference.keep_by_snr(self.snr(), self.threshold)

    def freeze_mask(self, noise=False):
        """Fix the units kept now (SNR > ``threshold``: set it first) for fine-tuning:
        ``mask()`` returns the fixed mask whatever μ and log σ do, and the pruned units
        output exactly zero. ``noise=False`` (default): training mode multiplies by the
        deterministic E[θ]·mask, as eval mode does, and μ, log σ get no gradient (the
        layers around train on the data term); ``noise=True`` keeps sampling θ (times the
        mask), and μ, log σ train too. The fixed mask is a buffer (``frozen_mask``): it
        travels with the state dict."""
        noise = flag("SBPDropout.freeze_mask", "noise", noise)
        self.frozen_mask = self.mask().clone()
        self.frozen_noise = noise
        return self

    def unfreeze_mask(self):
        """Back to SBP training: the mask follows the SNR and the threshold again."""
        self.frozen_mask = None
        self.frozen_noise = False
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if adopt_frozen_mask(self, state_dict, prefix, self.mu, error_msgs):
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)

    def kept_units(self):
        return int(self.mask().sum())

    def total_units(self):
        return self.num_features

    def extra_repr(self):
        return f"{self.num_features}, dim={self.dim}, threshold={self.threshold}, bounds={self.bounds}"


def sbp_modules(model):
    """The :class:`SBPDropout` layers of ``model`` (in ``model.modules()`` order), with their names."""
    module("sbp_modules", model)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SBPDropout)]
