"""Inference latency where the user meets it: whole models called as a user calls them.

LeNet-300-100 with the paper's per-layer sparsity (98.9 / 97.2 / 62.0 % of the weights
pruned, random masks; what is timed does not depend on which weights survive):

- ``eval``: the SparseVD model in eval mode (``model.eval(); model(x)``);
- ``dense``: the same pruned weights frozen into plain ``nn.Linear`` layers (what a user
  would otherwise deploy), and ``dense-compile``: ``torch.compile`` of that copy;
- ``sparsevd``: ``sparsify(model, batch_size=B)``, chosen by the cost model for that batch.

The same LeNet-300-100 written as a class with a ``forward`` (``torch.flatten``, ``F.relu``),
as most models are, at batch 1: ``traced`` is ``sparsify`` of it (the torch.fx graph path),
``sequential`` is ``sparsify`` of the ``nn.Sequential`` above, ``dense`` the plain copy.

And one layer, 300×784 at 98.9 %, at batch 1: the raw ``torch.ops.sparsevd.csr_linear``
call against the ``SparseLinear`` module around it, and ``nn.Linear``.

CPU cases run with ``SPARSEVD_BENCH_THREADS`` torch threads (default 1, the issue's
setting); every case runs under ``torch.no_grad()``.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import harness
import sparsevd

DEV = harness.device()

BATCH = [1, 256] if harness.QUICK else [1, 16, 256, 4096]
SPARSITY = (0.989, 0.972, 0.620)  # the paper's LeNet-300-100, per layer


pytestmark = pytest.mark.usefixtures("bench_threads")


@functools.lru_cache(maxsize=1)
def _lenet():
    """A SparseVD LeNet-300-100 whose masks prune exactly the paper's fractions."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), sparsevd.SparseVDLinear(784, 300), nn.ReLU(),
                          sparsevd.SparseVDLinear(300, 100), nn.ReLU(), sparsevd.SparseVDLinear(100, 10))
    with torch.no_grad():
        for layer, sparsity in zip(model[1::2], SPARSITY):
            order = torch.randperm(layer.weight.numel(), generator=g)
            pruned = torch.zeros(layer.weight.numel(), dtype=torch.bool)
            pruned[order[: round(sparsity * layer.weight.numel())]] = True
            # log α = 8 (pruned) or −8 (kept)
            log_w2 = torch.log(layer.weight.reshape(-1) ** 2 + 1e-8)
            layer.log_sigma2.copy_((log_w2 + torch.where(pruned, 8.0, -8.0)).view_as(layer.weight))
    return model.to(DEV).eval()


def _model(impl, batch):
    model = _lenet()
    if impl == "eval":
        return model
    if impl == "sparsevd":
        return sparsevd.sparsify(model, batch_size=batch)
    dense = sparsevd.sparsify(model, batch_size=batch, cost_model=sparsevd.CostModel.dense(), shrink=False)
    dense = nn.Sequential(*dense)  # plain modules, as a user's own copy would be
    return harness.compiled(dense) if impl == "dense-compile" else dense


@pytest.mark.parametrize("batch", BATCH)
@pytest.mark.parametrize("impl", ["sparsevd", "eval", "dense", "dense-compile"])
def test_lenet_300_100(benchmark, impl, batch):
    net = _model(impl, batch)
    x = torch.rand(batch, 1, 28, 28, device=DEV)

    def run():
        with torch.no_grad():
            net(x)

    kept, total = sparsevd.compression(_lenet())
    benchmark.group = f"LeNet-300-100 at the paper's sparsity ({total / kept:.0f}x), batch={batch}"
    harness.measure(benchmark, run, DEV, impl=impl, batch=batch, threads=harness.THREADS,
                    layers=" ".join(type(m).__name__ for m in (net.modules() if impl != "dense-compile" else [])))


class _LeNetClass(nn.Module):
    """The layers of ``_lenet()`` in a class with its own forward."""

    def __init__(self, sequential):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = sequential[1], sequential[3], sequential[5]

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@pytest.mark.parametrize("impl", ["traced", "sequential", "dense"])
def test_lenet_300_100_class_style(benchmark, impl):
    if impl == "traced":
        net = sparsevd.sparsify(_LeNetClass(_lenet()), batch_size=1)
    else:
        net = _model("sparsevd" if impl == "sequential" else "dense", 1)
    x = torch.rand(1, 1, 28, 28, device=DEV)

    def run():
        with torch.no_grad():
            net(x)

    benchmark.group = "LeNet-300-100 at the paper's sparsity, batch=1: class-style (traced) vs nn.Sequential"
    harness.measure(benchmark, run, DEV, impl=impl, batch=1, threads=harness.THREADS,
                    layers=" ".join(type(m).__name__ for m in net.modules()))


@pytest.mark.parametrize("impl", ["sparsevd", "raw-op", "nn.Linear"])
def test_sparse_linear_call_overhead(benchmark, impl):
    lenet = _lenet()
    layer = sparsevd.SparseLinear.from_sparsevd(lenet[1])
    x = torch.rand(1, 784, device=DEV)
    if impl == "sparsevd":
        fn = functools.partial(layer, x)
    elif impl == "raw-op":
        fn = functools.partial(torch.ops.sparsevd.csr_linear, x, layer.crow_indices, layer.col_indices, layer.values,
                               layer.bias, layer.row_order)
    else:
        dense = nn.Linear(784, 300, device=DEV)
        fn = functools.partial(dense, x)

    def run():
        with torch.no_grad():
            fn()

    benchmark.group = "300x784 at 98.9%, batch 1: SparseLinear module vs the raw op"
    harness.measure(benchmark, run, DEV, impl=impl, threads=harness.THREADS)
