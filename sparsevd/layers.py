"""Drop-in SparseVD layers.

A SparseVD layer keeps the usual ``weight`` (the posterior mean θ) and ``bias``, plus the
parameters of the posterior variance, chosen by ``alpha``:

- ``"weight"`` (default, SparseVD): a ``log_sigma2`` parameter of the shape of ``weight``
  (the additive-noise reparameterization: σ² is learned directly, which lowers the
  gradient variance against learning α);
- ``"unit"``: one learned log α per output unit, ``log_alpha_unit`` of shape ``[out, 1, ...]``
  (Kingma et al.'s variational dropout with α shared by a unit's incoming weights);
- ``"layer"``: one learned log α for the layer, ``log_alpha_layer`` of shape ``[1, 1, ...]``;
- a positive number: Gaussian dropout with that fixed α (the buffer ``fixed_log_alpha``);
  binary dropout with rate p matches α = p / (1 − p), so ``alpha=1.0`` is p = 0.5.

With a shared α the posterior of each weight is N(θ, α·θ²), so the per-weight
log σ² the local reparameterization trick needs is log α + log(θ² + 1e-8). In training
mode a layer samples pre-activations with the LRT; in eval mode it is the deterministic
masked layer, at the cost of the dense layer: θ ⊙ mask is cached and recomputed only when
it can have changed (see :meth:`SparseVDModule.eval_weight`).

After SparseVD training, :meth:`SparseVDModule.freeze_mask` fixes the mask for fine-tuning:
the pruned weights are exactly zero from then on and θ, the bias (and, with noise, the
variances of the kept weights) train on the data term.
"""

from __future__ import annotations

import math
import numbers
import sys

import torch
from torch import nn

from . import functional as F
from . import reference
from ._validate import flag, floating_dtype, integer, interval, real

#: The state-dict name of the variance parameter of each ``alpha`` variant.
_VARIANCE_NAMES = {"weight": "log_sigma2", "unit": "log_alpha_unit", "layer": "log_alpha_layer",
                   "fixed": "fixed_log_alpha"}


def _variant(alpha, where=None):
    """The variant named by ``alpha``; ``where`` (the layer) prefixes the errors."""
    where = f"{where}: " if where else ""
    if isinstance(alpha, str):
        if alpha not in ("weight", "unit", "layer"):
            raise ValueError(f"{where}alpha must be 'weight', 'unit', 'layer' or a fixed α > 0, got {alpha!r}")
        return alpha
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"{where}alpha must be 'weight', 'unit', 'layer' or a number (a fixed α), got {alpha!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{where}a fixed alpha must be a finite number > 0, got {alpha}")
    return "fixed"


def _is_dtensor(tensor):
    """Whether ``tensor`` is a DTensor: a parameter sharded by FSDP2, outside the forward."""
    # no DTensor exists before its module is imported, so this never imports it
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


class _CachedMaskedWeight(torch.autograd.Function):
    """θ ⊙ mask served from the eval cache, with the gradient of θ ⊙ mask (grad ⊙ mask):
    with autograd on, the eval forward stays as cheap as the dense layer."""

    @staticmethod
    def forward(ctx, weight, masked, mask):
        ctx.save_for_backward(mask)
        return masked.view_as(masked)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


