"""SparseVDMultiheadAttention: nn.MultiheadAttention's computation with SparseVD projections,
against torch in eval mode and against a float64 reference of the same math (the LRT
projections and the attention) in training mode, gradients included."""

import itertools
import math

import pytest
import torch
from torch import nn

import sparsevd
from sparsevd import reference
from sparsevd.attention import SparseVDMultiheadAttention

E, H, L, S, N = 12, 3, 5, 7, 2


def _attention_pair(bias=True, add_bias_kv=False, add_zero_attn=False, kvdim=None, batch_first=False,
                    dtype=torch.float32, dropout=0.0):
    torch.manual_seed(0)
    kdim, vdim = kvdim or (None, None)
    mha = nn.MultiheadAttention(E, H, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                                add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                                dtype=dtype).eval()
    if bias:  # torch starts them at zero; a trained layer's are not
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    # nothing pruned at this initialisation: the eval output is the original's
    return mha, SparseVDMultiheadAttention.from_attention(mha, log_sigma2_init=-40.0).eval()


def _inputs(batched, batch_first, kvdim, dtype=torch.float32):
    def make(length, width):
        if not batched:
            return torch.randn(length, width, dtype=dtype)
        return torch.randn(*((N, length) if batch_first else (length, N)), width, dtype=dtype)

    query = make(L, E)
    if kvdim is None:
        return query, query, query, L
    return query, make(S, kvdim[0]), make(S, kvdim[1]), S


def _masks(kind, batched, source, dtype=torch.float32):
    if kind == "none":
        return {}
    if kind == "bool":
        padding = torch.zeros(N, source, dtype=torch.bool)
        padding[0, -2:] = True
        attn_mask = torch.rand(L, source) < 0.3
        attn_mask[:, 0] = False  # no row fully masked (torch gives NaN there, and so do we)
        return {"key_padding_mask": padding if batched else padding[0], "attn_mask": attn_mask}
    if kind == "float":
        return {"attn_mask": torch.randn(N * H if batched else H, L, source, dtype=dtype),
                "key_padding_mask": torch.randn(N, source, dtype=dtype) if batched else None}
    assert kind == "causal"
    return {"attn_mask": nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype), "is_causal": True}


CASES = [
    # bias, add_bias_kv, add_zero_attn, kdim/vdim, batch_first
    (True, False, False, None, False),
    (True, False, False, None, True),
    (False, False, False, None, True),
    (True, True, False, None, False),
    (True, False, True, (5, 9), True),
    (False, True, True, (5, 9), False),
]


@pytest.mark.parametrize("bias, add_bias_kv, add_zero_attn, kvdim, batch_first", CASES)
@pytest.mark.parametrize("masks", ["none", "bool", "float", "causal"])
@pytest.mark.parametrize("batched", [True, False])
def test_eval_output_is_torchs(bias, add_bias_kv, add_zero_attn, kvdim, batch_first, masks, batched):
    if masks == "causal" and kvdim is not None:
        pytest.skip("a causal mask is square: self-attention")
    mha, attention = _attention_pair(bias, add_bias_kv, add_zero_attn, kvdim, batch_first)
    query, key, value, source = _inputs(batched, batch_first, kvdim)
    kwargs = _masks(masks, batched, source)
    for need_weights, average in itertools.product([True, False], [True, False]):
        for grad in (torch.enable_grad, torch.no_grad, torch.inference_mode):  # torch's fast path under no_grad
            with grad():
                expected = mha(query, key, value, need_weights=need_weights, average_attn_weights=average, **kwargs)
                got = attention(query, key, value, need_weights=need_weights, average_attn_weights=average,
                                **kwargs)
            torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
            if need_weights:
                torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
            else:
                assert got[1] is None


def test_float64_and_packed_split():
    mha, attention = _attention_pair(dtype=torch.float64, batch_first=True)
    q, k, v = mha.in_proj_weight.chunk(3)
    assert torch.equal(attention.q_proj.weight, q) and torch.equal(attention.v_proj.weight, v)
    assert attention.q_proj.weight.dtype == torch.float64 and attention.k_proj.log_sigma2.dtype == torch.float64
    x = torch.randn(N, L, E, dtype=torch.float64)
    torch.testing.assert_close(attention(x, x, x)[0], mha(x, x, x)[0], rtol=1e-12, atol=1e-12)


def _record_seeds(monkeypatch):
    """The seeds the LRT draws, in call order, so the reference can replay the noise."""
    seeds, draw = [], sparsevd.functional.draw_seed

    def recording(generator=None):
        seeds.append(draw(generator))
        return seeds[-1]

    monkeypatch.setattr(sparsevd.functional, "draw_seed", recording)
    return seeds


