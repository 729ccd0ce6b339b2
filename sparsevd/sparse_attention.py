""":class:`SparseMultiheadAttention`: the inference form :func:`sparsevd.sparsify` gives a
trained :class:`~sparsevd.SparseVDMultiheadAttention`.

Its projections are ordinary layers holding θ ⊙ mask, whose form (CSR
:class:`~sparsevd.SparseLinear` or dense ``nn.Linear``) sparsify's cost model then chooses
like any other linear layer's. Two things make it cheaper than the SparseVD layer in eval
mode beyond that:

- heads that contribute nothing are removed: a head whose value rows (weights, bias and
  ``bias_v`` entries) are all pruned outputs zeros, and so does one whose columns of
  ``out_proj`` are all pruned; either way dropping its rows of q, k, v and its columns of
  ``out_proj`` is exact. A head whose query or key rows are all pruned still attends
  (uniformly over the keys, or by its bias), so it stays.
- when q, k and v have one input width, the three projections are one layer, ``in_proj``
  ([q; k; v] rows of the kept heads): self-attention (``query is key is value``, as the
  transformer layers call it) projects with one call, one CSR kernel at batch 1. Other
  calls (cross-attention, a KV-cache loop passing the past inputs as key and value) use
  its row blocks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as TF

from .attention import SparseVDMultiheadAttention, _MultiheadAttention
from .sparse import SparseLinear, dense_linear

__all__ = ["SparseMultiheadAttention"]


def _inference_linear(weight, bias):
    """An nn.Linear holding ``weight``/``bias`` that sparsify's cost model may turn into CSR."""
    layer = dense_linear(weight, bias)
    layer.sparsevd_origin = True  # sparsify's mark: a pruned weight whose form the cost model chooses
    return layer


def _head_rows(kept, head_dim):
    """The feature indices of the heads ``kept``, in order."""
    return (kept.unsqueeze(1) * head_dim + torch.arange(head_dim, device=kept.device)).reshape(-1)


def _dead_heads(v_weight, v_bias, bias_v, out_weight, heads):
    """A bool per head: True if it adds nothing to the output (see the module)."""
    def per_head(t):  # [heads, ...] of the rows (or out_proj's columns) of each head
        return t.reshape(heads, -1) != 0

    values = per_head(v_weight).any(1)
    if v_bias is not None:
        values |= per_head(v_bias).any(1)
    if bias_v is not None:
        values |= per_head(bias_v.reshape(-1)).any(1)
    read = per_head(out_weight.t().contiguous()).any(1)
    return ~(values & read)


