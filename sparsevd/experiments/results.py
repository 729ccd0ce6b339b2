"""The results of a training run: choose the threshold (:mod:`.thresholds`), measure
the network (:mod:`.measure`), check it for a collapse, plot it (:mod:`.plots`) and write
summary.json and results.md (:mod:`.render`) into the output directory."""

from __future__ import annotations

import json
import math
import os

import torch

import sparsevd
from sparsevd.training import collapse_message

from . import loop, measure, plots, render, thresholds
from .loop import chance, error_rate, sbp_units
from .models import METHODS, NETWORK_NAMES, TRANSFORMERS, sparsity_by_part


def read_summary(run_dir, model):
    """The summary.json of the finished dense run of network ``model`` in ``run_dir`` (--compare-dense)."""
    path = os.path.join(run_dir, "summary.json")
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--compare-dense: cannot read {path} ({error}); is that run finished?") from None
    if summary.get("method") != "dense" or summary.get("model") != model:
        raise ValueError(f"--compare-dense: {run_dir} is a {summary.get('method')} run of "
                         f"{summary.get('network')}; it must be a dense run of {NETWORK_NAMES[model]}")
    return summary


def collapse_warning(random_labels, accuracy, chance, kept, total, what="training accuracy"):
    """A line for the log and results.md when the network sits at chance with most weights
    pruned (see :func:`sparsevd.training.collapse_message`): a warning with what to do,
    or a note for a --random-labels run, where that is the expected outcome; else None."""
    message = collapse_message(accuracy, chance, kept, total, what)
    if message is None:
        return None
    if random_labels:
        return (f"note: {what} {accuracy:.1%} is at chance with {1 - kept / total:.2%} of the weights pruned, as "
                "expected with --random-labels: the labels hold nothing to learn, so the prior prunes the network")
    return f"warning: {message}"


def write_results(c, command, model, data, data_name, history, snapshots, warnings, log, finetune=None,
                  backend=None):
    """Choose the threshold, measure, check for a collapse, time, plot, and write
    results.md and summary.json; ``warnings``: the lines the run warned about so far.
    ``finetune``: what the fine-tuning started from (see :func:`.cli.start_finetune`), its
    threshold then the one reported; ``backend``: the process group's of a run of several
    processes. ``model``: the network (with --method magnitude, in SparseVD layers with the
    masks fixed: see :func:`.magnitude.to_sparsevd`)."""
    sparse_vd, sbp = METHODS[c.method]
    bayesian = sparse_vd or sbp
    pruning = loop.prunes(model)
    dense = read_summary(c.compare_dense, c.model) if c.compare_dense else None
    if finetune is not None:
        selection = finetune
    elif sparse_vd:
        selection = thresholds.select_threshold(c, model, data)
        log.info(thresholds.describe(selection))
        if selection["warning"]:
            log.warning(selection["warning"])
            warnings = [*warnings, selection["warning"]]
    else:
        selection = thresholds.NONE
    model.eval()
    # the example shape lets the report count the convolutions' FLOPs per output position
    rows, rep = measure.structure(model, tuple(data["test_x"].shape[1:]))
    kept, total = sum(r["kept"] for r in rows), sum(r["total"] for r in rows)
    summary = {
        "network": NETWORK_NAMES[c.model], "model": c.model, "method": c.method, "dataset": data_name,
        "random_labels": c.random_labels, "epochs": c.epochs, "epochs_done": len(history),
        "device": measure.device_name(c.device), "commit": measure.git_commit(), "torch": torch.__version__,
        "world_size": c.world_size, "backend": backend,
        "sizes": {k: len(data[f"{k}_y"]) for k in ("train", "val", "test")},
        "command": command,
        "recipe": measure.recipe(c),
        "kl_weight": c.kl_weight if bayesian else None,
        "training_threshold": selection["training_threshold"],
        "threshold": selection["threshold"],
        "threshold_chosen": sparse_vd and c.threshold == "auto",
        "threshold_rule": selection.get("rule"),  # not in the fine-tuning of checkpoints from before it was
        "seed": c.seed,
        "target_compression": c.target_compression,
        "pruning": measure.recipe(c).get("pruning"),
        "sbp_threshold": c.sbp_threshold,
        "test_error": error_rate(model, data["test_x"], data["test_y"]),
        "train_error": error_rate(model, data["train_x"], data["train_y"]),
        "val_error": error_rate(model, data["val_x"], data["val_y"]),
        "layers": [{k: r[k] for k in ("layer", "sparsity", "kept", "total", "units", "units_total")} for r in rows]
                  if pruning else [],
        "units": sparsevd.report(model).units,
        "parts": sparsity_by_part(rows) if pruning and c.model in TRANSFORMERS else None,
        "kept": kept, "total": total,
        "compression": total / kept if kept else math.inf,
        "flops": {k: sum(r[f"flops_{k}"] for r in rows) for k in ("dense", "units", "nonzero")},
        "threshold_curve": selection["curve"],
        "timings": [],
        "uncertainty": [],
        "train_seconds": sum(h["seconds"] for h in history),
        "examples_per_second": measure.examples_per_second(history, len(data["train_y"])),
        "finetune": None,
        "warnings": list(warnings),
    }
    if finetune is not None:
        after = {k: summary[k] for k in ("test_error", "val_error", "train_error")}
        after.update(kept=kept, total=total, compression=summary["compression"], units=sbp_units(model))
        summary["finetune"] = {k: finetune[k] for k in ("epochs", "noise", "lr", "before")}
        summary["finetune"]["after"] = after
    if pruning:
        final = collapse_warning(c.random_labels, 1 - summary["test_error"] / 100, chance(data["test_y"]),
                                 kept, total, what="test accuracy")
        if final:
            log.warning(final)
            summary["warnings"].append(final)
    summary["timings"] = measure.inference_timings(c, model, data["test_x"])
    # fine-tuned without noise, the network is a point estimate: there is no posterior to sample
    if bayesian and (finetune is None or finetune["noise"]):
        summary["uncertainty"] = measure.uncertainty_summary(model, data, c.samples)

    summary["plots"] = plots.plot_run(c.out, history, snapshots, model if sparse_vd else None,
                                      selection["curve"], summary["threshold"], dense["val_error"] if dense else None)
    with open(os.path.join(c.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    text = render.results_markdown(summary, rep if pruning else None, dense)
    with open(os.path.join(c.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    log.info("\n" + text)
    return summary
