"""torch.ops.sparsevd: every op against the reference, opcheck, gradcheck, errors."""

import pytest
import torch

import sparsevd
from conftest import run_python
from sparsevd import dispatch, reference
from sparsevd import functional as F

pytestmark = pytest.mark.skipif(not dispatch.HAS_EXTENSION, reason="extension sparsevd._C not built")
ops = torch.ops.sparsevd
SHAPES = [(1, 1, 1), (5, 3, 7), (37, 45, 29)]


def _params(n, k, dtype=torch.float32, device="cpu", spread=3.0):
    w = torch.randn(n, k, dtype=dtype, device=device)
    s = (torch.randn(n, k, dtype=dtype, device=device) * spread - 6).to(dtype)
    return w, s


def _seed(value=1234):
    return torch.tensor(value, dtype=torch.int64)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_lrt_linear(m, k, n, bias, device):
    x = torch.randn(m, k, device=device, requires_grad=True)
    w, s = _params(n, k, device=device)
    w.requires_grad_()
    s.requires_grad_()
    b = torch.randn(n, device=device, requires_grad=True) if bias else None
    torch.library.opcheck(ops.lrt_linear, (x, w, s, b, _seed()))
    grad = torch.randn(m, n, device=device)
    std = reference.lrt_std(x.detach(), s.detach())
    torch.library.opcheck(
        ops.lrt_linear_backward, (grad, x.detach(), w.detach(), s.detach(), std, _seed(), [True, True, True, bias])
    )
    torch.library.opcheck(ops.lrt_noise, (x.detach(), w.detach(), _seed()))


@pytest.mark.parametrize("shape", [(1, 1), (37, 45), (300, 17)])
def test_opcheck_kl(shape, device):
    w, s = _params(*shape, device=device)
    torch.library.opcheck(ops.kl_divergence, (w.requires_grad_(), s.requires_grad_(), -10.0, 10.0))
    torch.library.opcheck(ops.kl_divergence_backward, (torch.tensor(1.5, device=device), w.detach(), s.detach(), -10.0, 10.0))


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_csr_linear(bias, device):
    dense = torch.randn(11, 13, device=device) * (torch.rand(11, 13, device=device) < 0.3)
    csr = dense.to_sparse_csr()
    x = torch.randn(5, 13, device=device, requires_grad=True)
    values = csr.values().clone().requires_grad_()
    b = torch.randn(11, device=device, requires_grad=True) if bias else None
    args = (x, csr.crow_indices().int(), csr.col_indices().int(), values, b)
    torch.library.opcheck(ops.csr_linear, args)
    torch.library.opcheck(ops.csr_linear, args + (F.rows_by_length(args[1]),))


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_lrt_op_matches_reference_with_same_noise(m, k, n, bias, device):
    torch.manual_seed(m + k + n)
    x = torch.randn(m, k, device=device, requires_grad=True)
    w, s = _params(n, k, device=device)
    w.requires_grad_()
    s.requires_grad_()
    b = torch.randn(n, device=device, requires_grad=True) if bias else None
    seed = _seed(99)
    y, std = ops.lrt_linear(x, w, s, b, seed)
    z = ops.lrt_noise(x, w, seed)
    ref = reference.lrt_linear(x, w, s, b, z)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, reference.lrt_std(x, s), rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    params = [x, w, s] + ([b] if bias else [])
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_lrt_gradcheck_float64(device):
    x = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    w, s = _params(3, 5, torch.float64, device)
    w.requires_grad_()
    s = (s * 0 - 1).requires_grad_()  # large noise so ∂log σ² is well conditioned
    b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda x, w, s, b: F.lrt_linear(x, w, s, b, seed=7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, s, b))


def test_kl_gradcheck_float64(device):
    w, s = _params(6, 7, torch.float64, device, spread=4.0)
    fn = lambda w, s: F.kl_divergence(w, s, (-10.0, 10.0))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w.requires_grad_(), s.requires_grad_()))


def test_csr_gradcheck_float64(device):
    dense = torch.randn(7, 9, dtype=torch.float64, device=device) * (torch.rand(7, 9, device=device) < 0.4)
    csr = dense.to_sparse_csr()
    crow, col = csr.crow_indices().int(), csr.col_indices().int()
    x = torch.randn(3, 9, dtype=torch.float64, device=device, requires_grad=True)
    v = csr.values().clone().requires_grad_()
    b = torch.randn(7, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: F.csr_linear(x, crow, col, v, b), (x, v, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (37, 45), (513, 129)])
