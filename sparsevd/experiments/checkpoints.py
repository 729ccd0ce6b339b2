"""The training command's checkpoints: written every epoch, read back by --resume and
--resume-from (the same run only) and by --init-from (a dense run of the same network and
data)."""

from __future__ import annotations

import os

import torch

import sparsevd

from . import thresholds
from .config import (
    FINETUNE_SETTINGS,
    INIT_SETTINGS,
    MAGNITUDE_SETTINGS,
    RUN_SETTINGS,
    SETTINGS_BEFORE,
)
from .models import METHODS, MODELS, NETWORK_NAMES, build, with_sbp

CHECKPOINT = "checkpoint.pt"
#: The run as its training epochs left it, kept when fine-tuning begins: --resume-from it
#: fine-tunes the same training again at another threshold, into another directory.
BEFORE_FINETUNE = "checkpoint-before-finetune.pt"
CHECKPOINT_FORMAT = "sparsevd.train checkpoint v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed: unreadable, from another run, or missing."""


def save_checkpoint(path, state):
    # Write then rename: a run killed while saving leaves the previous checkpoint intact.
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path, device, flag, prefix="", advice=""):
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


def load_checkpoint(path, config, device, flag="--resume"):
    """The checkpoint at ``path`` as a dict, after checking it belongs to this run: the
    settings of the run, and those of the fine-tuning once it has begun."""
    state = read_checkpoint(path, device, flag, advice="; delete it to start over" if flag == "--resume" else "")
    saved = state["config"]
    settings = RUN_SETTINGS + (MAGNITUDE_SETTINGS if config["method"] == "magnitude" else ()) \
        + (FINETUNE_SETTINGS if state.get("finetune") is not None else ())
    differ = [k for k in settings if saved.get(k, SETTINGS_BEFORE.get(k)) != config[k]]
    if differ:
        what = "; ".join(f"{k}: checkpoint {saved.get(k, SETTINGS_BEFORE.get(k))!r}, now {config[k]!r}" for k in differ)
        advice = "use the same settings or another --out"
        if flag == "--resume-from":
            advice = "give the flags of the run that wrote it (its command is in its train.log and results.md)"
        elif "world_size" in differ:
            advice = (f"resume with the same number of processes (torchrun --nproc-per-node "
                      f"{saved.get('world_size', 1)} ...), the other settings the same, or use another --out")
        raise CheckpointError(f"{path} was written by a different run ({what}); {advice}")
    return state


def load_pretrained(c, device):
    """The dense network of the run in ``c.init_from`` as a state dict of this run's model
    (SparseVD layers: ``sparsevd.convert`` of it; SBP layers at their initial values), after
    checking that run fits this one."""
    path = os.path.join(c.init_from, CHECKPOINT)
    state = read_checkpoint(path, device, "--init-from", prefix="--init-from: ")
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
    sparse_vd, sbp = METHODS[c.method]
    model = sparsevd.convert(dense, log_sigma2_init=c.init_log_sigma2) if sparse_vd else dense
    if sbp:
        model = with_sbp(model, c.sbp_threshold)
    return model.state_dict(), state["epoch"]


def trained_model(run):
    """(the network a finished run trained, in eval mode, its fine-tuned masks fixed; the
    run's settings as a dict), from the checkpoint in the run's directory ``run``."""
    state = read_checkpoint(os.path.join(run, CHECKPOINT), "cpu", "RUN_DIR")
    c = state["config"]
    model = build(c["model"], c["method"], c["sbp_threshold"])
    model.load_state_dict(state["model"])
    finetune = state.get("finetune")
    if finetune and finetune.get("threshold") is not None:
        thresholds.apply(model, finetune["threshold"])
    if sparsevd.sparsevd_modules(model) or sparsevd.sbp_modules(model):
        sparsevd.freeze_masks(model)
    return model.eval(), c
