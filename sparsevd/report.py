"""report(model): the paper's per-layer compression table, printable and as data."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._validate import module
from .conv import _SparseVDConvNd
from .layers import SparseVDModule
from .sbp import sbp_modules
from .shapes import output_positions
from .sparse import SparseLinear, _SparseConvNd

_INDEX_BYTES = 4  # int32 CSR indices
_CONVS = (_SparseVDConvNd, _SparseConvNd, nn.Conv1d, nn.Conv2d)


def _shape(layer):
    """The [out, in / groups, *kernel] shape of a layer's weight, dense or CSR."""
    if isinstance(layer, SparseLinear):
        return (layer.out_features, layer.in_features)
    if isinstance(layer, _SparseConvNd):
        return (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
    return tuple(layer.weight.shape)


def kept_weights(layer):
    """(kept, total) weights of one layer: for a SparseVD layer those its mask keeps, for a
    CSR layer its stored non-zeros, for a dense layer its non-zero weights. Every count of
    kept weights in the package (report, compression, sparsify's cost model) is this one."""
    if isinstance(layer, SparseVDModule):
        return layer.kept_weights(), layer.total_weights()
    if isinstance(layer, (SparseLinear, _SparseConvNd)):
        return layer.nnz, math.prod(_shape(layer))
    return int(torch.count_nonzero(layer.weight)), layer.weight.numel()


def _row(name, layer, positions):
    kept, total = kept_weights(layer)
    shape, kind = _shape(layer), type(layer).__name__
    if isinstance(layer, (SparseLinear, _SparseConvNd)):
        element = (layer if isinstance(layer, SparseLinear) else layer.gemm).values.element_size()
    else:
        element = layer.weight.element_size()
    # multiply-adds ×2 per example: once per output position for a convolution (None when
    # the positions are unknown); dense bytes vs CSR (values + column + row pointers)
    per_weight = 2 * positions.get(name, 0) if isinstance(layer, _CONVS) else 2
    return {
        "layer": name,
        "type": kind,
        "shape": shape,
        "kept": kept,
        "total": total,
        "sparsity": 1 - kept / total if total else 0.0,
        "compression": total / kept if kept else float("inf"),
        "flops_dense": per_weight * total if per_weight else None,
        "flops_sparse": per_weight * kept if per_weight else None,
        "bytes_dense": total * element,
        "bytes_sparse": kept * (element + _INDEX_BYTES) + (shape[0] + 1) * _INDEX_BYTES,
    }


def _sum(values):
    values = list(values)
    return None if None in values else sum(values)


def _si(value):
    if value is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


class Report:
    """Per-layer rows (``.rows``: a list of dicts, DataFrame-friendly) and a ``.total`` row;
    ``.units``: one row per :class:`SBPDropout` layer (units kept of its units), empty
    without them."""

    def __init__(self, rows, units=()):
        self.rows = rows
        self.units = list(units)
        kept, total = sum(r["kept"] for r in rows), sum(r["total"] for r in rows)
        self.total = {
            "layer": "total",
            "type": "",
            "shape": None,
            "kept": kept,
            "total": total,
            "sparsity": 1 - kept / total if total else 0.0,
            "compression": total / kept if kept else float("inf"),
            **{k: _sum(r[k] for r in rows) for k in ("flops_dense", "flops_sparse", "bytes_dense", "bytes_sparse")},
        }

    def to_dict(self):
        return {"layers": self.rows, "total": self.total, "units": self.units}

    def __str__(self):
        # the name column fits the longest name (a ResNet's "blocks.1.shortcut.0" ran into the type)
        w = max([16] + [len(r["layer"]) + 2 for r in self.rows + self.units])
        head = f"{'layer':<{w}}{'type':<15}{'shape':>12}{'kept':>10}{'total':>11}{'sparsity':>10}{'|W|/|W≠0|':>11}" \
               f"{'FLOPs dense→CSR':>20}{'bytes dense→CSR':>20}"
        lines = [head, "-" * len(head)]
        for r in self.rows + [self.total]:
            shape = "x".join(map(str, r["shape"])) if r["shape"] else ""
            flops = f"{_si(r['flops_dense'])}→{_si(r['flops_sparse'])}"
            size = f"{_si(r['bytes_dense'])}→{_si(r['bytes_sparse'])}"
            lines.append(
                f"{r['layer']:<{w}}{r['type']:<15}{shape:>12}{r['kept']:>10}{r['total']:>11}{r['sparsity']:>10.2%}"
                f"{r['compression']:>11.1f}{flops:>20}{size:>20}"
            )
        if self.units:
            lines += ["", f"{'SBP layer':<{w}}{'units kept':>12}{'total':>8}"]
            lines += [f"{u['layer']:<{w}}{u['kept']:>12}{u['total']:>8}" for u in self.units]
        return "\n".join(lines)

    __repr__ = __str__


def report(model, input_shape=None):
    """Compression of every linear and convolution layer of ``model`` (SparseVD layers,
    SparseLinear/SparseConv*d, nn.Linear/nn.Conv*d), and the units kept by each
    :class:`SBPDropout` layer (``.units``).

    kept/total weights, sparsity, |W|/|W≠0|, and per-example FLOPs and weight bytes as a
    dense layer against the sparse form (CSR with int32 indices). A convolution's FLOPs
    count its output positions, which depend on the input: pass ``input_shape``, one
    example's shape without the batch (``(1, 28, 28)``, say); without it they are None
    (and so is the total), the other columns are unaffected.
    """
    module("report", model)
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, (SparseVDModule, SparseLinear, nn.Linear, *_CONVS))]
    # a SparseConv*d runs its CSR weight as a SparseLinear: one row, not two
    inner = {id(m.gemm) for _, m in layers if isinstance(m, _SparseConvNd)}
    layers = [(name, m) for name, m in layers if id(m) not in inner]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no linear layers or convolutions to report on")
    has_conv = any(isinstance(m, _CONVS) for _, m in layers)
    positions = output_positions(model, input_shape, _CONVS) if has_conv and input_shape is not None else {}
    units = [{"layer": name, "kept": m.kept_units(), "total": m.total_units()} for name, m in sbp_modules(model)]
    return Report([_row(name, m, positions) for name, m in layers], units)
