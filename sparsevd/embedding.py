"""SparseVD embeddings: :class:`SparseVDEmbedding` (training) and :class:`SparseEmbedding`
(inference, the pruned table with its empty rows removed).

An embedding is a linear layer applied to one-hot inputs, so it gets the parameterisation
of :class:`~sparsevd.SparseVDLinear` unchanged: θ (``weight``, [num_embeddings,
embedding_dim]) and log σ² of the same shape (or a shared log α, by ``alpha``), the same
KL term, log α and mask. Only the sampling differs: a lookup reads one row per position,
so sampling the looked-up weights *is* the local reparameterization, y[p] = θ[i_p] +
σ[i_p] ⊙ z[p] with independent noise per position (:func:`sparsevd.reference.embedding_sample`).
Eval mode looks up θ ⊙ mask.
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from . import reference
from .layers import SparseVDModule, _is_dtensor

__all__ = ["SparseVDEmbedding", "SparseEmbedding"]


def _positive_int(op, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    return value


def _check_indices(op, input, num_embeddings):
    """The clear error for indices that ``F.embedding`` refused."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a tensor of indices, got {type(input).__name__}")
    if input.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: input must hold int64 or int32 indices, got dtype {input.dtype}")
    if input.numel() and not (0 <= int(input.min()) and int(input.max()) < num_embeddings):
        raise ValueError(f"{op}: indices must lie in [0, {num_embeddings}), got values in "
                         f"[{int(input.min())}, {int(input.max())}]")


def _kl_without_row(weight, log_sigma2, row, log_alpha_range):
    """Σ KL over the rows of ``weight`` but ``row`` (none when it is out of range): the two
    slices go through the kernel, so the left-out row gets exactly no gradient."""
    if not 0 <= row < weight.shape[0]:
        return F.kl_divergence(weight, log_sigma2, log_alpha_range)
    return (F.kl_divergence(weight[:row], log_sigma2[:row], log_alpha_range)
            + F.kl_divergence(weight[row + 1:], log_sigma2[row + 1:], log_alpha_range))


