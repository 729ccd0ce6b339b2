"""PatchConv2d, the form sparsify() gives a pruned patch convolution (stride equal to the
kernel) on the CPU: it computes what the convolution computes, CSR or dense, on odd sizes
(images that the patches do not divide), with and without bias, float32 and float64,
batched or not; sparsify picks it for a ViT-style patch embedding and for no other
convolution; bad input gets a clear error."""

import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as TF

import sparsevd
from sparsevd.patch_conv import is_patch_conv


def _conv(bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 11, (3, 5), stride=(3, 5), bias=bias, dtype=dtype)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape) < 0.3)  # pruned
    return conv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("size", [(9, 10), (14, 17), (3, 5)])
def test_it_computes_what_the_convolution_computes(dtype, sparse, bias, size):
    conv = _conv(bias, dtype)
    patch = sparsevd.PatchConv2d.from_conv(conv, sparse)
    assert type(patch.gemm) is (sparsevd.SparseLinear if sparse else nn.Linear)
    x = torch.randn(4, 3, *size, dtype=dtype)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    with torch.no_grad():
        torch.testing.assert_close(patch(x), conv(x), rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(patch(x[0]), conv(x[0]), rtol=tolerance, atol=tolerance)
        assert patch(x).is_contiguous()


def test_only_patch_convolutions_qualify():
    assert is_patch_conv(nn.Conv2d(3, 4, 2, stride=2)) and is_patch_conv(nn.Conv2d(3, 4, (2, 3), (2, 3), padding="valid"))
    for conv in (nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 2, stride=2, padding=1), nn.Conv2d(4, 4, 2, stride=2, groups=2),
                 nn.Conv2d(3, 4, 2, stride=2, dilation=2), nn.Conv1d(3, 4, 2, stride=2), nn.Conv2d(3, 4, 1)):
        assert not is_patch_conv(conv)
        with pytest.raises(ValueError, match="stride equal to its kernel"):
            sparsevd.PatchConv2d.from_conv(conv, True)


class PatchModel(nn.Module):
    """A ViT-style front: patches embedded by a convolution, tokens, a head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(1, 16, 5, stride=5)
        self.other = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.other(self.proj(x)).flatten(2).mean(2))


@pytest.mark.parametrize("input_shape", [None, (1, 20, 23)])
@pytest.mark.parametrize("batch_size", [1, 256])
def test_sparsify_gives_the_patch_embedding_this_form(input_shape, batch_size):
    model = sparsevd.convert(PatchModel(), log_sigma2_init=-40.0)
    with torch.no_grad():
        for _, m in sparsevd.sparsevd_modules(model):
            m.log_sigma2.masked_fill_(torch.rand(m.weight.shape) < 0.9, 10.0)
    fast = sparsevd.sparsify(model, batch_size=batch_size, input_shape=input_shape)
    layers = dict(fast.named_modules())
    assert type(layers["proj"]) is sparsevd.PatchConv2d
    assert type(layers["other"]) in (nn.Conv2d, sparsevd.SparseConv2d)
    x = torch.randn(5, 1, 20, 23)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_state_dict_and_pickle_round_trip():
    patch = sparsevd.PatchConv2d.from_conv(_conv(), True)
    other = sparsevd.PatchConv2d.from_conv(_conv(seed=1), True)
    x = torch.randn(2, 3, 9, 10)
    with torch.no_grad():
        other.load_state_dict(patch.state_dict())
        torch.testing.assert_close(other(x), patch(x))
        torch.testing.assert_close(pickle.loads(pickle.dumps(patch))(x), patch(x))


def test_bad_input_gets_a_clear_error():
    patch = sparsevd.PatchConv2d.from_conv(_conv(), False)
    for bad, match in ((torch.randn(2, 4, 9, 10), r"expected input \[batch, 3, H, W\]"),
                       (torch.randn(2, 1, 3, 9, 10), "expected input"),
                       (torch.randn(9, 10), "expected input"),
                       (torch.randn(2, 3, 2, 10), "smaller than the kernel")):
        with pytest.raises(ValueError, match=match):
            patch(bad)
    with pytest.raises(RuntimeError):
        patch(torch.randn(2, 3, 9, 10, dtype=torch.float64))  # the layer's own dtype error
    with pytest.raises(TypeError, match="gemm must be"):
        sparsevd.PatchConv2d(3, 11, (3, 5), nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="gemm must map 45 features to 11"):
        sparsevd.PatchConv2d(3, 11, (3, 5), nn.Linear(44, 11))
    empty = patch(torch.randn(0, 3, 9, 10))
    assert empty.shape == (0, 11, 3, 2)
    nan = torch.randn(2, 3, 9, 10)
    nan[1, 0, 0, 0] = float("nan")
    out = patch(nan)
    assert out[1, :, 0, 0].isnan().all() and not out[0].isnan().any() and not out[1, :, 1:].isnan().any()
    assert not TF.conv2d(torch.randn(1, 3, 9, 10), _conv().weight).isnan().any()


def test_a_dense_only_cost_model_keeps_the_convolution():
    """CostModel.dense() gives the plain copy: every layer in its own type."""
    model = sparsevd.convert(PatchModel(), log_sigma2_init=-40.0)
    for shrink in (True, False):
        plain = sparsevd.sparsify(model, cost_model=sparsevd.CostModel.dense(), shrink=shrink, input_shape=(1, 20, 23))
        assert type(dict(plain.named_modules())["proj"]) is nn.Conv2d


@pytest.mark.parametrize("sparse", [True, False])
def test_non_contiguous_input_and_another_device(sparse):
    conv = _conv()
    patch = sparsevd.PatchConv2d.from_conv(conv, sparse)
    x = torch.randn(2, 3, 10, 9).transpose(2, 3)  # [2, 3, 9, 10], not contiguous
    with torch.no_grad():
        torch.testing.assert_close(patch(x), conv(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="device"):
            patch(torch.randn(2, 3, 9, 10, device="meta"))  # a layer on the CPU, an input elsewhere
