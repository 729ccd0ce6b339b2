"""convert(): trained nn.Linear / nn.Conv1d / nn.Conv2d layers become SparseVD layers that
compute the same thing in eval mode."""

import warnings

import pytest
import torch
from torch import nn

import sparsevd
from sparsevd.conv import SparseVDConv1d, SparseVDConv2d


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 7), nn.Tanh(),
                         nn.Linear(7, 3, bias=False)).to(dtype)


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, (3, 2), stride=2, padding="valid", groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 4, 3, padding="same", dilation=2, padding_mode="reflect"),
        )
        self.head = nn.Conv1d(4, 5, 2)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(5 * 8, 10), nn.ReLU(), nn.Linear(10, 4))

    def forward(self, x):
        h = self.features(x)  # [N, 4, 3, 3]
        return self.classifier(self.head(h.flatten(2)))


def _cnn():
    torch.manual_seed(0)
    model = _CNN()
    model.features[4].running_mean.uniform_(-0.5, 0.5)  # BatchNorm statistics a trained net would have
    model.features[4].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _convert_quietly(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no material pruning at once at these settings
        return sparsevd.convert(model, **kwargs)


def _pruned(model):
    return sum(layer.total_weights() - layer.kept_weights() for _, layer in sparsevd.sparsevd_modules(model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mlp_round_trip(dtype):
    model = _mlp(dtype).eval()
    x = torch.randn(4, 5, dtype=dtype)
    converted = _convert_quietly(model).eval()
    assert _pruned(converted) == 0
    kinds = [type(m) for m in converted]
    assert kinds == [sparsevd.SparseVDLinear, nn.ReLU, nn.Dropout, sparsevd.SparseVDLinear, nn.Tanh,
                     sparsevd.SparseVDLinear]
    assert converted[0].weight.dtype == dtype and converted[5].bias is None
    assert type(model[0]) is nn.Linear and type(model[5]) is nn.Linear, "the original is unchanged"
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)


def test_cnn_round_trip():
    model = _cnn()
    x = torch.randn(2, 3, 16, 15)
    converted = _convert_quietly(model, log_sigma2_init=-20.0).eval()
    assert _pruned(converted) == 0
    assert isinstance(converted.features[0], SparseVDConv2d)
    assert isinstance(converted.features[3], SparseVDConv2d) and converted.features[3].groups == 2
    assert isinstance(converted.features[6], SparseVDConv2d)
    assert converted.features[6].padding_mode == "reflect"
    assert isinstance(converted.head, SparseVDConv1d)
    assert isinstance(converted.classifier[1], sparsevd.SparseVDLinear)
    assert isinstance(converted.features[4], nn.BatchNorm2d)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-6, atol=1e-6)
    assert len(sparsevd.sparsevd_modules(converted)) == 6


def test_cnn_at_the_recommended_init_prunes_only_negligible_weights():
    model = _cnn()
    x = torch.randn(2, 3, 16, 15)
    converted = _convert_quietly(model).eval()  # log σ² = −10 prunes |θ| < 1.5e-3 at once
    assert _pruned(converted) > 0, "the test needs some tiny weights"
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=1e-3 * model(x).abs().max().item())


def test_converted_model_trains_with_the_kl_term():
    converted = _convert_quietly(_cnn()).train()
    loss_fn = sparsevd.SGVLBLoss(converted, dataset_size=100)
    loss = loss_fn(converted(torch.randn(3, 3, 16, 15)), torch.tensor([0, 1, 3]))
    loss.backward()
    for _, layer in sparsevd.sparsevd_modules(converted):
        assert layer.log_sigma2.grad is not None and torch.isfinite(layer.log_sigma2.grad).all()


def test_inplace_and_copy():
    model = _mlp()
    copy = _convert_quietly(model)
    assert copy is not model and isinstance(model[0], nn.Linear)
    same = _convert_quietly(model, inplace=True)
    assert same is model and isinstance(model[0], sparsevd.SparseVDLinear)


def test_options_reach_the_layers():
    converted = _convert_quietly(_mlp(), log_sigma2_init=-9.0, threshold=2.5, alpha="unit")
    layer = converted[0]
    assert layer.threshold == 2.5 and layer.variant == "unit" and layer.log_sigma2_init == -9.0
    fixed = _convert_quietly(_mlp(), alpha=0.1)
    assert fixed[3].alpha == pytest.approx(0.1)
    x = torch.randn(2, 5)
    torch.testing.assert_close(converted.eval()(x), _mlp().eval()(x))


