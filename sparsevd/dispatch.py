"""Which implementation runs: the one module that branches on device, dtype and backend.

Every op is declared once in C++ (csrc/ops.cpp, ``torch.ops.sparsevd.*``) and the
torch dispatcher routes a call by the device of its tensors. Per device, the kernel
is, in order of preference:

- a compiled C++/CUDA kernel of the extension (``csrc/cpu``, ``csrc/cuda``);
- a Triton kernel (``sparsevd.triton_kernels``), CUDA tensors only;
- the reference math (:mod:`sparsevd.reference`) with noise regenerated from the seed.

Without the extension (``SPARSEVD_BUILD=none``, or a failed build) there are no ops
and :mod:`sparsevd.functional` calls the reference math directly, through autograd.
``SPARSEVD_BACKEND=reference`` forces that path even when the extension is there.
"""

from __future__ import annotations

import os

import torch

from . import reference

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.sparsevd.*)

    EXTENSION_ERROR = None
except ImportError as error:  # pragma: no cover - depends on how the package was built
    EXTENSION_ERROR = error

HAS_EXTENSION = EXTENSION_ERROR is None


def _triton_usable():
    if not torch.cuda.is_available():
        return False
    try:
        from .triton_kernels import kl, lrt  # noqa: F401
    except ImportError:
        return False
    return True


HAS_TRITON = _triton_usable()


def use_ops():
    """True when calls go through ``torch.ops.sparsevd`` (and so the fast kernels)."""
    return HAS_EXTENSION and os.environ.get("SPARSEVD_BACKEND", "auto") != "reference"


def describe():
    """A short human-readable summary of what runs where, for logs and bug reports."""
    if not HAS_EXTENSION:
        return f"reference path only (extension not loaded: {EXTENSION_ERROR})"
    lines = [f"extension sparsevd._C loaded; backend {'ops' if use_ops() else 'reference'}"]
    for op in ("kl_divergence", "kl_divergence_with_grad", "lrt_linear", "lrt_sample", "csr_linear"):
        kernels = {key: _kernel_name(op, key) for key in ("CPU", "CUDA")}
        lines.append(f"  {op}: " + ", ".join(f"{k} -> {v}" for k, v in kernels.items()))
    return "\n".join(lines)


# --- noise ----------------------------------------------------------------------------


def noise_from_seed(rows, cols, seed, device):
    """Standard normal [rows, cols] float32 noise determined by ``seed`` alone."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) & ((1 << 63) - 1))
    return torch.randn(rows, cols, generator=generator, device=device, dtype=torch.float32)


def draw_seed(generator=None):
    """A fresh 63-bit seed from torch's CPU generator, so torch.manual_seed reproduces runs."""
    return torch.randint(1 << 62, (), generator=generator, dtype=torch.int64)


# --- reference kernels, registered for devices without a faster one --------------------


def _lrt_noise_reference(x, weight, seed):
    return noise_from_seed(x.shape[0], weight.shape[0], seed, x.device)


def _lrt_linear_reference(x, weight, log_sigma2, bias, seed):
    noise = _lrt_noise_reference(x, weight, seed).to(x.dtype)
    std = reference.lrt_std(x, log_sigma2)
    return torch.nn.functional.linear(x, weight, bias) + std * noise, std


def _lrt_linear_backward_reference(grad, x, weight, log_sigma2, std, seed, output_mask):
    # The gradient formulas of reference.lrt_linear written out, so the noise is
    # regenerated instead of kept alive by autograd.
    need_x, need_w, need_s, need_b = output_mask
    empty = grad.new_empty(0)
    h = grad * _lrt_noise_reference(x, weight, seed).to(grad.dtype) / (2 * std)
    sigma2 = torch.exp(log_sigma2)
    dx = grad @ weight + 2 * x * (h @ sigma2) if need_x else empty
    dw = grad.t() @ x if need_w else empty
    ds = (h.t() @ (x * x)) * sigma2 if need_s else empty
    db = grad.sum(0) if need_b else empty
    return dx, dw, ds, db


def _sample_noise_reference(mean, seed):
    # the flat stream of noise_from_seed: for an [M, N] output, lrt_linear's noise
    return noise_from_seed(1, mean.numel(), seed, mean.device).view(mean.shape)


