"""Training one model on several processes (``torchrun --nproc-per-node N -m sparsevd.train``):
where this process stands, the process group, which examples each rank trains on, and
the sums of the metrics over the ranks.

The data sit whole on every rank, as tensors. Every epoch is one permutation of the
training examples, the same on every rank (seeded by the run's seed and the epoch, like
``DistributedSampler``); it is cut into global batches of ``--batch-size`` examples, and
each global batch is split evenly across the ranks. So every example is trained on once
per epoch, with no padding and nothing dropped, and the ranks together take the steps a
single process takes on the same global batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

#: DDP's option to skip the buffer sync at every forward (torch 2.14 renamed broadcast_buffers).
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})
#: torchrun's variables that place a process in a job.
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the ``size`` processes of a job (one process: the default)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  #: rank among the processes of this machine
    local_size: int = 1  #: processes on this machine

    @property
    def main(self):
        """Whether this process writes the log, the checkpoints and the results."""
        return self.rank == 0

    def sum(self, values, device):
        """``values`` (numbers) summed over the ranks, as floats (float64 on the way)."""
        if self.size == 1:
            return [float(v) for v in values]
        total = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return total.tolist()

    def part(self, n):
        """This rank's share of ``range(n)``: a slice, the shares differing by one at most."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def batches(self, order, batch_size):
        """This rank's part of each global batch of ``order`` (a permutation of the example
        indices), with its share: ``[(indices, share), ...]``.

        Global batch k is ``order[k·B : (k+1)·B]``, as in a one-process run. The last one is
        smaller when B does not divide the number of examples; with fewer examples than
        ranks it joins the batch before it, so no rank ever has an empty part. ``share`` =
        len(part) · ranks / len(global batch), 1 when the batch splits evenly: the loss of
        each rank is multiplied by it, so that the average of the ranks' gradients that
        DistributedDataParallel takes is the gradient of the mean over the global batch.
        """
        bounds = list(range(0, len(order), batch_size)) + [len(order)]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < self.size:
            del bounds[-2]
        parts = []
        for start, end in zip(bounds, bounds[1:]):
            part = self.part(end - start)
            size = part.stop - part.start
            parts.append((order[start + part.start : start + part.stop], size * self.size / (end - start)))
        return parts


SINGLE = World()


def epoch_order(n, seed, epoch):
    """The permutation of ``n`` training examples for ``epoch`` (0-based): the same on every
    rank, a function of the run's ``seed`` and the epoch alone, so it needs no
    communication and a resumed run takes the epochs it would have taken."""
    # distinct for every (seed, epoch) with epoch < 1,000,003
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (1 << 63))
    return torch.randperm(n, generator=generator)


def current_world():
    """Where this process stands: the process group a caller initialised, else torchrun's
    environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), else one process."""
    try:
        env = {name: int(os.environ[name]) for name in ENV if name in os.environ}
    except ValueError:
        raise ValueError("torchrun's variables must be integers: "
                         + ", ".join(f"{n}={os.environ[n]!r}" for n in ENV if n in os.environ)) from None
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        rank, size = env.get("RANK", 0), env.get("WORLD_SIZE", 1)
    if not 0 <= rank < size:
        raise ValueError(f"RANK {rank} is not in 0..WORLD_SIZE-1 = {size - 1}")
    return World(rank, size, env.get("LOCAL_RANK", rank), env.get("LOCAL_WORLD_SIZE", size))


def device_of(device, world):
    """The device this rank trains on: with several processes on CUDA, cuda:LOCAL_RANK."""
    device = torch.device(device)
    if world.size == 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"--device {device}: with {world.size} processes each one uses the GPU of its local rank "
                         "(cuda:LOCAL_RANK); pass --device cuda (or auto), and choose the GPUs with "
                         "CUDA_VISIBLE_DEVICES")
    if world.local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {world.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                         "start at most that many processes per node")
    return torch.device("cuda", world.local_rank)


def threads_per_process(world):
    """The CPU threads a process gets when ``world.local_size`` of them share this machine's
    cores (at least 1), so that they do not oversubscribe it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // world.local_size)


@contextlib.contextmanager
def process_group(world, device, timeout_s):
    """The process group of a job of ``world.size`` > 1 processes, from torchrun's
    environment: gloo on the CPU, nccl on CUDA; every collective waits at most
    ``timeout_s`` seconds for the other ranks. Nothing for one process, or when the caller
    initialised the group (then it is the caller's to destroy)."""
    if world.size == 1 or dist.is_initialized():
        yield
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world.size} but {' and '.join(missing)} not set: start the processes with "
                         "torchrun (torchrun --standalone --nproc-per-node N -m sparsevd.train ...)")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if cuda else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def backend_name(world):
    """"gloo" / "nccl" for a job, None for one process."""
    return dist.get_backend() if world.size > 1 else None


def wrap(model, world, device, replaces=None):
    """``model`` for the training steps: in DistributedDataParallel when there are several
    processes (gradients averaged over the ranks), else itself. DDP is built over the
    parameters that require a gradient at the time, so a phase that trains others (the
    fine-tuning) wraps the model anew; ``replaces``: the wrapper of the phase before."""
    if isinstance(replaces, DistributedDataParallel):
        # its reducer still hooks the same parameters and would wait for gradients it no
        # longer gets: take its hooks off (as torch's own tests do to switch wrappers)
        replaces._remove_autograd_hooks()
    if world.size == 1:
        return model
    # no buffer sync at every forward: the only buffers are the fixed masks of fine-tuning,
    # which every rank computes alike from the same parameters and the same reduced metrics
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **_NO_FORWARD_BUFFER_SYNC)
