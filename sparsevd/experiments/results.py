"""The results of a training run: the threshold chosen on the validation split, the
trade-off between validation error and compression, timings, uncertainty, the
warnings, and results.md / summary.json / the plots in the output directory."""

from __future__ import annotations

import dataclasses
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
from .loop import chance, compression_ratio, error_rate, threshold_of
from .models import NETWORK_NAMES

#: A cost model under which sparsify() keeps every layer dense: the plain inference copy
#: (θ ⊙ mask in ordinary dense layers) that the sparse forms have to beat.
ALWAYS_DENSE = sparsevd.CostModel(
    cpu=dataclasses.replace(sparsevd.CostModel().cpu, csr_overhead_s=math.inf),
    cuda=dataclasses.replace(sparsevd.CostModel().cuda, csr_overhead_s=math.inf))
#: Thresholds on log α of the validation curve (the paper's default, 3, among them).
THRESHOLDS = [t / 4 for t in range(-8, 33)]


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
    threshold during training (``training_threshold``)."""
    training_threshold = threshold_of(model)
    curve = threshold_curve(model, data["val_x"], data["val_y"], world)
    threshold = choose_threshold(curve, c.threshold_tolerance) if c.threshold == "auto" else float(c.threshold)
    for _, m in sparsevd.sparsevd_modules(model):
        m.threshold = threshold
    return {"curve": curve, "threshold": threshold, "training_threshold": training_threshold}


def measure(model, data, world=SINGLE):
    """Test, validation and training error (%) and the kept weights of ``model`` in eval mode."""
    kept, total = sparsevd.compression(model)
    errors = {f"{k}_error": error_rate(model, data[f"{k}_x"], data[f"{k}_y"], world=world)
              for k in ("test", "val", "train")}
    return {**errors, "kept": kept, "total": total, "compression": total / kept if kept else math.inf}


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
    """Choose the threshold, measure, check for a collapse, plot, and write results.md
    and summary.json; ``warnings``: the lines the run warned about so far. ``finetune``:
    what the fine-tuning started from (see :func:`.cli.start_finetune`), its threshold
    then the one reported; ``backend``: the process group's of a run of several processes."""
    bayesian = c.method == "sparsevd"
    dense = read_summary(c.compare_dense) if c.compare_dense else None
    curve, training_threshold = [], None
    if bayesian:
        selection = finetune or select_threshold(c, model, data)
        curve, threshold = selection["curve"], selection["threshold"]
        training_threshold = selection["training_threshold"]
    model.eval()
    # the example shape lets the report count the convolutions' FLOPs per output position
    rep = sparsevd.report(model, input_shape=tuple(data["test_x"].shape[1:])) if bayesian else None
    summary = {
        "network": NETWORK_NAMES[c.model], "model": c.model, "method": c.method, "dataset": data_name,
        "random_labels": c.random_labels, "epochs": c.epochs, "epochs_done": len(history),
        "device": _device_name(c.device), "commit": _git_commit(), "torch": torch.__version__,
        "world_size": c.world_size, "backend": backend,
        "sizes": {k: len(data[f"{k}_y"]) for k in ("train", "val", "test")},
        "command": command,
        "kl_weight": c.kl_weight if bayesian else None,
        "training_threshold": training_threshold,
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
        "examples_per_second": _examples_per_second(history, len(data["train_y"])),
        "finetune": None,
        "warnings": list(warnings),
    }
    if finetune is not None:
        after = {k: summary[k] for k in ("test_error", "val_error", "train_error")}
        after.update(kept=rep.total["kept"], total=rep.total["total"], compression=summary["compression"])
        summary["finetune"] = {k: finetune[k] for k in ("epochs", "noise", "lr", "before")}
        summary["finetune"]["after"] = after
    if bayesian:
        final = collapse_warning(c.random_labels, 1 - summary["test_error"] / 100, chance(data["test_y"]),
                                 rep.total["kept"], rep.total["total"], what="test accuracy")
        if final:
            log.warning(final)
            summary["warnings"].append(final)
    x = data["test_x"]
    for batch in (1, 256):
        row = {"batch": batch, "eval_model_s": median_time(model, x[:batch], c.timing_repeats)}
        if bayesian:
            dense_copy = sparsevd.sparsify(model, batch_size=batch, cost_model=ALWAYS_DENSE, shrink=False)
            row["dense_copy_s"] = median_time(dense_copy, x[:batch], c.timing_repeats)
            fast = sparsevd.sparsify(model, batch_size=batch, input_shape=tuple(x.shape[1:]))
            row["sparsified_s"] = median_time(fast, x[:batch], c.timing_repeats)
        summary["timings"].append(row)
    # fine-tuned without noise, the network is a point estimate: there is no posterior to sample
    if bayesian and (finetune is None or finetune["noise"]):
        summary["uncertainty"] = uncertainty_summary(model, data, c.samples)

    summary["plots"] = plots.plot_run(c.out, history, snapshots, model if bayesian else None, curve,
                                      summary["threshold"], dense["val_error"] if dense else None)
    with open(os.path.join(c.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = results_markdown(summary, rep, dense)
    with open(os.path.join(c.out, "results.md"), "w") as f:
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


def table_row(s, note=""):
    """One row of the paper's table: network, method (and ``note``), error %, per-layer
    sparsity %, |W|/|W≠0|, and the threshold that compression is counted at."""
    method = ("SparseVD" if s["method"] == "sparsevd" else "dense") + (", random labels" if s["random_labels"] else "")
    method += note
    sparsity = " − ".join(f"{100 * r['sparsity']:.1f}" for r in s["layers"]) or "–"
    compression = "∞ (all pruned)" if math.isinf(s["compression"]) else f"{s['compression']:.0f}"
    kept_where = f"log α < {s['threshold']:g}" if s.get("threshold") is not None else "–"
    return f"| {s['network']} | {method} | {s['test_error']:.2f} | {sparsity} | {compression} | {kept_where} |"


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
        return f"{s['epochs_done']} epochs ({trained} SparseVD + {tuned['epochs']} fine-tuning)"
    return plural(s["epochs_done"], "epoch")


def _processes_text(s):
    n = s.get("world_size", 1)
    return "1 process" if n == 1 else f"{n} processes (DistributedDataParallel, {s['backend']})"


def _ratio(compression):
    return "∞ (all pruned)" if math.isinf(compression) else f"{compression:.1f}"


def _us(seconds):
    return f"{1e6 * seconds:.0f} µs"


def results_markdown(s, rep, dense=None):
    lines = [
        f"# {s['network']}, {'SparseVD' if s['method'] == 'sparsevd' else 'dense'} on {s['dataset']}",
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
    if tuned:
        before, after = tuned["before"], tuned["after"]
        lines += ["", f"Fine-tuning: {plural(tuned['epochs'], 'epoch')} with the mask fixed at log α < "
                      f"{s['threshold']:g}, on the data term alone (no KL), {'with' if tuned['noise'] else 'without'} "
                      f"the kept weights' noise, Adam from lr {tuned['lr']:g} decaying linearly; the pruned weights "
                      "stayed exactly zero.",
                  "", "| | test error % | validation error % | train error % | \\|W\\|/\\|W≠0\\| |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} fine-tuning | {m['test_error']:.2f} | {m['val_error']:.2f} | {m['train_error']:.2f} | "
                  f"{_ratio(m['compression'])} |" for name, m in (("before", before), ("after", after))]
        lines.append("")
    if rep is not None:
        how = "chosen on the validation split" if s["threshold_chosen"] else "given"
        epochs = "SparseVD epoch lines (the fine-tuning ones: the fixed mask)" if tuned else "epoch lines"
        lines += [f"Kept weights: log α < {s['threshold']:g} ({how}); the {epochs} of train.log count them at "
                  f"the layers' threshold during training, log α < {s['training_threshold']}. KL weight "
                  f"{s['kl_weight']:g} after the warm-up.", "", "```", str(rep), "```",
                  "", "Validation error against compression, by threshold (the trade-off; tradeoff.png):", "",
                  "| kept where | \\|W\\|/\\|W≠0\\| | validation error % |", "|---|---|---|"]
        lines += tradeoff_rows(s["threshold_curve"], s["threshold"])
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
