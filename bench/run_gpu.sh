#!/usr/bin/env bash
# On a GPU machine: build the CUDA extension, run the test suite on the GPU, run the
# benchmarks, and write logs, JSON and markdown tables to $OUT (the device tool's output
# folder) or bench/results/.
#
#   bench/run_gpu.sh [STAGE ...]      (default: build test lrt kl)
#
# Stages: build; test (the whole suite, GPU cases included; extra pytest arguments in
# $TEST_ARGS, default `-n 8` since the GPU image has pytest-xdist); lrt, kl, csr, conv (one
# benchmark file each, bench/bench_<stage>.py); quick (smaller benchmark grids). One
# device call is limited to 10 minutes: a fresh machine fits `build test` in one call and
# the benchmark stages in the next ones (a warm machine keeps the build). Each stage is
# capped by its own timeout so that a hang still leaves the other stages' files.
# The commit being measured is taken from $SPARSEVD_COMMIT (the device copy has no .git).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
stages=" ${*:-build test lrt kl} "
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
[[ $stages == *" quick "* ]] && export SPARSEVD_BENCH_QUICK=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
status=0
if [[ $stages == *" build "* ]]; then
  start=$SECONDS
  if ! python3 -m pip install --no-build-isolation --no-deps --no-index -e . >"$out/build.log" 2>&1; then
    tail -40 "$out/build.log"; exit 1
  fi
  echo "build: $((SECONDS - start)) s"
fi
python3 -c "import sparsevd; print(sparsevd.dispatch.describe())" | tee -a "$out/device.txt"
if [[ $stages == *" test "* ]]; then
  timeout "${TEST_TIMEOUT:-420}" python3 -m pytest tests -q -ra -p no:cacheprovider --durations=15 ${TEST_ARGS:--n 8} \
    2>&1 | tee "$out/tests.log" | tail -30
  status=${PIPESTATUS[0]}
fi
for bench in lrt kl csr conv; do
  [[ $stages == *" $bench "* ]] || continue
  timeout "${BENCH_TIMEOUT:-500}" python3 -m pytest "bench/bench_$bench.py" -q \
    --benchmark-json="$out/bench_$bench.json" ${BENCH_ARGS:-} >"$out/bench_$bench.log" 2>&1 \
    || { tail -20 "$out/bench_$bench.log"; status=1; }
  [[ -s "$out/bench_$bench.json" ]] && python3 bench/report.py "$out/bench_$bench.json" >"$out/bench_$bench.md" \
    && tail -c 4000 "$out/bench_$bench.md"
done
exit $status
