"""What a trained network is: its errors, what it keeps per layer (weights, units,
FLOPs), its inference timings against the dense network, the uncertainty of its
ensemble, and the run's provenance (device, commit, recipe, speed)."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import subprocess
import time

import torch

import sparsevd

from .distributed import SINGLE
from .loop import cut_copy, error_rate, prunes, pruned_copy, sbp_units
from .models import METHODS, MODELS

#: Batch sizes of the inference timings (the targets are at 1 and 64).
TIMING_BATCHES = (1, 64, 256)
#: CPU threads of the CPU timings: the SBP paper's CPU speed-ups, and a figure that does
#: not depend on how many cores the machine had free.
TIMING_THREADS = 1


def measure(model, data, world=SINGLE):
    """Test, validation and training error (%), the kept weights and the units kept per SBP
    layer of ``model`` in eval mode."""
    kept, total = sparsevd.compression(model)
    errors = {f"{k}_error": error_rate(model, data[f"{k}_x"], data[f"{k}_y"], world=world)
              for k in ("test", "val", "train")}
    return {**errors, "kept": kept, "total": total, "compression": total / kept if kept else math.inf,
            "units": sbp_units(model)}


def median_time(fn, x, repeats):
    """Median seconds of ``fn(x)`` over ``repeats`` calls, after warm-up."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn(x)
            sync()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def structure(model, input_shape):
    """What ``model`` keeps, per linear and convolution layer (``input_shape``: one
    example's, for the convolutions' output positions): ``(rows, report)``.

    Each row: the layer's name, type, ``shape``, ``kept`` of ``total`` weights and their
    ``sparsity`` (as :func:`sparsevd.compression` counts them), its ``units`` of
    ``units_total`` as the SBP paper counts them (the output channels of a convolution,
    the inputs of a fully-connected layer) that are left in :func:`.loop.cut_copy` with a
    non-zero weight, and FLOPs per example: ``flops_dense`` of the layer,
    ``flops_units`` of the block of its kept units (kept outputs × kept inputs: what a
    network cut down to its units computes) and ``flops_nonzero`` of its kept weights.
    ``report``: :func:`sparsevd.report` of the network that holds the weights counted
    (:func:`.loop.cut_copy` with SBP layers, else :func:`.loop.pruned_copy`)."""
    full = sparsevd.report(pruned_copy(model), input_shape=input_shape)  # the layers' own shapes
    cut = cut_copy(model)
    layers = dict(cut.named_modules())  # sparsify keeps the names of the layers it shrinks
    sbp = bool(sparsevd.sbp_modules(model))
    rows = []
    for r in full.rows:
        nonzero = layers[r["layer"]].weight.detach() != 0
        outputs = int(nonzero.flatten(1).any(1).sum())
        inputs = int(nonzero.transpose(0, 1).flatten(1).any(1).sum())
        conv = nonzero.dim() > 2
        kept = int(nonzero.sum()) if sbp else r["kept"]
        per_weight = r["flops_dense"] // r["total"]  # 2 × the output positions
        rows.append({"layer": r["layer"], "type": r["type"], "shape": r["shape"], "kept": kept, "total": r["total"],
                     "sparsity": 1 - kept / r["total"], "units": outputs if conv else inputs,
                     "units_total": r["shape"][0 if conv else 1], "flops_dense": r["flops_dense"],
                     "flops_units": per_weight * outputs * inputs * math.prod(nonzero.shape[2:]),
                     "flops_nonzero": per_weight * kept})
    return rows, sparsevd.report(cut, input_shape=input_shape) if sbp else full


