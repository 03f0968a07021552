#!/usr/bin/env bash
# One device call for NOTES step 59: one prompt's prefill through the fused kernels against the model's blocks
# (FINETUNE_FUSED_DECODE=0), then a serving trace after Engine.warm_up(). From the repo root on the GPU machine,
# .whl carried; results under $OUT.
#   QWEN_FT_COMMIT=<rev> bash benchmarks/prefill_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/prefill_out || exit 1
timeout "${T_PROFILE:-150}" python3 benchmarks/prefill_profile.py --model-dir /tmp/m \
  --out "$OUT/prefill_profile_fused_$C.json" 2>&1 | grep '^{'
FINETUNE_FUSED_DECODE=0 timeout "${T_PROFILE:-150}" python3 benchmarks/prefill_profile.py --model-dir /tmp/m \
  --out "$OUT/prefill_profile_blocks_$C.json" 2>&1 | grep '^{'
timeout "${T_STALLS:-200}" python3 benchmarks/engine_stalls.py --model-dir /tmp/m --warm-up \
  --out "$OUT/engine_stalls_warm_$C.json" 2>&1 | tail -3
