"""predict(model, x): predictive uncertainty from averaging stochastic forward passes.

A SparseVD model is a posterior over weights; sampling it T times and averaging the
predictions is a Bayesian ensemble. An ordinary model with ``nn.Dropout`` layers kept on at
test time does the same for binary dropout ("MC dropout", Gal & Ghahramani). For
classification the spread splits into the expected entropy of the samples (aleatoric: the
classes overlap) and the mutual information between prediction and weights (epistemic: the
samples disagree, as they do far from the training data). For regression the variance
splits the same way (the law of total variance): the variance of the sampled means
(epistemic) plus the mean of the noise variances that a :class:`GaussianLikelihood`
assigns (aleatoric).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._validate import integer, module
from .layers import SparseVDModule
from .likelihoods import GaussianLikelihood
from .sbp import SBPDropout

#: The dropout layers predict() keeps on (besides the SparseVD layers, which sample with the LRT).
DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
TASKS = ("classification", "regression")


@dataclass
class Prediction:
    """What :func:`predict` returns; the fields of the other task are None.

    Classification (logits with the classes along dim 1, as ``nn.CrossEntropyLoss``
    expects; all in nats, per example): ``mean`` the mean of the sampled class
    probabilities, ``entropy`` its entropy (total uncertainty), ``expected_entropy`` the
    mean entropy of the samples (aleatoric), ``mutual_information`` = entropy −
    expected_entropy (epistemic).

    Regression: ``mean`` the mean of the sampled means; ``epistemic_variance`` their
    variance (the posterior's uncertainty about the function, which grows away from the
    data); ``aleatoric_variance`` the mean of the likelihood's noise variances (None
    without a likelihood); ``variance`` the total predictive variance, epistemic +
    aleatoric, the one for predictive intervals such as mean ± 2·sqrt(variance). Without
    a likelihood ``variance`` is the epistemic part alone, which leaves out the noise of
    the targets: intervals from it are too narrow.

    ``samples``: the T outputs (probabilities for classification, the sampled means for
    regression), ``[T, N, ...]``, when asked for.
    """

    mean: torch.Tensor
    variance: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    expected_entropy: torch.Tensor | None = None
    mutual_information: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    epistemic_variance: torch.Tensor | None = None
    aleatoric_variance: torch.Tensor | None = None


def _stochastic_layers(model):
    return [m for m in model.modules()
            if isinstance(m, (SparseVDModule, SBPDropout)) or (isinstance(m, DROPOUT) and m.p > 0)]


def _sample(model, x, samples, batch_samples):
    """[T, N, ...] outputs of T stochastic passes, ``batch_samples`` passes per forward."""
    stochastic = _stochastic_layers(model)
    if not stochastic:
        raise ValueError(f"predict: {type(model).__name__} has no SparseVD or dropout layer (with p > 0), so "
                         f"every pass would give the same output")
    modes = [(m, m.training) for m in model.modules()]
    outputs = []
    try:
        model.eval()
        for m in stochastic:
            m.train()
        n = x.shape[0]
        with torch.no_grad():
            for start in range(0, samples, batch_samples):
                t = min(batch_samples, samples - start)
                # t copies of the batch in one forward: the noise of the LRT and of dropout
                # is drawn per element, so every copy is an independent sample
                y = model(x.repeat(t, *(1,) * (x.dim() - 1)))
                if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != t * n:
                    shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                    raise ValueError(f"predict: the model must return a tensor with the batch first; for {t * n} "
                                     f"inputs it returned {shape}")
                outputs.append(y.reshape(t, n, *y.shape[1:]))
    finally:
        for m, mode in modes:
            m.training = mode
    return torch.cat(outputs)


def _likelihood_of(model):
    """The one GaussianLikelihood among ``model``'s submodules, or None."""
    found = [m for m in model.modules() if isinstance(m, GaussianLikelihood)]
    if len(found) > 1:
        raise ValueError(f"predict: {type(model).__name__} holds {len(found)} GaussianLikelihood modules; pass the "
                         "one its outputs follow as likelihood=")
    return found[0] if found else None


def _regression(out, likelihood, return_samples):
    if likelihood is None:
        epistemic = out.var(0, correction=0)
        return Prediction(mean=out.mean(0), variance=epistemic, epistemic_variance=epistemic,
                          samples=out if return_samples else None)
    with torch.no_grad():  # a learned noise variance is a parameter
        means, noise = likelihood.split(out)
    epistemic = means.var(0, correction=0)
    aleatoric = noise.mean(0)
    return Prediction(mean=means.mean(0), variance=epistemic + aleatoric, epistemic_variance=epistemic,
                      aleatoric_variance=aleatoric, samples=means if return_samples else None)


def predict(model, x, samples=32, task="classification", batch_samples=None, return_samples=False, likelihood=None):
    """Mean prediction and uncertainty of ``model`` at ``x`` from ``samples`` stochastic passes.

    SparseVD layers sample with the local reparameterization trick and ``nn.Dropout``
    layers drop (MC dropout); everything else (BatchNorm, ...) runs in eval mode, and
    every module's mode is restored afterwards. The passes run as forwards over ``x``
    repeated along the batch dimension, ``batch_samples`` copies at a time (default: all
    ``samples`` in one forward; lower it to bound memory), without gradients.
    ``torch.manual_seed`` makes the result reproducible. Dropout applied through
    ``torch.nn.functional`` inside a custom module is not switched on.

    ``likelihood`` (regression only): the :class:`GaussianLikelihood` the model was trained
    with, which adds its noise variance to the prediction's; by default the one the
    model holds as a submodule, if any. ``x``: a tensor whose first dimension is the
    batch. Returns a :class:`Prediction`.
    """
    module("predict", model)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"predict: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"predict: x must have a non-empty batch dimension first, got shape {tuple(x.shape)}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("predict: x contains NaN or Inf")
    samples = integer("predict", "samples", samples, 1, "a positive int")
    if batch_samples is not None:
        batch_samples = integer("predict", "batch_samples", batch_samples, 1, "a positive int")
    if task not in TASKS:
        raise ValueError(f"predict: task must be one of {TASKS}, got {task!r}")
    if likelihood is not None and not isinstance(likelihood, GaussianLikelihood):
        raise TypeError(f"predict: likelihood must be a GaussianLikelihood, got {type(likelihood).__name__}")
    if task == "regression" and likelihood is None:
        likelihood = _likelihood_of(model)
    elif task == "classification" and likelihood is not None:
        raise ValueError("predict: likelihood= is for task='regression'; a classifier's softmax is its likelihood")

    out = _sample(model, x, samples, batch_samples or samples)
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    out = out.to(acc)
    if task == "regression":
        return _regression(out, likelihood, return_samples)
    if out.dim() < 3:
        raise ValueError(f"predict: classification needs logits of shape [N, classes, ...], got {tuple(out.shape[1:])}")
    log_p = torch.log_softmax(out, dim=2)
    p = log_p.exp()
    mean = p.mean(0)
    entropy = -torch.special.xlogy(mean, mean).sum(1)
    expected_entropy = -(p * log_p).sum(2).mean(0)
    return Prediction(
        mean=mean,
        entropy=entropy,
        expected_entropy=expected_entropy,
        # ≥ 0 by Jensen's inequality; clamped against rounding
        mutual_information=(entropy - expected_entropy).clamp_min(0),
        samples=p if return_samples else None,
    )