class SparseMultiheadAttention(_MultiheadAttention):
    """Computes what a trained :class:`~sparsevd.SparseVDMultiheadAttention` computes in
    eval mode (the same call and result as ``nn.MultiheadAttention``), with its heads that
    contribute nothing removed and q, k, v packed into one layer where they can be. Build
    it with :meth:`from_sparsevd`; :func:`sparsevd.sparsify` does.

    Removed heads have no attention weights: a call with ``need_weights=True`` on a layer
    that lost heads is refused (sparsify with ``shrink=False`` keeps every head). A 3-D
    ``attn_mask`` is still given for all ``num_heads`` heads.
    """

    def __init__(self, source, kept, projections, out_proj):
        super().__init__()
        for name in ("embed_dim", "num_heads", "head_dim", "kdim", "vdim", "batch_first", "add_zero_attn",
                     "dropout", "_qkv_same_embed_dim"):
            setattr(self, name, getattr(source, name))
        width = kept.numel() * self.head_dim
        self.removed_heads = self.num_heads - kept.numel()
        self.register_buffer("kept_heads", kept, persistent=False)
        if len(projections) == 1:
            self.in_proj = projections[0]
            self._block_width = width
            self._blocks = None  # row blocks of a CSR in_proj, built at the first call that needs them
        else:
            self.q_proj, self.k_proj, self.v_proj = projections
        self.out_proj = out_proj
        for name in ("bias_k", "bias_v"):
            extra = getattr(source, name)
            self.register_buffer(name, None if extra is None else extra.detach()[..., _head_rows(kept, self.head_dim)]
                                 .clone())

    @classmethod
    def from_sparsevd(cls, attention, shrink=True):
        """From a trained :class:`~sparsevd.SparseVDMultiheadAttention`: the θ ⊙ mask of its
        projections, without the heads that contribute nothing (if ``shrink``)."""
        if not isinstance(attention, SparseVDMultiheadAttention):
            raise TypeError(f"{cls.__name__}.from_sparsevd expects a SparseVDMultiheadAttention, got "
                            f"{type(attention).__name__}")
        with torch.no_grad():
            masked = {name: getattr(attention, name).weight * getattr(attention, name).mask()
                      for name in ("q_proj", "k_proj", "v_proj", "out_proj")}
            biases = {name: getattr(attention, name).bias for name in masked}
            heads = attention.num_heads
            dead = torch.zeros(heads, dtype=torch.bool, device=masked["v_proj"].device)
            if shrink:
                dead = _dead_heads(masked["v_proj"], biases["v_proj"], attention.bias_v, masked["out_proj"], heads)
                if bool(dead.all()):
                    dead[0] = False  # one head stays, so that every tensor keeps a shape (it outputs zeros)
            kept = (~dead).nonzero().reshape(-1)
            rows = _head_rows(kept, attention.head_dim)

            def part(name):
                bias = biases[name]
                return masked[name][rows], None if bias is None else bias[rows]

            parts = [part(name) for name in ("q_proj", "k_proj", "v_proj")]
            if attention._qkv_same_embed_dim:
                bias = None if parts[0][1] is None else torch.cat([b for _, b in parts])
                projections = [_inference_linear(torch.cat([w for w, _ in parts]), bias)]
            else:
                projections = [_inference_linear(*p) for p in parts]
            out_proj = _inference_linear(masked["out_proj"][:, rows], biases["out_proj"])
            return cls(attention, kept, projections, out_proj)

    def _kept_heads(self):
        return self._buffers["kept_heads"] if self.removed_heads else None

    def _project(self, query, key, value):
        if "in_proj" not in self._modules:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if query is key and key is value:
            return self._modules["in_proj"](query).chunk(3, dim=-1)
        return tuple(self._block(i, x) for i, x in enumerate((query, key, value)))

    def _block(self, i, x):
        """Block ``i`` (q, k, v) of the packed projection applied to ``x``."""
        layer, width = self._modules["in_proj"], self._block_width
        if isinstance(layer, nn.Linear):
            bias = None if layer.bias is None else layer.bias[i * width:(i + 1) * width]
            return TF.linear(x, layer.weight[i * width:(i + 1) * width], bias)
        if torch.compiler.is_compiling():
            # a traced graph has no data pointers to key a cache by, and building CSR blocks
            # is data-dependent: the whole packed projection, then its block
            return layer(x)[..., i * width:(i + 1) * width]
        key = tuple((t.data_ptr(), t._version) for t in (*layer.buffers(), *layer.parameters()))
        if self._blocks is None or self._blocks[0] != key:
            weight = layer.to_dense()
            bias = layer.bias
            self._blocks = (key, [SparseLinear.from_dense(weight[j * width:(j + 1) * width],
                                                          None if bias is None else bias[j * width:(j + 1) * width])
                                  for j in range(3)])
        return self._blocks[1][i](x)

    def __getstate__(self):
        state = super().__getstate__().copy()
        if "_blocks" in state:
            state["_blocks"] = None  # rebuilt from in_proj: not worth saving
        return state

    def extra_repr(self):
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.removed_heads:
            s += f", removed_heads={self.removed_heads}"
        if not self._qkv_same_embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        return s + f", batch_first={self.batch_first}"
