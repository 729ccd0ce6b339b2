import os
import re

import pytest
import torch

# Triton kernels run on CPU tensors in the interpreter; it must be chosen before
# triton is imported, and only where there is no GPU to run them for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


# A test "needs a GPU" when it has a `gpu` mark (the Triton kernel tests, which run on CUDA
# whenever there is one), a "cuda" parameter (the `device` fixture, test_csr_kernels'
# DEVICES), or a skip for want of CUDA. bench/run_gpu.sh runs `pytest -m gpu` on the GPU
# machine (CI runs the rest on CPUs); CI checks the selection with `--collect-only`.
_NEEDS_CUDA = re.compile(r"\b(no|needs?( a)?) (cuda|gpu)\b", re.IGNORECASE)


def _needs_gpu(item):
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(str(v) == "cuda" for v in callspec.params.values()):
        return True
    return any(_NEEDS_CUDA.search(str(mark.kwargs.get("reason", ""))) for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _needs_gpu(item):
            item.add_marker(pytest.mark.gpu)


def rel_err(out, ref):
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close_fa(out, ref64, same_dtype, atol=1e-6, factor=2.0):
    """flash-attention's rule: |out − ref64| ≤ factor·|same_dtype_torch − ref64| + atol."""
    err = (out.double() - ref64).abs().max().item()
    base = (same_dtype.double() - ref64).abs().max().item()
    assert err <= factor * base + atol, f"kernel error {err:.3e} vs same-dtype torch error {base:.3e}"


def run_python(code, timeout=300, **env):
    """Run ``code`` in a fresh interpreter with extra environment variables (what is read at
    import, such as SPARSEVD_BACKEND, needs a new process); returns its stdout."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
