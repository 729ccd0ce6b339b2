"""What the Triton launchers share: input checks, stride handling, seeds, flat launches."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_MAX = 2**31 - 1
#: Elements per program of the flat elementwise kernels (4 warps: 8 per thread).
FLAT_BLOCK = 1024


def check_device(t, what):
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"Triton {what} kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


def check_pair(a, b, names):
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} differ in shape")
    if a.dtype != b.dtype or a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{names[0]} and {names[1]} must share one of float32/float16/bfloat16, got {a.dtype}, {b.dtype}"
        )
    if a.device != b.device:
        raise ValueError(f"{names[0]} and {names[1]} must be on one device")
    check_device(a, "LRT")


def normalize_seed(seed):
    """Seeds are taken modulo 2^63 (Triton passes them as int64)."""
    return int(seed) % (1 << 63)


def is_wide(numel):
    """Whether flat offsets below ``numel`` need 64 bits."""
    return numel - 1 > INT32_MAX


def rows(t):
    """A 2-D view whose last dimension is contiguous (the GEMM kernels take one row stride)."""
    if t.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(t.shape)}")
    if t.size(1) > 1 and t.stride(1) != 1:
        t = t.contiguous()
    return t


def row_stride(t):
    # a [R, 1] or [1, C] tensor may carry any stride on its size-1 dims
    return t.stride(0) if t.size(0) > 1 else t.size(1)


def precision(dtype):
    """tl.dot's input precision: fp32 operands follow torch's TF32 switch, as F.linear does;
    16-bit operands always use their own tensor-core MMA (the argument does not apply)."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def flat_offsets(WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """This program's BLOCK flat indices of a 1-D launch (int64 when WIDE)."""
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    return pid * BLOCK + tl.arange(0, BLOCK)


def launch_flat(kernel, numel, *args, **meta):
    """One program per FLAT_BLOCK elements; nothing to launch for empty tensors."""
    if numel:
        kernel[(triton.cdiv(numel, FLAT_BLOCK),)](*args, BLOCK=FLAT_BLOCK, num_warps=4, **meta)
