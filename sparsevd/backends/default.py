"""The default kernel of every op: the reference math (:mod:`sparsevd.reference`), for any
device, with the noise regenerated from the seed. Registered as CompositeExplicitAutograd,
so a device kernel (C++, Triton) registered for a dispatch key takes precedence there.
"""

from __future__ import annotations

import torch

from .. import reference
from ..noise import noise_from_seed, uniform_from_seed


def _lrt_noise(x, weight, seed):
    return noise_from_seed(x.shape[0], weight.shape[0], seed, x.device)


def _lrt_linear(x, weight, log_sigma2, bias, seed):
    noise = _lrt_noise(x, weight, seed).to(x.dtype)
    std = reference.lrt_std(x, log_sigma2)
    return torch.nn.functional.linear(x, weight, bias) + std * noise, std


def _lrt_linear_backward(grad, x, weight, log_sigma2, std, seed, output_mask):
    # The gradients of reference.lrt_linear written out, so that the noise is regenerated
    # instead of kept alive by autograd.
    need_x, need_w, need_s, need_b = output_mask
    empty = grad.new_empty(0)
    h = grad * _lrt_noise(x, weight, seed).to(grad.dtype) / (2 * std)
    sigma2 = torch.exp(log_sigma2)
    dx = grad @ weight + 2 * x * (h @ sigma2) if need_x else empty
    dw = grad.t() @ x if need_w else empty
    ds = (h.t() @ (x * x)) * sigma2 if need_s else empty
    db = grad.sum(0) if need_b else empty
    return dx, dw, ds, db


def _lrt_sample_noise(mean, seed):
    # the flat stream of noise_from_seed: for an [M, N] output, lrt_linear's noise
    return noise_from_seed(1, mean.numel(), seed, mean.device).view(mean.shape)


def _lrt_sample(mean, var, seed):
    std = torch.sqrt(var + reference.EPS)
    return (mean + std * _lrt_sample_noise(mean, seed).to(mean.dtype)).contiguous(), std.contiguous()


def _lrt_sample_backward(grad, std, seed):
    return (grad * _lrt_sample_noise(grad, seed).to(grad.dtype) / (2 * std)).contiguous()


def _kl_divergence(weight, log_sigma2, lo, hi):
    return reference.kl_divergence(weight, log_sigma2, (lo, hi))


def _kl_divergence_backward(grad, weight, log_sigma2, lo, hi):
    dw, ds = reference.kl_divergence_grad(weight, log_sigma2, (lo, hi))
    return (dw * grad).to(weight.dtype), (ds * grad).to(log_sigma2.dtype)


def _kl_divergence_with_grad(weight, log_sigma2, lo, hi):
    dw, ds = reference.kl_divergence_grad(weight, log_sigma2, (lo, hi))
    return reference.kl_divergence(weight, log_sigma2, (lo, hi)), dw.contiguous(), ds.contiguous()


def _csr_linear(x, crow_indices, col_indices, values, bias, row_order=None):
    return reference.csr_linear(x, crow_indices, col_indices, values, bias)  # the order only schedules


def _linear_chain(x, weights, crow_indices, col_indices, biases, activations, activation_params):
    lengths = {len(weights), len(crow_indices), len(col_indices), len(biases), len(activations),
               len(activation_params)}
    if len(lengths) != 1 or not weights:
        raise ValueError("sparsevd::linear_chain: weights, crow_indices, col_indices, biases, activations and "
                         "activation_params must have one entry per layer (and at least one layer)")
    unknown = [code for code in activations if not 0 <= code < len(reference.ACTIVATIONS)]
    if unknown:
        raise ValueError(f"sparsevd::linear_chain: unknown activation codes {unknown} (0..{len(reference.ACTIVATIONS) - 1})")
    return reference.linear_chain(x, weights, crow_indices, col_indices, biases, activations,
                                  activation_params).contiguous()


def _sbp_check(mu, log_sigma, op):
    if mu.dim() != 1 or log_sigma.shape != mu.shape:
        raise ValueError(f"{op}: mu and log_sigma must be 1-D of one shape, got {tuple(mu.shape)} and "
                         f"{tuple(log_sigma.shape)}")
    if bool(torch.isnan(mu).any()) or bool(torch.isnan(log_sigma).any()):
        raise ValueError(f"{op}: mu or log_sigma contains NaN")


def _sbp_kl(mu, log_sigma, a, b):
    _sbp_check(mu, log_sigma, "sbp_kl")
    return reference.sbp_kl_with_grad(mu, log_sigma, (a, b))


def _sbp_noise(mu, seed, batch):
    return uniform_from_seed(batch, mu.shape[0], seed, mu.device)


def _sbp_sample(mu, log_sigma, seed, batch, a, b, with_grad):
    _sbp_check(mu, log_sigma, "sbp_sample")
    theta, dmu, dls = reference.sbp_sample(mu, log_sigma, _sbp_noise(mu, seed, batch), (a, b), with_grad)
    if not with_grad:
        dmu, dls = theta.new_empty(0), theta.new_empty(0)
    return theta, dmu, dls


KERNELS = {
    "kl_divergence": _kl_divergence,
    "kl_divergence_backward": _kl_divergence_backward,
    "kl_divergence_with_grad": _kl_divergence_with_grad,
    "lrt_linear": _lrt_linear,
    "lrt_linear_backward": _lrt_linear_backward,
    "lrt_noise": _lrt_noise,
    "lrt_sample": _lrt_sample,
    "lrt_sample_backward": _lrt_sample_backward,
    "lrt_sample_noise": _lrt_sample_noise,
    "csr_linear": _csr_linear,
    "linear_chain": _linear_chain,
    "sbp_kl": _sbp_kl,
    "sbp_noise": _sbp_noise,
    "sbp_sample": _sbp_sample,
}


def register():
    for name, kernel in KERNELS.items():
        torch.library.register_kernel(f"sparsevd::{name}", None, kernel)
