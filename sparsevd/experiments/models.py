"""The papers' networks, as ``nn.Sequential`` so that :func:`sparsevd.sparsify` can cut
their dead units: LeNet-300-100, the MLP 784-500-300-10 and LeNet-5-Caffe, dense,
SparseVD, with Structured Bayesian Pruning (SBP), or both; a class-style ResNet with
BatchNorm for 28×28 inputs (:class:`ResNet`, ``resnet``: ResNet-8), the kind of model users
bring; and a small vision transformer (:func:`vit`), dense or SparseVD.

All take images ``[N, 1, 28, 28]`` (the MLPs also take flat ``[N, 784]``).

Where SBP goes (:func:`with_sbp`): on the output channels of every convolution and on the
inputs of every fully-connected layer that does not read a convolution. That follows the
SBP paper's table (Neklyudov et al. 2017; necludov/group-sparsity-sbp README), which
prunes the MLP's 784 input pixels and hidden units (784-500-300 → 245-160-55) and
LeNet-5's filters and hidden units (20-50-800-500 → 3-18-284-283). LeNet-5's 800 inputs
of its first fully-connected layer are its second convolution's 50 channels × 16
positions, so the SBP on those channels prunes them too (18 channels kept: at most 288
inputs, where the paper's per-input SBP kept 284); a second SBP there would buy four
inputs at the price of the cut: ``sparsify`` cuts a convolution's channels from the
layer after a Flatten only when nothing (not even the Identity a folded SBP leaves)
stands between them. (The repository's lenet5-sbp.py script puts SBP on the two
convolutions only.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import sparsevd
from sparsevd import SBPDropout, SparseVDConv2d, SparseVDLinear

#: --method: (SparseVD layers?, SBP layers?). Magnitude pruning trains the dense network
#: (its masks are torch.nn.utils.prune's, see :mod:`.magnitude`).
METHODS = {"dense": (False, False), "sparsevd": (True, False), "sbp": (False, True), "sparsevd+sbp": (True, True),
           "magnitude": (False, False)}


def lenet_300_100(bayesian=True):
    """784-300-100-10 with ReLUs; SparseVD layers when ``bayesian``, else ``nn.Linear``."""
    linear = SparseVDLinear if bayesian else nn.Linear
    return nn.Sequential(nn.Flatten(), linear(784, 300), nn.ReLU(), linear(300, 100), nn.ReLU(), linear(100, 10))


def mlp_500_300(bayesian=True):
    """784-500-300-10 with ReLUs, the SBP paper's fully-connected network ("LeNet-fc");
    SparseVD layers when ``bayesian``, else ``nn.Linear``."""
    linear = SparseVDLinear if bayesian else nn.Linear
    return nn.Sequential(nn.Flatten(), linear(784, 500), nn.ReLU(), linear(500, 300), nn.ReLU(), linear(300, 10))


def lenet5_caffe(bayesian=True):
    """LeNet-5-Caffe: conv 1→20 5×5, pool 2, conv 20→50 5×5, pool 2, fc 800→500, fc 500→10
    (ReLUs after the convolutions and the first fc)."""
    conv, linear = (SparseVDConv2d, SparseVDLinear) if bayesian else (nn.Conv2d, nn.Linear)
    return nn.Sequential(
        conv(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
        conv(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), linear(800, 500), nn.ReLU(), linear(500, 10),
    )


class BasicBlock(nn.Module):
    """3×3 conv, BatchNorm, ReLU, 3×3 conv, BatchNorm, plus the shortcut (a 1×1 conv and
    BatchNorm where the shape changes), then ReLU (He et al. 2016)."""

    def __init__(self, in_channels, channels, stride, conv):
        super().__init__()
        self.conv1 = conv(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(conv(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet for 28×28 single-channel images: a 3×3 stem, stages of :class:`BasicBlock`
    (``blocks`` per stage, ``widths`` channels, stride 2 from the second stage on), global
    average pooling and one fully-connected layer. SparseVD convolutions and linear layer
    when ``bayesian``."""

    def __init__(self, blocks=(1, 1, 1), widths=(16, 32, 64), num_classes=10, bayesian=True):
        super().__init__()
        conv, linear = (SparseVDConv2d, SparseVDLinear) if bayesian else (nn.Conv2d, nn.Linear)
        self.stem = nn.Sequential(conv(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, channels = [], widths[0]
        for stage, (count, width) in enumerate(zip(blocks, widths)):
            for i in range(count):
                layers.append(BasicBlock(channels, width, 2 if stage > 0 and i == 0 else 1, conv))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = linear(channels, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))

    def with_sbp(self, threshold=1.0):
        """This network with an :class:`SBPDropout` on the channels inside every block (after
        ``bn1``, before the ReLU): the channels that only ``conv2`` reads, so that a pruned one
        is cut from both convolutions. The channels of the residual stream stay, as every
        block and the shortcut add into them. Returns ``self``."""
        for block in self.blocks:
            block.bn1 = nn.Sequential(block.bn1, SBPDropout(block.bn1.num_features, threshold=threshold))
        return self


def resnet8(bayesian=True):
    """ResNet-8: the stem, three stages of one :class:`BasicBlock` (16, 32, 64 channels) and
    the classifier."""
    return ResNet((1, 1, 1), (16, 32, 64), bayesian=bayesian)


class PatchEmbedding(nn.Module):
    """Non-overlapping ``patch``×``patch`` patches of a [N, 1, 28, 28] image, each projected to
    ``d`` features (a convolution of stride ``patch``), plus a learned position embedding
    (a parameter, as in ViT: it is added, not a weight that multiplies, and not pruned):
    [N, tokens, d]."""

    def __init__(self, d, patch, image=28):
        super().__init__()
        if image % patch:
            raise ValueError(f"PatchEmbedding: patch {patch} does not divide the image size {image}")
        self.proj = nn.Conv2d(1, d, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2, d) * 0.02)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class MeanTokens(nn.Module):
    """[N, tokens, d] → [N, d]: the mean over the tokens (ViT's pooling without a class token)."""

    def forward(self, x):
        return x.mean(1)