def test_include_and_exclude_by_name_and_type():
    model = _cnn()
    kept_last = _convert_quietly(model, exclude="classifier.3")
    assert type(kept_last.classifier[3]) is nn.Linear and isinstance(kept_last.classifier[1], sparsevd.SparseVDLinear)
    convs = _convert_quietly(model, include=nn.Conv2d)
    assert isinstance(convs.features[0], SparseVDConv2d)
    assert type(convs.head) is nn.Conv1d and type(convs.classifier[1]) is nn.Linear
    features = _convert_quietly(model, include=["features.*"], exclude=["features.0", nn.Conv1d])
    assert type(features.features[0]) is nn.Conv2d and isinstance(features.features[3], SparseVDConv2d)
    assert type(features.head) is nn.Conv1d and type(features.classifier[1]) is nn.Linear


def test_the_model_itself_and_shared_layers():
    torch.manual_seed(0)
    linear = nn.Linear(4, 4)
    assert isinstance(_convert_quietly(linear), sparsevd.SparseVDLinear)
    shared = nn.Sequential(linear, nn.ReLU(), linear)
    converted = _convert_quietly(shared)
    assert converted[0] is converted[2] and isinstance(converted[0], sparsevd.SparseVDLinear)


def test_modes_and_frozen_parameters_are_kept():
    model = _mlp()
    model[0].eval()
    model[3].weight.requires_grad_(False)
    converted = _convert_quietly(model)
    assert converted.training and not converted[0].training and converted[3].training
    assert not converted[3].weight.requires_grad and converted[3].bias.requires_grad


def test_subclasses_such_as_attention_projections_are_left_alone():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "out": nn.Linear(8, 2)})
    converted = _convert_quietly(model)
    assert type(converted["attn"].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(converted["out"], sparsevd.SparseVDLinear)


def test_high_log_sigma2_init_warns_and_names_the_layers():
    model = _mlp().eval()
    x = torch.randn(8, 5)
    with pytest.warns(UserWarning, match=r"log_sigma2_init=-3.0 .*pruned at once \(0: \d+ of 80 weights, \d+\.\d% of "
                                         r"the weight norm; 3: \d+ of 112 weights"):
        converted = sparsevd.convert(model, log_sigma2_init=-3.0)
    assert not torch.allclose(converted.eval()(x), model(x))


def test_zero_weights_pruned_at_once_do_not_warn():
    model = _mlp().eval()
    with torch.no_grad():
        model[0].weight[:, :2] = 0  # pruned at any log_sigma2_init, but the output does not change
    converted = _convert_quietly(model)
    assert converted[0].kept_weights() == 48
    x = torch.randn(3, 5)
    torch.testing.assert_close(converted.eval()(x), model(x), rtol=0, atol=0)


def test_bad_arguments():
    with pytest.raises(TypeError, match="convert expects an nn.Module"):
        sparsevd.convert(torch.randn(3))
    with pytest.raises(ValueError, match="include pattern.*'classifier.9'"):
        sparsevd.convert(_cnn(), include=["features.0", "classifier.9"])
    with pytest.raises(ValueError, match="exclude pattern.*'fc'"):
        sparsevd.convert(_mlp(), exclude="fc")
    with pytest.raises(TypeError, match="include entries must be module name patterns"):
        sparsevd.convert(_mlp(), include=[0])
    with pytest.raises(TypeError, match="exclude must be a module name pattern"):
        sparsevd.convert(_mlp(), exclude=3)
    with pytest.raises(ValueError, match="no nn.Linear/nn.Conv1d/nn.Conv2d layer to convert"):
        sparsevd.convert(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="no nn.Linear/nn.Conv1d/nn.Conv2d layer to convert"):
        sparsevd.convert(_mlp(), exclude=nn.Linear)
    for name, value in (("log_sigma2_init", float("nan")), ("threshold", float("inf")), ("threshold", "3")):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            sparsevd.convert(_mlp(), **{name: value})
    with pytest.raises(ValueError, match="alpha must be"):
        sparsevd.convert(_mlp(), alpha="per-weight")
    model = _mlp()
    with pytest.raises(ValueError):
        sparsevd.convert(model, inplace=True, exclude="nope")
    assert isinstance(model[0], nn.Linear), "a failed conversion leaves the model untouched"
