"""The elementwise work around the LRT's GEMMs, each as one launch over two tensors.

Before the GEMMs (forward, and again in backward, both routes): the operands x ⊙ x and
exp(log σ²), in the input dtype (what the GEMMs read; torch's reference rounds them the same
way). After the backward GEMMs (cuBLAS route): C ← 2x ⊙ C with C = h·exp(log σ²), which the
∂x GEMM then adds (∂x = gθ + C, cuBLAS's β = 1), and P ← P ⊙ exp(log σ²) with P = hᵀ(x⊙x),
which is ∂log σ².

A launch covers an [M, K] and an [N, K] tensor: the first programs take the first tensor's
blocks, the rest the second's (one launch instead of two; with one of them empty, a single
tensor). All tensors contiguous; math in fp32, one rounding per output.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import FLAT_BLOCK, is_wide


@triton.jit
def exp_accurate(x):
    """exp(x) within ~2^-22 relative for any x: tl.exp's ex2(x·log2 e) loses |x|·2^-24 in
    the product's rounding (6e-7 at x = −10, ten times torch's expf). Here
    2^n · 2^(r·log2 e) with n = round(x·log2 e) and r = x − n·ln 2 by a two-constant
    (Cody–Waite) split, so the approximate 2^t only sees |t| ≤ 1/2."""
    n = tl.floor(x * 1.4426950408889634 + 0.5)
    r = x - n * 0.693145751953125
    r = r - n * 1.4286068203094173e-06
    return tl.exp2(r * 1.4426950408889634) * tl.exp2(n)


@triton.jit
def _region_offsets(pid, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    if WIDE:
        pid = pid.to(tl.int64)
    return pid * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _operands_kernel(x_ptr, x2_ptr, n_x, ls_ptr, ev_ptr, n_ls, x_programs, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    # x2 = x ⊙ x over the first x_programs programs, ev = exp(log σ²) over the rest
    pid = tl.program_id(0)
    if pid < x_programs:
        offs = _region_offsets(pid, WIDE, BLOCK)
        mask = offs < n_x
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(x2_ptr + offs, (x * x).to(x2_ptr.dtype.element_ty), mask=mask)
    else:
        offs = _region_offsets(pid - x_programs, WIDE, BLOCK)
        mask = offs < n_ls
        ls = tl.load(ls_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ev_ptr + offs, exp_accurate(ls).to(ev_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_epilogue_kernel(c_ptr, x_ptr, n_x, p_ptr, ev_ptr, n_p, x_programs, WIDE: tl.constexpr,
                              BLOCK: tl.constexpr):
    # in place: C ← 2x ⊙ C over the first x_programs programs, P ← P ⊙ ev over the rest
    pid = tl.program_id(0)
    if pid < x_programs:
        offs = _region_offsets(pid, WIDE, BLOCK)
        mask = offs < n_x
        c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(c_ptr + offs, (2.0 * x * c).to(c_ptr.dtype.element_ty), mask=mask)
    else:
        offs = _region_offsets(pid - x_programs, WIDE, BLOCK)
        mask = offs < n_p
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ev = tl.load(ev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(p_ptr + offs, (p * ev).to(p_ptr.dtype.element_ty), mask=mask)


def _launch_two(kernel, a, a_args, b, b_args):
    """``kernel`` over the contiguous tensors ``a`` (first programs) and ``b`` (the rest);
    either may be None (empty)."""
    n_a = 0 if a is None else a.numel()
    n_b = 0 if b is None else b.numel()
    a_programs = triton.cdiv(n_a, FLAT_BLOCK)
    programs = a_programs + triton.cdiv(n_b, FLAT_BLOCK)
    if programs == 0:
        return
    any_tensor = a if a is not None else b
    a_args = a_args if a is not None else (any_tensor,) * 2
    b_args = b_args if b is not None else (any_tensor,) * 2
    kernel[(programs,)](*a_args, n_a, *b_args, n_b, a_programs, WIDE=is_wide(max(n_a, n_b)), BLOCK=FLAT_BLOCK,
                        num_warps=4)


def operands(x, log_sigma2, need_squares=True, need_variances=True):
    """(x ⊙ x, exp(log σ²)) in the inputs' dtypes, contiguous, one launch; an entry not
    needed comes back as None. x and log_sigma2 must be contiguous."""
    x2 = x.new_empty(x.shape) if need_squares else None
    ev = log_sigma2.new_empty(log_sigma2.shape) if need_variances else None
    _launch_two(_operands_kernel, x2, (x, x2), ev, (log_sigma2, ev))
    return x2, ev


def backward_epilogue_(c, x, p, ev):
    """In place: c ← 2x ⊙ c (c, x: [M, K]) and p ← p ⊙ ev (p, ev: [N, K]), one launch;
    pass None for a pair not needed. All contiguous."""
    _launch_two(_backward_epilogue_kernel, c, (c, x), p, (p, ev))
