""":class:`SparseTransformerEncoderLayer`: the inference form :func:`sparsevd.sparsify` gives
an encoder layer whose attention it sparsified.

A sparsified encoder layer computes little (a ViT's at batch 1: a few thousand kept
weights), so its time goes to calling it: the attention module's argument and mask
handling, a module call per dropout and projection, the activation as an op of its own.
In eval mode, with no mask (or a causal one), this layer runs the same arithmetic with
none of that: the packed q/k/v projection, the output projection and the MLP
(``linear1``, the activation, ``linear2``) each as one ``sparsevd::linear_chain`` op (the
activation fused), around the two LayerNorms and ``F.scaled_dot_product_attention``.
Anything else (training mode, autograd, a padding mask or a mask not flagged causal, a
hook, a parametrization, a submodule replaced or of another type, a ``forward`` of its
own) runs the layer's submodules one by one, exactly as
:class:`~sparsevd.SparseVDTransformerEncoderLayer` does; what can change between calls is
read on every call.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.modules.module as _module_state
from torch import nn
from torch.nn import functional as TF

from .attention import SparseVDTransformerEncoderLayer
from .inference import _ABSENT, _ACTIVATIONS, _LINEAR, _Chain
from .plain import runs_as
from .sparse_attention import SparseMultiheadAttention

__all__ = ["SparseTransformerEncoderLayer"]

#: The activation functions an encoder layer is built with, as the modules the chain reads.
_FUNCTIONS = {TF.relu: nn.ReLU, TF.gelu: nn.GELU}


class _Plan:
    """What one layer's fused call reads, and what it watches to know it still may."""

    def __init__(self, layer):
        self.children = list(layer._modules.values())
        self.activation = layer.__dict__.get("activation", _ABSENT)  # a function; a module is a child
        attention = layer.self_attn
        inside = [*self.children, *attention._modules.values()]
        # the layer's own hooks run around any forward; its submodules' only in theirs
        self.hooks = [h for m in inside for h in (m._forward_hooks, m._forward_pre_hooks)]
        self.modules = [layer, *inside]
        self.types = [type(m) for m in self.modules]
        # what else decides whether the layer may fuse, as planned (a plan that may not is
        # made again once that changes)
        self.hooked = any(self.hooks)
        self.dicts = [m.__dict__ for m in self.modules]
        self.own_forwards = self._own_forwards()
        self.chains = None
        if not self._fusable(layer, attention):
            return
        self.stale = []  # the chains mark it when they find their layers changed
        activation = layer.activation
        activation = activation if isinstance(activation, nn.Module) else _FUNCTIONS[activation]()
        self.chains = (self._chain([attention.in_proj], [None]), self._chain([attention.out_proj], [None]),
                       self._chain([layer.linear1, activation, layer.dropout, layer.linear2], [activation, None]))
        self.heads = attention.num_heads - attention.removed_heads
        self.head_dim = attention.head_dim
        self.batch_first = attention.batch_first

    def _chain(self, modules, activations):
        chain = _Chain(modules, False, [m for m in modules if isinstance(m, _LINEAR)], activations)
        chain.stale = self.stale
        return chain

    @staticmethod
    def _fusable(layer, attention):
        if "forward" in layer.__dict__ or not runs_as(attention, (SparseMultiheadAttention,)):
            return False
        if "in_proj" not in attention._modules or attention.bias_k is not None or attention.add_zero_attn:
            return False
        activation = layer.activation
        if isinstance(activation, nn.Module):
            if not runs_as(activation, tuple(_ACTIVATIONS)):
                return False
        elif activation not in _FUNCTIONS:
            return False
        return (all(runs_as(m, _LINEAR) for m in (attention.in_proj, attention.out_proj, layer.linear1, layer.linear2))
                and all(runs_as(m, (nn.LayerNorm,)) for m in (layer.norm1, layer.norm2))
                and all(runs_as(m, (nn.Dropout,)) for m in (layer.dropout, layer.dropout1, layer.dropout2)))

    def _own_forwards(self):
        return ["forward" in d for d in self.dicts]

    def holds_for(self, layer):
        """Whether the plan still describes ``layer``: its children, their types, hooks and
        forwards, and the activation."""
        return (self.children == list(layer._modules.values())
                and layer.__dict__.get("activation", _ABSENT) is self.activation
                and any(self.hooks) == self.hooked and all(map(operator.is_, map(type, self.modules), self.types))
                and self._own_forwards() == self.own_forwards and not (self.chains is not None and self.stale))

    def attention(self, h, causal=False):
        """Self-attention of ``h`` ([N, L, E] batch first, [L, N, E], or unbatched [L, E]),
        each position attending to those up to it alone if ``causal``."""
        qkv = self.chains[0](h)
        if h.dim() == 2:
            qkv = qkv.unsqueeze(0)
        elif not self.batch_first:
            qkv = qkv.transpose(0, 1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        o = TF.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)  # [N, L, heads, head_dim]
        if h.dim() == 2:
            o = o[0]
        elif not self.batch_first:
            o = o.transpose(0, 1)
        return self.chains[1](o.flatten(-2))


def _norm(norm, x):
    return TF.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class SparseTransformerEncoderLayer(SparseVDTransformerEncoderLayer):
    """An encoder layer holding a :class:`~sparsevd.SparseMultiheadAttention` and pruned
    ``linear1``/``linear2`` (CSR :class:`~sparsevd.SparseLinear` or dense ``nn.Linear``),
    whose eval-mode call without masks (or with a causal one) runs as three fused ops around
    the LayerNorms and the attention (see the module). :func:`sparsevd.sparsify` puts it in place of every
    encoder layer whose attention it sparsified: the same object, submodules and state
    dict, with this class."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        # A mask with is_causal=True (a causal mask, as nn.TransformerEncoder detects it) and
        # no padding mask is the causal attention, as the attention module itself computes
        # it: the hint stands for the mask (F.scaled_dot_product_attention's is_causal).
        causal = src_mask is not None and is_causal is True
        if src_key_padding_mask is None and (causal or (src_mask is None and not is_causal)) \
                and self._may_fuse(src):
            plan = self.__dict__.get("_fused_plan")
            if plan is None or not plan.holds_for(self):
                plan = self._fused_plan = _Plan(self)
            if plan.chains is not None and not any(m.training for m in plan.modules):
                return self._fused(plan, src, causal)
        return super().forward(src, src_mask, src_key_padding_mask, is_causal)

    def _may_fuse(self, src):
        # what the module path computes differently, or what it alone can trace or report
        if not isinstance(src, torch.Tensor) or src.dim() not in (2, 3) or src.numel() == 0:
            return False
        if torch.compiler.is_compiling() or _module_state._global_forward_hooks \
                or _module_state._global_forward_pre_hooks:
            return False
        return not (torch.is_grad_enabled() and (src.requires_grad or any(p.requires_grad for p in self.parameters())))

    def _fused(self, plan, x, causal=False):
        attention, mlp = plan.attention, plan.chains[2]
        if self.norm_first:
            x = x + attention(_norm(self.norm1, x), causal)
            return x + mlp(_norm(self.norm2, x))
        x = _norm(self.norm1, x + attention(x, causal))
        return _norm(self.norm2, x + mlp(x))

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_fused_plan", None)  # rebuilt at the first call
        return state
