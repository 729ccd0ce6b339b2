"""The GPU run, checked without a GPU: bench/run_gpu.sh's dry run (every pytest selection
it would run collects, results.md renders), and the scripts that turn its measurements
into targets, the LRT route rule and sparsify's cost model, on synthetic results."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import fit_cost_model  # noqa: E402
import fit_lrt_route  # noqa: E402
import targets  # noqa: E402
from sparsevd.sparsify import CUDA_COST, CostModel, DeviceCost  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--dry-run"], ["--dry-run", "--quick"]], ids=["full", "quick"])
def test_dry_run(tmp_path, flags):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("SPARSEVD_BENCH_QUICK", None)
    done = subprocess.run(["bash", "bench/run_gpu.sh", *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ("tests", "lrt", "kl", "csr"):
        assert f"== {stage} (limit" in done.stdout, stage
    assert "collected" in done.stdout and "failed" not in done.stdout
    results = (tmp_path / "results.md").read_text()
    assert "## Targets" in results and "not measured" in results
    assert (tmp_path / "run.tar.gz").stat().st_size > 0


def test_bad_argument_is_refused():
    done = subprocess.run(["bash", "bench/run_gpu.sh", "--fast"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr


# ------------------------------------------------------------------------------------------
# synthetic pytest-benchmark results
# ------------------------------------------------------------------------------------------


def bench_json(rows, device="NVIDIA H200"):
    """A pytest-benchmark JSON: rows of (group, seconds per call, extra_info)."""
    benchmarks = [{"group": g, "name": f"{g}-{info['impl']}", "stats": {"median": t * 3},
                   "extra_info": {**info, "inner": 3}} for g, t, info in rows]
    return {"machine_info": {"device": device, "torch": "2.11.0", "triton": "3.6.0"}, "commit_info": {"id": "abc"},
            "datetime": "2026-12-01T00:00:00", "benchmarks": benchmarks}


def lrt_rows(times):
    """times: {(dtype, macs): (cublas, fused)} → forward+backward route rows."""
    rows = []
    for (dtype, macs), pair in times.items():
        for impl, t in zip(fit_lrt_route.ROUTES, pair):
            rows.append((f"lrt fwd+bwd {dtype} {macs}", t, dict(impl=impl, mode="fwd+bwd", dtype=f"torch.{dtype}",
                                                                macs=macs)))
    return rows


def test_route_rule_from_measurements():
    times = {("float32", 10): (50e-6, 30e-6), ("float32", 1000): (60e-6, 40e-6), ("float32", 10**6): (1e-4, 2e-4),
             ("float32", 10**8): (1e-3, 0.9e-3),  # fused wins again above a loss: not taken
             ("bfloat16", 10): (50e-6, 49e-6),  # within the margin: cuBLAS stays
             ("bfloat16", 1000): (60e-6, 20e-6)}
    bounds, rows = fit_lrt_route.fit(fit_lrt_route.route_times(bench_json(lrt_rows(times))))
    assert bounds == {"float32": 10**6, "bfloat16": 0, "float16": 0}
    assert len(rows) == 6
    all_fused = {("float32", 10): (50e-6, 30e-6), ("float32", 1000): (60e-6, 40e-6)}
    bounds, _ = fit_lrt_route.fit(fit_lrt_route.route_times(bench_json(lrt_rows(all_fused))))
    assert bounds["float32"] == 1001  # no extrapolation past the largest shape measured


def test_route_rule_output_is_python(tmp_path):
    path = tmp_path / "bench_lrt.json"
    times = {("bfloat16", 100): (5e-5, 2e-5), ("bfloat16", 10**9): (1e-3, 2e-3)}
    path.write_text(json.dumps(bench_json(lrt_rows(times))))
    text = fit_lrt_route.main([str(path)])
    line = next(line for line in text.splitlines() if line.startswith("FUSED_BELOW_MACS"))
    assert eval(line.split("=", 1)[1].split("#")[0], {"torch": torch}) == {torch.float16: 10**9, torch.bfloat16: 10**9}


TRUTH = DeviceCost(dense_overhead_s=9e-6, dense_bandwidth=3.5e12, dense_rate_fp32=45e12, dense_rate_fast=600e12,
                   csr_overhead_s=4e-6, csr_bandwidth=1.6e12, csr_rate=5e12, im2col_bandwidth=0.5e12)


def csr_json(cost):
    """bench_csr-shaped rows timed by ``cost`` itself."""
    model = CostModel(cpu=cost, cuda=cost)
    rows = []
    for n, k in [(300, 784), (1024, 1024), (4096, 4096)]:
        for sparsity in (0.9, 0.98, 0.99, 0.998):
            nnz = round(n * k * (1 - sparsity))
            for batch in (1, 8, 64, 256, 4096):
                group = f"csr N={n} K={k} sparsity={sparsity:.1%} batch={batch}"
                for impl, (form, size) in fit_cost_model.FORMS.items():
                    t = model.time(form, n, k, nnz, batch, "cuda", size)
                    info = dict(impl=impl, shape=[n, k], sparsity=sparsity, batch=batch, flops=2 * nnz * batch,
                                bytes=nnz * (size + 4))
                    rows.append((group, t, info))
    return bench_json(rows)


def test_cost_model_fit_recovers_the_constants(tmp_path):
    csr = tmp_path / "bench_csr.json"
    csr.write_text(json.dumps(csr_json(TRUTH)))
    conv = tmp_path / "bench_conv.json"
    conv.write_text(json.dumps(bench_json([("im2col a", 1e-3, dict(impl="im2col", bytes=0.7e9)),
                                           ("im2col b", 2e-3, dict(impl="im2col", bytes=1.4e9))])))
    rows = fit_cost_model.csr_rows(json.loads(csr.read_text()))
    fitted = fit_cost_model.fit(rows, "cuda", CUDA_COST)
    for field in fit_cost_model.FIELDS:
        assert getattr(fitted, field) == pytest.approx(getattr(TRUTH, field), rel=0.1), field
    assert fit_cost_model.decisions(fitted, rows, "cuda")[0] == 0
    text = fit_cost_model.main([str(csr), str(conv)])
    assert "CUDA_COST = DeviceCost(" in text and "im2col_bandwidth=7e+11" in text and "measured" in text
    # the printed constants are a DeviceCost that reproduces the fit
    code = text.split("```python\n")[1].split("```")[0].split("=", 1)[1]
    printed = eval(code, {"DeviceCost": DeviceCost})
    assert dataclasses.asdict(printed).keys() == dataclasses.asdict(TRUTH).keys()


def test_results_markdown(tmp_path):
    g = targets.LRT_TARGET
    lrt = [(g, 1.2e-3, dict(impl="sparsevd")), (g, 0.6e-3, dict(impl="dense")), (g, 1.6e-3, dict(impl="eager")),
           (g, 1.25e-3, dict(impl="compile")), (g, 1.2e-3, dict(impl="sparsevd-cublas")),
           (g, 1.7e-3, dict(impl="sparsevd-fused")),
           (targets.LENET_STEP, 1e-3, dict(impl="sparsevd")), (targets.LENET_STEP, 0.3e-3, dict(impl="dense"))]
    size = 4096 * 4096 * 4
    k = targets.KL_TARGET
    kl = [(k, 4 * size / 3.5e12, dict(impl="copy", bytes=4 * size)),
          (k, 4 * size / 2.0e12, dict(impl="sparsevd", bytes=4 * size)),
          (k, 4 * size / 3.0e12, dict(impl="sparsevd-fused-kernel", bytes=4 * size))]
    csr = []
    for batch in (1, 8):
        grp = f"csr N=4096 K=4096 sparsity=99.0% batch={batch}"
        base = dict(shape=[4096, 4096], sparsity=0.99, batch=batch, flops=2 * 167772 * batch)
        csr += [(grp, 10e-6, dict(base, impl="dense-bf16")), (grp, 1.5e-6, dict(base, impl="sparsevd-bf16", bytes=1e6)),
                (grp, 3e-6, dict(base, impl="sparsevd", bytes=1.2e6)), (grp, 9e-6, dict(base, impl="torch.sparse"))]
    for name, rows in (("lrt", lrt), ("kl", kl), ("csr", csr)):
        (tmp_path / f"bench_{name}.json").write_text(json.dumps(bench_json(rows)))
    (tmp_path / "stages.tsv").write_text("build\t70\tok\ntests\t100\tfailed (exit 1)\n")
    (tmp_path / "tests.log").write_text("===== 3 failed, 700 passed in 99.0s =====\n")
    text = targets.main(str(tmp_path))
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}

    def verdict(name):
        return lines[name].split(" | ")[2]

    assert verdict("LRT fwd+bwd bf16 4096³: sparsevd / dense nn.Linear ≤ 2.3") == "**met**"  # 2.00×
    assert "2.00×" in lines["LRT fwd+bwd bf16 4096³: sparsevd / dense nn.Linear ≤ 2.3"]
    assert verdict("LRT fwd+bwd bf16 4096³: eager / sparsevd ≥ 1.3") == "**met**"  # 1.33×
    assert verdict("LRT fwd+bwd bf16 4096³: torch.compile / sparsevd ≥ 1.1") == "**missed**"  # 1.04×
    assert "1.42×" in lines["LRT 4096³ bf16: fused-GEMM route / cuBLAS route (informative)"]
    assert verdict("LeNet-300-100 training step: sparsevd / dense ≤ 2.5") == "**missed**"  # 3.33×
    kl_line = "KL fwd+bwd fp32 4096² (sparsevd): ≥ 80% of copy bandwidth"
    assert "57%" in lines[kl_line] and verdict(kl_line) == "**missed**"
    assert "86%" in lines["KL fwd+bwd fp32 4096² (sparsevd-fused-kernel)"]
    assert verdict("KL fwd+bwd fp32 4096² (sparsevd-separate)") == "not measured"
    assert verdict("CSR 4096² 99%, batch 1: dense bf16 / sparsevd bf16 ≥ 5") == "**met**"  # 6.67×
    assert "19% (sparsevd-bf16" in lines["CSR 4096² 99%, batch 1: ≥ 50% of copy bandwidth"]
    assert verdict("CSR 4096² 99%, batch 1: ≥ 50% of copy bandwidth") == "**missed**"
    cusparse = "CSR 4096² at ≥ 90%: cuSPARSE / sparsevd ≥ 2 at every batch (fp32)"
    assert "worst 3.00×" in lines[cusparse] and verdict(cusparse) == "**met**"
    assert "3 failed, 700 passed" in text and "| tests | 100 | failed (exit 1) |" in text
    assert "No forward+backward rows of both LRT routes" in text  # these rows carry no route data


def test_empty_or_cut_benchmark_files_read_as_not_measured(tmp_path, capsys):
    # pytest-benchmark < 5 leaves an empty file when a stage runs no benchmark; a stage
    # killed while saving leaves a cut one: neither may cost the other stages' results
    grp = "csr N=4096 K=4096 sparsity=99.0% batch=1"
    base = dict(shape=[4096, 4096], sparsity=0.99, batch=1, flops=2 * 167772)
    rows = [(grp, 10e-6, dict(base, impl="dense-bf16")), (grp, 1e-6, dict(base, impl="sparsevd-bf16", bytes=1e6))]
    (tmp_path / "bench_csr.json").write_text(json.dumps(bench_json(rows)))
    (tmp_path / "bench_lrt.json").write_text("")
    (tmp_path / "bench_conv.json").write_text("")
    (tmp_path / "bench_kl.json").write_text(json.dumps(bench_json([]))[:20])
    assert targets.load(str(tmp_path), "lrt") is None and targets.load(str(tmp_path), "kl") is None
    assert "bench_kl.json: not valid JSON" in capsys.readouterr().err
    text = targets.main(str(tmp_path))
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| CSR 4096² 99%, batch 1: dense bf16") and "**met**" in line for line in lines)
    assert any(line.startswith("| LRT fwd+bwd bf16 4096³") and "not measured" in line for line in lines)
    assert "CUDA_COST = DeviceCost(" in text  # the cost model fitted without the empty conv file


def test_report_refuses_an_empty_file(tmp_path):
    (tmp_path / "out.json").write_text("")
    done = subprocess.run([sys.executable, "bench/report.py", str(tmp_path / "out.json")], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 1 and "is empty" in done.stderr and "Traceback" not in done.stderr


def test_csr_targets_use_gpu_kernel_time(tmp_path):
    # wall time of µs-sized calls is the CPU's launch cost; the verdict uses the kernels' time
    grp = "csr N=4096 K=4096 sparsity=99.0% batch=1"
    base = dict(shape=[4096, 4096], sparsity=0.99, batch=1, flops=2 * 167772)
    rows = [(grp, 12e-6, dict(base, impl="dense-bf16", kernel_s=10e-6)),
            (grp, 11e-6, dict(base, impl="sparsevd-bf16", kernel_s=1e-6, bytes=1e6))]
    (tmp_path / "bench_csr.json").write_text(json.dumps(bench_json(rows)))
    line = next(line for line in targets.main(str(tmp_path)).splitlines()
                if line.startswith("| CSR 4096² 99%, batch 1: dense bf16"))
    assert "10.00×" in line and "**met**" in line
