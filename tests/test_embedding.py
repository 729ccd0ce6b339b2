"""SparseVDEmbedding (the training lookup against reference.embedding_sample, gradients,
padding_idx, the KL, refusals) and SparseEmbedding (the row-compacted inference lookup)."""

import io
import subprocess
import sys

import pytest
import torch
from torch import nn

import sparsevd
from sparsevd import reference
from sparsevd.embedding import SparseEmbedding, SparseVDEmbedding

V, D = 11, 5


def _trained(dtype=torch.float32, padding_idx=None, alpha="weight", **kwargs):
    """A layer with log α spread over [−6, 6]: some entries pruned, many noisy."""
    torch.manual_seed(0)
    layer = SparseVDEmbedding(V, D, padding_idx=padding_idx, dtype=dtype, alpha=alpha, **kwargs)
    if alpha == "weight":
        with torch.no_grad():
            layer.log_sigma2.copy_(torch.log(layer.weight ** 2 + 1e-8) + 12 * torch.rand_like(layer.weight) - 6)
    return layer


def _record_seeds(monkeypatch):
    seeds, draw = [], sparsevd.functional.draw_seed

    def recording(generator=None):
        seeds.append(draw(generator))
        return seeds[-1]

    monkeypatch.setattr(sparsevd.functional, "draw_seed", recording)
    return seeds


