"""Training throughput with 1 and 2 processes on the CPU: LeNet-300-100, SparseVD, global
batch 100 by default, examples per second of the training command's own steps (``loop.train_epoch``
under DistributedDataParallel and gloo, the per-rank batches of ``distributed.World``).

    python bench/bench_distributed.py [--steps 200] [--repeats 3] [--out FILE.md]

runs, per repeat, each configuration under ``torchrun --standalone`` (one process with
all the cores' threads, one with one thread, 2 processes sharing the cores, and as a
control 2 independent one-process jobs at once, which need no communication: the most
the machine gives 2 processes at the time), the configurations interleaved so that a change in the machine's load hits them alike, and
prints (or writes) the medians as a markdown table with the machine, the command, and
the load average. Data: Fashion-MNIST when installed, else random images of its shape.
It is a script, not a pytest-benchmark file: each measurement is a job of several
processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

WARMUP_STEPS = 20


def _data():
    import torch

    from sparsevd.experiments import data

    try:
        x, y, _, _ = data.fashion_mnist()
        return x, y, "Fashion-MNIST (60,000 training images)"
    except FileNotFoundError:
        generator = torch.Generator().manual_seed(0)
        return (torch.rand(60000, 1, 28, 28, generator=generator), torch.randint(0, 10, (60000,), generator=generator),
                "random 28×28 images (Fashion-MNIST is not installed)")


def worker(steps, threads, batch):
    """One measurement, in each process of a torchrun job: rank 0 prints a JSON line."""
    import torch

    from sparsevd.experiments import distributed, loop
    from sparsevd.experiments.models import lenet_300_100

    world = distributed.current_world()
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    with distributed.process_group(world, device, timeout_s=300):
        x, y, data_name = _data()
        torch.manual_seed(0)
        model = lenet_300_100(bayesian=True)
        trained = distributed.wrap(model, world, device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = loop.make_loss(model, len(y), check_collapse_every=None)
        order = distributed.epoch_order(len(y), 0, 0)
        loop.train_epoch(trained, optimizer, loss_fn, x, y, batch, order=order[: WARMUP_STEPS * batch], world=world)
        stats = loop.train_epoch(trained, optimizer, loss_fn, x, y, batch, order=order[-steps * batch :], world=world)
        # the ranks end together (every step all-reduces); the slowest one's time counts
        seconds = max(world.sum([stats.seconds if r == world.rank else 0.0 for r in range(world.size)], device))
        if world.main:
            print(json.dumps({"processes": world.size, "threads": threads, "seconds": seconds,
                              "examples_per_second": steps * batch / seconds, "data": data_name}), flush=True)


def _run(processes, threads, steps, batch, copies=1):
    """One measurement: a torchrun job of ``processes``; with ``copies`` > 1, that many
    independent one-process jobs at once (their rates summed)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               os.path.abspath(__file__), "--worker", "--steps", str(steps), "--threads", str(threads),
               "--batch-size", str(batch)]
    jobs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)}) for _ in range(copies)]
    results = []
    for job in jobs:
        stdout, stderr = job.communicate(timeout=600)
        if job.returncode != 0:
            sys.exit(f"{shlex.join(command)} failed:\n{stderr[-3000:]}")
        results.append(json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1]))
    return dict(results[0], examples_per_second=sum(r["examples_per_second"] for r in results))


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _commit():
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                         text=True)
    return out.stdout.strip() or "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="timed global steps per measurement")
    parser.add_argument("--batch-size", type=int, default=100, help="the global batch (the paper's: 100)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the markdown table to this file too")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.steps, args.threads, args.batch_size)

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # (processes, threads, independent copies): the last, 2 one-process jobs at once with no
    # communication, is the most this machine gives 2 processes at the time
    configs = [(1, cores, 1), (1, 1, 1), (2, max(1, cores // 2), 1), (1, max(1, cores // 2), 2)]
    runs = {config: [] for config in configs}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for config in configs:
            runs[config].append(_run(config[0], config[1], args.steps, args.batch_size, config[2]))
            loads.append(os.getloadavg()[0])
    base = statistics.median(r["examples_per_second"] for r in runs[configs[0]])
    command = shlex.join(["python", "bench/bench_distributed.py"] + list(sys.argv[1:] if argv is None else argv))
    lines = [
        f"Device: **{_cpu_name()}, {cores} cores** · torch {torch.__version__} · commit {_commit()} · "
        f"{time.strftime('%Y-%m-%dT%H:%M:%S')} · 1-minute load average {min(loads):.1f}–{max(loads):.1f} "
        "during the runs",
        "",
        f"`{command}`: LeNet-300-100 SparseVD training steps (forward, SGVLB, backward, Adam; DDP all-reduce with "
        f"2 processes), global batch {args.batch_size}, {args.steps} timed steps after {WARMUP_STEPS}, on "
        f"{runs[configs[0]][0]['data']}; median of {args.repeats} runs, configurations interleaved.",
        "",
        "| processes × threads | examples/s (median) | runs | × 1 process, all cores |",
        "|---|---|---|---|",
    ]
    for (processes, threads, copies), results in runs.items():
        rates = [r["examples_per_second"] for r in results]
        median = statistics.median(rates)
        what = (f"{processes} × {threads}, DDP" if processes > 1 else
                f"{copies} × {threads}, independent (no DDP; the machine's ceiling)" if copies > 1 else
                f"1 × {threads}")
        lines.append(f"| {what} | {median:,.0f} | {', '.join(f'{r:,.0f}' for r in rates)} | {median / base:.2f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
