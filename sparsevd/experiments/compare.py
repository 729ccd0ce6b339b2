"""The comparison command, ``sparsevd-compare`` / ``python -m sparsevd.compare``: finished
training runs side by side, test error against compression.

    sparsevd-compare runs/f300-* --out runs/f300-compare

It reads each run's summary.json and groups the runs by network, data set, method, start
(from scratch or from a dense run), epoch budget and setting (the threshold rule, the
threshold or the target compression); the seeds of a group are averaged, with their spread.
It writes ``comparison.md`` (one table of every group, and SparseVD against magnitude
pruning at matching compressions), ``comparison.png`` (test error against compression, log
x-axis, one panel per network and data set) and ``comparison.json`` (the groups)."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys

from matplotlib.figure import Figure

from .models import METHOD_NAMES
from .plots import compression_axis

#: Two compressions match when they differ by at most this factor.
MATCH_FACTOR = 1.25
#: The methods that prune with Bayesian layers, compared with magnitude pruning.
BAYESIAN = ("sparsevd", "sbp", "sparsevd+sbp")


class CompareError(ValueError):
    """A run that cannot be compared: unfinished, unreadable, or not a training run."""


def read_run(run_dir):
    """The summary.json of the finished run in ``run_dir``."""
    if not os.path.isdir(run_dir):
        raise CompareError(f"{run_dir} is not a directory (the --out of a training run)")
    path = os.path.join(run_dir, "summary.json")
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except FileNotFoundError:
        raise CompareError(f"{run_dir}: no summary.json (is the run finished?)") from None
    except (OSError, json.JSONDecodeError) as error:
        raise CompareError(f"{path}: cannot read it ({error})") from None
    missing = [k for k in ("network", "method", "dataset", "test_error", "compression") if k not in summary]
    if not isinstance(summary, dict) or missing:
        raise CompareError(f"{path} is not the summary of a training run (no {', '.join(missing)})")
    summary["run"] = run_dir
    return summary


def _flag(s, name):
    """The value of ``--name`` in the run's command (for summaries from before it was recorded)."""
    try:
        words = shlex.split(s.get("command", ""))
    except ValueError:
        return None
    return next((words[i + 1] for i, w in enumerate(words[:-1]) if w == name), None)


def seed(s):
    return s["seed"] if s.get("seed") is not None else int(_flag(s, "--seed") or 0)


def setting(s):
    """How the run chose what it keeps, in words: the part of its group that is not the method."""
    if s["method"] == "dense":
        return "–"
    if s.get("pruning"):
        p = s["pruning"]
        return f"target {p['target_compression']:g}× ({p['scope']})"
    target = s.get("target_compression") or _flag(s, "--target-compression")
    if target is not None:
        return f"target {float(target):g}×"
    if s.get("threshold") is not None and not s.get("threshold_chosen"):
        return f"log α < {s['threshold']:g}"
    if s.get("threshold") is not None:
        tolerance = _flag(s, "--threshold-tolerance")
        return f"auto (±{float(tolerance):g} points)" if tolerance else "auto"
    return f"SNR > {s['sbp_threshold']:g}" if s.get("sbp_threshold") is not None else "–"


def start(s):
    return "from dense" if (s.get("recipe") or {}).get("init_from") else "from scratch"


def budget(s):
    """The epochs of the run: "60 + 15" (training + fine-tuning) or "30"."""
    tuned = (s.get("finetune") or {}).get("epochs")
    return f"{s['epochs']} + {tuned}" if tuned else str(s["epochs"])


def data(s):
    """The data set and its training images: runs on a subset are not averaged with full ones."""
    train = (s.get("sizes") or {}).get("train")
    return f"{s['dataset']}, {train:,} train" if train else s["dataset"]


