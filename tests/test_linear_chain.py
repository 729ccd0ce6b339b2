"""sparsevd::linear_chain (csrc/cpu/linear_chain.cpp, csrc/cuda/linear_chain.cpp): a chain
of dense and CSR layers with activations, against ``reference.linear_chain`` (the layers
one by one, with torch's activations) by flash-attention's rule in float64."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sparsevd  # noqa: F401  (loads sparsevd._C)
from sparsevd import dispatch, reference
from sparsevd.inference import _ACTIVATIONS

pytestmark = [
    pytest.mark.skipif(not dispatch.HAS_EXTENSION, reason="extension sparsevd._C not built"),
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta"),
]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
ACTS = list(range(len(reference.ACTIVATIONS)))
chain = torch.ops.sparsevd.linear_chain


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def make_layers(dims, kinds, dtype, device, density=0.3, bias=True, seed=0):
    """Layer lists for linear_chain: kinds[i] is "csr" or "dense"; float64 masters."""
    g = torch.Generator().manual_seed(seed)
    weights, crows, cols, biases = [], [], [], []
    for i, kind in enumerate(kinds):
        n, k = dims[i + 1], dims[i]
        w = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
        w = w * (torch.rand(n, k, generator=g) < density)
        w[::4] = 0  # pruned units: empty CSR rows
        if kind == "csr":
            csr = w.to_sparse_csr()
            weights.append(csr.values().to(dtype).to(device))
            crows.append(csr.crow_indices().int().to(device))
            cols.append(csr.col_indices().int().to(device))
        else:
            weights.append(w.to(dtype).to(device))
            crows.append(None)
            cols.append(None)
        use_bias = bias if isinstance(bias, bool) else bias[i]
        biases.append(torch.randn(n, generator=g, dtype=torch.float64).to(dtype).to(device) if use_bias else None)
    return weights, crows, cols, biases


def check(x, weights, crows, cols, biases, acts, params):
    out = chain(x, weights, crows, cols, biases, acts, params)
    n_last = weights[-1].shape[0] if crows[-1] is None else crows[-1].numel() - 1
    assert out.shape == (x.shape[0], n_last) and out.dtype == x.dtype and out.device == x.device
    up = lambda ts: [None if t is None else t.double() for t in ts]  # noqa: E731
    ref64 = reference.linear_chain(x.double(), up(weights), crows, cols, up(biases), acts, params)
    same = reference.linear_chain(x, weights, crows, cols, biases, acts, params)
    if out.numel():
        err = (out.double() - ref64).abs().max().item()
        base = (same.double() - ref64).abs().max().item()
        assert err <= 2 * base + ATOL[x.dtype], f"chain error {err:.3e} vs same-dtype torch error {base:.3e}"
    return out


def test_activation_table_is_the_extensions():
    """One table (csrc/activations.h): Python's names and codes are the extension's."""
    assert sparsevd._C.activation_codes() == reference.ACTIVATION_CODES
    assert [reference.ACTIVATION_CODES[name] for name in reference.ACTIVATIONS] == ACTS


NN_ACTIVATIONS = [torch.nn.ReLU(), torch.nn.LeakyReLU(0.07), torch.nn.ReLU6(), torch.nn.ELU(0.8), torch.nn.Tanh(),
                  torch.nn.Sigmoid(), torch.nn.GELU(), torch.nn.GELU(approximate="tanh"), torch.nn.SiLU()]


@pytest.mark.parametrize("module", NN_ACTIVATIONS, ids=repr)
def test_module_code_round_trips(module):
    """The code FusedSequential passes for an nn activation names the activation that
    module computes, in the reference and in the fused op."""
    code, param = _ACTIVATIONS[type(module)](module)
    x = torch.linspace(-8, 8, 97, dtype=torch.float64).reshape(1, 97)
    torch.testing.assert_close(reference.activation(x, code, param), module(x), rtol=0, atol=0)
    eye = torch.eye(97, dtype=torch.float64)
    torch.testing.assert_close(chain(x, [eye], [None], [None], [None], [code], [param]), module(x),
                               rtol=1e-14, atol=1e-14)


def test_every_code_has_a_module():
    codes = {_ACTIVATIONS[type(m)](m)[0] for m in NN_ACTIVATIONS}
    assert codes | {reference.ACTIVATION_CODES["identity"]} == set(ACTS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS, ids=lambda a: reference.ACTIVATIONS[a])
@pytest.mark.parametrize("m", [1, 2, 17, 64, 65, 130])
def test_matches_reference(device, dtype, act, m):
    dims, kinds = [45, 37, 29, 11], ["csr", "dense", "csr"]
    layers = make_layers(dims, kinds, dtype, device, bias=[True, False, True], seed=m + act)
    x = (torch.randn(m, 45, generator=torch.Generator().manual_seed(m)) * 2).to(dtype).to(device)
    # the activation under test after every layer but one (leaky / elu parameters vary)
    check(x, *layers, [act, (act + 4) % len(ACTS), act], [0.1, 1.7, 0.01])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kinds", [["csr"], ["dense"], ["dense", "dense"], ["csr", "csr", "csr", "dense"]], ids="-".join)
@pytest.mark.parametrize("m", [1, 3, 33, 257])
def test_layer_mixes(device, dtype, kinds, m):
    dims = [70, 61, 40, 23, 9][: len(kinds) + 1]
    layers = make_layers(dims, kinds, dtype, device, seed=len(kinds) + m)
    x = torch.randn(m, 70).to(dtype).to(device)
    check(x, *layers, [1] * (len(kinds) - 1) + [0], [0.0] * len(kinds))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("m", [1, 5, 64, 200, 4100])
def test_lenet_shapes(dtype, m):
    """LeNet-300-100 at the paper's sparsity (98.9 / 97.2 / 62 %), as sparsify() makes it."""
    g = torch.Generator().manual_seed(m)
    dims, dens = [784, 300, 100, 10], [0.011, 0.028, 0.38]
    weights, crows, cols, biases = [], [], [], []
    for i in range(3):
        w = torch.randn(dims[i + 1], dims[i], generator=g, dtype=torch.float64) * 0.1
        w = w * (torch.rand(w.shape, generator=g) < dens[i])
        csr = w.to_sparse_csr()
        weights.append(csr.values().to(dtype))
        crows.append(csr.crow_indices().int())
        cols.append(csr.col_indices().int())
        biases.append(torch.randn(dims[i + 1], generator=g).to(dtype))
    x = torch.rand(m, 784, generator=g).to(dtype)
    check(x, weights, crows, cols, biases, [1, 1, 0], [0.0, 0.0, 0.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2000, 3100])  # wide inputs narrow the panels
