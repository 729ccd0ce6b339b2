"""A GPT-style decoder's KV-cached decoding step at batch 1 (issue #23's item 6 and its
target: ≥ 3× dense at 95 % pruned, ≥ 1.5× ``torch.compile`` of dense, one CPU thread).

The decoder (``GPT``: token and position embeddings, ``LAYERS`` pre-norm blocks of a
packed qkv projection, causal SDPA over a KV cache and a GELU MLP, a final LayerNorm and
an untied head) runs one step: one new token ([1, 1] → [1, 1, d] inside) attending to
``CACHED`` cached positions of a preallocated cache, under ``torch.no_grad()``. Cases:

- ``dense``: the plain torch model; ``dense-compile``: ``torch.compile`` of its step;
- ``converted-eval-P``: ``sparsevd.convert`` of it with P % of every weight pruned (log σ²
  set so: the random P % of each layer high, the rest low), in eval mode (θ ⊙ mask at
  every call);
- ``sparsified-P``: ``sparsevd.sparsify`` of that model at batch 1.

Per part (``test_decoder_part``): the same modules called on their own with the step's
inputs, over all layers: ``projections`` (qkv and the output projection), ``attention``
(splitting heads, appending to the cache, SDPA, merging heads), ``mlp``,
``embedding/head`` (both lookups, the final norm, the head). ``python bench_decoder.py
results.json [min|median]`` prints the split table, the rest of a step (LayerNorms,
residual adds, Python) being its total minus the parts; ``python bench_decoder.py
--interleaved [wall]`` measures every case round-robin instead, in this thread's CPU time
(or wall time): see :func:`interleaved`, the figures to trust on a machine shared with
other processes.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as TF

import harness
import sparsevd

VOCAB, D, HEADS, LAYERS, CONTEXT, CACHED = 4096, 384, 6, 4, 256, 64
PRUNED = [90, 95, 98]


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def attend(self, qkv, cache, start):
        """Heads split, the new keys and values written into ``cache`` ([k, v], each [b, h,
        context, hd], preallocated: a step allocates no cache) at ``start``, SDPA over the
        positions so far (causal within the new ones, which start at 0 when there are several)."""
        b, t, three_d = qkv.shape
        q, k, v = qkv.view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        end = start + t
        cache[0][:, :, start:end] = k
        cache[1][:, :, start:end] = v
        h = TF.scaled_dot_product_attention(q, cache[0][:, :, :end], cache[1][:, :, :end], is_causal=t > 1)
        return h.transpose(1, 2).reshape(b, t, three_d // 3)

    def forward(self, x, cache, start):
        x = x + self.proj(self.attend(self.qkv(self.ln1(x)), cache, start))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=VOCAB, d=D, heads=HEADS, layers=LAYERS, context=CONTEXT):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("positions", torch.arange(context), persistent=False)

    def forward(self, tokens, start, caches):
        """Logits [b, t, vocab] of ``tokens`` [b, t] at positions ``start``… (an int), their
        keys and values written into ``caches`` (one [k, v] per block, see Block.attend)."""
        x = self.tok(tokens) + self.pos(self.positions[start:start + tokens.shape[1]])
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache, start)
        return self.head(self.ln(x))


@functools.lru_cache(maxsize=None)
def _models():
    torch.manual_seed(0)
    dense = GPT().eval()
    models = {"dense": dense, "dense-compile": harness.compiled(dense)}
    for percent in PRUNED:
        converted = sparsevd.convert(copy.deepcopy(dense), log_sigma2_init=-40.0)
        converted = harness.prune_at_random(converted, percent).eval()
        models[f"converted-eval-{percent}"] = converted
        models[f"sparsified-{percent}"] = sparsevd.sparsify(converted, batch_size=1)
    return models


def _step_inputs():
    """The step's token, its position (``CACHED`` positions before it) and the caches."""
    generator = torch.Generator().manual_seed(1)
    hd = D // HEADS
    caches = [[torch.randn(1, HEADS, CONTEXT, hd, generator=generator) for _ in range(2)] for _ in range(LAYERS)]
    return torch.tensor([[7]]), CACHED, caches


IMPLS = ["dense", "dense-compile"] + [f"{kind}-{p}" for p in PRUNED for kind in ("converted-eval", "sparsified")]

pytestmark = pytest.mark.usefixtures("bench_threads")


