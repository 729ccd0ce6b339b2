"""Sparse VD at its best on the offline MNIST-5k subset (4,000 training / 1,000 test
images), in three phases: a dense LeNet-300-100, SparseVD started from it, and
fine-tuning with the mask fixed; then the per-layer table and the sparsified network's
measured speed-up over the dense one (one CPU thread):  python -m sparsevd.demo"""

from __future__ import annotations

import argparse
import math
import time
import types

import torch
from tqdm.auto import tqdm

import sparsevd
from sparsevd.reference import THRESHOLD

from . import measure, thresholds
from .data import mnist_5k, train_test_split
from .loop import accuracy, compression_ratio, data_loss, make_loss, train_epoch
from .models import lenet_300_100


def train_phase(model, loss_fn, x, y, epochs, lr, desc, warmup=None, batch_size=100):
    """Adam on the parameters that train, its lr linear down to 0.1 × ``lr``, for
    ``epochs`` epochs under one progress bar (per batch: loss, training accuracy, and for
    a SparseVD network the KL warm-up and the compression at the layers' threshold)."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=max(epochs - 1, 1))
    batches = -(-len(y) // batch_size)
    t0 = time.perf_counter()
    with tqdm(total=epochs * batches, desc=desc, unit="batch", dynamic_ncols=True) as bar:
        for epoch in range(epochs):
            train_epoch(model, optimizer, loss_fn, x, y, batch_size, epoch, warmup, bar)
            scheduler.step()
    return time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sparsevd-demo", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dense-epochs", type=int, default=50, help="training epochs of the dense network")
    parser.add_argument("--epochs", type=int, default=100,
                        help="SparseVD epochs from the dense network (the KL weight ramps 0 → 1 over the first "
                             "third)")
    parser.add_argument("--finetune-epochs", type=int, default=20,
                        help="epochs of fine-tuning with the mask fixed (data term only)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate of the SparseVD epochs")
    parser.add_argument("--threshold", type=float, default=THRESHOLD,
                        help="the mask keeps the weights with log α below it")
    parser.add_argument("--seed", type=int, default=0, help="of the train/test split and the initialisation")
    args = parser.parse_args(argv)
    for flag in ("dense_epochs", "epochs", "finetune_epochs"):
        if getattr(args, flag) < (0 if flag == "finetune_epochs" else 1):
            parser.error(f"--{flag.replace('_', '-')} must be ≥ {0 if flag == 'finetune_epochs' else 1}, "
                         f"got {getattr(args, flag)}")
    if not args.lr > 0 or not math.isfinite(args.lr):
        parser.error(f"--lr must be > 0, got {args.lr}")
    if not math.isfinite(args.threshold):
        parser.error(f"--threshold must be a finite number, got {args.threshold}")

    # One thread: at batch 100 a second one costs more in synchronisation than it saves, and
    # on a busy machine far more (an epoch of SparseVD measured 0.4 s of CPU on one thread,
    # 12 s on two, on 2 shared cores).
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = train_test_split(*mnist_5k(), seed=args.seed)
    n = len(train_y)
    print(f"MNIST-5k: {n} train / {len(test_y)} test images; {sparsevd.dispatch.describe().splitlines()[0]}")

    dense = lenet_300_100(bayesian=False)
    seconds = train_phase(dense, data_loss(), train_x, train_y, args.dense_epochs, 1e-3, "1/3 dense")
    dense_acc = accuracy(dense, test_x, test_y)
    print(f"dense LeNet-300-100: test accuracy {dense_acc:.2%} ({seconds:.0f} s)")

    model = sparsevd.convert(dense)  # the same network in SparseVD layers, θ from the dense one
    warmup = sparsevd.KLWarmup(start=0, end=max(args.epochs // 3, 1))
    seconds = train_phase(model, make_loss(model, n), train_x, train_y, args.epochs, args.lr, "2/3 SparseVD",
                          warmup)
    thresholds.apply(model, args.threshold)
    print(f"SparseVD from the dense network: test accuracy {accuracy(model, test_x, test_y):.2%}, "
          f"{compression_ratio(model):.0f}× fewer weights at log α < {args.threshold:g} ({seconds:.0f} s)")

    if args.finetune_epochs:
        sparsevd.freeze_masks(model)  # θ ⊙ mask from now on: the pruned weights stay zero, log σ² idle
        seconds = train_phase(model, data_loss(), train_x, train_y, args.finetune_epochs, 1e-3,
                              "3/3 fine-tuning")
        print(f"fine-tuned with the mask fixed: test accuracy {accuracy(model, test_x, test_y):.2%} "
              f"({seconds:.0f} s)")

    model.eval()
    acc = accuracy(model, test_x, test_y)
    kept, total = sparsevd.compression(model)
    print()
    print(sparsevd.report(model))
    print()
    print(f"SparseVD LeNet-300-100: test accuracy {acc:.2%} against {dense_acc:.2%} dense "
          f"({100 * (acc - dense_acc):+.1f} points) with {compression_ratio(model):.0f}× fewer weights "
          f"({kept:,} of {total:,})")
    # the training command's timings, which read the network's name and the repeats from its flags
    timings = measure.inference_timings(types.SimpleNamespace(model="lenet300", timing_repeats=50), model,
                                        test_x[:64])
    print("sparsify(model) against the dense network, one CPU thread: " + ", ".join(
        f"{t['speedup']:.1f}× faster at batch {t['batch']} ({1e6 * t['dense_network_s']:.0f} → "
        f"{1e6 * t['sparsified_s']:.0f} µs)" for t in timings if t["batch"] in (1, 64)))
