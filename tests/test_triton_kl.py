"""The Triton KL kernels against autograd of ``sparsevd.reference.kl_divergence``.

Runs on CUDA when there is a GPU, else on CPU tensors under the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1). Tolerance: flash-attention's rule against a
float64 reference (twice the error of the same-dtype torch computation, plus a small atol).
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from sparsevd import reference  # noqa: E402
from sparsevd.triton_kernels import kl  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
pytestmark = pytest.mark.gpu  # on a GPU machine every test here runs on CUDA

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # no tl.dot here: bf16 is fine interpreted
# (100, 113) spans many programs and (in the interpreter) a multi-step final sum
SHAPES = [(1,), (1, 1), (37, 45), (100, 113), (3, 5, 7, 2)]
RANGES = [(-10.0, 10.0), (-3.0, 5.0)]
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_fa(out, ref64, same_dtype, atol, name=""):
    assert out.shape == ref64.shape and out.dtype == same_dtype.dtype, (name, out.shape, out.dtype)
    if ref64.numel() == 0:
        return
    err = (out.double() - ref64).abs().max().item()
    base = (same_dtype.double() - ref64).abs().max().item()
    assert err <= 2 * base + atol, f"{name}: kernel error {err:.3e} vs same-dtype torch error {base:.3e} (atol {atol:.1e})"


def make_params(shape, dtype, seed=0):
    """θ ~ N(0, 1) with some exact zeros, and log σ² such that log α is uniform on
    [−15, 15]: beyond the default clamp (−10, 10) on both sides."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    w[torch.rand(shape, generator=gen) < 0.05] = 0.0
    la = torch.rand(shape, generator=gen) * 30 - 15
    ls = la + torch.log(w * w + 1e-8)
    return w.to(DEVICE, dtype), ls.to(DEVICE, dtype)


def reference_grads(w, ls, lo, hi, grad, dtype):
    wr = w.detach().to(dtype).requires_grad_()
    lr = ls.detach().to(dtype).requires_grad_()
    out = reference.kl_divergence(wr, lr, (lo, hi))
    out.backward(grad.to(out.dtype))
    return out.detach(), wr.grad, lr.grad


