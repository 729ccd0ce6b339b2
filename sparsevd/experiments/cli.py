"""The training command, ``sparsevd-train`` / ``python -m sparsevd.train``: flags in
:mod:`.config`, data in :mod:`.data`, the loop in :mod:`.loop`, magnitude pruning in
:mod:`.magnitude`, several processes in :mod:`.distributed`, checkpoints in
:mod:`.checkpoints`, the threshold in :mod:`.thresholds`, the report in :mod:`.results`
(:mod:`.measure`, :mod:`.render`, :mod:`.plots`). Two phases: the training epochs, then
(--finetune-epochs) the fine-tuning with the masks fixed. A mistake in the command (see
:data:`MISTAKES`) ends in one line, ``sparsevd-train: error: ...``, exit status 2."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shlex
import sys
import time

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import sparsevd

from . import config, distributed, loop, magnitude, measure, plots, render, results, thresholds
from .checkpoints import (BEFORE_FINETUNE, CHECKPOINT, CHECKPOINT_FORMAT, CheckpointError, load_checkpoint,
                          load_pretrained, save_checkpoint)
from .data import DataError, load_data
from .models import METHOD_NAMES, METHODS, NETWORK_NAMES, build


@dataclasses.dataclass
class Run:
    """What a run carries from epoch to epoch, and what its checkpoint holds."""

    c: object  # the checked flags
    config: dict  # the flags as saved in the checkpoint, with the command line
    model: torch.nn.Module
    data: dict
    log: logging.Logger
    world: distributed.World = distributed.SINGLE
    optimizer: torch.optim.Optimizer = None  # of the current phase, made by setup()
    scheduler: object = None
    trained: torch.nn.Module = None  # what the steps call: the model, or its DistributedDataParallel wrapper
    history: list = dataclasses.field(default_factory=list)
    snapshots: dict = dataclasses.field(default_factory=lambda: {"epochs": [], "conv": [], "fc": []})
    warnings: list = dataclasses.field(default_factory=list)  # lines for results.md
    collapse_reported: bool = False
    epoch: int = 0  # epochs done, fine-tuning included
    finetune: dict = None  # once fine-tuning has begun: its threshold and what it started from
    pruner: magnitude.Pruner = None  # --method magnitude: its schedule

    @property
    def magnitude(self):
        return self.c.method == "magnitude"

    def kept(self):
        """(kept, total) weights of the network as it trains ((0, 0) for a dense one)."""
        if self.magnitude:
            return magnitude.kept(self.model)
        return sparsevd.compression(self.model) if loop.prunes(self.model) else (0, 0)

    def kept_where(self):
        """Where the weights counted by :meth:`kept` are kept, naming the SparseVD threshold:
        the layers' during the training epochs, the chosen (or given) one once fine-tuning
        fixed the masks."""
        if self.magnitude:
            return f"the largest |w| ({self.c.prune_scope})"
        if self.finetune is None:
            return loop.kept_where(self.model, "training threshold")
        return loop.kept_where(self.model, "given" if self.c.threshold not in ("auto", None) else "chosen")

    def network(self):
        """The network as the results see it: the model, or with --method magnitude its
        copy in SparseVD layers with the masks fixed (see :func:`.magnitude.to_sparsevd`)."""
        return magnitude.to_sparsevd(self.model) if self.magnitude else self.model

    def warn(self, line):
        self.log.warning(line)
        self.warnings.append(line)

    def record_snapshot(self):
        self.snapshots["epochs"].append(self.epoch)
        # through the SBP layers, what is pruned shows only in the weights they are folded into
        snap = plots.snapshot(loop.pruned_copy(self.model) if sparsevd.sbp_modules(self.model) else self.model)
        for key in ("conv", "fc"):
            self.snapshots[key].append(snap.get(key))

    def setup(self):
        """The optimizer, lr schedule and (with several processes) DDP wrapper of the
        current phase: the training epochs, or the fine-tuning with the masks fixed."""
        c, device = self.c, torch.device(self.c.device)
        if self.finetune is None:
            # SBP's μ and log σ in a group of their own: --sbp-lr lets a run shorter than
            # the authors' 200 epochs move them as far
            sbp = {id(p) for _, m in sparsevd.sbp_modules(self.model) for p in m.parameters()}
            params = [{"params": [p for p in self.model.parameters() if id(p) not in sbp]}]
            if sbp:
                params.append({"params": [p for p in self.model.parameters() if id(p) in sbp],
                               "lr": c.sbp_lr if c.sbp_lr is not None else c.lr})
            lr, epochs = c.lr, c.epochs - c.lr_decay_start
        else:
            # Fixing the masks again after a resume changes nothing (the masks came with
            # the state dict, the pruned weights are zero); it sets the noise mode, which
            # the state dict does not hold.
            if self.finetune["threshold"] is not None:
                thresholds.apply(self.model, self.finetune["threshold"])
            # magnitude pruning's masks are fixed once its schedule has ended
            for layer in [] if self.magnitude else sparsevd.freeze_masks(self.model, noise=c.finetune_noise):
                # without the noise the data term gives log σ² (SBP: μ, log σ) no gradient:
                # leave them out of the optimizer and of DDP, which waits for a gradient of
                # every parameter
                for name, param in layer.named_parameters(recurse=False):
                    if name not in ("weight", "bias"):
                        param.requires_grad_(c.finetune_noise)
            params, lr, epochs = [p for p in self.model.parameters() if p.requires_grad], c.finetune_lr, \
                c.finetune_epochs
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=(c.adam_beta1, 0.999))
        # linear from lr at the phase's first decaying epoch to lr · lr_end at its last
        # (see step_lr for the epochs before the decay starts)
        self.scheduler = torch.optim.lr_scheduler.LinearLR(self.optimizer, 1.0, c.lr_end,
                                                           total_iters=max(epochs - 1, 1))
        self.trained = distributed.wrap(self.model, self.world, device, replaces=self.trained)

    def step_lr(self):
        """Advance the lr schedule after an epoch. The training epochs keep lr for their
        first --lr-decay-start epochs: the schedule is not stepped before, so it decays over
        the rest, and a resumed run finds it where it was."""
        if self.finetune is not None or self.epoch > self.c.lr_decay_start:
            self.scheduler.step()

    def save(self, name=CHECKPOINT):
        if not self.world.main:
            return
        device = torch.device(self.c.device)
        save_checkpoint(os.path.join(self.c.out, name), {
            "format": CHECKPOINT_FORMAT, "config": self.config, "epoch": self.epoch,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "history": self.history, "snapshots": self.snapshots, "warnings": self.warnings,
            "collapse_reported": self.collapse_reported, "finetune": self.finetune,
        })

    @staticmethod
    @contextlib.contextmanager
    def _fitting(path):
        try:
            yield
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"{path} does not fit this model: {error}") from None

    def restore(self, state, path):
        """Continue from the checkpoint ``state`` (read from ``path``), in the phase it was written in.

        Rank 0's random state is restored on every rank: the ranks draw the same seeds from
        torch's generator, step for step (each mixes its rank into them), so it is theirs too."""
        with self._fitting(path):
            self.model.load_state_dict(state["model"])
        self.finetune = state.get("finetune")  # none in checkpoints from before fine-tuning existed
        self.setup()
        with self._fitting(path):
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        device = torch.device(self.c.device)
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
        self.history, self.snapshots, self.epoch = state["history"], state["snapshots"], state["epoch"]
        # checkpoints written before warnings were kept have none to restore
        self.warnings = state.get("warnings", [])
        self.collapse_reported = state.get("collapse_reported", False)


