"""Functional forms of the SparseVD ops: validate, reshape, hand to the dispatcher.

These accept the shapes ``torch.nn.functional.linear`` accepts (``input`` of shape
``[*, in_features]``) and raise errors that name the problem for bad input.
"""

from __future__ import annotations

import math

import torch

from . import backends, reference  # noqa: F401  (importing backends registers the kernels)
from ._validate import integer, interval
from .noise import draw_seed

__all__ = [
    "masked_linear", "lrt_linear", "lrt_noise", "lrt_sample", "lrt_sample_noise", "kl_divergence",
    "csr_linear", "validate_csr", "rows_by_length", "validate_row_order", "log_alpha", "prune_mask",
]

log_alpha = reference.log_alpha
prune_mask = reference.prune_mask


def _check_tensor(name, t, op):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_same(op, reference_name, ref, **others):
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {reference_name} is on {ref.device}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {reference_name} has dtype {ref.dtype}")


def _check_params(op, weight, log_sigma2):
    _check_tensor("weight", weight, op)
    _check_tensor("log_sigma2", log_sigma2, op)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if log_sigma2.shape != weight.shape:
        raise ValueError(
            f"{op}: log_sigma2 must have the shape of weight {tuple(weight.shape)}, got {tuple(log_sigma2.shape)}"
        )
    _check_same(op, "weight", weight, log_sigma2=log_sigma2)


def _check_input(op, input, in_features, weight, bias, out_features):
    _check_tensor("input", input, op)
    if input.dim() == 0 or input.shape[-1] != in_features:
        raise ValueError(
            f"{op}: expected input of shape [*, {in_features}] (in_features = {in_features}), "
            f"got {tuple(input.shape)}"
        )
    if bias is not None:
        _check_tensor("bias", bias, op)
        if bias.shape != (out_features,):
            raise ValueError(f"{op}: bias must have shape ({out_features},), got {tuple(bias.shape)}")
    _check_same(op, "weight", weight, input=input, bias=bias)


def _as_2d(input):
    # reshape(-1, K) is ambiguous when K == 0
    return input.reshape(math.prod(input.shape[:-1]), input.shape[-1])


def _as_seed(op, seed, generator):
    if seed is None:
        return draw_seed(generator)
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"{op}: seed must be a one-element int64 tensor or an int, got {seed.dtype} "
                             f"{tuple(seed.shape)}")
        return seed.reshape(()).cpu()
    return torch.tensor(integer(op, "seed", seed, what="an int or a one-element int64 tensor"), dtype=torch.int64)


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast(*tensors):
    """The tensors in ``torch.autocast``'s dtype when it is on for their device type, as
    nn.Linear runs under it: the custom ops are not autocast-aware. Like autocast, leaves
    float64 (and anything that is not a floating tensor, for the checks to report) alone.
    """
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None:
        return tensors
    try:
        enabled = torch.is_autocast_enabled(first.device.type)
    except RuntimeError:  # a device type autocast does not know (meta, say): nothing to cast
        return tensors
    if not enabled:
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_ELIGIBLE else t for t in tensors
    )


def lrt_linear(input, weight, log_sigma2, bias=None, *, seed=None, generator=None):
    """Sample the pre-activations of a SparseVD linear layer (local reparameterization).

    y = x θᵀ + b + sqrt((x ⊙ x) exp(log σ²)ᵀ + 1e-8) ⊙ z with z ~ N(0, 1) of shape
    ``[*, out_features]``. The noise is a function of ``seed`` (an int or int64
    tensor), drawn from torch's CPU generator (or ``generator``) when not given, so
    ``torch.manual_seed`` reproduces a run; :func:`lrt_noise` gives it back.
    """
    op = "lrt_linear"
    input, weight, log_sigma2, bias = _autocast(input, weight, log_sigma2, bias)
    _check_params(op, weight, log_sigma2)
    _check_input(op, input, weight.shape[1], weight, bias, weight.shape[0])
    seed = _as_seed(op, seed, generator)
    y, _ = torch.ops.sparsevd.lrt_linear(_as_2d(input), weight, log_sigma2, bias, seed)
    return y.reshape(*input.shape[:-1], weight.shape[0])


