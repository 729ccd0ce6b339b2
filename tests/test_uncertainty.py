"""predict(): Bayesian-ensemble (SparseVD) and MC-dropout uncertainty from batched stochastic passes."""

import math

import pytest
import torch
from torch import nn

import sparsevd
from sparsevd.conv import SparseVDConv2d


def _blobs(n=200, seed=0):
    """Two Gaussian blobs at (±1.5, 0), std 0.5: a toy 2-D classification problem."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 2, generator=g) * 0.5
    x[:, 0] += torch.where(y == 1, 1.5, -1.5)
    return x, y


def _far_ring(radius=8.0, n=50):
    """Points all around the data at a distance, in every direction."""
    angle = torch.linspace(0, 2 * math.pi, n + 1)[:-1]
    return torch.stack([angle.cos(), angle.sin()], 1) * radius


def _fit(model, loss_fn, x, y, steps=300, lr=2e-2):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only costs, and CI's 2 cores are shared
    try:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(steps):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model


@pytest.fixture(scope="module")
def sparsevd_classifier():
    torch.manual_seed(0)
    x, y = _blobs()
    layer = lambda i, o: sparsevd.SparseVDLinear(i, o, log_sigma2_init=-4.0)  # noqa: E731
    model = nn.Sequential(layer(2, 16), nn.Tanh(), layer(16, 16), nn.Tanh(), layer(16, 2))
    return _fit(model, sparsevd.SGVLBLoss(model, dataset_size=len(x)), x, y), x, y


@pytest.fixture(scope="module")
def dropout_classifier():
    torch.manual_seed(0)
    x, y = _blobs()
    model = nn.Sequential(nn.Linear(2, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 64),
                          nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 2))
    return _fit(model, nn.CrossEntropyLoss(), x, y, lr=1e-2), x, y


def test_sparsevd_ensemble_is_more_uncertain_far_from_the_data(sparsevd_classifier):
    model, x, y = sparsevd_classifier
    torch.manual_seed(1)
    near = sparsevd.predict(model, x[:50], samples=64)
    far = sparsevd.predict(model, _far_ring(), samples=64)
    assert (near.mean.argmax(1) == y[:50]).float().mean() > 0.95
    # measured over seeds 0-9: entropy ×1.2-3, mutual information ×1.9-4.4 far vs near
    assert far.entropy.mean() > 1.5 * near.entropy.mean()
    assert far.mutual_information.mean() > 2.5 * near.mutual_information.mean()
    assert near.mutual_information.mean() > 0, "the posterior noise must show"


def test_mc_dropout_is_more_uncertain_far_from_the_data(dropout_classifier):
    model, x, y = dropout_classifier
    model.eval()
    bn = model[1]
    stats = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    torch.manual_seed(1)
    near = sparsevd.predict(model, x[:50], samples=64)
    far = sparsevd.predict(model, _far_ring(), samples=64)
    assert (near.mean.argmax(1) == y[:50]).float().mean() > 0.95
    assert far.entropy.mean() > 10 * near.entropy.mean() and far.entropy.mean() > 0.02
    assert far.mutual_information.mean() > 10 * near.mutual_information.mean()
    # BatchNorm stayed in eval mode: its statistics were not updated by the passes
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]


def test_regression_variance_grows_away_from_the_data():
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 100).unsqueeze(1)
    y = torch.sin(2 * x) + 0.05 * torch.randn_like(x)
    layer = lambda i, o: sparsevd.SparseVDLinear(i, o, log_sigma2_init=-4.0)  # noqa: E731
    model = nn.Sequential(layer(1, 16), nn.ReLU(), layer(16, 16), nn.ReLU(), layer(16, 1))
    gaussian_nll = lambda out, target: ((out - target) ** 2).mean() / (2 * 0.1**2)  # noqa: E731  (noise std 0.1)
    _fit(model, sparsevd.SGVLBLoss(model, dataset_size=100, criterion=gaussian_nll), x, y)
    torch.manual_seed(1)
    near = sparsevd.predict(model, x, samples=64, task="regression")
    far = sparsevd.predict(model, torch.tensor([[-8.0], [-6.0], [6.0], [8.0]]), samples=64, task="regression")
    assert near.variance.shape == near.mean.shape == (100, 1) and near.entropy is None
    assert (near.mean - y).pow(2).mean() < 0.01
    # measured over seeds 0-5: ×40-140 (a ReLU net's weight noise grows with |x|)
    assert far.variance.mean() > 10 * near.variance.mean()


def test_metrics_follow_from_the_samples():
    torch.manual_seed(0)
    model = nn.Sequential(sparsevd.SparseVDLinear(3, 4, log_sigma2_init=-1.0, dtype=torch.float64))
    x = torch.randn(5, 3, dtype=torch.float64)
    out = sparsevd.predict(model, x, samples=7, return_samples=True)
    p = out.samples
    assert p.shape == (7, 5, 4) and p.dtype == torch.float64
    torch.testing.assert_close(p.sum(2), torch.ones(7, 5, dtype=torch.float64))
    mean = p.mean(0)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.entropy, -(mean * mean.log()).sum(1))
    torch.testing.assert_close(out.expected_entropy, -(p * p.log()).sum(2).mean(0))
    torch.testing.assert_close(out.mutual_information, out.entropy - out.expected_entropy)
    assert (out.mutual_information > 0).all() and out.variance is None
    # every copy of the batch got its own noise
    assert all(not torch.equal(p[0], p[t]) for t in range(1, 7))
    reg = sparsevd.predict(model, x, samples=7, task="regression", return_samples=True)
    torch.testing.assert_close(reg.variance, reg.samples.var(0, correction=0))
    assert reg.samples.shape == (7, 5, 4) and reg.mutual_information is None


def test_one_sample_has_no_epistemic_part():
    model = nn.Sequential(sparsevd.SparseVDLinear(3, 4, log_sigma2_init=-1.0))
    out = sparsevd.predict(model, torch.randn(2, 3), samples=1)
    torch.testing.assert_close(out.mutual_information, torch.zeros(2))
    torch.testing.assert_close(out.entropy, out.expected_entropy)


@pytest.mark.parametrize("samples, batch_samples, forwards", [(10, None, 1), (10, 3, 4), (10, 10, 1), (4, 9, 1)])
def test_samples_run_as_few_batched_forwards(samples, batch_samples, forwards):
    model = nn.Sequential(sparsevd.SparseVDLinear(3, 4))
    rows = []
    model.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    out = sparsevd.predict(model, torch.randn(6, 3), samples=samples, batch_samples=batch_samples,
                           return_samples=True)
    assert len(rows) == forwards and sum(rows) == 6 * samples
    assert out.samples.shape == (samples, 6, 4)


def test_reproducible_with_manual_seed():
    model = nn.Sequential(sparsevd.SparseVDLinear(3, 4, log_sigma2_init=-1.0))
    x = torch.randn(2, 3)
    torch.manual_seed(3)
    a = sparsevd.predict(model, x, samples=5)
    torch.manual_seed(3)
    b = sparsevd.predict(model, x, samples=5)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.mutual_information, b.mutual_information)


def test_modes_are_restored_even_after_an_error():
    model = nn.Sequential(sparsevd.SparseVDLinear(3, 4), nn.Dropout(0.2), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.train()
    model[2].eval()
    before = [m.training for m in model.modules()]
    sparsevd.predict(model, torch.randn(5, 3), samples=3)
    assert [m.training for m in model.modules()] == before
    with pytest.raises(ValueError, match="expected input of shape"):
        sparsevd.predict(model, torch.randn(5, 7), samples=3)
    assert [m.training for m in model.modules()] == before
    assert torch.is_grad_enabled()


def test_cnn_and_per_pixel_outputs():
    torch.manual_seed(0)
    seg = nn.Sequential(SparseVDConv2d(2, 3, 3, padding=1, log_sigma2_init=-2.0))  # logits [N, 3, H, W]
    out = sparsevd.predict(seg, torch.randn(2, 2, 5, 4), samples=6)
    assert out.mean.shape == (2, 3, 5, 4) and out.entropy.shape == (2, 5, 4)
    assert (out.mutual_information > 0).all()
    torch.testing.assert_close(out.mean.sum(1), torch.ones(2, 5, 4))


def test_works_under_autocast_and_reports_float32():
    model = nn.Sequential(sparsevd.SparseVDLinear(3, 4, log_sigma2_init=-2.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparsevd.predict(model, torch.randn(2, 3), samples=4, return_samples=True)
    assert out.mean.dtype == out.entropy.dtype == out.samples.dtype == torch.float32


@pytest.mark.parametrize("kwargs, error, match", [
    ({"samples": 0}, ValueError, "samples must be a positive int"),
    ({"samples": -3}, ValueError, "samples must be a positive int"),
    ({"samples": 2.5}, TypeError, "samples must be a positive int"),
    ({"samples": True}, TypeError, "samples must be a positive int"),
    ({"batch_samples": 0}, ValueError, "batch_samples must be a positive int"),
    ({"task": "classify"}, ValueError, "task must be one of"),
    ({"x": [[1.0, 2.0, 3.0]]}, TypeError, "x must be a torch.Tensor"),
    ({"x": torch.zeros(0, 3)}, ValueError, "non-empty batch dimension"),
    ({"x": torch.tensor(1.0)}, ValueError, "non-empty batch dimension"),
    ({"x": torch.tensor([[1.0, float("nan"), 0.0]])}, ValueError, "x contains NaN or Inf"),
])
def test_bad_arguments(kwargs, error, match):
    model = nn.Sequential(sparsevd.SparseVDLinear(3, 2))
    args = {"x": torch.randn(2, 3), **kwargs}
    with pytest.raises(error, match=match):
        sparsevd.predict(model, **args)


def test_bad_models():
    with pytest.raises(TypeError, match="predict expects an nn.Module"):
        sparsevd.predict(lambda x: x, torch.randn(2, 3))
    for model in (nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.0))):
        with pytest.raises(ValueError, match="no SparseVD or dropout layer"):
            sparsevd.predict(model, torch.randn(2, 3))
    scalar = nn.Sequential(sparsevd.SparseVDLinear(3, 1), nn.Flatten(0))
    with pytest.raises(ValueError, match=r"classification needs logits of shape \[N, classes, ...\]"):
        sparsevd.predict(scalar, torch.randn(2, 3))
    batch_mean = nn.Sequential(sparsevd.SparseVDLinear(3, 2), _BatchMean())
    with pytest.raises(ValueError, match=r"batch first; for 8 inputs it returned \(2,\)"):
        sparsevd.predict(batch_mean, torch.randn(2, 3), samples=4, task="regression")


class _BatchMean(nn.Module):
    def forward(self, x):
        return x.mean(0)
