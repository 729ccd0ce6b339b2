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

from .layers import SparseVDModule
from .sbp import sbp_modules


def sparsevd_modules(model):
    """The SparseVD layers of ``model`` (in ``model.modules()`` order), with their names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseVDModule)]


def kl_divergence(model):
    """Σ KL over every SparseVD and SBPDropout layer of ``model``: a differentiable 0-dim
    float32 tensor."""
    layers = sparsevd_modules(model) + sbp_modules(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SparseVD layers and no SBPDropout layers")
    total = layers[0][1].kl()
    for _, layer in layers[1:]:
        total = total + layer.kl()
    return total


def sgvlb(nll, model, dataset_size, kl_weight=1.0):
    """mean NLL + kl_weight · KL(model) / dataset_size (``nll`` already averaged over the batch)."""
    if not (isinstance(dataset_size, int) and dataset_size > 0):
        raise ValueError(f"dataset_size must be a positive int (the training-set size N), got {dataset_size!r}")
    kl_weight = float(kl_weight)
    if not (math.isfinite(kl_weight) and kl_weight >= 0):
        raise ValueError(f"kl_weight must be a finite number ≥ 0, got {kl_weight}")
    kl = kl_divergence(model)
    return nll + kl_weight * kl.to(nll.dtype) / dataset_size


class SGVLBLoss(nn.Module):
    """``loss = criterion(output, target) + kl_weight · KL(model) / dataset_size``.

    ``criterion`` must average over the batch (the default cross-entropy does).
    """

    def __init__(self, model, dataset_size, criterion=None):
        super().__init__()
        if not (isinstance(dataset_size, int) and dataset_size > 0):
            raise ValueError(f"dataset_size must be a positive int (the training-set size N), got {dataset_size!r}")
        self.model = [model]  # a list, so the model's parameters are not registered twice
        self.dataset_size = dataset_size
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()

    def forward(self, output, target, kl_weight=1.0):
        return sgvlb(self.criterion(output, target), self.model[0], self.dataset_size, kl_weight)


class KLWarmup:
    """kl_weight as a function of the epoch (or step): 0 until ``start``, then linear to
    ``max_weight`` at ``end``, constant after.

    The authors' recipe is ``KLWarmup(start=5, end=20)`` for 200 epochs; starting the
    KL at full weight prunes weights before the data had a say.
    """

    def __init__(self, start=0.0, end=20.0, max_weight=1.0):
        start, end, max_weight = float(start), float(end), float(max_weight)
        if not (math.isfinite(start) and math.isfinite(end) and 0 <= start <= end):
            raise ValueError(f"need 0 ≤ start ≤ end, got start={start}, end={end}")
        if not (math.isfinite(max_weight) and max_weight >= 0):
            raise ValueError(f"max_weight must be finite and ≥ 0, got {max_weight}")
        self.start, self.end, self.max_weight = start, end, max_weight

    def __call__(self, epoch):
        if epoch <= self.start:
            return 0.0 if self.end > self.start else self.max_weight
        if epoch >= self.end:
            return self.max_weight
        return self.max_weight * (epoch - self.start) / (self.end - self.start)


def compression(model):
    """(kept, total) weight counts over the SparseVD layers of ``model``."""
    kept = total = 0
    for _, layer in sparsevd_modules(model):
        kept += layer.kept_weights()
        total += layer.total_weights()
    return kept, total