def masked_linear(input, weight, mask, bias=None):
    """The evaluation-mode SparseVD layer: y = x (θ ⊙ mask)ᵀ + b."""
    input, weight, bias = _autocast(input, weight, bias)
    _check_tensor("weight", weight, "masked_linear")
    _check_input("masked_linear", input, weight.shape[-1], weight, bias, weight.shape[0])
    return reference.masked_linear(input, weight, mask, bias)


def lrt_noise(input, weight, seed):
    """The float32 noise ``z`` that ``lrt_linear(input, weight, ..., seed=seed)`` used."""
    _check_tensor("input", input, "lrt_noise")
    seed = _as_seed("lrt_noise", seed, None)
    z = torch.ops.sparsevd.lrt_noise(_as_2d(input), weight, seed)
    return z.reshape(*input.shape[:-1], weight.shape[0])


def _check_mean_var(op, mean, var):
    _check_tensor("mean", mean, op)
    _check_tensor("var", var, op)
    if var.shape != mean.shape:
        raise ValueError(f"{op}: var must have the shape of mean {tuple(mean.shape)}, got {tuple(var.shape)}")
    _check_same(op, "mean", mean, var=var)


def lrt_sample(mean, var, *, seed=None, generator=None):
    """The LRT's sampling step for any layer with Gaussian pre-activations:
    y = mean + sqrt(var + 1e-8) ⊙ z, z ~ N(0, 1) of mean's shape.

    A SparseVD convolution, say, passes conv(x, θ) + b and conv(x ⊙ x, exp(log σ²)).
    Differentiable w.r.t. ``mean`` (gradient g) and ``var`` (g ⊙ z / (2 sqrt(var + 1e-8)));
    the noise is regenerated from ``seed`` in backward, never stored, and is one fused
    kernel per direction on CUDA and CPU. ``seed`` and ``generator`` work as in
    :func:`lrt_linear`; :func:`lrt_sample_noise` gives the noise back (for an
    ``[M, N]`` output it is the noise ``lrt_linear`` draws with the same seed).
    """
    op = "lrt_sample"
    mean, var = _autocast(mean, var)
    _check_mean_var(op, mean, var)
    return torch.ops.sparsevd.lrt_sample(mean, var, _as_seed(op, seed, generator))[0]


def lrt_sample_noise(mean, seed):
    """The float32 noise ``z`` that ``lrt_sample(mean, var, seed=seed)`` used."""
    _check_tensor("mean", mean, "lrt_sample_noise")
    return torch.ops.sparsevd.lrt_sample_noise(mean, _as_seed("lrt_sample_noise", seed, None))


def kl_divergence(weight, log_sigma2, log_alpha_range=reference.LOG_ALPHA_RANGE):
    """Σ KL(q‖p) over the weights of one layer (float32, float64 for float64 weights)."""
    op = "kl_divergence"
    _check_tensor("weight", weight, op)
    _check_tensor("log_sigma2", log_sigma2, op)
    if log_sigma2.shape != weight.shape:
        raise ValueError(
            f"{op}: log_sigma2 must have the shape of weight {tuple(weight.shape)}, got {tuple(log_sigma2.shape)}"
        )
    _check_same(op, "weight", weight, log_sigma2=log_sigma2)
    lo, hi = interval(op, "log_alpha_range", log_alpha_range)
    if torch.is_grad_enabled() and (weight.requires_grad or log_sigma2.requires_grad):
        # Training: the gradients come out of the same sweep as the sum and are kept for
        # backward (which only scales them), instead of a second sweep over the weights.
        return torch.ops.sparsevd.kl_divergence_with_grad(weight, log_sigma2, lo, hi)[0]
    return torch.ops.sparsevd.kl_divergence(weight, log_sigma2, lo, hi)


