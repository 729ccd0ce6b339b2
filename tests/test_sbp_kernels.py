"""The SBP kernels (C++ on CPU: csrc/cpu/sbp.cpp; Triton for CUDA: triton_kernels/sbp.py, run
by the interpreter on CPU tensors) against the reference kernels: every dtype, odd unit
counts (lane tails), empty batches, the whole clip range, 1 and 2 threads, every
instruction-set path, the exact noise, and bad input."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_close_fa
from sparsevd import dispatch
from sparsevd.backends import default

# the interpreter evaluates both sides of every tl.where: the unused side's log(0) warns
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
ops = torch.ops.sparsevd
needs_extension = pytest.mark.skipif(not dispatch.HAS_EXTENSION, reason="extension sparsevd._C not built")
BOUNDS = [(-20.0, 0.0), (-3.0, 1.0), (-1.0, -0.9)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_MUS = [-25.0, -20.0, -19.99, -15.0, -10.0, -5.0, -0.5, -0.01, 0.0, 0.01, 0.5, 2.0, 5.0, 7.0]
_LOG_SIGMAS = [-21.0, -20.0, -15.0, -10.0, -5.0, -3.0, -1.0, 0.0, 1.0, 3.0, 5.0]


def _grid(dtype, units=None, seed=0):
    """μ, log σ over (and beyond) the clip range; ``units`` random ones instead."""
    if units is None:
        mu = torch.tensor([m for m in _MUS for _ in _LOG_SIGMAS])
        ls = torch.tensor([s for _ in _MUS for s in _LOG_SIGMAS])
    else:
        g = torch.Generator().manual_seed(seed)
        mu = torch.rand(units, generator=g) * 8 - 6
        ls = torch.rand(units, generator=g) * 10 - 7
    return mu.to(dtype), ls.to(dtype)


def _seed(value=11):
    return torch.tensor(value, dtype=torch.int64)


def _check_sample(got, mu, ls, batch, bounds, with_grad=True):
    """FA rule per output, scaled by θ·max(1, σ) (log θ = μ + σξ, so its rounding grows with
    σ, and the derivatives are accurate relative to θ): the kernel within 2× the float32
    reference's error against float64, + 1e-6."""
    ref64 = default.KERNELS["sbp_sample"](mu.double(), ls.double(), _seed(), batch, *bounds, with_grad)
    same = default.KERNELS["sbp_sample"](mu, ls, _seed(), batch, *bounds, with_grad)
    sigma = ls.double().clamp(-20, 5).exp().clamp(min=1)
    theta64 = ref64[0] * sigma
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    for out, r64, r in list(zip(got, ref64, same))[: 3 if with_grad else 1]:
        assert out.dtype == acc and out.shape == (batch, mu.numel())
        assert torch.isfinite(out).all()
        if mu.dtype == torch.float64:
            torch.testing.assert_close(out / theta64, r64 / theta64, rtol=0, atol=1e-9)
        else:
            assert_close_fa(out.double() / theta64, r64 / theta64, r.double() / theta64, atol=1e-6)
    if not with_grad:
        assert got[1].shape == (0,) and got[2].shape == (0,)


# --- C++ ----------------------------------------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("bounds", BOUNDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_kl_matches_reference(dtype, bounds):
    mu, ls = _grid(dtype)
    kl, dmu, dls = ops.sbp_kl(mu, ls, *bounds)
    rkl, rdmu, rdls = default.KERNELS["sbp_kl"](mu, ls, *bounds)
    assert kl.dtype == rkl.dtype and dmu.dtype == dtype and dls.dtype == dtype
    torch.testing.assert_close(kl, rkl, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
    # both in double by different special-function routes: rounding differences, which
    # ∂/∂log σ = −1 − P ∂KL/∂P − Q ∂KL/∂Q amplifies where its terms cancel
    rtol, atol = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-6, 1e-6)}.get(dtype, (1e-2, 1e-2))
    torch.testing.assert_close(dmu, rdmu, rtol=rtol, atol=atol)
    torch.testing.assert_close(dls, rdls, rtol=rtol, atol=atol)


