"""LRT linear layer: sparsevd against the eager reference, torch.compile of it and a dense
nn.Linear of the same shape (the yardstick: the LRT does two GEMMs forward and four
backward, so ~2× dense is the floor); on CUDA both of its routes side by side.

Rows ("impl"):
- sparsevd: ``functional.lrt_linear`` as the dispatcher runs it (on CUDA, the route that
  ``triton_kernels.lrt.route`` picks for the shape);
- sparsevd-cublas, sparsevd-fused (CUDA): the same op with the route forced, the data
  ``bench/fit_lrt_route.py`` sets the rule from;
- eager, compile: the reference formula with torch's own noise, eager and torch.compile;
- dense: ``F.linear`` (forward) / ``nn.Linear`` (training step).

Cases on CUDA: the target (4096³ bf16, forward+backward and forward), the route grid
(LeNet-300-100's layers to 4096×1024², fp32 and bf16, forward+backward), and a whole
LeNet-300-100 training step (batch 100, SGVLB with the KL term, Adam) against the dense
network. On a CPU machine the C++ kernels, fp32, small shapes (routes do not apply there).
"""

import pytest
import torch
from torch import nn

import harness
import sparsevd
from sparsevd import reference
from sparsevd.triton_kernels import lrt

DEV = harness.device()
CUDA = DEV.type == "cuda"
BF16, FP32 = torch.bfloat16, torch.float32
TARGET = (4096, 4096, 4096)  # (M, K, N)
LENET = [(100, 784, 300), (100, 300, 100)]
ROUTE_SHAPES = LENET + [(512, 512, 512), (1024, 1024, 1024), (4096, 1024, 1024)]
BASELINES = ["sparsevd", "eager", "compile", "dense"]
ROUTE_IMPLS = ["sparsevd-cublas", "sparsevd-fused"]


def _cases():
    """(impl, (M, K, N), dtype, mode) for this device and mode (full or quick)."""
    if not CUDA:
        shapes = LENET if harness.QUICK else [(256, 1024, 1024)] + LENET
        modes = ["fwd+bwd"] if harness.QUICK else ["fwd", "fwd+bwd"]
        return [(i, s, FP32, m) for s in shapes for m in modes for i in BASELINES]
    cases = [(i, TARGET, BF16, "fwd+bwd") for i in BASELINES + ["sparsevd-cublas"]]
    if harness.QUICK:
        return cases + [(i, s, FP32, "fwd+bwd") for s in LENET for i in ROUTE_IMPLS]
    cases += [("sparsevd-fused", TARGET, BF16, "fwd+bwd")]
    cases += [(i, TARGET, BF16, "fwd") for i in BASELINES + ROUTE_IMPLS]
    cases += [(i, s, d, "fwd+bwd") for d in (FP32, BF16) for s in ROUTE_SHAPES for i in ROUTE_IMPLS + ["dense"]]
    return cases


def _id(case):
    impl, (m, k, n), dtype, mode = case
    return f"{impl}-{mode}-{str(dtype).replace('torch.', '')}-{m}x{k}x{n}"


def eager_lrt(x, w, s, b):
    """What a user writes without us: the reference formula with torch's own noise."""
    return reference.lrt_linear(x, w, s, b, torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype))


_compiled_lrt = harness.compiled(eager_lrt)


def _impl(name):
    if name.startswith("sparsevd"):
        return sparsevd.functional.lrt_linear
    if name == "eager":
        return eager_lrt
    if name == "compile":
        return _compiled_lrt
    return lambda x, w, s, b: torch.nn.functional.linear(x, w, b)


def _routed(impl, fn):
    """``fn`` under the route the row forces (rows other than sparsevd-<route>: as is)."""
    if impl not in ROUTE_IMPLS:
        return fn
    route = impl.split("-", 1)[1]

    def run():
        with lrt.use_route(route):
            fn()

    return run


@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_lrt_linear(benchmark, case):
    impl, (m, k, n), dtype, mode = case
    train = mode != "fwd"
    torch.manual_seed(0)
    x = torch.randn(m, k, device=DEV, dtype=dtype, requires_grad=train)
    w = (torch.randn(n, k, device=DEV, dtype=dtype) / k**0.5).requires_grad_(train)
    s = torch.full((n, k), -8.0, device=DEV, dtype=dtype, requires_grad=train)
    b = torch.zeros(n, device=DEV, dtype=dtype, requires_grad=train)
    f = _impl(impl)
    params = (x, w, b) if impl == "dense" else (x, w, s, b)
    grad = torch.randn(m, n, device=DEV, dtype=dtype)

    def once():
        if train:
            torch.autograd.grad(f(x, w, s, b), params, grad)
        else:
            with torch.no_grad():
                f(x, w, s, b)

    gemms = (1 if impl == "dense" else 2) * (3 if train else 1)
    benchmark.group = f"lrt {mode} {dtype} M={m} K={k} N={n}".replace("torch.", "")
    harness.measure(benchmark, _routed(impl, once), DEV, impl=impl, flops=2 * m * k * n * gemms, shape=(m, k, n),
                    dtype=str(dtype), mode=mode, macs=m * k * n)


def _lenet(layer):
    return nn.Sequential(layer(784, 300), nn.ReLU(), layer(300, 100), nn.ReLU(), layer(100, 10))


# on a CPU machine bench_cpu_training.py times this step (with 1 and all threads)
TRAINING_IMPLS = (["sparsevd", "dense"] + ([] if harness.QUICK else ROUTE_IMPLS)) if CUDA else []


@pytest.mark.parametrize("impl", TRAINING_IMPLS)
def test_lenet_300_100_training_step(benchmark, impl):
    """One step of what a user runs: forward, loss (SGVLB with the KL term for SparseVD,
    cross-entropy for the dense net), zero_grad, backward, Adam."""
    torch.manual_seed(0)
    batch = 100
    net = _lenet(nn.Linear if impl == "dense" else sparsevd.SparseVDLinear).to(DEV)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss() if impl == "dense" else sparsevd.SGVLBLoss(net, dataset_size=60000)
    x = torch.randn(batch, 784, device=DEV)
    y = torch.randint(10, (batch,), device=DEV)

    def step():
        loss = loss_fn(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    gemms = 3 if impl == "dense" else 6
    flops = sum(2 * batch * a * b * gemms for a, b in ((784, 300), (300, 100), (100, 10)))
    benchmark.group = f"lenet-300-100 training step batch {batch} float32"
    harness.measure(benchmark, _routed(impl, step), DEV, impl=impl, flops=flops)
