"""The reference math against independent derivations: numerical integration of the
true KL and direct sampling of the weights."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from sparsevd import reference as R


def true_kl(log_alpha):
    """KL(N(θ, αθ²) ‖ log-uniform) up to the constant that makes it vanish as α → ∞:
    KL = E_ξ log|ξ + α^{-1/2}| + (γ + log 2)/2, ξ ~ N(0, 1)  (Kingma et al. 2015)."""
    mu = math.exp(-log_alpha / 2)
    f = lambda x: math.log(abs(x)) * math.exp(-((x - mu) ** 2) / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    lo, hi = mu - 14, mu + 14
    points = [lo] + ([0.0] if lo < 0 < hi else []) + [hi]
    value = sum(quad(f, a, b, limit=200)[0] for a, b in zip(points, points[1:]))
    return value + (np.euler_gamma + math.log(2)) / 2


def test_kl_fit_matches_numerical_integration():
    grid = np.linspace(-8, 8, 97)
    exact = np.array([true_kl(v) for v in grid])
    fit = R.kl_from_log_alpha(torch.tensor(grid, dtype=torch.float64)).numpy()
    assert np.abs(exact - fit).max() < 0.01


def test_kl_is_nonnegative_and_vanishes_for_large_alpha():
    la = torch.linspace(-10, 10, 1001, dtype=torch.float64)
    kl = R.kl_from_log_alpha(la)
    assert (kl >= 0).all()
    assert kl[-1] < 1e-3
    assert (kl[1:] <= kl[:-1] + 1e-12).all(), "KL must decrease as α grows"


def test_kl_divergence_sums_and_clamps():
    w = torch.tensor([[1e-6, 1.0], [0.5, -2.0]])
    s = torch.tensor([[0.0, -30.0], [-1.0, 3.0]])
    la = R.log_alpha(w, s)
    assert la[0, 0] == 10 and la[0, 1] == -10
    expected = R.kl_from_log_alpha(la.double()).sum()
    assert torch.allclose(R.kl_divergence(w, s).double(), expected, rtol=1e-6)
    assert R.kl_divergence(w, s).dtype == torch.float32
    assert R.kl_divergence(w.half(), s.half()).dtype == torch.float32


def test_log_alpha_range_is_configurable():
    w = torch.full((3,), 1e-3)
    s = torch.zeros(3)
    assert (R.log_alpha(w, s, (-4.0, 4.0)) == 4).all()


def test_prune_mask_threshold():
    w = torch.ones(4)
    s = torch.tensor([-1.0, 2.9, 3.0, 5.0])
    assert R.prune_mask(w, s).tolist() == [True, True, False, False]
    assert R.prune_mask(w, s, threshold=0.0).tolist() == [True, False, False, False]


def test_lrt_matches_weight_sampling():
    """The LRT output has the mean and variance of x·Wᵀ + b with W ~ q(W)."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, dtype=torch.float64)
    w = torch.randn(5, 7, dtype=torch.float64)
    s = torch.randn(5, 7, dtype=torch.float64) - 2
    b = torch.randn(5, dtype=torch.float64)
    samples = 40000
    lrt = torch.stack([R.lrt_linear(x, w, s, b, torch.randn(3, 5, dtype=torch.float64)) for _ in range(samples // 100)])
    W = w + torch.exp(s / 2) * torch.randn(samples, 5, 7, dtype=torch.float64)
    direct = torch.einsum("mk,snk->smn", x, W) + b
    var = (x * x) @ torch.exp(s).t()
    # the exact moments, and both estimators within 6 standard errors of them
    mean = x @ w.t() + b
    for est, n in ((lrt, samples // 100), (direct, samples)):
        assert ((est.mean(0) - mean).abs() <= 6 * (var / n).sqrt() + 1e-9).all()
        # the sample variance of a Gaussian has standard error var·sqrt(2/(n−1))
        assert ((est.var(0) - var).abs() <= 6 * var * math.sqrt(2 / (n - 1))).all()


def test_lrt_bias_only_in_mean():
    x = torch.randn(4, 6)
    w = torch.randn(3, 6)
    s = torch.full((3, 6), -1.0)
    z = torch.randn(4, 3)
    b = torch.full((3,), 100.0)
    diff = R.lrt_linear(x, w, s, b, z) - R.lrt_linear(x, w, s, None, z)
    assert torch.allclose(diff, b.expand(4, 3))


def test_lrt_std_has_epsilon_inside_sqrt():
    x = torch.zeros(2, 3)
    s = torch.zeros(4, 3)
    assert torch.allclose(R.lrt_std(x, s), torch.full((2, 4), 1e-4))


def test_csr_linear_matches_dense():
    torch.manual_seed(1)
    dense = torch.randn(6, 9) * (torch.rand(6, 9) < 0.3)
    dense[2] = 0
    csr = dense.to_sparse_csr()
    crow, col, val = csr.crow_indices().int(), csr.col_indices().int(), csr.values()
    x = torch.randn(4, 9)
    b = torch.randn(6)
    assert torch.allclose(R.csr_to_dense(crow, col, val, 9), dense)
    assert torch.allclose(R.csr_linear(x, crow, col, val, b), torch.nn.functional.linear(x, dense, b), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kl_half_precision_sums_in_float32(dtype):
    w = torch.randn(300, 301).to(dtype)
    s = (torch.randn(300, 301) - 4).to(dtype)
    kl = R.kl_divergence(w, s)
    assert kl.dtype == torch.float32
    assert torch.isclose(kl.double(), R.kl_divergence(w.double(), s.double()), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_kl_divergence_grad_is_autograd_of_kl_divergence(dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(37, 23, generator=g) * torch.logspace(-5, 0, 23)).to(dtype)
    s = (torch.rand(37, 23, generator=g) * 20 - 15).to(dtype)
    s[0, :3] = torch.tensor([50.0, -50.0, float("nan")])  # clamped above, below; NaN
    w[1, :2], s[1, :2] = 1.0, torch.tensor([10.0, -10.0])  # log α exactly at the bounds (log(1 + 1e-8) = 0)
    wr, sr = w.clone().requires_grad_(), s.clone().requires_grad_()
    want = torch.autograd.grad(R.kl_divergence(wr, sr), (wr, sr))
    got = R.kl_divergence_grad(w, s)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, equal_nan=True)
