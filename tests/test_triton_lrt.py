"""The fused Triton LRT kernels against ``sparsevd.reference.lrt_linear``.

Runs on CUDA when there is a GPU, else on CPU tensors under the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported). bf16 is checked
only on CUDA: the interpreter's tl.dot is wrong for bf16 operands.

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

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
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


# ------------------------------------------------------------------------------------------
# forward / backward against the reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_matches_reference(shape, dtype, bias):
    M, K, N = shape
    x, w, ls, b = make_inputs(M, K, N, dtype, bias)
    y, s = lrt.lrt_forward(x, w, ls, b, seed=1234)
    z = lrt.lrt_noise(M, N, 1234, DEVICE)
    assert z.dtype == torch.float32 and z.shape == (M, N)
    ref64, same = reference_pair(x, w, ls, b, z)
    assert_fa(y, ref64, same, "y")
    s64 = reference.lrt_std(x.double(), ls.double())
    assert_fa(s, s64, reference.lrt_std(x, ls), "std")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_backward_matches_reference(shape, dtype, bias):
    M, K, N = shape
    x, w, ls, b = make_inputs(M, K, N, dtype, bias, seed=1)
    seed = 98765
    y, s = lrt.lrt_forward(x, w, ls, b, seed)
    z = lrt.lrt_noise(M, N, seed, DEVICE)
    grad = torch.randn(M, N, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    (_, *g64), (_, *gsame) = reference_pair(x, w, ls, b, z, grad)
    grads = lrt.lrt_backward(grad, x, w, ls, s, seed, (True, True, True, bias))
    for name, got, r64, rsame in zip(("dx", "dweight", "dlog_sigma2", "dbias"), grads, g64, gsame):
        if name == "dbias" and not bias:
            assert got is None
            continue
        assert_fa(got, r64, rsame, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []), ids=str)
@pytest.mark.parametrize("shape", [(37, 45, 29), (64, 64, 64)], ids=str)
def test_both_operand_paths(shape, dtype):
    # x⊙x and exp(log σ²) formed per tile inside the GEMM loops (_on_the_fly=True) or by
    # elementwise passes before them (False), noise fused or not: all against the reference
    M, K, N = shape
    x, w, ls, b = make_inputs(M, K, N, dtype, seed=8)
    z = lrt.lrt_noise(M, N, 17, DEVICE)
    grad = torch.randn(M, N, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    (y64, *g64), (ysame, *gsame) = reference_pair(x, w, ls, b, z, grad)
    for on_the_fly in (False, True):
        for fuse in (False, True):  # noise in the GEMM epilogue or in a separate pass
            y, s = lrt.lrt_forward(x, w, ls, b, 17, _on_the_fly=on_the_fly, _fuse_noise=fuse)
            assert_fa(y, y64, ysame, f"y on_the_fly={on_the_fly} fuse_noise={fuse}")
        grads = lrt.lrt_backward(grad, x, w, ls, s, 17, (True, True, True, True), _on_the_fly=on_the_fly)
        for name, got, r64, rsame in zip(("dx", "dweight", "dlog_sigma2", "dbias"), grads, g64, gsame):
            assert_fa(got, r64, rsame, f"{name} on_the_fly={on_the_fly}")


@pytest.mark.parametrize(
    "mask",
    [(True, False, False, False), (False, True, False, False), (False, False, True, False),
     (False, False, False, True), (False, True, False, True), (False, False, False, False)],
    ids=str,
)  # fmt: skip
def test_backward_output_mask(mask):
    M, K, N = 37, 45, 29
    x, w, ls, b = make_inputs(M, K, N, torch.float32)
    y, s = lrt.lrt_forward(x, w, ls, b, 5)
    grad = torch.randn(M, N, device=DEVICE)
    full = lrt.lrt_backward(grad, x, w, ls, s, 5, (True, True, True, True))
    part = lrt.lrt_backward(grad, x, w, ls, s, 5, mask)
    for want, got, ref in zip(mask, part, full):
        if want:
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        else:
            assert got is None


def test_non_contiguous_inputs():
    M, K, N = 37, 45, 29
    x, w, ls, b = make_inputs(M, K, N, torch.float32)
    y, s = lrt.lrt_forward(x, w, ls, b, 3)
    grad = torch.randn(M, N, device=DEVICE)
    grads = lrt.lrt_backward(grad, x, w, ls, s, 3, (True, True, True, True))

    x_t = x.t().contiguous().t()  # column-major
    x_rows = torch.zeros(M, K + 7, device=DEVICE)[:, :K]  # padded rows: strided, no copy
    x_rows.copy_(x)
    w_t = w.t().contiguous().t()
    ls_step = torch.zeros(N, 2 * K, device=DEVICE)[:, ::2]
    ls_step.copy_(ls)
    b_step = torch.zeros(2 * N, device=DEVICE)[::2]
    b_step.copy_(b)
    for xi, wi, lsi, bi in ((x_t, w, ls, b), (x_rows, w_t, ls_step, b_step)):
        y2, s2 = lrt.lrt_forward(xi, wi, lsi, bi, 3)
        torch.testing.assert_close(y2, y, rtol=0, atol=0)
        torch.testing.assert_close(s2, s, rtol=0, atol=0)
        grad_t = grad.t().contiguous().t()
        grads2 = lrt.lrt_backward(grad_t, xi, wi, lsi, s2.t().contiguous().t(), 3, (True, True, True, True))
        for g1, g2 in zip(grads, grads2):
            torch.testing.assert_close(g2, g1, rtol=0, atol=0)


def test_expanded_grad():
    # y.sum().backward() hands the backward a stride-0 gradient
    M, K, N = 20, 33, 17
    x, w, ls, b = make_inputs(M, K, N, torch.float32)
    y, s = lrt.lrt_forward(x, w, ls, b, 11)
    ones = torch.ones((), device=DEVICE).expand(M, N)
    got = lrt.lrt_backward(ones, x, w, ls, s, 11, (True, True, True, True))
    want = lrt.lrt_backward(ones.contiguous(), x, w, ls, s, 11, (True, True, True, True))
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_input_checks():
    x, w, ls, b = make_inputs(5, 6, 7, torch.float32)
    with pytest.raises(TypeError):
        lrt.lrt_forward(x.half(), w, ls, b, 0)
    with pytest.raises(ValueError):
        lrt.lrt_forward(x, w, ls[:, :5], b, 0)
    with pytest.raises(ValueError):
        lrt.lrt_forward(x[:, :5], w, ls, b, 0)
    with pytest.raises(ValueError):
        lrt.lrt_forward(x, w, ls, b[:3], 0)
    with pytest.raises(TypeError):
        lrt.lrt_forward(x.double(), w.double(), ls.double(), b.double(), 0)


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


def test_forward_uses_lrt_noise():
    # x = 1, θ = 0, log σ² = 0: y = sqrt(K + 1e-8)·z exactly the noise of lrt_noise
    M, K, N = 37, 16, 29
    x = torch.ones(M, K, device=DEVICE)
    w = torch.zeros(N, K, device=DEVICE)
    y, s = lrt.lrt_forward(x, w, w, None, 77)
    torch.testing.assert_close(s, torch.full_like(s, math.sqrt(K + 1e-8)), rtol=1e-6, atol=0)
    torch.testing.assert_close(y / s, lrt.lrt_noise(M, N, 77, DEVICE), rtol=1e-6, atol=1e-6)
    y2, _ = lrt.lrt_forward(x, w, w, None, 77)
    assert torch.equal(y, y2)
    y3, _ = lrt.lrt_forward(x, w, w, None, 78)
    assert not torch.allclose(y, y3)


def test_seed_reduced_mod_2_63():
    z = lrt.lrt_noise(3, 5, 12, DEVICE)
    assert torch.equal(z, lrt.lrt_noise(3, 5, 12 + 2**63, DEVICE))
    assert torch.equal(lrt.lrt_noise(3, 5, -1, DEVICE), lrt.lrt_noise(3, 5, 2**63 - 1, DEVICE))
    assert not torch.equal(z, lrt.lrt_noise(3, 5, 13, DEVICE))


def test_wide_offsets():
    # 64-bit offsets (used when M·N ≥ 2^31) give the same numbers below 2^32 ...
    narrow = lrt._noise_flat(0, 3000, 42, DEVICE, wide=False)
    torch.testing.assert_close(lrt._noise_flat(0, 3000, 42, DEVICE, wide=True), narrow, rtol=0, atol=0)
    # ... and fresh ones above (no wrap-around to offset 0)
    high = lrt._noise_flat(2**32, 3000, 42, DEVICE, wide=True)
    assert not torch.allclose(high, narrow)
    assert abs(high.double().mean().item()) < 6 / math.sqrt(3000)
    assert abs(high.double().var().item() - 1) < 6 * math.sqrt(2 / 3000)
    across = lrt._noise_flat(2**32 - 1500, 3000, 42, DEVICE, wide=True)
    torch.testing.assert_close(across[1500:], high[:1500], rtol=0, atol=0)
    # the kernels' wide path matches the narrow one on a small problem
    M, K, N = 37, 45, 29
    x, w, ls, b = make_inputs(M, K, N, torch.float32)
    y, s = lrt.lrt_forward(x, w, ls, b, 9)
    for fuse in (False, True):
        yw, sw = lrt.lrt_forward(x, w, ls, b, 9, _wide=True, _fuse_noise=fuse)
        torch.testing.assert_close(yw, y, rtol=1e-6, atol=1e-6)
    grad = torch.randn(M, N, device=DEVICE)
    g1 = lrt.lrt_backward(grad, x, w, ls, s, 9, (True, True, True, True))
    g2 = lrt.lrt_backward(grad, x, w, ls, s, 9, (True, True, True, True), _wide=True)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_k_zero(dtype):
    M, N = 7, 5
    x, w, ls, b = make_inputs(M, 0, N, dtype)
    y, s = lrt.lrt_forward(x, w, ls, b, 21)
    z = lrt.lrt_noise(M, N, 21, DEVICE)
    assert y.dtype == dtype and s.dtype == dtype
    torch.testing.assert_close(y, (b.float() + 1e-4 * z).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(s, torch.full((M, N), 1e-4, dtype=dtype, device=DEVICE), rtol=0, atol=0)
    y0, _ = lrt.lrt_forward(x, w, ls, None, 21)
    torch.testing.assert_close(y0, (1e-4 * z).to(dtype), rtol=0, atol=0)
    grad = torch.randn(M, N, device=DEVICE).to(dtype)
    dx, dw, dls, db = lrt.lrt_backward(grad, x, w, ls, s, 21, (True, True, True, True))
    assert dx.shape == (M, 0) and dw.shape == (N, 0) and dls.shape == (N, 0)
    torch.testing.assert_close(db, grad.float().sum(0).to(dtype))


def test_m_zero_and_n_zero():
    x, w, ls, b = make_inputs(0, 6, 4, torch.float32)
    y, s = lrt.lrt_forward(x, w, ls, b, 0)
    assert y.shape == (0, 4) and s.shape == (0, 4)
    dx, dw, dls, db = lrt.lrt_backward(y, x, w, ls, s, 0, (True, True, True, True))
    assert dx.shape == (0, 6)
    for t in (dw, dls, db):
        assert torch.count_nonzero(t) == 0
    assert dw.shape == (4, 6) and db.shape == (4,)

    x, w, ls, b = make_inputs(3, 6, 0, torch.float32)
    y, s = lrt.lrt_forward(x, w, ls, b, 0)
    assert y.shape == (3, 0)
    dx, dw, dls, db = lrt.lrt_backward(y, x, w, ls, s, 0, (True, True, True, True))
    assert dx.shape == (3, 6) and torch.count_nonzero(dx) == 0
    assert dw.shape == (0, 6) and db.shape == (0,)
    assert lrt.lrt_noise(0, 5, 1, DEVICE).shape == (0, 5)


# ------------------------------------------------------------------------------------------
# CUDA only: bf16 / TF32 / larger shapes (autotuned configs)
# ------------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(256, 512, 384), (300, 1000, 700), (1024, 256, 2048)], ids=str)
def test_cuda_large(shape, dtype):
    M, K, N = shape
    x, w, ls, b = make_inputs(M, K, N, dtype, seed=3)
    seed = 2024
    y, s = lrt.lrt_forward(x, w, ls, b, seed)
    z = lrt.lrt_noise(M, N, seed, DEVICE)
    grad = torch.randn(M, N, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    (y64, *g64), (ysame, *gsame) = reference_pair(x, w, ls, b, z, grad)
    assert_fa(y, y64, ysame, "y")
    grads = lrt.lrt_backward(grad, x, w, ls, s, seed, (True, True, True, True))
    for name, got, r64, rsame in zip(("dx", "dweight", "dlog_sigma2", "dbias"), grads, g64, gsame):
        assert_fa(got, r64, rsame, name)


@cuda_only
def test_cuda_tf32():
    M, K, N = 256, 512, 384
    x, w, ls, b = make_inputs(M, K, N, torch.float32, seed=5)
    z = lrt.lrt_noise(M, N, 1, DEVICE)
    ref64 = reference.lrt_linear(x.double(), w.double(), ls.double(), b.double(), z.double())
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        y_ieee, _ = lrt.lrt_forward(x, w, ls, b, 1)
        torch.backends.cuda.matmul.allow_tf32 = True
        y_tf32, _ = lrt.lrt_forward(x, w, ls, b, 1)
        same_tf32 = reference.lrt_linear(x, w, ls, b, z)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    err_ieee = (y_ieee.double() - ref64).abs().max().item()
    err_tf32 = (y_tf32.double() - ref64).abs().max().item()
    assert err_ieee < 1e-4
    assert err_tf32 <= 2 * (same_tf32.double() - ref64).abs().max().item() + 1e-5
    assert err_tf32 > err_ieee  # TF32 really was used


@cuda_only
def test_cuda_noise_matches_forward_bitwise():
    M, K, N = 300, 64, 700
    x = torch.ones(M, K, device=DEVICE)
    w = torch.zeros(N, K, device=DEVICE)
    y, s = lrt.lrt_forward(x, w, w, None, 31337)
    torch.testing.assert_close(y / s, lrt.lrt_noise(M, N, 31337, DEVICE), rtol=2e-7, atol=1e-7)
