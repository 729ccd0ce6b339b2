"""Triton kernels of Structured Bayesian Pruning (the math and its stable rearrangements:
the SBP section of ``sparsevd.reference``; the C++ CPU kernels in csrc/cpu/sbp.cpp are the
same algorithm).

- ``_unit_kernel``: per unit, the mirrored frame of the truncated normal of log θ, then the
  KL and its two gradients, and/or the sampler's per-unit constants.
- ``_sample_kernel``: per example and unit, θ at the Philox uniform of its flat index
  (``tl.rand``) by the inverse CDF, and ∂θ/∂μ, ∂θ/∂log σ.

Everything computes in float64 and stores float32 (the parameters' dtype for the KL
gradients): the work is [units] and [batch, units] sized, a few launches either way, and
float64 keeps the far tails simple. Φ comes from ``erf`` (libdevice's erfc/erfcx are not in
the interpreter): 1 − erf loses relative digits below −5, where the continued fraction takes
over, so the results keep ~1e-10, beyond the float32 they are stored in. Constants are
``tl.full(..., float64)``: a bare Python float in a float64 expression is rounded to float32
by the compiler. A NaN parameter raises on the host (one synchronization per call, skipped
while a CUDA graph is captured).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._common import flat_offsets

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1
_BLOCK = 128 if _INTERPRET else 256
#: Rows of the per-unit constants of the sampler (see _unit_kernel).
_CONSTS = 14

_LOG_SQRT_2PI = tl.constexpr(0.5 * math.log(2 * math.pi))
_LOG_SQRT_HALF_PI = tl.constexpr(0.5 * math.log(math.pi / 2))
_SQRT_HALF = tl.constexpr(math.sqrt(0.5))
_LOG2 = tl.constexpr(math.log(2.0))
_KL_CONST = tl.constexpr(-0.5 * math.log(2 * math.pi * math.e))


@triton.jit
def _c(x: tl.constexpr):
    return tl.full([], x, tl.float64)


@triton.jit
def _log1p(x):
    # Goldberg: log(1 + x)·x/((1 + x) − 1) cancels the rounding of 1 + x
    w = 1.0 + x
    d = w - 1.0
    return tl.where(d == 0.0, x, tl.log(w) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _expm1(x):
    # Kahan: (e^x − 1)·x / log(e^x) below 1 in magnitude
    u = tl.exp(x)
    um1 = u - 1.0
    small = tl.where(um1 == 0.0, x, um1 * x / tl.log(tl.where(um1 == 0.0, 2.0, u)))
    return tl.where(tl.abs(x) < 1.0, small, um1)


@triton.jit
def _mills_cf(y, DEPTH: tl.constexpr):
    """(m, E, V) at −y for y ≥ 5: φ/Φ = y + 1/D₁, E = 1/D₁, V = E(2/D₂ − E) (Laplace)."""
    d = y
    d2 = y
    for k in tl.static_range(DEPTH, 0, -1):
        d2 = d
        d = y + (k + 1) / d
    e = 1.0 / d
    return y + e, e, e * (2.0 / d2 - e)


@triton.jit
def _log_mills(x):
    """h(x) = log(Φ(x)/φ(x)) for x ≤ 0."""
    m, _, _ = _mills_cf(tl.maximum(-x, 5.0), 28)
    erfc = 1.0 - tl.math.erf(-x * _c(_SQRT_HALF))
    direct = _c(_LOG_SQRT_HALF_PI) + 0.5 * x * x + tl.log(tl.maximum(erfc, _c(1e-300)))
    return tl.where(x < -5.0, -tl.log(m), direct)


@triton.jit
def _log_mills_step(y, delta, DEPTH: tl.constexpr):
    """(h(−y − δ) − h(−y), φ/Φ at −y − δ), the continued fraction at both points with the
    recursion of their difference (sparsevd.reference._log_mills_step)."""
    yx = y + delta
    dp = y
    dx = yx
    dd = delta
    for k in tl.static_range(DEPTH, 0, -1):
        rp = 1.0 / dp
        rx = 1.0 / dx
        dd = delta - (k + 1) * dd * rx * rp
        dp = y + (k + 1) * rp
        dx = yx + (k + 1) * rx
    rp = 1.0 / dp
    rx = 1.0 / dx
    return -_log1p((delta - dd * rx * rp) / (y + rp)), yx + rx


@triton.jit
def _ndtri_lower(p):
    """Φ⁻¹(p) for p ≤ ½, Acklam's rational approximation (relative error 1.2e-9)."""
    low = p < 0.02425
    q = tl.sqrt(-2.0 * tl.log(tl.where(low, p, 0.02425)))
    num = q * _c(-7.784894002430293e-03) + _c(-3.223964580411365e-01)
    num = num * q + _c(-2.400758277161838e+00)
    num = num * q + _c(-2.549732539343734e+00)
    num = num * q + _c(4.374664141464968e+00)
    num = num * q + _c(2.938163982698783e+00)
    den = q * _c(7.784695709041462e-03) + _c(3.224671290700398e-01)
    den = den * q + _c(2.445134137142996e+00)
    den = den * q + _c(3.754408661907416e+00)
    den = den * q + 1.0
    c = p - 0.5
    r = c * c
    cn = r * _c(-3.969683028665376e+01) + _c(2.209460984245205e+02)
    cn = cn * r + _c(-2.759285104469687e+02)
    cn = cn * r + _c(1.383577518672690e+02)
    cn = cn * r + _c(-3.066479806614716e+01)
    cn = cn * r + _c(2.506628277459239e+00)
    cd = r * _c(-5.447609879822406e+01) + _c(1.615858368580409e+02)
    cd = cd * r + _c(-1.556989798598866e+02)
    cd = cd * r + _c(6.680131188771972e+01)
    cd = cd * r + _c(-1.328068155288572e+01)
    cd = cd * r + 1.0
    return tl.where(low, num / den, cn * c / cd)


