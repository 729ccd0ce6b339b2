#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the test suite on the GPU,
# run the benchmarks, and write logs and markdown tables to $OUT (the device tool's
# output folder) or bench/results/.
#   bench/run_gpu.sh [build] [test] [bench] [quick]     (default: build test bench)
# The commit being measured is taken from $SPARSEVD_COMMIT (the device copy has no .git).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
stages=${*:-build test bench}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
status=0
if [[ " $stages " == *" build "* ]]; then
  start=$SECONDS
  if ! python3 -m pip install --no-build-isolation --no-deps --no-index -e . >"$out/build.log" 2>&1; then
    tail -40 "$out/build.log"; exit 1
  fi
  echo "build: $((SECONDS - start)) s"
fi
python3 -c "import sparsevd; print(sparsevd.dispatch.describe())" | tee -a "$out/device.txt"
if [[ " $stages " == *" test "* ]]; then
  python3 -m pytest tests -q -x -ra -p no:cacheprovider --durations=15 2>&1 | tee "$out/tests.log" | tail -40
  status=${PIPESTATUS[0]}
fi
if [[ " $stages " == *" bench "* ]]; then
  [[ " $stages " == *" quick "* ]] && export SPARSEVD_BENCH_QUICK=1
  python3 -m pytest bench -q --benchmark-json="$out/bench.json" ${BENCH_ARGS:-} >"$out/bench.log" 2>&1 || { tail -30 "$out/bench.log"; status=1; }
  python3 bench/report.py "$out/bench.json" >"$out/bench.md" && tail -c 6000 "$out/bench.md"
fi
exit $status
