"""report(model): the paper's per-layer compression table, printable and as data."""

from __future__ import annotations

from torch import nn

from .layers import SparseVDModule
from .sparse import SparseLinear

_INDEX_BYTES = 4  # int32 CSR indices


def _row(name, layer):
    if isinstance(layer, SparseVDModule):
        kept, total = layer.kept_weights(), layer.total_weights()
        out_features, in_features = layer.weight.shape
        element, kind = layer.weight.element_size(), type(layer).__name__
    elif isinstance(layer, SparseLinear):
        kept, total = layer.nnz, layer.in_features * layer.out_features
        out_features, in_features = layer.out_features, layer.in_features
        element, kind = layer.values.element_size(), "SparseLinear"
    else:  # nn.Linear
        kept, total = int((layer.weight != 0).sum()), layer.weight.numel()
        out_features, in_features = layer.weight.shape
        element, kind = layer.weight.element_size(), "Linear"
    return {
        "layer": name,
        "type": kind,
        "shape": (out_features, in_features),
        "kept": kept,
        "total": total,
        "sparsity": 1 - kept / total if total else 0.0,
        "compression": total / kept if kept else float("inf"),
        # multiply-adds ×2 per example; dense bytes vs CSR (values + column + row pointers)
        "flops_dense": 2 * total,
        "flops_sparse": 2 * kept,
        "bytes_dense": total * element,
        "bytes_sparse": kept * (element + _INDEX_BYTES) + (out_features + 1) * _INDEX_BYTES,
    }


def _si(value):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


class Report:
    """Per-layer rows (``.rows``: a list of dicts, DataFrame-friendly) and a ``.total`` row."""

    def __init__(self, rows):
        self.rows = rows
        kept, total = sum(r["kept"] for r in rows), sum(r["total"] for r in rows)
        self.total = {
            "layer": "total",
            "type": "",
            "shape": None,
            "kept": kept,
            "total": total,
            "sparsity": 1 - kept / total if total else 0.0,
            "compression": total / kept if kept else float("inf"),
            **{k: sum(r[k] for r in rows) for k in ("flops_dense", "flops_sparse", "bytes_dense", "bytes_sparse")},
        }

    def to_dict(self):
        return {"layers": self.rows, "total": self.total}

    def __str__(self):
        head = f"{'layer':<16}{'type':<15}{'shape':>12}{'kept':>10}{'total':>11}{'sparsity':>10}{'|W|/|W≠0|':>11}" \
               f"{'FLOPs dense→CSR':>20}{'bytes dense→CSR':>20}"
        lines = [head, "-" * len(head)]
        for r in self.rows + [self.total]:
            shape = "x".join(map(str, r["shape"])) if r["shape"] else ""
            flops = f"{_si(r['flops_dense'])}→{_si(r['flops_sparse'])}"
            size = f"{_si(r['bytes_dense'])}→{_si(r['bytes_sparse'])}"
            lines.append(
                f"{r['layer']:<16}{r['type']:<15}{shape:>12}{r['kept']:>10}{r['total']:>11}{r['sparsity']:>10.2%}"
                f"{r['compression']:>11.1f}{flops:>20}{size:>20}"
            )
        return "\n".join(lines)

    __repr__ = __str__


def report(model):
    """Compression of every linear layer of ``model`` (SparseVD layers, SparseLinear, nn.Linear).

    kept/total weights, sparsity, |W|/|W≠0|, and per-example FLOPs and weight bytes as a
    dense layer against the sparse form (CSR with int32 indices).
    """
    rows = [
        _row(name, m)
        for name, m in model.named_modules()
        if isinstance(m, (SparseVDModule, SparseLinear, nn.Linear))
    ]
    if not rows:
        raise ValueError(f"{type(model).__name__} has no linear layers to report on")
    return Report(rows)
