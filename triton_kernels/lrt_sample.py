"""The LRT's noise and sampling step, and the sampling step's backward.

    s = sqrt(v + 1e-8),   y = μ + s ⊙ z,   h = ∂L/∂v = g ⊙ z / (2s)

z[i] = ``tl.randn(seed, i)`` (Philox) at the flat index i of the contiguous [M, N] output
(i = m·N + n): a pure function of (seed, i), never stored; the backward regenerates it
and :func:`lrt_noise` returns it. Every LRT route (cuBLAS or fused GEMMs) and
``lrt_sample`` for convolutions draw from this one stream.

Cost: Box-Muller on one Philox-4x32-10 draw per element (10 rounds of two 32-bit
multiply-highs, of which a normal uses half the output) is ~150 integer and special-function
instructions per element, so these kernels are bound by arithmetic, not bandwidth:
measured on H100 (Triton 3.6), 16.8 M normals took 0.084 ms where writing them takes 0.022.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_pair, flat_offsets, is_wide, launch_flat, normalize_seed, row_stride, rows


@triton.jit
def randn(seed, offs, WIDE: tl.constexpr):
    """Standard normals for integer offsets: Philox (``tl.randn``) at counter ``offs``.

    Narrow (int32 offsets < 2^31): ``tl.randn(seed, offs)``. Wide (int64 offsets): the low
    32 bits are the Philox counter and the high word, times an odd 64-bit constant (PCG's
    multiplier), is added to the 64-bit seed (the Philox key), so
    offsets < 2^32 give exactly the narrow numbers and larger ones get independent streams.
    Only 32-bit counters are passed to ``tl.randn``: its 64-bit-offset handling differs
    between Triton versions, this keeps the numbers identical across them.
    """
    if WIDE:
        lo = offs.to(tl.uint32)
        hi = offs >> 32
        return tl.randn(seed + hi * 6364136223846793005, lo)
    else:
        return tl.randn(seed, offs)


@triton.jit(do_not_specialize=["seed"])
def _noise_kernel(z_ptr, start, numel, seed, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    local = flat_offsets(WIDE, BLOCK)
    mask = local < numel
    z = randn(seed, start + local, WIDE)
    tl.store(z_ptr + local, z, mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _sample_kernel(mu_ptr, v_ptr, y_ptr, s_ptr, numel, seed, FROM_VAR: tl.constexpr, WIDE: tl.constexpr,
                   BLOCK: tl.constexpr):
    # y = μ + s ⊙ z over contiguous tensors whose flat index is the noise offset; s is
    # sqrt(v + eps) (FROM_VAR, then stored to s_ptr) or read from s_ptr (v_ptr unused).
    # Outputs may alias inputs (y_ptr = mu_ptr, s_ptr = v_ptr): each element is read
    # before it is written, by the same thread.
    offs = flat_offsets(WIDE, BLOCK)
    mask = offs < numel
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FROM_VAR:
        std = tl.sqrt(tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32) + 1e-8)
        tl.store(s_ptr + offs, std.to(s_ptr.dtype.element_ty), mask=mask)
    else:
        std = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = mu + std * randn(seed, offs, WIDE)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _half_noise_over_std_kernel(g_ptr, s_ptr, h_ptr, numel, seed, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    # h = g ⊙ z / (2s) over contiguous tensors, z regenerated at the flat index
    offs = flat_offsets(WIDE, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    std = tl.load(s_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    h = g * randn(seed, offs, WIDE) * 0.5 / std
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _rows_h_kernel(
    g_ptr, s_ptr, h_ptr, dbp_ptr,
    M, N, seed,
    stride_gm, stride_sm, stride_hm,
    WIDE: tl.constexpr, COMPUTE_H: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # h = g ⊙ z / (2s) for the LRT linear layer's [M, N] gradient (any row strides), and
    # per-row-block column sums of g for ∂b: the sweep reads g anyway
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    rows = offs_m.to(tl.int64)[:, None]
    g = tl.load(g_ptr + rows * stride_gm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if COMPUTE_H:
        s = tl.load(s_ptr + rows * stride_sm + offs_n[None, :], mask=mask, other=1.0).to(tl.float32)
        if WIDE:
            noise_offs = rows * N + offs_n[None, :]
        else:
            noise_offs = offs_m[:, None] * N + offs_n[None, :]
        h = g * randn(seed, noise_offs, WIDE) * 0.5 / s
        tl.store(h_ptr + rows * stride_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_DB:
        # partial column sums of this row block, added by the host in a fixed order
        # (deterministic, no atomics)
        tl.store(dbp_ptr + pid_m * N + offs_n, tl.sum(g, axis=0), mask=offs_n < N)


def noise_flat(start, numel, seed, device, wide=None):
    """z at the flat noise offsets start, …, start + numel − 1, as float32 [numel]."""
    z = torch.empty(numel, dtype=torch.float32, device=device)
    if wide is None:
        wide = is_wide(start + numel)
    launch_flat(_noise_kernel, numel, z, start, numel, normalize_seed(seed), WIDE=wide)
    return z


def lrt_noise(M, N, seed, device):
    """The noise z [M, N] (float32) that ``lrt_forward(..., seed)`` adds: z[m, n] is the
    Philox normal at offset m·N + n."""
    M, N = int(M), int(N)
    return noise_flat(0, M * N, seed, torch.device(device)).view(M, N)


def sample(mean, var, seed, y=None, std=None, wide=None):
    """Over contiguous [M, N] tensors: std = sqrt(var + 1e-8) and y = mean + std ⊙ z, into
    new tensors or into the ``y`` and ``std`` given (which may be ``mean`` and ``var``
    themselves: the cuBLAS route samples in place). Returns (y, std)."""
    y = torch.empty_like(mean) if y is None else y
    std = torch.empty_like(mean) if std is None else std
    numel = mean.numel()
    wide = is_wide(numel) if wide is None else wide
    launch_flat(_sample_kernel, numel, mean, var, y, std, numel, normalize_seed(seed), FROM_VAR=True, WIDE=wide)
    return y, std


def add_noise_(y, std, seed, wide=None):
    """In place, over contiguous [M, N] tensors: y ← y + std ⊙ z."""
    numel = y.numel()
    wide = is_wide(numel) if wide is None else wide
    launch_flat(_sample_kernel, numel, y, y, y, std, numel, normalize_seed(seed), FROM_VAR=False, WIDE=wide)
    return y


def lrt_sample(mean, var, seed):
    """(y, s) with s = sqrt(var + 1e-8) and y = mean + s ⊙ z, z the Philox normals at the
    flat indices of the (contiguous) output: for an [M, N] output exactly the noise
    ``lrt_forward`` adds. Both outputs contiguous, in mean's dtype."""
    check_pair(mean, var, ("mean", "var"))
    return sample(mean.contiguous(), var.contiguous(), seed)


