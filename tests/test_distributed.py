"""torch.distributed on CPU (gloo, 2 processes): independent noise per rank, the training
command under DistributedDataParallel (in sync, the one-process gradients, the same
accuracy, resume, refusals), torchrun stopping every rank when one fails, and FSDP2.

Every multi-process test is bounded: collectives time out after 60 s and a job that has
not ended after DEADLINE seconds is killed and fails."""

import datetime
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sparsevd
from sparsevd.experiments import checkpoints, cli, config, distributed, loop
from sparsevd.experiments.distributed import World

WORLD = 2
#: Seconds a 2-process job may take, start-up included, before it is killed.
DEADLINE = 300
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _worker(rank, init_file, out_dir, fn, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)  # 2 processes on the CI's 2 cores
    try:
        torch.save(fn(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(fn, tmp_path, *args):
    """Run ``fn(rank, *args)`` on WORLD gloo processes; returns their results in rank
    order. A process that raises fails the test (with its traceback); a job still running
    after DEADLINE seconds is killed."""
    work = tmp_path / f"spawn-{time.monotonic_ns()}"
    work.mkdir()
    context = mp.start_processes(_worker, args=(str(work / "init"), str(work), fn, args), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + DEADLINE
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"{fn.__name__} on {WORLD} processes still running after {DEADLINE} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ------------------------------------------------------------------------------ noise


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


# ------------------------------------------------------------ batches across ranks


@pytest.mark.parametrize("n, batch, size", [(10, 4, 2), (11, 4, 2), (9, 4, 2), (13, 6, 3), (7, 100, 2), (5, 2, 1)])
def test_every_example_once_per_epoch_and_the_global_batches_of_one_process(n, batch, size):
    order = distributed.epoch_order(n, seed=0, epoch=3)
    parts = [World(rank, size).batches(order, batch) for rank in range(size)]
    assert len({len(p) for p in parts}) == 1  # every rank takes the same number of steps
    single = World().batches(order, batch)
    for k, step in enumerate(zip(*parts)):
        indices = torch.cat([idx for idx, _ in step])
        assert all(len(idx) > 0 for idx, _ in step)
        sizes = [len(idx) for idx, _ in step]
        assert max(sizes) - min(sizes) <= 1
        # the shares weight each rank's mean so that their average is the global batch's mean
        assert sum(share for _, share in step) == pytest.approx(size)
        assert all(share == pytest.approx(len(idx) * size / len(indices)) for idx, share in step)
        if len(single) == len(parts[0]):  # no batch merged: the one-process batches, split
            assert torch.equal(indices, single[k][0])
    everything = torch.cat([idx for p in parts for idx, _ in p])
    assert torch.equal(everything.sort().values, torch.arange(n))  # once each: nothing padded or dropped
    if n == 9:  # a last global batch of 1 < 2 ranks joins the one before: 4 + 5 examples
        assert [sum(len(i) for i, _ in step) for step in zip(*parts)] == [4, 5]


def test_epoch_order_depends_on_seed_and_epoch_only():
    a = distributed.epoch_order(50, 0, 1)
    assert torch.equal(a, distributed.epoch_order(50, 0, 1))
    torch.manual_seed(123)  # torch's global generator plays no part
    assert torch.equal(a, distributed.epoch_order(50, 0, 1))
    assert not torch.equal(a, distributed.epoch_order(50, 0, 2))
    assert not torch.equal(a, distributed.epoch_order(50, 1, 1))


def _parse(tmp_path, world, *flags):
    c = config.build_parser().parse_args(["--out", str(tmp_path), *flags])
    return config.check_config(c, world)


def test_the_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match="--batch-size 101 is the global batch, split evenly across the 2 processes: "
                                         "it must be a multiple of 2"):
        _parse("o", World(1, 2), "--batch-size", "101")
    assert _parse("o", World(1, 2), "--batch-size", "100").world_size == 2
    with pytest.raises(ValueError, match="each one uses the GPU of its local rank"):
        distributed.device_of("cuda:1", World(0, 2))
    assert distributed.device_of("cpu", World(1, 2)) == torch.device("cpu")
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT not set: start the processes with torchrun"):
        with distributed.process_group(World(0, 2), torch.device("cpu"), 10):
            pass


# ------------------------------------------------------------- DDP: the gradients


def _partly_pruned_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), sparsevd.SparseVDLinear(12, 16), nn.ReLU(), sparsevd.SparseVDLinear(16, 3))
    with torch.no_grad():  # log α spread over [-4, 5]: some weights pruned, many with a KL gradient
        for _, layer in sparsevd.sparsevd_modules(model):
            layer.log_sigma2.copy_(torch.log(layer.weight ** 2) + 9 * torch.rand_like(layer.weight) - 4)
    return model


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(7, 12, generator=generator), torch.randint(0, 3, (7,), generator=generator)


