"""SparseLinear: the inference layer that stores a pruned weight in CSR and runs it with
the SpMM kernels (``sparsevd.functional.csr_linear``)."""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from . import reference

#: Bumped whenever the saved layout of SparseLinear changes; loading another version fails.
FORMAT_VERSION = 1
_BUFFERS = ("crow_indices", "col_indices", "values")


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


class SparseLinear(nn.Module):
    """y = x W_csrᵀ + b for a weight stored in CSR (rows = output features).

    Build it with :meth:`from_dense` (any masked weight) or :meth:`from_sparsevd`. The CSR
    buffers travel with the state dict; loading a state dict checks the format version
    and the CSR structure, so a file from another version or a corrupted one is refused
    with an error rather than computing garbage.
    """

    def __init__(self, in_features, out_features, crow_indices, col_indices, values, bias=None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        F.validate_csr(crow_indices, col_indices, values, (self.out_features, self.in_features))
        self.register_buffer("crow_indices", crow_indices)
        self.register_buffer("col_indices", col_indices)
        self.register_buffer("values", values)
        # Stored as a tensor so it survives any way of saving a state dict.
        self.register_buffer("format_version", torch.tensor(FORMAT_VERSION, dtype=torch.int32))
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

    def forward(self, input):
        if input.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"SparseLinear: expected input of shape [*, {self.in_features}], got {tuple(input.shape)}"
            )
        # validated once, at construction and load
        return F.csr_linear(input, self.crow_indices, self.col_indices, self.values, self.bias, validate=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        saved = state_dict.get(prefix + "format_version")
        version = int(saved) if isinstance(saved, torch.Tensor) and saved.numel() == 1 else None
        if version != FORMAT_VERSION:
            error_msgs.append(
                f"{prefix or 'SparseLinear'}: saved with SparseLinear format version {version}, "
                f"this sparsevd reads version {FORMAT_VERSION}"
            )
            return
        # The CSR buffers change size with the number of non-zeros: replace, don't copy.
        loaded = {}
        for name in _BUFFERS:
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                return
            loaded[name] = state_dict[key]
        try:
            F.validate_csr(loaded["crow_indices"], loaded["col_indices"], loaded["values"], (self.out_features, self.in_features))
        except ValueError as error:
            error_msgs.append(f"{prefix or 'SparseLinear'}: corrupt CSR weight: {error}")
            return
        for name, tensor in loaded.items():
            setattr(self, name, tensor.to(self._buffers[name].device))
        bias_key = prefix + "bias"
        if self.bias is not None:
            if bias_key not in state_dict:
                missing_keys.append(bias_key)
                return
            bias = state_dict[bias_key]
            if bias.shape != self.bias.shape or not bool(torch.isfinite(bias).all()):
                error_msgs.append(f"{prefix or 'SparseLinear'}: corrupt bias of shape {tuple(bias.shape)}")
                return
            with torch.no_grad():
                self.bias.copy_(bias)
        elif bias_key in state_dict:
            unexpected_keys.append(bias_key)

    def extra_repr(self):
        density = self.nnz / max(1, self.in_features * self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz} "
            f"({density:.2%} dense), bias={self.bias is not None}"
        )
