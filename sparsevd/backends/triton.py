"""Triton kernels (``sparsevd.triton_kernels``) as the CUDA kernels of the ops that have no
C++ CUDA kernel. They cover float32 (TF32 where torch allows it), float16 and bfloat16;
other dtypes (float64 for gradcheck, say) run the reference on the same device. The
Triton modules are imported on the first call, so ``import sparsevd`` stays light.

The LRT linear layer takes one of two routes per shape (cuBLAS GEMMs with fused Triton
passes around them, or fused Triton dual GEMMs): ``triton_kernels.lrt.route`` decides, by
a rule the GPU benchmark sets.
"""

from __future__ import annotations

import torch

from . import default

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _lrt():
    from ..triton_kernels import lrt

    return lrt


def _kl():
    from ..triton_kernels import kl

    return kl


def _lrt_linear(x, weight, log_sigma2, bias, seed):
    return _lrt().lrt_forward(x, weight, log_sigma2, bias, int(seed))


def _lrt_linear_backward(grad, x, weight, log_sigma2, std, seed, output_mask):
    grads = _lrt().lrt_backward(grad, x, weight, log_sigma2, std, int(seed), tuple(output_mask))
    empty = grad.new_empty(0)
    return tuple(empty if g is None else g for g in grads)


def _lrt_noise(x, weight, seed):
    return _lrt().lrt_noise(x.shape[0], weight.shape[0], int(seed), x.device)


def _lrt_sample(mean, var, seed):
    return _lrt().lrt_sample(mean, var, int(seed))


def _lrt_sample_backward(grad, std, seed):
    return _lrt().lrt_sample_backward(grad, std, int(seed))


def _lrt_sample_noise(mean, seed):
    return _lrt().lrt_noise(1, mean.numel(), int(seed), mean.device).view(mean.shape)


def _sbp():
    from ..triton_kernels import sbp

    return sbp


def _sbp_kl(mu, log_sigma, a, b):
    return _sbp().sbp_kl(mu, log_sigma, a, b)


def _sbp_sample(mu, log_sigma, seed, batch, a, b, with_grad):
    return _sbp().sbp_sample(mu, log_sigma, int(seed), batch, a, b, with_grad)


def _sbp_noise(mu, seed, batch):
    return _sbp().sbp_noise(mu.shape[0], batch, int(seed), mu.device)


def _kl_divergence(weight, log_sigma2, lo, hi):
    return _kl().kl_forward(weight, log_sigma2, lo, hi)


def _kl_divergence_backward(grad, weight, log_sigma2, lo, hi):
    return _kl().kl_backward(grad, weight, log_sigma2, lo, hi)


def _kl_divergence_with_grad(weight, log_sigma2, lo, hi):
    return _kl().kl_forward_backward(weight, log_sigma2, lo, hi)


#: op -> (Triton kernel, the argument whose dtype decides between it and the reference)
KERNELS = {
    "lrt_linear": (_lrt_linear, 0),
    "lrt_linear_backward": (_lrt_linear_backward, 1),
    "lrt_noise": (_lrt_noise, 0),
    "lrt_sample": (_lrt_sample, 0),
    "lrt_sample_backward": (_lrt_sample_backward, 0),
    "lrt_sample_noise": (_lrt_sample_noise, 0),
    "kl_divergence": (_kl_divergence, 0),
    "kl_divergence_backward": (_kl_divergence_backward, 1),
    "kl_divergence_with_grad": (_kl_divergence_with_grad, 0),
    "sbp_kl": (_sbp_kl, 0),
    "sbp_sample": (_sbp_sample, 0),
    "sbp_noise": (_sbp_noise, 0),
}


def _by_dtype(name, kernel, arg):
    reference = default.KERNELS[name]

    def run(*args):
        return (kernel if args[arg].dtype in _DTYPES else reference)(*args)

    run.__name__ = f"{name}_triton"
    return run


def register():
    for name, (kernel, arg) in KERNELS.items():
        torch.library.register_kernel(f"sparsevd::{name}", "cuda", _by_dtype(name, kernel, arg))
