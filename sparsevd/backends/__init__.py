"""Registers the kernels of the ``torch.ops.sparsevd`` operators, once, at import.

The reference math is every op's default kernel; the compiled extension adds CPU and CUDA
kernels, and Triton adds CUDA kernels for the ops without a C++ one. Which one runs is
then the dispatcher's choice alone, by the device of the tensors.

``SPARSEVD_BACKEND=reference`` (read at import) registers the reference only: every op
then runs the plain PyTorch math, on every device, for debugging and comparison.
"""

from __future__ import annotations

import importlib.util
import os

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
