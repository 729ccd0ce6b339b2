"""The LRT linear layer on the GPU: forward and backward, by one of two routes per shape.

Math (``sparsevd.reference.lrt_linear`` is the spec), x: [M, K], θ, log σ²: [N, K]:

    μ = x θᵀ + b,   v = (x ⊙ x) exp(log σ²)ᵀ,   s = sqrt(v + 1e-8),   y = μ + s ⊙ z
    h = g ⊙ z / (2s),  ∂θ = gᵀx,  ∂log σ² = (hᵀ(x⊙x)) ⊙ exp(log σ²),  ∂b = Σ_rows g,
    ∂x = gθ + 2x ⊙ (h exp(log σ²))

z is the Philox stream of :mod:`.lrt_sample` at the flat index m·N + n, regenerated in
backward; both routes draw the same numbers (:func:`lrt_noise`).

cuBLAS route (the default)
--------------------------
The six products by cuBLAS (``torch.mm``/``addmm`` in the input dtype; fp32 follows
``torch.backends.cuda.matmul.allow_tf32`` as F.linear does), the elementwise work in
fused Triton passes around them. T = one 4096×4096 bf16 tensor (33.5 MB); on an H100
(3.0 TB/s copy, cuBLAS 0.177 ms per 4096³ bf16 GEMM, measured) a pass over T costs 11 µs:

    forward, 4 launches
      operands   x², exp(log σ²)                read x, log σ²; write both    4T    45 µs
      addmm      μ = b + xθᵀ                                                       177 µs
      mm         v = x² exp(log σ²)ᵀ                                               177 µs
      sample     in place: y over μ, s over v    read μ, v; write y, s        4T    45 µs,
                 but Philox-bound: ~85 µs (16.8 M normals took 84 µs)
    backward, 7 launches
      h          h = g⊙z/(2s), ∂b column sums    read g, s; write h           3T    ~85 µs (Philox)
      operands   again (the op keeps x and the parameters, not x², exp(log σ²))  4T    45 µs
      mm ×3      ∂θ = gᵀx, P = hᵀx², C = h exp(log σ²)                             531 µs
      epilogue   C ← 2x⊙C, P ← P⊙exp(log σ²) (= ∂log σ²), in place            6T    67 µs
      addmm_     ∂x = gθ + C (cuBLAS β = 1: C is read inside a compute-bound GEMM)  177 µs

    ≈ 1.39 ms forward+backward on an H100, 2.3× dense nn.Linear (0.60 ms measured): the six
    GEMMs are 1.06 ms (the 2× floor), the 21T of elementwise traffic 0.24 ms, the two
    Philox sweeps' arithmetic beyond their traffic 0.09 ms. An H200 (4.3 TB/s) ≈ 1.34 ms.

Fused route
-----------
:mod:`.lrt_gemm`: each pair of products that shares an operand in one Triton dual-GEMM
kernel, the epilogues inside it: forward = operands + dual GEMM + noise pass (3 launches),
backward = h + operands + two dual GEMMs (4 launches), against 4 + 7. Fewer launches and
no [M, N]/[M, K] temporaries between GEMMs, for small, launch-bound problems; at 4096³ its
forward GEMM took 0.507 ms where the two cuBLAS GEMMs take 0.354 ms (H100).

The rule
--------
:data:`FUSED_BELOW_MACS` is data the GPU benchmark sets: ``bench/fit_lrt_route.py`` reads
``bench/bench_lrt.py``'s side-by-side timings of both routes and prints the table.
"""

from __future__ import annotations

import contextlib

import torch

from . import lrt_gemm
from ._common import SUPPORTED_DTYPES, check_device, is_wide, normalize_seed, precision, rows
from .lrt_elementwise import backward_epilogue_, operands
from .lrt_sample import add_noise_, half_noise_over_std, lrt_noise, lrt_sample, lrt_sample_backward, sample

__all__ = ["lrt_forward", "lrt_backward", "lrt_noise", "lrt_sample", "lrt_sample_backward", "route", "use_route",
           "FUSED_BELOW_MACS", "ROUTES"]

ROUTES = ("cublas", "fused")

#: Problems with fewer multiply-adds (M·N·K) than this take the fused route, per dtype;
#: larger ones (and any with an empty dimension) take cuBLAS. Zero: cuBLAS everywhere,
#: until a GPU measurement (bench/fit_lrt_route.py) says where the fused kernels win.
FUSED_BELOW_MACS = {torch.float32: 0, torch.float16: 0, torch.bfloat16: 0}


def route(M, N, K, dtype):
    """The route (one of :data:`ROUTES`) an [M, K] × [N, K] problem of ``dtype`` takes."""
    if M * N * K and M * N * K < FUSED_BELOW_MACS[dtype]:
        return "fused"
    return "cublas"


