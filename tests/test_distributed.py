"""torch.distributed on CPU (gloo, 2 processes): independent noise per rank."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparsevd

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _worker(rank, init_file, out_dir, fn):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(fn(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(fn, tmp_path):
    """Run ``fn(rank)`` on WORLD gloo processes; returns their results in rank order."""
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path), fn), nprocs=WORLD, join=True,
                       start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _noise_of_every_layer(rank):
    """The noise each stochastic layer draws for one input, all ranks seeded alike."""
    torch.manual_seed(0)
    linear = sparsevd.SparseVDLinear(6, 5, log_sigma2_init=0.0)
    conv = sparsevd.SparseVDConv2d(2, 3, 3, log_sigma2_init=0.0)
    torch.manual_seed(1)
    x, image = torch.randn(4, 6), torch.randn(2, 2, 5, 5)
    out = {"linear": linear(x) - linear.eval()(x), "conv": conv(image) - conv.eval()(image)}
    torch.manual_seed(1)
    out["sample"] = sparsevd.functional.lrt_sample(torch.zeros(3, 4), torch.ones(3, 4))
    torch.manual_seed(1)
    with sparsevd.noise.per_rank_noise(False):
        out["shared"] = sparsevd.functional.lrt_sample(torch.zeros(3, 4), torch.ones(3, 4))
    torch.manual_seed(1)
    out["again"] = sparsevd.functional.lrt_sample(torch.zeros(3, 4), torch.ones(3, 4))
    return out


def test_noise_is_independent_across_ranks_and_reproducible_per_rank(tmp_path):
    first, second = spawn(_noise_of_every_layer, tmp_path)
    for key in ("linear", "conv", "sample"):
        a, b = first[key].flatten(), second[key].flatten()
        assert a.abs().sum() > 0 and b.abs().sum() > 0
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.9, f"{key}: the ranks drew the same noise"
    torch.testing.assert_close(first["shared"], second["shared"])  # per-rank noise turned off
    for result in (first, second):  # the same seed on the same rank gives the same noise
        torch.testing.assert_close(result["again"], result["sample"])
    # rank 0 draws what a single process draws
    torch.manual_seed(1)
    torch.testing.assert_close(first["shared"], sparsevd.functional.lrt_sample(torch.zeros(3, 4), torch.ones(3, 4)))