@needs_extension
@pytest.mark.parametrize("bounds", BOUNDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_sample_matches_reference_over_the_clip_range(dtype, bounds):
    mu, ls = _grid(dtype)
    got = ops.sbp_sample(mu, ls, _seed(), 67, *bounds, True)
    _check_sample(got, mu, ls, 67, bounds)
    plain = ops.sbp_sample(mu, ls, _seed(), 67, *bounds, False)
    _check_sample(plain, mu, ls, 67, bounds, with_grad=False)


@needs_extension
@pytest.mark.parametrize("units", [1, 3, 15, 16, 17, 33, 200])
@pytest.mark.parametrize("batch", [0, 1, 7])
def test_cpp_sample_odd_shapes(units, batch):
    mu, ls = _grid(torch.float32, units, seed=units)
    got = ops.sbp_sample(mu, ls, _seed(), batch, -20.0, 0.0, True)
    if batch == 0:
        assert all(t.shape == (0, units) for t in got)
        return
    _check_sample(got, mu, ls, batch, (-20.0, 0.0))


@needs_extension
def test_cpp_noise_is_the_reference_noise_and_threads_agree():
    mu = torch.zeros(37)
    assert torch.equal(ops.sbp_noise(mu, _seed(5), 9), default.KERNELS["sbp_noise"](mu, _seed(5), 9))
    mu, ls = _grid(torch.float32, 1000)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.sbp_sample(mu, ls, _seed(), 300, -20.0, 0.0, True)
        torch.set_num_threads(2)
        two = ops.sbp_sample(mu, ls, _seed(), 300, -20.0, 0.0, True)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@needs_extension
def test_cpp_errors():
    mu, ls = torch.zeros(4), torch.zeros(4)
    with pytest.raises(RuntimeError, match="NaN"):
        ops.sbp_kl(torch.tensor([0.0, float("nan")]), torch.zeros(2), -20.0, 0.0)
    with pytest.raises(RuntimeError, match="NaN"):
        ops.sbp_sample(mu, torch.tensor([0.0, 0.0, 0.0, float("nan")]), _seed(), 2, -20.0, 0.0, True)
    with pytest.raises(RuntimeError, match="a < b"):
        ops.sbp_kl(mu, ls, 0.0, -20.0)
    with pytest.raises(RuntimeError, match="1-D of one shape"):
        ops.sbp_sample(mu, torch.zeros(5), _seed(), 2, -20.0, 0.0, True)
    with pytest.raises(RuntimeError, match="batch"):
        ops.sbp_sample(mu, ls, _seed(), -1, -20.0, 0.0, True)
    with pytest.raises(RuntimeError, match="seed"):
        ops.sbp_sample(mu, ls, torch.tensor(1.0), 2, -20.0, 0.0, True)


_ISA_SCRIPT = """
import torch, sparsevd
from sparsevd.backends import default
mu = torch.rand(300) * 8 - 6
ls = torch.rand(300) * 10 - 7
seed = torch.tensor(3)
got = torch.ops.sparsevd.sbp_sample(mu, ls, seed, 19, -20.0, 0.0, True)
ref = default.KERNELS["sbp_sample"](mu, ls, seed, 19, -20.0, 0.0, True)
for g, r in zip(got, ref):
    assert ((g - r).abs() / ref[0]).max() < 1e-4, ((g - r).abs() / ref[0]).max()
print("ok")
"""


@needs_extension
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_cpp_every_instruction_set_path(capability):
    widest = torch.backends.cpu.get_cpu_capability().lower()
    order = ["default", "avx2", "avx512"]
    if widest in order and order.index(capability) > order.index(widest):
        pytest.skip(f"this CPU's widest instruction set is {widest}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    done = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]


# --- Triton (the interpreter on CPU tensors; for real on CUDA) -----------------------------------

triton = pytest.importorskip("triton")
from sparsevd import reference  # noqa: E402
from sparsevd.triton_kernels import sbp as triton_sbp  # noqa: E402

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("bounds", BOUNDS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_kl_matches_reference(dtype, bounds):
    mu, ls = (t.to(TRITON_DEVICE) for t in _grid(dtype))
    kl, dmu, dls = triton_sbp.sbp_kl(mu, ls, *bounds)
    rkl, rdmu, rdls = default.KERNELS["sbp_kl"](mu.cpu(), ls.cpu(), *bounds)
    assert kl.dtype == torch.float32 and dmu.dtype == dls.dtype == dtype
    torch.testing.assert_close(kl.cpu(), rkl, rtol=1e-6, atol=0)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(dmu.cpu(), rdmu, rtol=tol, atol=tol)
    torch.testing.assert_close(dls.cpu(), rdls, rtol=tol, atol=tol)


@pytest.mark.parametrize("bounds", BOUNDS)
@pytest.mark.parametrize("with_grad", [True, False])
def test_triton_sample_matches_reference(bounds, with_grad):
    # against the reference at the kernel's own (Philox) uniforms
    mu, ls = (t.to(TRITON_DEVICE) for t in _grid(torch.float32))
    batch = 5
    got = triton_sbp.sbp_sample(mu, ls, 7, batch, *bounds, with_grad)
    u = triton_sbp.sbp_noise(mu.numel(), batch, 7, TRITON_DEVICE).cpu()
    assert u.dtype == torch.float32 and ((u >= 0) & (u < 1)).all()
    ref64 = reference.sbp_sample(mu.cpu().double(), ls.cpu().double(), u, bounds, with_grad)
    same = reference.sbp_sample(mu.cpu(), ls.cpu(), u, bounds, with_grad)
    scale = ref64[0] * ls.cpu().double().clamp(-20, 5).exp().clamp(min=1)
    for out, r64, r in list(zip(got, ref64, same))[: 3 if with_grad else 1]:
        assert out.dtype == torch.float32 and out.shape == (batch, mu.numel())
        assert_close_fa(out.cpu().double() / scale, r64 / scale, r.double() / scale, atol=1e-6)
    if not with_grad:
        assert got[1].shape == (0,)


@pytest.mark.parametrize("units,batch", [(1, 1), (3, 0), (17, 3), (300, 2)])
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_sample_odd_shapes_and_dtypes(units, batch, dtype):
    mu, ls = (t.to(TRITON_DEVICE) for t in _grid(dtype, units, seed=units))
    got = triton_sbp.sbp_sample(mu, ls, 3, batch, -20.0, 0.0, True)
    assert all(t.shape == (batch, units) and t.dtype == torch.float32 for t in got)
    if batch:
        u = triton_sbp.sbp_noise(units, batch, 3, TRITON_DEVICE).cpu()
        ref = reference.sbp_sample(mu.cpu(), ls.cpu(), u, (-20.0, 0.0), True)
        for out, r in zip(got, ref):
            assert ((out.cpu() - r).abs() / ref[0]).max() < 1e-4


def test_triton_errors():
    mu = torch.zeros(3, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="NaN"):
        triton_sbp.sbp_kl(torch.tensor([0.0, float("nan")], device=TRITON_DEVICE), mu[:2], -20.0, 0.0)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        triton_sbp.sbp_sample(mu.double(), mu.double(), 1, 2, -20.0, 0.0, True)
    with pytest.raises(ValueError, match="a < b"):
        triton_sbp.sbp_kl(mu, mu, 0.0, -1.0)
