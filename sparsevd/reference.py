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
