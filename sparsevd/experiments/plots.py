"""The training run's pictures, as PNG files (matplotlib, no display needed).

- ``weights.png``: the masks of the first conv layer's filters and of a 100×100 patch of
  the first fully-connected layer at several epochs (pruned weights white);
- ``log_alpha.png``: the histogram of log α per layer, with the pruning threshold;
- ``training.png``: error, loss, compression and KL weight per epoch;
- ``threshold.png``: validation error and compression against the threshold;
- ``tradeoff.png``: validation error against compression across the thresholds.
"""

from __future__ import annotations

import math
import os

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

import sparsevd

#: The 100×100 patch of the first fully-connected layer that the weight plots follow.
PATCH = 100


def snapshot(model):
    """The first conv layer's filters and a 100×100 patch of the first fully-connected
    layer, pruned weights zeroed (float16: only for plotting)."""
    snap = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):  # linear and conv2d layers
            continue
        with torch.no_grad():
            w = weight * module.mask() if isinstance(module, sparsevd.SparseVDModule) else weight
        key = "conv" if w.dim() == 4 else "fc"
        if key not in snap:
            if key == "fc":
                start = max(0, (w.shape[1] - PATCH) // 2)  # the middle inputs: the image centre for an MLP
                w = w[:PATCH, start : start + PATCH]
            snap[key] = w.detach().to("cpu", torch.float16).clone()
    return snap


def snapshot_epochs(epochs):
    """The epochs after which the weight plots are recorded (0 = initialisation)."""
    return sorted({0, epochs} | {max(1, round(epochs * f)) for f in (0.05, 0.1, 0.2, 0.35, 0.5, 0.75)})


def _tile_filters(filters, columns=5):
    """[out, in, kh, kw] filters (first input channel) tiled into one image, NaN gaps."""
    w = filters[:, 0].float()
    n, kh, kw = w.shape
    rows = -(-n // columns)
    image = torch.full((rows * (kh + 1) - 1, columns * (kw + 1) - 1), float("nan"))
    for i in range(n):
        r, c = divmod(i, columns)
        image[r * (kh + 1) : r * (kh + 1) + kh, c * (kw + 1) : c * (kw + 1) + kw] = w[i]
    return image


def _times(v):
    return f"{v:,.0f}×" if v >= 100 else f"{v:.3g}×"


def compression_axis(ax, values, which="y", color="tab:green", log=None):
    """Compression on the ``which`` axis, labelled 1×, 2×, 5×, 10×, ...: log scale when
    the values span more than 3× (or ``log``), with the minor ticks labelled when they
    span less than a decade."""
    axis = getattr(ax, f"{which}axis")
    axis.set_label_text("compression |W| / |W≠0|" + (" (log scale)" if log else ""), color=color)
    values = [v for v in values if math.isfinite(v)]  # inf: everything pruned, not drawn
    if not values:
        return
    lo, hi = min(values), max(values)
    times = FuncFormatter(lambda v, _: _times(v))
    if not (log or (log is None and hi >= 3 * lo)):
        axis.set_major_formatter(times)
        return
    getattr(ax, f"set_{which}scale")("log")
    digits = (2, 3, 4, 5, 6, 7, 8, 9) if hi < 10 * lo else (2, 5)
    axis.set_major_formatter(times)
    axis.set_minor_formatter(FuncFormatter(
        lambda v, _: _times(v) if v > 0 and round(v / 10 ** math.floor(math.log10(v)), 3) in digits else ""))


def weights(snapshots, path):
    """Panels by epoch: conv filters (if the network has any) over the fc patch."""
    epochs = snapshots["epochs"]
    kinds = [k for k in ("conv", "fc") if any(s is not None for s in snapshots[k])]
    fig = Figure(figsize=(max(1.9 * len(epochs), 5), 2.1 * len(kinds) + 0.5), layout="constrained")
    axes = fig.subplots(len(kinds), len(epochs), squeeze=False)
    cmap = matplotlib.colormaps["bwr"].with_extremes(bad="lightgray")  # gray: gaps between filters
    for row, kind in enumerate(kinds):
        for col, epoch in enumerate(epochs):
            # the sign only: kept weights of any size show up as clearly as the pruned ones
            w = snapshots[kind][col].float().sign()
            kept = float((w != 0).float().mean())
            image = _tile_filters(w) if kind == "conv" else w
            ax = axes[row][col]
            ax.imshow(image.numpy(), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            share = f"{100 * kept:.1f}" if kept >= 0.01 else f"{100 * kept:.2f}"
            ax.set_title((f"epoch {epoch}\n" if row == 0 else "") + f"{share}% kept", fontsize=9)
            if col == 0:
                ax.set_ylabel("conv1 filters" if kind == "conv" else "fc1, 100×100", fontsize=9)
    fig.suptitle("weight masks over training: white = pruned, red = kept > 0, blue = kept < 0", fontsize=10)
    fig.savefig(path, dpi=100)


def log_alpha(model, threshold, path):
    """Histogram of log α of every SparseVD layer, and the threshold."""
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for name, layer in sparsevd.sparsevd_modules(model):
        values = layer.log_alpha.flatten().float().cpu().numpy()
        ax.hist(values, bins=80, range=layer.log_alpha_range, histtype="step", linewidth=1.5,
                label=f"layer {name} ({values.size} weights)")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_yscale("log")
    ax.set_xlabel("log α  (right of the threshold: pruned)")
    ax.set_ylabel("weights")
    fig.legend(fontsize=8, loc="outside upper center", ncols=2)
    fig.savefig(path, dpi=90)


def _whole_curve(ax, values):
    """Limits that show every value: a log scale when they span more than a decade (the
    first epochs' error or loss is often tens of times the last ones'), else linear
    from 0 with some headroom."""
    values = [v for v in values if math.isfinite(v)]
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) > 10 * min(positive):
        ax.set_yscale("log")
        ax.set_ylim(min(positive) / 1.3, max(positive) * 1.3)
    elif values:
        ax.set_ylim(min(0, min(values)), 1.1 * max(values) or 1)


def training(history, path):
    """Validation and training error, the loss, and (for SparseVD) compression and the KL
    weight per epoch."""
    epochs = [h["epoch"] for h in history]
    bayesian = any(h["total"] for h in history)
    fig = Figure(figsize=(13 if bayesian else 9, 3.4), layout="constrained")
    axes = fig.subplots(1, 3 if bayesian else 2, squeeze=False)[0]
    errors = {"validation error": [h["val_error"] for h in history],
              "training error (stochastic)": [100 * (1 - h["train_acc"]) for h in history]}
    for label, values in errors.items():
        axes[0].plot(epochs, values, label=label, alpha=1 if label.startswith("val") else 0.7)
    _whole_curve(axes[0], [v for values in errors.values() for v in values])
    axes[0].set_ylabel("error %")
    losses = [h["loss"] for h in history]
    axes[1].plot(epochs, losses, color="tab:red")
    _whole_curve(axes[1], losses)
    tuned = [h["epoch"] for h in history if h.get("phase") == "finetune"]
    axes[1].set_ylabel("training loss (SGVLB per example" + ("; cross-entropy in fine-tuning)" if tuned else ")")
                       if bayesian else "training loss (cross-entropy)")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if tuned:  # the fine-tuning epochs: mask fixed, data term only
            ax.axvspan(tuned[0] - 1, tuned[-1], color="tab:orange", alpha=0.12, lw=0)
    if tuned:
        axes[0].plot([], [], color="tab:orange", alpha=0.3, lw=6, label="fine-tuning, mask fixed")
    axes[0].legend(fontsize=8)
    if bayesian:
        ax = axes[2]
        compression = [h["total"] / max(h["kept"], 1) for h in history]
        ax.plot(epochs, compression, color="tab:green")
        compression_axis(ax, compression)
        if history[-1].get("threshold"):  # not in the history of checkpoints from before it was recorded
            ax.set_title(f"kept: log α < {history[-1]['threshold']}", fontsize=9)
        twin = ax.twinx()
        kl_weights = [h["kl_weight"] for h in history]
        twin.plot(epochs, kl_weights, color="tab:gray", linestyle=":")
        twin.set_ylabel("KL weight (dotted)", color="tab:gray")
        twin.set_ylim(0, 1.05 * max(max(kl_weights), 1e-3))
    fig.savefig(path, dpi=90)


def threshold(curve, chosen, path):
    """Validation error and compression against the log α threshold."""
    ts = [p["threshold"] for p in curve]
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.plot(ts, [p["val_error"] for p in curve], marker=".", color="tab:blue")
    ax.set_xlabel("threshold on log α (prune where log α ≥ threshold)")
    ax.set_ylabel("validation error %", color="tab:blue")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    compression = [p["compression"] for p in curve]
    twin.plot(ts, compression, color="tab:green")
    compression_axis(twin, compression)
    ax.axvline(chosen, color="black", linestyle="--", label=f"chosen {chosen:g}")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)


#: Labels closer than this (as fractions of the axes, x on its log scale) to one already
#: placed are left out: at 7 points a one-digit label is about 2% of the axes wide.
LABEL_GAP = (0.07, 0.06)


def _labelled(points, chosen):
    """The points of the trade-off plot that get their threshold as a label: the chosen
    one, then the whole-number thresholds from the highest down, each only where it stays
    clear of the labels before it (they crowd where the curve is steep or flat)."""
    if not points:
        return []
    xs = [math.log(p["compression"]) for p in points]
    ys = [p["val_error"] for p in points]
    x_span, y_span = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    at = {id(p): ((x - min(xs)) / x_span, (y - min(ys)) / y_span) for p, x, y in zip(points, xs, ys)}
    candidates = [p for p in points if p["threshold"] == chosen]
    candidates += sorted((p for p in points if p["threshold"] == round(p["threshold"]) and p["threshold"] != chosen),
                         key=lambda p: -p["threshold"])
    placed = []
    for p in candidates:
        x, y = at[id(p)]
        if all(abs(x - at[id(q)][0]) >= LABEL_GAP[0] or abs(y - at[id(q)][1]) >= LABEL_GAP[1] for q in placed):
            placed.append(p)
    return placed


def tradeoff(curve, chosen, dense_error, path):
    """Validation error against compression, one point per threshold: what pruning more
    costs in accuracy (the labels: :func:`_labelled`); returns the figure."""
    finite = [p for p in curve if math.isfinite(p["compression"])]
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.plot([p["compression"] for p in finite], [p["val_error"] for p in finite], marker=".", color="tab:blue")
    for p in _labelled(finite, chosen):
        ax.annotate(f"{p['threshold']:g}", (p["compression"], p["val_error"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    marked = [p for p in finite if p["threshold"] == chosen]
    if marked:
        ax.plot([marked[0]["compression"]], [marked[0]["val_error"]], marker="*", markersize=12, color="black",
                linestyle="none", label=f"chosen: log α < {chosen:g}")
    if dense_error is not None:
        ax.axhline(dense_error, color="tab:gray", linestyle="--", label=f"dense network {dense_error:.2f}%")
    compression_axis(ax, [p["compression"] for p in finite], which="x", color="black")
    ax.set_title("labels: the threshold t on log α (kept where log α < t)", fontsize=9)
    ax.set_ylabel("validation error %")
    ax.grid(alpha=0.3, which="both")
    if marked or dense_error is not None:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)
    return fig


def plot_run(out, history, snapshots, model=None, curve=None, chosen=None, dense_error=None):
    """All plots of a run into ``out``; returns their file names. ``model`` and ``curve``
    only for a SparseVD run; ``dense_error``: a dense run's validation error % to compare with."""
    names = []

    def save(name, draw, *args):
        draw(*args, os.path.join(out, name))
        names.append(name)

    if snapshots["epochs"]:
        save("weights.png", weights, snapshots)
    if history:
        save("training.png", training, history)
    if model is not None:
        save("log_alpha.png", log_alpha, model, chosen)
    if curve:
        save("threshold.png", threshold, curve, chosen)
        save("tradeoff.png", tradeoff, curve, chosen, dense_error)
    return names
