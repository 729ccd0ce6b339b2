"""results.md of a GPU run: device, versions, commit, each target of issue #16 with its
measured figure and met / missed, the rules the measurements set, then every table.

    python bench/targets.py RUN_DIR > RUN_DIR/results.md

Reads what bench/run_gpu.sh leaves in RUN_DIR: device.txt, stages.tsv, tests.log and
bench_{lrt,kl,csr,conv,inference}.json, whichever exist (a stage that timed out or was
skipped shows as "not measured").
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import fit_cost_model
import fit_lrt_route
from report import header, per_call_seconds, table

LRT_TARGET = "lrt fwd+bwd bfloat16 M=4096 K=4096 N=4096"
LENET_STEP = "lenet-300-100 training step batch 100 float32"
KL_TARGET = "kl fwd+bwd float32 4096x4096"
CSR_SHAPE = (4096, 4096)


def load(run_dir, name):
    """The stage's benchmark JSON, or None when it holds nothing to read: pytest-benchmark
    before 5.0 creates the file empty when pytest starts, so a stage that ran no benchmark
    (a dry run, a crash, a timeout) leaves an empty file, and a stage killed while writing
    leaves a cut one. Either reads as not measured, which stages.tsv then explains."""
    path = os.path.join(run_dir, f"bench_{name}.json")
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        print(f"{path}: not valid JSON ({error}); read as not measured", file=sys.stderr)
        return None


def times(data, kernels=False):
    """{group: {impl: seconds per call}} and {group: {impl: extra_info}}; with ``kernels``,
    the GPU kernels' own time where the harness measured it (calls bound by launch cost),
    else the wall time."""
    t, info = defaultdict(dict), defaultdict(dict)
    for bench in (data or {}).get("benchmarks", []):
        extra = bench["extra_info"]
        wall = per_call_seconds(bench)
        t[bench["group"]][extra.get("impl")] = (extra.get("kernel_s") or wall) if kernels else wall
        info[bench["group"]][extra.get("impl")] = extra
    return t, info


class Targets:
    def __init__(self):
        self.rows = []

    def add(self, what, figure, met, note=""):
        """``figure``: a string, or None when not measured; ``met``: bool, or None for a
        figure shown for information."""
        if figure is None:
            verdict = "not measured"
        elif met is None:
            verdict = "(information)"
        else:
            verdict = "**met**" if met else "**missed**"
        self.rows.append(f"| {what} | {figure if figure is not None else '–'} | {verdict} | {note} |")

    def ratio(self, what, group, num, den, bound, at_most, note=""):
        t = group or {}
        if num not in t or den not in t:
            return self.add(what, None, None, note)
        r = t[num] / t[den]
        self.add(what, f"{r:.2f}× ({t[num] * 1e3:.4g} / {t[den] * 1e3:.4g} ms)", r <= bound if at_most else r >= bound,
                 note)

    def render(self):
        return "\n".join(["| target | measured | verdict | note |", "|---|---|---|---|"] + self.rows) + "\n"


def copy_bandwidth(kl_times, kl_info):
    """Bytes per second of the KL bench's copy row (reads + writes of 4 tensor-sizes)."""
    t, info = kl_times.get(KL_TARGET, {}), kl_info.get(KL_TARGET, {})
    return info["copy"]["bytes"] / t["copy"] if "copy" in t else None


def lrt_targets(targets, lrt):
    t, _ = times(lrt)
    group = t.get(LRT_TARGET)
    targets.ratio("LRT fwd+bwd bf16 4096³: sparsevd / dense nn.Linear ≤ 2.3", group, "sparsevd", "dense", 2.3, True,
                  "the floor is 2× (6 GEMMs against 3)")
    targets.ratio("LRT fwd+bwd bf16 4096³: eager / sparsevd ≥ 1.3", group, "eager", "sparsevd", 1.3, False)
    targets.ratio("LRT fwd+bwd bf16 4096³: torch.compile / sparsevd ≥ 1.1", group, "compile", "sparsevd", 1.1, False)
    if group and "sparsevd-fused" in group and "sparsevd-cublas" in group:
        targets.add("LRT 4096³ bf16: fused-GEMM route / cuBLAS route (informative)",
                    f"{group['sparsevd-fused'] / group['sparsevd-cublas']:.2f}×", None, "above 1: cuBLAS faster")
    targets.ratio("LeNet-300-100 training step: sparsevd / dense ≤ 2.5", t.get(LENET_STEP), "sparsevd", "dense", 2.5,
                  True, "batch 100, SGVLB with the KL term, Adam")


def kl_targets(targets, kl):
    t, info = times(kl)
    bandwidth = copy_bandwidth(t, info)
    group = t.get(KL_TARGET, {})
    for impl, note in (("sparsevd", "what training runs: fused forward+gradient, scaled in backward"),
                       ("sparsevd-separate", "forward op, then backward op"),
                       ("sparsevd-fused-kernel", "the one-pass kernel alone (the floor)")):
        what = f"KL fwd+bwd fp32 4096² ({impl})" + (": ≥ 80% of copy bandwidth" if impl == "sparsevd" else "")
        if bandwidth is None or impl not in group:
            targets.add(what, None, None, note)
            continue
        share = info[KL_TARGET][impl]["bytes"] / group[impl] / bandwidth
        targets.add(what, f"{share:.0%} ({group[impl] * 1e3:.4g} ms; copy {bandwidth / 1e12:.2f} TB/s)",
                    share >= 0.8 if impl == "sparsevd" else None, note)


