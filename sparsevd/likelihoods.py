"""GaussianLikelihood: the regression likelihood p(y | x, w) = N(y; f(x, w), σ²).

SGVLB needs a per-example negative log-likelihood; for regression that is the Gaussian
one with a noise variance σ², which is also what makes a predictive interval honest:
the spread of the sampled means (epistemic, what :func:`sparsevd.predict` measures from
the posterior over weights) says nothing about the noise in the targets (aleatoric).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._validate import integer, real


def _check_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"GaussianLikelihood: the {name} must be a tensor, got {type(value).__name__}")


class GaussianLikelihood(nn.Module):
    """Gaussian negative log-likelihood with a fixed, learned or predicted noise variance.

    ``variance``:

    - a number > 0: a fixed σ², known noise;
    - ``"learned"`` (default): one σ² learned with the network (homoscedastic), the
      parameter ``log_variance`` of shape ``[num_outputs]`` (default 1: shared by every
      output), starting at ``init_variance``;
    - ``"head"``: the model predicts σ² per example (heteroscedastic): its output's last
      dimension holds the means in its first half and log σ² in its second half
      (``[..., 2·D]`` for ``D`` targets).

    ``likelihood(output, target)`` is the NLL summed over each example's target values
    and averaged over the batch, as :class:`~sparsevd.SGVLBLoss` needs (its KL / N is
    per example); targets have the shape of the means. ``likelihood.split(output)``
    gives ``(mean, variance)``; :func:`sparsevd.predict` uses it.
    """

    def __init__(self, variance="learned", init_variance=None, num_outputs=None):
        super().__init__()
        if isinstance(variance, str):
            if variance not in ("learned", "head"):
                raise ValueError(f"variance must be a number > 0, 'learned' or 'head', got {variance!r}")
            self.mode = variance
        else:
            variance = real("GaussianLikelihood", "variance", variance, "a number > 0, 'learned' or 'head'",
                            check=lambda v: True)
            if not (math.isfinite(variance) and variance > 0):
                raise ValueError(f"GaussianLikelihood: a fixed variance must be a finite number > 0, got {variance}")
            self.mode = "fixed"
        if self.mode != "learned" and (init_variance is not None or num_outputs is not None):
            raise ValueError("init_variance and num_outputs apply to variance='learned' only")
        if self.mode == "fixed":
            self.register_buffer("log_variance", torch.tensor([math.log(variance)]))
        elif self.mode == "learned":
            init_variance = 1.0 if init_variance is None else init_variance
            num_outputs = 1 if num_outputs is None else num_outputs
            init_variance = real("GaussianLikelihood", "init_variance", init_variance, "a finite number > 0",
                                 lambda v: math.isfinite(v) and v > 0)
            num_outputs = integer("GaussianLikelihood", "num_outputs", num_outputs, 1, "a positive int")
            self.log_variance = nn.Parameter(torch.full((num_outputs,), math.log(init_variance)))

    def split(self, output):
        """``(mean, variance)`` of the Gaussian that ``output`` (the model's) stands for,
        both of the mean's shape."""
        _check_tensor("output", output)
        if self.mode == "head":
            if output.dim() < 2 or output.shape[-1] % 2:
                raise ValueError("GaussianLikelihood('head'): the model's output must have an even last dimension "
                                 f"(means, then log variances), got shape {tuple(output.shape)}")
            mean, log_variance = output.chunk(2, dim=-1)
            return mean, log_variance.exp()
        if self.log_variance.shape[0] > 1 and (output.dim() < 2 or output.shape[-1] != self.log_variance.shape[0]):
            raise ValueError(f"GaussianLikelihood(num_outputs={self.log_variance.shape[0]}) needs outputs [..., "
                             f"{self.log_variance.shape[0]}], got shape {tuple(output.shape)}")
        return output, self.log_variance.to(output.dtype).exp().expand(output.shape)

    def forward(self, output, target):
        _check_tensor("output", output)
        _check_tensor("target", target)
        if output.dim() == 0:
            raise ValueError("GaussianLikelihood: the output needs a batch dimension first, got a scalar")
        mean, variance = self.split(output)
        if target.shape != mean.shape:
            # broadcasting [N, 1] means against [N] targets would silently give an [N, N] loss
            raise ValueError(f"GaussianLikelihood: the target's shape {tuple(target.shape)} must equal the mean's "
                             f"{tuple(mean.shape)}" + (" (the model's output is [means, log variances])"
                                                       if self.mode == "head" else ""))
        nll = 0.5 * (math.log(2 * math.pi) + variance.log() + (target - mean) ** 2 / variance)
        return nll.reshape(nll.shape[0], -1).sum(1).mean()

    def extra_repr(self):
        if self.mode == "fixed":
            return f"variance={float(self.log_variance.exp()):g}"
        if self.mode == "learned":
            return f"variance='learned', num_outputs={self.log_variance.shape[0]}"
        return "variance='head'"
