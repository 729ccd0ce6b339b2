"""Eval mode at the cost of a dense layer: the cached θ ⊙ mask is served while nothing it
depends on changed, and recomputed after every change that can alter it. And the frozen
mask of fine-tuning."""

import copy
import io

import pytest
import torch

import sparsevd
from sparsevd import reference

LAYERS = {
    "linear": lambda **kw: sparsevd.SparseVDLinear(11, 7, **kw),
    "conv2d": lambda **kw: sparsevd.SparseVDConv2d(3, 5, 3, padding=1, **kw),
    "conv1d-reflect": lambda **kw: sparsevd.SparseVDConv1d(3, 5, 3, padding=1, padding_mode="reflect", **kw),
}
INPUTS = {"linear": (4, 11), "conv2d": (2, 3, 6, 5), "conv1d-reflect": (2, 3, 9)}
ALPHAS = ["weight", "unit", "layer", 0.5]


def _partly_pruned(kind, alpha="weight"):
    torch.manual_seed(0)
    layer = LAYERS[kind](alpha=alpha)
    with torch.no_grad():
        if alpha == "weight":
            layer.log_sigma2.copy_(torch.randn_like(layer.log_sigma2) * 4 - 2)
        elif alpha in ("unit", "layer"):
            layer._raw_variance().copy_(torch.linspace(-2, 6, layer._raw_variance().numel()).view_as(
                layer._raw_variance()))
    return layer.eval()


def _fresh(layer, x):
    """What eval mode must compute, from scratch (differentiable in θ and x)."""
    weight = layer.weight * layer.mask()
    if isinstance(layer, sparsevd.SparseVDLinear):
        return torch.nn.functional.linear(x, weight, layer.bias)
    if layer.padding_mode != "zeros":
        pad = sparsevd.shapes.explicit_padding(layer.padding, layer.kernel_size, layer.dilation)
        x, padding = torch.nn.functional.pad(x, pad, mode=layer.padding_mode), 0
    else:
        padding = layer.padding
    conv = torch.nn.functional.conv2d if layer.dims == 2 else torch.nn.functional.conv1d
    return conv(x, weight, layer.bias, layer.stride, padding, layer.dilation, layer.groups)


class _CountMasks:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = sparsevd.SparseVDModule.mask

        def counted(layer):
            self.calls += 1
            return original(layer)

        monkeypatch.setattr(sparsevd.SparseVDModule, "mask", counted)


@pytest.mark.parametrize("alpha", ALPHAS, ids=str)
@pytest.mark.parametrize("kind", LAYERS)
def test_mask_is_computed_once_while_nothing_changes(kind, alpha, monkeypatch):
    layer = _partly_pruned(kind, alpha)
    x = torch.randn(*INPUTS[kind])
    counter = _CountMasks(monkeypatch)
    with torch.no_grad():
        first = layer(x)
        for _ in range(5):
            assert torch.equal(layer(x), first)
    assert counter.calls == 1
    torch.testing.assert_close(first, _fresh(layer, x))


def _edit_weight(layer):
    with torch.no_grad():
        layer.weight.mul_(-1.5)


def _edit_variance(layer):
    with torch.no_grad():
        layer._raw_variance().add_(3.0)


def _optimizer_step(layer):
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(*INPUTS["linear" if isinstance(layer, sparsevd.SparseVDLinear) else
                            ("conv2d" if layer.dims == 2 else "conv1d-reflect")])
    layer(x).square().sum().backward()  # in eval mode, through the cached mask
    opt.step()


def _load_other(layer):
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.weight.normal_()
        other._raw_variance().normal_()
    layer.load_state_dict(other.state_dict())


def _threshold(layer):
    layer.threshold = -1.0


def _range(layer):
    layer.log_alpha_range = (-10.0, 1.0)


def _double(layer):
    layer.double()


def _freeze(layer):
    layer.freeze_mask()
    with torch.no_grad():
        layer.frozen_mask[0].logical_not_()


CHANGES = [_edit_weight, _edit_variance, _optimizer_step, _load_other, _threshold, _range, _double, _freeze]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("kind", LAYERS)
def test_output_is_fresh_after_every_change(kind, change):
    layer = _partly_pruned(kind)
    x = torch.randn(*INPUTS[kind])
    with torch.no_grad():
        before = layer(x)
    change(layer)
    x = x.to(layer.weight.dtype)
    with torch.no_grad():
        after = layer(x)
        want = _fresh(layer, x)
    assert not torch.equal(after.to(before.dtype), before), "the change must alter the output for this test to mean anything"
    torch.testing.assert_close(after, want)


