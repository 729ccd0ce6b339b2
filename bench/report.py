"""Markdown tables of a pytest-benchmark JSON: time per call and ratios against sparsevd.

    python bench/report.py results.json [more.json ...] > results.md

"× sparsevd" is the baseline's time over sparsevd's: above 1 means sparsevd is faster
(for the dense yardstick it says how far below the dense layer's cost we are). "GPU
kernels" (GPU runs, calls under bench/harness.py's KERNEL_TIME_BELOW_S): the kernels' own
time per call, without the CPU's launch cost that bounds the wall time of such calls.
"""

import json
import os
import sys
from collections import defaultdict


def per_call_seconds(bench):
    return bench["stats"]["median"] / bench["extra_info"].get("inner", 1)


def header(data):
    machine, commit = data["machine_info"], data.get("commit_info", {})
    dirty = " (with uncommitted changes)" if commit.get("dirty") else ""
    return (
        f"Device: **{machine.get('device')}** · torch {machine.get('torch')} · triton {machine.get('triton')} · "
        f"commit {commit.get('id', '?')[:10]}{dirty} · {data.get('datetime', '')[:19]}\n\n"
        f"```\n{machine.get('sparsevd_dispatch', '')}\n```\n"
    )


def table(group, benches):
    ours = next((per_call_seconds(b) for b in benches if b["extra_info"].get("impl") == "sparsevd"), None)
    kernels = any(b["extra_info"].get("kernel_s") for b in benches)
    head = "| impl | time per call | × sparsevd | throughput | peak memory |" + (" GPU kernels |" if kernels else "")
    lines = [f"**{group}**\n", head, "|---|---|---|---|---|" + ("---|" if kernels else "")]
    for b in sorted(benches, key=per_call_seconds):
        info, t = b["extra_info"], per_call_seconds(b)
        ratio = f"{t / ours:.2f}" if ours else "–"
        if info.get("flops"):
            tflops = info["flops"] / t / 1e12
            rate = f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.1f} GFLOP/s"
        elif info.get("bytes"):
            rate = f"{info['bytes'] / t / 1e9:.0f} GB/s"
        else:
            rate = "–"
        mem = f"{info['peak_mem_mb']:.0f} MiB" if info.get("peak_mem_mb") is not None else "–"
        row = f"| {info.get('impl', b['name'])} | {t * 1e3:.4g} ms | {ratio} | {rate} | {mem} |"
        if kernels:
            row += f" {info['kernel_s'] * 1e6:.3g} µs |" if info.get("kernel_s") else " – |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def main(paths):
    out = []
    for path in paths:
        if os.path.getsize(path) == 0:
            # pytest-benchmark before 5.0 creates the file before any benchmark has run
            sys.exit(f"{path} is empty: that pytest run saved no benchmark (none selected, or it stopped early)")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        groups = defaultdict(list)
        for bench in data["benchmarks"]:
            groups[bench["group"]].append(bench)
        out.append(header(data))
        out.extend(table(group, benches) for group, benches in sorted(groups.items()))
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1:])
