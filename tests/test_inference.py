"""FusedSequential and the linear_chain op: a sparsified network's chains of linear layers
and activations run as one op each, computing exactly what the modules compute; and the
deployment path, torch.export of a sparsified model loaded in a fresh process."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sparsevd
from conftest import run_python
from sparsevd import reference

ACTIVATIONS = [nn.ReLU(), nn.LeakyReLU(0.07), nn.ReLU6(), nn.ELU(0.8), nn.Tanh(), nn.Sigmoid(), nn.GELU(),
               nn.GELU(approximate="tanh"), nn.SiLU()]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=3e-2, atol=3e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}


def _sparse(out_features, in_features, density, seed, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * (torch.rand(out_features, in_features, generator=g)
                                                                < density)
    b = torch.randn(out_features, generator=g) if bias else None
    return sparsevd.SparseLinear.from_dense(w.to(dtype), None if b is None else b.to(dtype))


def _dense(out_features, in_features, seed, dtype=torch.float32, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


def _mlp(dtype=torch.float32, activations=(nn.ReLU(), nn.Tanh()), bias=True):
    return [nn.Flatten(), _sparse(29, 3 * 5 * 5, 0.1, 0, dtype, bias), activations[0], nn.Dropout(0.3),
            _dense(13, 29, 1, dtype, bias), nn.Identity(), activations[1], _sparse(7, 13, 0.5, 2, dtype, bias)]


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 5, 70])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_the_modules(dtype, batch, bias):
    modules = _mlp(dtype, bias=bias)
    plain, fused = nn.Sequential(*modules).eval(), sparsevd.FusedSequential(*modules).eval()
    x = torch.randn(batch, 3, 5, 5).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), **TOL[dtype])


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=repr)
def test_every_activation(activation):
    modules = [_sparse(17, 11, 0.3, 0), activation, _dense(6, 17, 1), activation]
    plain, fused = nn.Sequential(*modules).eval(), sparsevd.FusedSequential(*modules).eval()
    x = torch.randn(9, 11) * 3
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-6)


def test_one_op_per_chain():
    fused = sparsevd.FusedSequential(*_mlp()).eval()
    with torch.no_grad(), _CountOps() as ops:
        fused(torch.randn(2, 3, 5, 5))
    assert [n for n in ops.names if "linear" in n or "relu" in n or "tanh" in n] == ["sparsevd::linear_chain"]


def test_extra_dimensions_and_a_lone_layer():
    fused = sparsevd.FusedSequential(_sparse(5, 8, 0.5, 0)).eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), fused[0](x))


def test_autograd_and_training_run_the_modules():
    modules = _mlp()
    plain, fused = nn.Sequential(*modules), sparsevd.FusedSequential(*modules)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    fused.eval()(x).sum().backward()
    g = x.grad.clone()
    x.grad = None
    plain.eval()(x).sum().backward()
    torch.testing.assert_close(g, x.grad)
    torch.manual_seed(0)
    a = fused.train()(x)  # dropout is live in training mode
    torch.manual_seed(0)
    torch.testing.assert_close(a, plain.train()(x))


def test_the_raw_op_refuses_autograd():
    layer = _sparse(4, 6, 0.5, 0)
    x = torch.randn(3, 6, requires_grad=True)
    args = ([layer.values], [layer.crow_indices], [layer.col_indices], [layer.bias], [0], [0.0])
    with pytest.raises(RuntimeError, match="inference-only"):
        torch.ops.sparsevd.linear_chain(x, *args).sum().backward()


def test_a_replaced_child_is_planned_again():
    fused = sparsevd.FusedSequential(*_mlp()).eval()
    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        fused(x)
        fused[6] = nn.Sigmoid()
        torch.testing.assert_close(fused(x), nn.Sequential(*fused).eval()(x))


def test_inconsistent_shapes_are_reported_by_the_modules():
    fused = sparsevd.FusedSequential(_sparse(5, 8, 0.5, 0), nn.ReLU(), _sparse(3, 6, 0.5, 1)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"shape \[\*, 6\]"):
        fused(torch.randn(2, 8))
    with torch.no_grad(), pytest.raises(ValueError, match=r"shape \[\*, 8\]"):
        fused(torch.randn(2, 7))


def test_state_dict_and_repr_are_those_of_the_sequential():
    modules = _mlp()
    assert sparsevd.FusedSequential(*modules).state_dict().keys() == nn.Sequential(*modules).state_dict().keys()


def test_bad_chain_arguments():
    layer = _sparse(4, 6, 0.5, 0)
    x = torch.randn(3, 6)
    op = torch.ops.sparsevd.linear_chain
    with pytest.raises(Exception, match="one entry per layer"):
        op(x, [layer.values], [layer.crow_indices], [layer.col_indices], [layer.bias], [0, 1], [0.0])
    with pytest.raises(Exception, match="activation"):
        op(x, [layer.values], [layer.crow_indices], [layer.col_indices], [layer.bias], [42], [0.0])


def test_opcheck():
    layers = [_sparse(7, 6, 0.5, 0), _dense(5, 7, 1), _sparse(3, 5, 0.6, 2, bias=False)]
    args = (torch.randn(4, 6), [layers[0].values, layers[1].weight.detach(), layers[2].values],
            [layers[0].crow_indices, None, layers[2].crow_indices], [layers[0].col_indices, None, layers[2].col_indices],
            [layers[0].bias, layers[1].bias.detach(), None], [1, 5, 0], [0.0, 0.0, 0.0])
    torch.library.opcheck(torch.ops.sparsevd.linear_chain.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    want = reference.linear_chain(*args)
    torch.testing.assert_close(torch.ops.sparsevd.linear_chain(*args), want)


def _sparsified_lenet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), sparsevd.SparseVDLinear(64, 40), nn.ReLU(), sparsevd.SparseVDLinear(40, 20),
                          nn.ReLU(), sparsevd.SparseVDLinear(20, 10))
    with torch.no_grad():
        for layer in (model[1], model[3], model[5]):
            layer.log_sigma2.copy_(torch.randn_like(layer.log_sigma2) * 6 - 4)
    return model.eval(), sparsevd.sparsify(model.eval(), batch_size=1)


def test_sparsify_returns_fused_sequentials():
    model, fast = _sparsified_lenet()
    assert isinstance(fast, sparsevd.FusedSequential) and not fast.training
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_exported_sparsified_model_loads_in_a_fresh_process(tmp_path):
    model, fast = _sparsified_lenet()
    x = torch.randn(3, 1, 8, 8)
    program = torch.export.export(fast, (x,))
    path = tmp_path / "lenet.pt2"
    torch.export.save(program, path)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "want.pt")
    out = run_python(f"""
import torch, sparsevd
program = torch.export.load({str(path)!r})
x = torch.load({str(tmp_path / "x.pt")!r})
torch.testing.assert_close(program.module()(x), torch.load({str(tmp_path / "want.pt")!r}), rtol=1e-5, atol=1e-5)
print("ok")
""")
    assert out.strip() == "ok"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_replay_per_shape_and_follow_replaced_tensors():
    model, fast = _sparsified_lenet()
    model, fast = model.cuda(), fast.cuda()
    with torch.no_grad():
        for batch in (1, 4, 1):
            x = torch.randn(batch, 1, 8, 8, device="cuda")
            torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
        assert len(fast._graphs) == 2
        y = fast(x)
        x.mul_(2)  # the returned output is the caller's: later replays do not overwrite it
        fast(x)
        torch.testing.assert_close(y, model(x / 2), rtol=1e-5, atol=1e-5)
        state = {k: v.clone() * (2 if k.endswith("bias") else 1) for k, v in fast.state_dict().items()}
        fast.load_state_dict(state)  # replaces CSR buffers: a new capture, not stale memory
        torch.testing.assert_close(fast(x), nn.Sequential(*fast).eval()(x), rtol=1e-5, atol=1e-5)