def csr_linear(input, crow_indices, col_indices, values, bias=None, *, row_order=None, validate=True):
    """y = x W_csrᵀ + b, W [out_features, in_features] in CSR with int32 indices.

    ``in_features`` is ``input.shape[-1]``. ``row_order`` (optional, int32 [out_features]):
    a permutation of the rows, the order in which the GPU kernel schedules them; rows by
    decreasing length (:func:`rows_by_length`) balance the load. It never changes the
    result. The kernels trust the structure (an index out of range would read outside
    x), so by default every call runs :func:`validate_csr` first; owners of a structure
    checked once (``SparseLinear`` checks at construction and load) pass
    ``validate=False`` and skip its O(nnz) cost.
    """
    op = "csr_linear"
    _check_tensor("values", values, op)
    for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
            raise TypeError(f"{op}: {name} must be a 1-D int32 tensor")
        if t.device != values.device:
            raise ValueError(f"{op}: {name} is on {t.device} but values is on {values.device}")
    if col_indices.shape != values.shape:
        raise ValueError(f"{op}: col_indices and values must have the same length")
    out_features = crow_indices.shape[0] - 1
    if out_features < 0:
        raise ValueError(f"{op}: crow_indices must have at least one element")
    _check_input(op, input, input.shape[-1] if input.dim() else -1, values, bias, out_features)
    if validate:
        validate_csr(crow_indices, col_indices, values, (out_features, input.shape[-1]))
        if row_order is not None:
            validate_row_order(row_order, out_features, values.device)
    y = torch.ops.sparsevd.csr_linear(_as_2d(input), crow_indices, col_indices, values, bias, row_order)
    return y.reshape(*input.shape[:-1], out_features)


def rows_by_length(crow_indices):
    """The int32 permutation of a CSR matrix's rows by decreasing length (ties in row
    order): the schedule that balances the GPU SpMM's load, as in Sputnik."""
    lengths = crow_indices[1:] - crow_indices[:-1]
    return torch.sort(lengths, descending=True, stable=True).indices.to(torch.int32)


def validate_row_order(row_order, rows, device):
    """Check once that ``row_order`` is an int32 permutation of ``rows`` rows on ``device``."""
    if not isinstance(row_order, torch.Tensor) or row_order.dtype != torch.int32 or row_order.dim() != 1:
        raise ValueError("row_order must be a 1-D int32 tensor")
    if row_order.device != device:
        raise ValueError(f"row_order is on {row_order.device} but the CSR values are on {device}")
    error = reference.row_order_error(row_order, rows)
    if error is not None:
        raise ValueError(error)


def validate_csr(crow_indices, col_indices, values, shape):
    """Check a CSR matrix of the given ``(rows, cols)`` shape once, before it is used:
    int32 indices, values of their length, all on one device, finite values, and a valid
    structure as :func:`sparsevd.reference.csr_structure_error` defines it.

    The kernels do not check the order of a row's columns (checking it per call would
    double the memory traffic of a batch-1 product), so anything that builds or loads
    one calls this.
    """
    rows, cols = shape
    for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
            raise ValueError(f"CSR {name} must be a 1-D int32 tensor")
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or not values.is_floating_point():
        raise ValueError("CSR values must be a 1-D floating-point tensor")
    if not (crow_indices.device == col_indices.device == values.device):
        raise ValueError("CSR crow_indices, col_indices and values must be on one device")
    if values.numel() != col_indices.numel():
        raise ValueError(f"CSR values ({values.numel()}) and col_indices ({col_indices.numel()}) differ in length")
    error = reference.csr_structure_error(crow_indices, col_indices, (rows, cols))
    if error is not None:
        raise ValueError(f"CSR {error}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("CSR values contain NaN or Inf")
