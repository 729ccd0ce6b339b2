"""FusedSequential fuses a module only when it computes exactly what the fused op computes
(sparsevd.plain.runs_as: exact type, no hooks, no parametrization); everything else runs as
itself and the chain splits around it. Each case of issue 25 is compared to the same modules
called one by one, as a FusedSequential and through sparsify()."""

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import sparsevd
from sparsevd import inference

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _sparse(out_features, in_features, seed, cls=sparsevd.SparseLinear):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * (torch.rand(out_features, in_features, generator=g) < 0.4)
    return cls.from_dense(w, torch.randn(out_features, generator=g))


def _linear(out_features, in_features, seed, cls=nn.Linear):
    torch.manual_seed(seed)
    return cls(in_features, out_features)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2 + 1


class ScaledSparse(sparsevd.SparseLinear):
    def forward(self, x):
        return super().forward(x) * 2 + 1


class NoisyIdentity(nn.Identity):
    def forward(self, x):
        return x + 3


class HalvingDropout(nn.Dropout):
    def forward(self, x):
        return x / 2


class ShiftedReLU(nn.ReLU):
    def forward(self, x):
        return super().forward(x) - 1


def _check(modules, x=None, fused_layers=None):
    """FusedSequential(modules) in eval mode against the modules called one by one; the
    number of layers the chains hold, if given."""
    plain, fused = nn.Sequential(*modules).eval(), sparsevd.FusedSequential(*modules).eval()
    x = torch.randn(5, modules[0].in_features) * 3 if x is None else x
    with torch.no_grad():
        want = plain(x)
        for _ in range(2):  # the first call plans and binds, the second reuses
            torch.testing.assert_close(fused(x), want, **TOL)
    if fused_layers is not None:
        assert sum(len(s.layers) for s in fused._steps() if isinstance(s, inference._Chain)) == fused_layers
    return fused, plain, x


@pytest.mark.parametrize("odd", [
    lambda: _linear(9, 7, 1, ScaledLinear),
    lambda: _sparse(9, 7, 1, ScaledSparse),
], ids=["nn.Linear subclass", "SparseLinear subclass"])
def test_linear_subclasses_run_as_themselves(odd):
    _check([_sparse(7, 6, 0), nn.ReLU(), odd(), nn.Tanh(), _linear(4, 9, 2)], fused_layers=2)


@pytest.mark.parametrize("odd", [NoisyIdentity, lambda: HalvingDropout(0.5), ShiftedReLU],
                         ids=["Identity subclass", "Dropout subclass", "ReLU subclass"])
def test_identity_dropout_and_activation_subclasses_split_the_chain(odd):
    _check([_sparse(7, 6, 0), odd(), _linear(5, 7, 1), nn.ReLU(), _sparse(4, 5, 2)], fused_layers=3)


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "forward_with_kwargs"])
@pytest.mark.parametrize("target", [0, 2, 3], ids=["SparseLinear", "nn.Linear", "activation"])
@pytest.mark.parametrize("when", ["before", "after"], ids=["hooked before the first call", "hooked after it"])
def test_hooks_are_run(kind, target, when):
    modules = [_sparse(7, 6, 0), nn.ReLU(), _linear(5, 7, 1), nn.GELU(), _sparse(4, 5, 2)]
    fused = sparsevd.FusedSequential(*modules).eval()
    calls = []

    def hook(module, *args):
        calls.append(module)
        if kind == "forward_pre":
            return (args[0][0] * 2,)
        return args[-1] + 0.5

    def register():
        m = modules[target]
        if kind == "forward_pre":
            return m.register_forward_pre_hook(hook)
        return m.register_forward_hook(hook, with_kwargs=kind == "forward_with_kwargs")

    x = torch.randn(3, 6)
    with torch.no_grad():
        if when == "after":
            fused(x)
        handle = register()
        want = nn.Sequential(*modules).eval()(x)
        calls.clear()
        torch.testing.assert_close(fused(x), want, **TOL)
        assert calls == [modules[target]]
        handle.remove()  # hook gone: fused again, and right
        torch.testing.assert_close(fused(x), nn.Sequential(*modules).eval()(x), **TOL)


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_global_hooks_are_run(kind):
    modules = [_sparse(7, 6, 0), nn.ReLU(), _linear(5, 7, 1)]
    fused = sparsevd.FusedSequential(*modules).eval()
    x = torch.randn(3, 6)
    seen = []
    register = (nn.modules.module.register_module_forward_hook if kind == "forward"
                else nn.modules.module.register_module_forward_pre_hook)
    with torch.no_grad():
        fused(x)
        handle = register(lambda module, *args: seen.append(type(module)))
        try:
            fused(x)
        finally:
            handle.remove()
    assert seen.count(sparsevd.SparseLinear) == 1 and seen.count(nn.Linear) == 1 and nn.ReLU in seen


