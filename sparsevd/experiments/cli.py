"""The training command, ``sparsevd-train`` / ``python -m sparsevd.train``: flags in
:mod:`.config`, data in :mod:`.data`, the loop in :mod:`.loop`, checkpoints in
:mod:`.checkpoints`, the report in :mod:`.results` and :mod:`.plots`."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shlex
import sys
import time

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import sparsevd

from . import config, loop, plots, results
from .checkpoints import (CHECKPOINT, CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, load_pretrained,
                          save_checkpoint)
from .data import load_data
from .models import MODELS, NETWORK_NAMES


@dataclasses.dataclass
class Run:
    """What a run carries from epoch to epoch, and what its checkpoint holds."""

    c: object  # the checked flags
    config: dict  # the flags as saved in the checkpoint, with the command line
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    data: dict
    log: logging.Logger
    history: list = dataclasses.field(default_factory=list)
    snapshots: dict = dataclasses.field(default_factory=lambda: {"epochs": [], "conv": [], "fc": []})
    warnings: list = dataclasses.field(default_factory=list)  # lines for results.md
    collapse_reported: bool = False
    epoch: int = 0  # epochs done

    @property
    def checkpoint_path(self):
        return os.path.join(self.c.out, CHECKPOINT)

    def warn(self, line):
        self.log.warning(line)
        self.warnings.append(line)

    def record_snapshot(self):
        self.snapshots["epochs"].append(self.epoch)
        snap = plots.snapshot(self.model)
        for key in ("conv", "fc"):
            self.snapshots[key].append(snap.get(key))

    def save(self):
        device = torch.device(self.c.device)
        save_checkpoint(self.checkpoint_path, {
            "format": CHECKPOINT_FORMAT, "config": self.config, "epoch": self.epoch,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "history": self.history, "snapshots": self.snapshots, "warnings": self.warnings,
            "collapse_reported": self.collapse_reported,
        })

    def restore(self, state):
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"{self.checkpoint_path} does not fit this model: {error}") from None
        torch.set_rng_state(state["rng_cpu"].cpu())
        device = torch.device(self.c.device)
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
        self.history, self.snapshots, self.epoch = state["history"], state["snapshots"], state["epoch"]
        # checkpoints written before warnings were kept have none to restore
        self.warnings = state.get("warnings", [])
        self.collapse_reported = state.get("collapse_reported", False)


def _logger(out):
    log = logging.getLogger(f"sparsevd.train.{os.path.abspath(out)}")
    log.setLevel(logging.INFO)
    log.propagate = False
    _close_handlers(log)
    file_handler = logging.FileHandler(os.path.join(out, "train.log"))
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    console = logging.StreamHandler(sys.stderr)  # routed around the progress bars by logging_redirect_tqdm
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(file_handler)
    log.addHandler(console)
    return log


def _close_handlers(log):
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def _configure(argv):
    """The checked flags and the config dict a checkpoint keeps; bad flags exit with usage."""
    parser = config.build_parser()
    c = parser.parse_args(argv)
    try:
        config.check_config(c)
        if c.compare_dense:
            results.read_summary(c.compare_dense)  # now rather than after hours of training
    except ValueError as error:
        parser.error(str(error))
    saved = dict(vars(c))
    saved["command"] = shlex.join(["python", "-m", "sparsevd.train"] + list(sys.argv[1:] if argv is None else argv))
    return c, saved


def train_epochs(run, epochs, loss_fn, warmup):
    """Train ``run`` on until ``epochs`` epochs are done: per epoch, the steps (the KL
    warm-up per step), validation, the collapse check, a checkpoint and a log line."""
    c, data, model = run.c, run.data, run.model
    bayesian = bool(sparsevd.sparsevd_modules(model))
    n_batches = math.ceil(len(data["train_y"]) / c.batch_size)
    train_chance = loop.chance(data["train_y"])
    snap_at = set(plots.snapshot_epochs(c.epochs))
    for epoch in range(run.epoch, epochs):
        t0 = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        with tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                  dynamic_ncols=True, disable=None) as bar:
            stats = loop.train_epoch(model, run.optimizer, loss_fn, data["train_x"], data["train_y"], c.batch_size,
                                     epoch, warmup if bayesian else None, bar)
        run.scheduler.step()
        kept, total = sparsevd.compression(model) if bayesian else (0, 0)
        kl_weight = c.kl_weight * stats.warmup if bayesian else 0.0
        row = {"epoch": epoch + 1, "loss": stats.loss, "train_acc": stats.accuracy, "kl_weight": kl_weight,
               "lr": lr, "val_error": loop.error_rate(model, data["val_x"], data["val_y"]), "kept": kept,
               "total": total, "threshold": loop.threshold_of(model) if bayesian else None,
               "seconds": time.perf_counter() - t0}
        run.history.append(row)
        run.epoch = epoch + 1
        if run.epoch in snap_at:
            run.record_snapshot()
        comp = ""
        if bayesian:
            ratio = f"{total / kept:6.1f}×" if kept else "∞ (all pruned)"
            comp = f"  compression {ratio} at log α < {row['threshold']}  KL weight {kl_weight:.2f}"
        run.log.info(f"epoch {epoch + 1:3d}/{epochs}  loss {stats.loss:.4f}  train acc {stats.accuracy:.4f}  "
                     f"val error {row['val_error']:.2f}%{comp}  ({row['seconds']:.1f} s)")
        if bayesian and not run.collapse_reported:
            line = results.collapse_warning(c.random_labels, stats.accuracy, train_chance, kept, total)
            if line:
                run.collapse_reported = True
                run.warn(f"{line} (after epoch {epoch + 1})")
        run.save()


def run(argv=None):
    """Train (or resume) and write the results; returns the summary dict."""
    c, saved = _configure(argv)
    device = torch.device(c.device)
    pretrained = load_pretrained(c, device) if c.init_from and not c.resume else None
    os.makedirs(c.out, exist_ok=True)
    ckpt_path = os.path.join(c.out, CHECKPOINT)
    if not c.resume and os.path.exists(ckpt_path):
        raise CheckpointError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    log = _logger(c.out)
    try:
        data_name, data = load_data(c)
        torch.manual_seed(c.seed)
        model = MODELS[c.model](bayesian=c.method == "sparsevd").to(device)
        if pretrained is not None:
            model.load_state_dict(pretrained[0])
        optimizer = torch.optim.Adam(model.parameters(), lr=c.lr)
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, c.lr_end, total_iters=max(c.epochs - 1, 1))
        state = Run(c, saved, model, optimizer, scheduler, data, log)
        if c.resume:
            checkpoint = load_checkpoint(ckpt_path, saved, device)
            state.restore(checkpoint)
            saved["command"] = checkpoint["config"].get("command", saved["command"])
            log.info(f"resumed {ckpt_path} after epoch {state.epoch}/{c.epochs}")
        else:
            log.info(f"command: {saved['command']}")
            log.info(f"{NETWORK_NAMES[c.model]} {c.method} on {data_name}: {len(data['train_y'])} train / "
                     f"{len(data['val_y'])} validation / {len(data['test_y'])} test images"
                     + (" (random training labels)" if c.random_labels else "") + f"; device {device}")
            if pretrained is not None:
                log.info(f"initialised from the dense network of {c.init_from} (epoch {pretrained[1]}), "
                         f"log σ² = {c.init_log_sigma2}")
            for line in config.schedule_warnings(c, math.ceil(len(data["train_y"]) / c.batch_size)):
                state.warn(f"warning: {line}")
            state.record_snapshot()
        # the loss's own collapse check is off: train_epochs runs the same check per epoch, into the log
        loss_fn = loop.make_loss(model, len(data["train_y"]), c.kl_weight, check_collapse_every=None)
        with logging_redirect_tqdm([log]):
            train_epochs(state, c.epochs, loss_fn, sparsevd.KLWarmup(*c.kl_warmup))
            return results.write_results(c, saved["command"], model, data, data_name, state.history,
                                         state.snapshots, state.warnings, log)
    finally:
        _close_handlers(log)


def main(argv=None):
    try:
        run(argv)
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the last finished epoch is in the checkpoint; run again with --resume")
