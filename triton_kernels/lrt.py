"""Fused Triton kernels for the local-reparameterization (LRT) linear layer.

Math (``sparsevd.reference.lrt_linear`` is the spec), x: [M, K], θ, log σ²: [N, K]:

    μ = x θᵀ + b,   v = (x ⊙ x) exp(log σ²)ᵀ,   s = sqrt(v + 1e-8),   y = μ + s ⊙ z

with z[m, n] = ``tl.randn(seed, m·N + n)`` (Philox), a pure function of (seed, m, n):
never stored, the backward regenerates it; :func:`lrt_noise` returns it.

Kernels (launch order)
----------------------
forward   x⊙x and exp(log σ²) in the input dtype (two elementwise passes; see ON_THE_FLY).
          ``_lrt_fwd_kernel``: one program per [BLOCK_M, BLOCK_N] tile of y (1-D grid,
          grouped ordering for L2 reuse), one K loop feeding two tensor-core dots
          (x·θᵀ and x²·exp(log σ²)ᵀ) into two fp32 accumulators; epilogue: + bias (mean
          only), s = sqrt(v + 1e-8), writes μ and s. ``_sample_kernel``: y = μ + s⊙z
          in place (see FUSE_NOISE: the noise can also be drawn in the GEMM epilogue).
backward  ``_lrt_h_kernel`` (2-D grid over [M, N]): h = g⊙z/(2s) with z regenerated, and
          per-row-block partial column sums of g, summed on the host in a fixed order
          for ∂b (no atomics). ``_lrt_dw_kernel``: one program per [BLOCK_N, BLOCK_K]
          tile of ∂θ and ∂log σ², loop over M: gᵀ·x and hᵀ·x² share the loop and the
          g/h column panels; epilogue multiplies the second by exp(log σ²).
          ``_lrt_dx_kernel``: one program per [BLOCK_M, BLOCK_K] tile of ∂x, loop over
          N: g·θ and h·exp(log σ²); epilogue g·θ + 2x⊙(h·exp(log σ²)).

All accumulation is fp32; 16-bit inputs go into ``tl.dot`` as 16-bit, fp32 inputs use
TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set and exact fp32 otherwise.
Outputs are in the inputs' dtype.

Measured on one H100 (torch 2.11, Triton 3.6), 4096³ bf16, while this was written:
cuBLAS 0.18 ms per GEMM; dense nn.Linear forward+backward 0.60 ms; eager reference
forward+backward 1.6-2.2 ms; torch.compile of it 1.4-1.6 ms. Dual-GEMM kernels: forward
0.51 ms (542 TFLOP/s, without the noise), ∂θ/∂log σ² and ∂x ~0.47-0.49 ms each (with h);
Philox for 16.8 M normals ~0.08 ms; x⊙x + exp(log σ²) 0.054 ms. These kernels therefore
do NOT yet reach the targets (≤ 2.3× dense): see the notes at ON_THE_FLY / FUSE_NOISE.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

EPS = 1e-8
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1


#: Where x⊙x and exp(log σ²) are formed. True: per tile inside the GEMM loops, from the
#: x / log σ² tiles already loaded (no temporaries; what the design proposed). False: by
#: two elementwise passes before the GEMM kernels, which then only load their operands
#: (temporaries of x's and log σ²'s size, freed on return). Measured on H100 / Triton 3.6,
#: 4096³ bf16, forward GEMM kernel without noise, 128x128x64 tiles: on the fly 0.67 ms,
#: precomputed 0.51 ms + 0.054 ms for the two passes. (Likely cause, not verified in SASS:
#: a computed operand must go registers → shared memory every K step, outside the async
#: copy pipeline.) The backward kernels were only measured precomputed (the first
#: measurement of both paths had the noise epilogue mixed in).
ON_THE_FLY = False

#: Whether the forward GEMM kernel draws the noise in its epilogue (True) or writes μ and s
#: and a separate elementwise kernel adds s⊙z (False). Measured on H100 / Triton 3.6,
#: 4096³ bf16, 128x128x64 tiles: the GEMM kernel took 0.51 ms without the noise epilogue
#: and 1.13 ms with it (Philox on 64 elements per thread while both fp32 accumulator tiles
#: are live spills registers); the separate pass costs one read of μ and s and one write of
#: y, at full occupancy. The price: y = round(round(μ) + s⊙z), one extra rounding of μ to
#: x's dtype (nothing for fp32; within one ulp for 16-bit, where torch's same-dtype
#: reference rounds more often).
FUSE_NOISE = False


# ------------------------------------------------------------------------------------------
# autotuning
# ------------------------------------------------------------------------------------------


def _cfg(bm, bn, bk, warps, stages, names=("BLOCK_M", "BLOCK_N", "BLOCK_K")):
    return triton.Config({names[0]: bm, names[1]: bn, names[2]: bk, "GROUP": 8}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) in the forward's naming; the backward kernels
# read them as (output rows, output cols, reduction). Two fp32 accumulators per tile: a
# 128x128 tile holds 2·64 KiB of them, 128 registers per thread at 8 warps, so 128x128
# needs 8 warps; bigger tiles (128x256) would spill. Measured on H100 / Triton 3.6, 4096³
# bf16: 128x128x64/8 warps/3 stages ran the forward's dual GEMM in 0.51 ms (542 TFLOP/s),
# 128x64 and 64x128 tiles in 0.66-0.71 ms, 2 stages 0.77 ms. The list is short on purpose:
# every config is a compile + benchmark per new (M, N, K, dtype, flags). 16-bit inputs fit
# all of them in shared memory; fp32 (4 operand tiles of 4 bytes) keeps the BLOCK_K=32 ones.
_GEMM_SHAPES = [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (128, 128, 32, 8, 3),
    (128, 64, 64, 4, 3),
]
#: Problems with fewer than this many multiply-adds (M·N·K) skip autotuning: one small
#: config, one compile. Their run time is launch-bound anyway, and it keeps the CUDA tests
#: (many odd little shapes) from compiling every config for every shape class.
_SMALL_PROBLEM = 2**25
_SMALL_SHAPE = (64, 64, 32, 4, 3)
_INTERPRET_SHAPE = (32, 32, 32, 4, 1)


def _configs(names):
    shapes = [_INTERPRET_SHAPE] if _INTERPRET else _GEMM_SHAPES + [_SMALL_SHAPE]
    return [_cfg(*s, names=names) for s in shapes]


def _prune(operand_tiles):
    """Early config pruning: one small config for small problems; otherwise drop the configs
    whose pipelined shared-memory footprint cannot fit (``operand_tiles(cfg)`` = elements
    loaded per reduction step), which would only fail to launch after compiling."""

    def prune(configs, named_args, **kwargs):
        if _INTERPRET or len(configs) == 1:
            return configs
        large, small = configs[:-1], configs[-1:]  # _configs puts _SMALL_SHAPE last
        if named_args["M"] * named_args["N"] * named_args["K"] < _SMALL_PROBLEM:
            return small
        elem = next(v.element_size() for v in named_args.values() if isinstance(v, torch.Tensor))
        kept = [c for c in large if c.num_stages * operand_tiles(c.kwargs) * elem <= 200 * 1024]
        # the small config stays as a candidate that always fits: the autotuner skips a
        # config that fails to launch, but a lone survivor would not be benchmarked first
        return kept + small

    return prune


def _even(dim, block):
    return lambda args: args[dim] % args[block] == 0


# ------------------------------------------------------------------------------------------
# noise
# ------------------------------------------------------------------------------------------


@triton.jit
def _randn(seed, offs, WIDE: tl.constexpr):
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


@triton.jit
def _flat_offsets(WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """This program's BLOCK flat indices of a 1-D launch (int64 when WIDE)."""
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    return pid * BLOCK + tl.arange(0, BLOCK)