@pytest.mark.parametrize("wrap", [
    lambda m: parametrizations.weight_norm(m),
    lambda m: torch.nn.utils.weight_norm(m),
    lambda m: parametrizations.spectral_norm(m),
    lambda m: torch.nn.utils.spectral_norm(m),
    lambda m: parametrize.register_parametrization(m, "bias", _Doubled()),
], ids=["weight_norm", "legacy weight_norm", "spectral_norm", "legacy spectral_norm", "bias parametrization"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_parametrized_linears_run_as_themselves(wrap, when):
    modules = [_sparse(7, 6, 0), nn.ReLU(), _linear(5, 7, 1), nn.Tanh(), _sparse(4, 5, 2)]
    fused = sparsevd.FusedSequential(*modules).eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        if when == "after":
            fused(x)
        wrap(modules[2])
        for m in modules:
            m.eval()
        want = nn.Sequential(*modules).eval()(x)
        for _ in range(2):
            torch.testing.assert_close(fused(x), want, **TOL)


class _Doubled(nn.Module):
    def forward(self, b):
        return b * 2


def test_a_forward_assigned_on_the_instance_is_run():
    modules = [_sparse(7, 6, 0), nn.ReLU(), _linear(5, 7, 1)]
    fused = sparsevd.FusedSequential(*modules).eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        fused(x)
        modules[1].forward = lambda v: v * 3
        torch.testing.assert_close(fused(x), nn.Sequential(*modules)(x), **TOL)


def test_a_dropout_switched_to_training_drops():
    modules = [_sparse(7, 6, 0), nn.Dropout(0.5), _linear(5, 7, 1)]
    fused = sparsevd.FusedSequential(*modules).eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        fused(x)
        modules[1].train()
        torch.manual_seed(0)
        got = fused(x)
        torch.manual_seed(0)
        torch.testing.assert_close(got, nn.Sequential(*modules)(x), **TOL)


def test_a_flatten_whose_dims_change_is_run_as_itself():
    modules = [nn.Flatten(), _linear(5, 8, 1)]
    fused = sparsevd.FusedSequential(*modules).eval()
    x = torch.randn(3, 1, 8)
    with torch.no_grad():
        assert fused(x).shape == (3, 5)
        modules[0].start_dim = 2  # now it keeps the middle dimension
        torch.testing.assert_close(fused(x), nn.Sequential(*modules)(x), **TOL)
    assert fused(x).shape == (3, 1, 5)


@pytest.mark.parametrize("change", [
    (nn.GELU(), "approximate", "tanh"),
    (nn.LeakyReLU(0.1), "negative_slope", 0.3),
    (nn.ELU(1.0), "alpha", 0.4),
], ids=lambda c: type(c[0]).__name__ if isinstance(c, tuple) else str(c))
def test_activation_settings_changed_after_the_first_call_are_read(change):
    activation, name, value = change
    modules = [_sparse(7, 6, 0), activation, _linear(5, 7, 1)]
    fused = sparsevd.FusedSequential(*modules).eval()
    x = torch.randn(9, 6) * 3
    with torch.no_grad():
        before = fused(x)
        setattr(activation, name, value)
        after = fused(x)
        torch.testing.assert_close(after, nn.Sequential(*modules)(x), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(before, after, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("activation", [nn.LeakyReLU(0), nn.ELU(1), nn.LeakyReLU(0.2)], ids=repr)
def test_equal_activation_settings_do_not_rebind(activation):
    fused = sparsevd.FusedSequential(_sparse(7, 6, 0), activation, _linear(5, 7, 1)).eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        fused(x)
        chain = fused._steps()[0]
        bound = chain._bound[2]
        name = "negative_slope" if isinstance(activation, nn.LeakyReLU) else "alpha"
        setattr(activation, name, type(getattr(activation, name))(getattr(activation, name)) + 0)  # a new, equal value
        fused(x)
        fused(x)
        assert chain._bound[2] is bound


def test_inplace_activations_fuse_and_match():
    _check([_sparse(7, 6, 0), nn.ReLU(inplace=True), _linear(5, 7, 1), nn.LeakyReLU(0.1, inplace=True),
                          _sparse(4, 5, 2)], fused_layers=3)


def _sparsevd_mlp(odd):
    """A SparseVD MLP with the odd module ``odd`` between its layers, some weights pruned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), sparsevd.SparseVDLinear(12, 9), nn.ReLU(), odd, nn.GELU(),
                          sparsevd.SparseVDLinear(9, 4))
    with torch.no_grad():
        for layer in (model[1], model[5]):
            layer.log_sigma2.copy_(torch.randn_like(layer.log_sigma2) * 6 - 4)
    return model.eval()


@pytest.mark.parametrize("odd", [
    lambda: _linear(9, 9, 3, ScaledLinear),
    lambda: NoisyIdentity(),
    lambda: HalvingDropout(0.2),
    lambda: parametrizations.weight_norm(_linear(9, 9, 3)),
    lambda: parametrizations.spectral_norm(_linear(9, 9, 3)).eval(),
    lambda: _hooked(_linear(9, 9, 3)),
], ids=["Linear subclass", "Identity subclass", "Dropout subclass", "weight_norm", "spectral_norm",
        "hooked Linear"])
@pytest.mark.parametrize("cost_model", [None, "csr"])
def test_sparsify_of_models_that_contain_them(odd, cost_model, csr_cost_model):
    model = _sparsevd_mlp(odd())
    fast = sparsevd.sparsify(model, cost_model=csr_cost_model if cost_model else None)
    assert isinstance(fast, sparsevd.FusedSequential)
    x = torch.randn(6, 3, 4)
    with torch.no_grad():
        want = model(x)
        for _ in range(2):
            torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nn.Sequential(*fast).eval()(x), want, rtol=1e-5, atol=1e-5)


def test_sparsify_of_a_legacy_weight_norm_model_is_torchs_deepcopy_error():
    # the legacy weight_norm holds a computed (non-leaf) weight, which torch cannot deep-copy
    model = _sparsevd_mlp(torch.nn.utils.weight_norm(_linear(9, 9, 3)))
    with pytest.raises(RuntimeError, match="weight_norm"):
        sparsevd.sparsify(model)


def _hooked(module):
    module.register_forward_hook(_add_one)
    return module


def _add_one(module, args, output):
    return output + 1


@pytest.fixture
def csr_cost_model():
    """A cost model under which every layer is CSR."""
    cost = sparsevd.CostModel()
    return sparsevd.CostModel(cpu=dataclasses.replace(cost.cpu, dense_overhead_s=math.inf),
                              cuda=dataclasses.replace(cost.cuda, dense_overhead_s=math.inf))


def test_sparsify_does_not_cut_units_into_an_nn_linear_subclass():
    torch.manual_seed(0)
    model = nn.Sequential(sparsevd.SparseVDLinear(12, 9), nn.ReLU(), _linear(4, 9, 1, ScaledLinear)).eval()
    with torch.no_grad():
        model[0].log_sigma2.fill_(-10)
        model[0].log_sigma2[:4] = 20  # 4 dead output units, which the next layer's input could lose
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(sparsevd.sparsify(model)(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("subclass_first", [True, False])
def test_sparsify_folds_sbp_only_into_plain_layers(subclass_first):
    torch.manual_seed(0)
    first, second = (ScaledLinear, nn.Linear) if subclass_first else (nn.Linear, ScaledLinear)
    sbp = sparsevd.SBPDropout(7)
    with torch.no_grad():
        sbp.mu.uniform_(0.5, 2.0)
        sbp.log_sigma[:3] = 3.0  # SNR < 1: pruned, scale 0; the others scale by E[θ] ≠ 1
    model = nn.Sequential(_linear(7, 9, 1, first), sbp, nn.ReLU(), _linear(4, 7, 2, second)).eval()
    x = torch.randn(5, 9)
    with torch.no_grad():
        torch.testing.assert_close(sparsevd.sparsify(model)(x), model(x), rtol=1e-5, atol=1e-5)