@pytest.mark.parametrize("impl", IMPLS)
def test_decoder_step(benchmark, impl):
    model = _models()[impl]
    token, position, caches = _step_inputs()

    def run():
        with torch.no_grad():
            return model(token, position, caches)

    # what the case must compute: the dense model, or the converted model it was sparsified from
    reference = _models()["dense" if impl.startswith("dense") else "converted-eval-" + impl.rsplit("-", 1)[1]]
    with torch.no_grad():
        torch.testing.assert_close(run(), reference(token, position, caches), rtol=1e-4, atol=1e-4)
    benchmark.group = "decoder step"
    harness.measure(benchmark, run, torch.device("cpu"), impl=impl, d=D, layers=LAYERS, cached=CACHED)


def _parts(model, token, position, caches):
    """Callables running each part of a step, over all layers, with the step's inputs."""
    x = torch.randn(1, 1, D, generator=torch.Generator().manual_seed(2))
    blocks = list(model.blocks)
    qkvs = [block.qkv(x) for block in blocks]

    def projections():
        for block in blocks:
            block.qkv(x)
            block.proj(x)

    def attention():
        for block, qkv, cache in zip(blocks, qkvs, caches):
            block.attend(qkv, cache, position)

    def mlp():
        for block in blocks:
            block.mlp(x)

    def embedding_head():
        model.tok(token) + model.pos(model.positions[position:position + 1])
        model.head(model.ln(x))

    return {"projections": projections, "attention": attention, "mlp": mlp, "embedding/head": embedding_head}


PART_IMPLS = ["dense"] + [f"{kind}-{p}" for p in PRUNED for kind in ("converted-eval", "sparsified")]


PARTS = ["projections", "attention", "mlp", "embedding/head"]


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("impl", PART_IMPLS)
def test_decoder_part(benchmark, impl, part):
    fn = _parts(_models()[impl], *_step_inputs())[part]

    def run():
        with torch.no_grad():
            fn()

    benchmark.group = f"decoder part {part}"
    harness.measure(benchmark, run, torch.device("cpu"), impl=impl, part=part)


def split_table(step, part):
    """Markdown: µs per step (``step``: {impl: s}) and per part (``part``: {(impl, part): s})
    for each implementation, the rest of the step, and the speed-ups."""
    names = list(PARTS)
    lines = ["| case | step µs | × dense | × compiled dense | " + " | ".join(names) + " | rest |",
             "|---" * (len(names) + 5) + "|"]
    for impl in IMPLS:
        if impl not in step:
            continue
        total = step[impl]
        cells = [f"{part[impl, n] * 1e6:.0f}" if (impl, n) in part else "" for n in names]
        rest = total - sum(part.get((impl, n), 0.0) for n in names) if all((impl, n) in part for n in names) else None
        ratios = [f"{step[b] / total:.2f}×" if b in step else "" for b in ("dense", "dense-compile")]
        lines.append(f"| {impl} | {total * 1e6:.0f} | {ratios[0]} | {ratios[1]} | " + " | ".join(cells)
                     + f" | {'' if rest is None else f'{rest * 1e6:.0f}'} |")
    return "\n".join(lines)


def from_json(data, stat="min"):
    """(step, part) seconds of a pytest-benchmark JSON of this file; ``stat`` of the rounds."""
    step, part = {}, {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        seconds = bench["stats"][stat] / info.get("inner", 1)
        if "part" in info:
            part[info["impl"], info["part"]] = seconds
        else:
            step[info["impl"]] = seconds
    return step, part


def interleaved(rounds=30, min_round_s=0.01, clock=time.thread_time):
    """(step, part) seconds measured round-robin (:func:`harness.interleaved`: every case
    once per round, the fastest round kept; this thread's CPU time by default, the figures
    to trust on a machine shared with other processes)."""
    torch.set_num_threads(harness.THREADS)
    token, position, caches = _step_inputs()
    fns = {}
    for impl in IMPLS:
        model = _models()[impl]
        fns[impl, None] = functools.partial(model, token, position, caches)
        if impl in PART_IMPLS:
            for name, fn in _parts(model, token, position, caches).items():
                fns[impl, name] = fn
    with torch.no_grad():
        best = harness.interleaved(fns, rounds, min_round_s, clock)
    return ({impl: t for (impl, name), t in best.items() if name is None},
            {key: t for key, t in best.items() if key[1] is not None})


if __name__ == "__main__":
    if sys.argv[1:2] == ["--interleaved"]:
        wall = sys.argv[2:] == ["wall"]
        print(split_table(*interleaved(clock=time.perf_counter if wall else time.thread_time)))
    else:
        with open(sys.argv[1], encoding="utf-8") as f:
            print(split_table(*from_json(json.load(f), *sys.argv[2:])))