@triton.jit
def _unit_kernel(mu_ptr, ls_ptr, kl_ptr, dmu_ptr, dls_ptr, consts_ptr, n, A: tl.constexpr, B: tl.constexpr,
                 KL: tl.constexpr, CONSTS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # the bounds are constexpr: a float argument would arrive rounded to float32
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    mu_raw = tl.load(mu_ptr + offs, mask=mask, other=-10.0).to(tl.float64)
    ls_raw = tl.load(ls_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    a = _c(A)
    b = _c(B)
    mu = tl.minimum(tl.maximum(mu_raw, -20.0), 5.0)
    ls = tl.minimum(tl.maximum(ls_raw, -20.0), 5.0)
    sigma = tl.exp(ls)
    alpha = (a - mu) / sigma
    beta = (b - mu) / sigma
    flip = alpha + beta > 0.0
    P = tl.where(flip, -alpha, beta)
    Q = tl.where(flip, -beta, alpha)
    lower = P <= 0.0
    Pn = tl.minimum(P, 0.0)
    Pp = tl.maximum(P, 0.0)
    # P < −5: the continued fraction gives m_P, E_P, V_P at once
    m_cf, e_cf, v_cf = _mills_cf(tl.maximum(-P, 5.0), 28)
    h_P = _log_mills(Pn)
    h_Q = _log_mills(Q)
    log_ndtr_P = tl.log(0.5 * (1.0 + tl.math.erf(Pp * _c(_SQRT_HALF))))
    m_P = tl.where(lower, tl.exp(-h_P), tl.exp(-0.5 * Pp * Pp - _c(_LOG_SQRT_2PI) - log_ndtr_P))
    m_P = tl.where(P < -5.0, m_cf, m_P)
    m_Q = tl.exp(-h_Q)
    D = tl.where(lower, -0.5 * (Q - P) * (Q + P) + h_Q - h_P, -0.5 * Q * Q - _c(_LOG_SQRT_2PI) + h_Q - log_ndtr_P)
    eD = tl.exp(D)
    q = -_expm1(D)
    if KL:
        E_P = tl.where(P < -5.0, e_cf, P + m_P)
        V_P = tl.where(P < -5.0, v_cf, 1.0 - m_P * (P + m_P))
        log_q = tl.where(D > -_c(_LOG2), tl.log(-_expm1(D)), _log1p(-eD))
        r_P = m_P / q
        r_Q = m_Q * eD / q
        cross = (Q * m_Q - P * m_P) * eD / q
        T = 0.5 * (Q * r_Q - P * r_P)
        kl = tl.where(lower, -ls + _c(_LOG_SQRT_2PI) - h_P - log_q + 0.5 * P * E_P - 0.5 * cross,
                      -ls - log_ndtr_P - log_q - T)
        kl = kl + tl.log(b - a) + _c(_KL_CONST)
        dP = tl.where(lower, 0.5 * r_P * (cross - E_P * E_P - V_P), r_P * (T - 0.5 * (1.0 + P * P)))
        dQ = 0.5 * r_Q * (1.0 + Q * Q - 2.0 * T)
        sign = tl.where(flip, -1.0, 1.0)
        dmu = tl.where((mu_raw > -20.0) & (mu_raw < 5.0), -sign * (dP + dQ) / sigma, 0.0)
        dls = tl.where((ls_raw > -20.0) & (ls_raw < 5.0), -1.0 - P * dP - Q * dQ, 0.0)
        tl.store(kl_ptr + offs, kl, mask=mask)
        # through float32: the interpreter's float64 → bfloat16 cast is wrong
        tl.store(dmu_ptr + offs, dmu.to(tl.float32).to(dmu_ptr.dtype.element_ty), mask=mask)
        tl.store(dls_ptr + offs, dls.to(tl.float32).to(dls_ptr.dtype.element_ty), mask=mask)
    if CONSTS:
        sign = tl.where(flip, -1.0, 1.0)
        cdf_P = 0.5 * (1.0 + tl.math.erf(P * _c(_SQRT_HALF)))
        sf_P = 0.5 * (1.0 + tl.math.erf(-P * _c(_SQRT_HALF)))
        tl.store(consts_ptr + offs, mu, mask=mask)
        tl.store(consts_ptr + n + offs, sign * sigma, mask=mask)
        tl.store(consts_ptr + 2 * n + offs, P, mask=mask)
        tl.store(consts_ptr + 3 * n + offs, Q, mask=mask)
        tl.store(consts_ptr + 4 * n + offs, eD, mask=mask)
        tl.store(consts_ptr + 5 * n + offs, q, mask=mask)
        tl.store(consts_ptr + 6 * n + offs, h_P - h_Q, mask=mask)
        tl.store(consts_ptr + 7 * n + offs, cdf_P, mask=mask)
        tl.store(consts_ptr + 8 * n + offs, sf_P, mask=mask)
        tl.store(consts_ptr + 9 * n + offs, tl.where(flip, a, b), mask=mask)
        tl.store(consts_ptr + 10 * n + offs, tl.where(flip, 1.0, 0.0), mask=mask)
        tl.store(consts_ptr + 11 * n + offs, tl.where((mu_raw > -20.0) & (mu_raw < 5.0), 1.0, 0.0), mask=mask)
        tl.store(consts_ptr + 12 * n + offs, tl.where((ls_raw > -20.0) & (ls_raw < 5.0), 1.0, 0.0), mask=mask)
        tl.store(consts_ptr + 13 * n + offs, tl.where(P < -5.0, 1.0, 0.0), mask=mask)


@triton.jit
def _rand(seed, offs, WIDE: tl.constexpr):
    """Uniforms [0, 1) at integer offsets: Philox (``tl.rand``); wide offsets as lrt's
    randn (lrt_sample.py): the high word, times an odd constant, goes into the key."""
    if WIDE:
        return tl.rand(seed + (offs >> 32) * 6364136223846793005, offs.to(tl.uint32))
    else:
        return tl.rand(seed, offs)


@triton.jit(do_not_specialize=["seed"])
def _noise_kernel(u_ptr, numel, seed, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    offs = flat_offsets(WIDE, BLOCK)
    tl.store(u_ptr + offs, _rand(seed, offs, WIDE), mask=offs < numel)


@triton.jit(do_not_specialize=["seed"])
def _sample_kernel(consts_ptr, theta_ptr, dmu_ptr, dls_ptr, numel, units, seed, A: tl.constexpr, B: tl.constexpr,
                   GRAD: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    offs = flat_offsets(WIDE, BLOCK)
    mask = offs < numel
    unit = offs % units
    mu = tl.load(consts_ptr + unit, mask=mask, other=0.0)
    ss = tl.load(consts_ptr + units + unit, mask=mask, other=1.0)
    P = tl.load(consts_ptr + 2 * units + unit, mask=mask, other=0.0)
    Q = tl.load(consts_ptr + 3 * units + unit, mask=mask, other=-1.0)
    eD = tl.load(consts_ptr + 4 * units + unit, mask=mask, other=0.0)
    q = tl.load(consts_ptr + 5 * units + unit, mask=mask, other=1.0)
    hPQ = tl.load(consts_ptr + 6 * units + unit, mask=mask, other=0.0)
    cdf_P = tl.load(consts_ptr + 7 * units + unit, mask=mask, other=0.5)
    sf_P = tl.load(consts_ptr + 8 * units + unit, mask=mask, other=0.5)
    pivot = tl.load(consts_ptr + 9 * units + unit, mask=mask, other=0.0)
    flip = tl.load(consts_ptr + 10 * units + unit, mask=mask, other=0.0) > 0.5
    tail = tl.load(consts_ptr + 13 * units + unit, mask=mask, other=0.0) > 0.5
    u = _rand(seed, offs, WIDE).to(tl.float64)
    u = tl.minimum(tl.maximum(u, _c(1e-5)), 1.0 - _c(1e-5))
    u1 = tl.where(flip, 1.0 - u, u)  # u in the mirrored frame
    v = tl.where(flip, u, 1.0 - u)
    w = u1 + v * eD
    # P ≥ −5: the inverse CDF
    p = cdf_P * w
    upper = p > 0.5
    z = _ndtri_lower(tl.where(upper, sf_P + cdf_P * v * q, p))
    xi = tl.where(upper, -z, z)
    x = mu + ss * xi
    # P < −5: Newton's method on the distance δ from the pivot
    y = tl.where(tail, -P, 5.0)
    L = tl.where(u1 < 0.5, -tl.log(w), -_log1p(-v * q))
    delta = 2.0 * L / (y + tl.sqrt(y * y + 2.0 * L))
    for _ in tl.static_range(2):
        dh, m_x = _log_mills_step(y, delta, 10)
        delta = delta - (delta * (y + 0.5 * delta) - L - dh) / m_x
    dh, m_x = _log_mills_step(y, delta, 10)
    x = tl.where(tail, pivot - ss * delta, x)
    x = tl.minimum(tl.maximum(x, _c(A)), _c(B))
    theta = tl.exp(x)
    tl.store(theta_ptr + offs, theta.to(tl.float32), mask=mask)
    if GRAD:
        gmu = tl.load(consts_ptr + 11 * units + unit, mask=mask, other=0.0)
        gls = tl.load(consts_ptr + 12 * units + unit, mask=mask, other=0.0)
        A = tl.exp(tl.log(v) + 0.5 * (xi - Q) * (xi + Q))
        B = tl.exp(tl.log(u1) + 0.5 * (xi - P) * (xi + P))
        A_t = v * eD / w * tl.exp(hPQ + dh)
        omB_t = (v * eD - u1 * _expm1(dh)) / w
        dx_mu = tl.where(tail, omB_t - A_t, 1.0 - A - B)
        dx_ls = tl.where(tail, -delta + P * omB_t - Q * A_t, xi - Q * A - P * B)
        tl.store(dmu_ptr + offs, (theta * dx_mu * gmu).to(tl.float32), mask=mask)
        tl.store(dls_ptr + offs, (theta * ss * dx_ls * gls).to(tl.float32), mask=mask)


def _check(mu, log_sigma, a, b):
    if mu.dim() != 1 or log_sigma.shape != mu.shape:
        raise ValueError(f"mu and log_sigma must be 1-D of one shape, got {tuple(mu.shape)} and {tuple(log_sigma.shape)}")
    if mu.dtype not in _SUPPORTED_DTYPES or log_sigma.dtype != mu.dtype:
        raise TypeError(f"SBP kernels support float32, float16 and bfloat16 parameters of one dtype, got "
                        f"{mu.dtype} and {log_sigma.dtype}")
    if mu.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError("Triton SBP kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if not (math.isfinite(a) and math.isfinite(b) and a < b):
        raise ValueError(f"bounds must be finite with a < b, got {a} and {b}")
    # one host synchronization; not while a CUDA graph is captured (it cannot sync), where
    # a NaN parameter gives NaN outputs instead
    capturing = mu.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not capturing and (bool(torch.isnan(mu).any()) or bool(torch.isnan(log_sigma).any())):
        raise ValueError("mu or log_sigma contains NaN")
    return mu.contiguous(), log_sigma.contiguous()


def _units(mu, log_sigma, a, b, kl):
    """Launch _unit_kernel: (per-unit KL float64, ∂μ, ∂log σ) with ``kl``, else the
    sampler's constants [14, units] float64."""
    n = mu.numel()
    grid = (triton.cdiv(max(n, 1), _BLOCK),)
    if kl:
        per_unit = torch.empty(n, dtype=torch.float64, device=mu.device)
        dmu, dls = torch.empty_like(mu), torch.empty_like(log_sigma)
        if n:
            _unit_kernel[grid](mu, log_sigma, per_unit, dmu, dls, per_unit, n, A=float(a), B=float(b), KL=True,
                               CONSTS=False, BLOCK=_BLOCK)
        return per_unit, dmu, dls
    consts = torch.empty(_CONSTS, n, dtype=torch.float64, device=mu.device)
    if n:
        _unit_kernel[grid](mu, log_sigma, consts, mu, log_sigma, consts, n, A=float(a), B=float(b), KL=False,
                           CONSTS=True, BLOCK=_BLOCK)
    return consts


def sbp_kl(mu, log_sigma, a, b):
    """(Σ KL float32, ∂KL/∂μ, ∂KL/∂log σ in the parameters' dtype); the sum in a fixed order."""
    mu, log_sigma = _check(mu, log_sigma, a, b)
    per_unit, dmu, dls = _units(mu, log_sigma, a, b, kl=True)
    return per_unit.sum().to(torch.float32), dmu, dls


def _seed(seed):
    return int(seed) % (1 << 63)


def sbp_noise(units, batch, seed, device):
    """The float32 uniforms [batch, units] of ``sbp_sample``: Philox at the flat index."""
    u = torch.empty(batch, units, dtype=torch.float32, device=device)
    numel = u.numel()
    if numel:
        _noise_kernel[(triton.cdiv(numel, 1024),)](u, numel, _seed(seed), WIDE=numel - 1 > _INT32_MAX, BLOCK=1024)
    return u


def sbp_sample(mu, log_sigma, seed, batch, a, b, with_grad):
    """(θ, ∂θ/∂μ, ∂θ/∂log σ) float32 [batch, units] (the last two empty without ``with_grad``)."""
    mu, log_sigma = _check(mu, log_sigma, a, b)
    units = mu.numel()
    theta = torch.empty(batch, units, dtype=torch.float32, device=mu.device)
    grads = (batch, units) if with_grad else (0,)
    dmu, dls = theta.new_empty(grads), theta.new_empty(grads)
    numel = theta.numel()
    if numel:
        consts = _units(mu, log_sigma, a, b, kl=False)
        _sample_kernel[(triton.cdiv(numel, _BLOCK),)](
            consts, theta, dmu if with_grad else theta, dls if with_grad else theta, numel, units, _seed(seed),
            A=float(a), B=float(b), GRAD=with_grad, WIDE=numel - 1 > _INT32_MAX, BLOCK=_BLOCK,
        )  # fmt: skip
    return theta, dmu, dls
