"""Structured Bayesian Pruning: sparsevd's ops (C++ on CPU, Triton on CUDA) against the
eager reference (what runs without them) and torch.compile of it.

- "kl fwd+bwd": Σ KL over the units and its two gradients ([units]-sized): every row
  computes the three in one call ("sparsevd" is the op itself; "sparsevd-autograd" is what
  a training step runs, sbp_kl then torch.autograd.grad);
- "sample fwd" (no gradient, as in predict()) and "sample fwd+bwd": θ [batch, units] by the
  inverse CDF, then the gradients in μ and log σ from an upstream gradient.

"sparsevd-regenerate" is the other choice for the sampler's backward: the forward draws θ
only and the backward draws again to get ∂θ/∂μ, ∂θ/∂log σ (the op does this when its
forward ran without gradients), against keeping them from the forward ("sparsevd").
Shapes: LeNet-5-Caffe's conv2 filters and fc1 units and the MLP's 500 units, batch 100."""

import pytest
import torch

import harness
from sparsevd import reference
from sparsevd.noise import uniform_from_seed
from sparsevd.sbp import sbp_kl, sbp_sample

DEV = harness.device()
SHAPES = [(100, 50), (100, 500), (100, 800)] if not harness.QUICK else [(100, 800)]
BOUNDS = reference.SBP_BOUNDS


def _params(units):
    g = torch.Generator().manual_seed(0)
    # a trained layer's spread: some units pruned (σ wide), some kept, some at the bound
    mu = torch.rand(units, generator=g) * 3 - 2.5
    log_sigma = torch.rand(units, generator=g) * 6 - 5
    return mu.to(DEV).requires_grad_(), log_sigma.to(DEV).requires_grad_()


def eager_kl(mu, log_sigma):
    return reference.sbp_kl_with_grad(mu.detach(), log_sigma.detach(), BOUNDS)


def eager_sample(mu, log_sigma, u, grad):
    theta, dmu, dls = reference.sbp_sample(mu.detach(), log_sigma.detach(), u, BOUNDS, with_grad=grad is not None)
    if grad is None:
        return theta
    return (grad * dmu).sum(0), (grad * dls).sum(0)


_compiled_kl = harness.compiled(eager_kl)
_compiled_sample = harness.compiled(eager_sample)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[1]}units")
@pytest.mark.parametrize("impl", ["sparsevd", "sparsevd-autograd", "eager", "compile"])
def test_sbp_kl(benchmark, impl, shape):
    mu, log_sigma = _params(shape[1])
    if impl == "sparsevd":
        def run():
            torch.ops.sparsevd.sbp_kl(mu.detach(), log_sigma.detach(), *BOUNDS)
    elif impl == "sparsevd-autograd":
        def run():
            torch.autograd.grad(sbp_kl(mu, log_sigma, BOUNDS), (mu, log_sigma))
    else:
        f = eager_kl if impl == "eager" else _compiled_kl

        def run():
            f(mu, log_sigma)

    benchmark.group = f"sbp kl fwd+bwd {shape[1]} units"
    harness.measure(benchmark, run, DEV, impl=impl, shape=shape, mode="fwd+bwd")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"b{s[0]}-{s[1]}units")
@pytest.mark.parametrize("impl", ["sparsevd", "sparsevd-regenerate", "eager", "compile"])
def test_sbp_sample(benchmark, impl, shape, mode):
    batch, units = shape
    if impl == "sparsevd-regenerate" and mode == "fwd":
        pytest.skip("the two backward strategies differ only with a backward")
    mu, log_sigma = _params(units)
    seed = torch.tensor(7)
    grad = torch.randn(batch, units, device=DEV)
    if impl.startswith("sparsevd"):
        with_grad = impl == "sparsevd"

        def run():
            if mode == "fwd":
                with torch.no_grad():
                    sbp_sample(mu, log_sigma, batch, BOUNDS, seed=seed)
            else:
                theta = torch.ops.sparsevd.sbp_sample(mu, log_sigma, seed, batch, *BOUNDS, with_grad)[0]
                torch.autograd.grad(theta, (mu, log_sigma), grad)
    else:
        f = eager_sample if impl == "eager" else _compiled_sample

        def run():
            u = uniform_from_seed(batch, units, seed, DEV)
            f(mu, log_sigma, u, None if mode == "fwd" else grad)

    benchmark.group = f"sbp sample {mode} batch={batch} {units} units"
    harness.measure(benchmark, run, DEV, impl=impl, shape=shape, mode=mode)
