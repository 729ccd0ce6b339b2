"""What a valid CSR structure is (reference.csr_structure_error, reference.row_order_error),
that every validating path refuses any other, and what the raw ops compute on a
structure they do not refuse (unsorted or repeated columns): what reference.csr_to_dense
builds, repeated entries summed, on every device."""

import re

import pytest
import torch

import sparsevd
from sparsevd import dispatch, reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
needs_extension = pytest.mark.skipif(not dispatch.HAS_EXTENSION, reason="extension sparsevd._C not built")


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


# A 3 x 6 weight. Each invalid structure, with the message that names its problem.
VALID = ([0, 2, 2, 5], [1, 4, 0, 3, 5])
INVALID = {
    "unsorted": (([0, 2, 2, 5], [4, 1, 0, 3, 5]), "strictly increasing within each row"),
    "duplicate": (([0, 2, 2, 5], [1, 4, 0, 3, 3]), "strictly increasing within each row"),
    "column out of range": (([0, 2, 2, 5], [1, 6, 0, 3, 5]), r"out of range \[0, 6\)"),
    "negative column": (([0, 2, 2, 5], [1, 4, -1, 3, 5]), r"out of range \[0, 6\)"),
    "crow not from 0": (([1, 2, 2, 5], [1, 4, 0, 3, 5]), "start at 0 and end at nnz = 5"),
    "crow not to nnz": (([0, 2, 2, 4], [1, 4, 0, 3, 5]), "start at 0 and end at nnz = 5"),
    "crow decreasing": (([0, 3, 2, 5], [1, 4, 0, 3, 5]), "non-decreasing"),
    "crow length": (([0, 2, 5], [1, 4, 0, 3, 5]), r"rows \+ 1 = 4 entries"),
}


def test_the_valid_structure_is_valid():
    assert reference.csr_structure_error(_i32(VALID[0]), _i32(VALID[1]), (3, 6)) is None
    assert reference.csr_structure_error(_i32([0, 0, 0]), _i32([]), (2, 6)) is None  # no entries
    assert reference.row_order_error(_i32([2, 0, 1]), 3) is None


@pytest.mark.parametrize("case", INVALID)
def test_reference_names_each_invalid_structure(case):
    (crow, col), message = INVALID[case]
    error = reference.csr_structure_error(_i32(crow), _i32(col), (3, 6))
    assert error is not None and re.search(message, error), error


@pytest.mark.parametrize("order", [[0, 0, 1], [0, 1, 3], [0, 1], [-1, 0, 1]], ids=["repeat", "range", "short", "neg"])
def test_reference_names_each_invalid_row_order(order):
    assert "permutation of the 3 rows" in reference.row_order_error(_i32(order), 3)


@pytest.mark.parametrize("case", INVALID)
def test_sparse_linear_refuses_each_invalid_structure(case):
    (crow, col), message = INVALID[case]
    with pytest.raises(ValueError, match=message):
        sparsevd.SparseLinear(6, 3, _i32(crow), _i32(col), torch.ones(len(col)))


@pytest.mark.parametrize("case", [c for c in INVALID if c != "crow length"])  # there it is the row count
def test_functional_csr_linear_refuses_each_invalid_structure(case):
    (crow, col), message = INVALID[case]
    with pytest.raises(ValueError, match=message):
        sparsevd.functional.csr_linear(torch.randn(2, 6), _i32(crow), _i32(col), torch.ones(len(col)))


def test_functional_csr_linear_refuses_a_row_order_that_is_not_a_permutation():
    crow, col = VALID
    with pytest.raises(ValueError, match="permutation of the 3 rows"):
        sparsevd.functional.csr_linear(torch.randn(2, 6), _i32(crow), _i32(col), torch.ones(5),
                                       row_order=_i32([0, 0, 1]))


def _layer():
    w = torch.zeros(3, 6)
    w[0, 1], w[0, 4], w[2, 0], w[2, 3], w[2, 5] = 1.0, 2.0, 3.0, 4.0, 5.0
    return sparsevd.SparseLinear.from_dense(w, torch.ones(3))


@pytest.mark.parametrize("case", ["unsorted", "duplicate", "column out of range", "crow decreasing"])
def test_load_state_dict_refuses_each_invalid_structure(case):
    (crow, col), message = INVALID[case]
    layer = _layer()
    x = torch.randn(4, 6)
    before = layer(x)
    state = dict(layer.state_dict(), crow_indices=_i32(crow), col_indices=_i32(col))
    with pytest.raises(RuntimeError, match="corrupt CSR weight: CSR .*" + message):
        layer.load_state_dict(state)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)  # nothing half-loaded


