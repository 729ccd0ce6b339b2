"""sparsify() of transformers: SparseVD attention becomes SparseMultiheadAttention (heads
that contribute nothing removed, q/k/v packed), SparseVD embeddings become SparseEmbedding,
and the result computes what the eval-mode model computes: on odd sizes, with and without
biases, every mask, both layouts, CSR and dense forms, and in a KV-cache decoding loop
written by the user (inputs [1, 1, d])."""

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as TF

import sparsevd
from sparsevd.sparsify import CPU_COST

#: Every layer CSR: these models are too small for the default cost model to choose it.
ALWAYS_CSR = sparsevd.CostModel(cpu=dataclasses.replace(CPU_COST, dense_overhead_s=math.inf))
COST_MODELS = {"csr": ALWAYS_CSR, "dense": sparsevd.CostModel.dense()}


def _prune(layer, share, generator):
    with torch.no_grad():
        layer.log_sigma2.masked_fill_(torch.rand(layer.weight.shape, generator=generator) < share, 10.0)


def _kill(layer, rows=None, cols=None):
    """Prune whole rows (output units) or columns of a SparseVD layer."""
    with torch.no_grad():
        if rows is not None:
            layer.log_sigma2[rows] = 10.0
            if layer.bias is not None:
                layer.bias[rows] = 0.0
        if cols is not None:
            layer.log_sigma2[:, cols] = 10.0


