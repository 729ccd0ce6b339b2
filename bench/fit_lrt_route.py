"""The LRT's route rule (``triton_kernels.lrt.FUSED_BELOW_MACS``) from measurements.

    python bench/fit_lrt_route.py bench_lrt.json

Reads bench/bench_lrt.py's forward+backward rows of both routes ("sparsevd-cublas",
"sparsevd-fused") per dtype and shape, and prints the rule: the fused route for problems
below the smallest M·N·K at which it stops winning by MARGIN. It never extrapolates:
above the largest shape where the fused route won, cuBLAS stays. float16 is not timed
and takes bfloat16's bound (the same tensor-core path on both sides).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from report import per_call_seconds

ROUTES = ("sparsevd-cublas", "sparsevd-fused")
#: The fused route must be this much faster to take a shape (timing noise, and the default
#: is cuBLAS).
MARGIN = 0.05


def route_times(data):
    """{dtype: {macs: {route: seconds}}} from bench_lrt's forward+backward route rows."""
    out = defaultdict(lambda: defaultdict(dict))
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if info.get("impl") in ROUTES and info.get("mode") == "fwd+bwd":
            out[info["dtype"].replace("torch.", "")][info["macs"]][info["impl"]] = per_call_seconds(bench)
    return out


def fit(times):
    """({dtype: bound}, [table rows]) for one route_times() result."""
    bounds, rows = {}, []
    for dtype, by_macs in sorted(times.items()):
        bound, winning = 0, True
        for macs in sorted(by_macs):
            t = by_macs[macs]
            if len(t) < 2:
                continue
            fused_wins = t["sparsevd-fused"] < (1 - MARGIN) * t["sparsevd-cublas"]
            rows.append((dtype, macs, t["sparsevd-cublas"], t["sparsevd-fused"], fused_wins))
            if winning and fused_wins:
                bound = macs + 1  # fused below the next measured size; no extrapolation above
            elif winning:
                winning = False
                bound = macs if bound else 0
        bounds[dtype] = bound
    if "bfloat16" in bounds and "float16" not in bounds:
        bounds["float16"] = bounds["bfloat16"]
    return bounds, rows


def render(bounds, rows):
    lines = ["| dtype | M·N·K | cuBLAS route | fused route | fused wins (by > {:.0%}) |".format(MARGIN),
             "|---|---|---|---|---|"]
    for dtype, macs, cublas, fused, wins in rows:
        verdict = "yes" if wins else "no"
        lines.append(f"| {dtype} | {macs:.3g} | {cublas * 1e3:.4g} ms | {fused * 1e3:.4g} ms | {verdict} |")
    order = ("float32", "float16", "bfloat16")
    entries = ", ".join(f"torch.{d}: {int(bounds[d])}" for d in order if d in bounds)
    lines += ["", "```python", f"FUSED_BELOW_MACS = {{{entries}}}  # triton_kernels/lrt.py", "```"]
    return "\n".join(lines) + "\n"


def main(paths):
    times = defaultdict(lambda: defaultdict(dict))
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for dtype, by_macs in route_times(json.load(f)).items():
                for macs, t in by_macs.items():
                    times[dtype][macs].update(t)
    bounds, rows = fit(times)
    if not rows:
        return "No forward+backward rows of both LRT routes in the input.\n"
    return render(bounds, rows)


if __name__ == "__main__":
    print(main(sys.argv[1:]), end="")