class SparseVDModule(nn.Module):
    """What every SparseVD layer has: the variance parameters of its ``alpha`` variant,
    log α, the pruning mask, the KL term and counts.

    A subclass creates ``weight``, then calls :meth:`_create_variance_params`; it calls
    :meth:`reset_variance_parameters` after every (re)initialisation or copy of
    ``weight`` (the shared-α initial value depends on θ), and passes
    :meth:`variance_log_sigma2` to the LRT in its training forward.
    """

    def _init_sparsevd(self, threshold, log_sigma2_init, log_alpha_range, alpha="weight"):
        self.threshold = threshold
        self.log_sigma2_init = real(type(self).__name__, "log_sigma2_init", log_sigma2_init)
        self.log_alpha_range = log_alpha_range
        self.variant = _variant(alpha, type(self).__name__)
        self._initial_fixed_alpha = float(alpha) if self.variant == "fixed" else None
        self.register_buffer("frozen_mask", None)
        self.frozen_noise = False
        self._eval_cache = None

    # threshold and log_alpha_range are read by the mask, the KL and the eval forward, so a
    # bad value is refused when it is set: later it would prune everything (NaN) or fail
    # deep inside torch
    @property
    def threshold(self):
        """Prune where log α ≥ threshold: a finite number (stored as a float)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value):
        self._threshold = real(type(self).__name__, "threshold", value)

    @property
    def log_alpha_range(self):
        """(lo, hi): the clamp of log α, two finite numbers lo < hi (stored as floats)."""
        return self._log_alpha_range

    @log_alpha_range.setter
    def log_alpha_range(self, value):
        self._log_alpha_range = interval(type(self).__name__, "log_alpha_range", value)

    @property
    def alpha(self):
        """The ``alpha`` option: ``"weight"``, ``"unit"``, ``"layer"`` or the fixed α (read
        from the buffer, so a loaded state dict's value)."""
        if self.variant == "fixed":
            return float(self.fixed_log_alpha.detach().reshape(-1)[0].double().exp())
        return self.variant

    def _create_variance_params(self, weight_shape, factory_kwargs):
        """Create the variance parameter of this layer's variant for a weight of
        ``weight_shape`` (``[out, in, *kernel]``): per weight, per output unit, per layer,
        or a buffer holding the fixed log α.
        """
        shape = {
            "weight": tuple(weight_shape),
            "unit": (weight_shape[0],) + (1,) * (len(weight_shape) - 1),
        }.get(self.variant, (1,) * len(weight_shape))
        name = _VARIANCE_NAMES[self.variant]
        if self.variant == "fixed":
            value = torch.full(shape, math.log(self._initial_fixed_alpha), **factory_kwargs)
            self.register_buffer(name, value)
        else:
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory_kwargs)))

    def _create_parameters(self, weight_shape, bias, factory_kwargs):
        """``weight`` (θ) of ``weight_shape`` = [out, in, *kernel], the variance parameters
        of the variant and ``bias`` ([out] or None), initialised by :meth:`reset_parameters`."""
        floating_dtype(type(self).__name__, factory_kwargs["dtype"])
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory_kwargs))
        self._create_variance_params(self.weight.shape, factory_kwargs)
        if bias:
            self.bias = nn.Parameter(torch.empty(weight_shape[0], **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        # θ and b exactly as nn.Linear / nn.Conv*d initialize them, so swapping layers keeps a recipe.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(math.prod(self.weight.shape[1:]))  # every size is ≥ 1
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_variance_parameters()

    def _raw_variance(self):
        return getattr(self, _VARIANCE_NAMES[self.variant])

    def reset_variance_parameters(self):
        """log σ² = ``log_sigma2_init`` per weight; a learned shared log α starts where the
        unit's (or layer's) mean θ² has that variance: log α = log_sigma2_init −
        log(mean θ² + 1e-8), clamped to ``log_alpha_range``. A fixed α is left as is.
        """
        with torch.no_grad():
            if self.variant == "weight":
                self.log_sigma2.fill_(self.log_sigma2_init)
            elif self.variant != "fixed":
                raw = self._raw_variance()
                w2 = self.weight.detach().to(raw.dtype) ** 2
                dims = tuple(range(1 if self.variant == "unit" else 0, w2.dim()))
                mean_w2 = w2.sum(dims, keepdim=True) / math.prod(w2.shape[d] for d in dims)
                raw.copy_(torch.clamp(self.log_sigma2_init - torch.log(mean_w2 + reference.EPS),
                                      *self.log_alpha_range).expand(raw.shape))

    def variance_log_sigma2(self):
        """The per-weight log σ² the LRT samples with (differentiable): the parameter
        itself for ``alpha="weight"``, else log α + log(θ² + 1e-8)."""
        if self.variant == "weight":
            return self.log_sigma2
        return self._raw_variance() + torch.log(self.weight * self.weight + reference.EPS)

    def _shared_log_alpha(self):
        return torch.clamp(self._raw_variance(), *self.log_alpha_range)

    @property
    def log_alpha(self):
        """log α = clamp(log σ² − log(θ² + 1e-8)) per weight, shape of ``weight`` (no gradient)."""
        with torch.no_grad():
            if self.variant == "weight":
                return reference.log_alpha(self.weight, self.log_sigma2, self.log_alpha_range)
            return self._shared_log_alpha().expand(self.weight.shape).contiguous()

    def mask(self):
        """Boolean mask of the weights kept: log α < threshold, or the mask fixed by
        :meth:`freeze_mask`."""
        if self.frozen_mask is not None:
            return self.frozen_mask
        with torch.no_grad():
            if self.variant == "weight":
                return reference.prune_mask(self.weight, self.log_sigma2, self.threshold, self.log_alpha_range)
            return reference.keep_by_log_alpha(self._shared_log_alpha(), self.threshold).expand(
                self.weight.shape).contiguous()

    def kl(self):
        """Σ KL(q‖p) over this layer's weights: a 0-dim float32 tensor (float64 for
        float64 parameters), differentiable in the learned parameters.

        Every weight contributes the KL of its own factor N(θ, α·θ²), so with a shared α
        the layer's KL is the KL at that α times the number of weights sharing it (the
        same Molchanov et al. approximation as per weight). A fixed α gives a constant.

        With the parameters sharded by FSDP2 (``fully_shard``), every rank must call it:
        it sums the shards' KL over the ranks (see :meth:`_sharded_kl`).
        """
        if self.variant == "weight":
            if _is_dtensor(self.weight):
                return self._sharded_kl()
            return F.kl_divergence(self.weight, self.log_sigma2, self.log_alpha_range)
        raw = self._raw_variance()
        acc = torch.float64 if raw.dtype == torch.float64 else torch.float32
        per_alpha = reference.kl_from_log_alpha(torch.clamp(raw.to(acc), *self.log_alpha_range))
        sharing = self.weight.numel() // raw.numel() if raw.numel() else 0
        total = per_alpha.sum() * sharing
        # sharded by FSDP2: torch's ops on the DTensors leave a partial sum per rank; full_tensor()
        # all-reduces it, and each shard gets its own gradient once (see _sharded_kl)
        return total.full_tensor() if _is_dtensor(total) else total

    def _sharded_kl(self):
        """The KL of a layer whose θ and log σ² are sharded by FSDP2 (``fully_shard``: they
        are DTensors outside the forward), on every rank.

        The KL is a sum over weights, so each rank runs the kernel on its own shards and
        the partial sums are all-reduced. The gradient reaching each shard is that of its
        own weights' KL, once: FSDP averages the data term's gradients over the ranks,
        while this term reaches the sharded parameters directly, so a loss with the whole
        KL / N on every rank gets the gradient of the one-process loss. (Hence, when the
        ranks' batches differ in size, weigh their data terms, not the KL.)"""
        from torch.distributed.tensor import DTensor, Partial, Replicate

        weight, log_sigma2 = self.weight, self.log_sigma2
        if not _is_dtensor(log_sigma2) or (log_sigma2.device_mesh, log_sigma2.placements) != (
                weight.device_mesh, weight.placements):
            raise NotImplementedError(
                f"{type(self).__name__}.kl(): weight and log_sigma2 must be sharded alike (FSDP2's fully_shard "
                "shards both along dim 0 by default); a shard_placement_fn that splits them differently is not "
                "supported")
        local = F.kl_divergence(weight.to_local(), log_sigma2.to_local(), self.log_alpha_range)
        partial = [Partial() if p.is_shard() else Replicate() for p in weight.placements]
        return DTensor.from_local(local, weight.device_mesh, partial).full_tensor()

    def eval_weight(self):
        """(θ ⊙ mask, mask): what the eval forward multiplies with.

        Computing the mask reads log α of every weight, which costs more than the layer
        itself at small batches, so the pair is cached and recomputed only when it can
        have changed: when the version counter, storage, dtype or device of ``weight`` or
        of the variance parameter (or the frozen mask) changes (an optimizer step,
        ``load_state_dict``, ``.to()``, any in-place edit), when ``threshold`` or
        ``log_alpha_range`` changes, and on every ``train()``/``eval()``. Under
        ``torch.compile`` and ``torch.export`` it is always computed afresh, so a traced
        graph never holds a stale copy. (Edits through ``.data`` bypass version counters,
        for autograd as for this cache: call ``train()``/``eval()`` after them.)
        """
        if torch.compiler.is_compiling():
            mask = self.mask()
            return self.weight * mask, mask
        w, v, frozen = self.weight, self._raw_variance(), self.frozen_mask
        key = (w._version, w.data_ptr(), w.dtype, w.device, v._version, v.data_ptr(), v.dtype, self.threshold,
               self.log_alpha_range, None if frozen is None else (frozen._version, frozen.data_ptr()))
        cache = self._eval_cache
        if cache is None or cache[0] != key:
            # not inference tensors even under inference_mode (a later call with autograd saves
            # them for backward); no_grad inside, as inference_mode(False) turns grad mode on
            with torch.inference_mode(False), torch.no_grad():
                mask = self.mask()
                cache = self._eval_cache = (key, w * mask, mask)
        return cache[1], cache[2]

    def _effective_weight(self):
        """θ ⊙ mask for the eval forward, differentiable in θ when autograd needs it."""
        weight, mask = self.eval_weight()
        if torch.is_grad_enabled() and self.weight.requires_grad and not torch.compiler.is_compiling():
            return _CachedMaskedWeight.apply(self.weight, weight, mask)
        return weight

    def train(self, mode=True):
        self._eval_cache = None  # a mode switch is where training ends: never serve an old copy
        return super().train(mode)

    def __getstate__(self):
        state = super().__getstate__()
        state["_eval_cache"] = None  # derived data: not pickled, not deep-copied
        return state

    def __setstate__(self, state):
        # a layer pickled before threshold and log_alpha_range were checked properties
        for name in ("threshold", "log_alpha_range"):
            if name in state:
                state["_" + name] = state.pop(name)
        super().__setstate__(state)

    def freeze_mask(self, noise=False):
        """Fix the current mask for fine-tuning: pruned weights are set to zero and stay
        exactly zero (every forward multiplies θ by the mask), ``mask()`` returns the
        fixed mask whatever log α does, and training trains the kept θ and the bias on
        the data term. ``noise=False`` (default) trains the deterministic masked layer;
        ``noise=True`` keeps sampling the kept weights' noise (LRT with σ² ⊙ mask).
        The fixed mask is a buffer (``frozen_mask``): it travels with the state dict."""
        noise = flag(f"{type(self).__name__}.freeze_mask", "noise", noise)
        with torch.no_grad():
            mask = self.mask().clone()
            self.weight.mul_(mask)
        if _is_dtensor(mask):  # θ sharded by FSDP2: the buffer is whole, as FSDP keeps buffers
            mask = mask.full_tensor()
        self.frozen_mask = mask
        self.frozen_noise = noise
        return self

    def unfreeze_mask(self):
        """Back to SparseVD training: the mask follows log α and the threshold again."""
        self.frozen_mask = None
        self.frozen_noise = False
        return self

    def _frozen_log_sigma2(self):
        """The LRT's log σ² while the mask is frozen with noise: a pruned weight has zero
        variance (log σ² = −inf), so it adds no noise either."""
        return self.variance_log_sigma2().masked_fill(~self.frozen_mask, float("-inf"))

    def kept_weights(self):
        """Number of weights that survive pruning."""
        return int(self.mask().sum())

    def total_weights(self):
        return self.weight.numel()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Missing/unexpected keys alone would not say why; a variant's variance cannot be
        # read as another's, so this is an error even with strict=False.
        saved = [v for v, name in _VARIANCE_NAMES.items() if prefix + name in state_dict]
        if saved and self.variant not in saved:
            error_msgs.append(
                f"{prefix.rstrip('.') or type(self).__name__}: the state dict holds a SparseVD layer with alpha "
                f"variant {saved[0]!r}, but this layer has {self.variant!r}; build it with the same alpha to load "
                f"it (or drop {prefix + _VARIANCE_NAMES[saved[0]]!r} to load θ and the bias only)"
            )
        if adopt_frozen_mask(self, state_dict, prefix, self.weight, error_msgs):
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)


def adopt_frozen_mask(module, state_dict, prefix, like, error_msgs):
    """Before ``module`` loads ``state_dict``: the fixed mask of fine-tuning is part of the
    saved state, so adopt the saved one (or its absence) and a loaded layer prunes exactly
    what the saved one did. ``like``: the tensor the mask has the shape and device of.
    Returns False, with the reason in ``error_msgs``, when the saved mask is not one."""
    frozen = state_dict.get(prefix + "frozen_mask")
    if frozen is None:
        module.frozen_mask = None
    elif isinstance(frozen, torch.Tensor) and frozen.dtype == torch.bool and frozen.shape == like.shape:
        module.frozen_mask = torch.empty_like(frozen, device=like.device)
    else:
        error_msgs.append(f"{prefix.rstrip('.') or type(module).__name__}: frozen_mask must be a bool tensor of "
                          f"shape {tuple(like.shape)}, got {getattr(frozen, 'dtype', type(frozen))} "
                          f"{tuple(getattr(frozen, 'shape', ()))}")
        return False
    return True


class SparseVDLinear(SparseVDModule):
    """Drop-in replacement for :class:`torch.nn.Linear` trained with Sparse VD.

    Args match ``nn.Linear`` (inputs ``[*, in_features]``), plus
    ``threshold`` (prune where log α ≥ threshold, default 3.0), ``log_sigma2_init``
    (initial log σ², default −10: start almost deterministic), ``log_alpha_range``
    (clamp of log α, default (−10, 10)) and ``alpha`` (the variance variant:
    ``"weight"``, ``"unit"``, ``"layer"`` or a fixed α; see the module docstring).
    """

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        device=None,
        dtype=None,
        threshold=reference.THRESHOLD,
        log_sigma2_init=reference.LOG_SIGMA2_INIT,
        log_alpha_range=reference.LOG_ALPHA_RANGE,
        alpha="weight",
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = integer(type(self).__name__, "in_features", in_features, 1)
        self.out_features = integer(type(self).__name__, "out_features", out_features, 1)
        self._init_sparsevd(threshold, log_sigma2_init, log_alpha_range, alpha)
        self._create_parameters((self.out_features, self.in_features), bias, factory)

    def forward(self, input):
        # the ops' own checks cost nothing when the input is right; a wrong one is then
        # reported in this layer's name, not in the name of the op that found it
        try:
            if not self.training:
                return torch.nn.functional.linear(input, self._effective_weight(), self.bias)
            if self.frozen_mask is None:
                return F.lrt_linear(input, self.weight, self.variance_log_sigma2(), self.bias)
            if self.frozen_noise:
                return F.lrt_linear(input, self.weight * self.frozen_mask, self._frozen_log_sigma2(), self.bias)
            return F.masked_linear(input, self.weight, self.frozen_mask, self.bias)
        except (RuntimeError, TypeError, ValueError):
            x, weight, bias = F._autocast(input, self.weight, self.bias)  # as the ops saw them
            F._check_input(type(self).__name__, x, self.in_features, weight, bias, self.out_features)
            raise

    @classmethod
    def from_linear(cls, linear, **kwargs):
        """A SparseVDLinear whose θ and bias are copied from a trained ``nn.Linear``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            **kwargs,
        )
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.reset_variance_parameters()
        return layer

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, threshold={self.threshold}"
            + ("" if self.variant == "weight" else f", alpha={self.alpha!r}")
        )
