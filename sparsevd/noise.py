"""Where the noise of the stochastic layers comes from.

Every stochastic op takes a 0-dim int64 ``seed`` and derives its noise from it alone, so
the backward regenerates the noise instead of storing it. The seed is drawn from torch's
CPU generator, so ``torch.manual_seed`` reproduces a run.
"""

from __future__ import annotations

import torch


def draw_seed(generator=None):
    """A fresh 63-bit seed (0-dim int64 CPU tensor) from torch's CPU generator (or ``generator``)."""
    return torch.randint(1 << 62, (), generator=generator, dtype=torch.int64)


def noise_from_seed(rows, cols, seed, device):
    """Standard normal [rows, cols] float32 noise determined by ``seed`` alone: the noise of
    the reference kernels (the compiled ones draw their own, from the same seed)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) & ((1 << 63) - 1))
    return torch.randn(rows, cols, generator=generator, device=device, dtype=torch.float32)


def uniform_from_seed(rows, cols, seed, device):
    """Uniform [0, 1) [rows, cols] float32 noise determined by ``seed`` alone (the SBP
    sampler's; the compiled CPU kernel draws the same numbers from the same seed)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) & ((1 << 63) - 1))
    return torch.rand(rows, cols, generator=generator, device=device, dtype=torch.float32)
