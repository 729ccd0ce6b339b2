"""KL term forward+backward: sparsevd's kernel against eager and torch.compile of the
reference. Bytes that must move: read θ and log σ² (forward), read them again and write
both gradients (backward); the bandwidth figure is those bytes over the time.

"sparsevd-fused" is the op that returns the gradients from the forward sweep
(``kl_divergence_with_grad``; backward only scales them): the issue's question whether
fusing pays where the KL is differentiated anyway is answered per device by this row
against "sparsevd" (the dispatcher uses it on the devices listed in
``dispatch.FUSED_KL_GRAD_DEVICES``)."""

import pytest
import torch

import harness
from sparsevd import dispatch, functional, reference

DEV = harness.device()
SHAPES = [(300, 784), (4096, 4096)] if not harness.QUICK else [(4096, 4096)]
DTYPES = [torch.float32, torch.bfloat16] if DEV.type == "cuda" else [torch.float32]
IMPLS = ["sparsevd", "sparsevd-fused", "eager", "compile"]
_compiled_kl = harness.compiled(reference.kl_divergence)


def _fused_kl(w, s):
    return torch.ops.sparsevd.kl_divergence_with_grad(w, s, *reference.LOG_ALPHA_RANGE)[0]


def _impl(name):
    return {
        "sparsevd": functional.kl_divergence,
        "sparsevd-fused": _fused_kl,
        "eager": reference.kl_divergence,
        "compile": _compiled_kl,
    }[name]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", IMPLS)
def test_kl(benchmark, impl, shape, dtype, mode):
    torch.manual_seed(0)
    w = torch.randn(*shape, device=DEV, dtype=dtype, requires_grad=mode != "fwd")
    s = (torch.randn(*shape, device=DEV) * 3 - 6).to(dtype).requires_grad_(mode != "fwd")
    if impl == "sparsevd-fused" and (mode == "fwd" or not dispatch.use_ops()):
        pytest.skip("the fused op is for training (fwd+bwd) and needs the extension")
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