def _logger(out, world):
    """The run's log: train.log and the console on rank 0, nothing on the other ranks
    (their errors end their process, and torchrun reports them)."""
    log = logging.getLogger(f"sparsevd.train.{os.path.abspath(out)}")
    log.setLevel(logging.INFO)
    log.propagate = False
    _close_handlers(log)
    log.disabled = not world.main  # not a handler: logging_redirect_tqdm adds one to the console
    if not world.main:
        return log
    file_handler = logging.FileHandler(os.path.join(out, "train.log"), encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    console = logging.StreamHandler(sys.stderr)  # routed around the progress bars by logging_redirect_tqdm
    console.setFormatter(logging.Formatter("%(message)s"))
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    log.addHandler(file_handler)
    log.addHandler(console)
    return log


def _close_handlers(log):
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def _launcher(world):
    """How the command was started, for the command line that results.md repeats."""
    if world.size == 1:
        return ["python", "-m", "sparsevd.train"]
    if world.size == world.local_size:
        return ["torchrun", "--standalone", "--nproc-per-node", str(world.size), "-m", "sparsevd.train"]
    return ["torchrun", "--nnodes", str(world.size // world.local_size), "--nproc-per-node", str(world.local_size),
            "-m", "sparsevd.train"]


def _configure(argv):
    """The checked flags, the config dict a checkpoint keeps and this process's place in
    the job; bad flags exit with usage (on every rank alike, before any communication)."""
    parser = config.build_parser()
    c = parser.parse_args(argv)
    try:
        world = distributed.current_world()
        config.check_config(c, world)
        if c.compare_dense:
            results.read_summary(c.compare_dense, c.model)  # now rather than after hours of training
    except ValueError as error:
        parser.error(str(error))
    saved = dict(vars(c))
    saved["command"] = shlex.join(_launcher(world) + list(sys.argv[1:] if argv is None else argv))
    return c, saved, world


def train_epochs(run, epochs, loss_fn, warmup):
    """Train ``run`` on until ``epochs`` epochs are done: per epoch, the steps (the KL
    warm-up per step; None: no KL in the loss), validation, the collapse check, a
    checkpoint and a log line. The metrics are summed over the ranks."""
    c, data, model, world = run.c, run.data, run.model, run.world
    pruning = loop.prunes(model) or run.magnitude
    n_train = len(data["train_y"])
    n_batches = steps_per_epoch(c, n_train, world)
    train_chance = loop.chance(data["train_y"])
    snap_at = set(plots.snapshot_epochs(c.epochs))
    phase = "finetune" if run.finetune is not None else "train"
    pruner = run.pruner if phase == "train" else None
    if pruner is not None and run.epoch == 0:
        pruner.at(0)  # a schedule that ends at epoch 0 prunes before the first step
    for epoch in range(run.epoch, epochs):
        t0 = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        on_step = (lambda done, first=epoch * n_batches: pruner.at(first + done)) if pruner is not None else None
        with tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                  dynamic_ncols=True, disable=None if world.main else True) as bar:
            stats = loop.train_epoch(run.trained, run.optimizer, loss_fn, data["train_x"], data["train_y"],
                                     c.batch_size, epoch, warmup, bar, distributed.epoch_order(n_train, c.seed, epoch),
                                     world, on_step=on_step)
        run.epoch = epoch + 1
        run.step_lr()
        kept, total = run.kept()
        kl_weight = c.kl_weight * stats.warmup if warmup is not None else 0.0
        row = {"epoch": epoch + 1, "phase": phase, "loss": stats.loss, "train_acc": stats.accuracy,
               "kl_weight": kl_weight, "lr": lr,
               "val_error": loop.error_rate(model, data["val_x"], data["val_y"], world=world), "kept": kept,
               "total": total, "threshold": loop.threshold_of(model) or None,
               "units": loop.sbp_units(model), "step_seconds": stats.seconds, "seconds": time.perf_counter() - t0}
        run.history.append(row)
        if run.epoch in snap_at:
            run.record_snapshot()
        comp = ""
        if pruning:
            ratio = f"{total / kept:6.1f}×" if kept else "∞ (all pruned)"
            where = "mask fixed at" if phase == "finetune" or (pruner and run.epoch * n_batches >= pruner.end_step) \
                else "at"
            units = f", units {'-'.join(map(str, row['units']))}" if row["units"] else ""
            comp = f"  compression {ratio} {where} {run.kept_where()}{units}"
            if warmup is not None:
                comp += f"  KL weight {kl_weight:.2f}"
        run.log.info(f"epoch {epoch + 1:3d}/{epochs}{'  fine-tuning' if phase == 'finetune' else ''}  "
                     f"loss {stats.loss:.4f}  train acc {stats.accuracy:.4f}  val error {row['val_error']:.2f}%{comp}  "
                     f"({row['seconds']:.1f} s, {n_train / stats.seconds:,.0f} examples/s)")
        if pruning and not run.collapse_reported:
            line = results.collapse_warning(c.random_labels, stats.accuracy, train_chance, kept, total)
            if line:
                run.collapse_reported = True
                run.warn(f"{line} (after epoch {epoch + 1})")
        run.save()


def start_finetune(run):
    """Fix the masks at the threshold chosen on the validation split (or --threshold;
    magnitude pruning's where its schedule left them), measure the network as it is, and
    set up the fine-tuning; checkpointed, so that a resumed run fine-tunes the same masks."""
    c = run.c
    run.save(BEFORE_FINETUNE)  # before the threshold's choice draws from the random state
    selection = thresholds.select_threshold(c, run.model, run.data, run.world)
    if selection["threshold"] is not None:
        run.log.info(thresholds.describe(selection))
    if selection["warning"]:
        run.warn(selection["warning"])
    before = measure.measure(run.network(), run.data, run.world)
    run.finetune = {**selection, "before": before, "epochs": c.finetune_epochs, "noise": c.finetune_noise,
                    "lr": c.finetune_lr}
    run.setup()
    noise = "" if run.magnitude else f", {'with' if c.finetune_noise else 'without'} noise"
    run.log.info(f"fine-tuning for {render.plural(c.finetune_epochs, 'epoch')}: masks fixed at "
                 f"{run.kept_where()} "
                 f"({before['compression']:.1f}×; test error {before['test_error']:.2f}%, validation error "
                 f"{before['val_error']:.2f}%), data term only{noise}, "
                 f"Adam lr {c.finetune_lr:g} → {c.finetune_lr * c.lr_end:g}")
    run.save()


def steps_per_epoch(c, n_train, world):
    """Optimizer steps per epoch (each of the processes' batches of a global batch together one)."""
    return len(world.batches(torch.arange(n_train), c.batch_size))


def run(argv=None):
    """Train (or resume) and write the results; returns the summary dict (on rank 0 of
    several processes; None on the others)."""
    c, saved, world = _configure(argv)
    device = torch.device(c.device)
    if c.threads is not None:
        torch.set_num_threads(c.threads)
    elif world.size > 1 and device.type == "cpu":
        torch.set_num_threads(distributed.threads_per_process(world))
    with distributed.process_group(world, device, c.dist_timeout):
        return _run(c, saved, world, device)


def _run(c, saved, world, device):
    ckpt_path = os.path.join(c.out, CHECKPOINT)
    resume = c.resume_from or (ckpt_path if c.resume else None)  # the checkpoint to continue from
    # Everything a mistake in the flags can break is read before the output directory is
    # made, so that a refused run leaves nothing behind; every rank looks before any can
    # write (rank 0 writes its first checkpoint only after an epoch of steps that all
    # ranks take together).
    if not c.resume and os.path.exists(ckpt_path):
        raise CheckpointError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    checkpoint = load_checkpoint(resume, saved, device, "--resume-from" if c.resume_from else "--resume") \
        if resume else None
    pretrained = load_pretrained(c, device) if c.init_from and not resume else None
    data_name, data = load_data(c)
    if world.main:
        try:
            os.makedirs(c.out, exist_ok=True)
        except OSError as error:
            raise OutputError(f"--out {c.out}: cannot create it ({error.strerror or error})") from None
    log = _logger(c.out, world)
    state = None
    try:
        torch.manual_seed(c.seed)
        model = build(c.model, c.method, c.sbp_threshold).to(device)
        if pretrained is not None:
            model.load_state_dict(pretrained[0])
        state = Run(c, saved, model, data, log, world)
        if c.method == "magnitude":
            magnitude.prepare(model)  # before the optimizer: it trains weight_orig
            state.pruner = magnitude.Pruner(model, c.target_compression, c.prune_scope,
                                            round(c.prune_end * steps_per_epoch(c, len(data["train_y"]), world)),
                                            c.prune_every)
        if resume:
            state.restore(checkpoint, resume)
            if c.resume:  # the same run: its command reproduces it
                saved["command"] = checkpoint["config"].get("command", saved["command"])
            else:
                log.info(f"command: {saved['command']}")
            log.info(f"resumed {resume} after epoch {state.epoch}/{c.epochs + c.finetune_epochs}")
        else:
            state.setup()
            log.info(f"command: {saved['command']}")
            log.info(f"{NETWORK_NAMES[c.model]} {METHOD_NAMES[c.method]} on {data_name}: {len(data['train_y'])} "
                     f"train / {len(data['val_y'])} validation / {len(data['test_y'])} test images"
                     + (" (random training labels)" if c.random_labels else "") + f"; device {device}"
                     + (f"; {world.size} processes ({distributed.backend_name(world)}, "
                        f"{render.plural(torch.get_num_threads(), 'thread')} each), batch "
                        f"{c.batch_size // world.size} per process" if world.size > 1 else ""))
            if pretrained is not None:
                log.info(f"initialised from the dense network of {c.init_from} (epoch {pretrained[1]})"
                         + (f", log σ² = {c.init_log_sigma2}" if c.init_log_sigma2 is not None else ""))
            log.info(f"recipe: {render.recipe_text(measure.recipe(c))}")
            for line in config.schedule_warnings(c, math.ceil(len(data["train_y"]) / c.batch_size)):
                state.warn(f"warning: {line}")
            state.record_snapshot()
        with logging_redirect_tqdm([log]):
            if state.finetune is None:
                # the loss's own collapse check is off: train_epochs runs the same check per epoch, into the log
                loss_fn = loop.make_loss(model, len(data["train_y"]), c.kl_weight, check_collapse_every=None)
                with_kl = any(METHODS[c.method])
                train_epochs(state, c.epochs, loss_fn, sparsevd.KLWarmup(*c.kl_warmup) if with_kl else None)
                if c.finetune_epochs:
                    start_finetune(state)
            if state.finetune is not None:
                train_epochs(state, c.epochs + c.finetune_epochs, loop.data_loss(), None)
            if not world.main:
                return None
            return results.write_results(c, saved["command"], state.network(), data, data_name, state.history,
                                         state.snapshots, state.warnings, log, finetune=state.finetune,
                                         backend=distributed.backend_name(world))
    except BaseException as error:
        _log_failure(log, error, state.epoch if state is not None else 0)
        raise
    finally:
        _close_handlers(log)


class OutputError(RuntimeError):
    """An output directory that cannot be made."""


#: The failures that are a mistake in the command (its flags, the files they name), not
#: a fault of the program: the command says what is wrong in one line, exit status 2.
MISTAKES = (CheckpointError, DataError, OutputError)


def _log_failure(log, error, epoch):
    """Write why the run ended into its train.log (the console has it from main or Python already)."""
    if isinstance(error, KeyboardInterrupt):
        line = f"interrupted after epoch {epoch}: the last finished epoch is in the checkpoint; run again with --resume"
    elif isinstance(error, MISTAKES):
        line = f"error: {_one_line(error)}"
    else:
        line = f"error: the run failed after epoch {epoch}: {type(error).__name__}: {_one_line(error)}"
    unexpected = not isinstance(error, (KeyboardInterrupt, SystemExit, *MISTAKES))
    log.error(line, exc_info=error if unexpected else None, extra={"file_only": True})


def _one_line(error):
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


@record
def main(argv=None):
    try:
        run(argv)
    except MISTAKES as error:
        print(f"sparsevd-train: error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit("interrupted: the last finished epoch is in the checkpoint; run again with --resume")
