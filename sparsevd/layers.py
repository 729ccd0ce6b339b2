"""Drop-in SparseVD layers.

A SparseVD layer keeps the usual ``weight`` (the posterior mean θ) and ``bias``, plus a
``log_sigma2`` parameter of the same shape as ``weight`` (the additive-noise
reparameterization: σ² is learned directly, which lowers the gradient variance
against learning α). In training mode it samples pre-activations with the local
reparameterization trick; in eval mode it is the deterministic masked layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as F
from . import reference


class SparseVDModule(nn.Module):
    """What every SparseVD layer has: log α, the pruning mask, the KL term and counts.

    Subclasses own ``weight`` and ``log_sigma2`` parameters of one shape.
    """

    def _init_sparsevd(self, threshold, log_sigma2_init, log_alpha_range):
        threshold = float(threshold)
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold}")
        if not math.isfinite(float(log_sigma2_init)):
            raise ValueError(f"log_sigma2_init must be a finite number, got {log_sigma2_init}")
        lo, hi = (float(v) for v in log_alpha_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"log_alpha_range must be two finite numbers lo < hi, got {log_alpha_range}")
        self.threshold = threshold
        self.log_sigma2_init = float(log_sigma2_init)
        self.log_alpha_range = (lo, hi)

    @property
    def log_alpha(self):
        """log α = clamp(log σ² − log(θ² + 1e-8)) per weight (no gradient)."""
        with torch.no_grad():
            return reference.log_alpha(self.weight, self.log_sigma2, self.log_alpha_range)

    def mask(self):
        """Boolean mask of the weights kept at the current threshold (log α < threshold)."""
        with torch.no_grad():
            return reference.prune_mask(self.weight, self.log_sigma2, self.threshold, self.log_alpha_range)

    def kl(self):
        """Σ KL(q‖p) over this layer's weights: a differentiable 0-dim float32 tensor."""
        return F.kl_divergence(self.weight, self.log_sigma2, self.log_alpha_range)

    def kept_weights(self):
        """Number of weights that survive pruning."""
        return int(self.mask().sum())

    def total_weights(self):
        return self.weight.numel()


class SparseVDLinear(SparseVDModule):
    """Drop-in replacement for :class:`torch.nn.Linear` trained with Sparse VD.

    Args match ``nn.Linear`` (inputs ``[*, in_features]``), plus
    ``threshold`` (prune where log α ≥ threshold, default 3.0), ``log_sigma2_init``
    (initial log σ², default −10: start almost deterministic) and
    ``log_alpha_range`` (clamp of log α, default (−10, 10)).
    """

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        device=None,
        dtype=None,
        threshold=reference.THRESHOLD,
        log_sigma2_init=-10.0,
        log_alpha_range=reference.LOG_ALPHA_RANGE,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self._init_sparsevd(threshold, log_sigma2_init, log_alpha_range)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.log_sigma2 = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        # θ and b exactly as nn.Linear initializes them, so swapping layers keeps a recipe.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.constant_(self.log_sigma2, self.log_sigma2_init)

    def forward(self, input):
        if self.training:
            return F.lrt_linear(input, self.weight, self.log_sigma2, self.bias)
        return F.masked_linear(input, self.weight, self.mask(), self.bias)

    @classmethod
    def from_linear(cls, linear, **kwargs):
        """A SparseVDLinear whose θ and bias are copied from a trained ``nn.Linear``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            **kwargs,
        )
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, threshold={self.threshold}"
        )