def test_mode_switch_drops_the_cache():
    layer = _partly_pruned("linear")
    x = torch.randn(3, 11)
    layer(x)
    assert layer._eval_cache is not None
    layer.train()
    assert layer._eval_cache is None
    with torch.no_grad():
        layer.weight.data.mul_(2)  # .data bypasses version counters; the mode switch still refreshes
    layer.eval()
    torch.testing.assert_close(layer(x), _fresh(layer, x))


@pytest.mark.parametrize("kind", LAYERS)
def test_eval_gradients_flow_to_the_kept_weights(kind):
    layer = _partly_pruned(kind)
    x = torch.randn(*INPUTS[kind], requires_grad=True)
    layer(x).square().sum().backward()
    ref = copy.deepcopy(layer)
    ref.weight.grad = None
    xr = x.detach().clone().requires_grad_()
    _fresh(ref, xr).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad * ref.mask())
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_compile_never_sees_a_stale_cache(kind):
    layer = _partly_pruned(kind)
    x = torch.randn(*INPUTS[kind])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), _fresh(layer, x))
        layer.weight.mul_(-2)
        layer.threshold = 1.0
        torch.testing.assert_close(compiled(x), _fresh(layer, x))


def test_export_computes_the_mask_in_the_graph():
    layer = _partly_pruned("linear")
    x = torch.randn(3, 11)
    layer(x)  # a cache exists before export: it must not be baked in
    program = torch.export.export(layer, (x,))
    assert not program.constants, "the masked weight must not be a constant of the program"
    torch.testing.assert_close(program.module()(x), _fresh(layer, x))
    state = {k: v.clone() for k, v in program.state_dict.items()}
    state["weight"].mul_(-1)
    moved = copy.deepcopy(layer)
    moved.load_state_dict(state)
    program2 = torch.export.export(moved, (x,))
    torch.testing.assert_close(program2.module()(x), _fresh(moved, x))


def test_pickled_and_copied_layers_carry_no_cache():
    layer = _partly_pruned("linear")
    layer(torch.randn(2, 11))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded._eval_cache is None and copy.deepcopy(layer)._eval_cache is None


# ---- frozen masks (fine-tuning) ---------------------------------------------------------------


@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("kind", LAYERS)
def test_frozen_mask_keeps_pruned_weights_at_zero_through_training(kind, noise):
    layer = _partly_pruned(kind).train()
    mask = layer.mask().clone()
    assert 0 < mask.sum() < mask.numel()
    layer.freeze_mask(noise=noise)
    assert torch.equal(layer.weight[~mask], torch.zeros_like(layer.weight[~mask]))
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, weight_decay=0.1)  # moves θ even with zero gradient
    x = torch.randn(*INPUTS[kind])
    outputs = []
    for _ in range(3):
        y = layer(x)
        outputs.append(y.detach())
        y.square().mean().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            layer._raw_variance().add_(5.0)  # would prune everything if the mask followed log α
    assert torch.equal(layer.mask(), mask) and layer.kept_weights() == int(mask.sum())
    layer.eval()
    torch.testing.assert_close(layer(x), _fresh(layer, x))  # θ ⊙ frozen mask
    # without noise a training forward is the deterministic masked layer
    layer.train()
    with torch.no_grad():
        a, b = layer(x), layer(x)
    assert torch.equal(a, b) != noise


def test_frozen_mask_travels_with_the_state_dict():
    layer = _partly_pruned("linear").freeze_mask()
    fresh = sparsevd.SparseVDLinear(11, 7)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.frozen_mask, layer.frozen_mask)
    unfrozen = _partly_pruned("linear")
    layer.load_state_dict(unfrozen.state_dict())
    assert layer.frozen_mask is None and torch.equal(layer.mask(), unfrozen.mask())
    bad = fresh.state_dict()
    bad["frozen_mask"] = bad["frozen_mask"].float()
    with pytest.raises(RuntimeError, match="frozen_mask must be a bool tensor"):
        sparsevd.SparseVDLinear(11, 7).load_state_dict(bad)


def test_unfreeze_returns_to_the_threshold():
    layer = _partly_pruned("linear").freeze_mask()
    layer.threshold = -100.0
    assert layer.kept_weights() > 0
    layer.unfreeze_mask()
    assert layer.kept_weights() == 0
    assert torch.equal(layer.mask(), reference.prune_mask(layer.weight, layer.log_sigma2, -100.0))
