"""SparseVD convolutions: :class:`SparseVDConv1d`, :class:`SparseVDConv2d` and their
functional forms :func:`lrt_conv1d`, :func:`lrt_conv2d`.

Training samples every output with the local reparameterization trick for convolutions,
μ = conv(x, θ) + b, v = conv(x ⊙ x, σ²), y = μ + sqrt(v + 1e-8) ⊙ z: two dense
convolutions, then the sampling epilogue :func:`sparsevd.functional.lrt_sample` (one
fused kernel; the noise is regenerated in backward, never stored). Eval is the masked
convolution conv(x, θ ⊙ mask) + b. The math is :func:`sparsevd.reference.lrt_conv`.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from . import functional as F
from . import reference
from ._validate import integer
from .functional import _check_same, _check_tensor
from .layers import SparseVDModule
from .shapes import explicit_padding

__all__ = ["SparseVDConv1d", "SparseVDConv2d", "lrt_conv1d", "lrt_conv2d"]

_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _int_tuple(op, name, value, dims, minimum):
    what = f"an int ≥ {minimum} or a tuple of {dims} of them"
    values = (value,) * dims if isinstance(value, numbers.Integral) else value
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{op}: {name} must be {what}, got {value!r}") from None
    if len(values) != dims:
        raise ValueError(f"{op}: {name} must be {what}, got {value!r}")
    return tuple(integer(op, name, v, minimum, what) for v in values)


def _conv_args(op, dims, stride, padding, dilation, groups):
    """stride, padding, dilation as tuples (padding may stay 'same'/'valid') and groups as an
    int, checked as nn.Conv does."""
    stride = _int_tuple(op, "stride", stride, dims, 1)
    dilation = _int_tuple(op, "dilation", dilation, dims, 1)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"{op}: padding must be 'same', 'valid' or ints ≥ 0, got {padding!r}")
        if padding == "same" and any(s != 1 for s in stride):
            raise ValueError(f"{op}: padding='same' is not supported for strided convolutions (stride={stride})")
    else:
        padding = _int_tuple(op, "padding", padding, dims, 0)
    return stride, padding, dilation, integer(op, "groups", groups, 1)


def _check_input(op, dims, input, weight, bias, padding, dilation, groups):
    """Check ``input`` against the layer; returns whether it has a batch dimension."""
    _check_tensor("input", input, op)
    if input.dim() not in (dims + 1, dims + 2):
        raise ValueError(
            f"{op}: expected a {dims + 2}-D input [batch, channels, {'L' if dims == 1 else 'H, W'}] "
            f"(or {dims + 1}-D without the batch), got shape {tuple(input.shape)}"
        )
    channels = weight.shape[1] * groups
    spatial = input.shape[-dims:]
    if input.shape[-dims - 1] != channels:
        raise ValueError(f"{op}: expected input with {channels} channels, got shape {tuple(input.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, op)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_same(op, "weight", weight, input=input, bias=bias)
    if padding != "same":
        pads = (0,) * dims if padding == "valid" else padding
        for size, pad, d, k in zip(spatial, pads, dilation, weight.shape[2:]):
            if size + 2 * pad < d * (k - 1) + 1:
                raise ValueError(
                    f"{op}: input of spatial size {tuple(spatial)} (padding {pads}) is smaller than the "
                    f"dilated kernel {tuple(d * (k - 1) + 1 for d, k in zip(dilation, weight.shape[2:]))}"
                )
    return input.dim() == dims + 2


def _check_params(op, dims, weight, log_sigma2, groups):
    _check_tensor("weight", weight, op)
    _check_tensor("log_sigma2", log_sigma2, op)
    if weight.dim() != dims + 2:
        raise ValueError(
            f"{op}: weight must be {dims + 2}-D [out_channels, in_channels / groups, *kernel], "
            f"got shape {tuple(weight.shape)}"
        )
    if log_sigma2.shape != weight.shape:
        raise ValueError(
            f"{op}: log_sigma2 must have the shape of weight {tuple(weight.shape)}, got {tuple(log_sigma2.shape)}"
        )
    _check_same(op, "weight", weight, log_sigma2=log_sigma2)
    if weight.shape[0] % groups:
        raise ValueError(f"{op}: groups={groups} must divide out_channels={weight.shape[0]}")


def _lrt(dims, x, weight, log_sigma2, bias, stride, padding, dilation, groups, seed, generator):
    conv = _CONV[dims]
    mean = conv(x, weight, bias, stride, padding, dilation, groups)
    var = conv(x * x, torch.exp(log_sigma2), None, stride, padding, dilation, groups)
    return F.lrt_sample(mean, var, seed=seed, generator=generator)


def _lrt_conv(dims, input, weight, log_sigma2, bias, stride, padding, dilation, groups, seed, generator):
    op = f"lrt_conv{dims}d"
    input, weight, log_sigma2, bias = F._autocast(input, weight, log_sigma2, bias)
    stride, padding, dilation, groups = _conv_args(op, dims, stride, padding, dilation, groups)
    _check_params(op, dims, weight, log_sigma2, groups)
    batched = _check_input(op, dims, input, weight, bias, padding, dilation, groups)
    x = input if batched else input.unsqueeze(0)
    y = _lrt(dims, x, weight, log_sigma2, bias, stride, padding, dilation, groups, seed, generator)
    return y if batched else y.squeeze(0)


def lrt_conv2d(input, weight, log_sigma2, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
               seed=None, generator=None):
    """Sample the outputs of a SparseVD 2-d convolution (local reparameterization).

    Arguments as :func:`torch.nn.functional.conv2d` (``padding`` ints, 'same' or 'valid';
    ``input`` ``[N, C, H, W]`` or ``[C, H, W]``), plus ``log_sigma2`` of ``weight``'s shape.
    y = conv(x, θ) + b + sqrt(conv(x ⊙ x, exp(log σ²)) + 1e-8) ⊙ z. ``seed`` and
    ``generator`` work as in :func:`sparsevd.functional.lrt_linear`, and
    ``sparsevd.functional.lrt_sample_noise(y, seed)`` gives the noise back.
    """
    return _lrt_conv(2, input, weight, log_sigma2, bias, stride, padding, dilation, groups, seed, generator)


def lrt_conv1d(input, weight, log_sigma2, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
               seed=None, generator=None):
    """:func:`lrt_conv2d` for 1-d convolutions (``input`` ``[N, C, L]`` or ``[C, L]``)."""
    return _lrt_conv(1, input, weight, log_sigma2, bias, stride, padding, dilation, groups, seed, generator)


_GEOMETRY = ("stride", "padding", "dilation", "groups", "padding_mode")


def _geometry_property(name):
    """The convolution's ``name`` (stride, padding, ...), checked with the rest of the
    geometry whenever it is set: every forward reads it."""

    def get(self):
        return self._geometry[name]

    def set(self, value):
        self._set_geometry(**{**self._geometry, name: value})

    return property(get, set, doc=f"The convolution's {name}, as nn.Conv*d's (checked when set).")


class _SparseVDConvNd(SparseVDModule):
    """The N-d SparseVD convolution; subclasses fix ``dims`` and the torch layer they replace."""

    dims: int
    dense_type: type
    stride = _geometry_property("stride")
    padding = _geometry_property("padding")
    dilation = _geometry_property("dilation")
    groups = _geometry_property("groups")
    padding_mode = _geometry_property("padding_mode")

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        padding_mode="zeros",
        device=None,
        dtype=None,
        threshold=reference.THRESHOLD,
        log_sigma2_init=reference.LOG_SIGMA2_INIT,
        log_alpha_range=reference.LOG_ALPHA_RANGE,
        alpha="weight",
    ):
        super().__init__()
        op = type(self).__name__
        in_channels = integer(op, "in_channels", in_channels, 1)
        out_channels = integer(op, "out_channels", out_channels, 1)
        self.kernel_size = _int_tuple(op, "kernel_size", kernel_size, self.dims, 1)
        self.in_channels, self.out_channels = in_channels, out_channels
        self._set_geometry(stride, padding, dilation, groups, padding_mode)
        self._init_sparsevd(threshold, log_sigma2_init, log_alpha_range, alpha)
        factory = {"device": device, "dtype": dtype}
        self._create_parameters((out_channels, in_channels // self.groups, *self.kernel_size), bias, factory)

    def _set_geometry(self, stride, padding, dilation, groups, padding_mode):
        """Check the geometry as nn.Conv*d's constructor does, and set it."""
        op = type(self).__name__
        stride, padding, dilation, groups = _conv_args(op, self.dims, stride, padding, dilation, groups)
        if self.in_channels % groups or self.out_channels % groups:
            raise ValueError(f"{op}: groups={groups} must divide in_channels={self.in_channels} and "
                             f"out_channels={self.out_channels}")
        weight = self._parameters.get("weight")
        if weight is not None and weight.shape[1] * groups != self.in_channels:
            raise ValueError(f"{op}: groups={groups} does not fit the weight of shape {tuple(weight.shape)} "
                             f"({self.in_channels} input channels)")
        if not isinstance(padding_mode, str) or padding_mode not in PADDING_MODES:
            raise ValueError(f"{op}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self._geometry = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups,
                          "padding_mode": padding_mode}

    def __setstate__(self, state):
        # a layer pickled before its geometry was checked properties
        if "_geometry" not in state:
            state["_geometry"] = {name: state.pop(name) for name in _GEOMETRY}
        super().__setstate__(state)

    def _padded(self, input):
        """The input padded by ``padding_mode`` and the padding left to the convolution."""
        if self.padding_mode == "zeros":
            return input, self.padding
        pad = explicit_padding(self.padding, self.kernel_size, self.dilation)
        return torch.nn.functional.pad(input, pad, mode=self.padding_mode), (0,) * self.dims

    def forward(self, input):
        if not self.training:
            return self._eval_forward(input)
        op = type(self).__name__
        # under autocast a 16-bit activation meets fp32 parameters, as in nn.Conv2d
        input, weight, bias = F._autocast(input, self.weight, self.bias)
        batched = _check_input(op, self.dims, input, weight, bias, self.padding, self.dilation, self.groups)
        x, padding = self._padded(input if batched else input.unsqueeze(0))
        args = (self.stride, padding, self.dilation, self.groups)
        if self.frozen_mask is None:
            y = _lrt(self.dims, x, weight, self.variance_log_sigma2().to(weight.dtype), bias, *args, None, None)
        elif self.frozen_noise:
            log_sigma2 = self._frozen_log_sigma2().to(weight.dtype)
            y = _lrt(self.dims, x, weight * self.frozen_mask, log_sigma2, bias, *args, None, None)
        else:
            y = _CONV[self.dims](x, weight * self.frozen_mask, bias, *args)
        return y if batched else y.squeeze(0)

    def _eval_forward(self, input):
        """conv(x, θ ⊙ mask) + b with the cached masked weight, as cheap as the dense layer."""
        try:  # the dense convolution's own checks cost nothing when the input is right
            # torch's convolution lets meta inputs through; _check_input says what is wrong
            if not isinstance(input, torch.Tensor) or input.device != self.weight.device:
                raise ValueError("not a tensor on the weight's device")
            x, padding = self._padded(input)
            return _CONV[self.dims](x, self._effective_weight(), self.bias, self.stride, padding, self.dilation,
                                    self.groups)
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            input, weight, bias = F._autocast(input, self.weight, self.bias)
            _check_input(type(self).__name__, self.dims, input, weight, bias, self.padding, self.dilation, self.groups)
            raise

    @classmethod
    def from_conv(cls, conv, **kwargs):
        """A layer whose θ, bias and geometry are copied from a trained ``nn.Conv*d``;
        ``kwargs`` are the SparseVD options (``log_sigma2_init``, ``threshold``, ...)."""
        if not isinstance(conv, cls.dense_type):
            raise TypeError(
                f"{cls.__name__}.from_conv expects an nn.{cls.dense_type.__name__}, got {type(conv).__name__}"
            )
        for name, t in (("weight", conv.weight), ("bias", conv.bias)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{cls.__name__}.from_conv: the convolution's {name} contains NaN or Inf")
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, conv.weight.device, conv.weight.dtype, **kwargs,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.reset_variance_parameters()
        return layer

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1,) * self.dims:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", bias={self.bias is not None}, threshold={self.threshold}, alpha={self.alpha!r}"


class SparseVDConv2d(_SparseVDConvNd):
    """Drop-in replacement for :class:`torch.nn.Conv2d` trained with Sparse VD.

    Args match ``nn.Conv2d`` (``padding`` ints, 'same' or 'valid'; any ``padding_mode``;
    non-square kernels, dilation, groups), plus the SparseVD options of
    :class:`~sparsevd.SparseVDLinear`: ``threshold``, ``log_sigma2_init``,
    ``log_alpha_range`` and ``alpha``. ``weight`` has nn.Conv2d's shape and init;
    ``log_sigma2`` (for ``alpha="weight"``) has the same shape.
    """

    dims = 2
    dense_type = nn.Conv2d


class SparseVDConv1d(_SparseVDConvNd):
    """Drop-in replacement for :class:`torch.nn.Conv1d`; see :class:`SparseVDConv2d`."""

    dims = 1
    dense_type = nn.Conv1d