@triton.jit(do_not_specialize=["seed"])
def _noise_kernel(z_ptr, start, numel, seed, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    local = _flat_offsets(WIDE, BLOCK)
    mask = local < numel
    z = _randn(seed, start + local, WIDE)
    tl.store(z_ptr + local, z, mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _sample_kernel(mu_ptr, v_ptr, y_ptr, s_ptr, numel, seed, FROM_VAR: tl.constexpr, WIDE: tl.constexpr,
                   BLOCK: tl.constexpr):
    # y = μ + s ⊙ z over contiguous tensors whose flat index is the noise offset; s is
    # sqrt(v + eps) (FROM_VAR, then stored to s_ptr) or read from s_ptr (v_ptr unused)
    offs = _flat_offsets(WIDE, BLOCK)
    mask = offs < numel
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FROM_VAR:
        std = tl.sqrt(tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32) + 1e-8)
        tl.store(s_ptr + offs, std.to(s_ptr.dtype.element_ty), mask=mask)
    else:
        std = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = mu + std * _randn(seed, offs, WIDE)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _half_noise_over_std_kernel(g_ptr, s_ptr, h_ptr, numel, seed, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    # h = g ⊙ z / (2s) over contiguous tensors, z regenerated at the flat index
    offs = _flat_offsets(WIDE, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    std = tl.load(s_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    h = g * _randn(seed, offs, WIDE) * 0.5 / std
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


def _normalize_seed(seed):
    """Seeds are taken modulo 2^63 (Triton passes them as int64)."""
    return int(seed) % (1 << 63)


def _noise_flat(start, numel, seed, device, wide=None):
    """z at the flat noise offsets start, …, start + numel − 1, as float32 [numel]."""
    z = torch.empty(numel, dtype=torch.float32, device=device)
    if numel == 0:
        return z
    if wide is None:
        wide = start + numel - 1 > _INT32_MAX
    block = 1024
    _noise_kernel[(triton.cdiv(numel, block),)](z, start, numel, _normalize_seed(seed), WIDE=wide, BLOCK=block, num_warps=4)
    return z


def lrt_noise(M, N, seed, device):
    """The noise z [M, N] (float32) that ``lrt_forward(..., seed)`` adds: z[m, n] is the
    Philox normal at offset m·N + n."""
    M, N = int(M), int(N)
    return _noise_flat(0, M * N, seed, torch.device(device)).view(M, N)


def _launch_flat(kernel, numel, *args, **meta):
    block = 1024
    kernel[(triton.cdiv(numel, block),)](*args, BLOCK=block, num_warps=4, **meta)


def _check_pair(a, b, names):
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} differ in shape")
    if a.dtype != b.dtype or a.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{names[0]} and {names[1]} must share one of float32/float16/bfloat16, got {a.dtype}, {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{names[0]} and {names[1]} must be on one device")
    if a.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError("Triton LRT kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


def lrt_sample(mean, var, seed):
    """(y, s) with s = sqrt(var + 1e-8) and y = mean + s ⊙ z, z the Philox normals at the
    flat indices of the (contiguous) output: for an [M, N] output exactly the noise
    ``lrt_forward`` adds. Both outputs contiguous, in mean's dtype."""
    _check_pair(mean, var, ("mean", "var"))
    mean, var = mean.contiguous(), var.contiguous()
    y, std = torch.empty_like(mean), torch.empty_like(mean)
    numel = mean.numel()
    if numel:
        _launch_flat(_sample_kernel, numel, mean, var, y, std, numel, _normalize_seed(seed), FROM_VAR=True,
                     WIDE=numel - 1 > _INT32_MAX)
    return y, std


def lrt_sample_backward(grad, std, seed):
    """h = grad ⊙ z / (2 std) with the z of ``lrt_sample(..., seed)``: ∂L/∂var."""
    _check_pair(grad, std, ("grad", "std"))
    grad, std = grad.contiguous(), std.contiguous()
    h = torch.empty_like(grad)
    numel = grad.numel()
    if numel:
        _launch_flat(_half_noise_over_std_kernel, numel, grad, std, h, numel, _normalize_seed(seed),
                     WIDE=numel - 1 > _INT32_MAX)
    return h


# ------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K")),
    key=["M", "N", "K", "ON_THE_FLY"],
    prune_configs_by={"early_config_prune": _prune(lambda c: 2 * c["BLOCK_K"] * (c["BLOCK_M"] + c["BLOCK_N"]))},
)
@triton.heuristics({"EVEN_K": _even("K", "BLOCK_K")})
@triton.jit(do_not_specialize=["seed"])
def _lrt_fwd_kernel(
    x_ptr, x2_ptr, w_ptr, lsv_ptr, b_ptr, y_ptr, s_ptr,
    M, N, K, seed,
    stride_xm, stride_x2m, stride_wn, stride_lsn, stride_ym, stride_sm,
    HAS_BIAS: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr, ON_THE_FLY: tl.constexpr,
    NOISE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    # grouped ordering: GROUP row-blocks of y share the θ / log σ² column panels in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP
    group_size_m = min(num_pid_m - first_pid_m, GROUP)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows past the edge wrap around (valid addresses, results never stored): no M/N masks
    # in the hot loop, only the K tail is masked
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    x2_ptrs = x2_ptr + rm[:, None] * stride_x2m + offs_k[None, :]  # x⊙x (precomputed path)
    w_ptrs = w_ptr + rn[None, :] * stride_wn + offs_k[:, None]  # [BK, BN] = θᵀ tile
    ls_ptrs = lsv_ptr + rn[None, :] * stride_lsn + offs_k[:, None]  # log σ² or exp(log σ²)

    acc_mu = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
            lsv = tl.load(ls_ptrs)
        else:
            k_left = K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            lsv = tl.load(ls_ptrs, mask=offs_k[:, None] < k_left, other=0.0)  # x = 0 there
        if ON_THE_FLY:
            xf = x.to(tl.float32)
            x2 = (xf * xf).to(x.dtype)
            var_w = tl.exp(lsv.to(tl.float32)).to(x.dtype)
        else:
            if EVEN_K:
                x2 = tl.load(x2_ptrs)
            else:
                x2 = tl.load(x2_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            var_w = lsv
        acc_mu = tl.dot(x, w, acc_mu, input_precision=PRECISION)
        acc_v = tl.dot(x2, var_w, acc_v, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        x2_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        ls_ptrs += BLOCK_K

    if HAS_BIAS:
        bias = tl.load(b_ptr + rn).to(tl.float32)
        acc_mu += bias[None, :]
    std = tl.sqrt(acc_v + 1e-8)
    if WIDE:
        noise_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    else:
        noise_offs = offs_m[:, None] * N + offs_n[None, :]
    if NOISE:
        y = acc_mu + std * _randn(seed, noise_offs, WIDE)
    else:  # the mean μ (with s beside it): deterministic use / measurements
        y = acc_mu

    out_m = offs_m.to(tl.int64)[:, None]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + out_m * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + out_m * stride_sm + offs_n[None, :], std.to(s_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed"])
def _lrt_h_kernel(
    g_ptr, s_ptr, h_ptr, dbp_ptr,
    M, N, seed,
    stride_gm, stride_sm, stride_hm,
    WIDE: tl.constexpr, COMPUTE_H: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
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
        z = _randn(seed, noise_offs, WIDE)
        h = g * z * 0.5 / s
        tl.store(h_ptr + rows * stride_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_DB:
        # partial column sums of this row block; summed over row blocks by the host in a
        # fixed order (deterministic, no atomics)
        tl.store(dbp_ptr + pid_m * N + offs_n, tl.sum(g, axis=0), mask=offs_n < N)


@triton.autotune(
    configs=_configs(("BLOCK_N", "BLOCK_K", "BLOCK_M")),
    key=["M", "N", "K", "COMPUTE_DW", "COMPUTE_DLS", "ON_THE_FLY"],
    prune_configs_by={"early_config_prune": _prune(lambda c: 2 * c["BLOCK_M"] * (c["BLOCK_N"] + c["BLOCK_K"]))},
)
@triton.heuristics({"EVEN_M": _even("M", "BLOCK_M")})
@triton.jit
def _lrt_dw_kernel(
    g_ptr, h_ptr, x_ptr, x2_ptr, ls_ptr, dw_ptr, dls_ptr,
    M, N, K,
    stride_gm, stride_hm, stride_xm, stride_x2m, stride_lsn, stride_dwn, stride_dlsn,
    COMPUTE_DW: tl.constexpr, COMPUTE_DLS: tl.constexpr, PRECISION: tl.constexpr, ON_THE_FLY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr, EVEN_M: tl.constexpr,
):  # fmt: skip
    # ∂θ = gᵀx and ∂log σ² = (hᵀ x²) ⊙ exp(log σ²) for one [BLOCK_N, BLOCK_K] tile
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    num_pid_in_group = GROUP * num_pid_k
    group_id = pid // num_pid_in_group
    first_pid_n = group_id * GROUP
    group_size_n = min(num_pid_n - first_pid_n, GROUP)
    pid_n = first_pid_n + ((pid % num_pid_in_group) % group_size_n)
    pid_k = (pid % num_pid_in_group) // group_size_n

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    rn = offs_n % N
    rk = offs_k % K
    gT_ptrs = g_ptr + offs_m[None, :] * stride_gm + rn[:, None]  # [BN, BM] = gᵀ tile
    hT_ptrs = h_ptr + offs_m[None, :] * stride_hm + rn[:, None]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + rk[None, :]  # [BM, BK]
    x2_ptrs = x2_ptr + offs_m[:, None] * stride_x2m + rk[None, :]

    acc_w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_l = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m in range(0, tl.cdiv(M, BLOCK_M)):
        m_left = M - m * BLOCK_M
        if COMPUTE_DW or ON_THE_FLY:
            if EVEN_M:
                x = tl.load(x_ptrs)
            else:
                x = tl.load(x_ptrs, mask=offs_m[:, None] < m_left, other=0.0)
        if COMPUTE_DW:
            if EVEN_M:
                gT = tl.load(gT_ptrs)
            else:
                gT = tl.load(gT_ptrs, mask=offs_m[None, :] < m_left, other=0.0)
            acc_w = tl.dot(gT, x, acc_w, input_precision=PRECISION)
        if COMPUTE_DLS:
            if EVEN_M:
                hT = tl.load(hT_ptrs)
            else:
                hT = tl.load(hT_ptrs, mask=offs_m[None, :] < m_left, other=0.0)
            if ON_THE_FLY:
                xf = x.to(tl.float32)
                x2 = (xf * xf).to(x.dtype)
            elif EVEN_M:
                x2 = tl.load(x2_ptrs)
            else:
                x2 = tl.load(x2_ptrs, mask=offs_m[:, None] < m_left, other=0.0)
            acc_l = tl.dot(hT, x2, acc_l, input_precision=PRECISION)
        x_ptrs += BLOCK_M * stride_xm
        x2_ptrs += BLOCK_M * stride_x2m
        gT_ptrs += BLOCK_M * stride_gm
        hT_ptrs += BLOCK_M * stride_hm

    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    out_n = offs_n.to(tl.int64)[:, None]
    if COMPUTE_DW:
        tl.store(dw_ptr + out_n * stride_dwn + offs_k[None, :], acc_w.to(dw_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_DLS:
        ls = tl.load(ls_ptr + rn.to(tl.int64)[:, None] * stride_lsn + rk[None, :]).to(tl.float32)
        dls = acc_l * tl.exp(ls)
        tl.store(dls_ptr + out_n * stride_dlsn + offs_k[None, :], dls.to(dls_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=_configs(("BLOCK_M", "BLOCK_K", "BLOCK_N")),
    key=["M", "N", "K", "ON_THE_FLY"],
    prune_configs_by={"early_config_prune": _prune(lambda c: c["BLOCK_N"] * (2 * c["BLOCK_M"] + 2 * c["BLOCK_K"]))},
)
@triton.heuristics({"EVEN_N": _even("N", "BLOCK_N")})
@triton.jit
def _lrt_dx_kernel(
    g_ptr, h_ptr, w_ptr, lsv_ptr, x_ptr, dx_ptr,
    M, N, K,
    stride_gm, stride_hm, stride_wn, stride_lsn, stride_xm, stride_dxm,
    PRECISION: tl.constexpr, ON_THE_FLY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    # ∂x = g·θ + 2x ⊙ (h·exp(log σ²)) for one [BLOCK_M, BLOCK_K] tile
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    num_pid_in_group = GROUP * num_pid_k
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP
    group_size_m = min(num_pid_m - first_pid_m, GROUP)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_k = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    rm = (offs_m % M).to(tl.int64)
    rk = offs_k % K
    g_ptrs = g_ptr + rm[:, None] * stride_gm + offs_n[None, :]  # [BM, BN]
    h_ptrs = h_ptr + rm[:, None] * stride_hm + offs_n[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + rk[None, :]  # [BN, BK]
    ls_ptrs = lsv_ptr + offs_n[:, None] * stride_lsn + rk[None, :]  # log σ² or exp(log σ²)

    acc_g = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_h = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        if EVEN_N:
            g = tl.load(g_ptrs)
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
            lsv = tl.load(ls_ptrs)
        else:
            n_left = N - n * BLOCK_N
            g = tl.load(g_ptrs, mask=offs_n[None, :] < n_left, other=0.0)
            h = tl.load(h_ptrs, mask=offs_n[None, :] < n_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_n[:, None] < n_left, other=0.0)
            lsv = tl.load(ls_ptrs, mask=offs_n[:, None] < n_left, other=0.0)  # h = 0 there
        if ON_THE_FLY:
            var_w = tl.exp(lsv.to(tl.float32)).to(w.dtype)
        else:
            var_w = lsv
        acc_g = tl.dot(g, w, acc_g, input_precision=PRECISION)
        acc_h = tl.dot(h, var_w, acc_h, input_precision=PRECISION)
        g_ptrs += BLOCK_N
        h_ptrs += BLOCK_N
        w_ptrs += BLOCK_N * stride_wn
        ls_ptrs += BLOCK_N * stride_lsn

    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :]).to(tl.float32)
    dx = acc_g + 2.0 * x * acc_h
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    out_m = offs_m.to(tl.int64)[:, None]
    tl.store(dx_ptr + out_m * stride_dxm + offs_k[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------


def _rows(t):
    """A 2-D view whose last dimension is contiguous (the kernels take one row stride)."""
    if t.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(t.shape)}")
    if t.size(1) > 1 and t.stride(1) != 1:
        t = t.contiguous()
    return t


def _row_stride(t):
    # a [R, 1] or [1, C] tensor may carry any stride on its size-1 dims
    return t.stride(0) if t.size(0) > 1 else t.size(1)


def _precision(dtype):
    if dtype != torch.float32:
        return "tf32"  # only fp32 operands are affected; 16-bit ones always use their MMA
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _check_inputs(x, weight, log_sigma2, bias):
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x must be [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.shape != log_sigma2.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and log_sigma2 {tuple(log_sigma2.shape)} differ in shape")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features, weight expects {weight.shape[1]}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    tensors = [x, weight, log_sigma2] + ([] if bias is None else [bias])
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"lrt kernels support float32, float16 and bfloat16, got {x.dtype}")
    if any(t.dtype != x.dtype for t in tensors):
        raise TypeError("x, weight, log_sigma2 and bias must share one dtype: " + ", ".join(str(t.dtype) for t in tensors))
    if any(t.device != x.device for t in tensors):
        raise ValueError("x, weight, log_sigma2 and bias must be on one device")
    if x.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError("Triton LRT kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


def _squares(x, on_the_fly):
    """x⊙x in x's dtype (the product rounded once, like the kernels' in-tile path)."""
    return x if on_the_fly else _rows(x * x)


def _variances(log_sigma2, on_the_fly):
    """exp(log σ²) in its dtype (torch computes half-precision exp in fp32, then rounds)."""
    return log_sigma2 if on_the_fly else _rows(torch.exp(log_sigma2))


def lrt_forward(x, weight, log_sigma2, bias, seed, *, _wide=None, _on_the_fly=None, _fuse_noise=None):
    """y = x θᵀ + b + s ⊙ z and s = sqrt((x⊙x) exp(log σ²)ᵀ + 1e-8).

    x: [M, K] (any strides); weight, log_sigma2: [N, K]; bias: [N] or None; one dtype
    (fp32/fp16/bf16). z is ``lrt_noise(M, N, seed, x.device)``; seeds are taken mod 2^63.
    Returns (y, s), both [M, N] in x's dtype. One dual-GEMM kernel computes μ and s (both
    products accumulated in one K loop, fp32); with the defaults, x⊙x and exp(log σ²) are
    formed before it (transients of x's and θ's size) and the noise is added after it.
    ``_wide`` (tests only) forces 64-bit noise offsets; ``_on_the_fly`` and ``_fuse_noise``
    override :data:`ON_THE_FLY` and :data:`FUSE_NOISE`.
    """
    _check_inputs(x, weight, log_sigma2, bias)
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    std = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y, std
    seed = _normalize_seed(seed)
    wide = (M * N - 1 > _INT32_MAX) if _wide is None else bool(_wide)
    if K == 0:  # μ = b, v = 0: y = b + sqrt(1e-8)·z
        z = _noise_flat(0, M * N, seed, x.device, wide).view(M, N)
        s0 = math.sqrt(EPS)
        mean = bias.float()[None, :] if bias is not None else 0.0
        y.copy_(mean + s0 * z)
        std.fill_(s0)
        return y, std

    x, weight, log_sigma2 = _rows(x), _rows(weight), _rows(log_sigma2)
    if bias is not None:
        bias = bias.contiguous()
    on_the_fly = ON_THE_FLY if _on_the_fly is None else bool(_on_the_fly)
    fuse_noise = FUSE_NOISE if _fuse_noise is None else bool(_fuse_noise)
    x2 = _squares(x, on_the_fly)
    lsv = _variances(log_sigma2, on_the_fly)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _lrt_fwd_kernel[grid](
        x, x2, weight, lsv, bias if bias is not None else x, y, std,
        M, N, K, seed,
        _row_stride(x), _row_stride(x2), _row_stride(weight), _row_stride(lsv), N, N,
        HAS_BIAS=bias is not None, WIDE=wide, PRECISION=_precision(x.dtype), ON_THE_FLY=on_the_fly,
        NOISE=fuse_noise,
    )  # fmt: skip
    if not fuse_noise:
        _launch_flat(_sample_kernel, M * N, y, y, y, std, M * N, seed, FROM_VAR=False, WIDE=wide)
    return y, std


def lrt_backward(grad, x, weight, log_sigma2, std, seed, output_mask, *, _wide=None, _on_the_fly=None):
    """Gradients of ``lrt_forward`` w.r.t. (x, weight, log_sigma2, bias).

    grad, std: [M, N] (std is the ``s`` that ``lrt_forward`` returned with this seed).
    ``output_mask``: four bools; entries not requested come back as None. With
    g = grad, h = g ⊙ z / (2s):

        ∂x = g θ + 2x ⊙ (h exp(log σ²)),  ∂θ = gᵀ x,
        ∂log σ² = (hᵀ (x⊙x)) ⊙ exp(log σ²),  ∂b = Σ_rows g

    All in the parameters' dtype, accumulated in fp32.
    """
    _check_inputs(x, weight, log_sigma2, None)
    need_dx, need_dw, need_dls, need_db = (bool(v) for v in output_mask)
    M, K = x.shape
    N = weight.shape[0]
    if grad.shape != (M, N) or std.shape != (M, N):
        raise ValueError(f"grad and std must be [{M}, {N}], got {tuple(grad.shape)} and {tuple(std.shape)}")
    dtype, device = weight.dtype, weight.device
    dx = dw = dls = db = None

    if M == 0 or N == 0 or K == 0:  # empty sums: exact zeros
        if need_dx:
            dx = torch.zeros((M, K), dtype=dtype, device=device)
        if need_dw:
            dw = torch.zeros((N, K), dtype=dtype, device=device)
        if need_dls:
            dls = torch.zeros((N, K), dtype=dtype, device=device)
        if need_db:
            db = grad.sum(0, dtype=torch.float32).to(dtype)
        return dx, dw, dls, db

    seed = _normalize_seed(seed)
    wide = (M * N - 1 > _INT32_MAX) if _wide is None else bool(_wide)
    x, weight, log_sigma2, g, std = _rows(x), _rows(weight), _rows(log_sigma2), _rows(grad), _rows(std)
    if g.dtype != dtype:
        g = g.to(dtype)
    precision = _precision(dtype)
    on_the_fly = ON_THE_FLY if _on_the_fly is None else bool(_on_the_fly)

    need_h = need_dx or need_dls
    h = None
    if need_h or need_db:
        # h is a transient [M, N] that both GEMM kernels read (N/BLOCK_N resp. K/BLOCK_K
        # times, mostly from L2). It is stored in the operand dtype of those dots: for
        # 16-bit inputs the dots take it as 16-bit anyway, so an fp32 copy would only
        # double its traffic without changing a single product. (fp16 h can overflow
        # where |g·z/(2s)| > 65504; torch's own fp16 autograd of the reference overflows
        # at the same place, since it computes the same quotient in fp16.)
        bm, bn = 64, 128
        h = torch.empty((M, N), dtype=dtype, device=device) if need_h else g
        grid_m = triton.cdiv(M, bm)
        dbp = torch.empty((grid_m, N), dtype=torch.float32, device=device) if need_db else g
        _lrt_h_kernel[(grid_m, triton.cdiv(N, bn))](
            g, std, h, dbp, M, N, seed,
            _row_stride(g), _row_stride(std), N,
            WIDE=wide, COMPUTE_H=need_h, COMPUTE_DB=need_db, BLOCK_M=bm, BLOCK_N=bn, num_warps=8,
        )  # fmt: skip
        if need_db:
            db = dbp.sum(0).to(dtype)
        h_stride = N if need_h else _row_stride(g)
    else:
        h_stride = 0

    if need_dw or need_dls:
        dw_out = torch.empty((N, K), dtype=dtype, device=device) if need_dw else None
        dls_out = torch.empty((N, K), dtype=dtype, device=device) if need_dls else None

        def grid_w(meta):
            return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)

        x2 = _squares(x, on_the_fly or not need_dls)
        _lrt_dw_kernel[grid_w](
            g, h if need_dls else g, x, x2, log_sigma2,
            dw_out if need_dw else dls_out, dls_out if need_dls else dw_out,
            M, N, K,
            _row_stride(g), h_stride if need_dls else _row_stride(g), _row_stride(x), _row_stride(x2),
            _row_stride(log_sigma2), K, K,
            COMPUTE_DW=need_dw, COMPUTE_DLS=need_dls, PRECISION=precision, ON_THE_FLY=on_the_fly,
        )  # fmt: skip
        del x2
        dw, dls = dw_out, dls_out

    if need_dx:
        dx = torch.empty((M, K), dtype=dtype, device=device)

        def grid_x(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)

        lsv = _variances(log_sigma2, on_the_fly)
        _lrt_dx_kernel[grid_x](
            g, h, weight, lsv, x, dx,
            M, N, K,
            _row_stride(g), h_stride, _row_stride(weight), _row_stride(lsv), _row_stride(x), K,
            PRECISION=precision, ON_THE_FLY=on_the_fly,
        )  # fmt: skip
    return dx, dw, dls, db
