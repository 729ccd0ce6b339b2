"""SparseVDLinear as a drop-in nn.Linear: shapes, modes, state, compile, errors."""

import io

import pytest
import torch
from torch import nn

import sparsevd
from sparsevd import reference


def test_constructor_matches_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(7, 5)
    torch.manual_seed(0)
    layer = sparsevd.SparseVDLinear(7, 5)
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)
    assert layer.log_sigma2.shape == (5, 7) and (layer.log_sigma2 == -10).all()
    assert sparsevd.SparseVDLinear(7, 5, bias=False).bias is None
    half = sparsevd.SparseVDLinear(3, 2, dtype=torch.float64)
    assert half.weight.dtype == half.log_sigma2.dtype == torch.float64
    assert sparsevd.SparseVDLinear(3, 2, log_sigma2_init=-8).log_sigma2.eq(-8).all()


@pytest.mark.parametrize("shape", [(7,), (4, 7), (2, 3, 7)])
@pytest.mark.parametrize("training", [True, False])
def test_input_shapes(shape, training):
    layer = sparsevd.SparseVDLinear(7, 5).train(training)
    y = layer(torch.randn(*shape))
    assert y.shape == (*shape[:-1], 5)


def test_eval_is_deterministic_masked_linear():
    layer = sparsevd.SparseVDLinear(10, 6)
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.randn(6, 10) * 4)
    layer.eval()
    x = torch.randn(3, 10)
    mask = reference.log_alpha(layer.weight, layer.log_sigma2) < 3.0
    assert 0 < mask.sum() < mask.numel(), "test needs a partly pruned layer"
    expected = torch.nn.functional.linear(x, layer.weight * mask, layer.bias)
    assert torch.equal(layer(x), layer(x))
    torch.testing.assert_close(layer(x), expected)
    assert layer.kept_weights() == int(mask.sum()) and layer.total_weights() == 60
    assert torch.equal(layer.mask(), mask)


def test_train_mode_samples_and_is_close_to_mean_at_small_variance():
    torch.manual_seed(0)
    layer = sparsevd.SparseVDLinear(10, 6)
    x = torch.randn(3, 10)
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)
    mean = torch.nn.functional.linear(x, layer.weight, layer.bias)
    std = reference.lrt_std(x, layer.log_sigma2)
    assert ((a - mean).abs() <= 6 * std).all()


def test_threshold_changes_mask():
    layer = sparsevd.SparseVDLinear(10, 6, threshold=3.0)
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.randn(6, 10) * 4)
    kept = layer.kept_weights()
    layer.threshold = -100.0
    assert layer.kept_weights() == 0 <= kept


def test_kl_is_differentiable_and_matches_reference():
    layer = sparsevd.SparseVDLinear(9, 4)
    kl = layer.kl()
    kl.backward()
    assert layer.weight.grad is not None and layer.log_sigma2.grad is not None
    torch.testing.assert_close(kl, reference.kl_divergence(layer.weight, layer.log_sigma2))


def test_state_dict_round_trip():
    layer = sparsevd.SparseVDLinear(9, 4)
    with torch.no_grad():
        layer.log_sigma2.normal_()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other = sparsevd.SparseVDLinear(9, 4)
    other.load_state_dict(torch.load(buffer))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, other.state_dict()[key])
    assert set(layer.state_dict()) == {"weight", "bias", "log_sigma2"}
    x = torch.randn(2, 9)
    assert torch.equal(layer.eval()(x), other.eval()(x))


def test_from_linear():
    linear = nn.Linear(6, 3)
    layer = sparsevd.SparseVDLinear.from_linear(linear, log_sigma2_init=-9.0, threshold=2.0)
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    assert layer.threshold == 2.0 and (layer.log_sigma2 == -9).all()
    x = torch.randn(4, 6)
    # log σ² = −9 on weights of size ~0.3 gives log α ≈ −6.6: nothing pruned
    torch.testing.assert_close(layer.eval()(x), linear(x))
    with pytest.raises(TypeError, match="nn.Linear"):
        sparsevd.SparseVDLinear.from_linear(nn.Conv2d(1, 1, 1))


