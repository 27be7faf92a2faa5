#!/usr/bin/env bash
# The GPU check: one command on a fresh GPU machine with no network.
#
#   bash scripts/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu_results)
#
# 1. installs the package (pip --no-build-isolation --no-deps: the machine already has torch,
#    triton, numpy, pyyaml, tqdm, pytest), falling back to PYTHONPATH if that fails;
# 2. runs the kernel and layer tests on CUDA: fp32, fp16, bf16, token counts up to 4M,
#    bitwise determinism (MOS_TEST_DEVICE=cuda, no interpreter);
# 3. runs the kernel benchmarks, writing a CSV with card, date and versions;
# 4. prints a short table last: test counts and the measured targets.
# Everything it prints is also logged under OUT_DIR. Budget: under 8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_results}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT_DIR/environment.txt"

if ! $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT_DIR/install.log" 2>&1; then
  echo "pip install failed (see install.log); using PYTHONPATH" | tee -a "$OUT_DIR/install.log"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# Four workers share the GPU: the small cases are launch- and JIT-bound, not GPU-bound.
test_start=$(date +%s)
MOS_TEST_DEVICE=cuda timeout ${MOS_TEST_TIMEOUT:-150} $PY -m pytest -q -n 4 -p no:cacheprovider \
  --benchmark-disable tests/test_kernels_triton.py tests/test_kernels_registration.py \
  tests/test_kernels_gpu.py tests/test_ops_reference.py tests/test_layer.py 2>&1 | tee "$OUT_DIR/tests.log"
test_rc=${PIPESTATUS[0]}
test_seconds=$(( $(date +%s) - test_start ))

timeout ${MOS_BENCH_TIMEOUT:-170} $PY -m benchmarks.bench_kernels --out "$OUT_DIR" --rep-ms 25 --warmup-ms 10 \
  2>&1 | tee "$OUT_DIR/bench.log"
bench_rc=${PIPESTATUS[0]}

echo
echo "== GPU check summary =="
head -n 2 "$OUT_DIR/environment.txt" | tail -n 1
echo "tests: $(grep -E '(passed|failed|error)' "$OUT_DIR/tests.log" | tail -n 1) (exit $test_rc, ${test_seconds}s)"
echo "benchmarks: exit $bench_rc, CSV in $OUT_DIR"
sed -n '/^Targets at/,$p' "$OUT_DIR/bench.log"
exit $(( test_rc != 0 || bench_rc != 0 ))
