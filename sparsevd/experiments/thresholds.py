"""The SparseVD threshold on log α: the validation curve (validation error and compression
at each threshold), the rule that chooses one, and the one place that applies a threshold
to a model."""

from __future__ import annotations

import sparsevd

from .distributed import SINGLE
from .loop import compression_ratio, error_rate, threshold_of

#: Thresholds on log α of the validation curve (the paper's default, 3, among them).
THRESHOLDS = [t / 4 for t in range(-8, 33)]


def apply(model, threshold):
    """Set the threshold of every SparseVD layer of ``model``: the one place a run's
    threshold reaches its layers."""
    for _, m in sparsevd.sparsevd_modules(model):
        m.threshold = threshold


def threshold_curve(model, x, y, world=SINGLE):
    """Validation error (%) and compression at each threshold of ``THRESHOLDS`` (the
    errors summed over the ranks of ``world``: the same curve on every rank)."""
    layers = [m for _, m in sparsevd.sparsevd_modules(model)]
    saved = [m.threshold for m in layers]
    curve = []
    for t in THRESHOLDS:
        apply(model, t)
        curve.append({"threshold": t, "val_error": error_rate(model, x, y, world=world),
                      "compression": compression_ratio(model)})
    for m, t in zip(layers, saved):
        m.threshold = t
    return curve


def choose_threshold(curve, tolerance):
    """The most compressed threshold whose validation error is within ``tolerance`` points of the best."""
    best = min(p["val_error"] for p in curve)
    return max((p for p in curve if p["val_error"] <= best + tolerance), key=lambda p: p["compression"])["threshold"]


def select_threshold(c, model, data, world=SINGLE):
    """Set the SparseVD layers' threshold to --threshold, or with 'auto' to the one chosen
    on the validation split; returns the ``curve``, the ``threshold`` and the layers'
    threshold during training (``training_threshold``); all empty without SparseVD layers
    (SBP's threshold on the SNR is --sbp-threshold, fixed)."""
    if not sparsevd.sparsevd_modules(model):
        return {"curve": [], "threshold": None, "training_threshold": None}
    training_threshold = threshold_of(model)
    curve = threshold_curve(model, data["val_x"], data["val_y"], world)
    threshold = choose_threshold(curve, c.threshold_tolerance) if c.threshold == "auto" else float(c.threshold)
    apply(model, threshold)
    return {"curve": curve, "threshold": threshold, "training_threshold": training_threshold}