def _ddp_step_gradients(rank):
    """One step of the command's loop (loop.step) on DDP, this rank's part of a global
    batch of 7 (4 + 3 examples). The masks are fixed without noise, so the forward is
    deterministic; the loss is the SGVLB, so the KL term is in the gradients."""
    model = _partly_pruned_mlp()
    sparsevd.freeze_masks(model)
    ddp = distributed.wrap(model, World(rank, WORLD), torch.device("cpu"))
    x, y = _batch()
    (idx, share), = World(rank, WORLD).batches(torch.arange(7), 7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss_fn = sparsevd.SGVLBLoss(model, dataset_size=50)
    loop.step(ddp, optimizer, loss_fn, x[idx], y[idx], 1.0, share)
    return {name: p.grad for name, p in model.named_parameters()}


def test_ddp_gradients_are_the_one_process_gradients_kl_included(tmp_path):
    model = _partly_pruned_mlp()
    sparsevd.freeze_masks(model)
    x, y = _batch()
    sparsevd.SGVLBLoss(model, dataset_size=50)(model(x), y).backward()
    kl_grad = torch.autograd.grad(sparsevd.kl_divergence(model), model[1].log_sigma2)[0]
    assert kl_grad.abs().max() > 1e-3  # the KL does reach the parameters
    for grads in spawn(_ddp_step_gradients, tmp_path):
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


# -------------------------------------------------------------------------- FSDP2


def _fsdp2_gradients(rank):
    """SparseVD layers sharded by FSDP2: the KL, the frozen masks and a training step."""
    from torch.distributed.fsdp import fully_shard

    model = _partly_pruned_mlp()
    for layer in (model[1], model[3], model):
        fully_shard(layer)
    out = {"sharded": type(model[1].weight).__name__}
    x, y = _batch()
    idx = torch.arange(6)[World(rank, WORLD).part(6)]  # 3 examples each
    sparsevd.freeze_masks(model)  # on the sharded layers: the masks are whole on every rank
    out["kept"] = sparsevd.compression(model)
    loss_fn = sparsevd.SGVLBLoss(model, dataset_size=50)
    loss_fn(model(x[idx]), y[idx]).backward()
    out["grads"] = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    out["kl"] = sparsevd.kl_divergence(model).detach()
    sparsevd.unfreeze_masks(model)  # and SparseVD training (the LRT, with noise) runs
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = loss_fn(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    out["losses"] = losses
    return out


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")  # the LRT's output is a view; nothing edits it in place
def test_fsdp2_trains_sparsevd_layers_with_the_one_process_gradients(tmp_path):
    """FSDP2 (fully_shard) works: the custom ops run on the gathered parameters in the
    forward, the KL sums the shards' KL over the ranks, and each shard gets the gradient
    a single process computes for the whole batch."""
    model = _partly_pruned_mlp()
    sparsevd.freeze_masks(model)
    x, y = _batch()
    sparsevd.SGVLBLoss(model, dataset_size=50)(model(x[:6]), y[:6]).backward()
    for result in spawn(_fsdp2_gradients, tmp_path):
        assert result["sharded"] == "DTensor"
        assert result["kept"] == sparsevd.compression(model) and result["kept"][0] < result["kept"][1]
        torch.testing.assert_close(result["kl"], sparsevd.kl_divergence(model).detach())
        for name, p in model.named_parameters():
            torch.testing.assert_close(result["grads"][name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
        assert all(torch.isfinite(torch.tensor(result["losses"])))


# -------------------------------------------------------- the training command, DDP


#: A small problem (the label is a bright row of the image): 270 training images, global
#: batch 30 (9 steps per epoch), 3 SparseVD epochs and 1 of fine-tuning. The threshold is
#: fixed: chosen on 30 validation images, it would compare the luck of the draw.
FLAGS = ["--epochs", "3", "--batch-size", "30", "--kl-weight", "0.05", "--lr", "1e-2", "--finetune-epochs", "1",
         "--threshold", "3", "--timing-repeats", "2", "--samples", "2", "--dist-timeout", "60"]
STEPS_PER_EPOCH = 9


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from test_train import _idx_dir

    return str(_idx_dir(tmp_path_factory.mktemp("data"), n_train=300, n_test=100))


def _train(rank, argv, interrupt_after=None):
    """The training command on this rank; returns its summary (rank 0; None on the
    others, "interrupted" when stopped) and the model's state at its last checkpoint."""
    from sparsevd.experiments import plots

    plots.plot_run = lambda *args: []  # drawn in test_train; slow on 2 cores
    states, real_save = [], cli.Run.save

    def save(run, name=checkpoints.CHECKPOINT):
        if name == checkpoints.CHECKPOINT:
            states.append({k: v.clone() for k, v in run.model.state_dict().items()})
        real_save(run, name)

    cli.Run.save = save
    if interrupt_after is not None:  # every rank stops at the same step, as when the job is killed
        real_step, calls = loop.step, []

        def step(*args):
            calls.append(1)
            if len(calls) > interrupt_after:
                raise KeyboardInterrupt
            return real_step(*args)

        loop.step = step
    try:
        summary = cli.run(argv)
    except KeyboardInterrupt:
        summary = "interrupted"
    return {"summary": summary, "state": states[-1]}


@pytest.fixture(scope="module")
def two_processes(data_root, tmp_path_factory):
    """The command on 2 processes: its output directory and what each rank returned."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "run"
    return out, spawn(_train, tmp, ["--data-dir", data_root, "--out", str(out), *FLAGS])


def test_two_processes_train_one_model_in_sync_and_rank_0_writes(two_processes, data_root, tmp_path):
    out, (first, second) = two_processes
    for name, value in first["state"].items():  # DDP kept the replicas equal
        assert torch.equal(second["state"][name], value), name
    summary = first["summary"]
    assert second["summary"] is None and summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert sorted(os.listdir(out)) == ["checkpoint-before-finetune.pt", "checkpoint.pt", "results.md", "summary.json",
                                       "train.log"]
    log = (out / "train.log").read_text()
    assert log.count("epoch   1/3 ") == 1 and log.count("command: ") == 1  # one writer
    assert "command: torchrun --standalone --nproc-per-node 2 -m sparsevd.train" in log
    assert "2 processes (gloo, 1 thread each), batch 15 per process" in log
    assert "2 processes (DistributedDataParallel, gloo)" in (out / "results.md").read_text()
    state = torch.load(out / checkpoints.CHECKPOINT, weights_only=True)
    assert state["epoch"] == 4 and state["config"]["world_size"] == 2
    mask = state["model"]["1.frozen_mask"]  # fine-tuned on 2 processes: the pruned weights stay zero
    assert 0 < mask.sum() < mask.numel() and torch.count_nonzero(state["model"]["1.weight"][~mask]) == 0
    # the same problem on one process at the same global batch: the same accuracy
    single = cli.run(["--data-dir", data_root, "--out", str(tmp_path / "single"), *FLAGS])
    assert single["world_size"] == 1
    assert summary["test_error"] <= 5 and single["test_error"] <= 5
    assert abs(summary["compression"] / single["compression"] - 1) < 0.2


def test_a_killed_two_process_run_resumes_where_it_stopped(two_processes, data_root, tmp_path):
    straight_out, (straight, _) = two_processes
    out = tmp_path / "run"
    argv = ["--data-dir", data_root, "--out", str(out), *FLAGS]
    stopped = spawn(_train, tmp_path, argv, STEPS_PER_EPOCH + 4)  # in the second epoch
    assert [r["summary"] for r in stopped] == ["interrupted"] * 2
    assert torch.load(out / checkpoints.CHECKPOINT, weights_only=True)["epoch"] == 1
    with pytest.raises(checkpoints.CheckpointError, match=r"world_size: checkpoint 2, now 1\); resume with the same "
                                                          r"number of processes \(torchrun --nproc-per-node 2"):
        cli.run(argv + ["--resume"])
    first, second = spawn(_train, tmp_path, argv + ["--resume"])
    for name, value in straight["state"].items():  # the uninterrupted run's end, bit for bit
        assert torch.equal(first["state"][name], value), name
        assert torch.equal(second["state"][name], value), name
    strip = lambda h: [{k: v for k, v in row.items() if "seconds" not in k} for row in h]  # noqa: E731
    resumed = torch.load(out / checkpoints.CHECKPOINT, weights_only=True)
    assert strip(resumed["history"]) == strip(torch.load(straight_out / checkpoints.CHECKPOINT,
                                                         weights_only=True)["history"])
    assert first["summary"]["test_error"] == straight["summary"]["test_error"]


FAILING_RANK = """
    import os, sys
    from sparsevd.experiments import cli, loop

    real_step, calls = loop.step, []

    def step(*args):
        calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == 3:
            raise RuntimeError("rank 1 failed on purpose")
        return real_step(*args)

    loop.step = step
    cli.main(sys.argv[1:])
"""


def test_a_failing_rank_stops_the_job_with_its_error(data_root, tmp_path):
    """Under torchrun, rank 1 raises in its third step while rank 0 waits for it in the
    gradient all-reduce: the job ends, soon, with rank 1's error, and nothing hangs."""
    script = tmp_path / "failing_rank.py"
    script.write_text(textwrap.dedent(FAILING_RANK))
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), "--data-dir", data_root, "--out", str(tmp_path / "run"), *FLAGS],
                            capture_output=True, text=True, timeout=DEADLINE, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "rank 1 failed on purpose" in output, output[-3000:]
    assert time.monotonic() - t0 < DEADLINE
    assert not (tmp_path / "run" / checkpoints.CHECKPOINT).exists()  # it died in the first epoch
