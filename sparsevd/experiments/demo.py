"""Train LeNet-300-100 with Sparse VD on the offline MNIST-5k subset, next to a dense
baseline, and print per-layer sparsity and accuracy:  python -m sparsevd.demo"""

from __future__ import annotations

import argparse
import time

import torch

import sparsevd

from .data import mnist_5k, train_test_split
from .loop import accuracy, threshold_of, train
from .models import lenet_300_100


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sparsevd-demo", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40, help="training epochs of each network")
    parser.add_argument("--seed", type=int, default=0, help="of the train/test split and the initialisation")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be ≥ 1, got {args.epochs}")

    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = train_test_split(*mnist_5k(), seed=args.seed)
    print(f"MNIST-5k: {len(train_y)} train / {len(test_y)} test images; {sparsevd.dispatch.describe().splitlines()[0]}")

    t0 = time.perf_counter()
    dense = train(lenet_300_100(bayesian=False), train_x, train_y, args.epochs)
    print(f"dense LeNet-300-100: test accuracy {accuracy(dense, test_x, test_y):.2%} ({time.perf_counter() - t0:.0f} s)")

    t0 = time.perf_counter()
    model = lenet_300_100(bayesian=True)
    warmup = sparsevd.KLWarmup(start=args.epochs // 12, end=args.epochs // 3)
    train(model, train_x, train_y, args.epochs, warmup=warmup)
    print(f"SparseVD LeNet-300-100: test accuracy {accuracy(model, test_x, test_y):.2%} ({time.perf_counter() - t0:.0f} s)")
    print(f"kept weights: log α < {threshold_of(model)}")
    print(f"{'layer':<8}{'kept':>8}{'total':>9}{'sparsity':>10}{'|W|/|W≠0|':>12}")
    for name, layer in sparsevd.sparsevd_modules(model):
        kept, total = layer.kept_weights(), layer.total_weights()
        print(f"{name:<8}{kept:>8}{total:>9}{1 - kept / total:>10.1%}{total / max(kept, 1):>12.1f}")
    kept, total = sparsevd.compression(model)
    print(f"{'all':<8}{kept:>8}{total:>9}{1 - kept / total:>10.1%}{total / max(kept, 1):>12.1f}")
