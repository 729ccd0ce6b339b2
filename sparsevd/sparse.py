"""SparseLinear, SparseConv2d, SparseConv1d: inference layers that store a pruned weight in
CSR and run it with the SpMM kernels (``sparsevd.functional.csr_linear``)."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as F
from . import reference
from .shapes import explicit_padding

#: Bumped whenever the saved layout of SparseLinear changes; loading another version fails.
#: 2: the [out_features, in_features] shape is saved (a version-1 file could load into a
#: layer of another input width without any error).
FORMAT_VERSION = 2


_csr_linear = torch.ops.sparsevd.csr_linear.default


def dense_to_csr(weight):
    """(crow_indices, col_indices, values) of the non-zeros of a 2-D ``weight`` (int32 indices)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf")
    nonzero = weight != 0
    counts = nonzero.sum(1)
    crow = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(counts, 0, out=crow[1:])
    rows, cols = nonzero.nonzero(as_tuple=True)
    return crow.int(), cols.int(), weight[rows, cols].contiguous()


def dense_linear(weight, bias):
    """An ``nn.Linear`` holding ``weight`` [out, in] and ``bias`` (or None): a pruned weight's
    dense form."""
    layer = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                               device=weight.device, dtype=weight.dtype)  # overwritten at once
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class SparseLinear(nn.Module):
    """y = x W_csrᵀ + b for a weight stored in CSR (rows = output features).

    Build it with :meth:`from_dense` (any masked weight) or :meth:`from_sparsevd`. The layer
    owns its buffers (the constructor and ``load_state_dict`` copy what they are given), and
    checks the CSR structure once, at construction and load, and again only if its index
    buffers are edited in place; the kernels also check every index they read, so no input
    reads outside its buffers. A state dict from another format version, another shape or
    with a corrupt structure is refused with an error; its values are converted to this
    layer's dtype, as ``nn.Linear`` does.
    """

    def __init__(self, in_features, out_features, crow_indices, col_indices, values, bias=None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        F.validate_csr(crow_indices, col_indices, values, (self.out_features, self.in_features))
        with torch.inference_mode(False):  # built under inference_mode, it still serves autograd later
            self._own(crow_indices, col_indices, values, bias)
        self._checked = self._structure_key()

    def _own(self, crow_indices, col_indices, values, bias):
        self.register_buffer("crow_indices", crow_indices.detach().clone(memory_format=torch.contiguous_format))
        self.register_buffer("col_indices", col_indices.detach().clone(memory_format=torch.contiguous_format))
        self.register_buffer("values", values.detach().clone(memory_format=torch.contiguous_format))
        # derived from the structure, so not saved: rebuilt whenever the structure changes
        self.register_buffer("row_order", F.rows_by_length(self.crow_indices), persistent=False)
        # Stored as tensors so they survive any way of saving a state dict.
        self.register_buffer("format_version", torch.tensor(FORMAT_VERSION, dtype=torch.int32))
        self.register_buffer("shape", torch.tensor([self.out_features, self.in_features], dtype=torch.int64))
        if bias is not None:
            bias = bias.detach().clone()
            if bias.shape != (self.out_features,) or bias.dtype != values.dtype or bias.device != values.device:
                raise ValueError("bias must be a tensor of shape (out_features,) with the values' dtype and device")
            if not bool(torch.isfinite(bias).all()):
                raise ValueError("bias contains NaN or Inf")
            self.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(cls, weight, bias=None):
        """From a dense [out_features, in_features] weight whose zeros are the pruned entries."""
        weight = weight.detach()
        crow, col, values = dense_to_csr(weight)
        return cls(weight.shape[1], weight.shape[0], crow, col, values, None if bias is None else bias.detach())

    @classmethod
    def from_sparsevd(cls, layer):
        """From a trained :class:`~sparsevd.SparseVDLinear`: its θ ⊙ mask and bias."""
        with torch.no_grad():
            return cls.from_dense(layer.weight * layer.mask(), layer.bias)

    @property
    def nnz(self):
        return self.values.numel()

    def to_dense(self):
        """The dense [out_features, in_features] weight."""
        return reference.csr_to_dense(self.crow_indices, self.col_indices, self.values, self.in_features)

    def _structure_key(self):
        crow, col = self._buffers["crow_indices"], self._buffers["col_indices"]
        if crow.is_inference() or col.is_inference():
            return None  # no version counter: never the key of a check (_recheck owns normal copies)
        return crow._version, crow.data_ptr(), col._version, col.data_ptr()

    def _recheck(self):
        """The index buffers were edited or replaced since they were checked: check again
        (and reschedule the rows) before any kernel reads them."""
        F.validate_csr(self.crow_indices, self.col_indices, self.values, (self.out_features, self.in_features))
        with torch.inference_mode(False):
            for name, tensor in self._buffers.items():
                # replaced by inference tensors (a .to() under inference_mode): they keep no
                # version counter to watch, and autograd cannot save them, so own copies
                if tensor is not None and tensor.is_inference():
                    self._buffers[name] = tensor.clone()
            self.row_order = F.rows_by_length(self.crow_indices)
        self._checked = self._structure_key()

    def forward(self, input):
        # At batch 1 the kernel takes a few microseconds: the tensors are read straight from
        # the buffer dict (a module attribute lookup is a Python-level fallback), and only
        # what can change between calls is checked: edited or replaced indices, the input.
        # A traced graph (torch.compile, torch.export) has no data pointers to watch: its
        # buffers were checked at construction or load_state_dict.
        buffers = self._buffers
        crow, col = buffers["crow_indices"], buffers["col_indices"]
        if not torch.compiler.is_compiling():
            try:
                stale = self._checked != (crow._version, crow.data_ptr(), col._version, col.data_ptr())
            except RuntimeError:  # inference tensors have no version counter: _recheck replaces them
                stale = True
            if stale:
                self._recheck()
                crow, col = buffers["crow_indices"], buffers["col_indices"]
        if input.dim() == 2 and input.shape[1] == self.in_features:
            return _csr_linear(input, crow, col, buffers["values"], self._parameters["bias"], buffers["row_order"])
        if input.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"SparseLinear: expected input of shape [*, {self.in_features}], got {tuple(input.shape)}"
            )
        # [*, in] as the op's 2-D [rows, in] (a transformer's [batch, tokens, d]: the decoding step's [1, 1, d]
        # would otherwise pay functional.csr_linear's Python checks, which the op makes itself)
        y = _csr_linear(input.reshape(-1, self.in_features), crow, col, buffers["values"], self._parameters["bias"],
                        buffers["row_order"])
        return y.view(*input.shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        name = prefix.rstrip(".") or type(self).__name__
        saved = state_dict.get(prefix + "format_version")
        version = int(saved) if isinstance(saved, torch.Tensor) and saved.numel() == 1 else None
        if version != FORMAT_VERSION:
            error_msgs.append(
                f"{name}: saved with SparseLinear format version {version}, this sparsevd reads version "
                f"{FORMAT_VERSION}" + (" (re-create it with sparsify() from the SparseVD model)" if version == 1 else "")
            )
            return
        shape = state_dict.get(prefix + "shape")
        expected = (self.out_features, self.in_features)
        if not isinstance(shape, torch.Tensor) or shape.numel() != 2 or tuple(shape.tolist()) != expected:
            got = tuple(shape.tolist()) if isinstance(shape, torch.Tensor) else shape
            error_msgs.append(f"{name}: size mismatch: the state dict holds a [out, in] = {got} weight, "
                              f"this layer is {list(expected)}")
            return
        loaded = {}
        for key in ("crow_indices", "col_indices", "values"):
            if prefix + key not in state_dict:
                missing_keys.append(prefix + key)
                return
            loaded[key] = state_dict[prefix + key]
        wrong = {k: type(v).__name__ for k, v in loaded.items() if not isinstance(v, torch.Tensor)}
        if wrong:
            error_msgs.append(f"{name}: the CSR weight must be tensors, got {wrong}")
            return
        if not loaded["values"].is_floating_point():
            error_msgs.append(f"{name}: values must be a floating-point tensor")
            return
        # copies on this layer's device, values in this layer's dtype: the layer owns its
        # buffers, and a float32 file loads into a half layer as it would into nn.Linear
        device, dtype = self.values.device, self.values.dtype
        loaded = {k: v.to(device=device, dtype=dtype if k == "values" else v.dtype, copy=True)
                  for k, v in loaded.items()}
        try:
            F.validate_csr(loaded["crow_indices"], loaded["col_indices"], loaded["values"], expected)
        except ValueError as error:
            error_msgs.append(f"{name}: corrupt CSR weight: {error}")
            return
        bias_key = prefix + "bias"
        bias = state_dict.get(bias_key)
        if self.bias is not None:
            if bias is None:
                missing_keys.append(bias_key)
                return
            if not isinstance(bias, torch.Tensor):
                error_msgs.append(f"{name}: bias must be a tensor, got {type(bias).__name__}")
                return
            if bias.shape != self.bias.shape or not bool(torch.isfinite(bias).all()):
                error_msgs.append(f"{name}: corrupt bias of shape {tuple(bias.shape)}")
                return
        elif bias is not None:
            unexpected_keys.append(bias_key)
            return
        for key, tensor in loaded.items():
            setattr(self, key, tensor)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias)
        self._recheck()

    def extra_repr(self):
        density = self.nnz / max(1, self.in_features * self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz} "
            f"({density:.2%} dense), bias={self.bias is not None}"
        )


