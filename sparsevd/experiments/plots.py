"""The training run's pictures, as PNG files (matplotlib, no display needed).

- ``weights.png``: the masks of the first conv layer's filters and of a 100×100 patch of
  the first fully-connected layer at several epochs (pruned weights white);
- ``log_alpha.png``: the histogram of log α per layer, with the pruning threshold;
- ``training.png``: validation error and compression per epoch;
- ``threshold.png``: validation error and compression against the threshold.
"""

from __future__ import annotations

import math
import os

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

import sparsevd


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


def _compression_axis(ax, values):
    """Compression on the y axis, labelled 1×, 2×, 5×, 10×, ...: log scale when the values
    span more than 3×, with the minor ticks labelled when they span less than a decade."""
    ax.set_ylabel("compression |W| / |W≠0|", color="tab:green")
    values = [v for v in values if math.isfinite(v)]  # inf: everything pruned, not drawn
    if not values:
        return
    lo, hi = min(values), max(values)
    times = FuncFormatter(lambda v, _: _times(v))
    if hi < 3 * lo:
        ax.yaxis.set_major_formatter(times)
        return
    ax.set_yscale("log")
    digits = (2, 3, 4, 5, 6, 7, 8, 9) if hi < 10 * lo else (2, 5)
    ax.yaxis.set_major_formatter(times)
    ax.yaxis.set_minor_formatter(FuncFormatter(
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


def training(history, path):
    """Validation error and (for SparseVD) compression and kl_weight per epoch."""
    epochs = [h["epoch"] for h in history]
    bayesian = any(h["total"] for h in history)
    fig = Figure(figsize=(9 if bayesian else 5, 3.4), layout="constrained")
    axes = fig.subplots(1, 2 if bayesian else 1, squeeze=False)[0]
    axes[0].plot(epochs, [h["val_error"] for h in history], label="validation error")
    axes[0].plot(epochs, [100 * (1 - h["train_acc"]) for h in history], label="training error (stochastic)",
                 alpha=0.7)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("error %")
    axes[0].set_ylim(0, min(100, 1.2 * max(h["val_error"] for h in history) + 1))
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    if bayesian:
        ax = axes[1]
        compression = [h["total"] / max(h["kept"], 1) for h in history]
        ax.plot(epochs, compression, color="tab:green")
        _compression_axis(ax, compression)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(epochs, [h["kl_weight"] for h in history], color="tab:gray", linestyle=":")
        twin.set_ylabel("kl_weight (dotted)", color="tab:gray")
        twin.set_ylim(0, 1.05)
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
    _compression_axis(twin, compression)
    ax.axvline(chosen, color="black", linestyle="--", label=f"chosen {chosen:g}")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)


def plot_run(out, history, snapshots, model=None, curve=None, chosen=None):
    """All plots of a run into ``out``; returns their file names. ``model`` and ``curve``
    only for a SparseVD run."""
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
    return names
