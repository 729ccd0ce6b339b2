"""The math of Sparse Variational Dropout, once, in plain PyTorch.

This module is the specification: every kernel in the package is tested against
these functions, and they are the implementation wherever no faster kernel exists.
Shapes follow ``torch.nn.functional.linear``: ``x`` is ``[*, K]``, ``weight`` (θ)
and ``log_sigma2`` (log σ²) are ``[N, K]``, ``bias`` is ``[N]``.

Posterior per weight: q(w) = N(θ, σ²); prior: log-uniform p(|w|) ∝ 1/|w|
(Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural
Networks", ICML 2017, with the additive noise reparameterization).
"""

from __future__ import annotations

import math as _math

import torch

#: Constants of Molchanov et al.'s fit of −KL(q‖p) as a function of log α.
K1, K2, K3 = 0.63576, 1.87320, 1.48695
#: Default clamp of log α and default pruning threshold (the paper's values).
LOG_ALPHA_RANGE = (-10.0, 10.0)
THRESHOLD = 3.0
#: Default initial log σ² of a SparseVD layer (the authors' recipe): a new or converted
#: layer starts almost deterministic, pruning only weights with |θ| < exp((−10 − 3)/2) ≈ 1.5e-3.
LOG_SIGMA2_INIT = -10.0
#: Added to θ² inside the log and to the variance inside the sqrt, as in the paper.
EPS = 1e-8


def log_alpha(weight, log_sigma2, log_alpha_range=LOG_ALPHA_RANGE):
    """log α = clamp(log σ² − log(θ² + 1e-8), lo, hi), elementwise.

    α = σ²/θ² is the weight's dropout rate in Gaussian-dropout terms; α → ∞ means
    the posterior is dominated by noise and the weight can be set to zero.
    """
    lo, hi = log_alpha_range
    return torch.clamp(log_sigma2 - torch.log(weight * weight + EPS), lo, hi)


def kl_from_log_alpha(la):
    """KL(q‖p) per weight from log α (Molchanov et al.'s fit, error ≲ 0.01 nats):

        −KL ≈ k1·sigmoid(k2 + k3·log α) − ½·log1p(exp(−log α)) − k1

    with k1 = 0.63576, k2 = 1.87320, k3 = 1.48695. KL ≥ 0 and KL → 0 as α → ∞.
    """
    neg_kl = K1 * torch.sigmoid(K2 + K3 * la) - 0.5 * torch.nn.functional.softplus(-la) - K1
    return -neg_kl


def kl_divergence(weight, log_sigma2, log_alpha_range=LOG_ALPHA_RANGE):
    """Σ_ij KL(q(w_ij) ‖ p(w_ij)) as a 0-dim float32 tensor (float64 for float64 input).

    Half-precision parameters are upcast so the sum over millions of weights keeps
    its digits.
    """
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    la = log_alpha(weight.to(acc), log_sigma2.to(acc), log_alpha_range)
    return kl_from_log_alpha(la).sum()


def kl_divergence_grad(weight, log_sigma2, log_alpha_range=LOG_ALPHA_RANGE):
    """(∂/∂θ, ∂/∂log σ²) of :func:`kl_divergence`, in the parameters' dtype: what autograd of
    it gives, written out (kernels below autograd cannot differentiate). With t = k2 + k3·la,

        ∂KL/∂la = −k1·k3·sigmoid(t)·(1 − sigmoid(t)) − ½·sigmoid(−la)

    zero where the clamp holds log α at a bound (at the bounds themselves too, as
    torch.clamp's backward with number bounds),
    ∂la/∂log σ² = 1 and ∂la/∂θ = −2θ / (θ² + 1e-8).
    """
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w, s = weight.to(acc), log_sigma2.to(acc)
    lo, hi = log_alpha_range
    raw = s - torch.log(w * w + EPS)
    la = torch.clamp(raw, lo, hi)
    t = torch.sigmoid(K2 + K3 * la)
    dla = -K1 * K3 * t * (1 - t) - 0.5 * torch.sigmoid(-la)
    dla = torch.where((raw > lo) & (raw < hi), dla, 0.0)
    return (dla * (-2 * w / (w * w + EPS))).to(weight.dtype), dla.to(log_sigma2.dtype)


def keep_by_log_alpha(la, threshold=THRESHOLD):
    """The SparseVD pruning rule: a weight (or the weights sharing a log α) is kept when
    log α < threshold."""
    return la < threshold


def prune_mask(weight, log_sigma2, threshold=THRESHOLD, log_alpha_range=LOG_ALPHA_RANGE):
    """Boolean mask of the weights to keep: log α < threshold."""
    return keep_by_log_alpha(log_alpha(weight, log_sigma2, log_alpha_range), threshold)


