#!/usr/bin/env bash
# One device call for NOTES step 59: one prompt's prefill through the fused kernels against the model's blocks
# (FINETUNE_FUSED_DECODE=0), then a serving trace after Engine.warm_up(). From the repo root on the GPU machine,
# .whl carried; results under $OUT.
#   QWEN_FT_COMMIT=<rev> bash benchmarks/prefill_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/prefill_out}"
mkdir -p "$OUT"
source benchmarks/device_site.sh && carried_wheels .whl /tmp/quick_site
int4_model_dir || exit 1
MODEL=/tmp/m
C="${QWEN_FT_COMMIT:-$(git rev-parse --short HEAD)}"
timeout "${T_PROFILE:-150}" python3 benchmarks/prefill_profile.py --model-dir "$MODEL" \
  --out "$OUT/prefill_profile_fused_$C.json" 2>&1 | grep '^{'
FINETUNE_FUSED_DECODE=0 timeout "${T_PROFILE:-150}" python3 benchmarks/prefill_profile.py --model-dir "$MODEL" \
  --out "$OUT/prefill_profile_blocks_$C.json" 2>&1 | grep '^{'
timeout "${T_STALLS:-200}" python3 benchmarks/engine_stalls.py --model-dir "$MODEL" --warm-up \
  --out "$OUT/engine_stalls_warm_$C.json" 2>&1 | tail -3