def _attention(embed_dim=30, heads=5, bias=True, kdim=None, vdim=None, batch_first=False, add_bias_kv=False,
               add_zero_attn=False, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    attention = sparsevd.SparseVDMultiheadAttention(embed_dim, heads, bias=bias, kdim=kdim, vdim=vdim,
                                                    batch_first=batch_first, add_bias_kv=add_bias_kv,
                                                    add_zero_attn=add_zero_attn, log_sigma2_init=-40.0, dtype=dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        if bias:
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                getattr(attention, name).bias.normal_(generator=generator)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        _prune(getattr(attention, name), 0.5, generator)
    hd = attention.head_dim
    _kill(attention.v_proj, rows=slice(1 * hd, 2 * hd))  # head 1: no values
    _kill(attention.out_proj, cols=slice(3 * hd, 4 * hd))  # head 3: output never read
    _kill(attention.q_proj, rows=slice(4 * hd, 5 * hd))  # head 4: no queries, still attends uniformly
    if add_bias_kv:
        with torch.no_grad():
            attention.bias_v[..., hd:2 * hd] = 0.0  # or head 1 would attend to a value after all
    return attention.eval()


def _inputs(attention, length=7, source=6, batch=3, seed=3):
    generator = torch.Generator().manual_seed(seed)
    layout = (lambda n: (batch, n)) if attention.batch_first else (lambda n: (n, batch))
    dtype = attention.out_proj.weight.dtype
    query = torch.randn(*layout(length), attention.embed_dim, generator=generator, dtype=dtype)
    key = torch.randn(*layout(source), attention.kdim, generator=generator, dtype=dtype)
    value = torch.randn(*layout(source), attention.vdim, generator=generator, dtype=dtype)
    return query, key, value


def _masks(attention, length, source, batch=3):
    padding = torch.zeros(batch, source, dtype=torch.bool)
    padding[0, -2:] = True
    dtype = attention.out_proj.weight.dtype
    per_head = torch.randn(batch * attention.num_heads, length, source, generator=torch.Generator().manual_seed(5),
                           dtype=dtype)
    return {
        "none": {},
        "key_padding": {"key_padding_mask": padding},
        "float 2-D": {"attn_mask": torch.randn(length, source, generator=torch.Generator().manual_seed(4),
                                               dtype=dtype)},
        "bool 2-D and padding": {"attn_mask": torch.ones(length, source, dtype=torch.bool).triu(1),
                                 "key_padding_mask": padding},
        "per head 3-D": {"attn_mask": per_head},
    }


def _sparsify(attention, **kwargs):
    """sparsify() replaces the layers inside a model: the attention in a container."""
    return sparsevd.sparsify(nn.ModuleList([attention]), **kwargs)[0]


def _check(fast, model, args, kwargs, msg):
    with torch.no_grad():
        expected = model(*args, need_weights=False, **kwargs)[0]
        got = fast(*args, need_weights=False, **kwargs)[0]
    tolerance = 1e-12 if expected.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance, msg=msg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", COST_MODELS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_removes_dead_heads_and_computes_the_eval_output(form, batch_first, bias, dtype):
    attention = _attention(bias=bias, batch_first=batch_first, dtype=dtype)
    fast = _sparsify(attention, cost_model=COST_MODELS[form])
    assert type(fast) is sparsevd.SparseMultiheadAttention
    assert fast.removed_heads == 2 and fast.kept_heads.tolist() == [0, 2, 4]
    kind = sparsevd.SparseLinear if form == "csr" else nn.Linear
    assert type(fast.in_proj) is kind and type(fast.out_proj) is kind
    assert fast.in_proj.out_features == 3 * 3 * attention.head_dim and fast.out_proj.in_features == 18
    x, _, _ = _inputs(attention)
    for name, kwargs in _masks(attention, 7, 7).items():
        _check(fast, attention, (x, x, x), kwargs, name)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    _check(fast, attention, (x, x, x), {"attn_mask": causal, "is_causal": True}, "is_causal")
    # unbatched
    _check(fast, attention, (x[0], x[0], x[0]), {}, "unbatched")


@pytest.mark.parametrize("form", COST_MODELS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_cross_attention_through_the_packed_projection(form, batch_first):
    attention = _attention(batch_first=batch_first, seed=7)
    fast = _sparsify(attention, cost_model=COST_MODELS[form])
    query, key, value = _inputs(attention)
    for name, kwargs in _masks(attention, 7, 6).items():
        _check(fast, attention, (query, key, value), kwargs, name)
        _check(fast, attention, (query, key, key), kwargs, name + ", key is value")


@pytest.mark.parametrize("form", COST_MODELS)
@pytest.mark.parametrize("bias", [True, False])
def test_kdim_vdim_add_bias_kv_and_zero_attention(form, bias):
    attention = _attention(embed_dim=21, heads=7, bias=bias, kdim=11, vdim=13, add_bias_kv=True,
                           add_zero_attn=True, seed=11)
    fast = _sparsify(attention, cost_model=COST_MODELS[form])
    assert not hasattr(fast, "in_proj") and fast.removed_heads == 2
    assert fast.bias_k.shape[-1] == fast.q_proj.out_features == 15
    query, key, value = _inputs(attention)
    for name, kwargs in _masks(attention, 7, 6).items():
        _check(fast, attention, (query, key, value), kwargs, name)


def test_need_weights_is_refused_only_once_heads_were_removed():
    attention = _attention()
    x, _, _ = _inputs(attention)
    with pytest.raises(ValueError, match="removed 2 of the 5 heads.*need_weights=False.*shrink=False"):
        _sparsify(attention)(x, x, x)
    kept = _sparsify(attention, shrink=False)
    assert kept.removed_heads == 0
    for average in (True, False):
        with torch.no_grad():
            expected = attention(x, x, x, average_attn_weights=average)
            got = kept(x, x, x, average_attn_weights=average)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_a_fully_pruned_attention_keeps_one_head_and_outputs_its_bias():
    attention = _attention()
    _kill(attention.v_proj, rows=slice(None))
    fast = _sparsify(attention)
    assert fast.removed_heads == 4
    x, _, _ = _inputs(attention)
    _check(fast, attention, (x, x, x), {}, "all pruned")
    torch.testing.assert_close(fast(x, x, x, need_weights=False)[0], attention.out_proj.bias.expand(7, 3, -1))


def test_sparsify_replaces_embeddings_with_row_compacted_lookups():
    torch.manual_seed(0)
    model = sparsevd.convert(nn.Sequential(nn.Embedding(37, 9, padding_idx=0), nn.Linear(9, 5)),
                             log_sigma2_init=-40.0).eval()
    generator = torch.Generator().manual_seed(0)
    _prune(model[0], 0.6, generator)
    _kill(model[0], rows=[3, 4, 30])
    fast = sparsevd.sparsify(model)
    assert type(fast[0]) is sparsevd.SparseEmbedding
    assert fast[0].kept_rows == 37 - 3 - 1  # the padding row is zero: removed too
    tokens = torch.randint(0, 37, (4, 11), generator=generator)
    tokens[0, :5] = torch.tensor([0, 3, 4, 30, 36])
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens), model(tokens), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------ KV-cache decoding


class Block(nn.Module):
    """A GPT block as users write it: one qkv projection, causal SDPA over a KV cache."""

    def __init__(self, d, heads, bias):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.proj = nn.Linear(d, d, bias=bias)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d - 3, bias=bias), nn.GELU(), nn.Linear(4 * d - 3, d, bias=bias))

    def forward(self, x, cache=None):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.ln1(x)).chunk(3, -1))
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        h = TF.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        x = x + self.proj(h.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=53, d=30, heads=3, layers=2, context=16, bias=True, tied=False):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads, bias) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, tokens, start=0, caches=None):
        x = self.tok(tokens) + self.pos(torch.arange(start, start + tokens.shape[1]))
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.ln(x))


