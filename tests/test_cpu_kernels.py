"""The C++ CPU kernels (csrc/cpu/kl_divergence.cpp, lrt_linear.cpp; csr_linear.cpp and
linear_chain.cpp on every instruction set, the rest in their own test files) against the reference:
values and gradients per dtype, odd / tiny / empty / non-contiguous shapes, 1 and 2
threads, NaN propagation, every instruction-set path, and the bit-exact noise."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sparsevd import dispatch, noise, reference
from sparsevd.backends import default
from sparsevd import functional as F

pytestmark = pytest.mark.skipif(not dispatch.HAS_EXTENSION, reason="extension sparsevd._C not built")
ops = torch.ops.sparsevd

KL_SHAPES = [(1, 1), (1, 7), (3, 5), (17, 33), (3, 4099), (300, 784)]  # tails, chunk edges
HALF = [torch.float16, torch.bfloat16]


@pytest.fixture
def threads():
    """Run a test body under a given torch thread count, restoring it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _params(n, k, dtype=torch.float32, spread=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    s = torch.randn(n, k, generator=g, dtype=torch.float64) * spread - 6
    if w.numel() >= 2:
        w.view(-1)[0] = 1e-7  # log α far above the top of the clamp
        s.view(-1)[-1] = -60  # and far below the bottom
    return w.to(dtype), s.to(dtype)


def _reference_kl(w, s, lo=-10.0, hi=10.0, grad=1.0):
    """(Σ KL, ∂θ, ∂log σ²) by autograd of the reference, at the inputs' dtype."""
    w = w.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    kl = reference.kl_divergence(w, s, (lo, hi))
    dw, ds = torch.autograd.grad(kl, (w, s), torch.tensor(grad, dtype=kl.dtype))
    return kl.detach(), dw, ds


def _assert_grads_fa(got, w, s, lo=-10.0, hi=10.0, grad=1.0):
    """flash-attention rule against float64: within 2× the error of torch in the same dtype."""
    _, dw64, ds64 = _reference_kl(w.double(), s.double(), lo, hi, grad)
    _, dw_same, ds_same = _reference_kl(w, s, lo, hi, grad)
    for g, same, exact in zip(got, (dw_same, ds_same), (dw64, ds64)):
        assert g.dtype == w.dtype and g.shape == w.shape
        err = (g.double() - exact).abs().max().item()
        base = (same.double() - exact).abs().max().item()
        assert err <= 2 * base + 1e-6 * exact.abs().max().item(), (err, base)


# ---- KL ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", KL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + HALF, ids=str)
def test_kl_ops_match_reference(shape, dtype):
    w, s = _params(*shape, dtype=dtype)
    kl64, _, _ = _reference_kl(w.double(), s.double())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    expect_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    kl = ops.kl_divergence(w, s, -10.0, 10.0)
    kl_fused, dw, ds = ops.kl_divergence_with_grad(w, s, -10.0, 10.0)
    for value in (kl, kl_fused):
        assert value.dtype == expect_dtype and value.shape == ()
        assert abs(value.item() - kl64.item()) <= tol * max(1.0, abs(kl64.item()))
    _assert_grads_fa((dw, ds), w, s)

    grad = torch.tensor(0.37, dtype=expect_dtype)
    dw_b, ds_b = ops.kl_divergence_backward(grad, w, s, -10.0, 10.0)
    _assert_grads_fa((dw_b, ds_b), w, s, grad=0.37)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kl_extreme_clamp_range_stays_finite(dtype):
    # exp(−(k2 + k3·log α)) overflows in float64 for log α < −478
    w, s = _params(9, 11, dtype=dtype, spread=200.0)
    kl64, _, _ = _reference_kl(w.double(), s.double(), -1000.0, 1000.0)
    kl, dw, ds = ops.kl_divergence_with_grad(w, s, -1000.0, 1000.0)
    assert torch.isfinite(kl) and torch.isfinite(dw).all() and torch.isfinite(ds).all()
    assert abs(kl.item() - kl64.item()) <= 1e-5 * abs(kl64.item())
    assert torch.isfinite(ops.kl_divergence(w, s, -1000.0, 1000.0))


@pytest.mark.parametrize("lo,hi", [(-10.0, 10.0), (-3.0, 2.0), (-100.0, 100.0)])
def test_kl_clamp_ranges(lo, hi):
    w, s = _params(41, 23, spread=20.0)
    s[5, :3] = torch.tensor([200.0, -200.0, 90.0])  # beyond every range
    kl64, _, _ = _reference_kl(w.double(), s.double(), lo, hi)
    kl, dw, ds = ops.kl_divergence_with_grad(w, s, lo, hi)
    assert abs(kl.item() - kl64.item()) <= 1e-5 * max(1.0, abs(kl64.item()))
    _assert_grads_fa((dw, ds), w, s, lo, hi)
    la = reference.log_alpha(w, s, (-1e9, 1e9))
    outside = (la <= lo) | (la >= hi)
    assert outside.any() and (ds[outside] == 0).all() and (dw[outside] == 0).all()


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_kl_empty(shape):
    w, s = torch.randn(shape), torch.randn(shape)
    assert ops.kl_divergence(w, s, -10.0, 10.0).item() == 0
    kl, dw, ds = ops.kl_divergence_with_grad(w, s, -10.0, 10.0)
    assert kl.item() == 0 and dw.shape == ds.shape == shape
    dw, ds = ops.kl_divergence_backward(torch.tensor(1.0), w, s, -10.0, 10.0)
    assert dw.shape == ds.shape == shape


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_kl_noncontiguous(layout):
    w, s = _params(40, 30)
    if layout == "transposed":
        w, s = w.t(), s.t()
    else:
        w, s = w[::2, 1:], s[::2, 1:]
    assert not w.is_contiguous()
    wg, sg = w.clone().requires_grad_(), s.clone().requires_grad_()
    kl = F.kl_divergence(wg, sg)
    kl.backward()
    ref, _, _ = _reference_kl(w, s)
    torch.testing.assert_close(kl, ref)
    _assert_grads_fa((wg.grad, sg.grad), w, s)
    kl2, dw2, ds2 = ops.kl_divergence_with_grad(w, s, -10.0, 10.0)
    assert dw2.is_contiguous() and ds2.is_contiguous()  # as the fake says
    torch.testing.assert_close(dw2, wg.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_kl_same_bits_for_1_and_2_threads(dtype, threads):
    w, s = _params(513, 257, dtype=dtype)  # 32 chunks: several per thread
    results = []
    for n in (1, 2):
        threads(n)
        results.append((ops.kl_divergence(w, s, -10.0, 10.0), *ops.kl_divergence_with_grad(w, s, -10.0, 10.0)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert torch.equal(results[0][0], results[0][1])  # forward-only and fused sums agree


@pytest.mark.parametrize("where", ["weight", "log_sigma2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_kl_nan_propagates(where, dtype):
    w, s = _params(7, 37, dtype=dtype)  # 259 weights: NaN in a full vector and in the tail
    for index in ((3, 5), (6, 36)):
        wn, sn = w.clone(), s.clone()
        (wn if where == "weight" else sn)[index] = float("nan")
        assert ops.kl_divergence(wn, sn, -10.0, 10.0).isnan()
        kl, dw, ds = ops.kl_divergence_with_grad(wn, sn, -10.0, 10.0)
        dw_b, ds_b = ops.kl_divergence_backward(torch.tensor(2.0, dtype=kl.dtype), wn, sn, -10.0, 10.0)
        assert kl.isnan()
        for g in (dw, ds, dw_b, ds_b):
            assert g[index].isnan()
            mask = torch.ones_like(g, dtype=torch.bool)
            mask[index] = False
            assert torch.isfinite(g[mask]).all()


def test_kl_gradient_at_the_clamp_bounds_follows_torch():
    # bfloat16 hits the bounds exactly: θ = 1, log σ² = −10 gives log α = −10 in float32.
    w = torch.tensor([1.0, 1.0, 1.0], dtype=torch.bfloat16)
    s = torch.tensor([-10.0, 10.0, 0.0], dtype=torch.bfloat16)
    _, dw, ds = _reference_kl(w, s)
    _, dw2, ds2 = ops.kl_divergence_with_grad(w, s, -10.0, 10.0)
    torch.testing.assert_close(ds2, ds)
    torch.testing.assert_close(dw2, dw)


def test_kl_infinite_weight_is_not_silently_finite_gradient():
    w, s = _params(3, 18)
    w[1, 2] = float("inf")
    kl, dw, ds = ops.kl_divergence_with_grad(w, s, -10.0, 10.0)
    ref, _, _ = _reference_kl(w, s)
    torch.testing.assert_close(kl, ref)  # log α → −∞ is clamped: a finite KL, as in the reference
    assert ds[1, 2] == 0 and not torch.isfinite(dw[1, 2])


def test_functional_kl_uses_the_fused_op_when_training():
    w, s = _params(30, 20)
    w.requires_grad_()
    s.requires_grad_()
    kl = F.kl_divergence(w, s)
    assert "kl_divergence_with_grad" in type(kl.grad_fn).__name__
    kl.backward(torch.tensor(0.25))
    _, dw, ds = _reference_kl(w, s)
    torch.testing.assert_close(w.grad, 0.25 * dw)
    torch.testing.assert_close(s.grad, 0.25 * ds)
    # a second backward through the same graph is still right (nothing scaled in place)
    kl2 = F.kl_divergence(w, s)
    g1 = torch.autograd.grad(kl2, (w, s), torch.tensor(2.0), retain_graph=True)
    g2 = torch.autograd.grad(kl2, (w, s), torch.tensor(3.0))
    torch.testing.assert_close(g1[0] * 1.5, g2[0])
    torch.testing.assert_close(g1[1] * 1.5, g2[1])
    with torch.no_grad():
        assert F.kl_divergence(w, s).grad_fn is None
    assert "with_grad" not in type(F.kl_divergence(w.detach(), s.detach()).grad_fn).__name__


def test_opcheck_kl_with_grad():
    for shape in [(1, 1), (37, 45)]:
        w, s = _params(*shape)
        torch.library.opcheck(ops.kl_divergence_with_grad, (w.requires_grad_(), s.requires_grad_(), -10.0, 10.0))


def test_kl_with_grad_compiles_fullgraph():
    w, s = _params(19, 23)
    w.requires_grad_()
    s.requires_grad_()

    def loss(w, s):
        return 0.5 * F.kl_divergence(w, s) / 100

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(w, s)
    got = torch.autograd.grad(value, (w, s))
    want = torch.autograd.grad(loss(w, s), (w, s))
    torch.testing.assert_close(value, loss(w, s))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_kl_python_fallback_matches_cpp():
    """The kernel registered for devices without a C++ one (e.g. CUDA without Triton)."""
    w, s = _params(33, 17)
    got = default._kl_divergence_with_grad(w, s, -10.0, 10.0)
    want = ops.kl_divergence_with_grad(w, s, -10.0, 10.0)
    torch.testing.assert_close(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):  # a few ill-conditioned weights differ in the last bits
        assert a.is_contiguous() and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


# ---- LRT ---------------------------------------------------------------------------------

LRT_SHAPES = [(1, 1, 1), (3, 5, 2), (7, 9, 11), (33, 17, 65), (100, 784, 300)]


def _lrt_inputs(m, k, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / max(k, 1) ** 0.5).to(dtype)
    s = (torch.randn(n, k, generator=g) * 2 - 4).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x, w, s, b


@pytest.mark.parametrize("m,n", [(1, 1), (3, 5), (4, 4), (7, 9), (100, 300), (0, 4), (4, 0)])
@pytest.mark.parametrize("seed", [0, 5, 2**62 + 12345, -7])
def test_noise_is_bit_exact_with_the_reference_generator(m, n, seed):
    x, w = torch.empty(m, 3), torch.empty(n, 3)
    z = ops.lrt_noise(x, w, torch.tensor(seed))
    assert torch.equal(z, noise.noise_from_seed(m, n, seed, "cpu"))
    y, _ = ops.lrt_linear(torch.zeros(m, 3), torch.zeros(n, 3), torch.zeros(n, 3), None, torch.tensor(seed))
    std = (1 + 1e-8) ** 0.5  # exp(0) = 1 and x = 0: s = sqrt(1e-8); y = s·z
    torch.testing.assert_close(y, (1e-8) ** 0.5 * z, rtol=1e-6, atol=0)
    assert std > 0


@pytest.mark.parametrize("shape", LRT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + HALF, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_lrt_matches_reference(shape, dtype, bias):
    x, w, s, b = _lrt_inputs(*shape, dtype=dtype)
    b = b if bias else None
    seed = torch.tensor(1234)
    params = [t.clone().requires_grad_() for t in (x, w, s)] + ([b.clone().requires_grad_()] if bias else [])
    y, std = ops.lrt_linear(*params[:3], params[3] if bias else None, seed)
    z = noise.noise_from_seed(shape[0], shape[2], 1234, "cpu").to(dtype)
    ref_params = [t.detach().clone().requires_grad_() for t in params]
    ref = reference.lrt_linear(*ref_params[:3], ref_params[3] if bias else None, z)
    tol = {torch.float32: 2e-5, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    assert y.dtype == std.dtype == dtype
    torch.testing.assert_close(y, ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(std, reference.lrt_std(x, s), rtol=tol, atol=tol)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(ref, ref_params, g)
    for a, e in zip(got, want):
        assert a.dtype == dtype
        scale = e.abs().max().item() if e.numel() else 1.0
        torch.testing.assert_close(a, e, rtol=tol * 5, atol=tol * 5 * max(scale, 1.0))


@pytest.mark.parametrize("mask", [[True, False, False, False], [False, True, False, False],
                                  [False, False, True, False], [False, False, False, True],
                                  [True, True, True, True], [False, True, True, True]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lrt_backward_output_mask(mask, dtype):
    x, w, s, _ = _lrt_inputs(6, 13, 9, dtype=dtype)
    seed = torch.tensor(77)
    std = reference.lrt_std(x, s)
    grad = torch.randn(6, 9, dtype=dtype)
    got = ops.lrt_linear_backward(grad, x, w, s, std, seed, mask)
    want = default._lrt_linear_backward(grad, x, w, s, std, seed, mask)
    for need, a, e in zip(mask, got, want):
        if need:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        else:
            assert a.numel() == 0


def test_lrt_gradcheck_float64_odd_shape():
    x, w, s, b = _lrt_inputs(5, 7, 3, dtype=torch.float64)
    s = s * 0 - 1  # large noise: ∂log σ² well conditioned
    args = [t.requires_grad_() for t in (x, w, s, b)]
    assert torch.autograd.gradcheck(lambda x, w, s, b: F.lrt_linear(x, w, s, b, seed=11), args)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_lrt_noncontiguous(layout):
    x, w, s, b = _lrt_inputs(12, 10, 8)
    if layout == "transposed":
        x, w, s = x.t().contiguous().t(), w.t().contiguous().t(), s.t().contiguous().t()
    else:
        x = torch.cat([x, x], 1)[:, ::2]
        w, s = torch.cat([w, w], 1)[:, ::2], torch.cat([s, s], 1)[:, ::2]
    assert not (x.is_contiguous() or w.is_contiguous() or s.is_contiguous())
    params = [t.clone().requires_grad_() for t in (x, w, s, b)]
    y = F.lrt_linear(*params, seed=3)
    ref_params = [t.clone().requires_grad_() for t in (x, w, s, b)]
    ref = reference.lrt_linear(*ref_params, F.lrt_noise(x, w, 3))
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, ref_params, g)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_lrt_empty_and_k_zero():
    x, w, s, b = _lrt_inputs(4, 0, 3)
    y, std = ops.lrt_linear(x, w, s, b, torch.tensor(2))
    torch.testing.assert_close(std, torch.full((4, 3), 1e-4))
    torch.testing.assert_close(y, b + 1e-4 * noise.noise_from_seed(4, 3, 2, "cpu"))
    for m, n in ((0, 3), (4, 0)):
        x, w, s, b = _lrt_inputs(m, 5, n)
        y, std = ops.lrt_linear(x, w, s, b, torch.tensor(2))
        assert y.shape == std.shape == (m, n)
        dx, dw, ds, db = ops.lrt_linear_backward(y, x, w, s, std, torch.tensor(2), [True] * 4)
        assert dx.shape == x.shape and dw.shape == ds.shape == w.shape and db.shape == (n,)
        assert (dw == 0).all() and (ds == 0).all()


def test_lrt_two_threads_match_one(threads):
    # M·N above the element-wise grain, so the fused loops run in parallel
    x, w, s, b = _lrt_inputs(64, 96, 1024)
    seed = torch.tensor(8)
    out = []
    for n in (1, 2):
        threads(n)
        xs, ws, ss, bs = (t.clone().requires_grad_() for t in (x, w, s, b))
        y, std = ops.lrt_linear(xs, ws, ss, bs, seed)
        grads = torch.autograd.grad(y, (xs, ws, ss, bs), torch.ones_like(y))
        out.append((y, std, *grads))
    for a, e in zip(*out):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)  # GEMMs may sum in another order


@pytest.mark.parametrize("where", ["x", "weight", "log_sigma2"])
def test_lrt_nan_propagates(where):
    x, w, s, b = _lrt_inputs(5, 6, 4)
    {"x": x, "weight": w, "log_sigma2": s}[where][1 if where == "x" else 2, 3] = float("nan")
    y, std = ops.lrt_linear(x, w, s, b, torch.tensor(1))
    nan = y.isnan()
    if where == "x":
        assert nan[1].all() and not nan[[0, 2, 3, 4]].any()
    else:
        assert nan[:, 2].all() and not nan[:, [0, 1, 3]].any()
    grads = ops.lrt_linear_backward(torch.ones_like(y), x, w, s, std, torch.tensor(1), [True] * 4)
    want = default._lrt_linear_backward(torch.ones_like(y), x, w, s, std, torch.tensor(1), [True] * 4)
    for a, e in zip(grads, want):
        assert torch.equal(a.isnan(), e.isnan())
    assert any(g.isnan().any() for g in grads)


def test_lrt_bad_arguments_are_named():
    x, w, s, b = _lrt_inputs(3, 4, 5)
    with pytest.raises(RuntimeError, match="seed"):
        ops.lrt_linear(x, w, s, b, torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.lrt_linear(x.double(), w, s, b, torch.tensor(1))
    with pytest.raises(RuntimeError, match="features"):
        ops.lrt_linear(x[:, :3], w, s, b, torch.tensor(1))
    with pytest.raises(RuntimeError, match="bias"):
        ops.lrt_linear(x, w, s, b[:2], torch.tensor(1))


def test_describe_names_cpu_kernels():
    text = dispatch.describe()
    for op in ("kl_divergence", "kl_divergence_with_grad", "lrt_linear"):
        assert f"{op}: CPU -> C++" in text


# ---- every instruction-set path ------------------------------------------------------------

_ISA_SCRIPT = textwrap.dedent(
    """
    import torch, sparsevd
    from sparsevd import dispatch, noise, reference
    ops = torch.ops.sparsevd
    torch.manual_seed(0)
    worst = 0.0
    for n, k in [(1, 3), (7, 37), (300, 784)]:
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(n, k).to(dtype)
            s = (torch.randn(n, k) * 4 - 6).to(dtype)
            w64 = w.double().requires_grad_(); s64 = s.double().requires_grad_()
            ref = reference.kl_divergence(w64, s64)
            dw64, ds64 = torch.autograd.grad(ref, (w64, s64))
            kl, dw, ds = ops.kl_divergence_with_grad(w, s, -10.0, 10.0)
            fwd = ops.kl_divergence(w, s, -10.0, 10.0)
            assert abs(kl.item() - ref.item()) <= 1e-5 * max(1, abs(ref.item())), (kl, ref)
            assert abs(fwd.item() - ref.item()) <= 1e-5 * max(1, abs(ref.item())), (fwd, ref)
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            for g, e in ((dw, dw64), (ds, ds64)):
                err = ((g.double() - e).abs() / (e.abs() + 1e-3)).max().item()
                worst = max(worst, err) if dtype == torch.float32 else worst
                assert err < tol, (n, k, dtype, err)
        wn = w.float().clone(); wn[0, 0] = float("nan")
        assert ops.kl_divergence_with_grad(wn, s.float(), -10.0, 10.0)[1][0, 0].isnan()
    for m, k, n in [(3, 5, 7), (100, 300, 100)]:
        x = torch.randn(m, k, requires_grad=True); w = (torch.randn(n, k) / k**0.5).requires_grad_()
        s = (torch.randn(n, k) - 4).requires_grad_(); seed = torch.tensor(3)
        y, std = ops.lrt_linear(x, w, s, None, seed)
        z = noise.noise_from_seed(m, n, 3, "cpu")
        ref = reference.lrt_linear(x, w, s, None, z)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        for a, e in zip(torch.autograd.grad(y, (x, w, s), g), torch.autograd.grad(ref, (x, w, s), g)):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    # csr_linear and linear_chain: the GEMV, panels of every width, the bounds checks
    atol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}
    def rule(out, ref64, same, dtype):
        err = (out.double() - ref64).abs().max().item()
        base = (same.double() - ref64).abs().max().item()
        assert err <= 2 * base + atol[dtype], (err, base, dtype)
    for m, n, k in [(1, 37, 45), (1, 300, 784), (3, 37, 45), (17, 37, 45), (70, 300, 784)]:
        dense = torch.randn(n, k, dtype=torch.float64) * (torch.rand(n, k) < 0.1)
        c = dense.to_sparse_csr()
        crow, col = c.crow_indices().int(), c.col_indices().int()
        d2 = torch.randn(11, n, dtype=torch.float64)
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            x = torch.randn(m, k).to(dtype); b = torch.randn(n).to(dtype); v = c.values().to(dtype)
            out = ops.csr_linear(x, crow, col, v, b)
            rule(out, reference.csr_linear(x.double(), crow, col, v.double(), b.double()),
                 reference.csr_linear(x, crow, col, v, b), dtype)
            args = ([v, d2.to(dtype)], [crow, None], [col, None], [b, None], [7, 5], [0.0, 0.0])
            rule(ops.linear_chain(x, *args),
                 reference.linear_chain(x.double(), [v.double(), d2], *args[1:3], [b.double(), None], *args[4:]),
                 reference.linear_chain(x, *args), dtype)
            bad = col.clone(); bad[-1] = k
            for fn in (lambda: ops.csr_linear(x, crow, bad, v, b),
                       lambda: ops.linear_chain(x, [v], [crow], [bad], [b], [0], [0.0])):
                try:
                    fn()
                except IndexError:
                    pass
                else:
                    raise AssertionError("no IndexError")
    # a bad index inside the first 32 non-zeros of a long row (the GEMV's unmasked steps)
    crow = torch.tensor([0, 100], dtype=torch.int32)
    for at, value in ((5, 300), (40, -1)):
        col = torch.arange(100, dtype=torch.int32); col[at] = value
        try:
            ops.csr_linear(torch.randn(1, 200), crow, col, torch.randn(100), None)
        except IndexError as e:
            assert f"col_indices[{at}] = {value}" in str(e), str(e)
        else:
            raise AssertionError("no IndexError")
    print("ok", worst)
    """
)


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_instruction_set_path(capability):
    """ATEN_CPU_CAPABILITY narrows the set the kernels pick (vec_math.h): run each path."""
    widest = torch.backends.cpu.get_cpu_capability().lower()  # this process: not narrowed by the test
    order = ["default", "avx2", "avx512"]
    if widest in order and order.index(capability) > order.index(widest):
        # forcing a wider set than the CPU has makes torch's own kernels die of SIGILL
        pytest.skip(f"this CPU's widest instruction set is {widest}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    done = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


@pytest.mark.parametrize("gathers", ["0", "1"])
def test_csr_gemv_with_and_without_gathers(gathers):
    """The AVX-512 float32 GEMV has a gather form (chosen on Intel) and a scalar-load form
    (chosen on AMD): SPARSEVD_CSR_GATHER picks one, so both run on either CPU."""
    if torch.backends.cpu.get_cpu_capability().lower() != "avx512":
        pytest.skip("no AVX-512 on this CPU")
    env = dict(os.environ, SPARSEVD_CSR_GATHER=gathers)
    done = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
