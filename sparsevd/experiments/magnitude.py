"""Gradual magnitude pruning, the baseline a user would otherwise pick (Zhu & Gupta, "To
prune, or not to prune", 2017): the trained dense network's smallest weights, by |w|,
are pruned step by step on a cubic schedule until 1/X of them are left, the network
training on between the steps; then the mask stays fixed.

The masks are torch.nn.utils.prune's: each linear and convolution layer gets its
reparametrisation (``weight = weight_orig * weight_mask``, :func:`prepare`), and each
step computes the new mask with ``prune.L1Unstructured`` on the weights still kept, over
all layers together (``global``: what ``prune.global_unstructured`` computes) or layer by
layer (``layer``: ``prune.l1_unstructured``), written into ``weight_mask`` in place.
(Calling those two functions would stack one more pruning method, holding a copy of the
mask, on every layer at every step: hundreds over a schedule.) The result is then made
permanent (``prune.remove``) and the network converted to SparseVD layers whose mask is
fixed to it (:func:`to_sparsevd`), so that it goes through the same ``sparsify()`` and
the same results as a SparseVD run.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.utils import prune

import sparsevd

#: --prune-scope
SCOPES = ("global", "layer")
#: log σ² of the SparseVD layers a pruned network becomes: low enough that log α stays
#: below any threshold for every θ (log α ≤ log σ² − log 1e-8 < −1.5), so convert() prunes
#: nothing itself and the fixed mask alone decides; without noise it enters no output.
_LOG_SIGMA2 = -20.0


def layers(model):
    """The layers magnitude pruning prunes: every linear and convolution layer, with their names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def prepare(model):
    """Give every layer of :func:`layers` torch's pruning reparametrisation with nothing
    pruned (``prune.identity``), so that its state dict holds ``weight_orig`` and
    ``weight_mask``; returns ``model``."""
    for _, m in layers(model):
        prune.identity(m, "weight")
    return model


def kept(model):
    """(kept, total) weights of a :func:`prepare`'d model: its masks' ones, of all its weights."""
    masks = [m.weight_mask for _, m in layers(model)]
    return sum(int(mask.sum()) for mask in masks), sum(mask.numel() for mask in masks)


def final_kept(total, target):
    """The weights left of ``total`` at compression ``target``: at most total / target."""
    return math.floor(total / target)


def cubic(progress, final):
    """Zhu & Gupta's sparsity at ``progress`` (0 → 1) of the schedule ending at ``final``:
    s = final · (1 − (1 − progress)³): fast at first, while many redundant weights are
    left, slower towards the end."""
    return final * (1 - (1 - min(max(progress, 0.0), 1.0)) ** 3)


def _prune_more(scores, mask, amount):
    """``mask`` with ``amount`` more of its kept entries pruned, those of smallest
    ``scores``: ``prune.L1Unstructured`` on the kept entries, as torch's PruningContainer
    applies a further pruning to a pruned tensor."""
    kept_now = mask == 1
    new = mask.clone()
    new[kept_now] = prune.L1Unstructured(amount).compute_mask(scores[kept_now], torch.ones_like(scores[kept_now]))
    return new


class Pruner:
    """The schedule of a run: after ``step`` optimizer steps (:meth:`at`), every ``every``
    steps up to ``end_step`` and at it, prune the model's layers (``scope``: ``global``
    or ``layer``) to the sparsity of :func:`cubic`, ending at compression ``target``
    (at most 1/target of the weights kept, per layer too with ``layer``)."""

    def __init__(self, model, target, scope, end_step, every):
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.layers = [m for _, m in layers(model)]
        self.target, self.scope, self.end_step, self.every = target, scope, end_step, every

    def due(self, step):
        return step == self.end_step or (step < self.end_step and step % self.every == 0)

    def at(self, step):
        """Prune as the schedule says after ``step`` steps (nothing when no pruning is due)."""
        if self.due(step):
            progress = step / self.end_step if self.end_step else 1.0
            self.prune(progress)

    def prune(self, progress):
        """Prune to the schedule's sparsity at ``progress`` (0 → 1)."""
        with torch.no_grad():
            if self.scope == "global":
                masks = [m.weight_mask for m in self.layers]
                total = sum(mask.numel() for mask in masks)
                flat = torch.cat([mask.flatten() for mask in masks])
                scores = torch.cat([m.weight_orig.detach().abs().flatten() for m in self.layers])
                new = _prune_more(scores, flat, self._more(progress, total, int(flat.sum())))
                for mask, part in zip(masks, new.split([mask.numel() for mask in masks])):
                    mask.copy_(part.view_as(mask))
            else:
                for m in self.layers:
                    mask = m.weight_mask
                    new = _prune_more(m.weight_orig.detach().abs().flatten(), mask.flatten(),
                                      self._more(progress, mask.numel(), int(mask.sum())))
                    mask.copy_(new.view_as(mask))

    def _more(self, progress, total, kept_now):
        """How many more of ``total`` weights (``kept_now`` kept) to prune at ``progress``."""
        final = 1 - final_kept(total, self.target) / total
        return max(total - round(total * (1 - cubic(progress, final))) - (total - kept_now), 0)


def to_sparsevd(model):
    """A copy of the :func:`prepare`'d ``model`` with its masks made permanent
    (``prune.remove``: the pruned weights zero) and its layers SparseVD ones whose mask is
    fixed to them (``frozen_mask``), in eval mode: what ``sparsevd.sparsify``,
    ``sparsevd.compression`` and the run's results take."""
    masks = {name: m.weight_mask.bool() for name, m in layers(model)}
    for _, m in layers(model):
        # the masked weight the last forward computed: deepcopy copies graph leaves only
        # (the next forward computes it again)
        m.weight = m.weight.detach()
    plain = copy.deepcopy(model)
    for _, m in layers(plain):
        prune.remove(m, "weight")
    converted = sparsevd.convert(plain, log_sigma2_init=_LOG_SIGMA2)
    state = converted.state_dict()
    state.update({f"{name}.frozen_mask": mask for name, mask in masks.items()})
    converted.load_state_dict(state)
    return converted.eval()
