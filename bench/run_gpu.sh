#!/usr/bin/env bash
# One device call on a GPU machine (H100/H200, 16 cores): build, the tests that need the
# GPU, the benchmarks that decide issue #16's targets, and results.md with each target's
# measured figure and verdict, the route rule and cost model the measurements set, device,
# versions and commit.
#
#   SPARSEVD_COMMIT=$(git rev-parse --short HEAD) bash bench/run_gpu.sh            # ≤ 8 min
#   SPARSEVD_COMMIT=$(git rev-parse --short HEAD) bash bench/run_gpu.sh --quick    # < 4 min
#   bash bench/run_gpu.sh --dry-run [--quick]    # on any machine: the plan, every pytest
#                                                # selection collected, results.md rendered
#
# Stages, each under its own timeout (and all under one budget: a stage gets at most the
# time left), so a hang costs that stage only. Estimates for a fresh H200 machine, from
# the H100 development run (bench/results/2026-11-23-H100-development.md: build, Triton
# compile and benchmark times) and the case counts; [cap full / quick] in seconds:
#   build      pip install -e . (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0)    ~75 s   [240/240]
#   tests      pytest -m gpu -n 16: the CUDA tests only (CI runs the CPU     ~120 s  [180/60]
#              suite); quick: the Triton kernel tests (~45 s)
#   lrt        bench_lrt.py: 4096³ bf16 (both routes, eager, compile,        ~120 s  [170/80]
#              dense), the route grid, LeNet-300-100 training step; quick:
#              4096³ fwd+bwd, LeNet-sized routes, the step (~50 s)
#   kl         bench_kl.py: fp32/bf16 4096², copy yardstick, config sweep   ~35 s   [80/50]
#   csr        bench_csr.py: 4096² at 90-99%, batch 1-4096, vs dense bf16    ~70 s   [100/30]
#              and cuSPARSE, GPU kernel times by profiler for µs-sized
#              calls; quick: 98/99%, batch 1 and 64 (~15 s)
#   inference  bench/bench_inference.py, when present                       ~45 s   [60/40]
#   conv       bench_conv.py -k im2col (the cost model's im2col bandwidth)  ~10 s   [30/-]
# Total ≈ 475 s full (budget 470 s: the last stages give way first), ≈ 220 s quick
# (budget 230 s); results.md takes ~3 s after each stage.
#
# Output: $OUT/results.md and $OUT/run.tar.gz (logs, JSON, device.txt, stages.tsv), both
# rewritten after every stage (the device tool returns at most 8 files from $OUT, and
# whatever is there when a call is cut short). Without $OUT: bench/results/run-<date>/.
# The device copy has no .git: the commit comes from $SPARSEVD_COMMIT. Python runs in UTF-8
# mode (PYTHONUTF8=1): the logs and results carry non-ASCII text whatever the locale.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=full dry=
for arg in "$@"; do
  case $arg in
    --quick) mode=quick ;;
    --dry-run) dry=1 ;;
    *) echo "usage: bench/run_gpu.sh [--quick] [--dry-run]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
out=${OUT:-bench/results/run-$(date -u +%Y%m%d-%H%M%S)}
work=$(mktemp -d "${TMPDIR:-/tmp}/sparsevd-run.XXXXXX")
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONUTF8=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
[[ $mode == quick ]] && export SPARSEVD_BENCH_QUICK=1
[[ -n $dry ]] && export SPARSEVD_BENCH_DEVICE=cuda  # collect the GPU grids on any machine
declare -A CAP
if [[ $mode == full ]]; then
  budget=${BUDGET_S:-470}; CAP=([build]=240 [tests]=180 [lrt]=170 [kl]=80 [csr]=100 [inference]=60 [conv]=30)
  tests=(tests); csr_k="test_csr_linear and 4096x4096 and not 0.998"
else
  budget=${BUDGET_S:-230}; CAP=([build]=240 [tests]=60 [lrt]=80 [kl]=50 [csr]=30 [inference]=40)
  tests=(tests/test_triton_lrt.py tests/test_triton_kl.py tests/test_lrt_sample.py); csr_k="test_csr_linear"
