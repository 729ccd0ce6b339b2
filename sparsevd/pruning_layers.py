"""Finding the layers that prune: the SparseVD and SBPDropout layers of a model, and the
one refusal (or warning) for a model that has none. Below both training and sparsify,
which each ask."""

from __future__ import annotations

from . import _warnings
from ._validate import module
from .layers import SparseVDModule
from .sbp import sbp_modules


def sparsevd_modules(model):
    """The SparseVD layers of ``model`` (in ``model.modules()`` order), with their names."""
    module("sparsevd_modules", model)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseVDModule)]


def require_pruning_layers(model, what, warn=False, hint=""):
    """The SparseVD and SBPDropout layers of ``model`` (name, layer), in ``model.modules()``
    order. A model without any (a plain model, where nothing would be pruned) is refused
    with a ValueError that says what to do, in the name of ``what`` (the function or class
    the user called), which ends with ``hint`` if given; with ``warn=True`` it is a
    UserWarning instead (at the user's call), and the list is empty. A ``model`` that is
    not an ``nn.Module`` is a TypeError."""
    module(what, model)
    layers = sparsevd_modules(model) + sbp_modules(model)
    if not layers:
        message = (f"{what}: {type(model).__name__} has no SparseVD layers and no SBPDropout layers, so nothing in "
                   "it is pruned; convert it first (model = sparsevd.convert(model) swaps its nn.Linear and "
                   "nn.Conv1d/2d layers for SparseVD ones) or build it from sparsevd.SparseVDLinear / SparseVDConv2d"
                   f"{hint}")
        if not warn:
            raise ValueError(message)
        _warnings.warn(message)
    return layers