class SparseVDEmbedding(SparseVDModule):
    """Drop-in replacement for :class:`torch.nn.Embedding` trained with Sparse VD.

    Args match ``nn.Embedding`` (``num_embeddings``, ``embedding_dim``, ``padding_idx``,
    ``scale_grad_by_freq``), plus the SparseVD options of :class:`~sparsevd.SparseVDLinear`
    (``threshold``, ``log_sigma2_init``, ``log_alpha_range``, ``alpha``; a shared
    ``alpha="unit"`` is one log α per row, i.e. per token).

    ``padding_idx``: as in ``nn.Embedding``, that row is zero at initialisation and a
    constant: positions looking it up get θ[padding_idx] without noise, and neither the
    data nor the KL term (which leaves the row out) gives it a gradient.

    Not supported, refused with an error: ``max_norm`` (``nn.Embedding`` renormalises the
    looked-up rows of its weight in place at every call, which would move θ, and so log α,
    behind the optimiser's back) and ``sparse=True`` (the KL term's gradient reaches every
    row, so the gradient is dense whatever the lookup reads).
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, device=None, dtype=None,
                 threshold=reference.THRESHOLD, log_sigma2_init=reference.LOG_SIGMA2_INIT,
                 log_alpha_range=reference.LOG_ALPHA_RANGE, alpha="weight"):
        super().__init__()
        op = type(self).__name__
        self.num_embeddings = _positive_int(op, "num_embeddings", num_embeddings)
        self.embedding_dim = _positive_int(op, "embedding_dim", embedding_dim)
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not (
                    -num_embeddings <= padding_idx < num_embeddings):
                raise ValueError(f"{op}: padding_idx must be None or an int in [-{num_embeddings}, "
                                 f"{num_embeddings}), got {padding_idx!r}")
            padding_idx %= num_embeddings
        if max_norm is not None:
            raise ValueError(f"{op}: max_norm is not supported: nn.Embedding renormalises the looked-up rows of its "
                             "weight in place at every call, which would move θ (and so log α) behind the "
                             "optimiser's back; normalise the embeddings in the model instead, or keep this layer "
                             "dense")
        if sparse:
            raise ValueError(f"{op}: sparse=True is not supported: the KL term's gradient reaches every row, so the "
                             "gradient of a SparseVD embedding is dense whatever the lookup reads")
        self.padding_idx = padding_idx
        self.max_norm, self.norm_type, self.sparse = None, float(norm_type), False
        self.scale_grad_by_freq = bool(scale_grad_by_freq)
        self._init_sparsevd(threshold, log_sigma2_init, log_alpha_range, alpha)
        self._create_parameters((self.num_embeddings, self.embedding_dim), False, {"device": device, "dtype": dtype})

    def reset_parameters(self):
        # as nn.Embedding initialises its table
        nn.init.normal_(self.weight)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].fill_(0)
        self.reset_variance_parameters()

    @classmethod
    def from_embedding(cls, embedding, **kwargs):
        """A SparseVDEmbedding whose θ is copied from a trained ``nn.Embedding`` (with its
        ``padding_idx`` and ``scale_grad_by_freq``); ``max_norm`` and ``sparse=True`` are
        refused (see the class)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"from_embedding expects an nn.Embedding, got {type(embedding).__name__}")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                    max_norm=embedding.max_norm, norm_type=embedding.norm_type,
                    scale_grad_by_freq=embedding.scale_grad_by_freq, sparse=embedding.sparse,
                    device=embedding.weight.device, dtype=embedding.weight.dtype, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(embedding.weight)
        layer.reset_variance_parameters()
        return layer

    def _lookup(self, input, weight):
        return torch.nn.functional.embedding(input, weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq)

    def forward(self, input):
        try:
            if not self.training:
                return self._lookup(input, self._effective_weight())
            if self.frozen_mask is not None and not self.frozen_noise:
                return self._lookup(input, self.weight * self.frozen_mask)
            if self.frozen_mask is None:
                weight, log_sigma2 = self.weight, self.variance_log_sigma2()
            else:
                weight, log_sigma2 = self.weight * self.frozen_mask, self._frozen_log_sigma2()
            mean = self._lookup(input, weight)
            # exp of the looked-up rows only; the sampling step is the LRT's fused kernel
            y = F.lrt_sample(mean, self._lookup(input, log_sigma2).exp())
        except (IndexError, RuntimeError, TypeError):
            _check_indices(type(self).__name__, input, self.num_embeddings)
            raise
        if self.padding_idx is not None:
            y = torch.where((input == self.padding_idx).unsqueeze(-1), mean, y)
        return y

    def kl(self):
        """Σ KL(q‖p) over the weights, the padding row left out (it is a constant, not a
        random weight); see :meth:`SparseVDModule.kl`."""
        p = self.padding_idx
        if p is None:
            return super().kl()
        if self.variant == "weight":
            if _is_dtensor(self.weight):
                return self._sharded_kl()
            return _kl_without_row(self.weight, self.log_sigma2, p, self.log_alpha_range)
        if _is_dtensor(self.weight):
            raise NotImplementedError(f"{type(self).__name__}.kl(): a shared alpha={self.variant!r} with a padding_idx "
                                      "is not supported on parameters sharded by FSDP2")
        raw = self._raw_variance()
        acc = torch.float64 if raw.dtype == torch.float64 else torch.float32
        per_alpha = reference.kl_from_log_alpha(torch.clamp(raw.to(acc), *self.log_alpha_range))
        if self.variant == "unit":  # one log α per row: leave the padding row's out
            return (per_alpha[:p].sum() + per_alpha[p + 1:].sum()) * self.embedding_dim
        return per_alpha.sum() * (self.weight.numel() - self.embedding_dim)

    def _sharded_kl(self):
        """:meth:`SparseVDModule._sharded_kl`, the padding row left out by the rank that holds it."""
        if self.padding_idx is None:
            return super()._sharded_kl()
        from torch.distributed.tensor import DTensor, Partial, Replicate
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        weight, log_sigma2 = self.weight, self.log_sigma2
        if not _is_dtensor(log_sigma2) or (log_sigma2.device_mesh, log_sigma2.placements) != (
                weight.device_mesh, weight.placements):
            raise NotImplementedError(f"{type(self).__name__}.kl(): weight and log_sigma2 must be sharded alike")
        _, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
        local = _kl_without_row(weight.to_local(), log_sigma2.to_local(), self.padding_idx - offset[0],
                                self.log_alpha_range)
        partial = [Partial() if p.is_shard() else Replicate() for p in weight.placements]
        return DTensor.from_local(local, weight.device_mesh, partial).full_tensor()

    def extra_repr(self):
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.scale_grad_by_freq:
            s += ", scale_grad_by_freq=True"
        s += f", threshold={self.threshold}"
        return s + ("" if self.variant == "weight" else f", alpha={self.alpha!r}")


