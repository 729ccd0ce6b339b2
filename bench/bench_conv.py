"""LRT convolution: sparsevd's SparseVD conv (two vendor convolutions, then the fused
sampling step ``functional.lrt_sample``) against the eager reference with torch's own
noise, torch.compile of it, and a dense convolution of the same shape (the yardstick:
the LRT does two convolutions forward and four backward, so ~2× is the floor). Also im2col
alone, as the pruned CSR convolution runs it: the cost model's im2col bandwidth."""

import pytest
import torch

import harness
from sparsevd import reference
from sparsevd.conv import lrt_conv2d

DEV = harness.device()
CUDA = DEV.type == "cuda"
# (batch, in, out, H=W, kernel, padding): LeNet-5-Caffe's two convolutions at batch 100,
# and on GPU a ResNet-style 3x3 block layer
SHAPES = [(100, 1, 20, 28, 5, 0), (100, 20, 50, 12, 5, 0)]
if CUDA:
    SHAPES += [(32, 64, 64, 56, 3, 1), (256, 128, 128, 28, 3, 1)]
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
if harness.QUICK:
    SHAPES = SHAPES[1:2] + SHAPES[-1:]
IMPLS = ["sparsevd", "eager", "compile", "dense"]


def eager_lrt(x, w, s, b, padding):
    noise_shape = torch.nn.functional.conv2d(x[:1], w, None, 1, padding).shape[1:]
    z = torch.randn(x.shape[0], *noise_shape, device=x.device, dtype=x.dtype)
    return reference.lrt_conv(x, w, s, b, z, 1, padding)


_compiled_lrt = harness.compiled(eager_lrt)


def _impl(name):
    if name == "sparsevd":
        return lambda x, w, s, b, padding: lrt_conv2d(x, w, s, b, 1, padding)
    if name == "eager":
        return eager_lrt
    if name == "compile":
        return _compiled_lrt
    return lambda x, w, s, b, padding: torch.nn.functional.conv2d(x, w, b, 1, padding)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-{}x{}-{}px-k{}".format(*s[:5]))
@pytest.mark.parametrize("impl", IMPLS)
def test_lrt_conv2d(benchmark, impl, shape, dtype, mode):
    batch, cin, cout, size, k, padding = shape
    torch.manual_seed(0)
    train = mode != "fwd"
    x = torch.randn(batch, cin, size, size, device=DEV, dtype=dtype, requires_grad=train)
    w = (torch.randn(cout, cin, k, k, device=DEV, dtype=dtype) / (cin * k * k) ** 0.5).requires_grad_(train)
    s = torch.full((cout, cin, k, k), -8.0, device=DEV, dtype=dtype, requires_grad=train)
    b = torch.zeros(cout, device=DEV, dtype=dtype, requires_grad=train)
    f = _impl(impl)
    params = (x, w, b) if impl == "dense" else (x, w, s, b)
    out_size = size + 2 * padding - k + 1
    grad = torch.randn(batch, cout, out_size, out_size, device=DEV, dtype=dtype)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                f(x, w, s, b, padding)
    else:
        def run():
            torch.autograd.grad(f(x, w, s, b, padding), params, grad)

    convs = (1 if impl == "dense" else 2) * (1 if mode == "fwd" else 3)
    flops = 2 * batch * cout * out_size**2 * cin * k * k * convs
    benchmark.group = f"lrt-conv {mode} {dtype} batch={batch} {cin}->{cout} {size}px k={k}".replace("torch.", "")
    harness.measure(benchmark, run, DEV, impl=impl, flops=flops, shape=shape, dtype=str(dtype), mode=mode)


# im2col as SparseConv2d runs it before its CSR SpMM: F.unfold, then the [N·L, C·k²] copy the
# SpMM reads. "bytes" is the patch matrix's size, as sparsify's cost model counts it
# (DeviceCost.im2col_bandwidth = bytes / time; bench/fit_cost_model.py reads these rows).
IM2COL = [(100, 20, 12, 5, 0), (32, 64, 56, 3, 1), (256, 128, 28, 3, 1)]  # (batch, C, H=W, k, padding)
if not CUDA:
    IM2COL = IM2COL[:1]


@pytest.mark.parametrize("shape", IM2COL, ids=lambda s: "b{}-c{}-{}px-k{}".format(*s[:4]))
def test_im2col(benchmark, shape):
    batch, channels, size, k, padding = shape
    x = torch.randn(batch, channels, size, size, device=DEV)

    def run():
        patches = torch.nn.functional.unfold(x, k, padding=padding)
        patches.transpose(1, 2).reshape(-1, channels * k * k)

    out = size + 2 * padding - k + 1
    patch_bytes = batch * out * out * channels * k * k * x.element_size()
    benchmark.group = f"im2col batch={batch} {channels}ch {size}px k={k}"
    harness.measure(benchmark, run, DEV, impl="im2col", bytes=patch_bytes, shape=shape)