def _block_diagonal(weight, groups):
    """A grouped convolution's weight [out, C / groups, *kernel] as one [out, C·∏kernel] matrix
    over all of im2col's patch entries (channel-major, as ``F.unfold`` orders them)."""
    out, per_group = weight.shape[0], weight[0].numel()
    dense = weight.new_zeros(out, per_group * groups)
    rows = out // groups
    for g in range(groups):
        dense[g * rows:(g + 1) * rows, g * per_group:(g + 1) * per_group] = weight[g * rows:(g + 1) * rows].flatten(1)
    return dense


class _SparseConvNd(nn.Module):
    """A pruned convolution run as im2col + CSR SpMM: the input's patches (``F.unfold``,
    [N·L, C·∏kernel] for L output positions) times the CSR weight [out, C·∏kernel]ᵀ, a
    :class:`SparseLinear` (``.gemm``, so its state dict is checked the same way). A
    grouped convolution is one block-diagonal CSR matrix. Inference only.
    """

    dims: int
    dense_type: type

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, gemm):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)
        self.padding, self.padding_mode = padding, padding_mode
        if gemm.in_features != in_channels * math.prod(self.kernel_size) or gemm.out_features != out_channels:
            raise ValueError(
                f"{type(self).__name__}: the CSR weight must be [{out_channels}, "
                f"{in_channels * math.prod(self.kernel_size)}], got [{gemm.out_features}, {gemm.in_features}]"
            )
        self._pad = explicit_padding(padding, self.kernel_size, self.dilation)
        self.gemm = gemm

    @classmethod
    def from_dense(cls, conv):
        """From an ``nn.Conv*d`` whose zero weights are the pruned ones."""
        if not isinstance(conv, cls.dense_type):
            raise TypeError(
                f"{cls.__name__}.from_dense expects an nn.{cls.dense_type.__name__}, got {type(conv).__name__}"
            )
        weight = _block_diagonal(conv.weight.detach(), conv.groups)
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, conv.padding_mode, SparseLinear.from_dense(weight, conv.bias))

    @property
    def nnz(self):
        return self.gemm.nnz

    def forward(self, input):
        op = type(self).__name__
        if input.dim() not in (self.dims + 1, self.dims + 2) or input.shape[-self.dims - 1] != self.in_channels:
            raise ValueError(
                f"{op}: expected input [batch, {self.in_channels}, {'L' if self.dims == 1 else 'H, W'}] "
                f"(or without the batch), got shape {tuple(input.shape)}"
            )
        batched = input.dim() == self.dims + 2
        x = input if batched else input.unsqueeze(0)
        if any(self._pad):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = torch.nn.functional.pad(x, self._pad, mode=mode)
        # a 1-d convolution is a 2-d one of height 1
        lead = (1,) * (2 - self.dims)
        spatial = lead + tuple(x.shape[2:])
        kernel, stride, dilation = lead + self.kernel_size, lead + self.stride, lead + self.dilation
        out_size = [(s - d * (k - 1) - 1) // st + 1 for s, k, st, d in zip(spatial, kernel, stride, dilation)]
        if min(out_size) < 1:
            raise ValueError(f"{op}: input of spatial size {tuple(input.shape[-self.dims:])} is smaller than the kernel")
        patches = torch.nn.functional.unfold(x.reshape(x.shape[0], x.shape[1], *spatial), kernel, dilation, 0, stride)
        y = self.gemm(patches.transpose(1, 2))  # [N, L, out]
        y = y.transpose(1, 2).reshape(x.shape[0], self.out_channels, *out_size[2 - self.dims:])
        return y if batched else y.squeeze(0)

    def extra_repr(self):
        density = self.nnz / max(1, self.gemm.in_features * self.out_channels) * self.groups
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"padding_mode={self.padding_mode!r}, nnz={self.nnz} ({density:.2%} dense)"
        )


class SparseConv2d(_SparseConvNd):
    """A pruned :class:`torch.nn.Conv2d` in CSR, run as im2col + SpMM; see ``sparsify``."""

    dims = 2
    dense_type = nn.Conv2d


class SparseConv1d(_SparseConvNd):
    """A pruned :class:`torch.nn.Conv1d` in CSR, run as im2col + SpMM; see ``sparsify``."""

    dims = 1
    dense_type = nn.Conv1d