fi
start=$SECONDS
status=0

checkpoint() {  # results.md and the archive, as they stand
  if ! "$PY" bench/targets.py "$work" >"$work/results.md" 2>"$work/targets.log"; then
    status=1; echo "== results.md not written: bench/targets.py failed"; tail -15 "$work/targets.log"
  fi
  cp "$work/results.md" "$out/results.md"
  tar -czf "$out/run.tar.gz" -C "$work" .
}

# run_stage NAME COMMAND...: run under min(CAP[NAME], budget left), log to NAME.log.
# pytest's exit code 5 (nothing collected) fails a stage: a selection must select.
run_stage() {
  local name=$1; shift
  local left=$((budget - (SECONDS - start) - 10)) limit=${CAP[$name]}
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    printf '%s\t0\tskipped: budget spent\n' "$name" >>"$work/stages.tsv"; echo "== $name: skipped, budget spent"; return
  fi
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >"$work/$name.log" 2>&1
  rc=$?
  local verdict=ok
  if ((rc == 124 || rc == 137)); then verdict="timed out at ${limit} s"; elif ((rc != 0)); then verdict="failed (exit $rc)"; fi
  printf '%s\t%s\t%s\n' "$name" $((SECONDS - t0)) "$verdict" >>"$work/stages.tsv"
  echo "   $verdict, $((SECONDS - t0)) s: $(grep -E '(passed|failed|collected|error)' "$work/$name.log" | tail -1)"
  if [[ $verdict != ok ]]; then tail -20 "$work/$name.log"; status=1; fi
  checkpoint
}

{
  echo "commit ${SPARSEVD_COMMIT:-unknown} · $(date -u '+%Y-%m-%d %H:%M UTC') · mode $mode${dry:+ (dry run)}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi: no GPU here"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, '· CUDA', torch.version.cuda, '· triton', triton.__version__)"
} >"$work/device.txt" 2>&1
cat "$work/device.txt"

pytest_flags=(-q -p no:cacheprovider)
[[ -n $dry ]] && pytest_flags+=(--collect-only)
test_flags=(-m gpu -ra --durations=15)
if [[ -z $dry ]] && "$PY" -c "import xdist" 2>/dev/null; then test_flags+=(-n "${TEST_WORKERS:-16}"); fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then test_flags+=(--timeout 150); fi

if [[ -n $dry ]]; then
  echo "== build (dry run, not run): MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST $PY -m pip install --no-build-isolation --no-deps --no-index -e ."
  printf 'build\t0\tdry run\n' >>"$work/stages.tsv"
else
  run_stage build "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
fi
if ! "$PY" -c "import sparsevd; print(sparsevd.dispatch.describe())" >>"$work/device.txt" 2>&1; then
  status=1; echo "== sparsevd does not import:"; tail -15 "$work/device.txt"
fi

run_stage tests "$PY" -m pytest "${tests[@]}" "${test_flags[@]}" "${pytest_flags[@]}"

bench() {  # bench NAME FILE [pytest arguments]
  local name=$1 file=$2; shift 2
  run_stage "$name" "$PY" -m pytest "bench/$file" "${pytest_flags[@]}" --benchmark-json="$work/bench_$name.json" "$@"
}
bench lrt bench_lrt.py
bench kl bench_kl.py
bench csr bench_csr.py -k "$csr_k"
if [[ -f bench/bench_inference.py ]]; then
  bench inference bench_inference.py
else
  printf 'inference\t0\tskipped: bench/bench_inference.py not present\n' >>"$work/stages.tsv"
fi
[[ -n ${CAP[conv]:-} ]] && bench conv bench_conv.py -k im2col

checkpoint
echo "== $((SECONDS - start)) s in all; $out/results.md:"
sed -n '/^## Targets/,/^## /p' "$out/results.md" | head -30
rm -rf "$work"
exit $status
