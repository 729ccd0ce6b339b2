"""Registers the kernels of the ``torch.ops.sparsevd`` operators, once, at import.

The reference math is every op's default kernel; the compiled extension adds CPU and CUDA
kernels, and Triton adds CUDA kernels for the ops without a C++ one. Which one runs is
then the dispatcher's choice alone, by the device of the tensors.

``SPARSEVD_BACKEND=reference`` (read at import) registers the reference only: every op
then runs the plain PyTorch math, on every device, for debugging and comparison.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from .. import _ops  # noqa: F401  (the schemas, before any kernel registers for them)
from . import default, extension

BACKEND = os.environ.get("SPARSEVD_BACKEND", "auto")
if BACKEND not in ("auto", "reference"):
    raise ImportError(f"SPARSEVD_BACKEND must be 'auto' or 'reference', got {BACKEND!r}")

default.register()
HAS_EXTENSION = BACKEND == "auto" and extension.load()
HAS_TRITON = BACKEND == "auto" and importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from . import triton

    triton.register()


def bind_linear_chain(weights, crow_indices, col_indices, biases, activations, activation_params, in_features,
                      flatten, name):
    """``x -> torch.ops.sparsevd.linear_chain(x, weights, ...)`` with the lists bound once,
    for an input [*, in_features] (output [*, N]) or, with ``flatten``, [M, ...] read as
    [M, in_features] (a leading ``Flatten(1, -1)``); ``name`` (the first layer's) goes into
    the error for an input of another size. The extension's ``BoundChain`` skips the
    per-call conversion of the lists (the op's cost at batch 1); without the extension, the
    op itself with the lists bound."""
    args = (list(weights), list(crow_indices), list(col_indices), list(biases), list(activations),
            [float(p) for p in activation_params])
    if HAS_EXTENSION:
        return importlib.import_module("sparsevd._C").BoundChain(*args, int(in_features), bool(flatten), str(name))
    return _BoundChain(args, in_features, flatten, name)


class _BoundChain:
    """BoundChain of the extension, in Python (for the reference backend)."""

    def __init__(self, args, in_features, flatten, name):
        self.call = functools.partial(call_linear_chain, args, in_features, flatten, name)
        self.indices = [(t, t._version) for t in args[1] + args[2] if t is not None]

    def __call__(self, x):
        return self.call(x)

    def stale(self):
        return any(t._version != version for t, version in self.indices)


def call_linear_chain(args, in_features, flatten, name, x):
    """What a bound chain does, unbound: the op on ``x`` reshaped as bind_linear_chain says."""
    if flatten:
        if x.dim() < 2:
            raise ValueError(f"Flatten(1, -1) before {name} needs an input with a batch dimension, got shape "
                             f"{list(x.shape)}")
        flat = x.reshape(x.shape[0], -1)
    else:
        flat = x.reshape(-1, x.shape[-1]) if x.dim() else x
    if flat.dim() != 2 or flat.shape[1] != in_features:
        raise ValueError(f"{name}: expected input of shape [*, {in_features}], got shape {list(flat.shape)}")
    y = torch.ops.sparsevd.linear_chain.default(flat, *args)
    return y if flatten or x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