def lrt_std(x, log_sigma2):
    """s = sqrt((x ⊙ x) · exp(log σ²)ᵀ + 1e-8): the std of each pre-activation."""
    return torch.sqrt(torch.nn.functional.linear(x * x, torch.exp(log_sigma2)) + EPS)


def lrt_linear(x, weight, log_sigma2, bias, noise):
    """Local reparameterization trick for a linear layer with a given noise ``z``:

        μ = x θᵀ + b            (the bias enters the mean only)
        s = sqrt((x ⊙ x) exp(log σ²)ᵀ + 1e-8)
        y = μ + s ⊙ z,          z ~ N(0, 1) of shape [*, N]

    Sampling the pre-activation instead of the weights gives each example its own
    weight noise at the cost of a second GEMM, and lowers the gradient variance.
    Its gradients (what autograd of this function gives, and what the fused kernels
    compute directly), with g = ∂L/∂y and h = g ⊙ z / (2s):

        ∂θ = gᵀ x,  ∂log σ² = (hᵀ (x ⊙ x)) ⊙ exp(log σ²),  ∂b = Σ_rows g,
        ∂x = g θ + 2x ⊙ (h exp(log σ²))
    """
    mu = torch.nn.functional.linear(x, weight, bias)
    return mu + lrt_std(x, log_sigma2) * noise


def lrt_sample(mean, var, noise):
    """The sampling step of the LRT for any layer whose pre-activations are Gaussian:

        y = mean + sqrt(var + 1e-8) ⊙ z,   z ~ N(0, 1) of mean's shape

    (``lrt_linear`` is this with mean = x θᵀ + b and var = (x ⊙ x) exp(log σ²)ᵀ; a
    convolution uses conv(x, θ) + b and conv(x ⊙ x, exp(log σ²))). With g = ∂L/∂y:
    ∂mean = g and ∂var = g ⊙ z / (2 sqrt(var + 1e-8)).
    """
    return mean + torch.sqrt(var + EPS) * noise


def masked_linear(x, weight, mask, bias):
    """The deterministic evaluation-mode layer: y = x (θ ⊙ mask)ᵀ + b."""
    return torch.nn.functional.linear(x, weight * mask, bias)


def embedding_sample(indices, weight, log_sigma2, noise, padding_idx=None):
    """The training lookup of a SparseVD embedding (``weight``, ``log_sigma2``: [V, D]).

    A lookup reads one row per position, so sampling the looked-up weights IS the local
    reparameterization (each position gets its own independent draw, as each example does
    in the LRT of a linear layer):

        y[p] = θ[i_p] + sqrt(exp(log σ²[i_p]) + 1e-8) ⊙ z[p],   z ~ N(0, 1) of shape [*indices.shape, D]

    A position that looks up ``padding_idx`` gets θ[padding_idx] exactly, without noise
    (``nn.Embedding``'s padding row is a constant), and no gradient reaches that row. With
    g = ∂L/∂y, the gradients of the other rows are summed over the positions p reading them:

        ∂θ[i] = Σ_p g[p],   ∂log σ²[i] = Σ_p g[p] ⊙ z[p] ⊙ σ²[i] / (2 sqrt(σ²[i] + 1e-8))
    """
    embed = torch.nn.functional.embedding
    mean = embed(indices, weight, padding_idx)
    y = lrt_sample(mean, embed(indices, log_sigma2, padding_idx).exp(), noise)
    if padding_idx is not None:
        y = torch.where((indices == padding_idx).unsqueeze(-1), mean, y)
    return y


def masked_embedding(indices, weight, mask, padding_idx=None):
    """The deterministic evaluation-mode lookup: (θ ⊙ mask)[indices]."""
    return torch.nn.functional.embedding(indices, weight * mask, padding_idx)


def csr_structure_error(crow_indices, col_indices, shape):
    """Why ``(crow_indices, col_indices)`` is not a valid CSR structure of a ``shape =
    (rows, cols)`` matrix, or None if it is. The one definition of a valid structure:

    - ``crow_indices`` has rows + 1 entries, starts at 0, is non-decreasing and ends at
      nnz = ``col_indices.numel()``;
    - the column indices of each row are in [0, cols) and strictly increasing (sorted,
      no duplicates), so that every entry of the matrix is stored at most once.

    Everything that builds or loads a CSR weight (``SparseLinear``, ``SparseConv*``,
    ``functional.csr_linear``) refuses any other structure (``functional.validate_csr``).
    The raw ops (``torch.ops.sparsevd.csr_linear``, ``linear_chain``) check every index
    they read but not the order of a row's columns: given unsorted or repeated columns,
    they compute what :func:`csr_to_dense` builds (repeated entries summed), on every device.
    """
    rows, cols = shape
    if crow_indices.numel() != rows + 1:
        return f"crow_indices must have rows + 1 = {rows + 1} entries, got {crow_indices.numel()}"
    nnz = col_indices.numel()
    if int(crow_indices[0]) != 0 or int(crow_indices[-1]) != nnz:
        return f"crow_indices must start at 0 and end at nnz = {nnz}"
    if rows and bool((crow_indices[1:] < crow_indices[:-1]).any()):
        return "crow_indices must be non-decreasing"
    if nnz:
        if bool((col_indices < 0).any()) or bool((col_indices >= cols).any()):
            return f"col_indices out of range [0, {cols})"
        # col_indices[j] starts a row for every j in crow_indices (j < nnz)
        starts = torch.zeros(nnz, dtype=torch.bool, device=col_indices.device)
        starts[crow_indices[:-1][crow_indices[:-1] < nnz].long()] = True
        if bool(((col_indices[1:] <= col_indices[:-1]) & ~starts[1:]).any()):
            return "col_indices must be strictly increasing within each row (sorted, no duplicates)"
    return None


