"""lrt_sample, the LRT's sampling step for any layer (y = mean + sqrt(var + 1e-8) ⊙ z):
the op on every device, its Triton kernels (interpreter on CPU, real on CUDA) and the
reference-path fallback, all against ``sparsevd.reference.lrt_sample``."""

import pytest
import torch

from conftest import run_python
from sparsevd import dispatch, reference
from sparsevd import functional as F

SHAPES = [(1,), (7, 13), (3, 5, 11), (2, 3, 9, 7)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=g).to(device, dtype)
    var = (torch.rand(shape, generator=g) * 2).to(device, dtype)  # ≥ 0, like conv(x², σ²)
    return mean, var


def _assert_near(out, ref, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_with_same_noise(shape, dtype, device):
    mean, var = _inputs(shape, dtype, device)
    mean.requires_grad_()
    var.requires_grad_()
    y = F.lrt_sample(mean, var, seed=77)
    z = F.lrt_sample_noise(mean, 77)
    assert z.dtype == torch.float32 and z.shape == mean.shape
    assert y.shape == mean.shape and y.dtype == dtype

    m64, v64 = (t.detach().double().requires_grad_() for t in (mean, var))
    ref = reference.lrt_sample(m64, v64, z.double())
    _assert_near(y.detach(), ref.detach(), dtype)

    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    dm, dv = torch.autograd.grad(y, (mean, var), grad)
    rm, rv = torch.autograd.grad(ref, (m64, v64), grad.double())
    _assert_near(dm, rm, dtype)
    _assert_near(dv, rv, dtype)


def test_noise_is_lrt_linear_noise(device):
    # one noise stream: an [M, N] sample draws what lrt_linear draws for the same seed
    x = torch.randn(6, 5, device=device)
    w = torch.randn(9, 5, device=device)
    mean = torch.empty(6, 9, device=device)
    assert torch.equal(F.lrt_sample_noise(mean, 5), F.lrt_noise(x, w, 5))


def test_noise_statistics(device):
    mean = torch.zeros(256, 257, device=device)
    z = F.lrt_sample_noise(mean, 11).double()
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1) < 0.02
    flat = z.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.01
    other = F.lrt_sample_noise(mean, 12).double().flatten()
    assert abs(torch.corrcoef(torch.stack([flat, other]))[0, 1].item()) < 0.01


def test_seed_reproduces_and_generator_draws(device):
    mean, var = _inputs((4, 6), torch.float32, device)
    torch.manual_seed(3)
    a = F.lrt_sample(mean, var)
    torch.manual_seed(3)
    b = F.lrt_sample(mean, var)
    c = F.lrt_sample(mean, var)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_non_contiguous_and_empty(device):
    mean, var = _inputs((5, 8), torch.float32, device)
    y = F.lrt_sample(mean.t(), var.t(), seed=4)
    z = F.lrt_sample_noise(mean.t(), 4)
    torch.testing.assert_close(y, reference.lrt_sample(mean.t(), var.t(), z))
    empty = torch.empty(0, 3, device=device, requires_grad=True)
    out = F.lrt_sample(empty, empty.detach(), seed=1)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert empty.grad.shape == (0, 3)


def test_saves_no_noise():
    mean, var = _inputs((64, 48), torch.float32, "cpu")
    mean.requires_grad_()
    var.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        F.lrt_sample(mean, var)
    assert sum(shape == (64, 48) for shape in saved) <= 1, saved


def test_reference_backend_gives_same_numbers(tmp_path):
    mean, var = _inputs((7, 5), torch.float32, "cpu")
    torch.save((mean.detach(), var.detach()), tmp_path / "inputs.pt")
    run_python(f"""
import torch
from sparsevd import functional as F
mean, var = torch.load({str(tmp_path / "inputs.pt")!r})
torch.save((F.lrt_sample(mean, var, seed=9), F.lrt_sample_noise(mean, 9)), {str(tmp_path / "outputs.pt")!r})
""", SPARSEVD_BACKEND="reference")
    y_ref, z_ref = torch.load(tmp_path / "outputs.pt")
    torch.testing.assert_close(F.lrt_sample(mean, var, seed=9), y_ref)
    torch.testing.assert_close(F.lrt_sample_noise(mean, 9), z_ref)


