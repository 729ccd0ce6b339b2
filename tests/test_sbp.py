"""Structured Bayesian Pruning: the reference math against independent derivations
(numerical integration, high-precision arithmetic, Monte Carlo, the truncated normal's
CDF), the SBPDropout layer, and how it works with the rest of the package."""

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from scipy import stats
from scipy.integrate import quad
from torch import nn

import sparsevd
from sparsevd import reference as R
from sparsevd.sbp import sbp_kl, sbp_noise, sbp_sample

LO, HI = R.SBP_PARAM_RANGE
#: μ and log σ over the whole clip range, its edges and the regimes between (mass at a
#: bound or inside, σ tiny or wide)
MUS = [-20.0, -19.99, -15.0, -10.0, -5.0, -0.5, -0.01, 0.0, 0.01, 0.5, 2.0, 5.0]
LOG_SIGMAS = [-20.0, -15.0, -10.0, -5.0, -3.0, -1.0, 0.0, 1.0, 3.0, 5.0]


def _grid(dtype=torch.float64):
    mu = torch.tensor([m for m in MUS for _ in LOG_SIGMAS], dtype=dtype)
    ls = torch.tensor([s for _ in MUS for s in LOG_SIGMAS], dtype=dtype)
    return mu, ls


# --- high-precision closed forms (the authors' formulas as written, in 80-digit arithmetic) --


def _mp_frame(mu, ls, a, b):
    mu, ls = min(max(mp.mpf(mu), LO), HI), min(max(mp.mpf(ls), LO), HI)
    s = mp.e ** ls
    al, be = (a - mu) / s, (b - mu) / s
    z = mp.ncdf(-al) - mp.ncdf(-be) if al + be > 0 else mp.ncdf(be) - mp.ncdf(al)  # no 1 − tiny
    return mu, ls, s, al, be, z


def mp_kl(mu, ls, a=-20.0, b=0.0):
    with mp.workdps(80):
        mu, ls, s, al, be, z = _mp_frame(mu, ls, a, b)
        kl = -ls - mp.log(z) - (al * mp.npdf(al) - be * mp.npdf(be)) / (2 * z)
        return kl + mp.log(b - a) - mp.log(2 * mp.pi * mp.e) / 2


def mp_moment(mu, ls, k, a=-20.0, b=0.0):
    with mp.workdps(80):
        mu, ls, s, al, be, z = _mp_frame(mu, ls, a, b)
        ak, bk = al - k * s, be - k * s
        zk = mp.ncdf(-ak) - mp.ncdf(-bk) if ak + bk > 0 else mp.ncdf(bk) - mp.ncdf(ak)
        return mp.e ** (k * mu + k * k * s * s / 2) * zk / z


def mp_snr(mu, ls, a=-20.0, b=0.0):
    with mp.workdps(80):
        m1, m2 = mp_moment(mu, ls, 1, a, b), mp_moment(mu, ls, 2, a, b)
        return float(m1 / mp.sqrt(m2 - m1 * m1))


def mp_log_theta(mu, ls, u, a=-20.0, b=0.0):
    """log θ = F⁻¹(u) by bisection in 80 digits (mirrored so no Φ is 1 − tiny)."""
    with mp.workdps(80):
        mu, ls, s, al, be, _ = _mp_frame(mu, ls, a, b)
        u = min(max(mp.mpf(u), mp.mpf(R.SBP_U_CLIP)), 1 - mp.mpf(R.SBP_U_CLIP))
        sign = 1
        if al + be > 0:
            mu, al, be, u, sign = -mu, -be, -al, 1 - u, -1
        target = mp.ncdf(al) + u * (mp.ncdf(be) - mp.ncdf(al))
        lo, hi = al, be
        for _ in range(150):  # to ~1e-45 of the interval
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mp.ncdf(mid) < target else (lo, mid)
        return sign * (mu + s * (lo + hi) / 2)


def mp_derivative(f, x):
    """A central difference in 80 digits (the functions above are exact to far beyond it)."""
    with mp.workdps(80):
        h = mp.mpf("1e-20")
        return float((f(mp.mpf(x) + h) - f(mp.mpf(x) - h)) / (2 * h))


# --- KL -------------------------------------------------------------------------------------


