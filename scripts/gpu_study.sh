#!/usr/bin/env bash
# The profile studies a CPU cannot afford, on one GPU: the long setting (configs/profile_long.yaml,
# every option fixed by its profile.per_model, no grid) with each encoder named, backbone and MoS,
# its 5 seeds paired, N runs at a time sharing the card (docs/profile.md says what each is for).
#
#   bash scripts/gpu_study.sh [OUT_DIR [ENCODER ...]]     default: gpu_study, transformer mamba4rec
#
# Env: MOS_STUDY_JOBS (4) runs at once; MOS_STUDY_DEADLINE (540) seconds for all the studies
# together: each runs under `timeout -s INT`, clipped to what is left, and one with under
# MOS_MIN_STUDY (60) seconds left is skipped and says so. A cut study keeps its finished runs
# (OUT_DIR/long_<encoder>/runs/) and each unfinished run's last epoch (.../checkpoints/): run the
# script again on a copy of OUT_DIR and the finished are read back by fingerprint, the others go
# on from their epoch; a complete one writes its report there too (profile.md, paired.csv, ...).
# MOS_CODE_VERSION names the commit in every run record where the tree came without its .git.
# Installs nothing; prints one line per study last. Exit status 1 if a study failed (one cut at
# the deadline is not a failure), else 0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_study}}
ENCODERS=("${@:2}")
(( ${#ENCODERS[@]} )) || ENCODERS=(transformer mamba4rec)
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET MOS_CUDA_EMULATE
END=$(( $(date +%s) + ${MOS_STUDY_DEADLINE:-540} ))
MIN_STUDY=${MOS_MIN_STUDY:-60}
GRACE=${MOS_STUDY_GRACE:-15}            # timeout -k: a study still running this long after its SIGINT is killed
status=0
lines=()

for encoder in "${ENCODERS[@]}"; do
  study="long_$encoder"
  left=$(( END - $(date +%s) - GRACE ))
  if (( left < MIN_STUDY )); then
    lines+=("$study: skipped, ${left}s left (needs ${MIN_STUDY}s)")
    continue
  fi
  t0=$(date +%s)
  timeout -s INT -k "$GRACE" "$left" "$PY" -m mos profile --config configs/profile_long.yaml --no-tuning \
    --jobs "${MOS_STUDY_JOBS:-4}" --quiet --set "models=[backbone,mos]" "profile.headline=[mos]" \
    "model.mos.encoder=$encoder" train.device=cuda train.progress=none "train.out_dir=$OUT_DIR/$study" \
    > "$OUT_DIR/$study.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - t0 ))
  finished=$(find "$OUT_DIR/$study/runs" -name '*.json' 2>/dev/null | wc -l)
  how="rc=$rc"
  cut=0
  # 124: stopped by the SIGINT; 137 once its budget is spent: killed GRACE s later (the profile's
  # workers finish the run they hold first). A 137 before the budget is a kill of another kind.
  if (( rc == 124 )) || { (( rc == 137 )) && (( took >= left )); }; then
    cut=1
    how="cut at ${left}s (rc=$rc)"
  fi
  lines+=("$study: $how, ${took}s, $finished of 10 runs finished$([ -f "$OUT_DIR/$study/profile.md" ] && echo ", report written")")
  (( rc != 0 && cut == 0 )) && status=1
done

printf '%s\n' "${lines[@]}" | tee "$OUT_DIR/studies.txt"
exit "$status"
