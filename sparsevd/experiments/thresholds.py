"""The SparseVD threshold on log α: the validation curve (validation error and compression
at each threshold), the rules that choose one, and the one place that applies a threshold
to a model.

The rules (--threshold, --target-compression, --threshold-tolerance):

- ``auto`` (the default): the most compressed threshold whose validation error is within
  one standard error of the best, the standard error of a proportion p measured on the n
  validation images, √(p(1 − p)/n) at the best p. A flat curve is noise around one error:
  every threshold on it is as good as the best, so the rule takes the most compressed.
- ``auto`` with --threshold-tolerance T: within T percentage points of the best instead.
- --target-compression X: the largest threshold (the most weights kept) that keeps at
  most 1/X of the weights. Where no threshold of the curve prunes that much, the most
  compressed one, with a warning.
- --threshold T: T.
"""

from __future__ import annotations

import math

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
        compression = compression_ratio(model)
        # masks grow with the threshold, so the same count kept is the same mask: its error
        # is the one just measured (a network that prunes slowly would otherwise be evaluated
        # dozens of times over for nothing)
        same = curve and curve[-1]["compression"] == compression
        curve.append({"threshold": t, "compression": compression,
                      "val_error": curve[-1]["val_error"] if same else error_rate(model, x, y, world=world)})
    for m, t in zip(layers, saved):
        m.threshold = t
    return curve


def standard_error(error, n):
    """The standard error, in percentage points, of an error rate of ``error`` % measured on ``n`` examples."""
    p = error / 100
    return 100 * math.sqrt(p * (1 - p) / n)


def choose_threshold(curve, n_val, tolerance=None):
    """The most compressed threshold of ``curve`` whose validation error is within
    ``tolerance`` points of the best (None: one standard error of the best, measured on
    ``n_val`` validation examples); returns ``(threshold, rule)``, the rule as a phrase."""
    best = min(p["val_error"] for p in curve)
    if tolerance is None:
        tolerance = standard_error(best, n_val)
        rule = (f"the most compressed threshold whose validation error is within one standard error "
                f"({tolerance:.2f} points: √(p(1 − p)/n) at the best p = {best:.2f}% on n = {n_val:,} validation "
                "images) of the best")
    else:
        rule = (f"the most compressed threshold whose validation error is within {tolerance:g} points "
                f"(--threshold-tolerance) of the best ({best:.2f}%)")
    chosen = max((p for p in curve if p["val_error"] <= best + tolerance), key=lambda p: p["compression"])
    return chosen["threshold"], rule


def threshold_for_compression(curve, target):
    """The largest threshold of ``curve`` that keeps at most 1/``target`` of the weights:
    ``(threshold, rule, warning)``; where none prunes that much, the most compressed
    threshold and a warning line (else None)."""
    reached = [p for p in curve if p["compression"] >= target]
    rule = f"the largest threshold that keeps at most 1/{target:g} of the weights (--target-compression {target:g})"
    if reached:
        return max(reached, key=lambda p: p["threshold"])["threshold"], rule, None
    nearest = max(curve, key=lambda p: (p["compression"], -p["threshold"]))
    warning = (f"warning: --target-compression {target:g}: no threshold on log α down to {THRESHOLDS[0]:g} prunes "
               f"that much; the most compressed, log α < {nearest['threshold']:g}, keeps 1/"
               f"{nearest['compression']:.1f} of the weights. Train longer or with a larger --kl-weight to prune more.")
    return nearest["threshold"], rule + "; not reached, the most compressed instead", warning


#: The selection of a network without SparseVD layers.
NONE = {"curve": [], "threshold": None, "training_threshold": None, "rule": None, "warning": None}


def describe(selection):
    """The log line of a ``selection``: the threshold the results count the weights at,
    its point of the curve and its rule, against the training threshold of the epoch lines."""
    point = next((p for p in selection["curve"] if p["threshold"] == selection["threshold"]), None)
    figures = f" ({point['compression']:.1f}×, validation error {point['val_error']:.2f}%)" if point else ""
    return (f"threshold: log α < {selection['threshold']:g}{figures}, {selection['rule']}; the results count the "
            f"weights kept at it (the epoch lines of the training: at the layers' training threshold, log α < "
            f"{selection['training_threshold']})")


def select_threshold(c, model, data, world=SINGLE):
    """Choose the SparseVD layers' threshold by the run's rule (see the module's
    docstring) on the validation split and apply it. Returns the ``curve``, the
    ``threshold``, the ``rule`` that chose it, a ``warning`` line (or None) and the
    layers' threshold during training (``training_threshold``); without SparseVD layers
    all empty (SBP's threshold on the SNR is --sbp-threshold, fixed)."""
    if not sparsevd.sparsevd_modules(model):
        return dict(NONE)
    training_threshold = threshold_of(model)
    curve = threshold_curve(model, data["val_x"], data["val_y"], world)
    warning = None
    if c.target_compression is not None:
        threshold, rule, warning = threshold_for_compression(curve, c.target_compression)
    elif c.threshold == "auto":
        threshold, rule = choose_threshold(curve, len(data["val_y"]), c.threshold_tolerance)
    else:
        threshold, rule = float(c.threshold), "given (--threshold)"
    apply(model, threshold)
    return {"curve": curve, "threshold": threshold, "training_threshold": training_threshold, "rule": rule,
            "warning": warning}
