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
``python bench_vit.py --split``: where the time of the sparsified model (95 % pruned) and of
one of its encoder layers goes, beside the dense model's (:func:`split`).
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


def split(percent=95, rounds=20):
    """Markdown: thread CPU µs of the model, its parts and one encoder layer's steps as the
    fused layer runs them, beside the dense model's, at batch 1 and 64 (``percent`` %
    pruned at random). The steps read the layer's fused plan: what this file measures is
    where a sparsified layer's time goes, not an API."""
    from torch.nn import functional as TF

    from sparsevd.sparse_transformer import _norm

    torch.set_num_threads(harness.THREADS)
    fns = {}
    for batch in BATCHES:
        cases, x = _models(batch), _input(batch)
        dense, fast = cases["dense"], cases[f"sparsified-{percent}"]
        h = fast[0](x)
        layer = fast[1].layers[0]
        with torch.no_grad():
            layer(h)
        plan = layer._fused_plan
        normed = _norm(layer.norm1, h)
        qkv = plan.chains[0](normed)
        q, k, v = qkv.unflatten(-1, (3, plan.heads, plan.head_dim)).permute(2, 0, 3, 1, 4)
        o = TF.scaled_dot_product_attention(q, k, v)
        merged = o.transpose(1, 2).flatten(-2)
        parts = {
            "model": lambda f=fast, x=x: f(x), "dense model": lambda d=dense, x=x: d(x),
            "embedding": lambda f=fast, x=x: f[0](x), "dense embedding": lambda d=dense, x=x: d[0](x),
            "encoder (3 layers)": lambda f=fast, h=h: f[1](h), "dense encoder": lambda d=dense, h=h: d[1](h),
            "one layer": lambda layer=layer, h=h: layer(h), "dense layer": lambda d=dense, h=h: d[1].layers[0](h),
            "layer norm": lambda layer=layer, h=h: _norm(layer.norm1, h),
            "qkv projection": lambda p=plan, n=normed: p.chains[0](n),
            "split heads": lambda p=plan, t=qkv: t.unflatten(-1, (3, p.heads, p.head_dim)).permute(2, 0, 3, 1, 4),
            "SDPA": lambda q=q, k=k, v=v: TF.scaled_dot_product_attention(q, k, v),
            "merge heads": lambda o=o: o.transpose(1, 2).flatten(-2),
            "out projection": lambda p=plan, m=merged: p.chains[1](m),
            "MLP chain": lambda p=plan, n=normed: p.chains[2](n), "residual add": lambda h=h: h + h,
            "tail (norm, mean, head)": lambda f=fast, h=h: f[4](f[3](f[2](h))),
        }
        for name, fn in parts.items():
            fns[batch, name] = fn
    with torch.no_grad():
        best = harness.interleaved(fns, rounds)
    lines = ["| part | " + " | ".join(f"batch {b} µs" for b in BATCHES) + " |", "|---" * (len(BATCHES) + 1) + "|"]
    for name in parts:
        lines.append(f"| {name} | " + " | ".join(f"{best[b, name] * 1e6:.1f}" for b in BATCHES) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--split"]:
        print(split())
    else:
        wall = sys.argv[1:] == ["--interleaved", "wall"]
        print(table(interleaved(clock=time.perf_counter if wall else time.thread_time)))
