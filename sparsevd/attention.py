"""SparseVD attention: :class:`SparseVDMultiheadAttention`, and
:class:`SparseVDTransformerEncoderLayer`, the encoder layer that never takes torch's native
fast path.

``nn.MultiheadAttention`` keeps its query/key/value projections as raw parameters
(``in_proj_weight``, or ``q/k/v_proj_weight``) and, like ``nn.TransformerEncoderLayer``, has
a native inference fast path (``torch._native_multi_head_attention``,
``torch._transformer_encoder_layer_fwd``, nested tensors) that reads the raw weights of
its projections, linear layers and norms directly instead of calling their forwards.
A SparseVD layer's ``weight`` is θ, not θ ⊙ mask, and a sparsified layer has no
``weight`` at all, so a converted model must never take those paths.
:class:`SparseVDMultiheadAttention` computes what ``nn.MultiheadAttention`` computes with
four SparseVD linear layers (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``), always
through their forwards: the LRT in training, θ ⊙ mask in eval, whatever
:func:`sparsevd.sparsify` put in their place afterwards.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as TF

from . import reference
from .layers import SparseVDLinear

__all__ = ["SparseVDMultiheadAttention", "SparseVDTransformerEncoderLayer"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def _positive_int(op, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    return value


class _MultiheadAttention(nn.Module):
    """What ``nn.MultiheadAttention``'s slow path computes, around projections that
    subclasses supply (:meth:`_project`, ``out_proj``), on the heads :meth:`_kept_heads`
    names: all of them here, those left once :func:`sparsevd.sparsify` has removed heads
    that contribute nothing."""

    def _kept_heads(self):
        """The indices of the heads that run (int64), or None when all of them do."""
        return None

    def _project(self, query, key, value):
        return self.q_proj(query), self.k_proj(key), self.v_proj(value)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """As ``nn.MultiheadAttention.forward`` (see its documentation for the shapes):
        ``(attention output, attention weights or None)``."""
        op = type(self).__name__
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        try:
            is_batched = TF._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        except AssertionError as error:
            raise ValueError(f"{op}: {error}") from None
        self_attention = query is key and key is value
        if is_batched and self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        elif not is_batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self_attention:
            key = value = query  # one tensor still, as _project reads it (q, k, v in one call)
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != width:
                raise ValueError(f"{op}: {name} must have {width} features in its last dimension, got shape "
                                 f"{tuple(t.shape)}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"{op}: key and value must have the same sequence length and batch, got shapes "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        tgt_len, bsz, _ = query.shape
        kept = self._kept_heads()
        heads, head_dim = self.num_heads if kept is None else kept.numel(), self.head_dim
        if need_weights and kept is not None:
            raise ValueError(f"{op}: need_weights=True: sparsify() removed {self.num_heads - heads} of the "
                             f"{self.num_heads} heads (their outputs were all pruned), whose attention weights "
                             "can no longer be computed; pass need_weights=False, or sparsify with shrink=False")

        # the masks as torch's slow path reads them (F.multi_head_attention_forward)
        key_padding_mask = TF._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                              other_type=TF._none_or_dtype(attn_mask), other_name="attn_mask",
                                              target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise ValueError(f"{op}: is_causal=True is a hint that attn_mask is the causal mask, so it needs attn_mask "
                             "(nn.Transformer.generate_square_subsequent_mask makes one), as nn.MultiheadAttention "
                             "does")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # F.scaled_dot_product_attention applies the causal mask itself
        else:
            attn_mask = TF._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                           target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        src_len = key.shape[0]
        if attn_mask is not None:
            per_head = (bsz * self.num_heads, tgt_len, src_len)
            expected = (tgt_len, src_len) if attn_mask.dim() == 2 else per_head
            if attn_mask.dim() not in (2, 3) or attn_mask.shape != expected:
                raise ValueError(f"{op}: attn_mask must have shape (L, S) = {(tgt_len, src_len)} or (N·num_heads, "
                                 f"L, S) = {per_head}, got {tuple(attn_mask.shape)}")
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
            elif kept is not None:  # the kept heads' masks
                attn_mask = (attn_mask.view(bsz, self.num_heads, tgt_len, src_len)[:, kept]
                             .reshape(bsz * heads, tgt_len, src_len))
        if key_padding_mask is not None and key_padding_mask.shape != (bsz, src_len):
            raise ValueError(f"{op}: key_padding_mask must have shape (N, S) = {(bsz, src_len)} (or (S,) for an "
                             f"unbatched input), got {tuple(key_padding_mask.shape)}")

        q, k, v = self._project(query, key, value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else TF.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else TF.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros(bsz * heads, 1, head_dim, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else TF.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else TF.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        if key_padding_mask is not None:
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
                                .reshape(bsz * heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            scores = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                scores = torch.baddbmm(attn_mask, scores, k.transpose(-2, -1))
            else:
                scores = torch.bmm(scores, k.transpose(-2, -1))
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = TF.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, heads * head_dim)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                attn_mask = (attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1
                             else attn_mask.view(bsz, heads, attn_mask.shape[1], src_len))
            # explicit lengths: with an empty batch a -1 would be ambiguous
            q, k, v = (t.view(bsz, heads, t.shape[1], head_dim) for t in (q, k, v))
            out = TF.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, heads * head_dim)
            weights = None
        out = self.out_proj(out).unflatten(0, (tgt_len, bsz))
        if not is_batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

class SparseVDMultiheadAttention(_MultiheadAttention):
    """Drop-in replacement for :class:`torch.nn.MultiheadAttention` whose projections are
    :class:`~sparsevd.SparseVDLinear` layers.

    Args and the call match ``nn.MultiheadAttention`` (``embed_dim``, ``num_heads``,
    ``dropout`` on the attention weights in training mode, ``bias``, ``add_bias_kv``,
    ``add_zero_attn``, ``kdim``, ``vdim``, ``batch_first``; ``forward(query, key, value,
    key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)`` returns
    ``(output, weights or None)``), plus the SparseVD options of the projections
    (``threshold``, ``log_sigma2_init``, ``log_alpha_range``, ``alpha``).

    The projections are separate layers, ``q_proj`` ([embed_dim, embed_dim]), ``k_proj``
    ([embed_dim, kdim]), ``v_proj`` ([embed_dim, vdim]) and ``out_proj``: a packed
    ``in_proj_weight`` is its three row blocks, which is the same computation (the LRT
    draws independent noise per output unit). Each is a SparseVD layer of its own: its
    mask, its KL term (summed by :func:`sparsevd.kl_divergence`), its row in
    :func:`sparsevd.report`. ``bias_k``/``bias_v`` (``add_bias_kv``) stay dense
    parameters. The attention itself runs ``F.scaled_dot_product_attention`` when the
    weights are not asked for, and the explicit softmax otherwise, as torch's slow path
    does; there is no native fast path to skip the projections.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, threshold=reference.THRESHOLD,
                 log_sigma2_init=reference.LOG_SIGMA2_INIT, log_alpha_range=reference.LOG_ALPHA_RANGE,
                 alpha="weight"):
        super().__init__()
        op = type(self).__name__
        self.embed_dim = _positive_int(op, "embed_dim", embed_dim)
        self.num_heads = _positive_int(op, "num_heads", num_heads)
        self.kdim = embed_dim if kdim is None else _positive_int(op, "kdim", kdim)
        self.vdim = embed_dim if vdim is None else _positive_int(op, "vdim", vdim)
        if embed_dim % num_heads:
            raise ValueError(f"{op}: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"{op}: dropout must be a number in [0, 1), got {dropout!r}")
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)
        # read by code written for nn.MultiheadAttention
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        options = {"device": device, "dtype": dtype, "threshold": threshold, "log_sigma2_init": log_sigma2_init,
                   "log_alpha_range": log_alpha_range, "alpha": alpha}
        self.q_proj = SparseVDLinear(embed_dim, embed_dim, bias, **options)
        self.k_proj = SparseVDLinear(self.kdim, embed_dim, bias, **options)
        self.v_proj = SparseVDLinear(self.vdim, embed_dim, bias, **options)
        self.out_proj = SparseVDLinear(embed_dim, embed_dim, bias, **options)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, device=device, dtype=dtype))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, device=device, dtype=dtype))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self):
        # nn.MultiheadAttention's initialisation: Xavier-uniform projections (over the packed
        # [3·embed_dim, embed_dim] matrix when q, k and v have one width), zero biases
        with torch.no_grad():
            projections = [getattr(self, name) for name in _PROJECTIONS]
            if self._qkv_same_embed_dim:
                packed = torch.empty(3 * self.embed_dim, self.embed_dim, device=self.q_proj.weight.device,
                                     dtype=self.q_proj.weight.dtype)
                nn.init.xavier_uniform_(packed)
                for layer, block in zip(projections, packed.chunk(3)):
                    layer.weight.copy_(block)
            else:
                for layer in projections:
                    nn.init.xavier_uniform_(layer.weight)
            for layer in projections + [self.out_proj]:
                if layer.bias is not None:
                    layer.bias.zero_()
                layer.reset_variance_parameters()
            for extra in (self.bias_k, self.bias_v):
                if extra is not None:
                    nn.init.xavier_normal_(extra)

    @classmethod
    def from_attention(cls, attention, **kwargs):
        """A SparseVDMultiheadAttention computing what a trained ``nn.MultiheadAttention``
        computes: its projections' weights and biases (the packed ``in_proj_weight`` split
        into q, k, v), ``out_proj``, ``bias_k``/``bias_v`` and options are copied;
        ``kwargs`` are the SparseVD options."""
        if not isinstance(attention, nn.MultiheadAttention):
            raise TypeError(f"from_attention expects an nn.MultiheadAttention, got {type(attention).__name__}")
        source = attention.out_proj.weight
        new = cls(attention.embed_dim, attention.num_heads, dropout=attention.dropout,
                  bias=attention.in_proj_bias is not None, add_bias_kv=attention.bias_k is not None,
                  add_zero_attn=attention.add_zero_attn, kdim=attention.kdim, vdim=attention.vdim,
                  batch_first=attention.batch_first, device=source.device, dtype=source.dtype, **kwargs)
        with torch.no_grad():
            for name, weight in zip(_PROJECTIONS, cls.source_weights(attention)):
                getattr(new, name).weight.copy_(weight)
            if attention.in_proj_bias is not None:
                for name, bias in zip(_PROJECTIONS, attention.in_proj_bias.chunk(3)):
                    getattr(new, name).bias.copy_(bias)
            new.out_proj.weight.copy_(attention.out_proj.weight)
            if attention.out_proj.bias is not None:
                new.out_proj.bias.copy_(attention.out_proj.bias)
            if attention.bias_k is not None:
                new.bias_k.copy_(attention.bias_k)
                new.bias_v.copy_(attention.bias_v)
        for name in _PROJECTIONS + ("out_proj",):
            getattr(new, name).reset_variance_parameters()
        return new

    @staticmethod
    def source_weights(attention):
        """The q, k, v projection weights of an ``nn.MultiheadAttention`` (views of
        ``in_proj_weight`` when packed)."""
        if attention.in_proj_weight is not None:
            return attention.in_proj_weight.chunk(3)
        return attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight

    def extra_repr(self):
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if not self._qkv_same_embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bias_k is not None:
            s += ", add_bias_kv=True"
        if self.add_zero_attn:
            s += ", add_zero_attn=True"
        return s + f", batch_first={self.batch_first}"


class SparseVDTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """An ``nn.TransformerEncoderLayer`` that always runs its layers' forwards.

    ``nn.TransformerEncoderLayer.forward`` takes a native fast path in eval mode without
    autograd (``torch._transformer_encoder_layer_fwd``) that reads ``self_attn``'s packed
    weights and ``linear1.weight``/``linear2.weight`` directly: a SparseVD layer there
    would run without its mask (and without noise under :func:`sparsevd.predict`), a
    sparsified one would not run at all. This subclass computes what the layer's slow path
    computes, in every mode; :func:`sparsevd.convert` puts it in place of every encoder
    layer it converts anything in (the same submodules, parameters and state dict). Built
    directly, it holds torch's layers, like its base class: a SparseVD encoder layer is
    ``sparsevd.convert(nn.TransformerEncoderLayer(...))``.
    """

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        src_key_padding_mask = TF._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                                  other_type=TF._none_or_dtype(src_mask), other_name="src_mask",
                                                  target_type=src.dtype)
        src_mask = TF._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                      target_type=src.dtype, check_other=False)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x
