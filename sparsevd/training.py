"""Training helpers: the model's KL term, the SGVLB loss and the KL warm-up.

The loss is the negative stochastic gradient variational lower bound (SGVLB) per
example:  loss = mean_batch(NLL) + kl_weight · Σ_layers KL / N,  where N is the size
of the training set, not of the batch. The KL is a property of the whole data set's
posterior, so dividing it by N puts it on the same per-example scale as the mean NLL.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _warnings
from ._validate import flag, integer, real
from .layers import SparseVDModule
from .report import kept_weights
from .pruning_layers import require_pruning_layers, sparsevd_modules
from .sbp import sbp_modules

#: "At chance": training accuracy no more than this above always predicting the most frequent class.
CHANCE_MARGIN = 0.05
#: "Most weights pruned": the share of pruned weights above which a network at chance has collapsed.
COLLAPSED_PRUNED = 0.5


class CollapseWarning(UserWarning):
    """Training accuracy at chance while most weights are pruned: the KL term pruned the
    network before the data shaped it."""


def _one_per_posterior(layers):
    """One SparseVD layer per posterior: layers sharing θ and its variance (an embedding
    tied to the output head, see :func:`sparsevd.convert`) count once, by the layer that
    reads every row (an embedding leaves its padding row out; a head tied to it reads it)."""
    chosen = {}
    for name, layer in layers:
        key = (id(layer.weight), id(layer._raw_variance()))
        if key not in chosen or getattr(chosen[key][1], "padding_idx", None) is not None:
            chosen[key] = (name, layer)
    return list(chosen.values())


def kl_divergence(model):
    """Σ KL over every SparseVD and SBPDropout layer of ``model``: a differentiable 0-dim
    float32 tensor. Layers that share their parameters (tied weights) count once."""
    require_pruning_layers(model, "kl_divergence")
    layers = _one_per_posterior(sparsevd_modules(model)) + sbp_modules(model)
    total = layers[0][1].kl()
    for _, layer in layers[1:]:
        total = total + layer.kl()
    return total


def _non_negative(where, name, value):
    return real(where, name, value, "a finite number ≥ 0", lambda v: math.isfinite(v) and v >= 0)


def _dataset_size(where, value):
    return integer(where, "dataset_size", value, 1, "a positive int (the training-set size N)")


def sgvlb(nll, model, dataset_size, kl_weight=1.0):
    """mean NLL + kl_weight · KL(model) / dataset_size (``nll`` already averaged over the batch)."""
    if not isinstance(nll, torch.Tensor):
        raise TypeError(f"sgvlb: nll must be a tensor (the batch's mean negative log-likelihood), got "
                        f"{type(nll).__name__}")
    dataset_size = _dataset_size("sgvlb", dataset_size)
    kl_weight = _non_negative("sgvlb", "kl_weight", kl_weight)
    kl = kl_divergence(model)
    return nll + kl_weight * kl.to(nll.dtype) / dataset_size


def collapse_message(accuracy, chance, kept, total, what="training accuracy"):
    """Why and what to do when a classifier's ``accuracy`` (``what`` says which) is at
    ``chance`` (the share of the most frequent class) while more than half of its
    ``total`` SparseVD weights are pruned (``kept`` survive); None when it is not so."""
    if total == 0 or kept > (1 - COLLAPSED_PRUNED) * total or accuracy > chance + CHANCE_MARGIN:
        return None
    return (f"{what} {accuracy:.1%} is at chance ({chance:.1%} by always predicting the most frequent "
            f"class) while {1 - kept / total:.2%} of the weights are pruned ({kept:,} of {total:,} kept): the KL "
            "term pruned the network before the data shaped it. SparseVD needs care when the training set is small "
            "against the number of weights: train on more examples, lower the KL weight (SGVLBLoss(kl_weight=...), "
            "--kl-weight), or warm it up for longer (KLWarmup(end=...), --kl-warmup).")


class SGVLBLoss(nn.Module):
    """``loss = criterion(output, target) + kl_weight · warmup · KL(model) / dataset_size``.

    ``criterion`` must average over the batch (the default cross-entropy does); for
    regression pass a :class:`~sparsevd.GaussianLikelihood`, whose learned variance then
    trains with ``loss.parameters()``.

    ``kl_weight`` (default 1, the variational bound) trades accuracy for compression:
    above 1 the prior prunes more, below 1 the data keeps more weights. ``warmup``, given
    per call (a :class:`KLWarmup` value, 0 → 1), multiplies it.

    For a classification (integer targets, classes along dim 1), the loss watches the
    training accuracy of the outputs it sees: every ``check_collapse_every`` calls it
    compares the accuracy over those calls with chance, and if the network is at chance
    while most weights are pruned it warns once (:class:`CollapseWarning`) with what to
    do. The counts stay on the device, so only the check synchronises; None turns the
    check off (a caller that runs the same check itself, like the training command).
    Compiled calls (torch.compile) are not watched.
    """

    def __init__(self, model, dataset_size, criterion=None, kl_weight=1.0, check_collapse_every=100):
        super().__init__()
        require_pruning_layers(model, "SGVLBLoss")
        if check_collapse_every is not None:
            check_collapse_every = integer("SGVLBLoss", "check_collapse_every", check_collapse_every, 1,
                                           "a positive int or None")
        if criterion is not None and not callable(criterion):
            raise TypeError(f"SGVLBLoss: criterion must be a callable loss (output, target) → mean NLL, got "
                            f"{type(criterion).__name__}")
        self.model = [model]  # a list, so the model's parameters are not registered twice
        self.dataset_size = dataset_size
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.kl_weight = kl_weight
        self.check_collapse_every = check_collapse_every
        self._collapse_warned = False
        self._calls = 0
        self._counts = None  # [correct, seen, per-class target counts...] since the last check

    # read by every call: a bad value is refused when it is set, not at the next call
    @property
    def dataset_size(self):
        """N, the training-set size the KL is divided by: a positive int."""
        return self._dataset_size

    @dataset_size.setter
    def dataset_size(self, value):
        self._dataset_size = _dataset_size("SGVLBLoss", value)

    @property
    def kl_weight(self):
        """The constant multiplier of the KL term: a finite number ≥ 0."""
        return self._kl_weight

    @kl_weight.setter
    def kl_weight(self, value):
        self._kl_weight = _non_negative("SGVLBLoss", "kl_weight", value)

    def forward(self, output, target, warmup=1.0, **deprecated):
        if deprecated:
            warmup = self._deprecated_kl_weight(warmup, deprecated)
        warmup = _non_negative("SGVLBLoss", "warmup", warmup)
        loss = sgvlb(self.criterion(output, target), self.model[0], self.dataset_size, self.kl_weight * warmup)
        if self.check_collapse_every and not self._collapse_warned and not torch.compiler.is_compiling():
            self._watch(output.detach(), target)
        return loss

    @staticmethod
    def _deprecated_kl_weight(warmup, kwargs):
        if set(kwargs) != {"kl_weight"}:
            raise TypeError(f"SGVLBLoss got unexpected keyword arguments {sorted(kwargs)}")
        if not torch.compiler.is_compiling():  # Dynamo cannot trace warnings.warn under fullgraph=True
            _warnings.warn("SGVLBLoss(...)(output, target, kl_weight=w) is now warmup=w: the warm-up value of this "
                           "call; kl_weight is SGVLBLoss's constant multiplier (SGVLBLoss(model, N, kl_weight=...))",
                           DeprecationWarning)
        return kwargs["kl_weight"]

    def _watch(self, output, target):
        if (output.dim() < 2 or output.shape[1] < 2 or target.is_floating_point()
                or target.shape != output.shape[:1] + output.shape[2:]):
            return  # not a classification with the classes along dim 1
        classes = output.shape[1]
        if self._counts is None or self._counts.numel() != 2 + classes or self._counts.device != output.device:
            self._counts = torch.zeros(2 + classes, dtype=torch.int64, device=output.device)
        valid = target >= 0  # negative targets: cross-entropy's ignore_index
        with torch.no_grad():
            self._counts[0] += ((output.argmax(1) == target) & valid).sum()
            self._counts[1] += valid.sum()
            # scatter_add_, unlike bincount or boolean indexing, never waits for the device
            self._counts[2:].scatter_add_(0, target.clamp(0, classes - 1).flatten(), valid.flatten().long())
        self._calls += 1
        if self._calls % self.check_collapse_every == 0:
            correct, seen, *per_class = self._counts.tolist()
            self._counts.zero_()
            accuracy, chance = correct / max(seen, 1), max(per_class) / max(seen, 1)
            if seen and accuracy <= chance + CHANCE_MARGIN:  # the pruned share is counted only then
                message = collapse_message(accuracy, chance, *compression(self.model[0]))
                if message:
                    self._collapse_warned = True
                    _warnings.warn(message, CollapseWarning)


class KLWarmup:
    """The warm-up of the KL term as a function of the epoch: 0 until ``start``, then
    linear to ``max_weight`` at ``end``, constant after.

    Epochs may be fractional: call it every step with ``epoch + step / steps_per_epoch``
    so that the weight ramps smoothly. A ramp must last at least one epoch (or be
    absent, ``start == end``): faster, the prior prunes weights before the data had a say.
    The authors' recipe is ``KLWarmup(start=5, end=20)`` for 200 epochs.
    """

    #: The shortest ramp, in epochs.
    MIN_RAMP = 1.0

    def __init__(self, start=0.0, end=20.0, max_weight=1.0):
        start, end = real("KLWarmup", "start", start), real("KLWarmup", "end", end)
        max_weight = real("KLWarmup", "max_weight", max_weight)
        if not 0 <= start <= end:
            raise ValueError(f"KLWarmup: need 0 ≤ start ≤ end, got start={start}, end={end}")
        if 0 < end - start < self.MIN_RAMP - 1e-9:  # a tolerance for start + 1 rounded
            raise ValueError(f"the warm-up from epoch {start:g} to {end:g} would take the KL weight from 0 to "
                             f"{max_weight:g} in less than an epoch, pruning weights before the data shaped them; "
                             f"ramp over at least {self.MIN_RAMP:g} epoch (end ≥ start + {self.MIN_RAMP:g}), or "
                             "pass start == end for no warm-up")
        if max_weight < 0:
            raise ValueError(f"KLWarmup: max_weight must be finite and ≥ 0, got {max_weight}")
        self.start, self.end, self.max_weight = start, end, max_weight

    def __call__(self, epoch):
        epoch = real("KLWarmup", "epoch", epoch)  # a NaN epoch would give a NaN weight
        if epoch <= self.start:
            return 0.0 if self.end > self.start else self.max_weight
        if epoch >= self.end:
            return self.max_weight
        return self.max_weight * (epoch - self.start) / (self.end - self.start)


def freeze_masks(model, noise=False):
    """Fix the pruning mask of every SparseVD and SBPDropout layer of ``model`` for
    fine-tuning (see :meth:`SparseVDModule.freeze_mask`, :meth:`SBPDropout.freeze_mask`):
    each SparseVD layer keeps the weights its mask keeps now (log α below its
    ``threshold``: set the threshold first), the pruned ones are set to zero and stay
    exactly zero, and each SBPDropout keeps the units it keeps now (SNR above its
    threshold), the others output exactly zero. Training then trains θ and the biases on
    whatever loss it is given (for fine-tuning, the data term alone, without the KL):
    without noise through the deterministic masked network, with ``noise=True`` sampling
    the kept weights' and units' noise, whose parameters train too. The masks are
    buffers: they travel with the state dict. Returns the frozen layers."""
    noise = flag("freeze_masks", "noise", noise)
    layers = [layer for _, layer in require_pruning_layers(model, "freeze_masks")]
    for layer in layers:
        layer.freeze_mask(noise=noise)
    return layers


def unfreeze_masks(model):
    """Undo :func:`freeze_masks`: every SparseVD layer's mask follows log α and the
    threshold again, every SBPDropout's the SNR. Returns the layers."""
    layers = [layer for _, layer in require_pruning_layers(model, "unfreeze_masks")]
    for layer in layers:
        layer.unfreeze_mask()
    return layers


