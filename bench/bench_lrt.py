"""LRT linear: sparsevd's kernels against the eager reference, torch.compile of it, and
a dense nn.Linear of the same shape (the yardstick for the ~2× floor).

"sparsevd-sample" is the other route to the same function: the two products by the
vendor GEMM (cuBLAS / MKL through F.linear) and only the sampling step fused
(``functional.lrt_sample``, noise regenerated in backward). Timing both in one run says
which route the dispatcher should take on a device."""

import pytest
import torch

import harness
import sparsevd
from sparsevd import reference

DEV = harness.device()
if DEV.type == "cuda":
    SHAPES = [(256, 1024, 1024), (4096, 1024, 1024), (16384, 1024, 1024),
              (256, 4096, 4096), (4096, 4096, 4096), (16384, 4096, 4096),
              (100, 784, 300), (100, 300, 100)]  # (M, K, N); the last two: LeNet-300-100
    DTYPES = [torch.float32, torch.bfloat16]
else:  # the CPU runs the reference path by default: small shapes, fp32
    SHAPES = [(256, 1024, 1024), (100, 784, 300), (100, 300, 100)]
    DTYPES = [torch.float32]
if harness.QUICK:
    SHAPES = [(4096, 4096, 4096), (100, 784, 300)] if DEV.type == "cuda" else [(100, 784, 300)]
IMPLS = ["sparsevd", "sparsevd-sample", "eager", "compile", "dense"]


def eager_lrt(x, w, s, b):
    """What a user writes without us: the reference formula with torch's own noise."""
    return reference.lrt_linear(x, w, s, b, torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype))


_compiled_lrt = harness.compiled(eager_lrt)


def sampled_lrt(x, w, s, b):
    mean = torch.nn.functional.linear(x, w, b)
    var = torch.nn.functional.linear(x * x, torch.exp(s))
    return sparsevd.functional.lrt_sample(mean, var)


def _impl(name):
    if name == "sparsevd":
        return sparsevd.functional.lrt_linear
    if name == "sparsevd-sample":
        return sampled_lrt
    if name == "eager":
        return eager_lrt
    if name == "compile":
        return _compiled_lrt
    return lambda x, w, s, b: torch.nn.functional.linear(x, w, b)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", IMPLS)
def test_lrt_linear(benchmark, impl, shape, dtype, mode):
    m, k, n = shape
    torch.manual_seed(0)
    x = torch.randn(m, k, device=DEV, dtype=dtype, requires_grad=mode != "fwd")
    w = (torch.randn(n, k, device=DEV, dtype=dtype) / k**0.5).requires_grad_(mode != "fwd")
    s = torch.full((n, k), -8.0, device=DEV, dtype=dtype, requires_grad=mode != "fwd")
    b = torch.zeros(n, device=DEV, dtype=dtype, requires_grad=mode != "fwd")
    f = _impl(impl)
    params = (x, w, b) if impl == "dense" else (x, w, s, b)
    grad = torch.randn(m, n, device=DEV, dtype=dtype)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                f(x, w, s, b)
    else:
        def run():
            torch.autograd.grad(f(x, w, s, b), params, grad)

    gemms = (1 if impl == "dense" else 2) * (1 if mode == "fwd" else 3)
    benchmark.group = f"lrt {mode} {dtype} M={m} K={k} N={n}".replace("torch.", "")
    harness.measure(benchmark, run, DEV, impl=impl, flops=2 * m * k * n * gemms, shape=shape, dtype=str(dtype), mode=mode)