def _lrt_sample_reference(mean, var, seed):
    std = torch.sqrt(var + reference.EPS)
    return (mean + std * _sample_noise_reference(mean, seed).to(mean.dtype)).contiguous(), std.contiguous()


def _lrt_sample_backward_reference(grad, std, seed):
    return (grad * _sample_noise_reference(grad, seed).to(grad.dtype) / (2 * std)).contiguous()


def _kl_divergence_reference(weight, log_sigma2, lo, hi):
    return reference.kl_divergence(weight, log_sigma2, (lo, hi))


def _kl_divergence_backward_reference(grad, weight, log_sigma2, lo, hi):
    with torch.enable_grad():
        w = weight.detach().requires_grad_()
        s = log_sigma2.detach().requires_grad_()
        kl = reference.kl_divergence(w, s, (lo, hi))
        dw, ds = torch.autograd.grad(kl, (w, s), grad.to(kl.dtype))
    return dw, ds


def _kl_divergence_with_grad_reference(weight, log_sigma2, lo, hi):
    with torch.enable_grad():
        w = weight.detach().requires_grad_()
        s = log_sigma2.detach().requires_grad_()
        kl = reference.kl_divergence(w, s, (lo, hi))
        dw, ds = torch.autograd.grad(kl, (w, s))
    return kl.detach(), dw.contiguous(), ds.contiguous()


def _csr_linear_reference(x, crow_indices, col_indices, values, bias, row_order=None):
    return reference.csr_linear(x, crow_indices, col_indices, values, bias)  # the order only schedules


# --- triton kernels (CUDA) ---------------------------------------------------------------
# Triton covers fp32 (TF32 when torch allows it), fp16 and bf16; other dtypes (float64
# for gradcheck, say) take the reference on the same device.
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _lrt_linear_triton(x, weight, log_sigma2, bias, seed):
    if x.dtype not in _TRITON_DTYPES:
        return _lrt_linear_reference(x, weight, log_sigma2, bias, seed)
    from .triton_kernels import lrt

    return lrt.lrt_forward(x, weight, log_sigma2, bias, int(seed))


def _lrt_linear_backward_triton(grad, x, weight, log_sigma2, std, seed, output_mask):
    if x.dtype not in _TRITON_DTYPES:
        return _lrt_linear_backward_reference(grad, x, weight, log_sigma2, std, seed, output_mask)
    from .triton_kernels import lrt

    grads = lrt.lrt_backward(grad, x, weight, log_sigma2, std, int(seed), tuple(output_mask))
    empty = grad.new_empty(0)
    return tuple(empty if g is None else g for g in grads)


def _lrt_noise_triton(x, weight, seed):
    if x.dtype not in _TRITON_DTYPES:
        return _lrt_noise_reference(x, weight, seed)
    from .triton_kernels import lrt

    return lrt.lrt_noise(x.shape[0], weight.shape[0], int(seed), x.device)


def _lrt_sample_triton(mean, var, seed):
    if mean.dtype not in _TRITON_DTYPES:
        return _lrt_sample_reference(mean, var, seed)
    from .triton_kernels import lrt

    return lrt.lrt_sample(mean, var, int(seed))


def _lrt_sample_backward_triton(grad, std, seed):
    if grad.dtype not in _TRITON_DTYPES:
        return _lrt_sample_backward_reference(grad, std, seed)
    from .triton_kernels import lrt

    return lrt.lrt_sample_backward(grad, std, int(seed))


def _sample_noise_triton(mean, seed):
    if mean.dtype not in _TRITON_DTYPES:  # what _lrt_sample_triton used for this dtype
        return _sample_noise_reference(mean, seed)
    from .triton_kernels import lrt

    return lrt.lrt_noise(1, mean.numel(), int(seed), mean.device).view(mean.shape)


def _kl_divergence_triton(weight, log_sigma2, lo, hi):
    if weight.dtype not in _TRITON_DTYPES:
        return _kl_divergence_reference(weight, log_sigma2, lo, hi)
    from .triton_kernels import kl

    return kl.kl_forward(weight, log_sigma2, lo, hi)