def test_constructor_matches_nn_embedding():
    torch.manual_seed(0)
    ref = nn.Embedding(V, D, padding_idx=-2)
    torch.manual_seed(0)
    layer = SparseVDEmbedding(V, D, padding_idx=-2)
    assert torch.equal(layer.weight, ref.weight) and layer.padding_idx == ref.padding_idx == V - 2
    assert (layer.weight[V - 2] == 0).all() and (layer.log_sigma2 == -10).all()
    assert layer.bias is None and layer.weight.shape == layer.log_sigma2.shape == (V, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_from_embedding_computes_what_it_did(dtype, padding_idx):
    torch.manual_seed(0)
    embedding = nn.Embedding(V, D, padding_idx=padding_idx, scale_grad_by_freq=True, dtype=dtype)
    layer = SparseVDEmbedding.from_embedding(embedding, log_sigma2_init=-30.0).eval()
    assert layer.scale_grad_by_freq and layer.weight.dtype == dtype and layer.padding_idx == padding_idx
    tokens = torch.randint(0, V, (4, 6))
    assert torch.equal(layer(tokens), embedding(tokens))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_training_lookup_and_gradients_match_the_reference(monkeypatch, dtype, padding_idx, scale_grad_by_freq):
    layer = _trained(dtype, padding_idx, scale_grad_by_freq=scale_grad_by_freq).train()
    tokens = torch.tensor([[1, 2, 2, 7], [10, 0, 2, 1], [1, 1, 4, 9]])
    seeds = _record_seeds(monkeypatch)
    y = layer(tokens)
    mean = reference.masked_embedding(tokens, layer.weight, torch.ones_like(layer.log_sigma2, dtype=torch.bool))
    noise = sparsevd.functional.lrt_sample_noise(mean.detach(), seeds[0])
    w64, s64 = (p.detach().double().requires_grad_() for p in (layer.weight, layer.log_sigma2))
    expected = reference.embedding_sample(tokens, w64, s64, noise.double(), padding_idx)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(y.double(), expected, **tol)
    if padding_idx is not None:  # the padding row, as it is, without noise
        assert torch.equal(y[0, 1], layer.weight[padding_idx].detach())
    grad = torch.randn_like(expected)
    y.backward(grad.to(dtype))
    expected.backward(grad)
    if scale_grad_by_freq:  # each row's gradient divided by how often the batch reads it
        counts = torch.bincount(tokens.flatten(), minlength=V).double().clamp_min(1)
        w64.grad /= counts[:, None]
        s64.grad /= counts[:, None]
    torch.testing.assert_close(layer.weight.grad.double(), w64.grad, **tol)
    torch.testing.assert_close(layer.log_sigma2.grad.double(), s64.grad, **tol)
    if padding_idx is not None:
        assert (layer.weight.grad[padding_idx] == 0).all() and (layer.log_sigma2.grad[padding_idx] == 0).all()


def test_padding_positions_get_the_padding_row_without_noise():
    layer = _trained(padding_idx=4).train()
    with torch.no_grad():
        layer.weight[4] = torch.arange(D, dtype=torch.float32)  # a trained model's padding row may be anything
    tokens = torch.tensor([4, 1, 4])
    y = layer(tokens)
    assert torch.equal(y[0], layer.weight[4].detach()) and torch.equal(y[2], y[0])
    assert not torch.equal(layer(tokens)[1], y[1])  # the others are sampled


def test_eval_is_the_masked_lookup_and_cached():
    layer = _trained().eval()
    mask = layer.mask()
    assert 0 < mask.sum() < mask.numel()
    tokens = torch.randint(0, V, (3, 4))
    assert torch.equal(layer(tokens), reference.masked_embedding(tokens, layer.weight, mask))
    assert torch.equal(layer(tokens), layer(tokens))
    layer(tokens).sum().backward()  # the gradient of θ ⊙ mask
    assert (layer.weight.grad[~mask] == 0).all() and (layer.weight.grad[mask] != 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_leaves_the_padding_row_out(dtype):
    layer = _trained(dtype, padding_idx=3)
    rows = [r for r in range(V) if r != 3]
    expected = reference.kl_divergence(layer.weight[rows], layer.log_sigma2[rows])
    kl = layer.kl()
    assert kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(kl, expected)
    kl.backward()
    assert (layer.weight.grad[3] == 0).all() and (layer.log_sigma2.grad[3] == 0).all()
    assert (layer.log_sigma2.grad[rows] != 0).any()
    plain = _trained(dtype)
    torch.testing.assert_close(plain.kl(), reference.kl_divergence(plain.weight, plain.log_sigma2))


@pytest.mark.parametrize("alpha", ["unit", "layer", 0.5])
def test_shared_alpha_variants(alpha):
    layer = _trained(alpha=alpha, padding_idx=1).train()
    tokens = torch.randint(0, V, (2, 3))
    assert layer(tokens).shape == (2, 3, D) and layer.eval()(tokens).shape == (2, 3, D)
    raw = layer._raw_variance()
    per = reference.kl_from_log_alpha(torch.clamp(raw, *layer.log_alpha_range))
    if alpha == "unit":
        assert raw.shape == (V, 1)
        expected = (per.sum() - per[1].sum()) * D
    else:
        expected = per.sum() * (V - 1) * D
    torch.testing.assert_close(layer.kl(), expected)


@pytest.mark.parametrize("noise", [False, True])
def test_frozen_mask_keeps_pruned_entries_at_zero(noise):
    layer = _trained().train()
    sparsevd.freeze_masks(layer, noise=noise)
    mask = layer.frozen_mask
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.arange(V)).pow(2).sum().backward()
        optimizer.step()
    assert (layer.weight[~mask] == 0).all()
    tokens = torch.arange(V)
    if noise:
        assert not torch.equal(layer(tokens), layer(tokens))
    else:
        assert torch.equal(layer(tokens), layer.weight * mask)


def test_state_dict_and_pickle_round_trip():
    layer = _trained(padding_idx=0).eval()
    other = SparseVDEmbedding(V, D, padding_idx=0)
    other.load_state_dict(layer.state_dict())
    tokens = torch.randint(0, V, (5,))
    assert torch.equal(other.eval()(tokens), layer(tokens))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(tokens), layer(tokens))
    assert "padding_idx=0" in repr(layer)


