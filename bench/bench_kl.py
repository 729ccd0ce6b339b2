"""KL term: sparsevd's kernels against eager and torch.compile of the reference, and a
copy of the same bytes (the bandwidth yardstick).

Bytes that must move, forward+backward: read θ and log σ², write ∂θ and ∂log σ² (4
tensor-sizes); "bytes" in each row is that minimum, so bytes / time over the copy row's
rate is the "% of copy bandwidth" of the targets. Rows, forward+backward:

- sparsevd: ``functional.kl_divergence`` as training runs it: the fused forward+gradient
  op (``kl_divergence_with_grad``) forward, and a backward that scales the kept gradients
  by the incoming one (here kl_weight / N = 1/60000, as ``SGVLBLoss`` gives it) in place:
  4 + 4 tensor-sizes;
- sparsevd-separate: the forward op, then the backward op recomputing from the
  parameters: 2 + 4;
- sparsevd-fused-kernel: the forward+gradient sweep alone, no backward: 4, the one-pass
  floor (what training would cost if the scale were known at forward time);
- eager, compile: the reference, and torch.compile of it;
- copy: θ and log σ² copied into two buffers: 4 tensor-sizes moved.

``test_kl_kernel_config`` sweeps the fused kernel's (elements per program, warps), the
data for ``triton_kernels.kl.CONFIG``.
"""

import pytest
import torch

import harness
from sparsevd import functional, reference
from sparsevd.triton_kernels import kl

DEV = harness.device()
CUDA = DEV.type == "cuda"
SHAPES = [(4096, 4096)] if harness.QUICK or CUDA else [(300, 784), (4096, 4096)]
DTYPES = [torch.float32] if harness.QUICK or not CUDA else [torch.float32, torch.bfloat16]
GRAD = 1 / 60000  # kl_weight / N_train: what SGVLBLoss hands the KL term's backward
MOVED = {"sparsevd": 8, "sparsevd-separate": 6, "sparsevd-fused-kernel": 4, "copy": 4}  # tensor-sizes
_compiled_kl = harness.compiled(reference.kl_divergence)
_RANGE = reference.LOG_ALPHA_RANGE


def _separate(w, s):
    return torch.ops.sparsevd.kl_divergence(w, s, *_RANGE)


def _fused_kernel(w, s):
    return torch.ops.sparsevd.kl_divergence_with_grad(w, s, *_RANGE)


IMPLS = {
    "sparsevd": functional.kl_divergence,
    "sparsevd-separate": _separate,
    "eager": reference.kl_divergence,
    "compile": _compiled_kl,
}


def _cases():
    impls = list(IMPLS) + ["sparsevd-fused-kernel", "copy"]
    cases = [(i, s, d, "fwd+bwd") for s in SHAPES for d in DTYPES for i in impls]
    if not (harness.QUICK or CUDA):  # forward alone decides no GPU target: CPU only
        cases += [(i, s, d, "fwd") for s in SHAPES for d in DTYPES for i in IMPLS if i != "sparsevd-separate"]
    return cases


def _id(case):
    impl, shape, dtype, mode = case
    return f"{impl}-{mode}-{str(dtype).replace('torch.', '')}-{shape[0]}x{shape[1]}"


def _params(shape, dtype, requires_grad):
    torch.manual_seed(0)
    w = torch.randn(*shape, device=DEV, dtype=dtype, requires_grad=requires_grad)
    s = (torch.randn(*shape, device=DEV) * 3 - 6).to(dtype).requires_grad_(requires_grad)
    return w, s


@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_kl(benchmark, case):
    impl, shape, dtype, mode = case
    w, s = _params(shape, dtype, requires_grad=mode != "fwd" and impl not in ("copy", "sparsevd-fused-kernel"))
    grad = torch.tensor(GRAD, device=DEV)
    if impl == "copy":
        outs = torch.empty_like(w), torch.empty_like(s)

        def run():
            outs[0].copy_(w)
            outs[1].copy_(s)
    elif impl == "sparsevd-fused-kernel":
        def run():
            _fused_kernel(w, s)
    elif mode == "fwd":
        f = IMPLS[impl]

        def run():
            with torch.no_grad():
                f(w, s)
    else:
        f = IMPLS[impl]

        def run():
            torch.autograd.grad(f(w, s), (w, s), grad)

    elem = w.element_size() * w.numel()
    bytes_needed = 2 * elem if mode == "fwd" else 4 * elem
    benchmark.group = f"kl {mode} {dtype} {shape[0]}x{shape[1]}".replace("torch.", "")
    harness.measure(benchmark, run, DEV, impl=impl, bytes=bytes_needed, moved=MOVED.get(impl, 0) * elem or None,
                    shape=shape, dtype=str(dtype), mode=mode)


CONFIGS = [(2048, 4), (1024, 4), (1024, 8), (4096, 8), (512, 4)] if CUDA and not harness.QUICK else []


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}warps")
def test_kl_kernel_config(benchmark, config):
    w, s = _params((4096, 4096), torch.float32, requires_grad=False)

    def run():
        kl.kl_forward_backward(w, s, *_RANGE, config=config)

    benchmark.group = "kl fused kernel (elements per program, warps) float32 4096x4096"
    harness.measure(benchmark, run, DEV, impl=f"{config[0]}/{config[1]}" + (" (CONFIG)" if config == kl.CONFIG else ""),
                    bytes=4 * w.element_size() * w.numel(), config=config)
