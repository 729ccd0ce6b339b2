"""SparseLinear, sparsify() and report(): exactness, state files, dead units, errors."""

import io

import pytest
import torch
from torch import nn

import sparsevd
from sparsevd.sparse import dense_to_csr


def _trained_like(model, seed=0, dead_rows=(), dead_cols=()):
    """Give every SparseVD layer a random, partly pruned posterior."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sparsevd.sparsevd_modules(model):
            layer.log_sigma2.copy_(torch.randn(layer.weight.shape, generator=g) * 3 - 2)
    return model


def _mlp():
    return nn.Sequential(
        sparsevd.SparseVDLinear(23, 31), nn.ReLU(), sparsevd.SparseVDLinear(31, 17), nn.Tanh(),
        sparsevd.SparseVDLinear(17, 5),
    )


def test_dense_to_csr_round_trip():
    w = torch.randn(7, 9) * (torch.rand(7, 9) < 0.3)
    w[3] = 0
    crow, col, val = dense_to_csr(w)
    assert crow.dtype == col.dtype == torch.int32
    layer = sparsevd.SparseLinear(9, 7, crow, col, val)
    assert torch.equal(layer.to_dense(), w)
    with pytest.raises(ValueError, match="NaN"):
        dense_to_csr(torch.full((2, 2), float("nan")))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(9,), (4, 9), (2, 3, 9)])
def test_sparse_linear_matches_dense(bias, shape):
    w = torch.randn(7, 9) * (torch.rand(7, 9) < 0.4)
    b = torch.randn(7) if bias else None
    layer = sparsevd.SparseLinear.from_dense(w, b)
    x = torch.randn(*shape)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[\*, 9\]"):
        layer(torch.randn(3, 8))


def test_sparse_linear_from_sparsevd_matches_eval():
    layer = _trained_like(sparsevd.SparseVDLinear(12, 6)).eval()
    sparse = sparsevd.SparseLinear.from_sparsevd(layer)
    assert sparse.nnz == layer.kept_weights()
    x = torch.randn(5, 12)
    torch.testing.assert_close(sparse(x), layer(x), rtol=1e-5, atol=1e-6)


def test_sparse_linear_state_dict_round_trip_and_corruption():
    w = torch.randn(7, 9) * (torch.rand(7, 9) < 0.4)
    layer = sparsevd.SparseLinear.from_dense(w, torch.randn(7))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    other = sparsevd.SparseLinear.from_dense(torch.eye(7, 9), torch.zeros(7))  # different nnz
    other.load_state_dict(state)
    x = torch.randn(3, 9)
    torch.testing.assert_close(other(x), layer(x))

    bad = dict(state)
    bad["col_indices"] = bad["col_indices"].clone()
    bad["col_indices"][0] = 99
    with pytest.raises(RuntimeError, match="corrupt CSR weight: .*out of range"):
        other.load_state_dict(bad)
    bad = dict(state)
    bad["crow_indices"] = bad["crow_indices"][:-1]
    with pytest.raises(RuntimeError, match="corrupt CSR weight"):
        other.load_state_dict(bad)
    bad = dict(state)
    bad["values"] = bad["values"].clone()
    bad["values"][0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        other.load_state_dict(bad)
    old = dict(state, format_version=torch.tensor(0, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="format version 0"):
        other.load_state_dict(old)
    with pytest.raises(RuntimeError, match="format version None"):
        other.load_state_dict({k: v for k, v in state.items() if k != "format_version"})
    # nothing was half-loaded by the failed attempts
    torch.testing.assert_close(other(x), layer(x))


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.tensor([0, 1], dtype=torch.int64), torch.tensor([0], dtype=torch.int32), torch.ones(1)), "int32"),
        ((torch.tensor([0, 2], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32), torch.ones(2)), "increasing"),
        ((torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), torch.ones(2)), "end at nnz"),
        ((torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), torch.ones(2)), "rows \\+ 1"),
        ((torch.tensor([0, 1], dtype=torch.int32), torch.tensor([5], dtype=torch.int32), torch.ones(1)), "out of range"),
        ((torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32), torch.ones(2)), "differ in length"),
    ],
)
def test_bad_csr_is_rejected(args, message):
    with pytest.raises(ValueError, match=message):
        sparsevd.SparseLinear(3, 1, *args)


@pytest.mark.parametrize("batch_size", [1, 256])
def test_sparsify_matches_eval_model(batch_size):
    torch.manual_seed(0)
    model = _trained_like(_mlp()).eval()
    with torch.no_grad():
        model[0].log_sigma2[:6] = 10  # six dead output units: folded into layer 2's bias
        model[2].log_sigma2[:, 20:] = 10  # eleven inputs of layer 2 unused: cut from layer 0
    fast = sparsevd.sparsify(model, batch_size=batch_size)
    x = torch.randn(11, 23)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    first = fast[0]
    assert first.out_features <= 31 - 6 - 11 + 6  # at least the dead and the unused units are gone
    assert model[0].weight.shape == (31, 23), "sparsify must not change the model it was given"
    assert not any(isinstance(m, sparsevd.SparseVDLinear) for m in fast.modules())


def test_sparsify_chooses_csr_for_very_sparse_layers_at_batch_1():
    model = nn.Sequential(sparsevd.SparseVDLinear(512, 512)).eval()
    with torch.no_grad():
        model[0].log_sigma2.fill_(10)
        model[0].log_sigma2.view(-1)[::97] = -20  # ~1% kept
    fast = sparsevd.sparsify(model, batch_size=1)
    assert isinstance(fast[0], sparsevd.SparseLinear)
    dense = nn.Sequential(sparsevd.SparseVDLinear(64, 64)).eval()  # nothing pruned
    assert isinstance(sparsevd.sparsify(dense)[0], nn.Linear)


def test_sparsify_whole_layer_dead():
    model = _trained_like(_mlp()).eval()
    with torch.no_grad():
        model[2].log_sigma2.fill_(10)
    fast = sparsevd.sparsify(model)
    x = torch.randn(4, 23)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-6)


def test_sparsify_rejects_bad_batch():
    with pytest.raises(ValueError, match="batch_size"):
        sparsevd.sparsify(_mlp(), batch_size=0)


def test_report_rows_and_totals():
    model = _trained_like(_mlp())
    rep = sparsevd.report(model)
    assert [r["layer"] for r in rep.rows] == ["0", "2", "4"]
    first = rep.rows[0]
    assert first["total"] == 31 * 23 and first["kept"] == model[0].kept_weights()
    assert first["flops_dense"] == 2 * 31 * 23 and first["bytes_dense"] == 4 * 31 * 23
    assert first["bytes_sparse"] == first["kept"] * 8 + 32 * 4
    assert rep.total["kept"] == sum(r["kept"] for r in rep.rows)
    text = str(rep)
    assert "SparseVDLinear" in text and "total" in text
    after = sparsevd.report(sparsevd.sparsify(model))
    assert after.total["kept"] <= rep.total["kept"]
    with pytest.raises(ValueError, match="no linear layers"):
        sparsevd.report(nn.ReLU())


def test_cost_model_follows_density_batch_and_device():
    model = sparsevd.CostModel()
    n = k = 4096
    for device in ("cpu", "cuda"):
        assert model.choose(n, k, int(0.02 * n * k), 1, device) == "csr"
        assert model.choose(n, k, int(0.9 * n * k), 1, device) == "dense"
    # at large batch on a GPU, tensor-core GEMM beats the SpMM at 98% sparsity
    assert model.choose(n, k, int(0.02 * n * k), 4096, "cuda", element_size=2) == "dense"
    assert model.choose(n, k, int(0.002 * n * k), 4096, "cpu") == "csr"


@pytest.mark.parametrize(
    "crow, col, message",
    [
        ([0, 1, 2], [0, 7], "out of range"),
        ([0, 2, 2], [2, 1], "increasing"),
        ([0, 1, 3], [0, 1], "end at nnz"),
    ],
)
def test_functional_csr_linear_checks_structure(crow, col, message):
    # the public functional form must never hand a bad structure to the kernels
    crow = torch.tensor(crow, dtype=torch.int32)
    col = torch.tensor(col, dtype=torch.int32)
    values = torch.ones(col.numel())
    with pytest.raises(ValueError, match=message):
        sparsevd.functional.csr_linear(torch.randn(3, 4), crow, col, values)


def test_functional_csr_linear_rejects_non_finite_values():
    crow = torch.tensor([0, 1], dtype=torch.int32)
    col = torch.tensor([2], dtype=torch.int32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        sparsevd.functional.csr_linear(torch.randn(2, 4), crow, col, torch.tensor([float("nan")]))


def test_sparse_linear_schedules_rows_by_length_and_rebuilds_it_on_load():
    dense = torch.randn(9, 7) * (torch.rand(9, 7) < 0.4)
    layer = sparsevd.SparseLinear.from_dense(dense)
    assert torch.equal(layer.row_order, sparsevd.functional.rows_by_length(layer.crow_indices))
    assert "row_order" not in layer.state_dict()  # derived, not saved
    other = sparsevd.SparseLinear.from_dense(torch.randn(9, 7) * (torch.rand(9, 7) < 0.7))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.row_order, layer.row_order)
    x = torch.randn(4, 7)
    torch.testing.assert_close(other(x), x @ dense.t())


def _layer_7x9():
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(7, 9, generator=g) * (torch.rand(7, 9, generator=g) < 0.4)
    return sparsevd.SparseLinear.from_dense(dense, torch.randn(7, generator=g)), dense


def test_sparse_linear_owns_its_buffers():
    _, dense = _layer_7x9()
    crow, col, values = sparsevd.sparse.dense_to_csr(dense)
    layer = sparsevd.SparseLinear(9, 7, crow, col, values)
    x = torch.randn(3, 9)
    want = layer(x)
    col[0] = 10**6  # the caller's tensors are theirs: edits do not reach the layer
    values.mul_(100)
    torch.testing.assert_close(layer(x), want)
    state = layer.state_dict()
    other = sparsevd.SparseLinear.from_dense(torch.zeros(7, 9))
    other.load_state_dict(state)
    state["col_indices"][0] = 10**6  # nor do edits of a loaded state dict
    torch.testing.assert_close(other(x), want)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("edit", ["col_big", "col_negative", "crow_non_monotone"])
def test_in_place_edit_of_the_index_buffers_is_an_error_not_a_crash(edit, batch):
    layer, _ = _layer_7x9()
    with torch.no_grad():
        if edit == "col_big":
            layer.col_indices[0] = 10**6
        elif edit == "col_negative":
            layer.col_indices[-1] = -5
        else:
            layer.crow_indices[2] = 1000
    with pytest.raises(ValueError, match="CSR"):
        layer(torch.randn(batch, 9))


def test_load_state_dict_of_another_shape_is_refused():
    layer, _ = _layer_7x9()
    narrower = sparsevd.SparseLinear.from_dense(torch.eye(7, 8))
    with pytest.raises(RuntimeError, match=r"size mismatch.*\(7, 8\).*\[7, 9\]"):
        layer.load_state_dict(narrower.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):  # nn.Linear refuses the same
        nn.Linear(9, 7).load_state_dict(nn.Linear(8, 7).state_dict())


def test_load_converts_to_the_layers_dtype():
    layer, dense = _layer_7x9()
    half = sparsevd.SparseLinear.from_dense(torch.eye(7, 9), torch.zeros(7)).half()
    half.load_state_dict(layer.state_dict())  # a float32 file into a float16 layer
    assert half.values.dtype == half.bias.dtype == torch.float16
    x = torch.randn(2, 9)
    torch.testing.assert_close(half(x.half()).float(), layer(x), rtol=1e-2, atol=1e-2)


def test_format_version_1_is_refused_with_advice():
    layer, _ = _layer_7x9()
    old = {k: v for k, v in layer.state_dict().items() if k != "shape"}
    old["format_version"] = torch.tensor(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="format version 1.*re-create it with sparsify"):
        layer.load_state_dict(old)