def _kl_divergence_backward_triton(grad, weight, log_sigma2, lo, hi):
    if weight.dtype not in _TRITON_DTYPES:
        return _kl_divergence_backward_reference(grad, weight, log_sigma2, lo, hi)
    from .triton_kernels import kl

    return kl.kl_backward(grad, weight, log_sigma2, lo, hi)


def _kl_divergence_with_grad_triton(weight, log_sigma2, lo, hi):
    if weight.dtype not in _TRITON_DTYPES:
        return _kl_divergence_with_grad_reference(weight, log_sigma2, lo, hi)
    from .triton_kernels import kl

    return kl.kl_forward_backward(weight, log_sigma2, lo, hi)


_KERNELS = {
    # op: {device: [(name, python kernel), ...] in order of preference}
    "lrt_linear": {
        "cuda": [("triton", _lrt_linear_triton)],
        None: [("reference", _lrt_linear_reference)],
    },
    "lrt_linear_backward": {
        "cuda": [("triton", _lrt_linear_backward_triton)],
        None: [("reference", _lrt_linear_backward_reference)],
    },
    "lrt_noise": {
        "cuda": [("triton", _lrt_noise_triton)],
        None: [("reference", _lrt_noise_reference)],
    },
    "lrt_sample": {
        "cuda": [("triton", _lrt_sample_triton)],
        None: [("reference", _lrt_sample_reference)],
    },
    "lrt_sample_backward": {
        "cuda": [("triton", _lrt_sample_backward_triton)],
        None: [("reference", _lrt_sample_backward_reference)],
    },
    "lrt_sample_noise": {
        "cuda": [("triton", _sample_noise_triton)],
        None: [("reference", _sample_noise_reference)],
    },
    "kl_divergence": {
        "cuda": [("triton", _kl_divergence_triton)],
        None: [("reference", _kl_divergence_reference)],
    },
    "kl_divergence_backward": {
        "cuda": [("triton", _kl_divergence_backward_triton)],
        None: [("reference", _kl_divergence_backward_reference)],
    },
    "kl_divergence_with_grad": {
        "cuda": [("triton", _kl_divergence_with_grad_triton)],
        None: [("reference", _kl_divergence_with_grad_reference)],
    },
    "csr_linear": {None: [("reference", _csr_linear_reference)]},
}

# Devices where training computes ∂KL in the forward sweep (kl_divergence_with_grad)
# instead of a separate backward sweep: those with a C++ kernel for it (the CPU). There
# the sweep is compute-bound (exp/log), so doing that work once instead of twice pays for
# the extra pass that scales the kept gradients by the incoming grad. A bandwidth-bound
# GPU kernel would lose on that pass, so CUDA keeps separate forward and backward kernels
# (the op still runs there, through the Python kernel below, for callers that ask).
FUSED_KL_GRAD_DEVICES = frozenset()


def prefers_kl_with_grad(device):
    """True when functional.kl_divergence should use the fused forward+gradient op on ``device``."""
    return device.type in FUSED_KL_GRAD_DEVICES

_REGISTERED = {}  # (op, dispatch key) -> name of the Python kernel registered there


def _has_cpp_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsevd::{op}", key)


def _kernel_name(op, key):
    return _REGISTERED.get((op, key), "C++" if _has_cpp_kernel(op, key) else "none")


def _register_python_kernels():
    """Fill every (op, device) that has no compiled kernel with the best Python one."""
    for op, by_device in _KERNELS.items():
        for key, device in (("CPU", "cpu"), ("CUDA", "cuda")):
            if _has_cpp_kernel(op, key):
                continue
            candidates = by_device.get(device, []) if device != "cuda" or HAS_TRITON else []
            name, kernel = (candidates + by_device[None])[0]
            torch.library.register_kernel(f"sparsevd::{op}", device, kernel)
            _REGISTERED[(op, key)] = name


if HAS_EXTENSION:
    FUSED_KL_GRAD_DEVICES = frozenset(  # before the Python kernels fill the other keys
        device for key, device in (("CPU", "cpu"), ("CUDA", "cuda")) if _has_cpp_kernel("kl_divergence_with_grad", key)
    )
    _register_python_kernels()