def lrt_sample_backward(grad, std, seed):
    """h = grad ⊙ z / (2 std) with the z of ``lrt_sample(..., seed)``: ∂L/∂var."""
    check_pair(grad, std, ("grad", "std"))
    grad, std = grad.contiguous(), std.contiguous()
    h = torch.empty_like(grad)
    numel = grad.numel()
    launch_flat(_half_noise_over_std_kernel, numel, grad, std, h, numel, normalize_seed(seed), WIDE=is_wide(numel))
    return h


def half_noise_over_std(grad, std, seed, need_h, need_db, wide=None):
    """For the LRT linear layer's backward, from grad and std [M, N] (any row strides):
    h = grad ⊙ z / (2 std) in grad's dtype (None unless ``need_h``) and ∂b = Σ_rows grad
    (None unless ``need_db``), in one sweep."""
    M, N = grad.shape
    grad, std = rows(grad), rows(std)
    wide = is_wide(M * N) if wide is None else wide
    # 8 elements per thread, as in the flat kernels: Philox is arithmetic-bound, so occupancy
    # hides its latency. ptxas (sm_90a): 51 registers at 64x64 with 16 warps (32 warps per
    # multiprocessor), 128 at 64x128 with 8 (16 warps). 64 rows per block keep ∂b's partial
    # sums at 1/64 of g.
    bm, bn, warps = 64, 64, 16
    grid_m = triton.cdiv(M, bm)
    h = torch.empty((M, N), dtype=grad.dtype, device=grad.device) if need_h else None
    dbp = torch.empty((grid_m, N), dtype=torch.float32, device=grad.device) if need_db else None
    if M and N and (need_h or need_db):
        _rows_h_kernel[(grid_m, triton.cdiv(N, bn))](
            grad, std, grad if h is None else h, grad if dbp is None else dbp, M, N, normalize_seed(seed),
            row_stride(grad), row_stride(std), N,
            WIDE=wide, COMPUTE_H=need_h, COMPUTE_DB=need_db, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
        )  # fmt: skip
    db = dbp.sum(0).to(grad.dtype) if need_db else None
    return h, db