def compression(model):
    """(kept, total) weights of ``model`` (each layer counted by :func:`sparsevd.report.kept_weights`).

    Without SBPDropout layers: the weights the SparseVD masks keep, of the SparseVD layers'
    weights (the SparseVD paper's count; tied weights once). With them: the non-zero
    weights of the dense network that ``sparsify`` cuts the pruned units from (a weight
    counts when its mask and the SBP layers keep it and it connects two kept units), of all
    the weights of ``model``'s linear and convolution layers. A model without SparseVD and
    SBPDropout layers is refused (ValueError): :func:`sparsevd.report` counts any model's weights."""
    require_pruning_layers(model, "compression", hint="; sparsevd.report(model).total counts the kept weights "
                           "of any model, a sparsified one included")
    if not sbp_modules(model):
        counts = [kept_weights(layer) for _, layer in _one_per_posterior(sparsevd_modules(model))]
    else:
        from .sparsify import CostModel, sparsify  # sparsify builds on the training modules

        layers = (SparseVDModule, nn.Linear, nn.Conv1d, nn.Conv2d)
        cut = sparsify(model, cost_model=CostModel.dense())
        counts = [(kept_weights(m)[0], 0) for m in cut.modules() if isinstance(m, layers)]
        counts += [(0, m.weight.numel()) for m in model.modules() if isinstance(m, layers)]
    return sum(k for k, _ in counts), sum(t for _, t in counts)