def _kl_by_quadrature(mu, log_sigma, a, b):
    """∫ q log(q / p) over log θ ∈ [a, b], p = 1/(b − a), q the truncated normal density."""
    s = math.exp(log_sigma)
    z = stats.norm.cdf((b - mu) / s) - stats.norm.cdf((a - mu) / s)

    def integrand(x):
        log_q = stats.norm.logpdf(x, mu, s) - math.log(z)
        return math.exp(log_q) * (log_q + math.log(b - a))

    lo, hi = max(a, mu - 12 * s), min(b, mu + 12 * s)
    points = [p for p in (mu,) if lo < p < hi]
    return quad(integrand, lo, hi, points=points or None, limit=400, epsabs=1e-12, epsrel=1e-10)[0]


@pytest.mark.parametrize("bounds", [(-20.0, 0.0), (-3.0, 1.0)])
def test_kl_matches_numerical_integration(bounds):
    a, b = bounds
    mus = (a + 0.5, 0.4 * a + 0.6 * b, b - 1.0, b - 0.2, b, b + 0.3)
    cases = [(m, s) for m in mus for s in (-3.0, -1.0, 0.0, 1.0, 2.5)]
    mu = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    ls = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    got = R.sbp_kl_per_unit(mu, ls, bounds)
    expected = torch.tensor([_kl_by_quadrature(m, s, *bounds) for m, s in cases], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("bounds", [(-20.0, 0.0), (-3.0, 1.0)])
def test_kl_and_gradients_over_the_whole_clip_range(bounds):
    # in float64 against the closed form evaluated in 80 digits, and its derivatives
    mu, ls = _grid()
    kl, dmu, dls = R.sbp_kl_with_grad(mu, ls, bounds)
    per_unit = R.sbp_kl_per_unit(mu, ls, bounds)
    assert torch.isclose(kl, per_unit.sum(), rtol=1e-15)
    for i, (m, s) in enumerate(zip(mu.tolist(), ls.tolist())):
        assert per_unit[i].item() == pytest.approx(float(mp_kl(m, s, *bounds)), rel=1e-12, abs=1e-12)
        if LO < m < HI and LO < s < HI:
            gm = mp_derivative(lambda t: mp_kl(t, s, *bounds), m)
            gs = mp_derivative(lambda t: mp_kl(m, t, *bounds), s)
            assert dmu[i].item() == pytest.approx(gm, rel=1e-9, abs=1e-9), (m, s)
            assert dls[i].item() == pytest.approx(gs, rel=1e-9, abs=1e-9), (m, s)


def test_kl_is_nonnegative_and_clip_stops_the_gradient():
    mu, ls = _grid()
    kl, dmu, dls = R.sbp_kl_with_grad(mu, ls)
    assert (R.sbp_kl_per_unit(mu, ls) >= -1e-12).all()
    at_edge_mu = (mu == LO) | (mu == HI)
    at_edge_ls = (ls == LO) | (ls == HI)
    assert (dmu[at_edge_mu] == 0).all() and (dls[at_edge_ls] == 0).all()
    beyond = torch.tensor([7.0, -25.0], dtype=torch.float64)
    _, dmu, dls = R.sbp_kl_with_grad(beyond, beyond)
    assert (dmu == 0).all() and (dls == 0).all()
    clipped = R.sbp_kl_per_unit(beyond, beyond)
    torch.testing.assert_close(clipped, R.sbp_kl_per_unit(torch.tensor([5.0, -20.0]), torch.tensor([5.0, -20.0])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_everything_finite_over_the_clip_range(dtype):
    mu, ls = _grid(dtype)
    kl, dmu, dls = R.sbp_kl_with_grad(mu, ls)
    assert kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert dmu.dtype == dls.dtype == dtype
    mean, snr = R.sbp_moments(mu, ls)
    u = torch.tensor([0.0, 1e-7, 0.3, 0.5, 0.99, 1.0], dtype=dtype)[:, None].expand(6, mu.numel())
    theta, tmu, tls = R.sbp_sample(mu, ls, u, with_grad=True)
    for t in (kl, dmu, dls, mean, snr, theta, tmu, tls):
        assert torch.isfinite(t).all()
    assert ((theta >= math.exp(-20) * (1 - 1e-6)) & (theta <= 1)).all()
    assert (snr > 0).all() and ((mean > 0) & (mean <= 1)).all()


# --- E[θ], SNR --------------------------------------------------------------------------------


@pytest.mark.parametrize("bounds", [(-20.0, 0.0), (-3.0, 1.0)])
def test_moments_match_high_precision_over_the_clip_range(bounds):
    mu, ls = _grid()
    mean, snr = R.sbp_moments(mu, ls, bounds)
    for i, (m, s) in enumerate(zip(mu.tolist(), ls.tolist())):
        assert mean[i].item() == pytest.approx(float(mp_moment(m, s, 1, *bounds)), rel=1e-12)
        # Var θ / E[θ]² = 1/SNR² comes from log E[θ²] − 2 log E[θ] (rounding ~1e-14 absolute)
        # up to SNR ~3e4, from the delta method (~1e-4 relative) above
        expected = mp_snr(m, s, *bounds)
        rel = 1e-4 if expected > 3e4 else max(1e-10, 1e-13 * expected ** 2)
        assert snr[i].item() == pytest.approx(expected, rel=rel), (m, s)


def test_moments_against_monte_carlo():
    # independent draws of the truncated normal (scipy), not our sampler
    rng = np.random.default_rng(0)
    for m, s, bounds in [(-1.0, 0.0, (-20.0, 0.0)), (-3.0, 0.5, (-20.0, 0.0)), (0.5, -1.0, (-20.0, 0.0)),
                         (-0.5, 1.0, (-3.0, 1.0))]:
        sigma = math.exp(s)
        a, b = (bounds[0] - m) / sigma, (bounds[1] - m) / sigma
        theta = np.exp(stats.truncnorm.rvs(a, b, loc=m, scale=sigma, size=400_000, random_state=rng))
        mean, snr = R.sbp_moments(torch.tensor([m]), torch.tensor([s]), bounds)
        se = theta.std() / math.sqrt(theta.size)
        assert abs(mean.item() - theta.mean()) < 5 * se
        assert snr.item() == pytest.approx(theta.mean() / theta.std(), rel=0.01)


def test_mask_keeps_units_with_snr_above_threshold():
    mu = torch.tensor([0.0, 0.0, -10.0, -10.0])
    ls = torch.tensor([-5.0, 2.0, -5.0, 2.0])
    snr = R.sbp_snr(mu, ls)
    assert snr[0] > 100 and snr[2] > 100 and snr[1] < 1 and snr[3] < 1
    assert R.sbp_mask(mu, ls).tolist() == [True, False, True, False]
    assert R.sbp_mask(mu, ls, threshold=1e9).tolist() == [False] * 4
    scale = R.sbp_eval_scale(mu, ls)
    assert scale[1] == 0 and scale[3] == 0
    torch.testing.assert_close(scale[[0, 2]], R.sbp_mean(mu, ls)[[0, 2]])


# --- sampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("m,s,bounds", [(-1.0, 0.0, (-20.0, 0.0)), (2.0, -1.5, (-20.0, 0.0)),
                                        (-15.0, 1.0, (-20.0, 0.0)), (-19.9, -3.0, (-20.0, 0.0)),
                                        (-0.5, 1.0, (-3.0, 1.0))])
def test_samples_follow_the_truncated_normal(m, s, bounds):
    batch = 20_000
    mu, ls = torch.full((3,), m), torch.full((3,), s)
    theta = sbp_sample(mu, ls, batch, bounds, seed=7)
    assert theta.shape == (batch, 3) and theta.dtype == torch.float32
    sigma = math.exp(s)
    dist = stats.truncnorm((bounds[0] - m) / sigma, (bounds[1] - m) / sigma, loc=m, scale=sigma)
    log_theta = theta.double().log()
    for unit in range(3):
        assert stats.kstest(log_theta[:, unit].numpy(), dist.cdf).statistic < 0.015
    # one draw per example and unit: units and examples differ
    assert not torch.equal(theta[:, 0], theta[:, 1]) and theta[:, 0].unique().numel() > batch // 2


@pytest.mark.parametrize("bounds", [(-20.0, 0.0), (-3.0, 1.0), (-1.0, -0.9)])
def test_sample_matches_high_precision_inverse_cdf(bounds):
    cases = [(m, s) for m in (-20.0, -15.0, -0.5, 0.0, 0.5, 5.0) for s in (-20.0, -12.0, -5.0, -1.0, 0.0, 5.0)]
    us = [0.0, 1e-3, 0.5, 1 - 1e-5]
    mu = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    ls = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    u = torch.tensor(us, dtype=torch.float64)[:, None].expand(len(us), len(cases))
    theta, _, _ = R.sbp_sample(mu, ls, u, bounds)
    for j, (m, s) in enumerate(cases):
        for i, uu in enumerate(us):
            x = mp_log_theta(m, s, uu, *bounds)
            assert theta[i, j].item() == pytest.approx(float(mp.e ** x), rel=1e-11), (m, s, uu)


def test_sample_derivatives_against_high_precision():
    # ∂θ/∂μ, ∂θ/∂log σ of the reparameterized sample at fixed u, through the far tails
    bounds = (-20.0, 0.0)
    cases = [(-19.99, -12.0), (-15.0, 0.0), (-5.0, 0.0), (-0.5, -1.0), (0.5, -5.0), (0.5, -12.0), (2.0, 1.0)]
    us = [1e-3, 0.5, 1 - 1e-5]
    mu = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    ls = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    u = torch.tensor(us, dtype=torch.float64)[:, None].expand(len(us), len(cases))
    theta, dmu, dls = R.sbp_sample(mu, ls, u, bounds, with_grad=True)
    for j, (m, s) in enumerate(cases):
        for i, uu in enumerate(us):
            th = theta[i, j].item()
            gm = th * mp_derivative(lambda t: mp_log_theta(t, s, uu, *bounds), m)
            gs = th * mp_derivative(lambda t: mp_log_theta(m, t, uu, *bounds), s)
            # accurate to rounding relative to θ (and σ·max(|P|, 5)·θ for ∂/∂log σ)
            assert dmu[i, j].item() == pytest.approx(gm, rel=1e-8, abs=1e-13 * th), (m, s, uu)
            assert dls[i, j].item() == pytest.approx(gs, rel=1e-8, abs=1e-13 * th), (m, s, uu)


def test_uniforms_are_clipped():
    mu, ls = torch.tensor([-1.0]), torch.tensor([0.0])
    lo = R.sbp_sample(mu, ls, torch.tensor([[0.0]]))[0]
    assert torch.equal(lo, R.sbp_sample(mu, ls, torch.tensor([[R.SBP_U_CLIP]]))[0])
    hi = R.sbp_sample(mu, ls, torch.tensor([[1.0]]))[0]
    assert torch.equal(hi, R.sbp_sample(mu, ls, torch.tensor([[1 - R.SBP_U_CLIP]]))[0])


# --- ops ---------------------------------------------------------------------------------------


def _seed(value=99):
    return torch.tensor(value, dtype=torch.int64)


def test_ops_gradcheck():
    mu = torch.tensor([-19.0, -10.0, -1.0, -0.3, 0.2, 3.0], dtype=torch.float64, requires_grad=True)
    ls = torch.tensor([-8.0, 1.0, -2.0, 0.5, -1.0, -3.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, s: torch.ops.sparsevd.sbp_kl(m, s, -20.0, 0.0)[0], (mu, ls))
    assert torch.autograd.gradcheck(lambda m, s: sbp_sample(m, s, 5, seed=3), (mu, ls))
    assert torch.autograd.gradcheck(lambda m, s: sbp_sample(m, s, 5, (-3.0, 1.0), seed=4), (mu, ls))


def test_kl_op_matches_autograd_of_the_reference_where_that_is_accurate():
    mu = torch.linspace(-19, 4, 17, dtype=torch.float64, requires_grad=True)
    ls = torch.linspace(-4, 4, 17, dtype=torch.float64, requires_grad=True)
    auto = torch.autograd.grad(R.sbp_kl(mu, ls), (mu, ls))
    explicit = torch.autograd.grad(sbp_kl(mu, ls), (mu, ls))
    for e, a in zip(explicit, auto):
        torch.testing.assert_close(e, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("with_grad", [True, False])
def test_opcheck(with_grad):
    mu = torch.tensor([-19.0, -1.0, 0.2, 3.0, -7.0], requires_grad=True)
    ls = torch.tensor([-8.0, -2.0, -1.0, -3.0, 2.0], requires_grad=True)
    torch.library.opcheck(torch.ops.sparsevd.sbp_kl, (mu, ls, -20.0, 0.0))
    torch.library.opcheck(torch.ops.sparsevd.sbp_sample, (mu, ls, _seed(), 6, -20.0, 0.0, with_grad))
    torch.library.opcheck(torch.ops.sparsevd.sbp_noise, (mu.detach(), _seed(), 6))


def test_sample_uses_its_noise_and_the_seed():
    mu, ls = torch.tensor([-1.0, 0.3, -12.0]), torch.tensor([0.0, -2.0, 1.0])
    theta = sbp_sample(mu, ls, 4, seed=5)
    u = sbp_noise(mu, 4, 5)
    assert u.dtype == torch.float32 and u.shape == (4, 3) and ((u >= 0) & (u < 1)).all()
    torch.testing.assert_close(theta, R.sbp_sample(mu, ls, u)[0], rtol=2e-6, atol=0)
    torch.manual_seed(1)
    a = sbp_sample(mu, ls, 4)
    torch.manual_seed(1)
    assert torch.equal(a, sbp_sample(mu, ls, 4)) and not torch.equal(a, sbp_sample(mu, ls, 4))


def test_functional_errors():
    mu, ls = torch.zeros(3), torch.zeros(3)
    with pytest.raises(ValueError, match="1-D tensors of one shape"):
        sbp_kl(mu, torch.zeros(4))
    with pytest.raises(ValueError, match="a < b"):
        sbp_kl(mu, ls, (0.0, -20.0))
    with pytest.raises(ValueError, match="a < b"):
        sbp_sample(mu, ls, 2, (1.0, float("nan")))
    with pytest.raises(ValueError, match="batch"):
        sbp_sample(mu, ls, -1)
    with pytest.raises(TypeError, match="floating-point"):
        sbp_kl(torch.zeros(3, dtype=torch.int64), ls)
    with pytest.raises((ValueError, RuntimeError), match="NaN"):
        sbp_kl(torch.tensor([0.0, float("nan"), 0.0]), ls)
    with pytest.raises((ValueError, RuntimeError), match="NaN"):
        sbp_sample(mu, torch.tensor([0.0, 0.0, float("nan")]), 2)


# --- the layer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,dim", [((5, 7), 1), ((5, 7, 3), 1), ((5, 7, 3, 4), 1), ((5, 3, 7), -1), ((7, 3, 2), 0)])
def test_layer_multiplies_along_dim(shape, dim):
    torch.manual_seed(0)
    layer = sparsevd.SBPDropout(7, dim=dim, log_sigma_init=0.0)
    x = torch.randn(shape)
    y = layer(x)
    ratio = y / x
    units = dim % x.dim()
    # one θ per example (dim 0, unless the units are there) and unit, shared over the rest
    per = ratio.movedim(units, -1)
    examples = shape[0] if units != 0 else 1
    flat = per.reshape(examples, -1, 7)
    assert torch.allclose(flat, flat[:, :1].expand_as(flat), rtol=1e-5)
    if examples > 1:
        assert not torch.allclose(flat[0, 0], flat[1, 0])
    assert ((ratio > 0) & (ratio <= 1 + 1e-6)).all()
    layer.eval()
    scale_shape = [1] * x.dim()
    scale_shape[units] = 7
    torch.testing.assert_close(layer(x), x * layer.eval_scale().reshape(scale_shape))


def test_layer_parameters_defaults_and_state_dict():
    layer = sparsevd.SBPDropout(4)
    assert layer.mu.shape == layer.log_sigma.shape == (4,)
    assert (layer.mu == 0).all() and (layer.log_sigma == -5).all()
    assert set(layer.state_dict()) == {"mu", "log_sigma"}
    other = sparsevd.SBPDropout(4, mu_init=-3.0, log_sigma_init=1.0).eval()
    x = torch.randn(2, 4)
    before = other(x)
    other.load_state_dict(layer.state_dict())
    assert not torch.allclose(before, other(x)), "the eval cache follows load_state_dict"
    torch.testing.assert_close(other(x), layer.eval()(x))
    assert "4, dim=1, threshold=1.0" in repr(layer)


def test_layer_kl_snr_mask_and_training_step():
    torch.manual_seed(0)
    layer = sparsevd.SBPDropout(6, mu_init=-0.5, log_sigma_init=0.5, threshold=1.0)
    kl = layer.kl()
    assert kl.dtype == torch.float32 and kl.requires_grad
    torch.testing.assert_close(kl, R.sbp_kl(layer.mu.detach(), layer.log_sigma.detach()))
    assert layer.snr().dtype == torch.float64
    assert layer.kept_units() == int((layer.snr() > 1).sum()) and layer.total_units() == 6
    assert layer.expected_theta().dtype == torch.float32
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    layer.eval()
    before = layer(torch.ones(1, 6))
    layer.train()
    (layer(torch.randn(8, 6)).sum() + layer.kl()).backward()
    assert layer.mu.grad is not None and torch.isfinite(layer.mu.grad).all()
    opt.step()
    layer.eval()
    assert not torch.equal(before, layer(torch.ones(1, 6))), "the eval cache follows optimizer steps"


def test_layer_float64():
    layer = sparsevd.SBPDropout(3, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert layer(x).dtype == torch.float64 and layer.kl().dtype == torch.float64


def test_layer_errors():
    with pytest.raises(ValueError, match="num_features"):
        sparsevd.SBPDropout(0)
    with pytest.raises(ValueError, match="num_features"):
        sparsevd.SBPDropout(-3)
    with pytest.raises(ValueError, match="a < b"):
        sparsevd.SBPDropout(3, bounds=(0.0, 0.0))
    with pytest.raises(ValueError, match="a < b"):
        sparsevd.SBPDropout(3, bounds=(1.0, -1.0))
    with pytest.raises(ValueError, match="threshold"):
        sparsevd.SBPDropout(3, threshold=float("nan"))
    with pytest.raises(TypeError, match="dim"):
        sparsevd.SBPDropout(3, dim=1.5)
    layer = sparsevd.SBPDropout(3, dim=2)
    with pytest.raises(ValueError, match="out of range"):
        layer(torch.randn(4, 3))
    with pytest.raises(ValueError, match="expected 3 units along dim 2"):
        layer(torch.randn(4, 3, 5))
    with pytest.raises(TypeError, match="floating-point"):
        sparsevd.SBPDropout(3)(torch.ones(2, 3, dtype=torch.int64))
    bad = sparsevd.SBPDropout(3)
    with torch.no_grad():
        bad.mu[1] = float("nan")
    for call in (bad.kl, bad.snr, lambda: bad(torch.randn(2, 3)), lambda: bad.eval()(torch.randn(2, 3))):
        with pytest.raises((ValueError, RuntimeError), match="NaN"):
            call()


# --- with the rest of the package ------------------------------------------------------------


def _mlp_sbp():
    return nn.Sequential(nn.Linear(6, 9), sparsevd.SBPDropout(9), nn.ReLU(), nn.Linear(9, 4))


def test_kl_divergence_and_sgvlb_include_sbp_layers():
    model = _mlp_sbp()
    torch.testing.assert_close(sparsevd.kl_divergence(model), model[1].kl())
    both = nn.Sequential(sparsevd.SparseVDLinear(6, 9), sparsevd.SBPDropout(9), nn.ReLU(), nn.Linear(9, 4))
    torch.testing.assert_close(sparsevd.kl_divergence(both), both[0].kl() + both[1].kl())
    loss_fn = sparsevd.SGVLBLoss(model, dataset_size=100)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    loss = loss_fn(model(x), y, kl_weight=0.5)
    loss.backward()
    assert model[1].log_sigma.grad is not None


def test_report_lists_units_kept():
    model = _mlp_sbp()
    with torch.no_grad():
        model[1].log_sigma[:4] = 3.0  # SNR < 1: pruned
    rep = sparsevd.report(model)
    assert rep.units == [{"layer": "1", "kept": 5, "total": 9}]
    assert "units kept" in str(rep) and rep.to_dict()["units"] == rep.units
    assert sparsevd.report(nn.Sequential(nn.Linear(3, 2))).units == []


def test_predict_samples_sbp_layers():
    model = _mlp_sbp()
    with torch.no_grad():
        model[1].log_sigma.fill_(0.0)
    model.eval()
    out = sparsevd.predict(model, torch.randn(5, 6), samples=8, return_samples=True)
    assert not torch.allclose(out.samples[0], out.samples[1])
    assert not model[1].training, "modes are restored"


def test_convert_inserts_sbp_after_each_layer():
    base = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    model = sparsevd.convert(base, sbp={"threshold": 2.0})
    conv = model[0]
    assert isinstance(conv[0], sparsevd.SparseVDConv2d) and isinstance(conv[1], sparsevd.SBPDropout)
    assert conv[1].dim == 1 and conv[1].num_features == 4 and conv[1].threshold == 2.0
    assert isinstance(model[3], sparsevd.SparseVDLinear), "no SBP on the output layer"
    lin = sparsevd.convert(base, sbp=True, sbp_output=True)[3]
    assert isinstance(lin[0], sparsevd.SparseVDLinear) and lin[1].dim == -1 and lin[1].num_features == 5
    dense = sparsevd.convert(base, sbp=True, sparsevd=False)
    assert type(dense[0][0]) is nn.Conv2d and isinstance(dense[0][1], sparsevd.SBPDropout)
    x = torch.randn(3, 2, 5, 5)
    base.eval(), dense.eval()
    # E[θ] at μ = 0, log σ = −5 is 0.9947: convert divides the layer by it, so the pair computes what it did
    torch.testing.assert_close(dense(x), base(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sparsevd=False without sbp"):
        sparsevd.convert(base, sparsevd=False)
    with pytest.raises(ValueError, match="unknown SBPDropout options"):
        sparsevd.convert(base, sbp={"thresh": 1.0})
    with pytest.raises(ValueError, match="a < b"):
        sparsevd.convert(base, sbp={"bounds": (0.0, -1.0)})
    with pytest.raises(TypeError, match="sbp must be"):
        sparsevd.convert(base, sbp="yes")


def _randomize_sbp(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, sparsevd.SBPDropout):
            with torch.no_grad():
                m.mu.copy_(torch.rand(m.num_features, generator=g) * 3.5 - 3)
                m.log_sigma.copy_(torch.rand(m.num_features, generator=g) * 6 - 4)
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
                m.weight.uniform_(0.5, 2, generator=g)
                m.bias.uniform_(-1, 1, generator=g)
    return model


STRUCTURES = {
    "linear-sbp-relu": lambda: nn.Sequential(nn.Linear(6, 9), sparsevd.SBPDropout(9), nn.ReLU(), nn.Linear(9, 4)),
    "linear-relu-sbp": lambda: nn.Sequential(nn.Linear(6, 9), nn.ReLU(), sparsevd.SBPDropout(9), nn.Linear(9, 4)),
    "sbp-on-inputs": lambda: nn.Sequential(sparsevd.SBPDropout(6), nn.Linear(6, 9), nn.Sigmoid(), nn.Linear(9, 4)),
    "conv-bn-sbp": lambda: nn.Sequential(nn.Conv2d(2, 5, 3), nn.BatchNorm2d(5), sparsevd.SBPDropout(5), nn.ReLU(),
                                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(45, 4)),
    "conv-sbp-bn": lambda: nn.Sequential(nn.Conv2d(2, 5, 3), sparsevd.SBPDropout(5), nn.BatchNorm2d(5), nn.ReLU(),
                                         nn.Conv2d(5, 3, 3), nn.Flatten(), nn.Linear(48, 4)),
    "pool-sbp-flatten": lambda: nn.Sequential(nn.Conv2d(2, 5, 3), nn.Tanh(), nn.MaxPool2d(2),
                                              sparsevd.SBPDropout(5), nn.Flatten(), nn.Linear(45, 4)),
    "convert-sparsevd+sbp": lambda: sparsevd.convert(
        nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(45, 8), nn.ReLU(),
                      nn.Linear(8, 4)), sbp=True, exclude="6"),
    "convert-sbp-only": lambda: sparsevd.convert(
        nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 4)), sbp=True,
        sparsevd=False, exclude="4"),
}


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_sparsify_folds_sbp_exactly_and_cuts_pruned_units(name):
    torch.manual_seed(0)
    model = _randomize_sbp(STRUCTURES[name]()).eval()
    conv = name in ("conv-bn-sbp", "conv-sbp-bn", "pool-sbp-flatten", "convert-sparsevd+sbp")
    x = torch.randn(4, 2, 8, 8) if conv else torch.randn(4, 6)
    fast = sparsevd.sparsify(model, input_shape=tuple(x.shape[1:]) if conv else None)
    assert not any(isinstance(m, sparsevd.SBPDropout) for m in fast.modules()), "every SBP folded"
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-6)
    kept = sum(m.kept_units() for m in model.modules() if isinstance(m, sparsevd.SBPDropout))
    total = sum(m.num_features for m in model.modules() if isinstance(m, sparsevd.SBPDropout))
    assert kept < total
    if name != "sbp-on-inputs":  # the network's own inputs cannot be cut
        units = sum(m.weight.shape[0] for m in fast.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        before = sum(m.weight.shape[0] for m in model.modules()
                     if isinstance(m, (nn.Linear, nn.Conv2d, sparsevd.SparseVDLinear, sparsevd.SparseVDConv2d)))
        assert units <= before - (total - kept)


def test_sparsify_keeps_an_sbp_it_cannot_fold():
    model = _randomize_sbp(nn.Sequential(nn.Linear(6, 9), nn.Tanh(), sparsevd.SBPDropout(9), nn.Sigmoid())).eval()
    x = torch.randn(3, 6)
    fast = sparsevd.sparsify(model)
    assert isinstance(fast[2], sparsevd.SBPDropout) and not fast[2].training
    torch.testing.assert_close(fast(x), model(x))


def test_autocast_and_compile():
    torch.manual_seed(0)
    model = _mlp_sbp()
    x = torch.randn(8, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        kl = sparsevd.kl_divergence(model)
    assert y.dtype == torch.bfloat16 and kl.dtype == torch.float32
    (y.float().sum() + kl).backward()
    assert model[1].mu.grad.dtype == torch.float32
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(3)
    a = compiled(x)
    torch.manual_seed(3)
    torch.testing.assert_close(a, model(x))
    model.eval()
    torch.testing.assert_close(compiled(x), model(x))
    kl_c = torch.compile(lambda m: sparsevd.kl_divergence(m), fullgraph=True)(model)
    torch.testing.assert_close(kl_c, sparsevd.kl_divergence(model))


@pytest.mark.parametrize("noise", [False, True])
def test_freeze_masks_fixes_the_units_for_fine_tuning(noise):
    torch.manual_seed(0)
    model = _randomize_sbp(_mlp_sbp())
    sbp = model[1]
    mask = sbp.mask().clone()
    assert 0 < mask.sum() < mask.numel()
    assert sparsevd.freeze_masks(model, noise=noise) == [sbp] and sbp.frozen_noise == noise
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    model.train()
    if not noise:  # the deterministic E[θ]·mask, as in eval mode, and no gradient for μ, log σ
        torch.testing.assert_close(model(x), model.eval()(x))
        model.train()
    out = model(x)
    assert torch.all(sbp(model[0](x))[:, ~mask] == 0)  # the pruned units output exactly zero, noise or not
    nn.functional.cross_entropy(out, y).backward()
    assert (sbp.mu.grad is not None) == noise
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    for _ in range(5):  # the data term alone, with a large lr: the fixed mask holds whatever μ, log σ do
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert torch.equal(sbp.mask(), mask) and sbp.kept_units() == int(mask.sum())
    model.eval()
    torch.testing.assert_close(sparsevd.sparsify(model)(x), model(x))
    fresh = _mlp_sbp()
    fresh.load_state_dict(model.state_dict())  # the fixed mask travels with the state dict
    assert torch.equal(fresh[1].frozen_mask, mask)
    torch.testing.assert_close(fresh.eval()(x), model(x))
    fresh.load_state_dict(_mlp_sbp().state_dict())  # and so does its absence
    assert fresh[1].frozen_mask is None
    assert sparsevd.unfreeze_masks(model) == [sbp] and sbp.frozen_mask is None and not sbp.frozen_noise
    with pytest.raises(RuntimeError, match="frozen_mask must be a bool tensor of shape"):
        fresh.load_state_dict({**model.state_dict(), "1.frozen_mask": torch.ones(3, dtype=torch.bool)})