class MHADecoder(nn.Module):
    """nn.MultiheadAttention decoding one token at a time: the query is the new position,
    key and value the cached inputs so far (the cache of nn.MultiheadAttention's callers)."""

    def __init__(self, vocab=41, d=24, heads=4, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens, cache=None):
        x = self.emb(tokens)
        x = x if self.batch_first else x.transpose(0, 1)
        if cache is None:
            t = tokens.shape[1]
            h = self.attn(x, x, x, attn_mask=torch.ones(t, t, dtype=torch.bool).triu(1), need_weights=False)[0]
        else:
            cache[:] = [x if not cache else torch.cat([cache[0], x], 1 if self.batch_first else 0)]
            h = self.attn(x, cache[0], cache[0], need_weights=False)[0]
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h)


def _pruned(model, share, seed=0):
    converted = sparsevd.convert(model, log_sigma2_init=-40.0).eval()
    generator = torch.Generator().manual_seed(seed)
    for _, layer in sparsevd.sparsevd_modules(converted):
        _prune(layer, share, generator)
    return converted


@pytest.mark.parametrize("form", COST_MODELS)
@pytest.mark.parametrize("bias, tied", [(True, False), (False, False), (True, True)])
def test_kv_cache_decoding_loop_matches_the_full_eval_forward(form, bias, tied):
    torch.manual_seed(0)
    model = _pruned(GPT(bias=bias, tied=tied), 0.9)
    assert (model.head.weight is model.tok.weight) == tied
    fast = sparsevd.sparsify(model, cost_model=COST_MODELS[form])
    assert type(fast.tok) is sparsevd.SparseEmbedding
    assert (type(fast.blocks[0].qkv) is sparsevd.SparseLinear) == (form == "csr")
    tokens = torch.randint(0, 53, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens)
        caches = [[] for _ in fast.blocks]
        steps = [fast(tokens[:, i:i + 1], start=i, caches=caches) for i in range(tokens.shape[1])]
    assert steps[0].shape == (1, 1, 53)
    torch.testing.assert_close(torch.cat(steps, 1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", COST_MODELS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_decoding_one_position_at_a_time(form, batch_first):
    torch.manual_seed(0)
    model = _pruned(MHADecoder(batch_first=batch_first), 0.8)
    hd = model.attn.head_dim
    _kill(model.attn.out_proj, cols=slice(hd, 2 * hd))
    fast = sparsevd.sparsify(model, cost_model=COST_MODELS[form])
    assert fast.attn.removed_heads == 1
    tokens = torch.randint(0, 41, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens)
        cache = []
        steps = [fast(tokens[:, i:i + 1], cache) for i in range(tokens.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), expected, rtol=1e-5, atol=1e-5)