def group(summaries):
    """The runs grouped by network, data set, method, start, budget and setting, the seeds
    of each averaged: a list of dicts, sorted by network, method and compression."""
    groups = {}
    for s in summaries:
        key = (s["network"], data(s), s["method"], start(s), budget(s), setting(s))
        groups.setdefault(key, []).append(s)
    rows = []
    for (network, dataset, method, begin, epochs, how), runs in groups.items():
        scope = (runs[0].get("pruning") or {}).get("scope")
        errors = [r["test_error"] for r in runs]
        compressions = [r["compression"] for r in runs]
        finite = [c for c in compressions if math.isfinite(c)]
        rows.append({
            "network": network, "dataset": dataset, "method": method, "start": begin, "epochs": epochs,
            "setting": how, "scope": scope, "seeds": sorted(seed(r) for r in runs), "runs": [r["run"] for r in runs],
            "test_error": statistics.fmean(errors),
            "test_error_sd": statistics.stdev(errors) if len(errors) > 1 else 0.0,
            "test_error_range": [min(errors), max(errors)],
            # the geometric mean: compressions multiply
            "compression": math.exp(statistics.fmean(math.log(c) for c in finite)) if finite else math.inf,
            "compression_range": [min(compressions), max(compressions)],
        })
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    rows.sort(key=lambda r: (r["network"], r["dataset"], order.get(r["method"], len(order)), r["start"], r["epochs"],
                             r["compression"]))
    return rows


def _dense_of(rows, row):
    return next((r for r in rows if r["method"] == "dense" and (r["network"], r["dataset"]) == (row["network"],
                                                                                              row["dataset"])), None)


def matches(rows):
    """Each Bayesian group against the magnitude-pruning group of the same network, data
    set and budget at the nearest compression (within :data:`MATCH_FACTOR`): a list of
    (bayesian, magnitude) pairs."""
    pairs = []
    for row in rows:
        if row["method"] not in BAYESIAN or not math.isfinite(row["compression"]):
            continue
        rivals = [r for r in rows if r["method"] == "magnitude" and math.isfinite(r["compression"])
                  and (r["network"], r["dataset"], r["epochs"]) == (row["network"], row["dataset"], row["epochs"])]
        if not rivals:
            continue
        rival = min(rivals, key=lambda r: abs(math.log(r["compression"] / row["compression"])))
        low, high = sorted((rival["compression"], row["compression"]))
        if high <= MATCH_FACTOR * low:
            pairs.append((row, rival))
    return pairs


def _times(c):
    return "∞" if math.isinf(c) else f"{c:.1f}"


def _compression_text(r):
    lo, hi = r["compression_range"]
    return _times(r["compression"]) + (f" ({_times(lo)}–{_times(hi)})" if len(r["seeds"]) > 1 else "")


def _error_text(r):
    return f"{r['test_error']:.2f}" + (f" ± {r['test_error_sd']:.2f}" if len(r["seeds"]) > 1 else "")


