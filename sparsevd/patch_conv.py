""":class:`PatchConv2d`: the form :func:`sparsevd.sparsify` gives a pruned convolution that
cuts its input into non-overlapping patches (stride equal to the kernel, no padding,
dilation or groups: a vision transformer's patch embedding).

Such a convolution is a linear layer applied to each patch, and its patches are a reshape
of the input, not the im2col copy of an overlapping convolution. Run that way it skips
the convolution's per-call setup (oneDNN's, on the CPU), which at a few patches per image
is most of its time (``bench/bench_vit.py --split`` times a ViT's patch embedding both ways).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .sparse import SparseLinear, dense_linear

__all__ = ["PatchConv2d"]


def is_patch_conv(conv):
    """Whether ``conv`` is an ``nn.Conv2d`` that :class:`PatchConv2d` computes: stride equal
    to the kernel, no padding, no dilation, one group. A 1×1 convolution is left out: it is a
    per-pixel linear layer, not a patch embedding, and was not measured this way."""
    return (type(conv) is nn.Conv2d and tuple(conv.stride) == tuple(conv.kernel_size)
            and math.prod(conv.kernel_size) > 1 and conv.padding in ((0, 0), "valid")
            and tuple(conv.dilation) == (1, 1) and conv.groups == 1)


class PatchConv2d(nn.Module):
    """What an ``nn.Conv2d`` of stride equal to its kernel computes (no padding, dilation
    or groups), as a linear layer over its patches: each ``kernel_size`` patch flattened
    channel-major (the order of the convolution's weight) times ``gemm``, a CSR
    :class:`SparseLinear` or a dense ``nn.Linear`` of weight [out_channels,
    in_channels·kh·kw]. Rows and columns past the last whole patch are skipped, as the
    convolution skips them. Build it with :meth:`from_conv`."""

    def __init__(self, in_channels, out_channels, kernel_size, gemm):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = tuple(int(k) for k in kernel_size)
        if not isinstance(gemm, (nn.Linear, SparseLinear)):
            raise TypeError(f"PatchConv2d: gemm must be an nn.Linear or a SparseLinear, got {type(gemm).__name__}")
        patch = self.in_channels * math.prod(self.kernel_size)
        if (gemm.out_features, gemm.in_features) != (self.out_channels, patch):
            raise ValueError(f"PatchConv2d: gemm must map {patch} features to {self.out_channels}, got "
                             f"[{gemm.out_features}, {gemm.in_features}]")
        self.gemm = gemm

    @classmethod
    def from_conv(cls, conv, sparse):
        """From a patch convolution (:func:`is_patch_conv`) whose zero weights are the
        pruned ones: a CSR ``gemm`` if ``sparse``, else a dense one."""
        if not is_patch_conv(conv):
            raise ValueError(f"PatchConv2d.from_conv expects an nn.Conv2d of stride equal to its kernel, without "
                             f"padding, dilation or groups, got {conv}")
        weight = conv.weight.detach().reshape(conv.out_channels, -1)
        bias = None if conv.bias is None else conv.bias.detach()
        gemm = SparseLinear.from_dense(weight, bias) if sparse else dense_linear(weight, bias)
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, gemm)

    def forward(self, input):
        if not isinstance(input, torch.Tensor) or input.dim() not in (3, 4) or input.shape[-3] != self.in_channels:
            shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(f"PatchConv2d: expected input [batch, {self.in_channels}, H, W] (or without the batch), "
                             f"got {shape}")
        x = input if input.dim() == 4 else input.unsqueeze(0)
        n, c, h, w = x.shape
        kh, kw = self.kernel_size
        rows, cols = h // kh, w // kw
        if rows < 1 or cols < 1:
            raise ValueError(f"PatchConv2d: input of spatial size {(h, w)} is smaller than the kernel {(kh, kw)}")
        if (rows * kh, cols * kw) != (h, w):
            x = x[:, :, :rows * kh, :cols * kw]
        patches = x.reshape(n, c, rows, kh, cols, kw).permute(0, 2, 4, 1, 3, 5).reshape(n, rows * cols, c * kh * kw)
        # contiguous, as the convolution's output is (code after it may .view() it)
        y = self.gemm(patches).transpose(1, 2).contiguous().view(n, self.out_channels, rows, cols)
        return y if input.dim() == 4 else y[0]

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.kernel_size}"
