"""The paper's networks, as ``nn.Sequential`` so that :func:`sparsevd.sparsify` can cut
their dead units: LeNet-300-100 and LeNet-5-Caffe, dense or SparseVD.

Both take images ``[N, 1, 28, 28]`` (LeNet-300-100 also takes flat ``[N, 784]``).
"""

from __future__ import annotations

from torch import nn

from sparsevd import SparseVDConv2d, SparseVDLinear


def lenet_300_100(bayesian=True):
    """784-300-100-10 with ReLUs; SparseVD layers when ``bayesian``, else ``nn.Linear``."""
    linear = SparseVDLinear if bayesian else nn.Linear
    return nn.Sequential(nn.Flatten(), linear(784, 300), nn.ReLU(), linear(300, 100), nn.ReLU(), linear(100, 10))


def lenet5_caffe(bayesian=True):
    """LeNet-5-Caffe: conv 1→20 5×5, pool 2, conv 20→50 5×5, pool 2, fc 800→500, fc 500→10
    (ReLUs after the convolutions and the first fc)."""
    conv, linear = (SparseVDConv2d, SparseVDLinear) if bayesian else (nn.Conv2d, nn.Linear)
    return nn.Sequential(
        conv(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
        conv(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), linear(800, 500), nn.ReLU(), linear(500, 10),
    )


MODELS = {"lenet300": lenet_300_100, "lenet5": lenet5_caffe}
NETWORK_NAMES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5-Caffe"}