def _reference(attention, params, query, key, value, seeds, attn_mask, padding):
    """The training forward in float64 from the math: each projection is the reference LRT
    with the noise its kernel drew (seeds in the order q, k, v, out), then softmax(q kᵀ / √d
    + masks) v per head. ``params``: float64 copies of the parameters, by name;
    inputs [length, N, width]."""
    names = ("q_proj", "k_proj", "v_proj", "out_proj")

    def project(name, x, seed):
        layer, flat = getattr(attention, name), x.reshape(-1, x.shape[-1])
        noise = sparsevd.functional.lrt_noise(flat.to(layer.weight.dtype), layer.weight, seed).double()
        y = reference.lrt_linear(flat, params[f"{name}.weight"], params[f"{name}.log_sigma2"],
                                 params.get(f"{name}.bias"), noise)
        return y.reshape(*x.shape[:-1], -1)

    q, k, v = (project(name, x, seed) for name, x, seed in zip(names, (query, key, value), seeds))
    additive = torch.zeros(L, key.shape[0], dtype=torch.float64) if attn_mask is None else attn_mask.double()
    additive = additive.expand(N, 1, L, key.shape[0])
    if padding is not None:
        additive = additive.masked_fill(padding.view(N, 1, 1, -1), -math.inf)
    if "bias_k" in params:
        k = torch.cat([k, params["bias_k"].expand(1, N, E)])
        v = torch.cat([v, params["bias_v"].expand(1, N, E)])
        additive = nn.functional.pad(additive, (0, 1))
    heads = [t.reshape(t.shape[0], N, H, E // H).permute(1, 2, 0, 3) for t in (q, k, v)]  # [N, H, len, d]
    if attention.add_zero_attn:
        heads[1:] = [torch.cat([t, torch.zeros_like(t[:, :, :1])], dim=2) for t in heads[1:]]
        additive = nn.functional.pad(additive, (0, 1))
    scores = heads[0] @ heads[1].transpose(-2, -1) / math.sqrt(E // H) + additive
    out = (torch.softmax(scores, -1) @ heads[2]).permute(2, 0, 1, 3).reshape(L, N, E)
    return project("out_proj", out, seeds[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias, add_bias_kv, add_zero_attn, kvdim, need_weights, with_masks", [
    (True, False, False, None, False, True),
    (False, False, False, None, True, False),
    (True, True, True, (5, 9), False, True),
    (True, True, False, (5, 9), True, True),
])
def test_training_forward_and_gradients_match_a_float64_reference(monkeypatch, dtype, bias, add_bias_kv,
                                                                   add_zero_attn, kvdim, need_weights, with_masks):
    _, attention = _attention_pair(bias, add_bias_kv, add_zero_attn, kvdim, dtype=dtype)
    attention.train()
    with torch.no_grad():  # a trained posterior: variances of every size, some weights pruned
        for layer in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
            layer.log_sigma2.copy_(torch.log(layer.weight ** 2) + 8 * torch.rand_like(layer.weight) - 6)
    query, key, value, source = _inputs(True, False, kvdim, dtype)
    inputs = [t.clone().requires_grad_() for t in (query, key, value)]
    attn_mask = torch.randn(L, source, dtype=dtype) if with_masks else None
    padding = torch.zeros(N, source, dtype=torch.bool)
    padding[1, -3:] = True
    padding = padding if with_masks else None
    seeds = _record_seeds(monkeypatch)
    additive_padding = None if padding is None else torch.zeros(N, source, dtype=dtype).masked_fill(padding, -math.inf)
    out, _ = attention(*inputs, key_padding_mask=additive_padding, attn_mask=attn_mask, need_weights=need_weights)
    assert len(seeds) == 4
    params = {name: p.detach().double().requires_grad_() for name, p in attention.named_parameters()}
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    expected = _reference(attention, params, *inputs64, seeds, attn_mask, padding)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}
    torch.testing.assert_close(out.double(), expected, **tol)
    grad = torch.randn_like(expected)
    out.backward(grad.to(dtype))
    expected.backward(grad)
    for name, p in attention.named_parameters():
        torch.testing.assert_close(p.grad.double(), params[name].grad, **tol, msg=name)
    for mine, theirs in zip(inputs, inputs64):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, **tol)


def test_training_samples_and_eval_is_deterministic():
    _, attention = _attention_pair()
    with torch.no_grad():
        for layer in sparsevd.sparsevd_modules(attention):
            layer[1].log_sigma2.fill_(-4.0)
    x = torch.randn(L, N, E)
    attention.train()
    assert not torch.equal(attention(x, x, x)[0], attention(x, x, x)[0])
    attention.eval()
    assert torch.equal(attention(x, x, x)[0], attention(x, x, x)[0])


def test_projections_are_sparsevd_layers_with_one_kl():
    _, attention = _attention_pair(kvdim=(5, 9))
    layers = sparsevd.sparsevd_modules(attention)
    assert [name for name, _ in layers] == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert attention.k_proj.weight.shape == (E, 5) and attention.v_proj.weight.shape == (E, 9)
    total = sum(layer.kl() for _, layer in layers)
    torch.testing.assert_close(sparsevd.kl_divergence(attention), total)
    assert len(sparsevd.report(attention).rows) == 4


def test_dropout_on_the_attention_weights_in_training_only():
    _, attention = _attention_pair(dropout=0.5)
    with torch.no_grad():
        for _, layer in sparsevd.sparsevd_modules(attention):
            layer.log_sigma2.fill_(-40.0)  # no weight noise: what differs is the dropout
    x = torch.randn(L, N, E)
    attention.train()
    _, weights = attention(x, x, x, average_attn_weights=False)
    assert (weights == 0).any()
    attention.eval()
    _, weights = attention(x, x, x, average_attn_weights=False)
    assert not (weights == 0).any()


def test_new_layer_is_initialised_as_torch_initialises_attention():
    attention = SparseVDMultiheadAttention(16, 4, add_bias_kv=True)
    bound = math.sqrt(6 / (3 * 16 + 16))  # Xavier-uniform over the packed [3E, E] projection
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = getattr(attention, name)
        assert layer.weight.abs().max() <= bound and (layer.bias == 0).all()
        assert (layer.log_sigma2 == reference.LOG_SIGMA2_INIT).all()
    assert (attention.out_proj.bias == 0).all() and attention.bias_k.shape == (1, 1, 16)
    x = torch.randn(3, 2, 16)
    assert attention(x, x, x)[0].shape == (3, 2, 16)


def test_state_dict_round_trip_and_options():
    _, attention = _attention_pair(add_bias_kv=True, batch_first=True)
    other = SparseVDMultiheadAttention(E, H, add_bias_kv=True, batch_first=True, alpha="weight")
    other.load_state_dict(attention.state_dict())
    x = torch.randn(N, L, E)
    torch.testing.assert_close(other.eval()(x, x, x)[0], attention(x, x, x)[0])
    unit = SparseVDMultiheadAttention.from_attention(nn.MultiheadAttention(E, H), alpha="unit", threshold=2.0)
    assert unit.q_proj.variant == "unit" and unit.out_proj.threshold == 2.0
    assert "num_heads=3" in repr(attention) and "add_bias_kv=True" in repr(attention)


@pytest.mark.parametrize("make, error, match", [
    (lambda: SparseVDMultiheadAttention(10, 3), ValueError, r"embed_dim \(10\) must be divisible by num_heads \(3\)"),
    (lambda: SparseVDMultiheadAttention(0, 1), ValueError, "embed_dim must be a positive int"),
    (lambda: SparseVDMultiheadAttention(4, 2, dropout=1.0), ValueError, r"dropout must be a number in \[0, 1\)"),
    (lambda: SparseVDMultiheadAttention(4, 2, kdim=0), ValueError, "kdim must be a positive int"),
    (lambda: SparseVDMultiheadAttention.from_attention(nn.Linear(2, 2)), TypeError, "expects an nn.MultiheadAttention"),
])
def test_bad_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_calls():
    _, attention = _attention_pair()
    x = torch.randn(L, N, E)
    with pytest.raises(ValueError, match="is_causal=True .* needs attn_mask"):
        attention(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match=r"query must have 12 features"):
        attention(torch.randn(L, N, 5), x, x)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(N, S\) = \(2, 5\)"):
        attention(x, x, x, key_padding_mask=torch.zeros(N, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(L, S\) = \(5, 5\)"):
        attention(x, x, x, attn_mask=torch.zeros(4, 5))
    with pytest.raises(ValueError, match="SparseVDMultiheadAttention: .*expected `key` and `value` to be 3-D"):
        attention(x, torch.randn(L, E), x)
    with pytest.raises(ValueError, match="key and value must have the same sequence length"):
        attention(x, x, torch.randn(L + 1, N, E))
    with pytest.raises(TypeError, match="query must be a tensor"):
        attention([1.0], x, x)
