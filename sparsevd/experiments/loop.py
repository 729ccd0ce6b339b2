"""The training loop over in-memory tensors: the loss, one epoch with the KL warm-up
applied at every step, error rates, and a plain ``train()`` for scripts and tests."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

import sparsevd


class EpochStats(NamedTuple):
    loss: float  #: mean loss over the epoch
    accuracy: float  #: training accuracy of the stochastic passes that were trained on
    warmup: float  #: the warm-up factor of the epoch's last step


def error_rate(model, x, y, batch_size=1000):
    """Top-1 error of ``model`` in eval mode, in %."""
    model.eval()
    wrong = 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            wrong += int((model(x[start : start + batch_size]).argmax(1) != y[start : start + batch_size]).sum())
    return 100.0 * wrong / len(y)


def accuracy(model, x, y):
    """Top-1 accuracy of ``model`` in eval mode, in [0, 1]."""
    return 1 - error_rate(model, x, y) / 100


def chance(y):
    """The accuracy of always predicting the most frequent label of ``y``."""
    return float(torch.bincount(y).max()) / len(y)


def compression_ratio(model):
    """|W| / |W≠0| over the SparseVD layers (inf when everything is pruned)."""
    kept, total = sparsevd.compression(model)
    return total / kept if kept else math.inf


def make_loss(model, dataset_size, kl_weight=1.0, check_collapse_every=100):
    """``loss(output, target, warmup)``: the SGVLB for a SparseVD model, cross-entropy
    (ignoring the warm-up) for a dense one."""
    if sparsevd.sparsevd_modules(model):
        return sparsevd.SGVLBLoss(model, dataset_size=dataset_size, kl_weight=kl_weight,
                                  check_collapse_every=check_collapse_every)
    cross_entropy = nn.CrossEntropyLoss()
    return lambda out, y, warmup: cross_entropy(out, y)


def step(model, optimizer, loss_fn, x, y, warmup):
    """One optimizer step; returns (loss, number of correct predictions)."""
    out = model(x)
    loss = loss_fn(out, y, warmup)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), int((out.argmax(1) == y).sum())


def train_epoch(model, optimizer, loss_fn, x, y, batch_size, epoch=0, warmup=None, bar=None):
    """Epoch ``epoch`` (0-based) of shuffled mini-batches (the order from torch's global
    generator). ``warmup``: a :class:`sparsevd.KLWarmup`, evaluated at every step at the
    fractional epoch, so the KL weight ramps smoothly (None: always 1). ``bar``: a tqdm
    bar advanced per batch. Returns :class:`EpochStats`.
    """
    model.train()
    order = torch.randperm(len(y), device=y.device)
    batches = range(0, len(y), batch_size)
    total_loss = correct = 0.0
    factor = 1.0
    bayesian = bool(sparsevd.sparsevd_modules(model))
    for i, start in enumerate(batches):
        factor = warmup(epoch + i / len(batches)) if warmup is not None else 1.0
        idx = order[start : start + batch_size]
        loss, right = step(model, optimizer, loss_fn, x[idx], y[idx], factor)
        total_loss += loss * len(idx)
        correct += right
        if bar is not None:
            bar.update(1)
            if i % 20 == 0 and not bar.disable:
                seen = start + len(idx)
                postfix = {"loss": f"{total_loss / seen:.3f}", "acc": f"{correct / seen:.3f}"}
                if bayesian:
                    postfix.update(warmup=f"{factor:.2f}", compression=f"{compression_ratio(model):.1f}x")
                bar.set_postfix(postfix, refresh=False)
    return EpochStats(total_loss / len(y), correct / len(y), factor)


def train(model, x, y, epochs, batch_size=100, lr=1e-3, warmup=None, kl_weight=1.0, log=print):
    """Adam with the SGVLB loss (plain cross-entropy when the model has no SparseVD
    layer) and a linear lr decay to 0.1 × lr; the KL weight is ``kl_weight`` × the
    ``warmup`` (a :class:`sparsevd.KLWarmup`, per step; None: no warm-up). The loss warns
    (:class:`sparsevd.CollapseWarning`) if the network collapses to chance."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=epochs)
    loss_fn = make_loss(model, len(y), kl_weight)
    for epoch in range(epochs):
        stats = train_epoch(model, optimizer, loss_fn, x, y, batch_size, epoch, warmup)
        scheduler.step()
        if sparsevd.sparsevd_modules(model) and (epoch + 1) % 10 == 0:
            kept, total = sparsevd.compression(model)
            log(f"  epoch {epoch + 1:3d}  loss {stats.loss:.3f}  KL weight {kl_weight * stats.warmup:.2f}  "
                f"kept {kept}/{total} at log α < {threshold_of(model)}")
    return model


def threshold_of(model):
    """The pruning threshold of the model's SparseVD layers, as text ("3", or "2/3" when they differ)."""
    values = sorted({m.threshold for _, m in sparsevd.sparsevd_modules(model)})
    return "/".join(f"{t:g}" for t in values)
