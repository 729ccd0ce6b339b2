"""Where the noise of the stochastic layers comes from.

Every stochastic op takes a 0-dim int64 ``seed`` and derives its noise from it alone, so
the backward regenerates the noise instead of storing it. The seed is drawn from torch's
CPU generator, so ``torch.manual_seed`` reproduces a run.

Data-parallel training seeds every process alike, which would give every rank the same
noise: the noise part of the gradient would then not average out across ranks, and N
ranks would draw no more samples than one. So when ``torch.distributed`` is initialised,
the drawn seed is mixed with the process's rank: independent noise per rank, still a
function of ``torch.manual_seed`` and the rank. :func:`per_rank_noise` turns it off (for
model-parallel groups that must share the noise, say).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

_PER_RANK = True
_MASK = (1 << 62) - 1


def _splitmix64(x):
    """A bijective 64-bit mix (Steele et al.'s SplitMix64 finaliser): nearby ranks give
    unrelated seed offsets."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def rank_offset():
    """What the drawn seed is XOR-ed with on this process: 0 without torch.distributed (or
    with per-rank noise turned off), else a mix of the global rank."""
    if not (_PER_RANK and dist.is_available() and dist.is_initialized()):
        return 0
    rank = dist.get_rank()
    return _splitmix64(rank) & _MASK if rank else 0


def draw_seed(generator=None):
    """A fresh 62-bit seed (0-dim int64 CPU tensor) from torch's CPU generator (or
    ``generator``), mixed with the rank under torch.distributed (see the module doc)."""
    seed = torch.randint(1 << 62, (), generator=generator, dtype=torch.int64)
    offset = rank_offset()
    return torch.bitwise_xor(seed, offset) if offset else seed


@contextlib.contextmanager
def _restoring(previous):
    global _PER_RANK
    try:
        yield
    finally:
        _PER_RANK = previous


def per_rank_noise(enabled):
    """Whether the stochastic layers draw independent noise on each rank of a
    torch.distributed job (default True). Sets it for the process and returns a context
    manager that restores the previous setting on exit, so both forms work::

        sparsevd.noise.per_rank_noise(False)           # from now on
        with sparsevd.noise.per_rank_noise(False): ... # for a block
    """
    global _PER_RANK
    previous, _PER_RANK = _PER_RANK, bool(enabled)
    return _restoring(previous)


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