def test_wide_layers(dtype, k):
    layers = make_layers([k, 300, 1500, 7], ["csr", "dense", "csr"], dtype, "cpu", density=0.05)
    x = torch.randn(70, k).to(dtype)
    check(x, *layers, [8, 9, 6], [0.0] * 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("m", [1, 70])
def test_large_dense_layer(dtype, m):
    """A dense layer of over 2^20 weights runs as ATen's GEMM on the panels."""
    layers = make_layers([64, 1100, 1000, 9], ["csr", "dense", "csr"], dtype, "cpu", density=0.2)
    x = torch.randn(m, 64).to(dtype)
    check(x, *layers, [1, 9, 0], [0.0] * 3)
    if m > 1:
        with torch.profiler.profile() as prof:
            chain(x, *layers, [1, 9, 0], [0.0] * 3)
        assert any(e.name == "aten::mm" for e in prof.events())
        small = make_layers([64, 100, 9], ["dense", "csr"], dtype, "cpu")
        with torch.profiler.profile() as prof:
            chain(x, *small, [1, 0], [0.0] * 2)
        assert not any(e.name == "aten::mm" for e in prof.events())  # the micro-kernel


@pytest.mark.parametrize("m", [1, 40, 130, 256, 600])
def test_threads_give_the_same_bits(threads, m):
    layers = make_layers([1031, 515, 300, 10], ["csr", "dense", "csr"], torch.float32, "cpu", density=0.1)
    x = torch.randn(m, 1031)
    args = (*layers, [1, 7, 0], [0.0] * 3)
    threads(1)
    one = chain(x, *args)
    threads(2)
    two = chain(x, *args)
    assert torch.equal(one, two)
    check(x, *args)


@pytest.mark.parametrize("m", [1, 130, 600])
def test_more_threads_than_cores_give_the_same_bits(threads, m):
    # an oversubscribed team: late threads find their tasks taken, and calls that waited
    # for them fall back to one thread for a while (csr_kernels.h, run_tasks)
    layers = make_layers([1031, 515, 300, 10], ["csr", "dense", "csr"], torch.float32, "cpu", density=0.1)
    x = torch.randn(m, 1031)
    args = (*layers, [1, 7, 0], [0.0] * 3)
    threads(1)
    one = chain(x, *args)
    threads(4 * (os.cpu_count() or 1))
    for _ in range(20):
        assert torch.equal(chain(x, *args), one)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["strided_k", "transposed"])
