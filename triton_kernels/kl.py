"""Triton kernels for the summed KL term of Sparse Variational Dropout.

    la = clamp(log σ² − log(θ² + 1e-8), lo, hi)
    KL = k1 − k1·sigmoid(k2 + k3·la) + ½·softplus(−la)          (``sparsevd.reference``)

Every kernel reads θ and log σ² once (in their own dtype, math in fp32) and, for gradients,
writes ∂θ and ∂log σ² once: bandwidth, and on an H200 about as much arithmetic (see CONFIG).

Sum: each program reduces one BLOCK of elements to an fp32 partial (``tl.sum``, a fixed
tree), writes it to a buffer, and a second single-program kernel adds the partials in a
fixed order. No atomics, so a given input (shape, dtype, device) gives the same bits every
call. The block is a constant (CONFIG), not autotuned, for that reason.

Gradient (torch.clamp's backward: passes where lo ≤ raw ≤ hi, inclusive):

    dKL/dla = −k1·k3·σ(t)(1−σ(t)) − ½·sigmoid(−la),  t = k2 + k3·la
    ∂log σ² = grad · dKL/dla,   ∂θ = grad · dKL/dla · (−2θ / (θ² + 1e-8))
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

K1, K2, K3 = 0.63576, 1.87320, 1.48695
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (elements per program, warps) of the main kernel. The math is ~134 SASS instructions per
# element (two logs, exps, divisions), as long on an H200 as its 16 bytes of fp32 traffic,
# so occupancy decides how well the two overlap: ptxas gives the fused kernel 150
# registers at 2048/4 (8 warps per multiprocessor), 72 at 1024/4 and 40 at 1024/8 (64
# warps, full occupancy). 2048/4 measured 78% of copy bandwidth on an H100; 1024/8 is the
# prediction for both H100 and H200 until bench/bench_kl.py's sweep (test_kl_kernel_config)
# says otherwise. Small in the interpreter so that modest test inputs exercise multi-step
# final sums.
CONFIG = (256, 4) if _INTERPRET else (1024, 8)
#: Partials per step of the final sum.
_SUM_BLOCK = 16 if _INTERPRET else 1024


@triton.jit
def _kl_kernel(
    w_ptr, ls_ptr, partial_ptr, dw_ptr, dls_ptr, grad_ptr,
    grad_scale, numel, lo, hi,
    COMPUTE_SUM: tl.constexpr, COMPUTE_GRAD: tl.constexpr, GRAD_FROM_PTR: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    w = tl.load(w_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    ls = tl.load(ls_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w2 = w * w + 1e-8
    raw = ls - tl.log(w2)
    la = tl.minimum(tl.maximum(raw, lo), hi)
    sig_t = tl.sigmoid(1.87320 + 1.48695 * la)
    if COMPUTE_SUM:
        # softplus(−la) = max(−la, 0) + log(1 + exp(−|la|)), stable for any clamp range
        softplus = tl.maximum(-la, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(la)))
        kl = 0.63576 - 0.63576 * sig_t + 0.5 * softplus
        kl = tl.where(mask, kl, 0.0)
        tl.store(partial_ptr + pid, tl.sum(kl, axis=0))
    if COMPUTE_GRAD:
        if GRAD_FROM_PTR:
            g = tl.load(grad_ptr).to(tl.float32)
        else:
            g = grad_scale
        dla = -0.63576 * 1.48695 * sig_t * (1.0 - sig_t) - 0.5 * tl.sigmoid(-la)
        dla = tl.where((raw >= lo) & (raw <= hi), dla * g, 0.0)
        dw = dla * (-2.0 * w / w2)
        tl.store(dls_ptr + offs, dla.to(dls_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_ptr + offs, dw.to(dw_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_kernel(partial_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # one program: lane i adds partials i, i + BLOCK, i + 2·BLOCK, … then a fixed tree
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        acc += tl.load(partial_ptr + start + offs, mask=start + offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


def _prepare(weight, log_sigma2):
    if weight.shape != log_sigma2.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and log_sigma2 {tuple(log_sigma2.shape)} differ in shape")
    for name, t in (("weight", weight), ("log_sigma2", log_sigma2)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"KL kernels support float32, float16 and bfloat16, got {name} {t.dtype}")
    if weight.device != log_sigma2.device:
        raise ValueError("weight and log_sigma2 must be on one device")
    if weight.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError("Triton KL kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return weight.contiguous(), log_sigma2.contiguous()


def _launch(weight, log_sigma2, lo, hi, compute_sum, compute_grad, grad=None, grad_scale=1.0, config=None):
    w, ls = _prepare(weight, log_sigma2)
    numel, device = w.numel(), w.device
    kl = None
    if compute_sum:
        kl = (torch.zeros if numel == 0 else torch.empty)((), dtype=torch.float32, device=device)
    dw = torch.empty_like(w) if compute_grad else None
    dls = torch.empty_like(ls) if compute_grad else None
    if numel == 0:
        return kl, dw, dls
    block, num_warps = CONFIG if config is None else config
    grid = triton.cdiv(numel, block)
    partial = torch.empty(grid, dtype=torch.float32, device=device) if compute_sum else w
    from_ptr = grad is not None
    if from_ptr:
        if grad.numel() != 1:
            raise ValueError(f"grad must hold one value, got shape {tuple(grad.shape)}")
        if grad.device != device:
            raise ValueError("grad must be on the parameters' device")
    _kl_kernel[(grid,)](
        w, ls, partial, dw if compute_grad else w, dls if compute_grad else w, grad if from_ptr else w,
        float(grad_scale), numel, float(lo), float(hi),
        COMPUTE_SUM=compute_sum, COMPUTE_GRAD=compute_grad, GRAD_FROM_PTR=from_ptr,
        BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    if compute_sum:
        _sum_kernel[(1,)](partial, kl, grid, BLOCK=_SUM_BLOCK, num_warps=4)
    return kl, dw, dls


def kl_forward(weight, log_sigma2, log_alpha_min, log_alpha_max):
    """Σ KL over all weights as a 0-dim float32 tensor (0 for empty input).

    weight and log_sigma2: same shape (any number of dims), fp32/fp16/bf16.
    """
    kl, _, _ = _launch(weight, log_sigma2, log_alpha_min, log_alpha_max, True, False)
    return kl


def kl_backward(grad, weight, log_sigma2, log_alpha_min, log_alpha_max):
    """(∂θ, ∂log σ²) of grad · Σ KL, in the parameters' dtypes, one pass.

    grad is a one-element tensor (e.g. 0-dim) read inside the kernel (no host sync).
    """
    _, dw, dls = _launch(weight, log_sigma2, log_alpha_min, log_alpha_max, False, True, grad=grad)
    return dw, dls


def kl_forward_backward(weight, log_sigma2, log_alpha_min, log_alpha_max, grad_scale=1.0, *, config=None):
    """(Σ KL, ∂θ, ∂log σ²) in one pass, gradients for grad = ``grad_scale`` (default 1).

    Worth it? Separate forward + backward move 6 tensor-sizes of memory (read θ, log σ²;
    read θ, log σ², write ∂θ, ∂log σ²); this pass moves 4, so ~1.5× less traffic for a
    purely bandwidth-bound term — but only if the gradients are used as they come out.
    If the caller rescales them in autograd's backward (dweight = grad · unit), that is
    another 4 tensor-sizes (8 in all) and it loses to the separate kernels; it also keeps
    two parameter-sized tensors alive from forward to backward. It pays when the scale is
    known at forward time (SGVLB: kl_weight / N_train, pass it as ``grad_scale``) and the
    gradients are accumulated directly, e.g. by a KL term computed right before the
    backward of the data loss.

    Measured on H100 / Triton 3.6, 4096x4096 parameters: bf16 fused 0.107 ms against
    0.097 + 0.066 ms separately; fp32 0.115 ms against 0.071 + 0.099 ms (eager reference
    forward+backward 1.96 / 1.78 ms, torch.compile of it 0.40 / 0.48 ms).

    ``config`` (benchmarks): (elements per program, warps) in place of :data:`CONFIG`.
    """
    return _launch(weight, log_sigma2, log_alpha_min, log_alpha_max, True, True, grad_scale=grad_scale, config=config)
