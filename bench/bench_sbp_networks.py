"""Structured Bayesian Pruning where the user meets it: the SBP networks of docs/results.md,
sparsify()'d, against the dense network they replace (issue #13's CPU speed-up targets).

Each network has an SBPDropout where ``sparsevd.experiments.models.with_sbp`` puts them
and keeps exactly the units its training run kept (the "units" column of docs/results.md;
which units survive does not change what is timed). Cases, under ``torch.no_grad()``:

- ``dense``: the network in plain torch layers, nothing pruned (what SBP replaces), and
  ``dense-compile``: ``torch.compile`` of it;
- ``sbp-eval``: the SBP model in eval mode (θ replaced by E[θ]·mask, every unit computed);
- ``sparsevd``: ``sparsify(model, batch_size=B)``: E[θ]·mask folded into the layers, the
  pruned units cut, a smaller dense network.

CPU cases run with ``SPARSEVD_BENCH_THREADS`` torch threads (default 1, the issue's setting).
"""

import functools

import pytest
import torch

import harness
import sparsevd
from sparsevd.experiments.models import MODELS, with_sbp

DEV = harness.device()

BATCH = [1, 64] if harness.QUICK else [1, 64, 256]
#: network → units kept per SBP layer, as the runs of docs/results.md (Fashion-MNIST) ended
UNITS = {
    "MLP 784-500-300-10, SBP (fm500-sbp-e60)": ("mlp500", (746, 337, 269)),
    "MLP 784-500-300-10, SBP (fm500-sbp-e30-lr1e-2)": ("mlp500", (714, 309, 222)),
    "LeNet-300-100, SBP (f300-sbp-init-s0)": ("lenet300", (755, 245, 85)),
    "LeNet-5-Caffe, SBP (f5-sbp-e30-lr1e-2)": ("lenet5", (20, 46, 261)),
    "LeNet-5-Caffe, SBP, KL weight 10 (f5-sbp-e30-lr1e-2-kl10)": ("lenet5", (20, 46, 94)),
    "LeNet-5-Caffe, SBP, KL weight 30 (f5-sbp-e30-lr1e-2-kl30-ft5)": ("lenet5", (20, 45, 41)),
    "LeNet-5-Caffe, SBP, KL weight 100 (f5-sbp-e30-lr1e-2-kl100)": ("lenet5", (12, 19, 10)),
}


pytestmark = pytest.mark.usefixtures("bench_threads")


@functools.lru_cache(maxsize=None)
def _networks(name):
    """(dense network, SBP model keeping UNITS[name]) with the same weights."""
    model, units = UNITS[name]
    torch.manual_seed(0)
    dense = MODELS[model](bayesian=False)
    sbp = with_sbp(dense)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for (_, layer), kept in zip(sparsevd.sbp_modules(sbp), units, strict=True):
            pruned = torch.ones(layer.num_features, dtype=torch.bool)
            pruned[torch.randperm(layer.num_features, generator=g)[:kept]] = False
            layer.mu.copy_(torch.where(pruned, -10.0, 0.0))  # E[θ] ≈ 1 where kept
            layer.log_sigma.copy_(torch.where(pruned, 2.0, -5.0))  # SNR ≪ 1 where pruned
    assert [m.kept_units() for _, m in sparsevd.sbp_modules(sbp)] == list(units)
    return MODELS[model](bayesian=False).to(DEV).eval(), sbp.to(DEV).eval()


def _model(name, impl, batch):
    dense, sbp = _networks(name)
    if impl == "dense":
        return dense
    if impl == "dense-compile":
        return harness.compiled(dense)
    if impl == "sbp-eval":
        return sbp
    return sparsevd.sparsify(sbp, batch_size=batch, input_shape=(1, 28, 28))


@pytest.mark.parametrize("batch", BATCH)
@pytest.mark.parametrize("impl", ["sparsevd", "sbp-eval", "dense", "dense-compile"])
@pytest.mark.parametrize("name", list(UNITS))
def test_sbp_network(benchmark, name, impl, batch):
    net = _model(name, impl, batch)
    x = torch.rand(batch, 1, 28, 28, device=DEV)

    def run():
        with torch.no_grad():
            net(x)

    units = "-".join(map(str, UNITS[name][1]))
    benchmark.group = f"{name}, units {units}, batch={batch}"
    harness.measure(benchmark, run, DEV, impl=impl, batch=batch, threads=harness.THREADS, units=units)
