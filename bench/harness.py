"""Timing that is correct on GPUs, for pytest-benchmark.

Each benchmark round runs the function ``inner`` times and then synchronizes the
device once, so asynchronous launches are fully counted but the synchronization is
amortized; ``inner`` is calibrated so a round lasts at least ``MIN_ROUND_S``.
pytest-benchmark's statistics are per round: divide by ``extra_info["inner"]``
(bench/report.py does) for the time per call. Peak device memory of one call, above
what was allocated before it, is recorded as ``extra_info["peak_mem_mb"]``.

A call that takes less than KERNEL_TIME_BELOW_S on a GPU is timed by the CPU's launch cost
(Python, dispatcher, launches) rather than by its kernels: for it the GPU time the kernels
take, summed over them (torch.profiler), is recorded too, as ``extra_info["kernel_s"]``
(per call). The issue's CSR figures are such GPU times.
"""

from __future__ import annotations

import math
import os
import time

import torch

MIN_ROUND_S = 0.02
KERNEL_TIME_BELOW_S = 2e-4
ROUNDS = int(os.environ.get("SPARSEVD_BENCH_ROUNDS", "15"))
QUICK = os.environ.get("SPARSEVD_BENCH_QUICK") == "1"
#: torch threads of the CPU cases timed as a user calls them (the issues' targets: one)
THREADS = int(os.environ.get("SPARSEVD_BENCH_THREADS", "1"))


def device():
    """The device benchmarked. ``SPARSEVD_BENCH_DEVICE=cuda`` makes a CPU machine collect the
    GPU grid (bench/run_gpu.sh --dry-run checks its selections with --collect-only)."""
    forced = os.environ.get("SPARSEVD_BENCH_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(benchmark, fn, dev, **info):
    """Benchmark ``fn()`` on ``dev``; ``info`` (shape, dtype, bytes, flops, ...) goes to extra_info."""
    for _ in range(3):  # compilation, autotuning, allocator and cache warm-up
        fn()
    synchronize(dev)
    start = time.perf_counter()
    fn()
    synchronize(dev)
    once = time.perf_counter() - start
    inner = max(1, min(10_000, int(MIN_ROUND_S / max(once, 1e-7))))
    peak = None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        synchronize(dev)
        peak = (torch.cuda.max_memory_allocated(dev) - before) / 2**20

    def one_round():
        for _ in range(inner):
            fn()
        synchronize(dev)

    kernel_s = kernel_seconds(fn) if dev.type == "cuda" and once < KERNEL_TIME_BELOW_S else None
    benchmark.extra_info.update(info, inner=inner, peak_mem_mb=peak, device=device_name(dev), kernel_s=kernel_s)
    benchmark.pedantic(one_round, rounds=1 if benchmark.disabled else ROUNDS, iterations=1, warmup_rounds=1)


def kernel_seconds(fn, calls=20):
    """GPU time per call of ``fn``: the device time of the kernels (and copies) it runs,
    summed, from torch.profiler; None if the profiler is unavailable or saw nothing."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        total_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    except Exception:  # noqa: BLE001 - a figure missing is better than a benchmark lost
        return None
    return total_us / 1e6 / calls if total_us > 0 else None


def device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def compiled(fn):
    """torch.compile of a baseline; dynamic shapes so one compile serves every size."""
    return torch.compile(fn, dynamic=True)


def interleaved(fns, rounds=30, min_round_s=0.01, clock=time.thread_time):
    """Seconds per call of each of ``fns`` ({key: callable}), measured round-robin: each
    round times every callable once (a calibrated number of calls), and each keeps its
    fastest round. ``clock``: this thread's CPU time by default, which the other processes
    of a shared machine do not inflate (with one torch thread every op runs on the calling
    thread), where wall time counts every moment the thread waits for a core;
    ``time.perf_counter`` for wall time. Call it under ``torch.no_grad()`` for inference."""
    best, calls = {}, {}
    for key, fn in fns.items():
        for _ in range(3):
            fn()
        start = clock()
        fn()
        calls[key] = max(1, int(min_round_s / max(clock() - start, 1e-6)))
    for _ in range(rounds):
        for key, fn in fns.items():
            start = clock()
            for _ in range(calls[key]):
                fn()
            best[key] = min(best.get(key, math.inf), (clock() - start) / calls[key])
    return best


def prune_at_random(model, percent, seed=0):
    """``model`` (converted with a low log σ²) with ``percent`` % of every SparseVD layer's
    weights pruned at random: log σ² 10 there, -20 elsewhere. Returns the model."""
    import sparsevd

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sparsevd.sparsevd_modules(model):
            pruned = torch.rand(layer.weight.shape, generator=generator) < percent / 100
            layer.log_sigma2.copy_(torch.where(pruned, 10.0, -20.0))
    return model
