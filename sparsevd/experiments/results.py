"""The results of a training run: the threshold chosen on the validation split, the
trade-off between validation error and compression, what the network keeps (weights,
units per layer, FLOPs), timings of the pruned network against the dense one,
uncertainty, the warnings, and results.md / summary.json / the plots in the output
directory."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import subprocess
import time

import torch

import sparsevd
from sparsevd.training import collapse_message

from . import plots
from .distributed import SINGLE
from .loop import (chance, compression_ratio, cut_copy, error_rate, pruned_copy,
                   sbp_units, threshold_of)
from .models import METHOD_NAMES, METHODS, MODELS, NETWORK_NAMES

#: Thresholds on log α of the validation curve (the paper's default, 3, among them).
THRESHOLDS = [t / 4 for t in range(-8, 33)]
#: Batch sizes of the inference timings (the targets are at 1 and 64).
TIMING_BATCHES = (1, 64, 256)
#: CPU threads of the CPU timings: the SBP paper's CPU speed-ups, and a figure that does
#: not depend on how many cores the machine had free.
TIMING_THREADS = 1


def _git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=7"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def threshold_curve(model, x, y, world=SINGLE):
    """Validation error (%) and compression at each threshold of ``THRESHOLDS`` (the
    errors summed over the ranks of ``world``: the same curve on every rank)."""
    layers = [m for _, m in sparsevd.sparsevd_modules(model)]
    saved = [m.threshold for m in layers]
    curve = []
    for t in THRESHOLDS:
        for m in layers:
            m.threshold = t
        curve.append({"threshold": t, "val_error": error_rate(model, x, y, world=world),
                      "compression": compression_ratio(model)})
    for m, t in zip(layers, saved):
        m.threshold = t
    return curve


def choose_threshold(curve, tolerance):
    """The most compressed threshold whose validation error is within ``tolerance`` points of the best."""
    best = min(p["val_error"] for p in curve)
    return max((p for p in curve if p["val_error"] <= best + tolerance), key=lambda p: p["compression"])["threshold"]


def select_threshold(c, model, data, world=SINGLE):
    """Set the SparseVD layers' threshold to --threshold, or with 'auto' to the one chosen
    on the validation split; returns the ``curve``, the ``threshold`` and the layers'
    threshold during training (``training_threshold``); all empty without SparseVD layers
    (SBP's threshold on the SNR is --sbp-threshold, fixed)."""
    if not sparsevd.sparsevd_modules(model):
        return {"curve": [], "threshold": None, "training_threshold": None}
    training_threshold = threshold_of(model)
    curve = threshold_curve(model, data["val_x"], data["val_y"], world)
    threshold = choose_threshold(curve, c.threshold_tolerance) if c.threshold == "auto" else float(c.threshold)
    for _, m in sparsevd.sparsevd_modules(model):
        m.threshold = threshold
    return {"curve": curve, "threshold": threshold, "training_threshold": training_threshold}


def measure(model, data, world=SINGLE):
    """Test, validation and training error (%), the kept weights and the units kept per SBP
    layer of ``model`` in eval mode."""
    kept, total = sparsevd.compression(model)
    errors = {f"{k}_error": error_rate(model, data[f"{k}_x"], data[f"{k}_y"], world=world)
              for k in ("test", "val", "train")}
    return {**errors, "kept": kept, "total": total, "compression": total / kept if kept else math.inf,
            "units": sbp_units(model)}


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


def structure(model, input_shape):
    """What ``model`` keeps, per linear and convolution layer (``input_shape``: one
    example's, for the convolutions' output positions): ``(rows, report)``.

    Each row: the layer's name, type, ``shape``, ``kept`` of ``total`` weights and their
    ``sparsity`` (as :func:`sparsevd.compression` counts them), its ``units`` of
    ``units_total`` as the SBP paper counts them (the output channels of a convolution,
    the inputs of a fully-connected layer) that are left in :func:`.loop.cut_copy` with a
    non-zero weight, and FLOPs per example: ``flops_dense`` of the layer,
    ``flops_units`` of the block of its kept units (kept outputs × kept inputs: what a
    network cut down to its units computes) and ``flops_nonzero`` of its kept weights.
    ``report``: :func:`sparsevd.report` of the network that holds the weights counted
    (:func:`.loop.cut_copy` with SBP layers, else :func:`.loop.pruned_copy`)."""
    full = sparsevd.report(pruned_copy(model), input_shape=input_shape)  # the layers' own shapes
    cut = cut_copy(model)
    layers = dict(cut.named_modules())  # sparsify keeps the names of the layers it shrinks
    sbp = bool(sparsevd.sbp_modules(model))
    rows = []
    for r in full.rows:
        nonzero = layers[r["layer"]].weight.detach() != 0
        outputs = int(nonzero.flatten(1).any(1).sum())
        inputs = int(nonzero.transpose(0, 1).flatten(1).any(1).sum())
        conv = nonzero.dim() > 2
        kept = int(nonzero.sum()) if sbp else r["kept"]
        per_weight = r["flops_dense"] // r["total"]  # 2 × the output positions
        rows.append({"layer": r["layer"], "type": r["type"], "shape": r["shape"], "kept": kept, "total": r["total"],
                     "sparsity": 1 - kept / r["total"], "units": outputs if conv else inputs,
                     "units_total": r["shape"][0 if conv else 1], "flops_dense": r["flops_dense"],
                     "flops_units": per_weight * outputs * inputs * math.prod(nonzero.shape[2:]),
                     "flops_nonzero": per_weight * kept})
    return rows, sparsevd.report(cut, input_shape=input_shape) if sbp else full


@contextlib.contextmanager
def _cpu_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _examples(x, n):
    """``n`` examples of ``x``, repeated when it has fewer."""
    return x.repeat(math.ceil(n / len(x)), *(1,) * (x.dim() - 1))[:n]


def inference_timings(c, model, x):
    """Median inference times of ``model`` (in eval mode) at the batch sizes of
    :data:`TIMING_BATCHES`, on the CPU with :data:`TIMING_THREADS` thread(s), and on the
    GPU too when ``x`` is on one. For a pruning run also: the dense network (the same
    architecture in plain torch layers, what the pruned one replaces), the dense copy
    (the pruned weights in dense layers of full size, run as sparsify runs its results)
    and the :func:`sparsevd.sparsify`'d network, with ``speedup`` = dense network /
    sparsify'd."""
    pruning = any(METHODS[c.method])
    devices = [torch.device("cpu")] + ([x.device] if x.is_cuda else [])
    rows = []
    for device in devices:
        net = model if device == x.device else copy.deepcopy(model).to(device)
        inputs = x.to(device)
        threads = _cpu_threads(TIMING_THREADS) if device.type == "cpu" else contextlib.nullcontext()
        with threads:
            dense_network = MODELS[c.model](bayesian=False).to(device).eval() if pruning else None
            for batch in TIMING_BATCHES:
                xb = _examples(inputs, batch)
                row = {"device": device.type, "batch": batch, "eval_model_s": median_time(net, xb, c.timing_repeats)}
                if pruning:
                    row["dense_network_s"] = median_time(dense_network, xb, c.timing_repeats)
                    dense_copy = sparsevd.sparsify(net, batch_size=batch, cost_model=sparsevd.CostModel.dense(), shrink=False)
                    row["dense_copy_s"] = median_time(dense_copy, xb, c.timing_repeats)
                    fast = sparsevd.sparsify(net, batch_size=batch, input_shape=tuple(x.shape[1:]))
                    row["sparsified_s"] = median_time(fast, xb, c.timing_repeats)
                    row["speedup"] = row["dense_network_s"] / row["sparsified_s"]
                rows.append(row)
    return rows


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


def recipe(c):
    """The optimisation recipe of the run's training epochs (the flags with their defaults
    filled in), as a dict."""
    with_kl = any(METHODS[c.method])
    return {"batch_size": c.batch_size, "adam_beta1": c.adam_beta1, "lr": c.lr, "sbp_lr": c.sbp_lr,
            "lr_decay_start": c.lr_decay_start, "lr_end": c.lr * c.lr_end, "kl_weight": c.kl_weight if with_kl else None,
            "kl_warmup": list(c.kl_warmup) if with_kl else None, "init_from": c.init_from}


def recipe_text(r):
    """A :func:`recipe` dict, as a sentence."""
    decay = f"constant to epoch {r['lr_decay_start']}, then linear" if r["lr_decay_start"] else "linear"
    text = f"batch {r['batch_size']}, Adam (β₁ {r['adam_beta1']:g}) lr {r['lr']:g} {decay} to {r['lr_end']:.3g} " \
           "at the last epoch"
    if r.get("sbp_lr") is not None:
        text += f" (SBP's μ and log σ: lr {r['sbp_lr']:g}, on the same schedule)"
    if r["kl_warmup"] is not None:
        start, end = r["kl_warmup"]
        warm = f"0 until epoch {start:g}, linear to it at {end:g}" if end > start else "no warm-up"
        text += f"; KL weight {r['kl_weight']:g} ({warm})"
    return text + (f"; from the dense network of {r['init_from']}" if r["init_from"] else "; from scratch")


def write_results(c, command, model, data, data_name, history, snapshots, warnings, log, finetune=None,
                  backend=None):
    """Choose the threshold, measure, check for a collapse, time, plot, and write
    results.md and summary.json; ``warnings``: the lines the run warned about so far.
    ``finetune``: what the fine-tuning started from (see :func:`.cli.start_finetune`), its
    threshold then the one reported; ``backend``: the process group's of a run of several
    processes."""
    sparse_vd, sbp = METHODS[c.method]
    pruning = sparse_vd or sbp
    dense = read_summary(c.compare_dense, c.model) if c.compare_dense else None
    selection = finetune or select_threshold(c, model, data)
    model.eval()
    # the example shape lets the report count the convolutions' FLOPs per output position
    rows, rep = structure(model, tuple(data["test_x"].shape[1:]))
    kept, total = sum(r["kept"] for r in rows), sum(r["total"] for r in rows)
    summary = {
        "network": NETWORK_NAMES[c.model], "model": c.model, "method": c.method, "dataset": data_name,
        "random_labels": c.random_labels, "epochs": c.epochs, "epochs_done": len(history),
        "device": _device_name(c.device), "commit": _git_commit(), "torch": torch.__version__,
        "world_size": c.world_size, "backend": backend,
        "sizes": {k: len(data[f"{k}_y"]) for k in ("train", "val", "test")},
        "command": command,
        "recipe": recipe(c),
        "kl_weight": c.kl_weight if pruning else None,
        "training_threshold": selection["training_threshold"],
        "threshold": selection["threshold"],
        "threshold_chosen": sparse_vd and c.threshold == "auto",
        "sbp_threshold": c.sbp_threshold,
        "test_error": error_rate(model, data["test_x"], data["test_y"]),
        "train_error": error_rate(model, data["train_x"], data["train_y"]),
        "val_error": error_rate(model, data["val_x"], data["val_y"]),
        "layers": [{k: r[k] for k in ("layer", "sparsity", "kept", "total", "units", "units_total")} for r in rows]
                  if pruning else [],
        "units": sparsevd.report(model).units,
        "kept": kept, "total": total,
        "compression": total / kept if kept else math.inf,
        "flops": {k: sum(r[f"flops_{k}"] for r in rows) for k in ("dense", "units", "nonzero")},
        "threshold_curve": selection["curve"],
        "timings": [],
        "uncertainty": [],
        "train_seconds": sum(h["seconds"] for h in history),
        "examples_per_second": _examples_per_second(history, len(data["train_y"])),
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
    summary["timings"] = inference_timings(c, model, data["test_x"])
    # fine-tuned without noise, the network is a point estimate: there is no posterior to sample
    if pruning and (finetune is None or finetune["noise"]):
        summary["uncertainty"] = uncertainty_summary(model, data, c.samples)

    summary["plots"] = plots.plot_run(c.out, history, snapshots, model if sparse_vd else None,
                                      selection["curve"], summary["threshold"], dense["val_error"] if dense else None)
    with open(os.path.join(c.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    text = results_markdown(summary, rep if pruning else None, dense)
    with open(os.path.join(c.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    log.info("\n" + text)
    return summary


def _examples_per_second(history, train_size):
    """Training examples per second of the training steps (validation not counted), all
    processes together; None for a history from before the steps were timed apart."""
    seconds = [h.get("step_seconds") for h in history]
    if not seconds or None in seconds:
        return None
    return train_size * len(seconds) / sum(seconds)


def _device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {plural(torch.get_num_threads(), 'thread')})"


def _method(s):
    return METHOD_NAMES[s["method"]] + (", random labels" if s["random_labels"] else "")


def _kept_where(s):
    parts = [f"log α < {s['threshold']:g}"] if s.get("threshold") is not None else []
    if s.get("sbp_threshold") is not None:
        parts.append(f"SNR > {s['sbp_threshold']:g}")
    return ", ".join(parts) or "–"


def table_row(s, note=""):
    """One row of the SparseVD paper's table: network, method (and ``note``), error %,
    per-layer sparsity %, |W|/|W≠0|, and the thresholds that compression is counted at."""
    sparsity = " − ".join(f"{100 * r['sparsity']:.1f}" for r in s["layers"]) or "–"
    compression = "∞ (all pruned)" if math.isinf(s["compression"]) else f"{s['compression']:.0f}"
    return (f"| {s['network']} | {_method(s)}{note} | {s['test_error']:.2f} | {sparsity} | {compression} | "
            f"{_kept_where(s)} |")


def _speedup(s, batch, device="cpu"):
    row = next((t for t in s["timings"] if t["device"] == device and t["batch"] == batch), None)
    return f"{row['speedup']:.2f}×" if row and "speedup" in row else "–"


def units_row(s, note=""):
    """One row of the SBP paper's table: network, method, error %, units per layer (the
    output channels of each convolution, the inputs of each fully-connected layer), how
    many times fewer FLOPs the kept units compute, and the measured CPU speed-up of the
    sparsify'd network over the dense one at batch 1 and 64."""
    units = " − ".join(str(r["units"]) for r in s["layers"])
    flops = s["flops"]
    fewer = _ratio(flops["dense"] / flops["units"] if flops["units"] else math.inf)
    return (f"| {s['network']} | {_method(s)}{note} | {s['test_error']:.2f} | {units} | {fewer}× | "
            f"{_speedup(s, 1)} | {_speedup(s, 64)} |")


def dense_units_row(s, dense):
    """The dense network's row of the SBP paper's table: every unit, 1× (its error from ``dense``)."""
    units = " − ".join(str(r["units_total"]) for r in s["layers"])
    return f"| {s['network']} | dense | {dense['test_error']:.2f} | {units} | 1× | 1× | 1× |"


def tradeoff_rows(curve, chosen):
    """The trade-off table's rows: validation error and compression at the whole-number
    thresholds of ``curve`` and at the ``chosen`` one."""
    rows = []
    for p in sorted(curve, key=lambda p: -p["threshold"]):
        if p["threshold"] != chosen and p["threshold"] != round(p["threshold"]):
            continue
        note = " (chosen)" if p["threshold"] == chosen else ""
        rows.append(f"| log α < {p['threshold']:g}{note} | {_ratio(p['compression'])} | {p['val_error']:.2f} |")
    return rows


def plural(n, word):
    """``n`` and ``word``, with an s unless n is 1: "1 epoch", "2 epochs"."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _epochs_text(s):
    tuned = s.get("finetune")
    if tuned:
        trained = s["epochs_done"] - tuned["epochs"]
        return f"{s['epochs_done']} epochs ({trained} {METHOD_NAMES[s['method']]} + {tuned['epochs']} fine-tuning)"
    return plural(s["epochs_done"], "epoch")


def _processes_text(s):
    n = s.get("world_size", 1)
    return "1 process" if n == 1 else f"{n} processes (DistributedDataParallel, {s['backend']})"


def _ratio(compression):
    return "∞ (all pruned)" if math.isinf(compression) else f"{compression:.1f}"


def _us(seconds):
    return f"{1e6 * seconds:.0f} µs"


def results_markdown(s, rep, dense=None):
    """results.md of the summary ``s``; ``rep``: the report of what a pruning network keeps
    (None for a dense run); ``dense``: the summary of a dense run to compare with."""
    lines = [
        f"# {s['network']}, {METHOD_NAMES[s['method']]} on {s['dataset']}",
        "",
        f"{_epochs_text(s)}; {s['sizes']['train']} train / {s['sizes']['val']} validation / "
        f"{s['sizes']['test']} test images" + ("; **random training labels**" if s["random_labels"] else "")
        + f"; {_processes_text(s)}; {s['device']}; torch {s['torch']}; commit {s['commit']}; "
        f"{s['train_seconds'] / 60:.1f} min of training"
        + (f" ({s['examples_per_second']:,.0f} training examples/s)." if s.get("examples_per_second") else "."),
        "",
        f"`{s['command']}`",
        "",
    ]
    if s.get("recipe"):  # not in the summaries of runs from before it was recorded
        lines += [f"Recipe: {recipe_text(s['recipe'])}.", ""]
    if s["warnings"]:
        lines += ["**Warnings**", ""] + [f"- {w}" for w in s["warnings"]] + [""]
    lines += [
        "| network | method | error % | sparsity per layer % | \\|W\\|/\\|W≠0\\| | kept where |",
        "|---|---|---|---|---|---|",
    ]
    if dense is not None:
        lines.append(table_row(dense))
    tuned = s.get("finetune")
    if tuned:
        lines.append(table_row(dict(s, test_error=tuned["before"]["test_error"]), ", before fine-tuning"))
        lines.append(table_row(s, f", fine-tuned {plural(tuned['epochs'], 'epoch')}"))
    else:
        lines.append(table_row(s))
    shuffled = " (against the shuffled labels it was trained on)" if s["random_labels"] else ""
    lines += ["", f"Train error {s['train_error']:.2f}%{shuffled}, validation error {s['val_error']:.2f}%."]
    if rep is not None:
        lines += ["", "Units per layer, as the SBP paper counts them (the output channels of each convolution, the "
                      "inputs of each fully-connected layer; those with a non-zero weight left), FLOPs of the kept "
                      "units against the dense network's, and the measured speed-up of the sparsify()'d network over "
                      f"the dense network on the CPU ({plural(TIMING_THREADS, 'thread')}):", "",
                  "| network | method | error % | units per layer | FLOPs fewer | CPU speed-up, batch 1 | "
                  "CPU speed-up, batch 64 |", "|---|---|---|---|---|---|---|"]
        if dense is not None:
            lines.append(dense_units_row(s, dense))
        lines.append(units_row(s, f", fine-tuned {plural(tuned['epochs'], 'epoch')}" if tuned else ""))
        flops = s["flops"]
        lines += ["", f"FLOPs per example: dense network {flops['dense']:,}, the kept units {flops['units']:,}, "
                      f"the non-zero weights {flops['nonzero']:,}."]
    if tuned:
        before, after = tuned["before"], tuned["after"]
        lines += ["", f"Fine-tuning: {plural(tuned['epochs'], 'epoch')} with the masks fixed at {_kept_where(s)}, on "
                      f"the data term alone (no KL), {'with' if tuned['noise'] else 'without'} the noise of the kept "
                      f"weights and units, Adam from lr {tuned['lr']:g} decaying linearly; the pruned weights and "
                      "units stayed exactly zero.",
                  "", "| | test error % | validation error % | train error % | \\|W\\|/\\|W≠0\\| |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} fine-tuning | {m['test_error']:.2f} | {m['val_error']:.2f} | {m['train_error']:.2f} | "
                  f"{_ratio(m['compression'])} |" for name, m in (("before", before), ("after", after))]
    if rep is not None:
        kept = []
        if s["threshold"] is not None:
            how = "chosen on the validation split" if s["threshold_chosen"] else "given"
            kept.append(f"SparseVD weights where log α < {s['threshold']:g} ({how})")
        if s["sbp_threshold"] is not None:
            kept.append(f"SBP units where SNR > {s['sbp_threshold']:g}")
        epochs = "training epoch lines (the fine-tuning ones: the fixed masks)" if tuned else "epoch lines"
        during = f" at the layers' threshold during training, log α < {s['training_threshold']}" \
            if s["training_threshold"] else ""
        lines += ["", f"Kept: {' and '.join(kept)}; the {epochs} of train.log count them{during}. KL weight "
                  f"{s['kl_weight']:g}. Per layer (a weight counts as kept when its units are kept too):", "",
                  "```", str(rep), "```"]
        if s["units"]:
            lines += ["", "Units kept per SBP layer: " + ", ".join(
                f"layer {u['layer']} {u['kept']} of {u['total']}" for u in s["units"]) + "."]
        if s["threshold_curve"]:
            lines += ["", "Validation error against compression, by SparseVD threshold (the trade-off; "
                          "tradeoff.png):", "",
                      "| kept where | \\|W\\|/\\|W≠0\\| | validation error % |", "|---|---|---|"]
            lines += tradeoff_rows(s["threshold_curve"], s["threshold"])
    lines += ["", "Inference time (median, test images; CPU with "
                  f"{plural(TIMING_THREADS, 'thread')}):", ""]
    if rep is not None:
        lines += ["| device | batch | eval model | dense network | dense copy | sparsify()'d | speed-up over the dense "
                  "network | over the dense copy |", "|---|---|---|---|---|---|---|---|"]
        for t in s["timings"]:
            lines.append(f"| {t['device']} | {t['batch']} | {_us(t['eval_model_s'])} | {_us(t['dense_network_s'])} | "
                         f"{_us(t['dense_copy_s'])} | {_us(t['sparsified_s'])} | {t['speedup']:.2f}× | "
                         f"{t['dense_copy_s'] / t['sparsified_s']:.2f}× |")
        lines += ["", "eval model: the trained model in eval mode; dense network: the same architecture in plain "
                      "torch layers, nothing pruned (what the pruned network replaces); dense copy: the pruned "
                      "weights in dense layers of full size, run as sparsify() runs its results; sparsify()'d: the "
                      "pruned units cut, each layer in the form (CSR or smaller dense) the cost model picks for the "
                      "batch size."]
    else:
        lines += ["| device | batch | dense model |", "|---|---|---|"]
        lines += [f"| {t['device']} | {t['batch']} | {_us(t['eval_model_s'])} |" for t in s["timings"]]
    if tuned and not tuned["noise"]:
        lines += ["", "No uncertainty summary: fine-tuned without noise, the network is deterministic (a point "
                      "estimate); --finetune-noise keeps a posterior to sample."]
    if s["uncertainty"]:
        lines += ["", "Uncertainty of the Bayesian ensemble (mean over inputs, nats):", "",
                  "| inputs | predictive entropy | expected entropy | mutual information |", "|---|---|---|---|"]
        lines += [f"| {u['inputs']} | {u['predictive_entropy']:.3f} | {u['expected_entropy']:.3f} | "
                  f"{u['mutual_information']:.4f} |" for u in s["uncertainty"]]
    lines += ["", "Plots: " + ", ".join(f"[{name}]({name})" for name in s["plots"]), ""]
    return "\n".join(lines)
