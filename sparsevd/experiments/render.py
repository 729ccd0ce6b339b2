"""results.md of a run: its tables (the papers' formats), the trade-off, the recipe and
the timings, rendered from the run's summary dict (see :func:`.results.write_results`)."""

from __future__ import annotations

import math

from .measure import TIMING_THREADS
from .models import METHOD_NAMES


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
    if r.get("pruning"):
        text += "; " + pruning_text(r["pruning"])
    return text + (f"; from the dense network of {r['init_from']}" if r["init_from"] else "; from scratch")


def pruning_text(p):
    """Magnitude pruning's schedule (:func:`.measure.recipe`'s ``pruning``), as a phrase."""
    scope = "over all layers together" if p["scope"] == "global" else "the same share of each layer"
    return (f"magnitude pruning ({p['scope']}: the smallest |w| {scope}) to {p['target_compression']:g}× on Zhu "
            f"& Gupta's cubic schedule from epoch 0 to {p['end_epoch']:.3g}, every {plural(p['every'], 'step')}, then "
            "the mask fixed")


def _method(s):
    return METHOD_NAMES[s["method"]] + (", random labels" if s["random_labels"] else "")


def _kept_where(s):
    parts = [f"log α < {s['threshold']:g}"] if s.get("threshold") is not None else []
    if s.get("sbp_threshold") is not None:
        parts.append(f"SNR > {s['sbp_threshold']:g}")
    if s.get("pruning"):
        parts.append(f"largest magnitudes ({s['pruning']['scope']})")
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
        how = "on the data term" if s.get("pruning") else \
            f"on the data term alone (no KL), {'with' if tuned['noise'] else 'without'} the noise of the kept " \
            "weights and units"
        lines += ["", f"Fine-tuning: {plural(tuned['epochs'], 'epoch')} with the masks fixed at {_kept_where(s)}, "
                      f"{how}, Adam from lr {tuned['lr']:g} decaying linearly; the pruned weights and units stayed "
                      "exactly zero.",
                  "", "| | test error % | validation error % | train error % | \\|W\\|/\\|W≠0\\| |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} fine-tuning | {m['test_error']:.2f} | {m['val_error']:.2f} | {m['train_error']:.2f} | "
                  f"{_ratio(m['compression'])} |" for name, m in (("before", before), ("after", after))]
    if rep is not None:
        kept = []
        if s["threshold"] is not None:
            if s.get("threshold_rule"):  # summaries from before the rule was recorded have none
                how = s["threshold_rule"] if s["threshold_rule"].startswith("given") else \
                    f"chosen on the validation split: {s['threshold_rule']}"
            else:
                how = "chosen on the validation split" if s["threshold_chosen"] else "given"
            kept.append(f"SparseVD weights where log α < {s['threshold']:g} ({how})")
        if s["sbp_threshold"] is not None:
            kept.append(f"SBP units where SNR > {s['sbp_threshold']:g}")
        if s.get("pruning"):
            kept.append(f"the weights left by {pruning_text(s['pruning'])}")
        epochs = "training epoch lines (the fine-tuning ones: the fixed masks)" if tuned else "epoch lines"
        during = f" at the layers' threshold during training, log α < {s['training_threshold']}" \
            if s["training_threshold"] else ""
        kl = f" KL weight {s['kl_weight']:g}." if s["kl_weight"] is not None else ""
        lines += ["", f"Kept: {' and '.join(kept)}; the {epochs} of train.log count them{during}.{kl} Per layer (a "
                  "weight counts as kept when its units are kept too):", "", "```", str(rep), "```"]
        if s.get("parts"):
            lines += ["", "Sparsity by part: " + ", ".join(
                f"{name} {100 * p['sparsity']:.1f}% ({p['kept']:,} of {p['total']:,} kept)"
                for name, p in s["parts"].items()) + "."]
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
    if s.get("pruning"):
        lines += ["", "No uncertainty summary: magnitude pruning trains a point estimate, with no posterior to "
                      "sample."]
    elif tuned and not tuned["noise"]:
        lines += ["", "No uncertainty summary: fine-tuned without noise, the network is deterministic (a point "
                      "estimate); --finetune-noise keeps a posterior to sample."]
    if s["uncertainty"]:
        lines += ["", "Uncertainty of the Bayesian ensemble (mean over inputs, nats):", "",
                  "| inputs | predictive entropy | expected entropy | mutual information |", "|---|---|---|---|"]
        lines += [f"| {u['inputs']} | {u['predictive_entropy']:.3f} | {u['expected_entropy']:.3f} | "
                  f"{u['mutual_information']:.4f} |" for u in s["uncertainty"]]
    lines += ["", "Plots: " + ", ".join(f"[{name}]({name})" for name in s["plots"]), ""]
    return "\n".join(lines)