def _csr_group(sparsity, batch):
    return f"csr N={CSR_SHAPE[0]} K={CSR_SHAPE[1]} sparsity={sparsity:.1%} batch={batch}"


def csr_targets(targets, csr, bandwidth):
    # the CSR figures are GPU times: a few µs of kernels under ~20 µs of Python and
    # launch cost per call, which the wall time would measure instead
    t, info = times(csr, kernels=True)
    batches = sorted({i.get("batch") for g in info.values() for i in g.values() if i.get("batch") is not None})
    for batch in [b for b in batches if b <= 8] or [1, 8]:
        targets.ratio(f"CSR 4096² 99%, batch {batch}: dense bf16 / sparsevd bf16 ≥ 5", t.get(_csr_group(0.99, batch)),
                      "dense-bf16", "sparsevd-bf16", 5.0, False, "GPU kernel time where measured")
    group, ginfo = t.get(_csr_group(0.99, 1), {}), info.get(_csr_group(0.99, 1), {})
    rates = {i: ginfo[i]["bytes"] / group[i] for i in ("sparsevd", "sparsevd-bf16") if i in group}
    what = "CSR 4096² 99%, batch 1: ≥ 50% of copy bandwidth"
    if not rates or bandwidth is None:
        targets.add(what, None, None, "copy bandwidth from the KL bench")
    else:
        impl = max(rates, key=rates.get)
        targets.add(what, f"{rates[impl] / bandwidth:.0%} ({impl}, {rates[impl] / 1e9:.0f} GB/s)",
                    rates[impl] >= 0.5 * bandwidth, "bytes: values, indices, row pointers, x, y; GPU kernel time")
    worst = None
    for name, g in t.items():
        i = next(iter(info[name].values()), {})
        if tuple(i.get("shape", ())) != CSR_SHAPE or i.get("sparsity", 0) < 0.9 - 1e-9:
            continue
        if "torch.sparse" in g and "sparsevd" in g:
            r = g["torch.sparse"] / g["sparsevd"]
            if worst is None or r < worst[0]:
                worst = (r, i["sparsity"], i["batch"])
    what = "CSR 4096² at ≥ 90%: cuSPARSE / sparsevd ≥ 2 at every batch (fp32)"
    if worst is None:
        targets.add(what, None, None)
    else:
        targets.add(what, f"worst {worst[0]:.2f}× (sparsity {worst[1]:.0%}, batch {worst[2]})", worst[0] >= 2.0)


def tables(data):
    groups = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"]].append(bench)
    return "\n".join(table(g, b) for g, b in sorted(groups.items()))


def _guarded(fit, paths):
    # a fit that breaks on unexpected rows must not cost the rest of the results
    try:
        return fit(paths)
    except Exception as error:  # noqa: BLE001
        return f"(failed: {error!r})\n"


def read(run_dir, name):
    path = os.path.join(run_dir, name)
    return open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else ""


def main(run_dir):
    lrt, kl, csr, conv, inference = (load(run_dir, n) for n in ("lrt", "kl", "csr", "conv", "inference"))
    commit = os.environ.get("SPARSEVD_COMMIT", "")
    out = ["# GPU run: issue #16's targets\n"]
    device = read(run_dir, "device.txt").strip()
    out.append(f"Commit {commit or '(SPARSEVD_COMMIT not set)'}\n\n```\n{device}\n```\n")
    stages = read(run_dir, "stages.tsv").strip()
    if stages:
        out += ["| stage | seconds | status |", "|---|---|---|"]
        out += [f"| {' | '.join(line.split(chr(9)))} |" for line in stages.splitlines()]
        out.append("")
    summary = [line for line in read(run_dir, "tests.log").splitlines() if " passed" in line or " failed" in line]
    if summary:
        out.append(f"GPU tests: {summary[-1].strip('= ')}\n")

    targets = Targets()
    lrt_targets(targets, lrt)
    kl_targets(targets, kl)
    kl_t, kl_info = times(kl)
    csr_targets(targets, csr, copy_bandwidth(kl_t, kl_info))
    out += ["## Targets\n", targets.render()]

    if lrt:
        out += ["## The LRT route rule these measurements set\n",
                _guarded(fit_lrt_route.main, [os.path.join(run_dir, "bench_lrt.json")])]
    if csr:
        paths = [os.path.join(run_dir, f"bench_{n}.json") for n, data in (("csr", csr), ("conv", conv)) if data]
        out += ["## sparsify()'s cost model fitted to these measurements\n", _guarded(fit_cost_model.main, paths)]
    for name, data in (("LRT", lrt), ("KL", kl), ("CSR", csr), ("conv", conv), ("inference", inference)):
        if data:
            out += [f"## {name}\n", header(data), tables(data)]
    return "\n".join(out)


if __name__ == "__main__":
    print(main(sys.argv[1]))
