"""Fused dual-GEMM Triton kernels of the LRT linear layer: each kernel runs the layer's two
products that share an operand in one loop, into two fp32 accumulators.

    forward   μ = x·θᵀ + b and v = x²·exp(log σ²)ᵀ  →  writes μ and s = sqrt(v + 1e-8)
    ∂θ, ∂log σ²   gᵀ·x and hᵀ·x², the second times exp(log σ²) in the epilogue
    ∂x            g·θ and h·exp(log σ²), epilogue g·θ + 2x ⊙ (h·exp(log σ²))

x² and exp(log σ²) come precomputed (:mod:`.lrt_elementwise`), the noise is added by a
separate pass (:mod:`.lrt_sample`): docs/gpu.md has the measurements that ruled out
forming the operands inside the K loop and drawing the noise in the GEMM epilogue.

One program per output tile (1-D grid, grouped ordering for L2 reuse). Accumulation is
fp32; 16-bit inputs go into ``tl.dot`` as 16-bit, fp32 inputs use TF32 when
``torch.backends.cuda.matmul.allow_tf32`` is set and exact fp32 otherwise. Outputs are in
the inputs' dtype.

This is the LRT's route for small, launch-bound problems (one launch where cuBLAS takes
two, plus their elementwise epilogues); at 4096³ bf16 on an H100 the forward kernel took
0.507 ms where two cuBLAS GEMMs take 0.354 ms, so large problems take the cuBLAS route
(``triton_kernels.lrt``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, row_stride


# (output-row block, output-column block, reduction block, warps, stages). Measured on H100 /
# Triton 3.6, 4096³ bf16, forward dual GEMM: 128x128x64 with 8 warps and 3 stages ran in
# 0.51 ms (542 TFLOP/s), 128x64 and 64x128 tiles in 0.66-0.71 ms, 2 stages in 0.77 ms. Two
# fp32 accumulators per tile: 128x128 needs 8 warps (128 registers per thread for them);
# larger tiles spill. fp32 operands take twice the shared memory: BLOCK 32 along the
# reduction keeps 3 stages in it (3 · 2 · 32 · 256 · 4 B = 192 KiB).
# No autotuning: this route serves the small problems (the cuBLAS route takes the large
# ones), where compiling and timing configs per new shape would cost more than it saves.
_LARGE_16BIT = (128, 128, 64, 8, 3)
_LARGE_FP32 = (128, 128, 32, 8, 3)
_SMALL = (64, 64, 32, 4, 3)
_INTERPRET_TILE = (32, 32, 32, 4, 1)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tile(rows, cols, dtype, device):
    """The tile for an output of rows × cols: the large one when its tiles fill every
    multiprocessor at least once, else the small one (4× as many tiles)."""
    if INTERPRET:
        return _INTERPRET_TILE
    large = _LARGE_FP32 if dtype == torch.float32 else _LARGE_16BIT
    if triton.cdiv(rows, large[0]) * triton.cdiv(cols, large[1]) < _multiprocessors(device):
        return _SMALL
    return large


def _launch(kernel, rows, cols, names, args, dtype, device, **meta):
    br, bc, bk, warps, stages = _tile(rows, cols, dtype, device)
    grid = (triton.cdiv(rows, br) * triton.cdiv(cols, bc),)
    blocks = dict(zip(names, (br, bc, bk)))
    kernel[grid](*args, **meta, **blocks, GROUP=8, num_warps=warps, num_stages=stages)


def _even(dim, block):
    return lambda args: args[dim] % args[block] == 0


@triton.jit
def _grouped_tile(pid, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    # grouped ordering: GROUP row-blocks of the output share the column panels in L2
    num_pid_r = tl.cdiv(rows, BLOCK_R)
    num_pid_c = tl.cdiv(cols, BLOCK_C)
    num_pid_in_group = GROUP * num_pid_c
    group_id = pid // num_pid_in_group
    first_pid_r = group_id * GROUP
    group_size_r = min(num_pid_r - first_pid_r, GROUP)
    pid_r = first_pid_r + ((pid % num_pid_in_group) % group_size_r)
    pid_c = (pid % num_pid_in_group) // group_size_r
    return pid_r, pid_c


@triton.jit
def _load_tail(ptrs, offs, left, AXIS: tl.constexpr, EVEN: tl.constexpr):
    # a tile whose reduction index ``offs`` runs along AXIS: zeros past the end (``left``)
    if EVEN:
        tile = tl.load(ptrs)
    elif AXIS == 0:
        tile = tl.load(ptrs, mask=offs[:, None] < left, other=0.0)
    else:
        tile = tl.load(ptrs, mask=offs[None, :] < left, other=0.0)
    return tile


@triton.jit
def _dual_dot(
    a1_ptrs, b1_ptrs, a2_ptrs, b2_ptrs, a1_step, b1_step, a2_step, b2_step, reduction, offs,
    ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK: tl.constexpr,
    FIRST: tl.constexpr, SECOND: tl.constexpr, EVEN: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # (Σ a1·b1, Σ a2·b2) in fp32 over the reduction, one loop: a tiles [ROWS, BLOCK], b tiles
    # [BLOCK, COLS], each pointer advanced by its step per BLOCK; FIRST / SECOND say which
    # products to form (the other accumulator stays zero)
    acc1 = tl.zeros((ROWS, COLS), dtype=tl.float32)
    acc2 = tl.zeros((ROWS, COLS), dtype=tl.float32)
    for i in range(0, tl.cdiv(reduction, BLOCK)):
        left = reduction - i * BLOCK
        if FIRST:
            a1 = _load_tail(a1_ptrs, offs, left, 1, EVEN)
            b1 = _load_tail(b1_ptrs, offs, left, 0, EVEN)
            acc1 = tl.dot(a1, b1, acc1, input_precision=PRECISION)
        if SECOND:
            a2 = _load_tail(a2_ptrs, offs, left, 1, EVEN)
            b2 = _load_tail(b2_ptrs, offs, left, 0, EVEN)
            acc2 = tl.dot(a2, b2, acc2, input_precision=PRECISION)
        a1_ptrs += a1_step
        b1_ptrs += b1_step
        a2_ptrs += a2_step
        b2_ptrs += b2_step
    return acc1, acc2


@triton.heuristics({"EVEN_K": _even("K", "BLOCK_K")})
@triton.jit
def _lrt_fwd_kernel(
    x_ptr, x2_ptr, w_ptr, ev_ptr, b_ptr, mu_ptr, s_ptr,
    M, N, K,
    stride_xm, stride_x2m, stride_wn, stride_evn, stride_mum, stride_sm,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    # μ = x·θᵀ + b and s = sqrt(x²·exp(log σ²)ᵀ + 1e-8) for one [BLOCK_M, BLOCK_N] tile
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows past the edge wrap around (valid addresses, results never stored): no M/N masks
    # in the hot loop, only the K tail is masked
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    x2_ptrs = x2_ptr + rm[:, None] * stride_x2m + offs_k[None, :]
    w_ptrs = w_ptr + rn[None, :] * stride_wn + offs_k[:, None]  # [BK, BN] = θᵀ tile
    ev_ptrs = ev_ptr + rn[None, :] * stride_evn + offs_k[:, None]

    acc_mu, acc_v = _dual_dot(x_ptrs, w_ptrs, x2_ptrs, ev_ptrs, BLOCK_K, BLOCK_K, BLOCK_K, BLOCK_K, K, offs_k,
                              BLOCK_M, BLOCK_N, BLOCK_K, True, True, EVEN_K, PRECISION)
    if HAS_BIAS:
        acc_mu += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    std = tl.sqrt(acc_v + 1e-8)
    out_m = offs_m.to(tl.int64)[:, None]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(mu_ptr + out_m * stride_mum + offs_n[None, :], acc_mu.to(mu_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + out_m * stride_sm + offs_n[None, :], std.to(s_ptr.dtype.element_ty), mask=mask)


@triton.heuristics({"EVEN_M": _even("M", "BLOCK_M")})
@triton.jit
def _lrt_dw_kernel(
    g_ptr, h_ptr, x_ptr, x2_ptr, ev_ptr, dw_ptr, dls_ptr,
    M, N, K,
    stride_gm, stride_hm, stride_xm, stride_x2m, stride_evn, stride_dwn, stride_dlsn,
    COMPUTE_DW: tl.constexpr, COMPUTE_DLS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr, EVEN_M: tl.constexpr,
):  # fmt: skip
    # ∂θ = gᵀx and ∂log σ² = (hᵀ x²) ⊙ exp(log σ²) for one [BLOCK_N, BLOCK_K] tile
    pid_n, pid_k = _grouped_tile(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    rn = offs_n % N
    rk = offs_k % K
    gT_ptrs = g_ptr + offs_m[None, :] * stride_gm + rn[:, None]  # [BN, BM] = gᵀ tile
    hT_ptrs = h_ptr + offs_m[None, :] * stride_hm + rn[:, None]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + rk[None, :]  # [BM, BK]
    x2_ptrs = x2_ptr + offs_m[:, None] * stride_x2m + rk[None, :]

    acc_w, acc_l = _dual_dot(gT_ptrs, x_ptrs, hT_ptrs, x2_ptrs, BLOCK_M * stride_gm, BLOCK_M * stride_xm,
                             BLOCK_M * stride_hm, BLOCK_M * stride_x2m, M, offs_m,
                             BLOCK_N, BLOCK_K, BLOCK_M, COMPUTE_DW, COMPUTE_DLS, EVEN_M, PRECISION)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    out_n = offs_n.to(tl.int64)[:, None]
    if COMPUTE_DW:
        tl.store(dw_ptr + out_n * stride_dwn + offs_k[None, :], acc_w.to(dw_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_DLS:
        ev = tl.load(ev_ptr + rn.to(tl.int64)[:, None] * stride_evn + rk[None, :]).to(tl.float32)
        tl.store(dls_ptr + out_n * stride_dlsn + offs_k[None, :], (acc_l * ev).to(dls_ptr.dtype.element_ty), mask=mask)


@triton.heuristics({"EVEN_N": _even("N", "BLOCK_N")})
@triton.jit
def _lrt_dx_kernel(
    g_ptr, h_ptr, w_ptr, ev_ptr, x_ptr, dx_ptr,
    M, N, K,
    stride_gm, stride_hm, stride_wn, stride_evn, stride_xm, stride_dxm,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    # ∂x = g·θ + 2x ⊙ (h·exp(log σ²)) for one [BLOCK_M, BLOCK_K] tile
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    rm = (offs_m % M).to(tl.int64)
    rk = offs_k % K
    g_ptrs = g_ptr + rm[:, None] * stride_gm + offs_n[None, :]  # [BM, BN]
    h_ptrs = h_ptr + rm[:, None] * stride_hm + offs_n[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + rk[None, :]  # [BN, BK]
    ev_ptrs = ev_ptr + offs_n[:, None] * stride_evn + rk[None, :]

    acc_g, acc_h = _dual_dot(g_ptrs, w_ptrs, h_ptrs, ev_ptrs, BLOCK_N, BLOCK_N * stride_wn, BLOCK_N,
                             BLOCK_N * stride_evn, N, offs_n, BLOCK_M, BLOCK_K, BLOCK_N, True, True, EVEN_N, PRECISION)
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :]).to(tl.float32)
    dx = acc_g + 2.0 * x * acc_h
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    out_m = offs_m.to(tl.int64)[:, None]
    tl.store(dx_ptr + out_m * stride_dxm + offs_k[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


def forward(x, x2, weight, ev, bias, precision):
    """(μ, s) [M, N] by the dual-GEMM kernel; x, x2, weight, ev with unit column stride."""
    M, K = x.shape
    N = weight.shape[0]
    mu = torch.empty((M, N), dtype=x.dtype, device=x.device)
    std = torch.empty((M, N), dtype=x.dtype, device=x.device)

    args = (x, x2, weight, ev, x if bias is None else bias, mu, std, M, N, K,
            row_stride(x), row_stride(x2), row_stride(weight), row_stride(ev), N, N)
    _launch(_lrt_fwd_kernel, M, N, ("BLOCK_M", "BLOCK_N", "BLOCK_K"), args, x.dtype, x.device,
            HAS_BIAS=bias is not None, PRECISION=precision)
    return mu, std


def weight_grads(g, h, x, x2, ev, need_dw, need_dls, precision):
    """(gᵀx, (hᵀx²) ⊙ ev) [N, K] by one dual-GEMM kernel; None for those not needed."""
    M, K = x.shape
    N = g.shape[1]
    dw = torch.empty((N, K), dtype=x.dtype, device=x.device) if need_dw else None
    dls = torch.empty((N, K), dtype=x.dtype, device=x.device) if need_dls else None
    # a pair not needed is never read: any valid pointer of the right dtype stands in
    h, x2, ev = (h, x2, ev) if need_dls else (g, x, x)
    first = dw if need_dw else dls

    args = (g, h, x, x2, ev, first, dls if need_dls else first, M, N, K,
            row_stride(g), row_stride(h), row_stride(x), row_stride(x2), row_stride(ev), K, K)
    _launch(_lrt_dw_kernel, N, K, ("BLOCK_N", "BLOCK_K", "BLOCK_M"), args, x.dtype, x.device,
            COMPUTE_DW=need_dw, COMPUTE_DLS=need_dls, PRECISION=precision)
    return dw, dls


def input_grad(g, h, weight, ev, x, precision):
    """g·θ + 2x ⊙ (h·ev) [M, K] by one dual-GEMM kernel."""
    M, K = x.shape
    N = weight.shape[0]
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device)

    args = (g, h, weight, ev, x, dx, M, N, K,
            row_stride(g), row_stride(h), row_stride(weight), row_stride(ev), row_stride(x), K)
    _launch(_lrt_dx_kernel, M, K, ("BLOCK_M", "BLOCK_K", "BLOCK_N"), args, x.dtype, x.device, PRECISION=precision)
    return dx
