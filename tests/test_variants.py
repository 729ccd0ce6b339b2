"""The variational-dropout variants of the SparseVD layers: α per weight, per output unit,
per layer (Kingma et al.), and Gaussian dropout with a fixed α."""

import io
import math

import pytest
import torch
from torch import nn

import sparsevd
from sparsevd import noise, reference
from sparsevd import functional as F

LEARNED = ["weight", "unit", "layer"]
ALL = LEARNED + [0.5]


def _layer(alpha, in_features=7, out_features=5, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    return sparsevd.SparseVDLinear(in_features, out_features, bias=bias, dtype=dtype, alpha=alpha)


def _spread(layer):
    """Give the variance parameter distinct values per entry from −8 to 6, some above
    the threshold (so sharing and pruning are visible)."""
    with torch.no_grad():
        raw = layer._raw_variance()
        raw.copy_(torch.linspace(-8, 6, raw.numel(), dtype=raw.dtype).reshape(raw.shape))
    return layer


def test_parameter_shapes_and_state_dict_keys():
    shapes = {"weight": ("log_sigma2", (5, 7)), "unit": ("log_alpha_unit", (5, 1)),
              "layer": ("log_alpha_layer", (1, 1))}
    for alpha, (name, shape) in shapes.items():
        layer = _layer(alpha)
        assert layer.alpha == alpha and layer.variant == alpha
        assert dict(layer.named_parameters())[name].shape == shape
        assert set(layer.state_dict()) == {"weight", "bias", name}
    fixed = _layer(0.5)
    assert fixed.alpha == pytest.approx(0.5) and fixed.variant == "fixed"
    assert {n for n, _ in fixed.named_parameters()} == {"weight", "bias"}
    assert set(fixed.state_dict()) == {"weight", "bias", "fixed_log_alpha"}
    assert fixed.fixed_log_alpha.shape == (1, 1) and not fixed.fixed_log_alpha.requires_grad
    assert "alpha='unit'" in repr(_layer("unit")) and "alpha" not in repr(_layer("weight"))


def test_default_variant_is_unchanged():
    torch.manual_seed(0)
    default = sparsevd.SparseVDLinear(7, 5)
    assert default.variant == "weight"
    assert default.variance_log_sigma2() is default.log_sigma2


@pytest.mark.parametrize("alpha", ["unit", "layer"])
@pytest.mark.parametrize("init", [-10.0, -6.0])
def test_shared_alpha_starts_at_the_variance_of_log_sigma2_init(alpha, init):
    # log α is chosen so that the unit's (layer's) mean σ² = α·mean θ² is exp(init)
    torch.manual_seed(0)
    layer = sparsevd.SparseVDLinear(9, 4, alpha=alpha, log_sigma2_init=init, dtype=torch.float64)
    sigma2 = layer.variance_log_sigma2().exp()
    dims = 1 if alpha == "unit" else (0, 1)
    mean_sigma2 = sigma2.mean(dims)
    torch.testing.assert_close(mean_sigma2.log(), torch.full_like(mean_sigma2, init), rtol=0, atol=1e-6)
    if alpha == "unit":
        assert layer.log_alpha_unit.unique().numel() == 4  # units with different θ start apart


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_shared_alpha_init_is_clamped_and_handles_zero_weights():
    layer = sparsevd.SparseVDLinear(3, 2, alpha="unit", log_sigma2_init=-5.0)
    with torch.no_grad():
        layer.weight[0].zero_()
    layer.reset_variance_parameters()
    # θ = 0: log α = −5 − log(1e-8) = 13.4, clamped to 10 and pruned at once, as with alpha="weight"
    assert layer.log_alpha_unit[0].item() == 10.0 and layer.log_alpha_unit[1].item() < 3.0
    assert layer.mask()[0].sum() == 0 and layer.mask()[1].all()
    for alpha in ("unit", "layer"):  # a layer without weights is refused (issue 20), whatever its variant
        with pytest.raises(ValueError, match="in_features must be an int ≥ 1, got 0"):
            sparsevd.SparseVDLinear(0, 3, alpha=alpha)


@pytest.mark.parametrize("alpha", ALL)
def test_variance_log_sigma2_is_log_alpha_plus_log_theta2(alpha):
    layer = _spread(_layer(alpha, dtype=torch.float64)) if alpha != 0.5 else _layer(alpha, dtype=torch.float64)
    expected = layer._raw_variance() + torch.log(layer.weight ** 2 + reference.EPS)
    if alpha == "weight":
        expected = layer.log_sigma2
    torch.testing.assert_close(layer.variance_log_sigma2(), expected.expand(5, 7))
    assert layer.variance_log_sigma2().shape == layer.weight.shape


@pytest.mark.parametrize("alpha", ["unit", "layer"])
def test_variance_log_sigma2_gradients_reach_theta_and_log_alpha(alpha):
    layer = _spread(_layer(alpha, in_features=3, out_features=2, dtype=torch.float64))
    params = (layer.weight, layer._raw_variance())
    out = layer.variance_log_sigma2()
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, params, g)
    # σ² = α θ²: ∂log σ²/∂θ = 2θ / (θ² + ε), ∂log σ²/∂log α = 1 (summed over the sharing weights)
    w = layer.weight.detach()
    torch.testing.assert_close(got[0], g * 2 * w / (w * w + reference.EPS))
    torch.testing.assert_close(got[1], g.sum(1 if alpha == "unit" else (0, 1), keepdim=True))


