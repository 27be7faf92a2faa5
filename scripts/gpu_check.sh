#!/usr/bin/env bash
# The GPU check: one command on a fresh GPU machine with no network.
#
#   bash scripts/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu_results)
#
# 1. installs the package (pip --no-build-isolation --no-deps: the machine already has torch,
#    triton, numpy, pyyaml, tqdm, pytest), which builds the CUDA extension mos_kernels._C with
#    ninja; falls back to PYTHONPATH (backend "cuda" then JIT-builds on first use);
# 2. runs the kernel and layer tests on CUDA for both kernel backends (Triton and the CUDA
#    extension, which must be there: MOS_REQUIRE_CUDA_EXT=1): fp32, fp16, bf16, token counts up
#    to 4M, bitwise determinism (MOS_TEST_DEVICE=cuda, no interpreter);
# 3. runs the kernel benchmarks (reference, compiled, triton and cuda side by side) and the
#    attention / fused-layer benchmarks, each writing a CSV with card, date and versions;
# 4. prints a short table last: test counts and the measured targets of both.
# Everything it prints is also logged under OUT_DIR. Budget: under 10 minutes (the device
# tool's limit per command): build 180 s at most (install, then a JIT build if the install did
# not build it), tests 170 s, kernel benchmarks 140 s, attention benchmarks 60 s (each phase is
# cut by its timeout; the benchmarks run their target points first). Each timeout is an
# environment variable below; 0 skips the attention benchmarks.
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

build_budget=${MOS_BUILD_TIMEOUT:-180}
build_start=$(date +%s)
if ! MAX_JOBS=${MAX_JOBS:-16} timeout "$build_budget" $PY -m pip install -v --no-build-isolation --no-deps -e . \
    >"$OUT_DIR/install.log" 2>&1; then
  echo "pip install failed (see install.log); using PYTHONPATH" | tee -a "$OUT_DIR/install.log"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
grep "^ *mos:" "$OUT_DIR/install.log"
# Not prebuilt (install failed or skipped it): JIT-build now, in what is left of the build
# budget, rather than inside the timed tests where four workers would queue on its lock.
if ! $PY -m mos_kernels.cuda_ops 2>&1 | grep -q prebuilt; then
  left=$(( build_budget - ($(date +%s) - build_start) ))
  [ "$left" -lt 20 ] && left=20
  MAX_JOBS=${MAX_JOBS:-16} timeout "$left" $PY -m mos_kernels.cuda_ops --build >>"$OUT_DIR/install.log" 2>&1
fi
build_seconds=$(( $(date +%s) - build_start ))
extension=$($PY -m mos_kernels.cuda_ops --build 2>&1 | tail -n 1)
echo "$extension (build ${build_seconds}s)" | tee -a "$OUT_DIR/environment.txt"

# Six workers share the GPU: the small cases are launch- and JIT-bound, not GPU-bound.
test_start=$(date +%s)
# test_cuda_backend.py's nvcc check is CI's (the build above compiled the same files for this card).
MOS_TEST_DEVICE=cuda MOS_REQUIRE_CUDA_EXT=1 timeout ${MOS_TEST_TIMEOUT:-170} $PY -m pytest -q -n 6 \
  -p no:cacheprovider --benchmark-disable tests/test_kernel_backends.py tests/test_kernels_registration.py \
  tests/test_kernels_gpu.py tests/test_ops_reference.py tests/test_layer.py tests/test_attention_triton.py \
  tests/test_layer_compile.py tests/test_cuda_backend.py -k "not compiles_for_sm90" 2>&1 | tee "$OUT_DIR/tests.log"
test_rc=${PIPESTATUS[0]}
test_seconds=$(( $(date +%s) - test_start ))

timeout ${MOS_BENCH_TIMEOUT:-140} $PY -m benchmarks.bench_kernels --out "$OUT_DIR" --rep-ms 25 --warmup-ms 10 \
  2>&1 | tee "$OUT_DIR/bench.log"
bench_rc=${PIPESTATUS[0]}

# bf16 only: the target point, L = 4096, then the sweep of L up to 8192, as far as the budget goes.
attention_rc=0
if [ "${MOS_ATTENTION_BENCH_TIMEOUT:-60}" != 0 ]; then
  timeout ${MOS_ATTENTION_BENCH_TIMEOUT:-60} $PY -m benchmarks.bench_attention --out "$OUT_DIR" --dtype bf16 \
    --rep-ms 25 --warmup-ms 10 --time-budget ${MOS_ATTENTION_BENCH_BUDGET:-30} 2>&1 | tee "$OUT_DIR/bench_attention.log"
  attention_rc=${PIPESTATUS[0]}
else
  echo "attention benchmarks skipped (MOS_ATTENTION_BENCH_TIMEOUT=0)" | tee "$OUT_DIR/bench_attention.log"
fi

echo
echo "== GPU check summary =="
head -n 2 "$OUT_DIR/environment.txt" | tail -n 1
tail -n 1 "$OUT_DIR/environment.txt"
if [ "$test_rc" -eq 124 ]; then
  echo "tests: cut by their ${MOS_TEST_TIMEOUT:-170}s limit before the summary: $(grep -o 'F' "$OUT_DIR/tests.log" | wc -l) F marks so far (tests.log)"
else
  echo "tests: $(grep -E '(passed|failed|error)' "$OUT_DIR/tests.log" | tail -n 1) (exit $test_rc, ${test_seconds}s)"
fi
echo "benchmarks: kernels exit $bench_rc, attention exit $attention_rc (124: cut by its timeout), CSVs in $OUT_DIR"
grep -h "time budget" "$OUT_DIR/bench_attention.log"
sed -n '/^Targets at/,$p' "$OUT_DIR/bench.log"
echo
sed -n '/^Targets at/,$p' "$OUT_DIR/bench_attention.log"
# A benchmark cut by its timeout (124) measured its targets first: only other failures count.
exit $(( test_rc != 0 || (bench_rc != 0 && bench_rc != 124) || (attention_rc != 0 && attention_rc != 124) ))