def row_order_error(row_order, rows):
    """Why ``row_order`` is not a valid schedule of a CSR matrix's ``rows`` rows (a
    permutation of 0 .. rows - 1), or None. A schedule only orders the work: every row is
    computed once whatever it is. The raw csr_linear op checks its shape, dtype and device
    per call but not that it is a permutation (an O(rows) pass); the callers that check
    the structure check this too, and ``SparseLinear`` derives it from the structure."""
    if row_order.numel() != rows or not torch.equal(
        torch.sort(row_order.long()).values, torch.arange(rows, device=row_order.device)
    ):
        return f"row_order must be a permutation of the {rows} rows"
    return None


def csr_to_dense(crow_indices, col_indices, values, in_features):
    """The dense [N, K] matrix of a CSR matrix whose rows are output features. A valid
    structure (:func:`csr_structure_error`) stores each entry once; repeated entries of
    one that is not are summed, as the kernels sum them."""
    rows = crow_indices.numel() - 1
    counts = crow_indices[1:] - crow_indices[:-1]
    row_of = torch.repeat_interleave(torch.arange(rows, device=values.device), counts.long())
    dense = values.new_zeros(rows, in_features)
    return dense.index_put_((row_of, col_indices.long()), values, accumulate=True)


def csr_linear(x, crow_indices, col_indices, values, bias=None):
    """y = x W_csrᵀ + b for W [N, K] stored in CSR with rows = output features.

    Fast kernels compute it as the SpMM yᵀ = W_csr · xᵀ, so each non-zero reads one
    contiguous row of xᵀ.
    """
    dense = csr_to_dense(crow_indices, col_indices, values, x.shape[-1])
    return torch.nn.functional.linear(x, dense, bias)


#: The elementwise activations of :func:`linear_chain`, by code (the op takes the index):
#: the names of the extension's table (csrc/activations.h) in its order, written here too
#: so that the package runs without the extension; the tests check that the two agree.
ACTIVATIONS = ("identity", "relu", "leaky_relu", "relu6", "elu", "tanh", "sigmoid", "gelu", "gelu_tanh", "silu")
#: name -> code, for callers that pick an activation by name.
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


def activation(x, code, param=0.0):
    """Activation ``ACTIVATIONS[code]`` as torch's nn modules compute it; ``param`` is
    leaky_relu's negative slope or elu's alpha (ignored by the others)."""
    F = torch.nn.functional
    name = ACTIVATIONS[code]
    if name == "identity":
        return x
    if name == "leaky_relu":
        return F.leaky_relu(x, param)
    if name == "elu":
        return F.elu(x, param)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return {"relu": F.relu, "relu6": F.relu6, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu}[name](x)


def linear_chain(x, weights, crow_indices, col_indices, biases, activations, activation_params):
    """A chain of linear layers with an activation after each: for layer i,
    x = activation(x Wᵢᵀ + bᵢ, activations[i], activation_params[i]). Wᵢ is dense
    (``weights[i]`` [Nᵢ, Kᵢ]) when ``crow_indices[i]`` is None, else CSR with values
    ``weights[i]``; ``biases[i]`` may be None."""
    for w, crow, col, b, code, param in zip(weights, crow_indices, col_indices, biases, activations, activation_params):
        x = torch.nn.functional.linear(x, w, b) if crow is None else csr_linear(x, crow, col, w, b)
        x = activation(x, code, param)
    return x


def _conv(weight):
    # a weight [out, in / groups, *kernel] says which N-d convolution it belongs to
    return {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}[weight.dim()]