@contextlib.contextmanager
def torch_threads(n):
    """torch's CPU threads set to ``n`` inside the block, and set back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _examples(x, n):
    """``n`` examples of ``x``, repeated when it has fewer."""
    return x.repeat(math.ceil(n / len(x)), *(1,) * (x.dim() - 1))[:n]


def inference_timings(c, model, x):
    """Median inference times of ``model`` (in eval mode) at the batch sizes of
    :data:`TIMING_BATCHES`, on the CPU with :data:`TIMING_THREADS` thread(s), and on the
    GPU too when ``x`` is on one. For a pruning run also: the dense network (the same
    architecture in plain torch layers, what the pruned one replaces), the dense copy
    (the pruned weights in dense layers of full size, run as sparsify runs its results)
    and the :func:`sparsevd.sparsify`'d network, with ``speedup`` = dense network /
    sparsify'd."""
    pruning = prunes(model)
    devices = [torch.device("cpu")] + ([x.device] if x.is_cuda else [])
    rows = []
    for device in devices:
        net = model if device == x.device else copy.deepcopy(model).to(device)
        inputs = x.to(device)
        threads = torch_threads(TIMING_THREADS) if device.type == "cpu" else contextlib.nullcontext()
        with threads:
            dense_network = MODELS[c.model](bayesian=False).to(device).eval() if pruning else None
            for batch in TIMING_BATCHES:
                xb = _examples(inputs, batch)
                row = {"device": device.type, "batch": batch, "eval_model_s": median_time(net, xb, c.timing_repeats)}
                if pruning:
                    row["dense_network_s"] = median_time(dense_network, xb, c.timing_repeats)
                    dense_copy = sparsevd.sparsify(net, batch_size=batch, cost_model=sparsevd.CostModel.dense(),
                                                   shrink=False)
                    row["dense_copy_s"] = median_time(dense_copy, xb, c.timing_repeats)
                    fast = sparsevd.sparsify(net, batch_size=batch, input_shape=tuple(x.shape[1:]))
                    row["sparsified_s"] = median_time(fast, xb, c.timing_repeats)
                    row["speedup"] = row["dense_network_s"] / row["sparsified_s"]
                rows.append(row)
    return rows


def uncertainty_summary(model, data, samples):
    """Mean predictive entropy and mutual information (nats) of the Bayesian ensemble on
    test images and on inputs unlike the training data."""
    test_x = data["test_x"][:1000]
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "test images": test_x,
        "inverted test images (1 − x)": 1 - test_x,
        "uniform noise": torch.rand(test_x.shape, generator=generator).to(test_x.device),
    }
    rows = []
    for name, x in inputs.items():
        out = sparsevd.predict(model, x, samples=samples, batch_samples=5)
        rows.append({"inputs": name, "predictive_entropy": float(out.entropy.mean()),
                     "expected_entropy": float(out.expected_entropy.mean()),
                     "mutual_information": float(out.mutual_information.mean())})
    return rows


def git_commit():
    """The commit of the package's source (``git describe``), or "unknown"."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=7"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def device_name(device):
    """The device a run trained on, in words: the GPU's name, or the CPU and its threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'' if threads == 1 else 's'})"


def examples_per_second(history, train_size):
    """Training examples per second of the training steps (validation not counted), all
    processes together; None for a history from before the steps were timed apart."""
    seconds = [h.get("step_seconds") for h in history]
    if not seconds or None in seconds:
        return None
    return train_size * len(seconds) / sum(seconds)


def recipe(c):
    """The optimisation recipe of the run's training epochs (the flags with their defaults
    filled in), as a dict; with --method magnitude, ``pruning``: its schedule."""
    with_kl = any(METHODS[c.method])
    r = {"batch_size": c.batch_size, "adam_beta1": c.adam_beta1, "lr": c.lr, "sbp_lr": c.sbp_lr,
         "lr_decay_start": c.lr_decay_start, "lr_end": c.lr * c.lr_end, "kl_weight": c.kl_weight if with_kl else None,
         "kl_warmup": list(c.kl_warmup) if with_kl else None, "init_from": c.init_from}
    if c.method == "magnitude":
        r["pruning"] = {"target_compression": c.target_compression, "scope": c.prune_scope, "end_epoch": c.prune_end,
                        "every": c.prune_every}
    return r
