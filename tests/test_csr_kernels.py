"""The compiled csr_linear kernels (csrc/cpu/csr_linear.cpp, csrc/cuda/csr_spmm.cu).

Every result is checked against the float64 reference (`reference.csr_linear` on upcast
inputs) with flash-attention's rule: the kernel's error may be at most twice the error
of the same computation done by dense torch in the same dtype (`reference.csr_linear`
in that dtype, i.e. F.linear on the densified weight), plus a small absolute slack.
CUDA cases run where a GPU is present and are skipped otherwise.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import sparsevd  # noqa: F401  (loads sparsevd._C, which registers torch.ops.sparsevd.*)
from sparsevd import dispatch, reference

pytestmark = [
    pytest.mark.skipif(not dispatch.HAS_EXTENSION, reason="extension sparsevd._C not built"),
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta"),
]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Absolute slack on top of the 2x rule, per dtype (outputs here are O(1..10)).
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
PATTERNS = ["random", "empty_rows", "all_zero", "one_nonzero", "full_row", "dense"]


def csr_linear(*args):
    return torch.ops.sparsevd.csr_linear(*args)


def compiled_kernel(key):
    """True when the dispatcher's `key` kernel of csr_linear is a C++ one (not Python's)."""
    dump = torch._C._dispatch_dump("sparsevd::csr_linear")
    return any(line.startswith(f"{key}:") and ".cpp:" in line for line in dump.splitlines())


@pytest.fixture(autouse=True)
def _strict_fp32_matmul():
    # The same-dtype torch baseline must be true fp32 on GPUs (no TF32).
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def make_weight(n, k, pattern="random", density=0.3, seed=0):
    """A float64 dense [n, k] weight with the given sparsity pattern."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    mask = torch.rand(n, k, generator=g) < density
    if pattern == "empty_rows":
        mask[::3] = False  # every third output feature pruned away
        mask[-1] = False
    elif pattern == "all_zero":
        mask[:] = False
    elif pattern == "one_nonzero":
        mask[:] = False
        mask[n // 2, k // 3] = True
    elif pattern == "full_row":
        mask[n // 3] = True
    elif pattern == "dense":
        mask[:] = True
    return w * mask


def to_csr(dense, dtype, device):
    csr = dense.to_sparse_csr()
    crow = csr.crow_indices().to(torch.int32).to(device)
    col = csr.col_indices().to(torch.int32).to(device)
    values = csr.values().to(dtype).to(device)
    return crow, col, values


def check(x, crow, col, values, bias, n):
    """Runs the kernel and checks it against the float64 reference by the 2x rule."""
    out = csr_linear(x, crow, col, values, bias)
    assert out.shape == (x.shape[0], n)
    assert out.dtype == x.dtype and out.device == x.device
    b64 = None if bias is None else bias.double()
    ref64 = reference.csr_linear(x.double(), crow, col, values.double(), b64)
    same = reference.csr_linear(x, crow, col, values, bias)  # dense torch, same dtype
    if x.shape[0] == 0 or n == 0:
        return out
    assert torch.isfinite(out).all()
    err = (out.double() - ref64).abs().max().item()
    base = (same.double() - ref64).abs().max().item()
    atol = ATOL[x.dtype]
    assert err <= 2 * base + atol, f"kernel error {err:.3e} vs same-dtype torch error {base:.3e}"
    return out


def test_compiled_kernels_registered():
    assert compiled_kernel("CPU"), torch._C._dispatch_dump("sparsevd::csr_linear")
    if torch.cuda.is_available() and torch.version.cuda is not None:
        assert compiled_kernel("CUDA"), torch._C._dispatch_dump("sparsevd::csr_linear")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("m", [0, 1, 2, 3, 5, 16, 17, 130])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(device, dtype, pattern, m, bias):
    n, k = 37, 45
    dense = make_weight(n, k, pattern, seed=m)
    crow, col, values = to_csr(dense, dtype, device)
    g = torch.Generator().manual_seed(100 + m)
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    b = torch.randn(n, generator=g).to(dtype).to(device) if bias else None
    out = check(x, crow, col, values, b, n)
    if dtype == torch.float64 and m > 0:
        # and against dense F.linear directly
        torch.testing.assert_close(out, F.linear(x, dense.to(device), b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["strided_k", "transposed", "row_slice"])
@pytest.mark.parametrize("m", [1, 3, 64, 130, 136])  # 136: a transposed x used in place on GPUs
def test_non_contiguous_x(device, dtype, layout, m):
    n, k = 37, 45
    dense = make_weight(n, k, "random", seed=7)
    crow, col, values = to_csr(dense, dtype, device)
    g = torch.Generator().manual_seed(m)
    if layout == "strided_k":  # stride(1) == 2
        x = torch.randn(m, 2 * k, generator=g).to(dtype).to(device)[:, ::2]
    elif layout == "transposed":  # stride(0) == 1: a [K, M] tensor seen as [M, K]
        x = torch.randn(k, m, generator=g).to(dtype).to(device).t()
    else:  # rows with a gap between them, from an unaligned offset
        x = torch.randn(m, k + 3, generator=g).to(dtype).to(device)[:, 1 : k + 1]
    assert not x.is_contiguous() or m == 1
    b = torch.randn(n, generator=g).to(dtype).to(device)
    out = check(x, crow, col, values, b, n)
    torch.testing.assert_close(out, csr_linear(x.contiguous(), crow, col, values, b), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,k,density,m",
    [
        (300, 784, 0.05, 1),  # a LeNet-300 layer after SparseVD, batch 1
        (300, 784, 0.05, 8),
        (300, 784, 0.05, 130),
        (515, 1031, 0.1, 1),  # large enough to run on several CPU threads
        (515, 1031, 0.1, 33),
        (64, 2000, 0.6, 4),  # long rows: many chunks per row on the GPU
        (64, 2000, 0.6, 40),
        (1100, 60, 0.2, 17),  # many rows: the GPU's large-M kernel from M = 17
        (1100, 60, 0.2, 64),
        (33, 50, 0.3, 600),  # batch wider than one GPU tile (several grid rows)
        (7, 9, 0.5, 1100),
    ],
)
def test_larger_shapes(device, dtype, n, k, density, m):
    dense = make_weight(n, k, "empty_rows", density=density, seed=n + m)
    crow, col, values = to_csr(dense, dtype, device)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    b = torch.randn(n, generator=g).to(dtype).to(device)
    check(x, crow, col, values, b, n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_cases(device, dtype):
    k = 6
    # nnz == 0: the bias broadcast, or zeros
    crow = torch.zeros(5, dtype=torch.int32, device=device)
    col = torch.zeros(0, dtype=torch.int32, device=device)
    values = torch.zeros(0, dtype=dtype, device=device)
    x = torch.randn(3, k, device=device).to(dtype)
    b = torch.randn(4, device=device).to(dtype)
    torch.testing.assert_close(csr_linear(x, crow, col, values, b), b.expand(3, 4), rtol=0, atol=0)
    torch.testing.assert_close(csr_linear(x, crow, col, values, None), torch.zeros(3, 4, dtype=dtype, device=device))
    # M == 0
    assert csr_linear(x[:0], crow, col, values, b).shape == (0, 4)
    dense = make_weight(4, k, "random", density=0.5)
    crow2, col2, values2 = to_csr(dense, dtype, device)
    assert csr_linear(x[:0], crow2, col2, values2, None).shape == (0, 4)
    # N == 0
    crow0 = torch.zeros(1, dtype=torch.int32, device=device)
    assert csr_linear(x, crow0, col, values, None).shape == (3, 0)
    # K == 0 with no non-zeros: bias only
    torch.testing.assert_close(csr_linear(x[:, :0], crow, col, values, b), b.expand(3, 4), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    dense = make_weight(300, 784, "random", density=0.05)
    crow, col, values = to_csr(dense, torch.float32, device)
    for m in (1, 7, 100):
        x = torch.randn(m, 784, device=device)
        assert torch.equal(csr_linear(x, crow, col, values, None), csr_linear(x, crow, col, values, None))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    dense = make_weight(4, 6, "random", density=0.5)
    crow, col, values = to_csr(dense, torch.float32, device)
    x = torch.randn(3, 6, device=device)
    b = torch.randn(4, device=device)
    cases = [
        ((x, crow.long(), col, values, b), "crow_indices must be int32"),
        ((x, crow, col.long(), values, b), "col_indices must be int32"),
        ((x, torch.cat([crow, crow[-1:]]), col, values, b), "bias must be 1-D with one entry per output feature"),
        ((x, crow, col, values, torch.randn(5, device=device)), r"bias must be 1-D .*N = crow_indices.numel\(\) - 1 = 4"),
        ((x, crow, col[:-1], values, b), "col_indices and values must have the same length"),
        ((x.double(), crow, col, values, b), "x and values must have the same dtype"),
        ((x, crow, col, values, b.half()), "bias must have the dtype of x"),
        ((x[0], crow, col, values, b), r"x must be 2-D \[M, K\]"),
        ((x[:, :0], crow, col, values, b), "x has K = 0 features but W has"),
        ((x, crow[:0], col, values, b), "crow_indices must have N \\+ 1 >= 1 entries"),
        ((x, crow.view(1, -1), col, values, b), "crow_indices must be 1-D"),
        ((x.long(), crow, col, values.long(), b.long()), "values must be float32, float16, bfloat16 or float64"),
    ]
    if device == "cpu":  # (test_invalid_structure_raises_and_never_crashes has the rest)
        bad_end = crow.clone()
        bad_end[-1] += 1
        cases.append(((x, bad_end, col, values, b), "crow_indices must start at 0 and end at nnz"))
    else:
        cases += [
            ((x, crow.cpu(), col, values, b), "all tensors must be on the same device"),
            ((x, crow, col, values.cpu(), b), "all tensors must be on the same device"),
            ((x, crow, col, values, b.cpu()), "bias must be on the same device as x"),
            ((x.cpu(), crow, col, values, b), "all tensors must be on the same device"),
        ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            csr_linear(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu_kernel(dtype):
    """Both compiled kernels accumulate in fp32: they agree to a few output ulps."""
    dense = make_weight(300, 784, "empty_rows", density=0.05)
    crow, col, values = to_csr(dense, dtype, "cpu")
    b = torch.randn(300).to(dtype)
    for m in (1, 9, 64, 257):
        x = torch.randn(m, 784).to(dtype)
        cpu = csr_linear(x, crow, col, values, b)
        gpu = csr_linear(x.cuda(), crow.cuda(), col.cuda(), values.cuda(), b.cuda())
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=tol, atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_current_stream_and_device():
    dense = make_weight(37, 45, "random")
    crow, col, values = to_csr(dense, torch.float32, "cuda")
    x = torch.randn(17, 45, device="cuda")
    want = csr_linear(x, crow, col, values, None)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = csr_linear(x, crow, col, values, None)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 5, 70])
@pytest.mark.parametrize("pattern", ["random", "empty_rows", "full_row"])
def test_row_order_only_schedules(device, batch, pattern):
    # the same sums per row in any schedule: bit-identical outputs
    dense = make_weight(67, 45, pattern, density=0.2)
    crow, col, values = to_csr(dense, torch.float32, device)
    x = torch.randn(batch, 45, device=device)
    b = torch.randn(67, device=device)
    order = sparsevd.functional.rows_by_length(crow)
    lengths = (crow[1:] - crow[:-1])[order.long()]
    assert bool((lengths[:-1] >= lengths[1:]).all())
    reverse = torch.arange(66, -1, -1, dtype=torch.int32, device=device)
    want = csr_linear(x, crow, col, values, b)
    for row_order in (order, reverse):
        torch.testing.assert_close(csr_linear(x, crow, col, values, b, row_order), want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_row_order(device):
    dense = make_weight(4, 6, "random", density=0.5)
    crow, col, values = to_csr(dense, torch.float32, device)
    x = torch.randn(3, 6, device=device)
    order = torch.arange(4, dtype=torch.int32, device=device)
    for bad, message in [(order.long(), "row_order must be a 1-D int32"), (order[:3], "row_order must be a 1-D int32"),
                         (order.view(2, 2), "row_order must be a 1-D int32")]:
        with pytest.raises(RuntimeError, match=message):
            csr_linear(x, crow, col, values, None, bad)
    with pytest.raises(ValueError, match="permutation"):
        sparsevd.functional.csr_linear(x, crow, col, values, row_order=torch.tensor([0, 0, 1, 2], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="1-D int32"):
        sparsevd.functional.csr_linear(x, crow, col, values, row_order=order.long())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_row_order_device_mismatch():
    dense = make_weight(4, 6, "random", density=0.5)
    crow, col, values = to_csr(dense, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="row_order must be on the same device"):
        csr_linear(torch.randn(3, 6, device="cuda"), crow, col, values, None, torch.arange(4, dtype=torch.int32))


# ---- panels, threads and instruction sets (CPU) ----------------------------------------------


@pytest.fixture
def threads():
    """Run a test body under a given torch thread count, restoring it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,k,m",
    [
        (37, 45, 15), (37, 45, 31), (37, 45, 32), (37, 45, 33), (37, 45, 63), (37, 45, 64),
        (37, 45, 65), (37, 45, 127), (37, 45, 129), (37, 45, 257),  # around SIMD and block widths
        (50, 2000, 70),  # a K that narrows the block so its panel stays in L2
        (50, 3100, 40),  # narrower still
    ],
)
def test_batch_blocks(dtype, n, k, m):
    dense = make_weight(n, k, "empty_rows", density=0.1, seed=m)
    crow, col, values = to_csr(dense, dtype, "cpu")
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    check(x, crow, col, values, b, n)
    check(x, crow, col, values, None, n)


@pytest.mark.parametrize("m", [1, 40, 64, 130, 256, 600])  # rows split, blocks split, both odd
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_give_the_same_bits(threads, m, dtype):
    # every output is summed in the same order whatever the partition
    dense = make_weight(515, 1031, "empty_rows", density=0.1, seed=3)
    crow, col, values = to_csr(dense, dtype, "cpu")
    x = torch.randn(m, 1031).to(dtype)
    b = torch.randn(515).to(dtype)
    threads(1)
    one = csr_linear(x, crow, col, values, b)
    threads(2)
    two = csr_linear(x, crow, col, values, b)
    assert torch.equal(one, two)
    check(x, crow, col, values, b, 515)


@pytest.mark.parametrize("m", [1, 40, 600])  # the GEMV, rows split, blocks split
def test_more_threads_than_cores_give_the_same_bits(threads, m):
    # an oversubscribed team: late threads find their tasks taken, and calls that waited
    # for them fall back to one thread for a while (csr_kernels.h, run_tasks)
    dense = make_weight(515, 1031, "empty_rows", density=0.1, seed=4)
    crow, col, values = to_csr(dense, torch.float32, "cpu")
    x = torch.randn(m, 1031)
    threads(1)
    one = csr_linear(x, crow, col, values, None)
    threads(4 * (os.cpu_count() or 1))
    for _ in range(20):
        assert torch.equal(csr_linear(x, crow, col, values, None), one)


# ---- bounds: no structure crashes the process ------------------------------------------------

# Each case: (description, crow, col, error type, message). W is 4 × 6 with nnz = 7 below.
_BOUNDS_SCRIPT = textwrap.dedent(
    r"""
    import re, sys, torch, sparsevd
    crow = [0, 2, 3, 5, 7]
    col = [0, 4, 1, 2, 5, 0, 3]
    K = 6
    cases = [
        ("column 2**30", crow, col[:3] + [2**30] + col[4:], IndexError, r"col_indices\[3\] = 1073741824 \(row 2\) is outside \[0, K = 6\)"),
        ("column -1", crow, col[:5] + [-1] + col[6:], IndexError, r"col_indices\[5\] = -1 \(row 3\) is outside \[0, K = 6\)"),
        ("column K", crow, [K] + col[1:], IndexError, r"col_indices\[0\] = 6 \(row 0\) is outside \[0, K = 6\)"),
        ("crow non-monotone", [0, 3, 1000, 5, 7], col, RuntimeError, r"crow_indices\[1\] = 3 and crow_indices\[2\] = 1000 \(row 1\)"),
        ("crow beyond nnz", [0, 2, 9, 9, 7], col, RuntimeError, r"non-decreasing within \[0, nnz = 7\], got crow_indices\[1\] = 2 and crow_indices\[2\] = 9"),
        ("crow negative", [0, -2, 3, 5, 7], col, RuntimeError, r"crow_indices\[0\] = 0 and crow_indices\[1\] = -2 \(row 0\)"),
        ("crow[0] != 0", [1, 2, 3, 5, 7], col, RuntimeError, r"crow_indices must start at 0 and end at nnz = 7, got 1 and 7"),
    ]
    def expect(kind, message, *args):
        try:
            torch.ops.sparsevd.csr_linear(*args)
        except kind as e:
            assert re.search(message, str(e)), str(e)
        else:
            raise AssertionError(f"no error, expected {message}")

    torch.set_num_threads(int(sys.argv[1]))
    ran = 0
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for m in (1, 3, 70, 300):  # the GEMV, one panel, several panels (split among threads)
            for name, cr, co, kind, message in cases:
                x = torch.randn(m, K).to(dtype)
                values = torch.randn(len(co)).to(dtype)
                for bias in (None, torch.randn(4).to(dtype)):
                    expect(kind, message, x, torch.tensor(cr, dtype=torch.int32), torch.tensor(co, dtype=torch.int32),
                           values, bias)
                    ran += 1
    # a large structure, bad far from the start: the thread that meets it reports it
    n, k = 4000, 3000  # enough work for every threaded path
    crow = torch.arange(0, 8 * n + 1, 8, dtype=torch.int32)
    col = (torch.arange(8 * n, dtype=torch.int32) * 37) % k
    values = torch.randn(8 * n)
    for m in (1, 5, 300):
        x = torch.randn(m, k)
        bad = col.clone(); bad[8 * 3500 + 3] = k
        expect(IndexError, r"col_indices\[28003\] = 3000 \(row 3500\)", x, crow, bad, values, None)
        bad = crow.clone(); bad[3700] = 8 * n + 5
        expect(RuntimeError, r"\(row 3699\)", x, bad, col, values, None)
        ran += 2
    print("ok", ran)
    """
)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_invalid_structure_raises_and_never_crashes(n_threads):
    """Bad indices of every kind, every dtype, both code paths: a clear error, and the
    process survives (a subprocess, so that a crash fails the test instead of the run)."""
    done = subprocess.run([sys.executable, "-c", _BOUNDS_SCRIPT, str(n_threads)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok"), done.stdout


# ---- autograd (C++, csrc/autograd.cpp) --------------------------------------------------------


def test_cpp_autograd_registered():
    assert compiled_kernel("AutogradCPU"), torch._C._dispatch_dump("sparsevd::csr_linear")
    assert compiled_kernel("AutogradCUDA"), torch._C._dispatch_dump("sparsevd::csr_linear")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("wanted", ["all", "x", "values", "bias"])
def test_gradients_match_reference(device, m, bias, wanted):
    if wanted == "bias" and not bias:
        pytest.skip("no bias")
    dense = make_weight(13, 21, "empty_rows", density=0.4, seed=m)
    crow, col, values = to_csr(dense, torch.float64, device)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 21, generator=g, dtype=torch.float64).to(device)
    b = torch.randn(13, generator=g, dtype=torch.float64).to(device) if bias else None
    inputs = {"x": x, "values": values, "bias": b}
    for name, t in inputs.items():
        if t is not None and wanted in ("all", name):
            t.requires_grad_()
    out = csr_linear(x, crow, col, values, b)
    ref = reference.csr_linear(x, crow, col, values, b)
    grad = torch.randn(m, 13, generator=g, dtype=torch.float64).to(device)
    wrt = [t for t in inputs.values() if t is not None and t.requires_grad]
    for a, e in zip(torch.autograd.grad(out, wrt, grad), torch.autograd.grad(ref, wrt, grad)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    if m < 70:
        assert torch.autograd.gradcheck(lambda *args: csr_linear(*args), (x, crow, col, values, b))


@pytest.mark.parametrize("device", DEVICES)
def test_no_graph_without_grad(device):
    dense = make_weight(13, 21, "random", density=0.4)
    crow, col, values = to_csr(dense, torch.float32, device)
    x = torch.randn(3, 21, device=device)
    values.requires_grad_()
    with torch.no_grad():
        assert csr_linear(x, crow, col, values, None).grad_fn is None
    assert csr_linear(x, crow, col, values.detach(), None).grad_fn is None
    assert csr_linear(x, crow, col, values, None).grad_fn is not None