@pytest.mark.parametrize("make, error, match", [
    (lambda: SparseVDEmbedding(V, D, max_norm=1.0), ValueError, "max_norm is not supported"),
    (lambda: SparseVDEmbedding(V, D, sparse=True), ValueError, "sparse=True is not supported"),
    (lambda: SparseVDEmbedding(V, D, padding_idx=V), ValueError, r"padding_idx must be None or an int in \[-11, 11\)"),
    (lambda: SparseVDEmbedding(0, D), ValueError, "num_embeddings must be a positive int"),
    (lambda: SparseVDEmbedding.from_embedding(nn.Linear(2, 2)), TypeError, "expects an nn.Embedding"),
    (lambda: SparseVDEmbedding.from_embedding(nn.Embedding(V, D, max_norm=2.0)), ValueError, "max_norm"),
])
def test_refused_options_and_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("training", [True, False])
def test_bad_indices(training):
    layer = _trained().train(training)
    with pytest.raises(ValueError, match=r"SparseVDEmbedding: indices must lie in \[0, 11\), got values in \[0, 11\]"):
        layer(torch.tensor([0, 11]))
    with pytest.raises(TypeError, match="SparseVDEmbedding: input must hold int64 or int32 indices, got dtype "
                                        "torch.float32"):
        layer(torch.tensor([1.0]))
    assert layer(torch.tensor([1, 2], dtype=torch.int32)).shape == (2, D)


# ------------------------------------------------------------------ SparseEmbedding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_embedding_is_the_masked_lookup_without_pruned_rows(dtype):
    layer = _trained(dtype)
    with torch.no_grad():
        layer.log_sigma2[[2, 5, 6]] = 20.0  # whole tokens pruned
    sparse = SparseEmbedding.from_sparsevd(layer)
    masked = (layer.weight * layer.mask()).detach()
    kept = int(masked.ne(0).any(1).sum())
    assert kept <= V - 3 and sparse.kept_rows == kept and sparse.weight.shape == (kept + 1, D)
    assert sparse.nnz == int(masked.ne(0).sum()) and sparse.weight.dtype == dtype
    tokens = torch.randint(0, V, (4, 7))
    assert torch.equal(sparse(tokens), layer.eval()(tokens))
    assert torch.equal(sparse.to_dense(), masked)
    assert torch.equal(sparse(torch.tensor(5)), torch.zeros(D, dtype=dtype))


def test_sparse_embedding_state_dict_is_checked():
    sparse = SparseEmbedding.from_sparsevd(_trained())
    state = sparse.state_dict()
    twin = SparseEmbedding.from_dense(torch.ones(V, D))
    twin.load_state_dict(state)
    tokens = torch.arange(V)
    assert torch.equal(twin(tokens), sparse(tokens)) and twin.kept_rows == sparse.kept_rows

    def refused(change, match):
        bad = {k: v.clone() for k, v in state.items()}
        change(bad)
        with pytest.raises(RuntimeError, match=match):
            SparseEmbedding.from_dense(torch.ones(V, D)).load_state_dict(bad)

    refused(lambda s: s["rows"].__setitem__(0, 99), "corrupt table: .*rows must index the")
    refused(lambda s: s["weight"][-1].fill_(1.0), "last row of weight .* must be zero")
    refused(lambda s: s["format_version"].fill_(7), "format version 7")
    refused(lambda s: s["shape"].fill_(3), r"size mismatch: the state dict holds a \(3, 3\) table")
    refused(lambda s: s.pop("rows"), "Missing key")


def test_sparse_embedding_bad_input_and_construction():
    sparse = SparseEmbedding.from_dense(torch.eye(V, D))
    with pytest.raises(ValueError, match=r"SparseEmbedding: indices must lie in \[0, 11\)"):
        sparse(torch.tensor([-1]))
    with pytest.raises(TypeError, match="int64 or int32 indices"):
        sparse(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="rows must be an int64 tensor of shape"):
        SparseEmbedding(V, D, torch.zeros(V, dtype=torch.int32), torch.zeros(1, D))
    with pytest.raises(TypeError, match="expects a SparseVDEmbedding"):
        SparseEmbedding.from_sparsevd(nn.Embedding(2, 2))


EXPORTED = """
import sys, torch, sparsevd
program = torch.export.load(sys.argv[1])
torch.save(program.module()(torch.load(sys.argv[2])), sys.argv[3])
"""


def test_sparse_embedding_exports_with_a_dynamic_batch(tmp_path):
    sparse = SparseEmbedding.from_sparsevd(_trained())
    tokens = torch.randint(0, V, (3, 4))
    batch = torch.export.Dim("batch")
    program = torch.export.export(sparse, (tokens,), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "embedding.pt2")
    other = torch.randint(0, V, (5, 4))
    torch.save(other, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", EXPORTED, str(tmp_path / "embedding.pt2"), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "y.pt"), sparse(other))