def test_compile_fullgraph_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(sparsevd.SparseVDLinear(12, 16), nn.ReLU(), sparsevd.SparseVDLinear(16, 3))
    x = torch.randn(5, 12)
    target = torch.tensor([0, 1, 2, 0, 1])
    loss_fn = sparsevd.SGVLBLoss(model, dataset_size=100)

    def step(x, target):
        return loss_fn(model(x), target, kl_weight=0.5)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    eval_compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(eval_compiled(x), model(x))


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    model = nn.Sequential(sparsevd.SparseVDLinear(12, 16), nn.ReLU(), sparsevd.SparseVDLinear(16, 3))
    x = torch.randn(5, 12)
    compiled = torch.compile(model, fullgraph=True)
    compiled(x).sum().backward()
    assert model[0].log_sigma2.grad is not None


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: sparsevd.SparseVDLinear(4, 3, threshold=float("nan")), "threshold"),
        (lambda: sparsevd.SparseVDLinear(4, 3, log_alpha_range=(5, -5)), "log_alpha_range"),
        (lambda: sparsevd.SparseVDLinear(4, 3, log_sigma2_init=float("inf")), "log_sigma2_init"),
    ],
)
def test_bad_construction_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("training", [True, False])
def test_bad_input_is_named(training):
    layer = sparsevd.SparseVDLinear(4, 3).train(training)
    with pytest.raises(ValueError, match=r"\[\*, 4\]"):
        layer(torch.randn(2, 5))
    with pytest.raises((TypeError, RuntimeError), match="dtype|floating|Long"):
        layer(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises((TypeError, RuntimeError), match="dtype|Double"):
        layer(torch.randn(2, 4, dtype=torch.float64))


def test_mismatched_device_is_named():
    layer = sparsevd.SparseVDLinear(4, 3)
    for training in (True, False):
        with pytest.raises(ValueError, match="input is on meta but weight is on cpu"):
            layer.train(training)(torch.randn(2, 4, device="meta"))


def test_package_works_without_the_extension():
    """What a SPARSEVD_BUILD=none install (or a failed build) gets: the reference path."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["sparsevd._C"] = None  # the compiled extension is absent
import torch, sparsevd
assert not sparsevd.dispatch.HAS_EXTENSION
torch.manual_seed(0)
model = torch.nn.Sequential(sparsevd.SparseVDLinear(5, 4), torch.nn.ReLU(), sparsevd.SparseVDLinear(4, 2))
loss = sparsevd.SGVLBLoss(model, dataset_size=10)(model(torch.randn(3, 5)), torch.tensor([0, 1, 1]))
loss.backward()
assert model[0].log_sigma2.grad is not None
fast = sparsevd.sparsify(model.eval())
x = torch.randn(6, 5)
torch.testing.assert_close(fast(x), model(x))
print(sparsevd.dispatch.describe())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "extension not loaded" in result.stdout and "csr_linear: CPU -> reference" in result.stdout


def test_extension_built_for_another_torch_is_not_loaded():
    """An extension built against another torch can crash: it is refused, naming both versions."""
    from conftest import run_python

    out = run_python("""
import sys, types, warnings
sys.modules["sparsevd._build_info"] = types.SimpleNamespace(TORCH_VERSION="2.6.0+cu124", WITH_CUDA=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, sparsevd
assert "sparsevd._C" not in sys.modules
assert not sparsevd.dispatch.HAS_EXTENSION
print([str(w.message) for w in caught if w.category is RuntimeWarning])
model = sparsevd.SparseVDLinear(5, 3)
model(torch.randn(2, 5)).sum().backward()
""")
    assert "built against torch 2.6.0+cu124" in out and f"torch {torch.__version__} is running" in out
