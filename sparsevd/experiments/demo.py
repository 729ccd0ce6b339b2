"""Train LeNet-300-100 with Sparse VD on the offline MNIST-5k subset, next to a dense
baseline, and print per-layer sparsity and accuracy:  python -m sparsevd.demo"""

from __future__ import annotations

import argparse
import time

import torch

import sparsevd

from .cli import error_rate, make_loss, train_epoch
from .data import mnist_5k, train_test_split
from .models import lenet_300_100


def train(model, x, y, epochs, batch_size=100, lr=1e-3, warmup=None, log=print):
    """Adam with the SGVLB loss (plain cross-entropy when the model has no SparseVD layer)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=epochs)
    loss_fn = make_loss(model, len(y))
    for epoch in range(epochs):
        kl_weight = warmup(epoch) if warmup else 1.0
        loss, _ = train_epoch(model, optimizer, loss_fn, x, y, batch_size, kl_weight)
        scheduler.step()
        if sparsevd.sparsevd_modules(model) and (epoch + 1) % 10 == 0:
            kept, total = sparsevd.compression(model)
            log(f"  epoch {epoch + 1:3d}  loss {loss:.3f}  kl_weight {kl_weight:.2f}  kept {kept}/{total}")
    return model


def accuracy(model, x, y):
    return 1 - error_rate(model, x, y) / 100


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

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
    print(f"{'layer':<8}{'kept':>8}{'total':>9}{'sparsity':>10}{'|W|/|W≠0|':>12}")
    for name, layer in sparsevd.sparsevd_modules(model):
        kept, total = layer.kept_weights(), layer.total_weights()
        print(f"{name:<8}{kept:>8}{total:>9}{1 - kept / total:>10.1%}{total / max(kept, 1):>12.1f}")
    kept, total = sparsevd.compression(model)
    print(f"{'all':<8}{kept:>8}{total:>9}{1 - kept / total:>10.1%}{total / max(kept, 1):>12.1f}")


if __name__ == "__main__":
    main()
