"""What runs where: a summary of the kernels the dispatcher has for each op, for logs and
bug reports. (The kernels themselves are registered by :mod:`sparsevd.backends`; torch's
dispatcher alone chooses among them.)"""

from __future__ import annotations

import torch

from . import _ops, backends
from .backends import extension, triton

HAS_EXTENSION = backends.HAS_EXTENSION
EXTENSION_ERROR = extension.ERROR


def _kernel(op, key):
    overload = getattr(torch.ops.sparsevd, op).default
    if key == "CUDA" and backends.HAS_TRITON and op in triton.KERNELS:
        return "triton"
    return "C++" if overload.has_kernel_for_dispatch_key(key) else "reference"


def describe():
    """A short human-readable summary of what runs where."""
    if backends.BACKEND == "reference":
        head = "backend reference (SPARSEVD_BACKEND=reference): the reference math on every device"
    elif HAS_EXTENSION:
        head = f"extension sparsevd._C loaded ({'CPU and CUDA' if extension.WITH_CUDA else 'CPU'} kernels)"
    else:
        head = f"extension not loaded: {EXTENSION_ERROR}"
    lines = [head + f"; Triton {'registered for CUDA' if backends.HAS_TRITON else 'not available'}"]
    for op in _ops.SCHEMAS:
        lines.append(f"  {op}: CPU -> {_kernel(op, 'CPU')}, CUDA -> {_kernel(op, 'CUDA')}")
    return "\n".join(lines)
