"""KL term forward+backward: sparsevd's kernel against eager and torch.compile of the
reference. Bytes that must move: read θ and log σ² (forward), read them again and write
both gradients (backward); the bandwidth figure is those bytes over the time."""

import pytest
import torch

import harness
from sparsevd import functional, reference

DEV = harness.device()
SHAPES = [(300, 784), (4096, 4096)] if not harness.QUICK else [(4096, 4096)]
DTYPES = [torch.float32, torch.bfloat16] if DEV.type == "cuda" else [torch.float32]
IMPLS = ["sparsevd", "eager", "compile"]
_compiled_kl = harness.compiled(reference.kl_divergence)


def _impl(name):
    return {"sparsevd": functional.kl_divergence, "eager": reference.kl_divergence, "compile": _compiled_kl}[name]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", IMPLS)
def test_kl(benchmark, impl, shape, dtype, mode):
    torch.manual_seed(0)
    w = torch.randn(*shape, device=DEV, dtype=dtype, requires_grad=mode != "fwd")
    s = (torch.randn(*shape, device=DEV) * 3 - 6).to(dtype).requires_grad_(mode != "fwd")
    f = _impl(impl)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                f(w, s)
    else:
        def run():
            torch.autograd.grad(f(w, s), (w, s))

    elem = w.element_size() * w.numel()
    bytes_moved = 2 * elem if mode == "fwd" else 4 * elem
    benchmark.group = f"kl {mode} {dtype} {shape[0]}x{shape[1]}".replace("torch.", "")
    harness.measure(benchmark, run, DEV, impl=impl, bytes=bytes_moved, shape=shape, dtype=str(dtype), mode=mode)
