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

import torch

#: Constants of Molchanov et al.'s fit of −KL(q‖p) as a function of log α.
K1, K2, K3 = 0.63576, 1.87320, 1.48695
#: Default clamp of log α and default pruning threshold (the paper's values).
LOG_ALPHA_RANGE = (-10.0, 10.0)
THRESHOLD = 3.0
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


def prune_mask(weight, log_sigma2, threshold=THRESHOLD, log_alpha_range=LOG_ALPHA_RANGE):
    """Boolean mask of the weights to keep: log α < threshold."""
    return log_alpha(weight, log_sigma2, log_alpha_range) < threshold


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


def csr_to_dense(crow_indices, col_indices, values, in_features):
    """The dense [N, K] matrix of a CSR matrix whose rows are output features."""
    rows = crow_indices.numel() - 1
    counts = crow_indices[1:] - crow_indices[:-1]
    row_of = torch.repeat_interleave(torch.arange(rows, device=values.device), counts.long())
    dense = values.new_zeros(rows, in_features)
    dense[row_of, col_indices.long()] = values
    return dense


def csr_linear(x, crow_indices, col_indices, values, bias=None):
    """y = x W_csrᵀ + b for W [N, K] stored in CSR with rows = output features.

    Fast kernels compute it as the SpMM yᵀ = W_csr · xᵀ, so each non-zero reads one
    contiguous row of xᵀ.
    """
    dense = csr_to_dense(crow_indices, col_indices, values, x.shape[-1])
    return torch.nn.functional.linear(x, dense, bias)



#: The elementwise activations of :func:`linear_chain`, by code (the op takes the index).
#: The C++ kernels' ``Act`` enum (csrc/cpu/csr_kernels.h) lists them in this order.
ACTIVATIONS = ("identity", "relu", "leaky_relu", "relu6", "elu", "tanh", "sigmoid", "gelu", "gelu_tanh", "silu")


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
