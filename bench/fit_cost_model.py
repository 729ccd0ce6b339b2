"""Fit sparsify()'s cost model (``sparsevd.sparsify.DeviceCost``) to benchmark results.

    python bench/fit_cost_model.py bench_csr.json [bench_conv.json]

bench/bench_csr.py's rows ("dense" fp32, "dense-bf16", "sparsevd" CSR fp32,
"sparsevd-bf16") give, through ``CostModel.time`` itself (one formula, the one sparsify
uses),

    dense: overhead + max(N·K·e / bandwidth, 2·N·K·batch / rate_fp32 or rate_fast)
    CSR:   overhead + max(nnz·(e + 4) / bandwidth, 2·nnz·batch / rate)

fitted by least squares on log time (Nelder-Mead on log parameters, from the constants
sparsify has now). bench/bench_conv.py's "im2col" rows give ``im2col_bandwidth`` (the
median of patch bytes over time); without them the current value stays. Prints the
DeviceCost to paste into sparsevd/sparsify.py, the fit's errors, and how often the
fitted model picks the faster form of a measured case, against the current constants.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
from collections import defaultdict

import numpy as np
from scipy.optimize import minimize

from report import per_call_seconds
from sparsevd.sparsify import CPU_COST, CUDA_COST, CostModel, DeviceCost

FORMS = {"dense": ("dense", 4), "dense-bf16": ("dense", 2), "sparsevd": ("csr", 4), "sparsevd-bf16": ("csr", 2)}
FIELDS = [f.name for f in dataclasses.fields(DeviceCost) if f.name != "im2col_bandwidth"]


def device_type(data):
    return "cpu" if str(data["machine_info"].get("device", "")).startswith("CPU") else "cuda"


def csr_rows(data):
    """[(form, N, K, nnz, batch, element_size, seconds)] of a bench_csr JSON."""
    rows = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if info.get("impl") not in FORMS or "batch" not in info or "shape" not in info:
            continue
        form, size = FORMS[info["impl"]]
        n, k = info["shape"]
        batch = info["batch"]
        rows.append((form, n, k, info["flops"] / (2 * batch), batch, size, per_call_seconds(bench)))
    return rows


def im2col_bandwidth(data):
    rates = [b["extra_info"]["bytes"] / per_call_seconds(b) for b in data["benchmarks"]
             if b["extra_info"].get("impl") == "im2col"]
    return statistics.median(rates) if rates else None


def predict(cost, rows, device):
    model = CostModel(cpu=cost, cuda=cost)
    return np.array([model.time(form, n, k, nnz, batch, device, size) for form, n, k, nnz, batch, size, _ in rows])


def log_error(cost, rows, device):
    measured = np.array([r[-1] for r in rows])
    return np.log(predict(cost, rows, device)) - np.log(measured)


def fit(rows, device, start):
    """The DeviceCost (im2col_bandwidth kept from ``start``) minimising the squared log error."""

    def cost_of(logs):
        return dataclasses.replace(start, **{f: math.exp(v) for f, v in zip(FIELDS, logs)})

    def loss(logs):
        return float(np.mean(log_error(cost_of(logs), rows, device) ** 2))

    logs = np.log([getattr(start, f) for f in FIELDS])
    for _ in range(3):  # restarts: Nelder-Mead stalls on the max()'s kinks
        logs = minimize(loss, logs, method="Nelder-Mead", options={"maxiter": 4000, "xatol": 1e-4, "fatol": 1e-10}).x
    return cost_of(logs)


def decisions(cost, rows, device):
    """(wrong picks, cases, worst regret in seconds): per measured case (shape, nnz,
    batch, element size) with both forms, whether the model picks the faster one."""
    cases = defaultdict(dict)
    for row in rows:
        form, n, k, nnz, batch, size, seconds = row
        cases[(n, k, round(nnz), batch, size)][form] = seconds
    model = CostModel(cpu=cost, cuda=cost)
    wrong, worst, total = 0, 0.0, 0
    for (n, k, nnz, batch, size), t in cases.items():
        if len(t) < 2:
            continue
        total += 1
        pick = model.choose(n, k, nnz, batch, device, size)
        best = min(t, key=t.get)
        if pick != best:
            wrong += 1
            worst = max(worst, t[pick] - t[best])
    return wrong, total, worst


def render(cost, current, rows, device, im2col_measured):
    def summary(c):
        err = np.abs(np.expm1(log_error(c, rows, device)))
        wrong, total, worst = decisions(c, rows, device)
        return (f"median |error| {np.median(err):.0%}, max {np.max(err):.0%}; "
                f"picks the slower form in {wrong} of {total} cases (worst loss {worst * 1e6:.1f} µs)")

    values = ", ".join(f"{f}={getattr(cost, f):.3g}" for f in FIELDS)
    im2col = f"{cost.im2col_bandwidth:.3g}"
    note = "measured" if im2col_measured else "not measured: current value kept"
    name = "CUDA_COST" if device == "cuda" else "CPU_COST"
    return (
        f"Fitted to {len(rows)} rows ({device}).\n\n"
        f"```python\n{name} = DeviceCost({values},\n    im2col_bandwidth={im2col})  # im2col: {note}\n```\n\n"
        f"- fitted: {summary(cost)}\n- current constants: {summary(current)}\n"
    )


def main(paths):
    rows, device, im2col = [], None, None
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        device = device or device_type(data)
        rows += csr_rows(data)
        im2col = im2col_bandwidth(data) or im2col
    if not rows:
        return "No CSR benchmark rows in the input.\n"
    current = CUDA_COST if device == "cuda" else CPU_COST
    cost = fit(rows, device, current)
    if im2col:
        cost = dataclasses.replace(cost, im2col_bandwidth=im2col)
    return render(cost, current, rows, device, im2col is not None)


if __name__ == "__main__":
    print(main(sys.argv[1:]), end="")
