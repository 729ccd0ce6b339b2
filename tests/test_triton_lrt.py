"""The LRT's GPU kernels, both routes (cuBLAS GEMMs with fused Triton elementwise passes,
and the fused Triton dual GEMMs), against ``sparsevd.reference.lrt_linear``.

Runs on CUDA when there is a GPU, else on CPU tensors under the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported; the cuBLAS route's
products are then torch's CPU GEMMs). The fused route's bf16 is checked only on CUDA: the
interpreter's tl.dot is wrong for bf16 operands; the cuBLAS route has no tl.dot and is
checked in bf16 everywhere.

Tolerance (flash-attention's rule): the kernel's max error against a float64 reference
must be at most twice that of the same computation done by torch in the kernel's dtype,
plus a small atol.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from sparsevd import reference  # noqa: E402
from sparsevd.triton_kernels import lrt  # noqa: E402
from sparsevd.triton_kernels.lrt_elementwise import backward_epilogue_, operands  # noqa: E402
from sparsevd.triton_kernels.lrt_sample import noise_flat  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

pytestmark = pytest.mark.gpu  # on a GPU machine every test here runs on CUDA

ROUTES = list(lrt.ROUTES)
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (route, dtype) pairs the interpreter can check: the fused route's bf16 needs a GPU
ROUTE_DTYPES = [(r, d) for r in ROUTES for d in ALL_DTYPES if CUDA or not (r == "fused" and d == torch.bfloat16)]
SHAPES = [(1, 1, 1), (37, 45, 29), (70, 130, 65), (64, 64, 64)]  # (M, K, N)
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_fa(out, ref64, same_dtype, name=""):
    """|out − ref64|max ≤ 2·|same_dtype − ref64|max + atol·max(1, |ref64|max)."""
    assert out.shape == ref64.shape, (name, out.shape, ref64.shape)
    assert out.dtype == same_dtype.dtype, (name, out.dtype, same_dtype.dtype)
    if ref64.numel() == 0:
        return
    err = (out.double() - ref64).abs().max().item()
    base = (same_dtype.double() - ref64).abs().max().item()
    atol = ATOL[out.dtype] * max(1.0, ref64.abs().max().item())
    assert err <= 2 * base + atol, f"{name}: kernel error {err:.3e} vs same-dtype torch error {base:.3e} (atol {atol:.1e})"


def make_inputs(M, K, N, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen)
    w = torch.randn(N, K, generator=gen) / math.sqrt(max(K, 1))
    ls = torch.randn(N, K, generator=gen) - 3.0  # σ ~ 0.2, comparable to θ
    b = torch.randn(N, generator=gen) if bias else None
    cast = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(ls), cast(b)


def reference_pair(x, w, ls, b, z, grad=None):
    """(float64 result, same-dtype result) of the reference; with grad, the four grads too."""
    out = []
    for dt in (torch.float64, x.dtype):
        args = [None if t is None else t.detach().to(dt).requires_grad_(grad is not None) for t in (x, w, ls, b)]
        y = reference.lrt_linear(*args, z.to(dt))
        if grad is None:
            out.append(y.detach())
        else:
            y.backward(grad.to(dt))
            out.append((y.detach(), *[None if a is None else a.grad for a in args]))
    return out


def route_ids(param):
    return param if isinstance(param, str) else str(param).replace("torch.", "")


# ------------------------------------------------------------------------------------------
# forward / backward against the reference, both routes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route,dtype", ROUTE_DTYPES, ids=route_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_matches_reference(shape, route, dtype, bias):
    M, K, N = shape
    x, w, ls, b = make_inputs(M, K, N, dtype, bias)
    y, s = lrt.lrt_forward(x, w, ls, b, seed=1234, route=route)
    assert y.is_contiguous() and s.is_contiguous()
    z = lrt.lrt_noise(M, N, 1234, DEVICE)
    assert z.dtype == torch.float32 and z.shape == (M, N)
    ref64, same = reference_pair(x, w, ls, b, z)
    assert_fa(y, ref64, same, "y")
    s64 = reference.lrt_std(x.double(), ls.double())
    assert_fa(s, s64, reference.lrt_std(x, ls), "std")


@pytest.mark.parametrize("route,dtype", ROUTE_DTYPES, ids=route_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_backward_matches_reference(shape, route, dtype, bias):
    M, K, N = shape
    x, w, ls, b = make_inputs(M, K, N, dtype, bias, seed=1)
    seed = 98765
    y, s = lrt.lrt_forward(x, w, ls, b, seed, route=route)
    z = lrt.lrt_noise(M, N, seed, DEVICE)
    grad = torch.randn(M, N, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    (_, *g64), (_, *gsame) = reference_pair(x, w, ls, b, z, grad)
    grads = lrt.lrt_backward(grad, x, w, ls, s, seed, (True, True, True, bias), route=route)
    for name, got, r64, rsame in zip(("dx", "dweight", "dlog_sigma2", "dbias"), grads, g64, gsame):
        if name == "dbias" and not bias:
            assert got is None
            continue
        assert got.is_contiguous(), name
        assert_fa(got, r64, rsame, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_routes_differentiate_each_other(dtype):
    # the noise and s of either forward are what either backward expects
    M, K, N = 37, 45, 29
    x, w, ls, b = make_inputs(M, K, N, dtype, seed=8)
    z = lrt.lrt_noise(M, N, 17, DEVICE)
    grad = torch.randn(M, N, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    (y64, *g64), (ysame, *gsame) = reference_pair(x, w, ls, b, z, grad)
    for forward_route in ROUTES:
        y, s = lrt.lrt_forward(x, w, ls, b, 17, route=forward_route)
        assert_fa(y, y64, ysame, f"y {forward_route}")
        for backward_route in ROUTES:
            grads = lrt.lrt_backward(grad, x, w, ls, s, 17, (True, True, True, True), route=backward_route)
            for name, got, r64, rsame in zip(("dx", "dweight", "dlog_sigma2", "dbias"), grads, g64, gsame):
                assert_fa(got, r64, rsame, f"{name} forward {forward_route}, backward {backward_route}")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "mask",
    [(True, False, False, False), (False, True, False, False), (False, False, True, False),
     (False, False, False, True), (False, True, False, True), (True, False, True, False),
     (False, False, False, False)],
    ids=str,
)  # fmt: skip
def test_backward_output_mask(mask, route):
    M, K, N = 37, 45, 29
    x, w, ls, b = make_inputs(M, K, N, torch.float32)
    y, s = lrt.lrt_forward(x, w, ls, b, 5, route=route)
    grad = torch.randn(M, N, device=DEVICE)
    full = lrt.lrt_backward(grad, x, w, ls, s, 5, (True, True, True, True), route=route)
    part = lrt.lrt_backward(grad, x, w, ls, s, 5, mask, route=route)
    for want, got, ref in zip(mask, part, full):
        if want:
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        else:
            assert got is None


@pytest.mark.parametrize("route", ROUTES)
def test_non_contiguous_inputs(route):
    M, K, N = 37, 45, 29
    x, w, ls, b = make_inputs(M, K, N, torch.float32)
    y, s = lrt.lrt_forward(x, w, ls, b, 3, route=route)
    grad = torch.randn(M, N, device=DEVICE)
    grads = lrt.lrt_backward(grad, x, w, ls, s, 3, (True, True, True, True), route=route)

    x_t = x.t().contiguous().t()  # column-major
    x_rows = torch.zeros(M, K + 7, device=DEVICE)[:, :K]  # padded rows: strided, no copy
    x_rows.copy_(x)
    w_t = w.t().contiguous().t()
    ls_step = torch.zeros(N, 2 * K, device=DEVICE)[:, ::2]
    ls_step.copy_(ls)
    b_step = torch.zeros(2 * N, device=DEVICE)[::2]
    b_step.copy_(b)
    for xi, wi, lsi, bi in ((x_t, w, ls, b), (x_rows, w_t, ls_step, b_step)):
        y2, s2 = lrt.lrt_forward(xi, wi, lsi, bi, 3, route=route)
        torch.testing.assert_close(y2, y, rtol=1e-6, atol=1e-6)  # cuBLAS may pick another kernel per layout
        torch.testing.assert_close(s2, s, rtol=1e-6, atol=1e-6)
        grad_t = grad.t().contiguous().t()
        s_t = s2.t().contiguous().t()
        grads2 = lrt.lrt_backward(grad_t, xi, wi, lsi, s_t, 3, (True, True, True, True), route=route)
        for g1, g2 in zip(grads, grads2):
            torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("route", ROUTES)
def test_expanded_grad(route):
    # y.sum().backward() hands the backward a stride-0 gradient
    M, K, N = 20, 33, 17
    x, w, ls, b = make_inputs(M, K, N, torch.float32)
    y, s = lrt.lrt_forward(x, w, ls, b, 11, route=route)
    ones = torch.ones((), device=DEVICE).expand(M, N)
    got = lrt.lrt_backward(ones, x, w, ls, s, 11, (True, True, True, True), route=route)
    want = lrt.lrt_backward(ones.contiguous(), x, w, ls, s, 11, (True, True, True, True), route=route)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@pytest.mark.parametrize("route", ROUTES)
def test_autocast_does_not_reach_the_products(route):
    # autocast is still on inside a custom op's kernel: the launchers must compute in the
    # inputs' dtype (the op's fake promises it), whatever autocast would do to torch.mm
    M, K, N = 19, 23, 11
    x, w, ls, b = make_inputs(M, K, N, torch.float32, seed=14)
    y, s = lrt.lrt_forward(x, w, ls, b, 4, route=route)
    grad = torch.randn(M, N, device=DEVICE)
    grads = lrt.lrt_backward(grad, x, w, ls, s, 4, (True, True, True, True), route=route)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y2, s2 = lrt.lrt_forward(x, w, ls, b, 4, route=route)
        grads2 = lrt.lrt_backward(grad, x, w, ls, s, 4, (True, True, True, True), route=route)
    assert y2.dtype == s2.dtype == torch.float32
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    for g1, g2 in zip(grads, grads2):
        assert g2.dtype == torch.float32
        torch.testing.assert_close(g2, g1, rtol=0, atol=0)


def test_input_checks():
    x, w, ls, b = make_inputs(5, 6, 7, torch.float32)
    with pytest.raises(TypeError, match="share one dtype"):
        lrt.lrt_forward(x.half(), w, ls, b, 0)
    with pytest.raises(ValueError, match="differ in shape"):
        lrt.lrt_forward(x, w, ls[:, :5], b, 0)
    with pytest.raises(ValueError, match="features"):
        lrt.lrt_forward(x[:, :5], w, ls, b, 0)
    with pytest.raises(ValueError, match="bias"):
        lrt.lrt_forward(x, w, ls, b[:3], 0)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        lrt.lrt_forward(x.double(), w.double(), ls.double(), b.double(), 0)
    with pytest.raises(ValueError, match="route"):
        lrt.lrt_forward(x, w, ls, b, 0, route="cutlass")
    y, s = lrt.lrt_forward(x, w, ls, b, 0)
    with pytest.raises(ValueError, match="grad and std"):
        lrt.lrt_backward(y[:, :3], x, w, ls, s, 0, (True, True, True, True))


# ------------------------------------------------------------------------------------------
# the route rule
# ------------------------------------------------------------------------------------------


def test_default_route_is_cublas_everywhere():
    # until a GPU measurement sets the rule (bench/fit_lrt_route.py)
    for dtype in ALL_DTYPES:
        for shape in [(1, 1, 1), (100, 784, 300), (4096, 4096, 4096)]:
            assert lrt.route(*shape, dtype) == "cublas"


def test_route_rule_and_override(monkeypatch):
    monkeypatch.setitem(lrt.FUSED_BELOW_MACS, torch.float16, 1000)
    assert lrt.route(10, 10, 9, torch.float16) == "fused"  # 900 multiply-adds
    assert lrt.route(10, 10, 10, torch.float16) == "cublas"  # 1000: not below
    assert lrt.route(10, 10, 9, torch.float32) == "cublas"  # per dtype
    assert lrt.route(0, 10, 9, torch.float16) == "cublas"  # empty problems: cuBLAS
    with lrt.use_route("fused"):
        assert lrt.route(4096, 4096, 4096, torch.float32) == "fused"
        assert lrt.route(4096, 0, 4096, torch.float32) == "cublas"
    with lrt.use_route("cublas"):
        assert lrt.route(10, 10, 9, torch.float16) == "cublas"
    assert lrt.FUSED_BELOW_MACS[torch.float16] == 1000  # restored
    with pytest.raises(ValueError, match="route"):
        with lrt.use_route("cutlass"):
            pass


@pytest.mark.parametrize("route", ROUTES)
def test_use_route_reaches_the_launchers(route, monkeypatch):
    # with no explicit route, the launchers follow the rule: spy on the fused GEMM launcher
    calls = []
    forward = lrt.lrt_gemm.forward
    monkeypatch.setattr(lrt.lrt_gemm, "forward", lambda *a: calls.append(1) or forward(*a))
    x, w, ls, b = make_inputs(5, 6, 7, torch.float32)
    with lrt.use_route(route):
        lrt.lrt_forward(x, w, ls, b, 0)
    assert len(calls) == (route == "fused")


# ------------------------------------------------------------------------------------------
# noise
# ------------------------------------------------------------------------------------------


def test_noise_statistics():
    M, N = 256, 257
    n = M * N
    z = lrt.lrt_noise(M, N, 1234, DEVICE).double().cpu()
    six_se = 6 / math.sqrt(n)
    assert abs(z.mean().item()) < six_se
    assert abs(z.var().item() - 1) < 6 * math.sqrt(2 / n)
    # P(|z| < 1) = 0.6827 for a standard normal; fourth moment 3
    p1 = (z.abs() < 1).double().mean().item()
    assert abs(p1 - 0.682689) < 6 * math.sqrt(0.6827 * 0.3173 / n)
    assert abs((z**4).mean().item() - 3) < 6 * math.sqrt(96 / n)

    def corr(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return (a @ b / (a.norm() * b.norm())).item()

    assert abs(corr(z[:, :-1], z[:, 1:])) < six_se  # neighbouring offsets
    assert abs(corr(z[:-1], z[1:])) < six_se  # offsets N apart
    z2 = lrt.lrt_noise(M, N, 1235, DEVICE).double().cpu()
    assert abs(corr(z, z2)) < six_se  # neighbouring seeds
    assert torch.equal(lrt.lrt_noise(M, N, 1234, DEVICE).cpu(), z.float())  # same seed, same bits


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("wide", [False, True], ids=["int32", "int64"])
def test_forward_adds_lrt_noise_bitwise(route, wide):
    # x = 1, θ = 0, log σ² = 0, K = 1: μ = 0, s = sqrt(1 + 1e-8) = 1 in fp32, so y is z itself
    M, N = 37, 29
    x = torch.ones(M, 1, device=DEVICE)
    w = torch.zeros(N, 1, device=DEVICE)
    y, s = lrt.lrt_forward(x, w, w, None, 77, route=route, _wide=wide)
    assert torch.equal(s, torch.ones_like(s))
    assert torch.equal(y, lrt.lrt_noise(M, N, 77, DEVICE))
    y3, _ = lrt.lrt_forward(x, w, w, None, 78, route=route)
    assert not torch.equal(y, y3)


@pytest.mark.parametrize("route", ROUTES)
def test_backward_uses_lrt_noise(route):
    # h = g ⊙ z / (2s) reaches ∂log σ² = (hᵀ x²) ⊙ exp(log σ²): with x = 1, log σ² = 0 and
    # K = 1 it is Σ_m g z / 2, here per output n with g = one-hot rows
    M, N = 7, 5
    x = torch.ones(M, 1, device=DEVICE)
    w = torch.zeros(N, 1, device=DEVICE)
    y, s = lrt.lrt_forward(x, w, w, None, 5, route=route)
    z = lrt.lrt_noise(M, N, 5, DEVICE)
    grad = torch.zeros(M, N, device=DEVICE)
    grad[3] = 2.0
    _, _, dls, _ = lrt.lrt_backward(grad, x, w, w, s, 5, (False, False, True, False), route=route)
    torch.testing.assert_close(dls[:, 0], z[3], rtol=1e-6, atol=0)


def test_seed_reduced_mod_2_63():
    z = lrt.lrt_noise(3, 5, 12, DEVICE)
    assert torch.equal(z, lrt.lrt_noise(3, 5, 12 + 2**63, DEVICE))
    assert torch.equal(lrt.lrt_noise(3, 5, -1, DEVICE), lrt.lrt_noise(3, 5, 2**63 - 1, DEVICE))
    assert not torch.equal(z, lrt.lrt_noise(3, 5, 13, DEVICE))


def test_wide_offsets():
    # 64-bit offsets (used when M·N ≥ 2^31) give the same numbers below 2^32 ...
    narrow = noise_flat(0, 3000, 42, DEVICE, wide=False)
    torch.testing.assert_close(noise_flat(0, 3000, 42, DEVICE, wide=True), narrow, rtol=0, atol=0)
    # ... and fresh ones above (no wrap-around to offset 0)
    high = noise_flat(2**32, 3000, 42, DEVICE, wide=True)
    assert not torch.allclose(high, narrow)
    assert abs(high.double().mean().item()) < 6 / math.sqrt(3000)
    assert abs(high.double().var().item() - 1) < 6 * math.sqrt(2 / 3000)
    across = noise_flat(2**32 - 1500, 3000, 42, DEVICE, wide=True)
    torch.testing.assert_close(across[1500:], high[:1500], rtol=0, atol=0)


@pytest.mark.parametrize("route", ROUTES)
def test_wide_kernels_match_narrow(route):
    M, K, N = 37, 45, 29
    x, w, ls, b = make_inputs(M, K, N, torch.float32)
    y, s = lrt.lrt_forward(x, w, ls, b, 9, route=route)
    yw, sw = lrt.lrt_forward(x, w, ls, b, 9, route=route, _wide=True)
    assert torch.equal(yw, y) and torch.equal(sw, s)
    grad = torch.randn(M, N, device=DEVICE)
    g1 = lrt.lrt_backward(grad, x, w, ls, s, 9, (True, True, True, True), route=route)
    g2 = lrt.lrt_backward(grad, x, w, ls, s, 9, (True, True, True, True), route=route, _wide=True)
    for a, c in zip(g1, g2):
        assert torch.equal(c, a)


# ------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_k_zero(dtype, route):
    # μ = b, v = 0: y = b + 1e-4·z, s = 1e-4; every gradient but ∂b is an empty sum
    M, N = 7, 5
    x, w, ls, b = make_inputs(M, 0, N, dtype)
    y, s = lrt.lrt_forward(x, w, ls, b, 21, route=route)
    z = lrt.lrt_noise(M, N, 21, DEVICE)
    assert y.dtype == dtype and s.dtype == dtype
    eps = torch.finfo(dtype).eps  # one rounding of b + s·z either way
    torch.testing.assert_close(y, (b.float() + 1e-4 * z).to(dtype), rtol=eps, atol=0)
    torch.testing.assert_close(s, torch.full((M, N), 1e-4, dtype=dtype, device=DEVICE), rtol=eps, atol=0)
    y0, _ = lrt.lrt_forward(x, w, ls, None, 21, route=route)
    torch.testing.assert_close(y0, (1e-4 * z).to(dtype), rtol=eps, atol=0)
    grad = torch.randn(M, N, device=DEVICE).to(dtype)
    dx, dw, dls, db = lrt.lrt_backward(grad, x, w, ls, s, 21, (True, True, True, True), route=route)
    assert dx.shape == (M, 0) and dw.shape == (N, 0) and dls.shape == (N, 0)
    torch.testing.assert_close(db, grad.float().sum(0).to(dtype))


@pytest.mark.parametrize("route", ROUTES)
def test_m_zero_and_n_zero(route):
    x, w, ls, b = make_inputs(0, 6, 4, torch.float32)
    y, s = lrt.lrt_forward(x, w, ls, b, 0, route=route)
    assert y.shape == (0, 4) and s.shape == (0, 4)
    dx, dw, dls, db = lrt.lrt_backward(y, x, w, ls, s, 0, (True, True, True, True), route=route)
    assert dx.shape == (0, 6)
    for t in (dw, dls, db):
        assert torch.count_nonzero(t) == 0
    assert dw.shape == (4, 6) and db.shape == (4,)

    x, w, ls, b = make_inputs(3, 6, 0, torch.float32)
    y, s = lrt.lrt_forward(x, w, ls, b, 0, route=route)
    assert y.shape == (3, 0)
    dx, dw, dls, db = lrt.lrt_backward(y, x, w, ls, s, 0, (True, True, True, True), route=route)
    assert dx.shape == (3, 6) and torch.count_nonzero(dx) == 0
    assert dw.shape == (0, 6) and db.shape == (0,)
    assert lrt.lrt_noise(0, 5, 1, DEVICE).shape == (0, 5)


def test_elementwise_passes():
    # the passes around the GEMMs, alone: odd sizes across the two regions of one launch
    x = torch.randn(37, 45, device=DEVICE)
    ls = torch.randn(29, 45, device=DEVICE) * 8 - 6  # exp over [-40, 30]
    x2, ev = operands(x, ls)
    torch.testing.assert_close(x2, x * x, rtol=0, atol=0)
    torch.testing.assert_close(ev, torch.exp(ls), rtol=4e-7, atol=0)  # exp_accurate: ~2 ulp
    assert operands(x, ls, need_squares=False)[0] is None
    assert torch.equal(operands(x, ls, need_variances=False)[0], x2)
    c, p = torch.randn(37, 45, device=DEVICE), torch.randn(29, 45, device=DEVICE)
    c0, p0 = c.clone(), p.clone()
    backward_epilogue_(c, x, p, ev)
    torch.testing.assert_close(c, 2 * x * c0, rtol=0, atol=0)
    torch.testing.assert_close(p, p0 * ev, rtol=0, atol=0)
    backward_epilogue_(None, None, p0, ev)
    torch.testing.assert_close(p0, p, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# the CUDA kernels of the op (sparsevd.backends.triton), both routes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_backend_kernels(route):
    # what the dispatcher runs on CUDA; called directly here, so the interpreter checks it too
    from sparsevd.backends import triton as backend

    M, K, N = 19, 23, 11
    x, w, ls, b = make_inputs(M, K, N, torch.float32, seed=6)
    seed = torch.tensor(31, dtype=torch.int64)
    with lrt.use_route(route):
        y, s = backend.KERNELS["lrt_linear"][0](x, w, ls, b, seed)
        grad = torch.randn(M, N, device=DEVICE)
        grads = backend.KERNELS["lrt_linear_backward"][0](grad, x, w, ls, s, seed, [True, False, True, False])
    z = backend.KERNELS["lrt_noise"][0](x, w, seed)
    torch.testing.assert_close(z, lrt.lrt_noise(M, N, 31, DEVICE), rtol=0, atol=0)
    (y64, *g64), (ysame, *gsame) = reference_pair(x, w, ls, b, z, grad)
    assert_fa(y, y64, ysame, "y")
    assert grads[1].numel() == 0 and grads[3].numel() == 0  # not asked for: empty, as the schema says
    assert_fa(grads[0], g64[0], gsame[0], "dx")
    assert_fa(grads[2], g64[2], gsame[2], "dlog_sigma2")


@cuda_only
@pytest.mark.parametrize("route", ROUTES)
def test_cuda_op_trains_through_each_route(route):
    # torch.ops.sparsevd.lrt_linear on CUDA, autograd included, against the reference
    import sparsevd

    M, K, N = 64, 96, 48
    x, w, ls, b = make_inputs(M, K, N, torch.float32, seed=12)
    params = [t.clone().requires_grad_() for t in (x, w, ls, b)]
    grad = torch.randn(M, N, device=DEVICE)
    with lrt.use_route(route):
        y = sparsevd.functional.lrt_linear(*params, seed=5)
        y.backward(grad)
    z = sparsevd.functional.lrt_noise(x, w, 5)
    (y64, *g64), (ysame, *gsame) = reference_pair(x, w, ls, b, z, grad)
    assert_fa(y.detach(), y64, ysame, "y")
    for name, p, r64, rsame in zip(("dx", "dweight", "dlog_sigma2", "dbias"), params, g64, gsame):
        assert_fa(p.grad, r64, rsame, name)


# ------------------------------------------------------------------------------------------
# CUDA only: bf16 / TF32 / larger shapes (autotuned configs)
# ------------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(256, 512, 384), (300, 1000, 700), (1024, 256, 2048)], ids=str)
def test_cuda_large(shape, dtype, route):
    M, K, N = shape
    x, w, ls, b = make_inputs(M, K, N, dtype, seed=3)
    seed = 2024
    y, s = lrt.lrt_forward(x, w, ls, b, seed, route=route)
    z = lrt.lrt_noise(M, N, seed, DEVICE)
    grad = torch.randn(M, N, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    (y64, *g64), (ysame, *gsame) = reference_pair(x, w, ls, b, z, grad)
    assert_fa(y, y64, ysame, "y")
    grads = lrt.lrt_backward(grad, x, w, ls, s, seed, (True, True, True, True), route=route)
    for name, got, r64, rsame in zip(("dx", "dweight", "dlog_sigma2", "dbias"), grads, g64, gsame):
        assert_fa(got, r64, rsame, name)


@cuda_only
@pytest.mark.parametrize("route", ROUTES)
def test_cuda_tf32(route):
    M, K, N = 256, 512, 384
    x, w, ls, b = make_inputs(M, K, N, torch.float32, seed=5)
    z = lrt.lrt_noise(M, N, 1, DEVICE)
    ref64 = reference.lrt_linear(x.double(), w.double(), ls.double(), b.double(), z.double())
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        y_ieee, _ = lrt.lrt_forward(x, w, ls, b, 1, route=route)
        torch.backends.cuda.matmul.allow_tf32 = True
        y_tf32, _ = lrt.lrt_forward(x, w, ls, b, 1, route=route)
        same_tf32 = reference.lrt_linear(x, w, ls, b, z)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    err_ieee = (y_ieee.double() - ref64).abs().max().item()
    err_tf32 = (y_tf32.double() - ref64).abs().max().item()
    assert err_ieee < 1e-4
    assert err_tf32 <= 2 * (same_tf32.double() - ref64).abs().max().item() + 1e-5
    assert err_tf32 > err_ieee  # TF32 really was used


@cuda_only
@pytest.mark.parametrize("route", ROUTES)
def test_cuda_torch_compile_inductor(route):
    # the Triton-backed ops inside an inductor graph (fullgraph), gradients as in eager;
    # the interpreter cannot run this (fake tensors have no data)
    import sparsevd

    M, K, N = 64, 96, 48
    inputs = make_inputs(M, K, N, torch.float32, seed=13)
    seed = torch.tensor(7, dtype=torch.int64)

    def loss(x, w, ls, b):
        y = sparsevd.functional.lrt_linear(x, w, ls, b, seed=seed)
        return y.square().mean() + sparsevd.functional.kl_divergence(w, ls) / 1000

    eager = [t.clone().requires_grad_() for t in inputs]
    compiled = [t.clone().requires_grad_() for t in inputs]
    with lrt.use_route(route):
        want = torch.autograd.grad(loss(*eager), eager)
        got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*compiled), compiled)
    for name, g, w in zip(("dx", "dweight", "dlog_sigma2", "dbias"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)