def lrt_conv(x, weight, log_sigma2, bias, noise, stride=1, padding=0, dilation=1, groups=1):
    """Local reparameterization trick for a convolution (1-, 2- or 3-d, by ``weight.dim()``):

        μ = conv(x, θ) + b,   v = conv(x ⊙ x, exp(log σ²)),   y = μ + sqrt(v + 1e-8) ⊙ z

    with ``z`` of the output's shape. Each output position is a sum over its receptive
    field of independent Gaussian weights times inputs, so it is Gaussian with exactly
    this mean and variance (see :func:`sample_conv`). The positions of one example share
    weights, so their true joint is correlated; sampling them independently keeps every
    marginal exact, drops those correlations, and lowers the gradient variance.
    """
    conv = _conv(weight)
    mean = conv(x, weight, bias, stride, padding, dilation, groups)
    var = conv(x * x, torch.exp(log_sigma2), None, stride, padding, dilation, groups)
    return lrt_sample(mean, var, noise)


def sample_conv(x, weight, log_sigma2, bias, stride=1, padding=0, dilation=1, groups=1, generator=None):
    """conv(x_n, W_n) + b with one draw W_n ~ N(θ, σ²) per example: what :func:`lrt_conv`
    is equivalent to in distribution, per output position."""
    batch, channels = x.shape[:2]
    noise = torch.randn((batch, *weight.shape), generator=generator, dtype=weight.dtype, device=weight.device)
    weights = weight + torch.exp(0.5 * log_sigma2) * noise
    # every example is its own group of a grouped convolution with its own weights
    y = _conv(weight)(
        x.reshape(1, batch * channels, *x.shape[2:]), weights.reshape(-1, *weight.shape[1:]), None,
        stride, padding, dilation, groups * batch,
    )
    y = y.reshape(batch, weight.shape[0], *y.shape[2:])
    return y if bias is None else y + bias.reshape(-1, *(1,) * (weight.dim() - 2))


# =====================================================================================
# Structured Bayesian Pruning (SBP): log-normal multiplicative noise per unit
# (Neklyudov, Molchanov, Ashukha, Vetrov, "Structured Bayesian Pruning via Log-Normal
# Multiplicative Noise", NeurIPS 2017).
#
# Each unit (neuron, channel) i multiplies its output by θᵢ = exp(xᵢ), xᵢ = log θᵢ ~
# N(μᵢ, σᵢ²) truncated to [a, b] (default [−20, 0]); the prior is uniform on log θ over
# the same range. With α = (a − μ)/σ, β = (b − μ)/σ, Z = Φ(β) − Φ(α):
#
#     KL(q‖p) = −log σ − log Z − (α φ(α) − β φ(β)) / (2Z) + log(b − a) − ½ log(2πe)
#     E[θᵏ]   = exp(kμ + k²σ²/2) · (Φ(β − kσ) − Φ(α − kσ)) / Z
#     SNR     = E[θ] / sqrt(E[θ²] − E[θ]²),   a unit is kept when SNR > threshold (1)
#
# Over the clip range μ, log σ ∈ [−20, 5], |α| and |β| reach ~1e10 and Z underflows any
# float, so nothing here is computed as written. Every quantity is taken in the frame
# mirrored so that the mass sits at the upper end: (Q, P) = (α, β), or (−β, −α) when
# α + β > 0 (KL and variances do not change under the mirror). The "pivot" P is the end
# the mass is nearest, at the bound c (b, or a when mirrored). Below 0, Φ(P) is
# φ(P)·R(P) with the Mills ratio R = Φ/φ = sqrt(π/2)·erfcx(−P/√2) (never under- or
# overflows), so the −P²/2 of log Φ(P) cancels analytically against the −P²/2 of the
# other terms instead of numerically. The per-unit math runs in float64 whatever the
# parameters' dtype (it is [num_features]-sized); the per-example sampling runs in
# float32 (float64 for float64 parameters).
# =====================================================================================

#: Default truncation range [a, b] of log θ, clip range of μ and log σ, the clip of the
#: sampler's uniforms, and the pruning threshold on the SNR (the authors' values).
SBP_BOUNDS = (-20.0, 0.0)
SBP_PARAM_RANGE = (-20.0, 5.0)
SBP_U_CLIP = 1e-5
SBP_THRESHOLD = 1.0

_LOG_SQRT_2PI = 0.5 * _math.log(2 * _math.pi)
_LOG_SQRT_HALF_PI = 0.5 * _math.log(_math.pi / 2)
_SQRT_HALF = _math.sqrt(0.5)
#: Below −_TAIL the gap E(x) = x + φ(x)/Φ(x) and V(x) = 1 − (φ/Φ)·E come from a continued
#: fraction (x + φ/Φ cancels there); the sampler switches from ndtri to Newton's method.
_TAIL = 5.0
#: Depth of the continued fraction: double precision for x ≤ −5 (measured against mpmath:
#: 26 terms reach 1e-16 at x = −5, fewer further out).
_CF_DEPTH = 28
#: Newton steps of the tail sampler from its quadratic start (measured: 2 reach float32,
#: 3 reach float64 rounding for x ≤ −5 and u ∈ [1e-5, 1 − 1e-5]).
_NEWTON_STEPS = {torch.float32: 2, torch.float64: 3}
#: Below this Var[θ]/E[θ]² (SNR above ~3e4) the SNR is the delta-method σ²·Var(ξ): the
#: exact log E[θ²] − 2 log E[θ] is then a difference of rounding errors.
_DELTA_METHOD_BELOW = 1e-9