#: Bumped whenever the saved layout of SparseEmbedding changes; loading another version fails.
FORMAT_VERSION = 1


def _check_table(op, rows, weight, num_embeddings, embedding_dim):
    """Check a row-compacted table once (construction, load): ``rows`` maps every index to a
    row of ``weight``, whose last row is all zeros."""
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.shape != (num_embeddings,):
        raise ValueError(f"{op}: rows must be an int64 tensor of shape ({num_embeddings},), got "
                         f"{getattr(rows, 'dtype', type(rows).__name__)} {tuple(getattr(rows, 'shape', ()))}")
    if (not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2
            or weight.shape[1] != embedding_dim or weight.shape[0] < 1):
        raise ValueError(f"{op}: weight must be a floating-point [kept rows + 1, {embedding_dim}] tensor, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    if rows.device != weight.device:
        raise ValueError(f"{op}: rows is on {rows.device} but weight is on {weight.device}")
    if bool((rows < 0).any()) or bool((rows >= weight.shape[0]).any()):
        raise ValueError(f"{op}: rows must index the {weight.shape[0]} rows of weight")
    if bool(weight[-1].ne(0).any()):
        raise ValueError(f"{op}: the last row of weight (the pruned rows' lookup) must be zero")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{op}: weight contains NaN or Inf")


class SparseEmbedding(nn.Module):
    """An inference embedding whose pruned rows are removed: the lookup of a pruned
    :class:`SparseVDEmbedding` (or any table whose zeros are the pruned entries).

    ``weight`` ([kept rows + 1, embedding_dim], a buffer) holds the rows that keep at least
    one entry, in index order (their pruned entries are zeros), then one zero row;
    ``rows`` (int64 [num_embeddings]) maps each index to its row of ``weight``, every fully
    pruned index to the zero row. A lookup is ``weight[rows[input]]``: exactly the masked
    dense lookup, in two gathers, and it traces and exports as plain indexing. Rows are
    the unit removed: the entries pruned inside a kept row are stored as zeros.

    The table is checked at construction and at ``load_state_dict`` (an index map out of
    range, a non-zero last row, another format version or shape are refused); torch's
    indexing checks every index a call reads.
    """

    def __init__(self, num_embeddings, embedding_dim, rows, weight):
        super().__init__()
        op = type(self).__name__
        self.num_embeddings = _positive_int(op, "num_embeddings", num_embeddings)
        self.embedding_dim = _positive_int(op, "embedding_dim", embedding_dim)
        _check_table(op, rows, weight, self.num_embeddings, self.embedding_dim)
        with torch.inference_mode(False):  # built under inference_mode, its buffers are still ordinary ones
            self.register_buffer("rows", rows.detach().clone(memory_format=torch.contiguous_format))
            self.register_buffer("weight", weight.detach().clone(memory_format=torch.contiguous_format))
            self.register_buffer("format_version", torch.tensor(FORMAT_VERSION, dtype=torch.int32))
            self.register_buffer("shape", torch.tensor([self.num_embeddings, self.embedding_dim], dtype=torch.int64))

    @classmethod
    def from_dense(cls, weight):
        """From a dense [num_embeddings, embedding_dim] table whose zeros are the pruned entries."""
        weight = weight.detach()
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"{cls.__name__}.from_dense: expected a 2-D floating-point table, got "
                             f"{weight.dtype} {tuple(weight.shape)}")
        kept = weight.ne(0).any(1)
        count = int(kept.sum())
        rows = torch.full((weight.shape[0],), count, dtype=torch.int64, device=weight.device)
        rows[kept] = torch.arange(count, device=weight.device)
        table = torch.cat([weight[kept], weight.new_zeros(1, weight.shape[1])])
        return cls(weight.shape[0], weight.shape[1], rows, table)

    @classmethod
    def from_sparsevd(cls, layer):
        """From a trained :class:`SparseVDEmbedding`: its θ ⊙ mask."""
        if not isinstance(layer, SparseVDEmbedding):
            raise TypeError(f"{cls.__name__}.from_sparsevd expects a SparseVDEmbedding, got {type(layer).__name__}")
        with torch.no_grad():
            return cls.from_dense(layer.weight * layer.mask())

    @property
    def kept_rows(self):
        return self.weight.shape[0] - 1

    @property
    def nnz(self):
        return int(torch.count_nonzero(self.weight))

    def to_dense(self):
        """The dense [num_embeddings, embedding_dim] table."""
        return self.weight[self.rows]

    def forward(self, input):
        try:  # index_select, not rows[input], which would read a negative index from the end
            rows = self._buffers["rows"].index_select(0, input.reshape(-1)).view(input.shape)
            return torch.nn.functional.embedding(rows, self._buffers["weight"])
        except (AttributeError, IndexError, RuntimeError, TypeError):
            _check_indices(type(self).__name__, input, self.num_embeddings)
            raise

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        name = prefix.rstrip(".") or type(self).__name__
        saved = state_dict.get(prefix + "format_version")
        version = int(saved) if isinstance(saved, torch.Tensor) and saved.numel() == 1 else None
        if version != FORMAT_VERSION:
            error_msgs.append(f"{name}: saved with SparseEmbedding format version {version}, this sparsevd reads "
                              f"version {FORMAT_VERSION}")
            return
        shape = state_dict.get(prefix + "shape")
        expected = (self.num_embeddings, self.embedding_dim)
        if not isinstance(shape, torch.Tensor) or shape.numel() != 2 or tuple(shape.tolist()) != expected:
            got = tuple(shape.tolist()) if isinstance(shape, torch.Tensor) else shape
            error_msgs.append(f"{name}: size mismatch: the state dict holds a {got} table, this layer is "
                              f"{list(expected)}")
            return
        for key in ("rows", "weight"):
            if prefix + key not in state_dict:
                missing_keys.append(prefix + key)
                return
        rows, weight = state_dict[prefix + "rows"], state_dict[prefix + "weight"]
        if not (isinstance(weight, torch.Tensor) and weight.is_floating_point()):
            error_msgs.append(f"{name}: weight must be a floating-point tensor")
            return
        # copies on this layer's device, in its dtype, as SparseLinear loads its values
        device = self.weight.device
        weight = weight.to(device=device, dtype=self.weight.dtype, copy=True)
        rows = rows.to(device=device, copy=True) if isinstance(rows, torch.Tensor) else rows
        try:
            _check_table(type(self).__name__, rows, weight, *expected)
        except ValueError as error:
            error_msgs.append(f"{name}: corrupt table: {error}")
            return
        self.rows, self.weight = rows, weight

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim}, kept_rows={self.kept_rows}, nnz={self.nnz} "
                f"({self.nnz / (self.num_embeddings * self.embedding_dim):.2%} dense)")