@pytest.mark.parametrize("alpha", ["unit", "layer", 0.5, 30.0])
def test_log_alpha_and_mask_follow_the_shared_alpha(alpha):
    layer = _layer(alpha, dtype=torch.float64)
    if not isinstance(alpha, float):
        _spread(layer)
    expected = torch.clamp(layer._raw_variance().detach(), -10, 10).expand(5, 7)
    assert layer.log_alpha.shape == (5, 7)
    torch.testing.assert_close(layer.log_alpha, expected)
    # the per-weight definition on the implied log σ² gives the same log α
    torch.testing.assert_close(layer.log_alpha, reference.log_alpha(layer.weight, layer.variance_log_sigma2()).detach())
    assert torch.equal(layer.mask(), expected < 3.0)
    if alpha == "unit":
        assert 0 < layer.kept_weights() < 35 and (layer.mask() == layer.mask()[:, :1]).all()


def test_fixed_alpha_gaussian_dropout_keeps_every_weight_below_the_threshold():
    assert _layer(1.0).kept_weights() == 35  # log α = 0 < 3: Gaussian dropout does not prune
    assert _layer(math.exp(3.5)).kept_weights() == 0


@pytest.mark.parametrize("alpha", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_matches_the_per_weight_reference(alpha, dtype):
    layer = _layer(alpha, dtype=dtype)
    if alpha != 0.5:
        _spread(layer)
    kl = layer.kl()
    assert kl.dim() == 0 and kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Σ over weights of the KL of each factor N(θ, σ²) with the implied per-weight log σ²
    expected = reference.kl_divergence(layer.weight, layer.variance_log_sigma2().detach())
    torch.testing.assert_close(kl, expected, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=1e-5)
    if alpha == "weight":
        return
    la = torch.clamp(layer._raw_variance().detach().double(), -10, 10)
    direct = 35 / la.numel() * -(0.63576 * torch.sigmoid(1.87320 + 1.48695 * la) - 0.5 * torch.log1p(torch.exp(-la))
                                 - 0.63576).sum()
    torch.testing.assert_close(kl.double(), direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", ["unit", "layer"])
def test_kl_gradient_matches_the_per_weight_reference(alpha):
    layer = _spread(_layer(alpha, dtype=torch.float64))
    raw = layer._raw_variance()
    (got,) = torch.autograd.grad(layer.kl(), raw)
    ref_raw = raw.detach().clone().requires_grad_()
    w = layer.weight.detach()
    (expected,) = torch.autograd.grad(reference.kl_divergence(w, ref_raw + torch.log(w * w + reference.EPS)), ref_raw)
    torch.testing.assert_close(got, expected)
    assert got.abs().sum() > 0
    kl = layer.kl()
    assert not torch.autograd.grad(kl, layer.weight, allow_unused=True, materialize_grads=True)[0].any()


def test_fixed_alpha_kl_is_a_constant():
    layer = _layer(0.5)
    kl = layer.kl()
    assert not kl.requires_grad
    la = torch.tensor(math.log(0.5))
    torch.testing.assert_close(kl, 35 * reference.kl_from_log_alpha(la))
    with torch.no_grad():
        layer.weight.mul_(3)
    assert torch.equal(layer.kl(), kl)


@pytest.mark.parametrize("alpha", ALL)
@pytest.mark.parametrize("bias", [True, False])
def test_training_forward_and_gradients_match_the_lrt_reference(alpha, bias):
    layer = _layer(alpha, in_features=6, out_features=3, dtype=torch.float64, bias=bias)
    if alpha != 0.5:
        _spread(layer)
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    z = F.lrt_noise(x, layer.weight, noise.draw_seed())
    params = [p for p in layer.parameters()]
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, params, g)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref_layer = dict(zip((n for n, _ in layer.named_parameters()), ref_params))
    w = ref_layer["weight"]
    raw = ref_layer.get("log_sigma2", ref_layer.get("log_alpha_unit", ref_layer.get("log_alpha_layer")))
    if raw is None:
        raw = layer.fixed_log_alpha
    log_sigma2 = raw if alpha == "weight" else raw + torch.log(w * w + reference.EPS)
    ref = reference.lrt_linear(x, w, log_sigma2, ref_layer.get("bias"), z.double())
    torch.testing.assert_close(y, ref)
    for a, b in zip(got, torch.autograd.grad(ref, ref_params, g)):
        torch.testing.assert_close(a, b)


def test_gaussian_dropout_variance_is_alpha_times_the_squared_mean_contributions():
    # y_j = Σ_k x_k w_jk ξ_jk, ξ ~ N(1, α): Var y_j = α Σ_k x_k² θ_jk² (statistical, fixed seed)
    layer = _layer(0.25, in_features=4, out_features=2, bias=False)
    x = torch.randn(1, 4).expand(20000, 4)
    torch.manual_seed(0)
    y = layer(x)
    expected_var = 0.25 * (x[:1] ** 2) @ (layer.weight.detach() ** 2).T
    torch.testing.assert_close(y.var(0, keepdim=True), expected_var + 1e-8, rtol=0.05, atol=0)
    torch.testing.assert_close(y.mean(0, keepdim=True), x[:1] @ layer.weight.detach().T,
                               rtol=0, atol=0.05 * expected_var.sqrt().max().item())


@pytest.mark.parametrize("alpha", ALL)
def test_state_dict_round_trip(alpha):
    layer = _layer(alpha)
    if alpha != 0.5:
        _spread(layer)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other = _layer(alpha, seed=3)
    other.load_state_dict(torch.load(buffer))
    x = torch.randn(3, 7)
    assert torch.equal(layer.eval()(x), other.eval()(x))
    torch.testing.assert_close(layer.kl(), other.kl())


def test_loading_another_variant_names_the_variants():
    saved = _layer("unit").state_dict()
    with pytest.raises(RuntimeError, match="alpha variant 'unit'.*has 'weight'"):
        _layer("weight").load_state_dict(saved)
    with pytest.raises(RuntimeError, match="alpha variant 'weight'.*has 'fixed'"):
        nn.Sequential(_layer(0.5)).load_state_dict(nn.Sequential(_layer("weight")).state_dict())
    with pytest.raises(RuntimeError, match="alpha variant 'unit'"):
        _layer("layer").load_state_dict(saved, strict=False)
    # without the variance entry, a non-strict load takes θ and the bias and keeps the layer's own α
    layer = _layer("layer", seed=4)
    before = layer.log_alpha_layer.clone()
    layer.load_state_dict({k: v for k, v in saved.items() if k != "log_alpha_unit"}, strict=False)
    assert torch.equal(layer.weight, saved["weight"]) and torch.equal(layer.log_alpha_layer, before)


def test_loaded_fixed_alpha_is_reported():
    layer = _layer(0.25)
    layer.load_state_dict(_layer(2.0).state_dict())
    assert layer.alpha == pytest.approx(2.0)


@pytest.mark.parametrize("bad", ["units", "", "Weight"])
def test_bad_alpha_name(bad):
    with pytest.raises(ValueError, match="alpha must be 'weight', 'unit', 'layer'"):
        sparsevd.SparseVDLinear(3, 2, alpha=bad)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_fixed_alpha(bad):
    with pytest.raises(ValueError, match="fixed alpha must be a finite number > 0"):
        sparsevd.SparseVDLinear(3, 2, alpha=bad)


@pytest.mark.parametrize("bad", [None, True, [0.5], torch.tensor(0.5)])
def test_alpha_of_the_wrong_type(bad):
    with pytest.raises(TypeError, match="alpha must be"):
        sparsevd.SparseVDLinear(3, 2, alpha=bad)


@pytest.mark.parametrize("alpha", ALL)
def test_from_linear_keeps_the_variant_and_eval_output(alpha):
    linear = nn.Linear(6, 4)
    layer = sparsevd.SparseVDLinear.from_linear(linear, alpha=alpha)
    assert layer.variant == ("fixed" if alpha == 0.5 else alpha)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer.eval()(x), linear(x))
    if alpha in ("unit", "layer"):  # initialised from the copied θ, not the random init
        mean_sigma2 = layer.variance_log_sigma2().exp().mean(1 if alpha == "unit" else (0, 1))
        torch.testing.assert_close(mean_sigma2.log(), torch.full_like(mean_sigma2, -10.0), rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # sparsify cuts a pruned layer
@pytest.mark.parametrize("alpha", ALL)
def test_training_step_with_sgvlb_and_sparsify(alpha):
    torch.manual_seed(0)
    model = nn.Sequential(sparsevd.SparseVDLinear(5, 8, alpha=alpha), nn.ReLU(),
                          sparsevd.SparseVDLinear(8, 3, alpha=alpha))
    loss = sparsevd.SGVLBLoss(model, dataset_size=50)(model(torch.randn(6, 5)), torch.tensor([0, 1, 2, 0, 1, 2]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    if alpha in ("unit", "layer"):
        with torch.no_grad():
            model[0]._raw_variance()[:1] = 5.0  # the first unit (or the whole layer) is pruned
    x = torch.randn(4, 5)
    torch.testing.assert_close(sparsevd.sparsify(model)(x), model.eval()(x))