@contextlib.contextmanager
def use_route(name):
    """Every problem takes route ``name`` inside the block (benchmarks and tests time and
    check both routes through the op; not thread-safe)."""
    if name not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {name!r}")
    saved = dict(FUSED_BELOW_MACS)
    FUSED_BELOW_MACS.update(dict.fromkeys(saved, float("inf") if name == "fused" else 0))
    try:
        yield
    finally:
        FUSED_BELOW_MACS.update(saved)


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
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"lrt kernels support float32, float16 and bfloat16, got {x.dtype}")
    if any(t.dtype != x.dtype for t in tensors):
        dtypes = ", ".join(str(t.dtype) for t in tensors)
        raise TypeError(f"x, weight, log_sigma2 and bias must share one dtype: {dtypes}")
    if any(t.device != x.device for t in tensors):
        raise ValueError("x, weight, log_sigma2 and bias must be on one device")
    check_device(x, "LRT")


def _own_dtype(device):
    """Autocast reaches into a custom op's kernel: the products run in the inputs' dtype."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _pick(chosen, M, N, K, dtype):
    if chosen is None:
        return route(M, N, K, dtype)
    if chosen not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {chosen!r}")
    return "cublas" if M * N * K == 0 else chosen  # the fused kernels need every dimension


def lrt_forward(x, weight, log_sigma2, bias, seed, *, route=None, _wide=None):
    """y = x θᵀ + b + s ⊙ z and s = sqrt((x⊙x) exp(log σ²)ᵀ + 1e-8).

    x: [M, K] (any strides); weight, log_sigma2: [N, K]; bias: [N] or None; one dtype
    (fp32/fp16/bf16). z is ``lrt_noise(M, N, seed, x.device)``; seeds are taken mod 2^63.
    Returns (y, s), both [M, N] contiguous in x's dtype. ``route``: "cublas" or "fused"
    (default: :func:`route` of the shape). ``_wide`` (tests only) forces 64-bit noise offsets.
    """
    _check_inputs(x, weight, log_sigma2, bias)
    with _own_dtype(x.device):
        return _forward(x, weight, log_sigma2, bias, normalize_seed(seed), route, _wide)


def _forward(x, weight, log_sigma2, bias, seed, route, _wide):
    M, K = x.shape
    N = weight.shape[0]
    wide = is_wide(M * N) if _wide is None else bool(_wide)
    x = x.contiguous()
    x2, ev = operands(x, log_sigma2.contiguous())
    if _pick(route, M, N, K, x.dtype) == "fused":
        bias = None if bias is None else bias.contiguous()
        mu, std = lrt_gemm.forward(x, x2, rows(weight), ev, bias, precision(x.dtype))
        return add_noise_(mu, std, seed, wide), std
    mu = (torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())).contiguous()
    var = torch.mm(x2, ev.t())
    return sample(mu, var, seed, y=mu, std=var, wide=wide)


def lrt_backward(grad, x, weight, log_sigma2, std, seed, output_mask, *, route=None, _wide=None):
    """Gradients of ``lrt_forward`` w.r.t. (x, weight, log_sigma2, bias).

    grad, std: [M, N] (std is the ``s`` that ``lrt_forward`` returned with this seed).
    ``output_mask``: four bools; entries not requested come back as None. All in the
    parameters' dtype, accumulated in fp32. ``route`` as in :func:`lrt_forward`: either
    route differentiates either route's forward (same noise, same s).
    """
    _check_inputs(x, weight, log_sigma2, None)
    M, K = x.shape
    N = weight.shape[0]
    if grad.shape != (M, N) or std.shape != (M, N):
        raise ValueError(f"grad and std must be [{M}, {N}], got {tuple(grad.shape)} and {tuple(std.shape)}")
    with _own_dtype(x.device):
        return _backward(grad, x, weight, log_sigma2, std, seed, [bool(v) for v in output_mask], route, _wide)


def _backward(grad, x, weight, log_sigma2, std, seed, output_mask, route, _wide):
    need_dx, need_dw, need_dls, need_db = output_mask
    M, K = x.shape
    N = weight.shape[0]
    dtype = weight.dtype
    g = rows(grad.to(dtype))
    h, db = half_noise_over_std(g, std.to(dtype), seed, need_dx or need_dls, need_db,
                                is_wide(M * N) if _wide is None else bool(_wide))
    x = x.contiguous()
    x2, ev = operands(x, log_sigma2.contiguous(), need_squares=need_dls, need_variances=need_dx or need_dls)
    dx = dw = dls = None
    if _pick(route, M, N, K, dtype) == "fused":
        if need_dw or need_dls:
            dw, dls = lrt_gemm.weight_grads(g, h, x, x2, ev, need_dw, need_dls, precision(dtype))
        if need_dx:
            dx = lrt_gemm.input_grad(g, h, rows(weight), ev, x, precision(dtype))
        return dx, dw, dls, db
    if need_dw:
        dw = torch.mm(g.t(), x)
    if need_dls:
        dls = torch.mm(h.t(), x2)  # P, scaled into ∂log σ² by the epilogue
    if need_dx:
        dx = torch.mm(h, ev)  # C, turned into 2x ⊙ C by the epilogue, then + gθ
    backward_epilogue_(dx, x if need_dx else None, dls, ev if need_dls else None)
    if need_dx:
        dx.addmm_(g, weight)
    return dx, dw, dls, db