def test_kl_kernel_matches_reference(shape, dtype, device):
    """The device's KL kernel (C++ on CPU) against the float64 reference, values and grads."""
    w, s = _params(*shape, device=device, spread=6.0)
    w[0, 0] = 1e-7  # log α clamped at the top
    s[-1, -1] = -60  # and at the bottom
    w, s = w.to(dtype), s.to(dtype)
    w64, s64 = w.double().clone().requires_grad_(), s.double().clone().requires_grad_()
    ref = reference.kl_divergence(w64, s64)
    ref.backward()
    wk, sk = w.clone().requires_grad_(), s.clone().requires_grad_()
    kl = ops.kl_divergence(wk, sk, -10.0, 10.0)
    kl.backward(torch.tensor(1.0, dtype=kl.dtype, device=device))
    assert kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(kl.item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    # gradients: flash-attention rule against autograd of the same-dtype reference
    wt, st = w.clone().requires_grad_(), s.clone().requires_grad_()
    reference.kl_divergence(wt, st).backward()
    for got, same, exact in ((wk.grad, wt.grad, w64.grad), (sk.grad, st.grad, s64.grad)):
        assert got.dtype == dtype
        err = (got.double() - exact).abs().max().item()
        base = (same.double() - exact).abs().max().item()
        assert err <= 2 * base + 1e-6 * exact.abs().max().item()


def test_kl_is_deterministic(device):
    w, s = _params(1000, 333, device=device)
    a = ops.kl_divergence(w, s, -10.0, 10.0)
    b = ops.kl_divergence(w, s, -10.0, 10.0)
    assert torch.equal(a, b)


def test_kl_same_bits_for_any_thread_count():
    w, s = _params(1000, 333)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.kl_divergence(w, s, -10.0, 10.0)
        torch.set_num_threads(2)
        two = ops.kl_divergence(w, s, -10.0, 10.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_kl_empty_and_noncontiguous(device):
    w, s = _params(0, 5, device=device)
    assert ops.kl_divergence(w, s, -10.0, 10.0).item() == 0
    w, s = _params(20, 30, device=device)
    wt, st = w.t(), s.t()
    assert not wt.is_contiguous()
    torch.testing.assert_close(F.kl_divergence(wt, st), reference.kl_divergence(wt, st))


def test_manual_seed_reproduces_lrt(device):
    x = torch.randn(6, 5, device=device)
    w, s = _params(4, 5, device=device)
    torch.manual_seed(3)
    a = F.lrt_linear(x, w, s)
    torch.manual_seed(3)
    b = F.lrt_linear(x, w, s)
    c = F.lrt_linear(x, w, s)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_lrt_noise_is_what_forward_used(device):
    x = torch.randn(2, 3, 5, device=device)
    w, s = _params(4, 5, device=device)
    b = torch.randn(4, device=device)
    y = F.lrt_linear(x, w, s, b, seed=42)
    z = F.lrt_noise(x, w, 42)
    assert z.shape == (2, 3, 4)
    torch.testing.assert_close(y, reference.lrt_linear(x, w, s, b, z))


def test_reference_backend_gives_same_numbers(tmp_path):
    """SPARSEVD_BACKEND=reference runs the reference math with the same noise for a seed."""
    x = torch.randn(6, 5, requires_grad=True)
    w, s = _params(4, 5)
    w.requires_grad_()
    torch.save((x.detach(), w.detach(), s), tmp_path / "inputs.pt")
    out = run_python(f"""
import torch, sparsevd
from sparsevd import functional as F
x, w, s = torch.load({str(tmp_path / "inputs.pt")!r})
x.requires_grad_()
y = F.lrt_linear(x, w, s, seed=5)
assert y.requires_grad
torch.save((y.detach(), F.kl_divergence(w, s)), {str(tmp_path / "outputs.pt")!r})
print(sparsevd.dispatch.describe())
""", SPARSEVD_BACKEND="reference")
    assert "lrt_linear: CPU -> reference, CUDA -> reference" in out
    y_ref, k_ref = torch.load(tmp_path / "outputs.pt")
    torch.testing.assert_close(F.lrt_linear(x, w, s, seed=5), y_ref)
    torch.testing.assert_close(F.kl_divergence(w, s), k_ref)


def test_unknown_backend_is_refused():
    with pytest.raises(AssertionError, match="SPARSEVD_BACKEND must be 'auto' or 'reference'"):
        run_python("import sparsevd", SPARSEVD_BACKEND="fast")


def test_lrt_saves_no_noise_for_backward():
    x = torch.randn(64, 32, requires_grad=True)
    w, s = _params(48, 32)
    w.requires_grad_()
    s.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        F.lrt_linear(x, w, s)
    big = [shape for shape in saved if shape == (64, 48)]
    assert len(big) <= 1, f"saved more than one [M, N] tensor: {saved}"


def test_lrt_empty_batch(device):
    x = torch.randn(0, 5, device=device, requires_grad=True)
    w, s = _params(4, 5, device=device)
    w.requires_grad_()
    y = F.lrt_linear(x, w, s)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_describe_names_the_kernels():
    text = dispatch.describe()
    assert "kl_divergence: CPU -> C++" in text
    assert sparsevd.functional is F


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, w, s: F.lrt_linear(x[:, :4], w, s), r"shape \[\*, 5\]"),
        (lambda x, w, s: F.lrt_linear(x.long(), w, s), "floating-point"),
        (lambda x, w, s: F.lrt_linear(x.double(), w, s), "dtype"),
        (lambda x, w, s: F.lrt_linear(x, w, s[:, :3]), "log_sigma2 must have the shape"),
        (lambda x, w, s: F.lrt_linear(x, w, s, torch.zeros(3)), r"bias must have shape \(4,\)"),
        (lambda x, w, s: F.lrt_linear(x, w, s, seed=torch.tensor(1.0)), "seed"),
        (lambda x, w, s: F.kl_divergence(w, s, (1.0, float("nan"))), "log_alpha_range"),
        (lambda x, w, s: F.kl_divergence(w, s.double()), "dtype"),
        (lambda x, w, s: F.kl_divergence(w.int(), s), "floating-point"),
    ],
)
def test_bad_input_is_named(call, message):
    x = torch.randn(3, 5)
    w, s = _params(4, 5)
    with pytest.raises((ValueError, TypeError), match=message):
        call(x, w, s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mismatched_devices_are_named():
    x = torch.randn(3, 5, device="cuda")
    w, s = _params(4, 5)
    with pytest.raises(ValueError, match="is on cuda"):
        F.lrt_linear(x, w, s)