def markdown(rows, commands=()):
    """comparison.md: every group, then SparseVD against magnitude pruning at matching compressions."""
    lines = ["# Test error against compression", "",
             "Each row: the runs of one network, data set, method, start, epoch budget (training + fine-tuning) and "
             "setting; with several seeds, the test error is their mean ± standard deviation, the compression their "
             "geometric mean (min–max). \"vs dense\": points of test error above the dense network's mean.", "",
             "| network | data | method | start | epochs | setting | seeds | \\|W\\|/\\|W≠0\\| | test error % | "
             "vs dense |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dense = _dense_of(rows, r)
        delta = f"{r['test_error'] - dense['test_error']:+.2f}" if dense and r is not dense else "–"
        lines.append(f"| {r['network']} | {r['dataset']} | {METHOD_NAMES.get(r['method'], r['method'])} | {r['start']} "
                     f"| {r['epochs']} | {r['setting']} | {', '.join(map(str, r['seeds']))} | {_compression_text(r)} | "
                     f"{_error_text(r)} | {delta} |")
    pairs = matches(rows)
    if pairs:
        lines += ["", f"At matching compression (within {MATCH_FACTOR:g}×, the same network, data and epoch budget): "
                      "the difference is magnitude pruning's test error minus the Bayesian method's (positive: the "
                      "Bayesian method is ahead).", "",
                  "| network | data | epochs | method | \\|W\\|/\\|W≠0\\| | test error % | magnitude pruning "
                  "\\|W\\|/\\|W≠0\\| | test error % | difference (points) |", "|---|---|---|---|---|---|---|---|---|"]
        for row, rival in pairs:
            lines.append(f"| {row['network']} | {row['dataset']} | {row['epochs']} | "
                         f"{METHOD_NAMES[row['method']]} ({row['setting']}, {row['start']}) | "
                         f"{_compression_text(row)} | "
                         f"{_error_text(row)} | {_compression_text(rival)} | {_error_text(rival)} | "
                         f"{rival['test_error'] - row['test_error']:+.2f} |")
    lines += ["", "Runs:", ""] + [f"- `{r}`" for row in rows for r in row["runs"]]
    if commands:
        lines += ["", "Command:", "", f"`{shlex.join(commands)}`"]
    lines += ["", "Plot: [comparison.png](comparison.png)", ""]
    return "\n".join(lines)


def plot(rows, path):
    """comparison.png: test error against compression (log x), one panel per network and
    data set; a line per method, start and budget through its settings, the seeds' spread
    as error bars (y: standard deviation, x: min–max); the dense network as a dashed line."""
    panels = sorted({(r["network"], r["dataset"]) for r in rows})
    fig = Figure(figsize=(6.5 * len(panels), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (network, dataset) in zip(axes, panels):
        here = [r for r in rows if (r["network"], r["dataset"]) == (network, dataset)]
        series = {}
        for r in here:
            if r["method"] != "dense" and math.isfinite(r["compression"]):
                series.setdefault((r["method"], r["start"], r["epochs"], r["scope"]), []).append(r)
        for (method, begin, epochs, scope), points in series.items():
            points.sort(key=lambda r: r["compression"])
            xs = [r["compression"] for r in points]
            # the geometric mean lies within the range, up to rounding
            xerr = [[max(x - r["compression_range"][0], 0) for x, r in zip(xs, points)],
                    [max(min(r["compression_range"][1], 1e12) - x, 0) for x, r in zip(xs, points)]]
            ax.errorbar(xs, [r["test_error"] for r in points], yerr=[r["test_error_sd"] for r in points], xerr=xerr,
                        marker="o", markersize=4, capsize=2,
                        label=f"{METHOD_NAMES[method]}{f' ({scope})' if scope else ''}, {begin}, {epochs} epochs")
        for r in here:
            if r["method"] == "dense":
                ax.axhline(r["test_error"], color="tab:gray", linestyle="--", label=f"dense {r['test_error']:.2f}%")
                if r["test_error_sd"]:
                    ax.axhspan(r["test_error"] - r["test_error_sd"], r["test_error"] + r["test_error_sd"],
                               color="tab:gray", alpha=0.15, lw=0)
        compression_axis(ax, [1.0] + [r["compression"] for r in here], which="x", color="black", log=True)
        ax.set_ylabel("test error %")
        ax.set_title(f"{network}, {dataset}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)


def build_parser():
    p = argparse.ArgumentParser(prog="sparsevd-compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output directories of finished training runs")
    p.add_argument("--out", required=True, help="directory for comparison.md, comparison.png and comparison.json")
    return p


def compare(run_dirs, out, command=()):
    """Compare the runs in ``run_dirs`` into ``out``; returns the groups."""
    summaries = [read_run(d) for d in dict.fromkeys(os.path.normpath(d) for d in run_dirs)]
    rows = group(summaries)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CompareError(f"--out {out} is a file: the output must be a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise CompareError(f"--out {out}: cannot create it ({error.strerror or error})") from None
    with open(os.path.join(out, "comparison.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(markdown(rows, command))
    plot(rows, os.path.join(out, "comparison.png"))
    return rows


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    command = ["sparsevd-compare", *(sys.argv[1:] if argv is None else argv)]
    try:
        compare(args.runs, args.out, command)
    except CompareError as error:
        parser.error(str(error))
    print(os.path.join(args.out, "comparison.md"))
