"""Mixed precision: SparseVD layers under torch.autocast run in the autocast dtype like
nn.Linear / nn.Conv2d, gradients reach the fp32 parameters, and the KL stays fp32.

Tolerances: bf16 has an 8-bit mantissa (relative rounding 2^-8 ≈ 4e-3), fp16 11 bits; we
require the flash-attention rule against float64 (error ≤ 2 × that of the same math done
by plain torch in that dtype, + a small atol) and a relative error below 2e-2 (bf16) or
4e-3 (fp16) for outputs and gradients.
"""

import pytest
import torch
from torch import nn

import sparsevd
from sparsevd import noise, reference
from sparsevd import functional as F
from sparsevd.conv import SparseVDConv2d

from conftest import assert_close_fa, rel_err

DTYPES = [torch.bfloat16, torch.float16]
REL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _layer(alpha="weight", bias=True):
    torch.manual_seed(0)
    layer = sparsevd.SparseVDLinear(37, 19, bias=bias, alpha=alpha)
    with torch.no_grad():
        if alpha == "weight":
            layer.log_sigma2.copy_(torch.randn(19, 37) - 6)  # noise visible next to the mean
        elif alpha in ("unit", "layer"):
            layer._raw_variance().fill_(-1.0)
    return layer


def _reference(layer, x, z, dtype):
    """The layer's training forward in plain torch with every tensor in ``dtype``; returns
    the output and the leaves [x, weight, variance parameter (if learned), bias (if any)]."""
    leaf = lambda t: t.detach().to(dtype).requires_grad_()  # noqa: E731
    xd, w = leaf(x), leaf(layer.weight)
    raw = layer._raw_variance()
    raw = leaf(raw) if raw.requires_grad else raw.to(dtype)
    b = leaf(layer.bias) if layer.bias is not None else None
    log_sigma2 = raw if layer.variant == "weight" else raw + torch.log(w * w + reference.EPS)
    y = reference.lrt_linear(xd, w, log_sigma2, b, z.to(dtype))
    return y, [t for t in (xd, w, raw, b) if t is not None and t.requires_grad]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", ["weight", "unit", 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_training_forward_and_gradients_against_fp32_and_fp64(dtype, alpha, bias):
    layer = _layer(alpha, bias)
    x = torch.randn(13, 37, requires_grad=True)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    torch.manual_seed(7)
    z = F.lrt_noise(x, layer.weight, noise.draw_seed())
    assert y.dtype == dtype
    ref64, leaves64 = _reference(layer, x, z, torch.float64)
    same, _ = _reference(layer, x, z, dtype)
    assert_close_fa(y, ref64.detach(), same.detach(), atol=REL[dtype] * 1e-2 * ref64.abs().max().item())
    assert rel_err(y, ref64) < REL[dtype]

    g = torch.randn(13, 19)
    y.backward(g.to(dtype))
    raw = layer._raw_variance()
    got = [x.grad, layer.weight.grad] + ([raw.grad] if raw.requires_grad else []) + ([layer.bias.grad] if bias else [])
    expected = torch.autograd.grad(ref64, leaves64, g.double())
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32
        assert rel_err(a, b) < REL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_is_nn_linear_under_autocast(dtype):
    layer = _layer()
    with torch.no_grad():
        layer.log_sigma2[:5] = 5.0  # some pruned weights
    layer.eval()
    dense = nn.Linear(37, 19)
    with torch.no_grad():
        dense.weight.copy_(layer.weight * layer.mask())
        dense.bias.copy_(layer.bias)
    x = torch.randn(6, 37)
    with torch.autocast("cpu", dtype=dtype):
        y, expected = layer(x), dense(x)
    assert y.dtype == dtype and torch.equal(y, expected)


@pytest.mark.parametrize("alpha", ["weight", "unit", "layer", 0.3])
def test_kl_stays_fp32_under_autocast(alpha):
    layer = _layer(alpha)
    expected = layer.kl()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl = layer.kl()
    assert kl.dtype == torch.float32 and torch.equal(kl, expected)


def test_sgvlb_training_step_under_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(SparseVDConv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          sparsevd.SparseVDLinear(32, 16), nn.ReLU(), sparsevd.SparseVDLinear(16, 3, alpha="unit"))
    loss_fn = sparsevd.SGVLBLoss(model, dataset_size=100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 1, 4, 4))
        loss = loss_fn(out, torch.tensor([0, 1, 2, 0]))
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_takes_bf16_activations_under_autocast(training):
    conv = SparseVDConv2d(2, 3, 3).train(training)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(torch.randn(1, 2, 5, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16
        y = sparsevd.conv.lrt_conv2d(torch.randn(1, 2, 5, 5, dtype=torch.bfloat16), conv.weight, conv.log_sigma2)
        assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_under_autocast_against_fp32(dtype):
    torch.manual_seed(0)
    conv = SparseVDConv2d(3, 5, (3, 2), padding=1, log_sigma2_init=-6.0)
    x = torch.randn(2, 3, 7, 6)
    torch.manual_seed(3)
    expected = conv(x)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=dtype):
        y = conv(x)
    assert y.dtype == dtype
    assert rel_err(y, expected) < REL[dtype]


def test_lrt_sample_under_autocast_casts_mean_and_var():
    mean, var = torch.randn(4, 6), torch.rand(4, 6, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.lrt_sample(mean, var, seed=5)
    z = F.lrt_sample_noise(mean, 5)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, reference.lrt_sample(mean.double(), var.double(), z.double())) < 2e-2
    with pytest.raises(TypeError, match="var has dtype torch.bfloat16 but mean has dtype torch.float32"):
        F.lrt_sample(mean, var, seed=5)  # outside autocast mixed dtypes are still an error


def test_float64_is_left_alone_under_autocast():
    x, w, s = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64), torch.full(
        (2, 4), -3.0, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.lrt_linear(x, w, s, seed=1)
        e = F.masked_linear(x, w, torch.ones(2, 4, dtype=torch.bool))
    assert y.dtype == e.dtype == torch.float64
    torch.testing.assert_close(y, reference.lrt_linear(x, w, s, None, F.lrt_noise(x, w, 1).double()))


def test_bf16_activations_into_fp32_layer_need_autocast():
    layer = _layer()
    x = torch.randn(2, 37, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="input has dtype torch.bfloat16 but weight has dtype torch.float32"):
        layer(x)
