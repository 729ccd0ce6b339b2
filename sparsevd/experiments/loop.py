"""The training loop over in-memory tensors: the loss, one epoch with the KL warm-up
applied at every step, error rates, what a pruning network keeps, and a plain
``train()`` for scripts and tests."""

from __future__ import annotations

import copy
import math
import time
from typing import NamedTuple

import torch
from torch import nn

import sparsevd

from .distributed import SINGLE

class EpochStats(NamedTuple):
    loss: float  #: mean loss over the epoch
    accuracy: float  #: training accuracy of the stochastic passes that were trained on
    warmup: float  #: the warm-up factor of the epoch's last step
    seconds: float  #: spent in the training steps (the epoch's examples / seconds = examples per second)


def error_rate(model, x, y, batch_size=1000, world=SINGLE):
    """Top-1 error of ``model`` in eval mode, in %; with several processes (``world``) each
    rank evaluates its part of the examples and the counts are summed, so every rank
    returns the same figure."""
    model.eval()
    part = world.part(len(y))
    x, y_part = x[part], y[part]
    wrong = 0
    with torch.no_grad():
        for start in range(0, len(y_part), batch_size):
            wrong += int((model(x[start : start + batch_size]).argmax(1) != y_part[start : start + batch_size]).sum())
    (wrong,) = world.sum([wrong], y.device)
    return 100.0 * wrong / len(y)


def accuracy(model, x, y):
    """Top-1 accuracy of ``model`` in eval mode, in [0, 1]."""
    return 1 - error_rate(model, x, y) / 100


def chance(y):
    """The accuracy of always predicting the most frequent label of ``y``."""
    return float(torch.bincount(y).max()) / len(y)


def prunes(model):
    """Whether ``model`` has SparseVD or SBPDropout layers."""
    return bool(sparsevd.sparsevd_modules(model) or sparsevd.sbp_modules(model))


def pruned_copy(model):
    """An eval-mode copy of ``model`` in plain dense layers of the same shapes and names,
    every weight it prunes set to zero: θ ⊙ mask of the SparseVD layers, each SBPDropout's
    E[θ]·mask folded into a neighbouring layer (the rows, or the columns, of its pruned
    units zero); of a dense network, an eval-mode copy (sparsify warns of a model that
    prunes nothing)."""
    if not prunes(model):
        return copy.deepcopy(model).eval()
    return sparsevd.sparsify(model, cost_model=sparsevd.CostModel.dense(), shrink=False)


def cut_copy(model):
    """:func:`pruned_copy` with the pruned units cut (the layers around them shrink, names
    kept): the dense network the pruning leaves."""
    if not prunes(model):
        return copy.deepcopy(model).eval()
    return sparsevd.sparsify(model, cost_model=sparsevd.CostModel.dense())


def compression_ratio(model):
    """|W| / |W≠0| of what ``model`` keeps (:func:`sparsevd.compression`; inf when everything is pruned)."""
    kept, total = sparsevd.compression(model)
    return total / kept if kept else math.inf


def sbp_units(model):
    """Units kept per SBPDropout layer of ``model``, in order: [kept, ...]."""
    return [m.kept_units() for _, m in sparsevd.sbp_modules(model)]


def data_loss():
    """``loss(output, target, warmup)``: cross-entropy alone, the warm-up ignored (a dense
    network, or fine-tuning with the mask fixed)."""
    cross_entropy = nn.CrossEntropyLoss()
    return lambda out, y, warmup: cross_entropy(out, y)


def make_loss(model, dataset_size, kl_weight=1.0, check_collapse_every=100):
    """``loss(output, target, warmup)``: the SGVLB for a model with SparseVD or SBP layers,
    cross-entropy (ignoring the warm-up) for a dense one."""
    if prunes(model):
        return sparsevd.SGVLBLoss(model, dataset_size=dataset_size, kl_weight=kl_weight,
                                  check_collapse_every=check_collapse_every)
    return data_loss()


