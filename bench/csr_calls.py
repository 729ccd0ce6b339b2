"""Per-call CPU time of the CSR inference paths, for comparing builds on a shared machine.

    python bench/csr_calls.py overhead   # batch 1, 300×784 at 98 %: op, functional, module, nn.Linear
    python bench/csr_calls.py kernels    # csr_linear and linear_chain cases (one JSON line)

Times are the calling thread's CPU time (time.thread_time), best of several rounds, with
torch on one thread: other jobs on the machine stretch wall-clock time, not this. To
compare two builds, run each with ``PYTHONPATH=<checkout>`` from outside the checkouts.
"""

import json
import sys
import time
import warnings

import torch
from torch import nn

import sparsevd

warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")


def best_call(fn, rounds=7, budget=0.03):
    """Minimum over `rounds` of the mean CPU time per call in a loop of about `budget` s."""
    fn()
    start = time.thread_time()
    fn()
    once = max(time.thread_time() - start, 1e-7)
    inner = max(1, int(budget / once))
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(inner):
            fn()
        best = min(best, (time.thread_time() - start) / inner)
    return best


def csr_weight(n, k, sparsity, generator):
    w = torch.randn(n, k, generator=generator) * (torch.rand(n, k, generator=generator) >= sparsity)
    return w, sparsevd.sparse.dense_to_csr(w)


def overhead():
    g = torch.Generator().manual_seed(0)
    w, (crow, col, values) = csr_weight(300, 784, 0.98, g)
    b = torch.randn(300, generator=g)
    x = torch.randn(1, 784, generator=g)
    layer = sparsevd.SparseLinear.from_dense(w, b)
    dense = nn.Linear(784, 300)
    calls = {
        "raw op": lambda: torch.ops.sparsevd.csr_linear(x, crow, col, values, b, None),
        "functional.csr_linear(validate=False)": lambda: sparsevd.functional.csr_linear(
            x, crow, col, values, b, validate=False),
        "SparseLinear": lambda: layer(x),
        "nn.Linear": lambda: dense(x),
    }
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            print(mode.__name__ + ": " + ", ".join(f"{name} {best_call(fn) * 1e6:.2f} us" for name, fn in calls.items()))


def kernels():
    g = torch.Generator().manual_seed(0)
    out = {}
    for n, k, sparsity, batches in [(300, 784, 0.98, [1, 8, 64, 256]), (4096, 4096, 0.98, [1, 8, 64, 256, 1024])]:
        _, (crow, col, values) = csr_weight(n, k, sparsity, g)
        b = torch.randn(n, generator=g)
        for m in batches:
            x = torch.randn(m, k, generator=g)
            with torch.inference_mode():
                out[f"{n}x{k} batch {m}"] = best_call(lambda: torch.ops.sparsevd.csr_linear(x, crow, col, values, b, None), 5)
    layers = [csr_weight(n, k, s, g)[1] for k, n, s in [(784, 300, 0.989), (300, 100, 0.972), (100, 10, 0.620)]]
    args = ([v for _, _, v in layers], [c for c, _, _ in layers], [i for _, i, _ in layers],
            [torch.randn(n, generator=g) for n in (300, 100, 10)], [1, 1, 0], [0.0] * 3)
    if hasattr(torch.ops.sparsevd, "linear_chain"):
        for m in (1, 256):
            x = torch.rand(m, 784, generator=g)
            with torch.inference_mode():
                out[f"LeNet chain batch {m}"] = best_call(lambda: torch.ops.sparsevd.linear_chain(x, *args), 5)
    print(json.dumps(out))


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"overhead": overhead, "kernels": kernels}[sys.argv[1]]()
