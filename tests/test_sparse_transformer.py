"""SparseTransformerEncoderLayer, the form sparsify() gives a converted encoder layer: its
fused eval call (the projections and the MLP as linear_chain ops) computes what the
converted model computes in eval mode, on odd sizes, both layouts, both norm orders, every
activation an encoder layer takes, with and without biases, float32 and float64, CSR and
dense forms, batched and unbatched; and whatever the fused call cannot honour (masks,
training, autograd, hooks, parametrizations, replaced modules or activations) runs the
layer's modules one by one, seen on the call it happens."""

import copy
import dataclasses
import math
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as TF
from torch.nn.utils import parametrize

import sparsevd
from sparsevd.sparsify import CPU_COST

ALWAYS_CSR = sparsevd.CostModel(cpu=dataclasses.replace(CPU_COST, dense_overhead_s=math.inf))
COST_MODELS = {"csr": ALWAYS_CSR, "dense": sparsevd.CostModel.dense()}
D, HEADS, FF = 30, 5, 46  # odd sizes: head_dim 6


def _encoder(norm_first=True, batch_first=True, activation="gelu", bias=True, dtype=torch.float32, seed=0):
    """A converted 2-layer encoder with about 70 % of every layer's weights pruned, and one
    head's value rows all pruned (so that sparsify removes it)."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.1, activation=activation, batch_first=batch_first,
                                       norm_first=norm_first, bias=bias, dtype=dtype)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.LayerNorm(D, dtype=dtype))
    model = sparsevd.convert(model, log_sigma2_init=-40.0)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, m in sparsevd.sparsevd_modules(model):
            m.log_sigma2.masked_fill_(torch.rand(m.weight.shape, generator=generator) < 0.7, 10.0)
        v_proj = model[0].layers[1].self_attn.v_proj
        v_proj.log_sigma2[D // HEADS:2 * D // HEADS] = 10.0
        if v_proj.bias is not None:
            v_proj.bias[D // HEADS:2 * D // HEADS] = 0.0
    return model.eval()


def _input(batch_first=True, batch=3, length=7, dtype=torch.float32, seed=2):
    shape = (batch, length, D) if batch_first else (length, batch, D)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _fused_calls(model):
    """Counts, per call of ``model``, the encoder layers that took the fused path."""
    calls = []
    for layer in model.modules():
        if isinstance(layer, sparsevd.SparseTransformerEncoderLayer):
            fused = layer._fused
            layer._fused = lambda plan, x, causal=False, fused=fused: calls.append(1) or fused(plan, x, causal)
    return calls


def _close(got, expected):
    tolerance = 1e-12 if expected.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", COST_MODELS)
@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "relu", nn.GELU(approximate="tanh")])
@pytest.mark.parametrize("bias", [True, False])
def test_the_fused_call_computes_the_eval_output(dtype, form, norm_first, batch_first, activation, bias):
    model = _encoder(norm_first, batch_first, activation, bias, dtype)
    fast = sparsevd.sparsify(model, cost_model=COST_MODELS[form])
    layers = [m for m in fast.modules() if isinstance(m, sparsevd.SparseVDTransformerEncoderLayer)]
    assert [type(m) for m in layers] == [sparsevd.SparseTransformerEncoderLayer] * 2
    assert layers[1].self_attn.removed_heads == 1
    calls = _fused_calls(fast)
    for x in (_input(batch_first, dtype=dtype), _input(batch_first, batch=1, length=1, dtype=dtype),
              _input(batch_first, dtype=dtype)[0]):  # unbatched [L, E]
        with torch.no_grad():
            _close(fast(x), model(x))
    assert len(calls) == 6


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_the_fused_call_runs_under_no_grad_and_inference_mode(mode):
    model = _encoder()
    fast, x = sparsevd.sparsify(model), _input()
    calls = _fused_calls(fast)
    with torch.no_grad():
        expected = model(x)
    with mode():
        _close(fast(x), expected)
    assert len(calls) == 2


def test_masks_run_the_layer_modules_and_match_the_eval_output():
    model, x = _encoder(), _input()
    fast = sparsevd.sparsify(model)
    calls = _fused_calls(fast)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    other = torch.randn(7, 7, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        for kwargs in ({"src_key_padding_mask": padding}, {"mask": other},
                       {"mask": torch.ones(7, 7, dtype=torch.bool).triu(1), "is_causal": True,
                        "src_key_padding_mask": padding}):
            _close(fast[1](fast[0](x, **kwargs)), model[1](model[0](x, **kwargs)))
    assert calls == []


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_a_causal_mask_is_fused_as_causal_attention(batch_first, norm_first):
    """A causal mask (detected by the encoder, or flagged by is_causal) runs fused, as the
    attention module computes it; a causal mask given to one layer without the flag does not."""
    model, x = _encoder(norm_first, batch_first), _input(batch_first)
    fast = sparsevd.sparsify(model)
    calls = _fused_calls(fast)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    with torch.no_grad():
        _close(fast[1](fast[0](x, mask=causal)), model[1](model[0](x, mask=causal)))
        assert len(calls) == 2
        _close(fast[1](fast[0](x, mask=causal, is_causal=True)), model[1](model[0](x, mask=causal, is_causal=True)))
        assert len(calls) == 4
        layer, converted = fast[0].layers[0], model[0].layers[0]
        _close(layer(x, src_mask=causal), converted(x, src_mask=causal))
        assert len(calls) == 4
        unmasked = layer(x)
        assert not torch.allclose(layer(x, src_mask=causal, is_causal=True), unmasked)
        with pytest.raises(ValueError, match="is_causal=True"):
            layer(x, is_causal=True)  # the hint without its mask, refused as the attention refuses it


def test_autograd_and_training_run_the_layer_modules():
    model, x = _encoder(), _input()
    fast = sparsevd.sparsify(model)
    calls = _fused_calls(fast)
    x.requires_grad_(True)
    out = fast(x)
    out.sum().backward()
    with torch.no_grad():
        _close(out, model(x))
    assert x.grad is not None and x.grad.abs().sum() > 0
    fast.train()  # dropout 0.1 in the layers: training differs, and must not be fused
    torch.manual_seed(0)
    with torch.no_grad():
        a = fast(x)
    assert not torch.allclose(a, out)
    assert calls == []


def test_a_change_after_the_first_call_is_seen_on_the_next():
    model, x = _encoder(), _input()
    fast = sparsevd.sparsify(model)
    layer = fast[0].layers[0]
    calls = _fused_calls(fast)
    with torch.no_grad():
        expected = fast(x)
        assert len(calls) == 2

        seen = []
        handle = layer.linear1.register_forward_hook(lambda m, i, o: seen.append(1))
        _close(fast(x), expected)
        assert seen == [1] and len(calls) == 3  # the hooked layer ran its modules
        handle.remove()
        fast(x)
        assert len(calls) == 5

        layer.activation = TF.relu  # a new activation function
        relu = fast(x)
        assert len(calls) == 7 and not torch.allclose(relu, expected)
        layer.activation = TF.gelu
        _close(fast(x), expected)

        layer.norm2 = copy.deepcopy(layer.norm2)  # a replaced module
        layer.norm2.weight.mul_(2.0)
        assert not torch.allclose(fast(x), expected) and len(calls) == 11

        layer.linear2.forward = lambda h: torch.zeros(h.shape[:-1] + (D,))  # a forward of its own
        mlp_off = fast(x)
        assert len(calls) == 12  # layer 1 alone
        del layer.linear2.forward
        assert not torch.allclose(mlp_off, fast(x)) and len(calls) == 14


def test_a_parametrization_added_after_the_first_call_is_applied():
    model, x = _encoder(), _input()
    fast = sparsevd.sparsify(model)
    calls = _fused_calls(fast)

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    with torch.no_grad():
        fast(x)
        assert len(calls) == 2
        for target in (model, fast):  # the converted model runs its modules one by one
            parametrize.register_parametrization(target[0].layers[0].norm1, "weight", Double())
        _close(fast(x), model(x))
        assert len(calls) == 3


def test_load_state_dict_and_to_after_the_first_call():
    model, x = _encoder(), _input()
    fast = sparsevd.sparsify(model)
    other = sparsevd.sparsify(_encoder(seed=5))
    with torch.no_grad():
        fast(x)
        fast.load_state_dict(other.state_dict())
        _close(fast(x), other(x))
        fast.double()
        _close(fast(x.double()), other.double()(x.double()))
        with pytest.raises((RuntimeError, ValueError)):
            fast(x)  # float32 into a float64 model: an error, as in torch


def test_pickle_and_deepcopy_after_a_call():
    model, x = _encoder(), _input()
    fast = sparsevd.sparsify(model)
    with torch.no_grad():
        expected = fast(x)
        for copied in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
            assert "_fused_plan" not in copied[0].layers[0].__dict__
            calls = _fused_calls(copied)
            _close(copied(x), expected)
            assert len(calls) == 2


def test_bad_input_gets_the_errors_of_the_modules():
    fast = sparsevd.sparsify(_encoder())
    with torch.no_grad():
        with pytest.raises((RuntimeError, ValueError)):
            fast(torch.randn(3, 7, D + 1))
        with pytest.raises((RuntimeError, ValueError)):
            fast(torch.randn(2, 3, 7, D))
        with pytest.raises((RuntimeError, ValueError)):
            fast(torch.randn(3, 7, D, dtype=torch.float64))
        empty = fast(torch.randn(0, 7, D))
        assert empty.shape == (0, 7, D)
        nan = torch.randn(3, 7, D)
        nan[1, 2, 3] = float("nan")
        out = fast(nan)
        assert out[1].isnan().any() and not out[0].isnan().any()  # a NaN spreads within its sequence only


EXPORTED = """
import sys, torch, sparsevd
program = torch.export.load(sys.argv[1])
torch.save(program.module()(torch.load(sys.argv[2])), sys.argv[3])
"""


@pytest.mark.parametrize("batch_first, strict", [(True, False), (True, True), (False, False)])
def test_the_sparsified_encoder_exports_and_runs_in_a_fresh_process(tmp_path, batch_first, strict):
    import subprocess
    import sys

    model = _encoder(batch_first=batch_first)
    fast = sparsevd.sparsify(model, cost_model=ALWAYS_CSR)
    x = _input(batch_first)
    dim = 0 if batch_first else 1
    program = torch.export.export(fast, (x,), strict=strict, dynamic_shapes=({dim: torch.export.Dim("batch", min=2)},))
    torch.export.save(program, tmp_path / "model.pt2")
    other = torch.cat([x, x.narrow(dim, 0, 1)], dim)  # another batch size
    torch.save(other, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", EXPORTED, str(tmp_path / "model.pt2"), str(tmp_path / "x.pt"),
                    str(tmp_path / "out.pt")], check=True, timeout=300)
    with torch.no_grad():
        _close(torch.load(tmp_path / "out.pt"), model(other))


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_projects_q_k_v_in_one_call_in_either_layout(batch_first):
    attention = sparsevd.SparseMultiheadAttention.from_sparsevd(
        sparsevd.convert(nn.MultiheadAttention(D, HEADS, batch_first=batch_first), log_sigma2_init=-40.0).eval())
    calls = []
    attention.in_proj.register_forward_hook(lambda m, i, o: calls.append(1))
    x = _input(batch_first)
    with torch.no_grad():
        attention(x, x, x, need_weights=False)
        assert calls == [1]
        attention(x, x.clone(), x.clone(), need_weights=False)  # other tensors: the row blocks
        assert calls == [1]


@pytest.mark.parametrize("form", COST_MODELS)
def test_cross_attention_through_the_packed_projection_exports(form):
    source = sparsevd.convert(nn.MultiheadAttention(D, HEADS, batch_first=True), log_sigma2_init=-40.0).eval()
    with torch.no_grad():
        for _, m in sparsevd.sparsevd_modules(source):
            m.log_sigma2.masked_fill_(torch.rand(m.weight.shape) < 0.7, 10.0)
    attention = sparsevd.sparsify(nn.ModuleList([source]), cost_model=COST_MODELS[form])[0]

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = attention

        def forward(self, q, kv):
            return self.attention(q, kv, kv, need_weights=False)[0]

    q, kv = _input(), _input(length=4, seed=3)
    with torch.no_grad():
        expected = source(q, kv, kv, need_weights=False)[0]
    for strict in (False, True):
        program = torch.export.export(Cross(), (q, kv), strict=strict)
        _close(program.module()(q, kv), expected)


@pytest.mark.parametrize("form", COST_MODELS)
def test_non_contiguous_input_and_another_device(form):
    model = _encoder()
    fast = sparsevd.sparsify(model, cost_model=COST_MODELS[form])
    calls = _fused_calls(fast)
    x = _input(batch_first=False).transpose(0, 1)  # [3, 7, D], not contiguous
    with torch.no_grad():
        _close(fast(x), model(x))
        assert len(calls) == 2
        with pytest.raises(RuntimeError, match="device"):
            fast(torch.randn(3, 7, D, device="meta"))