def sbp_check_bounds(bounds):
    """(a, b) as floats, checked finite with a < b."""
    try:
        a, b = (float(v) for v in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be two numbers (a, b) with a < b, got {bounds!r}") from None
    if not (_math.isfinite(a) and _math.isfinite(b) and a < b):
        raise ValueError(f"bounds must be two finite numbers a < b, got {bounds!r}")
    return a, b


def sbp_clip(mu, log_sigma):
    """μ and log σ clamped to [−20, 5], as the authors clip them (no gradient outside)."""
    lo, hi = SBP_PARAM_RANGE
    return torch.clamp(mu, lo, hi), torch.clamp(log_sigma, lo, hi)


def _log_mills(x):
    """log R(x) = log(Φ(x)/φ(x)) for x ≤ 0 (float64), through erfcx (no under/overflow)."""
    return _LOG_SQRT_HALF_PI + torch.log(torch.special.erfcx(-x * _SQRT_HALF))


def _log1mexp(d):
    """log(1 − exp(d)) for d < 0, accurate near 0 and far below it."""
    return torch.where(d > -_math.log(2), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def _gap(x, m):
    """(E, V) at x with m = φ(x)/Φ(x): E = x + m (the gap between x and the mean of a
    standard normal truncated to (−∞, x]) and V = 1 − m·E (its variance). Below −5 both
    come from Laplace's continued fraction m = y + 1/(y + 2/(y + 3/(y + …))), y = −x,
    whose tail 1/(y + 2/(…)) is E itself, without the cancellation of x + m."""
    y = torch.clamp(-x, min=_TAIL)
    d = y
    d2 = y
    for k in range(_CF_DEPTH, 0, -1):
        d2, d = d, y + (k + 1) / d  # after the loop: d = D₁, d2 = D₂
    e_cf = 1 / d
    v_cf = e_cf * (2 / d2 - e_cf)
    e = x + m
    tail = x < -_TAIL
    return torch.where(tail, e_cf, e), torch.where(tail, v_cf, 1 - m * e)


def _log_mills_step(y, delta):
    """(h(−y − δ) − h(−y), φ/Φ at −y − δ) for y ≥ 5, δ ≥ 0 (h = log R = −log(φ/Φ)), from
    Laplace's continued fraction m(−y) = y + 1/D₁(y), D_k(y) = y + (k + 1)/D_{k+1}(y), run at
    y and y + δ together with the recursion of their difference (D_k(y + δ) − D_k(y) =
    δ − (k + 1)(D_{k+1}(y + δ) − D_{k+1}(y))/(D_{k+1}(y + δ) D_{k+1}(y))), so that h's
    change stays accurate however small δ is (two separately rounded h would not)."""
    yx = y + delta
    dp, dx, dd = y, yx, delta
    for k in range(_CF_DEPTH, 0, -1):
        dp, dx, dd = y + (k + 1) / dp, yx + (k + 1) / dx, delta - (k + 1) * dd / (dx * dp)
    m_p, m_x = y + 1 / dp, yx + 1 / dx
    return -torch.log1p((delta - dd / (dx * dp)) / m_p), m_x


class _Frame:
    """The standard normal truncated to [α, β], mirrored so its mass is at the upper end P
    (see the section comment): float64 quantities of the shape of α."""

    def __init__(self, alpha, beta):
        self.alpha, self.beta = alpha, beta
        self.flip = alpha + beta > 0
        P = torch.where(self.flip, -alpha, beta)
        Q = torch.where(self.flip, -beta, alpha)  # Q < 0 and Q < P always
        self.P, self.Q = P, Q
        lower = P <= 0
        self.lower = lower
        Pn, Pp = torch.clamp(P, max=0.0), torch.clamp(P, min=0.0)
        # log Φ(P) = −P²/2 − log√(2π) + h(P) below 0 (h = log R); log_ndtr above
        self.h_P = _log_mills(Pn)
        self.h_Q = _log_mills(Q)
        log_ndtr_P = torch.special.log_ndtr(Pp)
        self.log_ndtr_P = log_ndtr_P
        self.m_P = torch.where(lower, torch.exp(-self.h_P), torch.exp(-0.5 * Pp * Pp - _LOG_SQRT_2PI - log_ndtr_P))
        self.m_Q = torch.exp(-self.h_Q)
        # D = log Φ(Q) − log Φ(P) with the squares as one product
        self.D = torch.where(
            lower,
            -0.5 * (Q - P) * (Q + P) + self.h_Q - self.h_P,
            -0.5 * Q * Q - _LOG_SQRT_2PI + self.h_Q - log_ndtr_P,
        )
        self.eD = torch.exp(self.D)
        self.q = -torch.expm1(self.D)  # Z / Φ(P)
        self.log_q = _log1mexp(self.D)
        # log Z = −[P ≤ 0]·P²/2 + rest: the square is kept apart for the moments
        self.rest = torch.where(lower, self.h_P - _LOG_SQRT_2PI, log_ndtr_P) + self.log_q
        self.r_P = self.m_P / self.q  # φ(P)/Z
        self.r_Q = self.m_Q * self.eD / self.q  # φ(Q)/Z

    @property
    def gap(self):
        """(E_P, V_P) of :func:`_gap`."""
        return _gap(self.P, self.m_P)


def _unit_frame(mu, log_sigma, bounds):
    """The :class:`_Frame` of each unit's log θ, with the clipped μ, log σ, σ, the mirror's
    sign s (−1 when mirrored) and the pivot bound c (b, or a when mirrored)."""
    a, b = bounds
    mu, log_sigma = sbp_clip(mu.double(), log_sigma.double())
    sigma = torch.exp(log_sigma)
    f = _Frame((a - mu) / sigma, (b - mu) / sigma)
    f.mu, f.log_sigma, f.sigma = mu, log_sigma, sigma
    f.sign = torch.where(f.flip, -1.0, 1.0).double()
    f.pivot_bound = torch.full_like(mu, b).masked_fill_(f.flip, a)
    return f


def _kl_terms(f, log_width):
    """KL per unit and (∂KL/∂P, ∂KL/∂Q) in the mirrored frame (KL is mirror-symmetric)."""
    P, Q, q, eD = f.P, f.Q, f.q, f.eD
    E_P, V_P = f.gap
    # T = (Q φ(Q) − P φ(P)) / (2Z); below 0 the P²/2 inside −P φ(P)/(2Z) is taken out
    # analytically with P·m_P = P·E_P − P².
    cross = (Q * f.m_Q - P * f.m_P) * eD / q
    T = 0.5 * (Q * f.r_Q - P * f.r_P)
    const = log_width - 0.5 * _math.log(2 * _math.pi * _math.e)
    kl_lower = -f.log_sigma + _LOG_SQRT_2PI - f.h_P - f.log_q + 0.5 * P * E_P - 0.5 * cross
    kl_upper = -f.log_sigma - f.log_ndtr_P - f.log_q - T
    kl = torch.where(f.lower, kl_lower, kl_upper) + const
    # ∂KL/∂P = r_P (T − (1 + P²)/2); below 0, T − (1 + P²)/2 = (cross − E_P² − V_P)/2
    dP = torch.where(f.lower, 0.5 * f.r_P * (cross - E_P * E_P - V_P), f.r_P * (T - 0.5 * (1 + P * P)))
    dQ = 0.5 * f.r_Q * (1 + Q * Q - 2 * T)
    return kl, dP, dQ


def _in_range(x):
    lo, hi = SBP_PARAM_RANGE
    return (x > lo) & (x < hi)  # torch.clamp's backward: 0 at the bounds themselves


def sbp_kl_per_unit(mu, log_sigma, bounds=SBP_BOUNDS):
    """KL(q(θᵢ) ‖ p(θᵢ)) per unit, float64, for the clipped μ and log σ."""
    a, b = bounds
    kl, _, _ = _kl_terms(_unit_frame(mu, log_sigma, bounds), _math.log(b - a))
    return kl


def sbp_kl(mu, log_sigma, bounds=SBP_BOUNDS):
    """Σᵢ KL over the units: a 0-dim float32 tensor (float64 for float64 parameters)."""
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    return sbp_kl_per_unit(mu, log_sigma, bounds).sum().to(acc)


def sbp_kl_with_grad(mu, log_sigma, bounds=SBP_BOUNDS):
    """(:func:`sbp_kl`, ∂/∂μ, ∂/∂log σ), the gradients in the parameters' dtype and written
    out (autograd through erfcx and log_ndtr loses every digit in the far tails). With
    ∂KL/∂P and ∂KL/∂Q in the mirrored frame (sign s = −1 when mirrored):

        ∂KL/∂μ = −s (∂KL/∂P + ∂KL/∂Q) / σ,   ∂KL/∂log σ = −1 − P ∂KL/∂P − Q ∂KL/∂Q,

    0 where the clip of μ or log σ is active (torch.clamp's backward)."""
    a, b = bounds
    f = _unit_frame(mu, log_sigma, bounds)
    kl, dP, dQ = _kl_terms(f, _math.log(b - a))
    dmu = -f.sign * (dP + dQ) / f.sigma
    dls = -1 - f.P * dP - f.Q * dQ
    dmu = torch.where(_in_range(mu.double()), dmu, 0.0)
    dls = torch.where(_in_range(log_sigma.double()), dls, 0.0)
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    return kl.sum().to(acc), dmu.to(mu.dtype), dls.to(log_sigma.dtype)


def _log_moment(f, k, bounds):
    """log E[θᵏ] = kμ + k²σ²/2 + log Z(α − kσ, β − kσ) − log Z(α, β), float64.

    Both log Z carry a square (P²/2 of their own pivot) that is huge in the tails; the
    sum of the squares and kμ + k²σ²/2 is taken in closed form: with the same pivot bound
    it is k·c exactly (μ + σβ = b, μ + σα = a); when the shift moves the pivot from a to b
    it is k·b + (α − β)(α + β)/2."""
    a, b = bounds
    g = _Frame(f.alpha - k * f.sigma, f.beta - k * f.sigma)
    # which square each log Z holds: 1 = β's (pivot b, below 0), 2 = α's (pivot a), 0 = none
    src0 = torch.where(f.lower, torch.where(f.flip, 2, 1), 0)
    srck = torch.where(g.lower, torch.where(g.flip, 2, 1), 0)
    alpha, beta, mu, sigma = f.alpha, f.beta, f.mu, f.sigma
    lin = torch.where(srck == 1, k * b - 0.5 * beta ** 2,
                      torch.where(srck == 2, k * a - 0.5 * alpha ** 2, k * mu + 0.5 * k * k * sigma ** 2))
    generic = lin + torch.where(src0 == 1, 0.5 * beta ** 2, torch.where(src0 == 2, 0.5 * alpha ** 2, 0.0))
    big = torch.where((srck == 1) & (src0 == 1), float(k * b),
                      torch.where((srck == 2) & (src0 == 2), float(k * a),
                                  torch.where((srck == 1) & (src0 == 2),
                                              k * b + 0.5 * (alpha - beta) * (alpha + beta), generic)))
    return big + g.rest - f.rest


def _var_xi(f):
    """Var of the standard normal truncated to [Q, P]: 1 + Q r_Q − P r_P − (r_Q − r_P)²,
    with its one-sided part V_P from :func:`_gap` (the rest carries a factor e^D)."""
    P, Q, q, eD, m_P = f.P, f.Q, f.q, f.eD, f.m_P
    return (f.gap[1] - eD * (P * m_P / q + m_P * m_P * (1 + q) / (q * q))
            + Q * f.r_Q - f.r_Q ** 2 + 2 * f.r_P * f.r_Q)


def sbp_moments(mu, log_sigma, bounds=SBP_BOUNDS):
    """(E[θ], SNR) per unit, float64: E[θ] = exp(log E[θ]) and SNR = E[θ]/sd(θ) =
    1/sqrt(expm1(log E[θ²] − 2 log E[θ])) (the delta method σ²·Var(ξ) for the
    log-ratio below 1e-9)."""
    f = _unit_frame(mu, log_sigma, bounds)
    log_m1 = _log_moment(f, 1, bounds)
    log_m2 = _log_moment(f, 2, bounds)
    k2 = log_m2 - 2 * log_m1
    delta = f.sigma ** 2 * torch.clamp(_var_xi(f), min=0.0)
    k2 = torch.where(delta < _DELTA_METHOD_BELOW, delta, k2)
    # a point mass at the float64 resolution: an SNR of 1e150 instead of inf
    snr = torch.rsqrt(torch.expm1(torch.clamp(k2, min=1e-300)))
    return torch.exp(log_m1), snr


def sbp_mean(mu, log_sigma, bounds=SBP_BOUNDS):
    """E[θ] per unit, float64."""
    return sbp_moments(mu, log_sigma, bounds)[0]


def sbp_snr(mu, log_sigma, bounds=SBP_BOUNDS):
    """E[θ] / sd(θ) per unit, float64."""
    return sbp_moments(mu, log_sigma, bounds)[1]


def keep_by_snr(snr, threshold=SBP_THRESHOLD):
    """The SBP pruning rule: a unit is kept when SNR = E[θ]/sd(θ) > threshold."""
    return snr > threshold


def sbp_mask(mu, log_sigma, threshold=SBP_THRESHOLD, bounds=SBP_BOUNDS):
    """Units to keep: SNR > threshold."""
    return keep_by_snr(sbp_snr(mu, log_sigma, bounds), threshold)


def sbp_eval_scale(mu, log_sigma, threshold=SBP_THRESHOLD, bounds=SBP_BOUNDS, mask=None):
    """What eval mode multiplies each unit by: E[θ]·mask, float64; ``mask`` (a fixed one,
    for fine-tuning) replaces the SNR rule."""
    mean, snr = sbp_moments(mu, log_sigma, bounds)
    return torch.where(keep_by_snr(snr, threshold) if mask is None else mask, mean, 0.0)


def sbp_sample(mu, log_sigma, u, bounds=SBP_BOUNDS, with_grad=False):
    """θ = exp(x), x the inverse CDF at u of N(μ, σ²) truncated to [a, b], for uniforms
    ``u`` of shape [batch, units] (one θ per example and unit); u is clipped to
    [1e-5, 1 − 1e-5] as by the authors. Returns θ and, with ``with_grad``, ∂θ/∂μ and
    ∂θ/∂log σ per element (else None), all in float32 (float64 for float64 μ).

    In the mirrored frame (u → 1 − u when mirrored) ξ solves Φ(ξ) = Φ(Q) + u (Φ(P) − Φ(Q))
    = Φ(P)·w with w = u + (1 − u) e^D, and x = μ + sσξ. Then with A = (1 − u) φ(Q)/φ(ξ),
    B = u φ(P)/φ(ξ) (implicit differentiation):

        ∂x/∂μ = 1 − A − B,   ∂x/∂log σ = sσ (ξ − Q·A − P·B).

    For P ≥ −5, ξ = ndtri(Φ(P)·w) (from the complement above ½). For P < −5 the mass
    hugs the bound and Φ(P) underflows: the distance δ = P − ξ solves
    δ(−P + δ/2) = −log w + h(ξ) − h(P) (h = log R), by Newton's method from the root of
    its quadratic part, and x = c − sσδ; B = (u/w)·R(ξ)/R(P), A = ((1 − u)e^D/w)·R(ξ)/R(Q).
    The derivatives are accurate to rounding relative to θ (and σ·max(|P|, 5)·θ for
    ∂θ/∂log σ), not relative to their own size where they vanish.
    """
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    f = _unit_frame(mu, log_sigma, bounds)
    c = lambda t: t.to(acc)  # noqa: E731  (per-unit constants, broadcast over the batch)
    P, Q, eD, q, sign, sigma = c(f.P), c(f.Q), c(f.eD), c(f.q), c(f.sign), c(f.sigma)
    h_P, h_Q = c(f.h_P), c(f.h_Q)
    u = torch.clamp(u.to(acc), SBP_U_CLIP, 1 - SBP_U_CLIP)
    u, v = torch.where(f.flip, 1 - u, u), torch.where(f.flip, u, 1 - u)  # v = 1 − u without rounding u twice
    w = u + v * eD
    tail = f.P < -_TAIL

    # P ≥ −5: Φ(P)·w ≥ 2.9e-12, the inverse CDF directly
    # Φ(±P) by erfc (torch.special.ndtr is 1 + erf: 4e-11 relative at −5)
    cdf_P, sf_P = c(0.5 * torch.special.erfc(-f.P * _SQRT_HALF)), c(0.5 * torch.special.erfc(f.P * _SQRT_HALF))
    p = cdf_P * w
    xi = torch.where(p <= 0.5, torch.special.ndtri(p), -torch.special.ndtri(sf_P + cdf_P * v * q))
    A = torch.exp(torch.log(v) + 0.5 * (xi - Q) * (xi + Q))
    B = torch.exp(torch.log(u) + 0.5 * (xi - P) * (xi + P))
    x = c(f.mu) + sign * sigma * xi

    # P < −5: Newton's method on the distance from the pivot (no Φ, which underflows)
    y = torch.where(tail, -P, _TAIL)
    L = torch.where(u < 0.5, -torch.log(w), -torch.log1p(-v * q))  # −log w, w = 1 − v·q rounds near 1
    delta = 2 * L / (y + torch.sqrt(y * y + 2 * L))
    for _ in range(_NEWTON_STEPS[acc]):
        dh, m_xi = _log_mills_step(y, delta)
        delta = delta - (delta * (y + 0.5 * delta) - L - dh) / m_xi  # f'(δ) = φ(ξ)/Φ(ξ)
    dh, _ = _log_mills_step(y, delta)
    A_t = v * eD / w * torch.exp(h_P - h_Q + dh)
    # 1 − B = (v e^D − u·expm1(h(ξ) − h(P)))/w: no cancellation where B → 1
    one_minus_B_t = (v * eD - u * torch.expm1(dh)) / w
    x_t = c(f.pivot_bound) - sign * sigma * delta

    a, b = bounds
    x = torch.clamp(torch.where(tail, x_t, x), a, b)
    theta = torch.exp(x)
    if not with_grad:
        return theta, None, None
    # ξ − Q·A − P·B = (ξ − P) + P·(1 − B) − Q·A, with ξ − P = −δ in the tail
    dx_dmu = torch.where(tail, one_minus_B_t - A_t, 1 - A - B)
    dx_dls = torch.where(tail, -delta + P * one_minus_B_t - Q * A_t, xi - Q * A - P * B)
    dmu = theta * dx_dmu * c(_in_range(mu.double()))
    dls = theta * sign * sigma * dx_dls * c(_in_range(log_sigma.double()))
    return theta, dmu, dls