@pytest.mark.skipif(not dispatch.HAS_EXTENSION, reason="extension sparsevd._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 5)], ids=str)
def test_opcheck(shape, dtype, device):
    mean, var = _inputs(shape, dtype, device)
    mean, var = mean.transpose(0, 1), var.transpose(0, 1)  # outputs are contiguous all the same
    seed = torch.tensor(3, dtype=torch.int64)
    torch.library.opcheck(torch.ops.sparsevd.lrt_sample, (mean.requires_grad_(), var.requires_grad_(), seed))
    torch.library.opcheck(torch.ops.sparsevd.lrt_sample_backward, (mean.detach(), var.detach() + 1, seed))
    torch.library.opcheck(torch.ops.sparsevd.lrt_sample_noise, (mean.detach(), seed))


def test_gradcheck_float64(device):
    mean, var = _inputs((3, 4), torch.float64, device)
    var = var + 0.5  # away from the sqrt's kink at 0
    torch.autograd.gradcheck(
        lambda m, v: F.lrt_sample(m, v, seed=8), (mean.requires_grad_(), var.requires_grad_())
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, v: F.lrt_sample(m, v[:, :2]), "var must have the shape of mean"),
        (lambda m, v: F.lrt_sample(m, v.double()), "dtype"),
        (lambda m, v: F.lrt_sample(m.long(), v), "floating-point"),
        (lambda m, v: F.lrt_sample(m, "v"), "torch.Tensor"),
        (lambda m, v: F.lrt_sample(m, v, seed=torch.tensor([1, 2])), "seed"),
    ],
)
def test_bad_input_is_named(call, message):
    mean, var = _inputs((3, 4), torch.float32, "cpu")
    with pytest.raises((ValueError, TypeError), match=message):
        call(mean, var)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mismatched_devices_are_named():
    mean, var = _inputs((3, 4), torch.float32, "cpu")
    with pytest.raises(ValueError, match="is on"):
        F.lrt_sample(mean.cuda(), var)


# --- the Triton kernels themselves (CPU tensors run them in the interpreter) ---------------

triton_lrt = pytest.importorskip("sparsevd.triton_kernels.lrt")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (37, 29), (3, 1031)], ids=str)
def test_triton_sample_kernels(shape, dtype):
    mean, var = _inputs(shape, dtype, TRITON_DEVICE)
    inputs = mean.clone(), var.clone()
    y, s = triton_lrt.lrt_sample(mean, var, 1234)
    assert torch.equal(mean, inputs[0]) and torch.equal(var, inputs[1])  # the launcher samples out of place
    z = triton_lrt.lrt_noise(1, mean.numel(), 1234, TRITON_DEVICE).view(shape)
    ref_s = torch.sqrt(var.double() + reference.EPS)
    _assert_near(s, ref_s, dtype)
    _assert_near(y, reference.lrt_sample(mean.double(), var.double(), z.double()), dtype)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(TRITON_DEVICE, dtype)
    h = triton_lrt.lrt_sample_backward(grad, s, 1234)
    _assert_near(h, grad.double() * z.double() / (2 * s.double()), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["cublas", "fused"])
def test_triton_sample_noise_matches_forward_kernel(route):
    # both LRT routes and lrt_sample draw from one stream
    M, K, N = 9, 7, 13
    g = torch.Generator().manual_seed(0)
    x, w, ls = (torch.randn(r, c, generator=g).to(TRITON_DEVICE) for r, c in ((M, K), (N, K), (N, K)))
    y, s = triton_lrt.lrt_forward(x, w, ls - 3, None, 99, route=route)
    mean = y - s * triton_lrt.lrt_noise(M, N, 99, TRITON_DEVICE)
    y2, _ = triton_lrt.lrt_sample(mean, (s * s - reference.EPS).clamp_min(0), 99)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_triton_sample_input_checks():
    mean, var = _inputs((3, 4), torch.float32, TRITON_DEVICE)
    with pytest.raises(ValueError, match="differ in shape"):
        triton_lrt.lrt_sample(mean, var[:, :2], 1)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        triton_lrt.lrt_sample(mean.double(), var.double(), 1)


def test_compiles_fullgraph():
    mean, var = _inputs((5, 6), torch.float32, "cpu")
    mean.requires_grad_()
    var.requires_grad_()

    def f(m, v):
        return F.lrt_sample(m, v, seed=torch.tensor(3)).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(mean, var), (mean, var))
    want = torch.autograd.grad(f(mean, var), (mean, var))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
