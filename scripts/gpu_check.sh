#!/usr/bin/env bash
# The GPU check: one command on a fresh GPU machine with no network. It installs nothing (the
# package runs from this checkout through PYTHONPATH) and ends within a deadline.
#
#   bash scripts/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu_results)
#
# Every step runs under `timeout`: phases under `timeout -s INT -k 10` (SIGINT lets pytest and
# the benchmarks stop cleanly), each budget clipped so that the phases end MOS_GPU_DEADLINE
# seconds (default 480) after the start less 30 s kept for the summary; a phase with under
# MOS_MIN_PHASE (15) seconds left is skipped and says so. Order: the numbers never measured
# first, torch.compile last among the benchmarks (budgets in benchmarks/README.md):
#   env       versions, what this torch has (grouped_mm, varlen attention, FlexAttention), the
#             measured copy bandwidth and bf16 GEMM rate (benchmarks/ceilings.py)
#   build     the CUDA extension's JIT build, in the background from the start, niced
#   attention the attention kernels, the layer, the grouped linear, MoS vs dense at L = 4096 (bf16
#             target point, no torch.compile providers)
#   kernels   pooling+routing, dispatch, gather, scatter at their target point (reference,
#             triton, and cuda once built)
#   tests_gpu the GPU-scale tests, marked `gpu` (-m gpu, in tests/ops and the layer's in
#             tests/test_layer_backends.py): large shapes and bitwise determinism in fp32/fp16/bf16
#             on both kernel backends (MOS_REQUIRE_CUDA_EXT=1 once built; without the extension
#             its tests are deselected, since each worker would try to build it)
#   tests_attention  the attention and grouped-linear kernels' own tests and the layer on every
#             backend at small sizes (the rest of those files, not marked `gpu`)
#   kernels_cuda  the extension against Triton, if it was built only after the kernels phase
#   compiled  the compiled_fused and compiled baselines of the layer, target attention and
#             grouped linear, then of pooling+routing, dispatch, gather and scatter
#   tests     the rest of the GPU test coverage (not marked `gpu`): layer, CUDA backend, compile,
#             the CTR lab training on the GPU (a quick profile), the other ops' tests
# Rows are appended per provider, so a cut phase keeps what it timed. OUT_DIR gets 7 files:
# environment.txt, build.log, run.log (every phase's output), phases.log (one line per phase,
# with pytest's counts), the two CSVs and summary.txt, which an EXIT trap writes even when the
# run is cut or interrupted (benchmarks/summarize.py: the joined rows, targets, phases, last).
# Exit status: 1 if a phase failed (a cut phase, rc 124, is not a failure), else 0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_results}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET MOS_CUDA_EMULATE
# The extension's build folder, outside OUT_DIR: only a few files come back from a GPU run.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/mos_ext}

START=$(date +%s)
DEADLINE=$(( START + ${MOS_GPU_DEADLINE:-480} ))
SUMMARY_RESERVE=30                      # the summary's own timeout, kept out of the phases' time
GRACE=10                                # timeout -k: a phase that ignores SIGINT is killed this much later
PHASES_END=$(( DEADLINE - SUMMARY_RESERVE ))
MIN_PHASE=${MOS_MIN_PHASE:-15}
BENCH_TIMING=(--rep-ms 25 --warmup-ms 10)
FAILED=0
BUILD_PID=""
PHASE_PID=""
: > "$OUT_DIR/phases.log"
: > "$OUT_DIR/run.log"

log() { echo "$*" | tee -a "$OUT_DIR/phases.log"; }

# budget NOMINAL: the seconds a phase may take now (its nominal budget, clipped to the deadline).
budget() {
  local left=$(( PHASES_END - $(date +%s) - GRACE ))
  echo $(( $1 < left ? $1 : left ))
}

# phase NAME NOMINAL CMD...: runs CMD under its clipped budget, output appended to run.log;
# logs rc, seconds and pytest's counts; never ends the script.
phase() {
  local name=$1 nominal=$2; shift 2
  local b; b=$(budget "$nominal")
  if (( b < MIN_PHASE )); then
    log "$name: skipped, ${b}s left before the deadline (needs ${MIN_PHASE}s)"
    return 0
  fi
  local first t0 rc counts
  first=$(( $(wc -l < "$OUT_DIR/run.log") + 1 ))
  echo "=== $name (budget ${b}s of ${nominal}s, $(date -u +%H:%M:%S)) ===" >> "$OUT_DIR/run.log"
  echo "$name: started, budget ${b}s"
  t0=$(date +%s)
  # In the background, so that a signal to this script is handled at once (bash runs a trap only
  # between commands, and `wait` is one); timeout still gives the command a SIGINT it can catch.
  timeout -s INT -k "$GRACE" "$b" "$@" >> "$OUT_DIR/run.log" 2>&1 &
  PHASE_PID=$!
  wait "$PHASE_PID"
  rc=$?
  PHASE_PID=""
  counts=$(tail -n +"$first" "$OUT_DIR/run.log" | grep -E '[0-9]+ (passed|failed|errors?)\b' | tail -n 1 | tr -d '=')
  local how="rc=$rc"
  (( rc == 124 )) && how="cut at its budget (rc=124)"
  (( rc == 137 )) && how="killed ${GRACE}s after its budget (rc=137)"
  log "$name: $how, $(( $(date +%s) - t0 ))s of ${b}s${counts:+;$counts}"
  (( rc != 0 && rc != 124 )) && FAILED=1
  return 0
}

# wait_for PID SECONDS: waits at most that long for PID to end.
wait_for() {
  local until=$(( $(date +%s) + $2 ))
  while [ -n "$1" ] && kill -0 "$1" 2>/dev/null && (( $(date +%s) < until )); do sleep 1; done
}

