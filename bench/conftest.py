import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # bench files import harness

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_benchmark_update_machine_info(config, machine_info):
    import harness

    machine_info["device"] = harness.device_name(harness.device())
    machine_info["torch"] = torch.__version__
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    import sparsevd

    machine_info["sparsevd_dispatch"] = sparsevd.dispatch.describe()


def pytest_benchmark_update_commit_info(config, commit_info):
    if os.environ.get("SPARSEVD_COMMIT"):  # set by bench/run_gpu.sh's caller: the device copy has no .git
        commit_info["id"] = os.environ["SPARSEVD_COMMIT"]
    try:
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=False).stdout
        commit_info["dirty_files"] = [line[3:] for line in dirty.splitlines()]
    except OSError:
        pass


@pytest.fixture
def bench_threads():
    """Torch's CPU threads at ``harness.THREADS`` for the case (model-level latency as a
    user calls it, one thread by default), restored after; nothing on a GPU."""
    import harness

    before = torch.get_num_threads()
    if harness.device().type == "cpu":
        torch.set_num_threads(harness.THREADS)
    yield
    torch.set_num_threads(before)
