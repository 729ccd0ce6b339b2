"""The ViT of ``sparsevd-train --model vit`` (7×7 patches, d 64, 4 heads, 3 pre-norm encoder
layers, GELU MLP of width 128) at inference, batch 1 and 64, one CPU thread (issue #23's
targets: the ``sparsify()``'d ViT ≥ 2.5× the dense model at batch 1, ≥ 2× at batch 64).

Cases, each at batch ``B``:

- ``dense``: the plain torch model in eval mode (``nn.TransformerEncoder`` takes torch's
  native fast path under ``no_grad``); ``dense-compile``: ``torch.compile`` of it;
- ``converted-eval-P``: ``sparsevd.convert`` of it with P % of every weight pruned at
  random (log σ² so), in eval mode;
- ``sparsified-P``: ``sparsevd.sparsify`` of that model at batch ``B`` (given the input
  shape, so the patch embedding's form is chosen too);
- with ``SPARSEVD_VIT_RUN=runs/vit-sparsevd`` set, ``trained-dense`` and
  ``trained-sparsified``: the run's own trained network (its checkpoint) against the same
  architecture dense.

``python bench_vit.py [--interleaved [wall]]`` measures every case round-robin in this
thread's CPU time (or wall time): the figures to trust on a machine shared with other
processes (see :func:`harness.interleaved`), printed as a table of µs and speed-ups.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
import time

import harness
import pytest
import torch

import sparsevd
from sparsevd.experiments import models

PRUNED = [90, 95, 98]
BATCHES = [1, 64]


def _trained():
    """The network of the run in SPARSEVD_VIT_RUN (eval mode), or None."""
    run = os.environ.get("SPARSEVD_VIT_RUN")
    if not run:
        return None
    from sparsevd.experiments import checkpoints

    model, config = checkpoints.trained_model(run)
    if config["model"] != "vit":
        raise SystemExit(f"SPARSEVD_VIT_RUN: {run} trained --model {config['model']}, not vit")
    return model


@functools.lru_cache(maxsize=None)
def _models(batch):
    torch.manual_seed(0)
    dense = models.vit(False).eval()
    cases = {"dense": dense, "dense-compile": harness.compiled(dense)}
    for percent in PRUNED:
        converted = sparsevd.convert(copy.deepcopy(dense), log_sigma2_init=-40.0)
        converted = harness.prune_at_random(converted, percent).eval()
        cases[f"converted-eval-{percent}"] = converted
        cases[f"sparsified-{percent}"] = sparsevd.sparsify(converted, batch_size=batch, input_shape=(1, 28, 28))
    trained = _trained()
    if trained is not None:
        cases["trained-dense"] = models.vit(False).eval()
        cases["trained-sparsified"] = sparsevd.sparsify(trained, batch_size=batch, input_shape=(1, 28, 28))
        cases["trained-eval"] = trained
    return cases


def _input(batch):
    return torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _reference(cases, impl):
    """The model a case must compute what it computes."""
    if impl.startswith("dense"):
        return cases["dense"]
    if impl.startswith("trained"):
        return cases["trained-eval" if impl != "trained-dense" else "trained-dense"]
    return cases["converted-eval-" + impl.rsplit("-", 1)[1]]


IMPLS = ["dense", "dense-compile"] + [f"{kind}-{p}" for p in PRUNED for kind in ("converted-eval", "sparsified")]

pytestmark = pytest.mark.usefixtures("bench_threads")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
def test_vit_inference(benchmark, batch, impl):
    cases = _models(batch)
    model, x = cases[impl], _input(batch)

    def run():
        with torch.no_grad():
            return model(x)

    with torch.no_grad():
        torch.testing.assert_close(run(), _reference(cases, impl)(x), rtol=1e-4, atol=1e-4)
    benchmark.group = f"vit batch {batch}"
    harness.measure(benchmark, run, torch.device("cpu"), impl=impl, batch=batch)


def table(best):
    """Markdown: µs per call ({(batch, impl): s}) and the speed-ups over dense and compiled dense."""
    lines = ["| batch | case | µs | × dense | × compiled dense |", "|---|---|---|---|---|"]
    for batch, impl in best:
        t = best[batch, impl]
        dense = best.get((batch, "trained-dense" if impl.startswith("trained") else "dense"))
        compiled = best.get((batch, "dense-compile"))
        lines.append(f"| {batch} | {impl} | {t * 1e6:.0f} | {dense / t:.2f}× | {compiled / t:.2f}× |")
    return "\n".join(lines)


def interleaved(clock=time.thread_time, rounds=30):
    torch.set_num_threads(harness.THREADS)
    fns = {}
    for batch in BATCHES:
        cases, x = _models(batch), _input(batch)
        for impl, model in cases.items():
            with torch.no_grad():
                torch.testing.assert_close(model(x), _reference(cases, impl)(x), rtol=1e-4, atol=1e-4)
            fns[batch, impl] = functools.partial(model, x)
    with torch.no_grad():
        return harness.interleaved(fns, rounds, clock=clock)


if __name__ == "__main__":
    wall = sys.argv[1:] == ["--interleaved", "wall"]
    print(table(interleaved(clock=time.perf_counter if wall else time.thread_time)))
