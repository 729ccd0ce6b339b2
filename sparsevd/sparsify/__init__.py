"""sparsify(model): turn a trained SparseVD model into the fastest correct inference model.

Two paths share the same rules (:mod:`.sequential` holds them for one ``nn.Sequential``,
:mod:`.graph` applies them to a torch.fx graph of the whole model) and the same cost model
(:mod:`.cost`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..attention import SparseVDTransformerEncoderLayer
from ..inference import FusedSequential
from ..pruning_layers import require_pruning_layers
from ..sparse_attention import SparseMultiheadAttention
from ..sparse_transformer import SparseTransformerEncoderLayer
from . import graph, sequential
from .cost import CPU_COST, CUDA_COST, CostModel, DeviceCost

__all__ = ["CPU_COST", "CUDA_COST", "CostModel", "DeviceCost", "sparsify"]


def sparsify(model, batch_size=1, cost_model=None, shrink=True, input_shape=None):
    """An inference copy of ``model`` (eval mode) with every SBPDropout and eval-mode
    BatchNorm folded into a neighbouring layer, dead units cut, and every SparseVD layer
    pruned and replaced by a CSR layer (:class:`SparseLinear`, :class:`SparseConv2d`,
    :class:`SparseConv1d`) or a (smaller) dense ``nn.Linear``/``nn.Conv*d``, whichever
    ``cost_model`` predicts faster at ``batch_size`` on the model's device. The result
    computes what ``model.eval()`` computes, up to float rounding. ``model`` is unchanged.

    A convolution's cost depends on its number of output positions: pass ``input_shape``,
    the shape of one example without the batch (``(1, 28, 28)``, say), to let the cost
    model choose for convolutions; without it they stay dense (masked, dead filters cut).
    ``input_shape`` also lets a ``view``/``reshape`` that flattens each example count as
    a flatten (without it only ``flatten``/``nn.Flatten`` do).

    An ``nn.Sequential`` model gives an ``nn.Sequential`` back: a
    :class:`~sparsevd.FusedSequential` whose chains of linear layers and elementwise
    activations run as one op each (and, on CUDA, as a replayed CUDA graph per input
    shape). Any other model is traced with torch.fx and rewritten as a whole: a
    ``torch.fx.GraphModule`` (or, where all of it became one chain, that
    ``FusedSequential``); see :mod:`sparsevd.sparsify.graph` for what is cut where, and why
    that is exact. A model torch.fx cannot trace falls back, with a warning naming
    the part that stopped the trace, to the per-module path: every ``nn.Sequential`` inside
    it is sparsified as above, and the rest runs as it is.
    """
    require_pruning_layers(model, "sparsify", warn=True,
                           hint="; without them sparsify returns a copy that computes what the model does")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    cost_model = cost_model or CostModel()
    # Under torch.inference_mode the copy and the layers built from it would be inference
    # tensors, whose version counters the CSR layers read; the result is for inference
    # anyway, and is built without autograd.
    with torch.inference_mode(False), torch.no_grad():
        inference = copy.deepcopy(model).eval()
        sequential.replace_sparsevd(inference, shrink)
        result = None
        if type(model) not in (nn.Sequential, FusedSequential):
            result = graph.sparsify_graph(inference, batch_size, cost_model, shrink, input_shape)
        if result is None:
            result = sequential.sparsify_modules(inference, batch_size, cost_model, shrink, input_shape)
        for m in result.modules():
            if type(m) is SparseVDTransformerEncoderLayer and type(m.self_attn) is SparseMultiheadAttention:
                m.__class__ = SparseTransformerEncoderLayer  # the same layer, its eval call fused
            for flag in ("sparsevd_origin", "_sbp_folded"):
                if flag in m.__dict__:
                    delattr(m, flag)
        for p in result.parameters():  # the layers built above too: an inference copy trains nothing
            p.requires_grad_(False)
    return result.eval()