@pytest.mark.parametrize("lo_hi", RANGES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(dtype, shape, lo_hi):
    lo, hi = lo_hi
    w, ls = make_params(shape, dtype)
    raw = ls.double() - torch.log(w.double() ** 2 + 1e-8)
    if w.numel() > 100:
        assert (raw < lo).any() and (raw > hi).any()  # the clamp is exercised on both sides
    out = kl.kl_forward(w, ls, lo, hi)
    assert out.dtype == torch.float32 and out.dim() == 0
    ref64 = reference.kl_divergence(w.double(), ls.double(), (lo, hi))
    same = reference.kl_divergence(w, ls, (lo, hi))  # upcasts to fp32, like the kernel
    assert_fa(out, ref64, same, 1e-6 * max(1.0, ref64.abs().item()) + 1e-6, "kl")


@pytest.mark.parametrize("lo_hi", RANGES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_reference(dtype, shape, lo_hi):
    lo, hi = lo_hi
    w, ls = make_params(shape, dtype, seed=1)
    grad = torch.tensor(0.37, device=DEVICE)
    dw, dls = kl.kl_backward(grad, w, ls, lo, hi)
    _, dw64, dls64 = reference_grads(w, ls, lo, hi, grad, torch.float64)
    _, dw_same, dls_same = reference_grads(w, ls, lo, hi, grad, dtype)
    for name, got, r64, rsame in (("dweight", dw, dw64, dw_same), ("dlog_sigma2", dls, dls64, dls_same)):
        assert_fa(got, r64, rsame, ATOL[dtype] * max(1.0, r64.abs().max().item()), name)
    # outside the clamp the gradient is exactly zero
    raw = ls.double() - torch.log(w.double() ** 2 + 1e-8)
    outside = (raw < lo - 1e-3) | (raw > hi + 1e-3)
    assert torch.count_nonzero(dls[outside]) == 0 and torch.count_nonzero(dw[outside]) == 0


def test_clamp_boundary_is_inclusive():
    # The kernels pass the gradient where lo ≤ raw log α ≤ hi (torch.clamp's backward up to
    # ~2.12, with scalar bounds). Newer torch gives 0 exactly at the bounds (pytorch#184572),
    # so at the bounds compare with the reference evaluated on a wider range instead.
    # θ = 1: θ² + 1e-8 rounds to 1 in fp32, so raw log α = log σ² exactly.
    ls = torch.tensor([-10.0, 10.0, -10.5, 10.5, 0.0, -3.0, 5.0, 4.0], device=DEVICE)
    w = torch.ones_like(ls)
    one = torch.tensor(1.0, device=DEVICE)
    for lo, hi in RANGES:
        dw, dls = kl.kl_backward(one, w, ls, lo, hi)
        _, dw_ref, dls_ref = reference_grads(w, ls, lo, hi, one, torch.float32)
        _, dw_wide, dls_wide = reference_grads(w, ls, lo - 1, hi + 1, one, torch.float32)
        at_bound = (ls == lo) | (ls == hi)
        inside = (ls > lo) & (ls < hi)
        assert at_bound.any() and inside.any()
        torch.testing.assert_close(dls[~at_bound], dls_ref[~at_bound], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(dw[~at_bound], dw_ref[~at_bound], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(dls[at_bound], dls_wide[at_bound], rtol=1e-5, atol=1e-7)
        assert bool((dls[inside | at_bound] != 0).all())
        assert torch.count_nonzero(dls[~(inside | at_bound)]) == 0


def test_deterministic():
    w, ls = make_params((100, 113), torch.float32, seed=2)
    grad = torch.tensor(1.5, device=DEVICE)
    a = kl.kl_forward(w, ls, -10, 10)
    b = kl.kl_forward(w, ls, -10, 10)
    assert torch.equal(a, b)
    ga, gb = kl.kl_backward(grad, w, ls, -10, 10), kl.kl_backward(grad, w, ls, -10, 10)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    fa, fb = kl.kl_forward_backward(w, ls, -10, 10), kl.kl_forward_backward(w, ls, -10, 10)
    assert all(torch.equal(x, y) for x, y in zip(fa, fb))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_fused(dtype):
    w, ls = make_params((37, 45), dtype, seed=3)
    total, dw, dls = kl.kl_forward_backward(w, ls, -10, 10)
    assert torch.equal(total, kl.kl_forward(w, ls, -10, 10))
    one = torch.tensor(1.0, device=DEVICE)
    for got, want in zip((dw, dls), kl.kl_backward(one, w, ls, -10, 10)):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    _, dw4, dls4 = kl.kl_forward_backward(w, ls, -10, 10, grad_scale=0.25)
    quarter = torch.tensor(0.25, device=DEVICE)
    for got, want in zip((dw4, dls4), kl.kl_backward(quarter, w, ls, -10, 10)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_grad_tensor_dtypes_and_shapes():
    w, ls = make_params((37, 45), torch.float32, seed=4)
    base = kl.kl_backward(torch.tensor(0.5, device=DEVICE), w, ls, -10, 10)
    for grad in (torch.tensor(0.5, dtype=torch.float64, device=DEVICE), torch.tensor([0.5], device=DEVICE),
                 torch.tensor(0.5, dtype=torch.bfloat16, device=DEVICE)):  # fmt: skip
        for got, want in zip(kl.kl_backward(grad, w, ls, -10, 10), base):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError):
        kl.kl_backward(torch.ones(2, device=DEVICE), w, ls, -10, 10)


def test_mixed_parameter_dtypes():
    w, ls = make_params((37, 45), torch.float32, seed=5)
    dw, dls = kl.kl_backward(torch.tensor(1.0, device=DEVICE), w.half(), ls, -10, 10)
    assert dw.dtype == torch.float16 and dls.dtype == torch.float32


def test_non_contiguous():
    w, ls = make_params((45, 37), torch.float32, seed=6)
    wt, lst = w.t(), ls.t()
    assert not wt.is_contiguous()
    assert torch.equal(kl.kl_forward(wt, lst, -10, 10), kl.kl_forward(wt.contiguous(), lst.contiguous(), -10, 10))
    g = torch.tensor(1.0, device=DEVICE)
    dw, dls = kl.kl_backward(g, wt, lst, -10, 10)
    assert dw.shape == wt.shape
    for got, want in zip((dw, dls), kl.kl_backward(g, wt.contiguous(), lst.contiguous(), -10, 10)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty(dtype):
    w = torch.empty(0, 5, device=DEVICE, dtype=dtype)
    out = kl.kl_forward(w, w, -10, 10)
    assert out.dtype == torch.float32 and out.dim() == 0 and out.item() == 0.0
    dw, dls = kl.kl_backward(torch.tensor(1.0, device=DEVICE), w, w, -10, 10)
    assert dw.shape == (0, 5) and dls.shape == (0, 5) and dw.dtype == dtype
    total, dw, dls = kl.kl_forward_backward(w, w, -10, 10)
    assert total.item() == 0.0 and dw.shape == (0, 5)


def test_input_checks():
    w, ls = make_params((4, 5), torch.float32)
    with pytest.raises(ValueError):
        kl.kl_forward(w, ls[:, :4], -10, 10)
    with pytest.raises(TypeError):
        kl.kl_forward(w.double(), ls.double(), -10, 10)


def test_known_values():
    # θ = 1 so la = log σ²: la = 0 → KL = k1(1 − sigmoid(k2)) + ½·log 2 ≈ 0.4317;
    # la = 12 → clamped to 10 → KL ≈ 2.27e-5 (fp32 cancellation in k1 − k1·σ: abs error)
    k1, k2, k3 = reference.K1, reference.K2, reference.K3
    w = torch.ones(1, device=DEVICE)
    for ls, la in ((0.0, 0.0), (12.0, 10.0), (-3.0, -3.0)):
        out = kl.kl_forward(w, torch.full((1,), ls, device=DEVICE), -10, 10).item()
        want = k1 - k1 / (1 + math.exp(-(k2 + k3 * la))) + 0.5 * math.log1p(math.exp(-la))
        assert out == pytest.approx(want, rel=1e-5, abs=1e-7)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_large(dtype):
    # > 1024 partials: a multi-step final sum with the GPU block sizes
    w, ls = make_params((1000, 3001), dtype, seed=7)
    out = kl.kl_forward(w, ls, -10, 10)
    ref64 = reference.kl_divergence(w.double(), ls.double())
    assert_fa(out, ref64, reference.kl_divergence(w, ls), 1e-6 * ref64.abs().item(), "kl")
    assert torch.equal(out, kl.kl_forward(w, ls, -10, 10))
    grad = torch.tensor(0.37, device=DEVICE)
    dw, dls = kl.kl_backward(grad, w, ls, -10, 10)
    _, dw64, dls64 = reference_grads(w, ls, -10, 10, grad, torch.float64)
    _, dw_same, dls_same = reference_grads(w, ls, -10, 10, grad, dtype)
    assert_fa(dw, dw64, dw_same, ATOL[dtype] * dw64.abs().max().item(), "dweight")
    assert_fa(dls, dls64, dls_same, ATOL[dtype] * dls64.abs().max().item(), "dlog_sigma2")


def test_config_changes_only_the_summation_order():
    # the bench sweeps (elements per program, warps): gradients are elementwise, identical;
    # the sum's tree changes with the block, its value within rounding
    w, ls = make_params((100, 113), torch.float32, seed=8)
    total, dw, dls = kl.kl_forward_backward(w, ls, -10, 10)
    for config in ((128, 4), (512, 8)):
        t2, dw2, dls2 = kl.kl_forward_backward(w, ls, -10, 10, config=config)
        assert torch.equal(dw2, dw) and torch.equal(dls2, dls)
        torch.testing.assert_close(t2, total, rtol=1e-6, atol=0)
