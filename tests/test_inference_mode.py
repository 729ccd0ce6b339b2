"""Everything works under torch.inference_mode(), the way many users write inference code:
sparsify(), building sparse layers, calls of SparseVD and sparsified models (and calls with
autograd after them: no inference tensor is kept where autograd would save it), predict()."""

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

import sparsevd

CSR = sparsevd.CostModel(cpu=dataclasses.replace(sparsevd.CostModel().cpu, dense_overhead_s=math.inf),
                         cuda=dataclasses.replace(sparsevd.CostModel().cuda, dense_overhead_s=math.inf))
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _model(sbp=True):
    """A small SparseVD CNN with an SBP layer, some weights and units pruned, in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(sparsevd.SparseVDConv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), sparsevd.SparseVDLinear(4 * 6 * 6, 12),
                          sparsevd.SBPDropout(12) if sbp else nn.Identity(), nn.ReLU(), sparsevd.SparseVDLinear(12, 5))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sparsevd.SparseVDModule):
                m.log_sigma2.copy_(torch.randn_like(m.log_sigma2) * 6 - 4)
        if sbp:
            model[4].mu.copy_(torch.randn(12))
            model[4].mu[:3] = -15
            model[4].log_sigma.fill_(-1)
            model[4].log_sigma[:3] = 3
    return model.eval()


def _no_inference_tensors(module):
    return [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_inference()]


def _input_grad(module, x):
    x = x.clone().requires_grad_(True)
    module(x).square().sum().backward()
    return x.grad


@pytest.mark.parametrize("cost_model", [None, CSR], ids=["default cost model", "every layer CSR"])
def test_sparsify_under_inference_mode(cost_model):
    model = _model()
    x = torch.randn(5, 1, 8, 8)
    with torch.inference_mode():
        fast = sparsevd.sparsify(model, cost_model=cost_model, input_shape=(1, 8, 8))
        got = fast(x)
    if cost_model is CSR:
        assert {sparsevd.SparseLinear, sparsevd.SparseConv2d} <= {type(m) for m in fast.modules()}
    assert _no_inference_tensors(fast) == []
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(got, want, **TOL)
    # and with autograd afterwards (through the input: the copy's parameters train nothing)
    torch.testing.assert_close(_input_grad(fast, x), _input_grad(model, x), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_layers_built_under_inference_mode(dtype, bias):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(7, 9, generator=g) * (torch.rand(7, 9, generator=g) < 0.4)).to(dtype)
    b = torch.randn(7, generator=g).to(dtype) if bias else None
    conv = nn.Conv2d(2, 3, 3, bias=bias, dtype=dtype)
    with torch.inference_mode():
        layer = sparsevd.SparseLinear.from_dense(w, b)
        sparse_conv = sparsevd.SparseConv2d.from_dense(conv)
    assert _no_inference_tensors(layer) == [] and _no_inference_tensors(sparse_conv) == []
    x, image = torch.randn(4, 9, dtype=dtype), torch.randn(2, 2, 5, 6, dtype=dtype)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, w, b))
        torch.testing.assert_close(sparse_conv(image), conv(image))
    torch.testing.assert_close(_input_grad(layer, x), _input_grad(lambda v: nn.functional.linear(v, w, b), x))
    torch.testing.assert_close(_input_grad(sparse_conv, image), _input_grad(conv, image))


def test_a_sparse_layer_moved_or_loaded_under_inference_mode():
    """.to() and load_state_dict under inference_mode hand the layer inference tensors: its
    next call replaces them by normal copies, checked, so autograd still works after."""
    layer = sparsevd.SparseLinear.from_dense(torch.eye(5)[:, [1, 0, 2, 4, 3]] * 2, torch.ones(5))
    other = sparsevd.SparseLinear.from_dense(torch.eye(5) * 3, torch.zeros(5))
    x = torch.randn(3, 5)
    with torch.inference_mode():
        layer = layer.to(torch.float64)
        layer(x.double())
        layer.load_state_dict(other.double().state_dict())
        torch.testing.assert_close(layer(x.double()), 3 * x.double())
    assert _no_inference_tensors(layer) in ([], ["bias"])  # a parameter torch made; autograd never saves it
    torch.testing.assert_close(_input_grad(layer, x.double()), 18 * x.double())
    with torch.no_grad():
        layer.col_indices[0] = 99  # edits are still seen
    with pytest.raises(ValueError, match="col"):
        layer(x.double())


@pytest.mark.parametrize("sbp", [True, False])
def test_model_calls_under_inference_mode_then_with_gradients(sbp):
    model, fresh = _model(sbp), _model(sbp)
    x = torch.randn(4, 1, 8, 8)
    with torch.inference_mode():
        got = model(x)
    with torch.no_grad():
        torch.testing.assert_close(got, fresh(x))
    # the eval caches filled under inference_mode serve autograd afterwards
    model(x).sum().backward()
    fresh(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_fused_sequential_calls_under_inference_mode_then_with_gradients():
    fast = sparsevd.sparsify(_model(sbp=False), cost_model=CSR)
    plain = nn.Sequential(*copy.deepcopy(list(fast))).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), plain(x), **TOL)
    torch.testing.assert_close(_input_grad(fast, x), _input_grad(plain, x), **TOL)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_predict_under_inference_mode(task):
    model = _model()
    x = torch.randn(3, 1, 8, 8)
    torch.manual_seed(7)
    want = sparsevd.predict(model, x, samples=6, task=task)
    torch.manual_seed(7)
    with torch.inference_mode():
        got = sparsevd.predict(model, x, samples=6, task=task)
    torch.testing.assert_close(got.mean, want.mean)
    torch.testing.assert_close(got.variance if task == "regression" else got.entropy,
                               want.variance if task == "regression" else want.entropy)
    assert not model.training and all(not m.training for m in model.modules())
    model(x).sum().backward()  # nothing predict cached under inference_mode blocks autograd later


def test_embeddings_under_inference_mode():
    torch.manual_seed(0)
    model = nn.Sequential(sparsevd.SparseVDEmbedding(20, 6), nn.Flatten(), sparsevd.SparseVDLinear(18, 4)).eval()
    with torch.no_grad():
        model[0].log_sigma2.copy_(torch.randn_like(model[0].log_sigma2) * 6 - 2)
    fresh = copy.deepcopy(model)
    tokens = torch.randint(0, 20, (5, 3))
    with torch.inference_mode():
        got = model(tokens)
        table = sparsevd.SparseEmbedding.from_sparsevd(model[0])
    assert _no_inference_tensors(table) == []
    with torch.no_grad():
        torch.testing.assert_close(got, fresh(tokens))
        torch.testing.assert_close(table(tokens), fresh[0](tokens))
        table.weight[0].add_(0)  # an ordinary buffer: editable outside inference_mode
    model(tokens).sum().backward()
    fresh(tokens).sum().backward()
    torch.testing.assert_close(model[0].weight.grad, fresh[0].weight.grad)