@pytest.mark.parametrize("m", [1, 3, 70])
def test_non_contiguous(device, layout, m):
    weights, crows, cols, biases = make_layers([45, 37, 29], ["csr", "dense"], torch.float32, device)
    weights[1] = weights[1].t().contiguous().t()  # a transposed dense weight
    if layout == "strided_k":
        x = torch.randn(m, 90, device=device)[:, ::2]
    else:
        x = torch.randn(45, m, device=device).t()
    out = check(x, weights, crows, cols, biases, [2, 4], [0.2, 1.0])
    torch.testing.assert_close(out, chain(x.contiguous(), weights, crows, cols, biases, [2, 4], [0.2, 1.0]), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_cases(device, dtype):
    weights, crows, cols, biases = make_layers([6, 5, 4], ["csr", "dense"], dtype, device)
    x = torch.randn(3, 6).to(dtype).to(device)
    assert chain(x[:0], weights, crows, cols, biases, [1, 0], [0.0, 0.0]).shape == (0, 4)
    # a layer with every weight pruned: its bias, then the rest of the chain
    empty = (torch.zeros(0, dtype=dtype, device=device), torch.zeros(6, dtype=torch.int32, device=device),
             torch.zeros(0, dtype=torch.int32, device=device))
    for m in (1, 3):
        check(x[:m], [empty[0], weights[1]], [empty[1], None], [empty[2], None], biases, [1, 0], [0.0, 0.0])
    # K = 0 inputs and no non-zeros
    check(x[:, :0], [empty[0]], [empty[1]], [empty[2]], [biases[0]], [5], [0.0])


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_like_torch(device):
    weights, crows, cols, biases = make_layers([45, 37, 29], ["csr", "dense"], torch.float32, device)
    for m in (1, 5):
        x = torch.randn(m, 45, device=device)
        x[0, :] = float("nan")
        for act in ACTS:
            out = chain(x, weights, crows, cols, biases, [act, act], [0.1, 1.0])
            ref = reference.linear_chain(x, weights, crows, cols, biases, [act, act], [0.1, 1.0])
            assert torch.equal(out.isnan(), ref.isnan()), reference.ACTIVATIONS[act]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments(device):
    weights, crows, cols, biases = make_layers([6, 5, 4], ["csr", "dense"], torch.float32, device)
    x = torch.randn(3, 6, device=device)
    acts, params = [1, 0], [0.0, 0.0]
    cases = [
        ((x, [], [], [], [], [], []), "at least one layer"),
        ((x, weights, crows[:1], cols, biases, acts, params), "one entry per layer"),
        ((x, weights, crows, cols, biases, [1], params), "one entry per layer"),
        ((x, weights, [crows[0], None], [None, None], biases, acts, params), "both be given"),
        ((x[0], weights, crows, cols, biases, acts, params), r"x must be 2-D"),
        ((x.double(), weights, crows, cols, biases, acts, params), "weight has dtype"),
        ((x.long(), weights, crows, cols, biases, acts, params), "x must be float32"),
        ((x[:, :5], weights, crows, [cols[0][:0], None], biases, acts, params), "one entry per column index"),
        ((x, [weights[0], weights[1][:, :4]], crows, cols, biases, acts, params), r"layer 1: a dense weight must be \[N, K = 5\]"),
        ((x, weights, [crows[0].long(), None], cols, biases, acts, params), "crow_indices must be a 1-D int32"),
        ((x, weights, crows, [cols[0].long(), None], biases, acts, params), "col_indices must be a 1-D int32"),
        ((x, weights, crows, cols, [biases[0][:3], None], acts, params), "layer 0: bias must be a 1-D"),
        ((x, weights, crows, cols, biases, [1, 10], params), "activation code 10 is not one of 0..9"),
        ((x, weights, crows, cols, biases, [-1, 0], params), "activation code -1"),
    ]
    if device == "cpu":
        bad = crows[0].clone()
        bad[-1] += 1
        cases.append(((x, weights, [bad, None], cols, biases, acts, params), "layer 0: crow_indices must start at 0 and end at nnz"))
    else:
        cases.append(((x.cpu(), weights, crows, cols, biases, acts, params), "weight is on"))
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            chain(*args)


_BOUNDS_SCRIPT = textwrap.dedent(
    r"""
    import sys, torch, sparsevd
    torch.set_num_threads(int(sys.argv[1]))
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(300, 200) * (torch.rand(300, 200, generator=g) < 0.1)
    csr = dense.to_sparse_csr()
    crow, col, values = csr.crow_indices().int(), csr.col_indices().int(), csr.values()
    w0 = torch.randn(200, 50)
    ran = 0
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for m in (1, 3, 70, 600):
            x = torch.randn(m, 50).to(dtype)
            def run(cr, co):  # a dense layer, then the CSR one under test
                torch.ops.sparsevd.linear_chain(x, [w0.to(dtype), values.to(dtype)], [None, cr], [None, co],
                                                [None, None], [1, 0], [0.0, 0.0])
            cases = [(crow, col.index_put((torch.tensor(100),), torch.tensor(v, dtype=torch.int32)), IndexError,
                      f"layer 1: col_indices[100] = {v}") for v in (2**30, -1, 200)]
            cases += [(crow.index_put((torch.tensor(p),), torch.tensor(v, dtype=torch.int32)), col, RuntimeError,
                       "layer 1: crow_indices must be non-decreasing")
                      for p, v in ((150, 10**6), (150, -5), (7, int(crow[9]) + 1))]
            for cr, co, kind, message in cases:
                try:
                    run(cr, co)
                except kind as e:
                    assert message in str(e), str(e)
                else:
                    raise AssertionError(f"no error, expected {message}")
                ran += 1
    print("ok", ran)
    """
)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_invalid_structure_raises_and_never_crashes(n_threads):
    done = subprocess.run([sys.executable, "-c", _BOUNDS_SCRIPT, str(n_threads)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok"), done.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_inference_only(device):
    weights, crows, cols, biases = make_layers([6, 5, 4], ["csr", "dense"], torch.float32, device)
    x = torch.randn(3, 6, device=device)
    args = (crows, cols, biases, [1, 0], [0.0, 0.0])
    for needs in ("x", "weight", "bias"):
        xx = x.clone().requires_grad_(needs == "x")
        ws = [w.clone().requires_grad_(needs == "weight") for w in weights]
        bs = [b.clone().requires_grad_(needs == "bias") for b in biases]
        with pytest.raises(RuntimeError, match="inference-only"):
            chain(xx, ws, crows, cols, bs, *args[3:])
        with torch.no_grad():
            out = chain(xx, ws, crows, cols, bs, *args[3:])
        assert out.grad_fn is None and not out.requires_grad
        with torch.inference_mode():
            chain(xx, ws, crows, cols, bs, *args[3:])
    assert chain(x, weights, *args).grad_fn is None


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for m in (1, 5):
        layers = make_layers([9, 7, 5], ["csr", "dense"], torch.float32, device, seed=m)
        x = torch.randn(m, 9, device=device)
        torch.library.opcheck(chain, (x, *layers, [1, 6], [0.0, 0.0]))


def test_compiles_fullgraph():
    layers = make_layers([9, 7, 5], ["csr", "dense"], torch.float32, "cpu")
    fn = torch.compile(lambda x: chain(x, *layers, [1, 6], [0.0, 0.0]), fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 9)
    with torch.no_grad():
        torch.testing.assert_close(fn(x), chain(x, *layers, [1, 6], [0.0, 0.0]))