def vit(bayesian=True, d=64, heads=4, layers=3, patch=7, mlp=128):
    """A vision transformer for 28×28 images: 7×7 patches (16 tokens) embedded to ``d``,
    ``layers`` pre-norm encoder layers (GELU MLP of width ``mlp``, no dropout), a final
    LayerNorm, mean pooling over the tokens and a linear head to 10 classes. Sized so that
    a dense run and a SparseVD run from it, with fine-tuning, fit in about an hour on two
    CPU cores. SparseVD layers when ``bayesian`` (:func:`sparsevd.convert` of the dense
    network: the same parameter names, so a dense run's state dict loads into it)."""
    layer = nn.TransformerEncoderLayer(d, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    model = nn.Sequential(PatchEmbedding(d, patch), nn.TransformerEncoder(layer, layers, enable_nested_tensor=False),
                          nn.LayerNorm(d), MeanTokens(), nn.Linear(d, 10))
    return sparsevd.convert(model) if bayesian else model


#: The parts of a transformer whose sparsity the results give apart, by the layer's name.
PARTS = {"self_attn": "attention", "linear1": "MLP", "linear2": "MLP", "proj": "embedding"}


def part(layer_name):
    """The part of :func:`vit` a layer (by name) belongs to: attention, MLP, embedding or head."""
    return next((p for key, p in PARTS.items() if key in layer_name.split(".")), "head")


def sparsity_by_part(rows):
    """{part: {"kept", "total", "sparsity"}} of the per-layer rows of :func:`.measure.structure`."""
    parts = {}
    for r in rows:
        p = parts.setdefault(part(r["layer"]), {"kept": 0, "total": 0})
        p["kept"] += r["kept"]
        p["total"] += r["total"]
    for p in parts.values():
        p["sparsity"] = 1 - p["kept"] / p["total"]
    return parts


def with_sbp(model, threshold=1.0):
    """``model`` (an ``nn.Sequential``) with an :class:`SBPDropout` after every convolution
    (on its output channels, before the activation, as the authors place it) and before
    every fully-connected layer that does not read a convolution (on its inputs). The
    layers themselves are ``model``'s, so a trained network's state dict, loaded before,
    stays; a unit is kept when its SNR > ``threshold``. A :class:`ResNet` places its own
    (:meth:`ResNet.with_sbp`)."""
    if isinstance(model, ResNet):
        return model.with_sbp(threshold)
    linear, conv = (nn.Linear, SparseVDLinear), (nn.Conv2d, SparseVDConv2d)
    layers, previous = [], None
    for module in model:
        if isinstance(module, linear) and not isinstance(previous, conv):
            layers.append(SBPDropout(module.in_features, threshold=threshold))
        layers.append(module)
        if isinstance(module, conv):
            layers.append(SBPDropout(module.out_channels, threshold=threshold))
        if isinstance(module, linear + conv):
            previous = module
    return nn.Sequential(*layers)


def build(name, method, sbp_threshold=1.0):
    """Network ``name`` (a key of :data:`MODELS`) for ``method`` (a key of :data:`METHODS`)."""
    sparse_vd, sbp = METHODS[method]
    model = MODELS[name](bayesian=sparse_vd)
    return with_sbp(model, sbp_threshold) if sbp else model


MODELS = {"lenet300": lenet_300_100, "mlp500": mlp_500_300, "lenet5": lenet5_caffe, "resnet": resnet8,
          "vit": vit}
NETWORK_NAMES = {"lenet300": "LeNet-300-100", "mlp500": "MLP 784-500-300-10", "lenet5": "LeNet-5-Caffe",
                 "resnet": "ResNet-8", "vit": "ViT (7×7 patches, d 64, 3 layers)"}
#: Networks whose results split the sparsity by :func:`part`.
TRANSFORMERS = {"vit"}
METHOD_NAMES = {"dense": "dense", "sparsevd": "SparseVD", "sbp": "SBP", "sparsevd+sbp": "SparseVD + SBP",
                "magnitude": "magnitude pruning"}