def test_sparse_conv_load_state_dict_refuses_duplicate_columns():
    conv = torch.nn.Conv2d(2, 3, 2)
    sparse = sparsevd.SparseConv2d.from_dense(conv)
    state = sparse.state_dict()
    col = state["gemm.col_indices"].clone()
    col[1] = col[0]
    with pytest.raises(RuntimeError, match="strictly increasing within each row"):
        sparse.load_state_dict(dict(state, **{"gemm.col_indices": col}))


@pytest.mark.parametrize("key", ["crow_indices", "col_indices", "values", "bias"])
def test_load_state_dict_names_a_list_in_place_of_a_tensor(key):
    layer = _layer()
    state = layer.state_dict()
    state[key] = state[key].tolist()
    with pytest.raises(RuntimeError, match=f"{key}.*(list|must be a tensor)|must be a tensor.*{key}"):
        layer.load_state_dict(state)


# ---- the raw ops on structures they do not refuse ------------------------------------------

# Row 0 unsorted, row 2 with column 3 twice, row 3 both: the raw ops sum every entry.
LOOSE_CROW = [0, 3, 3, 7, 10]
LOOSE_COL = [5, 1, 3, 0, 3, 3, 4, 2, 2, 0]


def _loose(dtype, device):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(len(LOOSE_COL), generator=g, dtype=torch.float64)
    return (_i32(LOOSE_CROW).to(device), _i32(LOOSE_COL).to(device), values.to(dtype).to(device),
            torch.randn(4, generator=g, dtype=torch.float64).to(dtype).to(device))


def test_csr_to_dense_sums_repeated_entries():
    crow, col, values, _ = _loose(torch.float64, "cpu")
    dense = reference.csr_to_dense(crow, col, values, 6)
    assert dense[2, 3] == values[4] + values[5] and dense[3, 2] == values[7] + values[8]
    assert dense[0, 5] == values[0] and dense.count_nonzero() == 8


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 70])  # the GEMV, one panel, several panels
def test_raw_csr_linear_sums_unsorted_and_repeated_columns(device, dtype, m):
    crow, col, values, bias = _loose(dtype, device)
    x = torch.randn(m, 6, dtype=torch.float64).to(dtype).to(device)
    for b in (bias, None):
        out = torch.ops.sparsevd.csr_linear(x, crow, col, values, b)
        want = reference.csr_linear(x.double(), crow, col, values.double(), None if b is None else b.double())
        tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 3e-2)
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 70])
def test_raw_linear_chain_sums_unsorted_and_repeated_columns(device, m):
    crow, col, values, bias = _loose(torch.float64, device)
    x = torch.randn(m, 6, dtype=torch.float64, device=device)
    dense = torch.randn(5, 4, dtype=torch.float64, device=device)
    args = ([values, dense], [crow, None], [col, None], [bias, None], [1, 0], [0.0, 0.0])
    out = torch.ops.sparsevd.linear_chain(x, *args)
    torch.testing.assert_close(out, reference.linear_chain(x, *args), rtol=1e-12, atol=1e-12)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_raw_csr_linear_gradients_with_repeated_columns(device):
    crow, col, values, bias = _loose(torch.float64, device)
    x = torch.randn(5, 6, dtype=torch.float64, device=device, requires_grad=True)
    values.requires_grad_(True)
    torch.autograd.gradcheck(lambda x, v: torch.ops.sparsevd.csr_linear(x, crow, col, v, bias), (x, values))
    g = torch.randn(5, 4, dtype=torch.float64, device=device)
    dx, dv = torch.autograd.grad(torch.ops.sparsevd.csr_linear(x, crow, col, values, bias), (x, values), g)
    rx, rv = torch.autograd.grad(reference.csr_linear(x, crow, col, values, bias), (x, values), g)
    torch.testing.assert_close(dx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dv, rv, rtol=1e-12, atol=1e-12)


@needs_extension
def test_raw_csr_linear_on_cpu_computes_every_row_whatever_row_order_holds():
    """The raw op does not check that row_order is a permutation (validating callers do);
    the CPU kernel does not read it at all."""
    crow, col = _i32(VALID[0]), _i32(VALID[1])
    values, x = torch.randn(5), torch.randn(4, 6)
    want = reference.csr_linear(x, crow, col, values)
    for order in ([0, 0, 0], [7, -1, 2]):
        out = torch.ops.sparsevd.csr_linear(x, crow, col, values, None, _i32(order))
        torch.testing.assert_close(out, want)