def step(model, optimizer, loss_fn, x, y, warmup, share=1.0):
    """One optimizer step; returns (loss, number of correct predictions). ``share``
    multiplies the loss whose gradient is taken (see :meth:`.distributed.World.batches`);
    the loss returned is the unscaled one."""
    out = model(x)
    loss = loss_fn(out, y, warmup)
    optimizer.zero_grad(set_to_none=True)
    (loss if share == 1.0 else loss * share).backward()
    optimizer.step()
    return loss.item(), int((out.argmax(1) == y).sum())


def train_epoch(model, optimizer, loss_fn, x, y, batch_size, epoch=0, warmup=None, bar=None, order=None,
                world=SINGLE, on_step=None):
    """Epoch ``epoch`` (0-based) of shuffled mini-batches: the global batches of ``order``
    (a permutation of the examples; default: from torch's global generator), each split
    across the processes of ``world`` (:meth:`.distributed.World.batches`; ``model`` then
    is the DistributedDataParallel wrapper). ``warmup``: a :class:`sparsevd.KLWarmup`,
    evaluated at every step at the fractional epoch, so the KL weight ramps smoothly
    (None: always 1). ``bar``: a tqdm bar advanced per batch. ``on_step``: called after
    each optimizer step with the number of the epoch's steps done (magnitude pruning's
    schedule). Returns :class:`EpochStats`, summed over the ranks.
    """
    model.train()
    if order is None:
        order = torch.randperm(len(y))
    batches = world.batches(order.to(y.device), batch_size)
    total_loss = correct = seen = 0.0
    factor = 1.0
    sparse_vd, sbp = bool(sparsevd.sparsevd_modules(model)), bool(sparsevd.sbp_modules(model))
    t0 = time.perf_counter()
    for i, (idx, share) in enumerate(batches):
        factor = warmup(epoch + i / len(batches)) if warmup is not None else 1.0
        loss, right = step(model, optimizer, loss_fn, x[idx], y[idx], factor, share)
        if on_step is not None:
            on_step(i + 1)
        total_loss += loss * len(idx)
        correct += right
        seen += len(idx)
        if bar is not None:
            bar.update(1)
            if i % 20 == 0 and not bar.disable:  # this rank's examples so far
                postfix = {"loss": f"{total_loss / seen:.3f}", "acc": f"{correct / seen:.3f}"}
                if (sparse_vd or sbp) and warmup is not None:  # fine-tuning has no KL
                    postfix["warmup"] = f"{factor:.2f}"
                if sparse_vd and not sbp:  # counting through SBP layers copies the model: units instead
                    kept, total = sparsevd.compression(model)
                    postfix["compression"] = f"{total / max(kept, 1):.1f}x"
                if sbp:
                    postfix["units"] = "-".join(map(str, sbp_units(model)))
                bar.set_postfix(postfix, refresh=False)
    seconds = time.perf_counter() - t0
    total_loss, correct = world.sum([total_loss, correct], y.device)
    return EpochStats(total_loss / len(y), correct / len(y), factor, seconds)


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
                f"kept {kept}/{total} at {kept_where(model, 'training threshold')}")
    return model


def threshold_of(model):
    """The pruning threshold of the model's SparseVD layers, as text ("3", or "2/3" when they
    differ; "" without SparseVD layers)."""
    values = sorted({m.threshold for _, m in sparsevd.sparsevd_modules(model)})
    return "/".join(f"{t:g}" for t in values)


def kept_where(model, which=""):
    """What the model keeps, as text: "log α < 3", "SNR > 1" or both; ``which`` names the
    SparseVD threshold ("log α < 3 (training threshold)")."""
    parts = [f"log α < {threshold_of(model)}" + (f" ({which})" if which else "")] \
        if sparsevd.sparsevd_modules(model) else []
    values = sorted({m.threshold for _, m in sparsevd.sbp_modules(model)})
    if values:
        parts.append("SNR > " + "/".join(f"{t:g}" for t in values))
    return ", ".join(parts)