# stop PID NAME: SIGINT to a timeout still running (it passes the signal on), then at most GRACE s.
stop() {
  if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then
    kill -INT "$1" 2>/dev/null
    wait_for "$1" "$GRACE"
    kill -KILL "$1" 2>/dev/null
    log "$2: stopped at the end of the run"
  fi
}

finish() {
  local rc=$?
  trap - EXIT INT TERM
  stop "$PHASE_PID" "the running phase"
  stop "$BUILD_PID" build
  log "total: $(( $(date +%s) - START ))s of ${MOS_GPU_DEADLINE:-480}s before the summary"
  echo
  timeout -k 5 $(( SUMMARY_RESERVE - 5 )) $PY -m benchmarks.summarize "$OUT_DIR" 2>&1 | tee "$OUT_DIR/summary.txt"
  (( rc == 0 )) && rc=$FAILED
  exit "$rc"
}
trap finish EXIT
trap 'log "interrupted"; exit 130' INT TERM

build_ready() { grep -q "built and loaded\|prebuilt" "$OUT_DIR/build.log" 2>/dev/null; }


phase env 20 $PY -m benchmarks.ceilings
tail -n +2 "$OUT_DIR/run.log" > "$OUT_DIR/environment.txt"

build_budget=$(budget "${MOS_BUILD_TIMEOUT:-240}")
if (( build_budget >= MIN_PHASE )); then
  MAX_JOBS=${MAX_JOBS:-6} nice -n 19 timeout -s INT -k "$GRACE" "$build_budget" \
    $PY -m mos_kernels.cuda_ops --build > "$OUT_DIR/build.log" 2>&1 &
  BUILD_PID=$!
  log "build: started in the background, budget ${build_budget}s"
else
  log "build: skipped, ${build_budget}s left"
fi

phase attention "${MOS_ATTENTION_BUDGET:-140}" $PY -m benchmarks.bench_attention --out "$OUT_DIR" --plan targets \
  --dtype bf16 --providers reference,triton,sdpa,sdpa_padded,flex,varlen_attn "${BENCH_TIMING[@]}"

kernel_providers=reference,triton
build_ready && kernel_providers=reference,triton,cuda
phase kernels "${MOS_KERNELS_BUDGET:-50}" $PY -m benchmarks.bench_kernels --out "$OUT_DIR" --plan targets --dtype bf16 \
  --providers "$kernel_providers" "${BENCH_TIMING[@]}"

# The build had the two benchmark phases to finish; give it at most 30 s more, within the deadline.
wait_for "$BUILD_PID" "$(budget 30)"
if build_ready; then
  log "build: extension ready ($(tail -n 1 "$OUT_DIR/build.log"))"
  require_ext=1 not_cuda=""
else
  log "build: extension not ready (build.log: $(tail -n 1 "$OUT_DIR/build.log" 2>/dev/null)); its tests are deselected"
  require_ext=0 not_cuda=" and not cuda"
fi
pytest_gpu=(env MOS_TEST_DEVICE=cuda MOS_REQUIRE_CUDA_EXT=$require_ext $PY -m pytest -q -n 8 -p no:cacheprovider
            --benchmark-disable -k "not compiles_for_sm90$not_cuda")

# By marker: the GPU-scale tests sit in their op's file. Collecting all of tests/ops takes a worker
# one to two seconds (measured on the CPU), so selecting from it costs little.
phase tests_gpu "${MOS_TESTS_GPU_BUDGET:-60}" "${pytest_gpu[@]}" -m gpu tests/ops tests/test_layer_backends.py
# The attention and grouped-linear kernels' own tests belong in the guaranteed part of the run too,
# before the torch.compile phases; a phase of their own, since pytest ANDs -m with the paths.
attention_tests=(tests/ops/test_grouped_linear.py tests/ops/test_expert_target_attention.py
                 tests/ops/test_jagged_self_attention.py)
phase tests_attention "${MOS_TESTS_ATTENTION_BUDGET:-40}" "${pytest_gpu[@]}" -m "not gpu" \
  tests/test_layer_backends.py "${attention_tests[@]}"

# Built after the kernels phase: the extension's rows now, against Triton's.
if [ "$require_ext" = 1 ] && [ "$kernel_providers" = reference,triton ]; then
  phase kernels_cuda "${MOS_KERNELS_CUDA_BUDGET:-40}" $PY -m benchmarks.bench_kernels --out "$OUT_DIR" --plan targets \
    --dtype bf16 --providers triton,cuda "${BENCH_TIMING[@]}"
fi

phase compiled "${MOS_COMPILED_BUDGET:-90}" $PY -m benchmarks.bench_attention --out "$OUT_DIR" --plan targets \
  --dtype bf16 --ops layer,expert_target_attention,grouped_linear \
  --providers reference,compiled_fused,compiled "${BENCH_TIMING[@]}"
phase compiled_kernels "${MOS_COMPILED_KERNELS_BUDGET:-40}" $PY -m benchmarks.bench_kernels --out "$OUT_DIR" \
  --plan targets --dtype bf16 --providers reference,compiled "${BENCH_TIMING[@]}"

# test_cuda_backend.py's nvcc check is CI's (the build above compiled the same files for this card).
phase tests "${MOS_TESTS_BUDGET:-400}" "${pytest_gpu[@]}" -m "not gpu" "${attention_tests[@]/#/--ignore=}" \
  tests/test_layer.py tests/test_cuda_backend.py tests/test_layer_compile.py tests/test_train_gpu.py tests/ops
