#!/usr/bin/env bash
# One device call for NOTES step 49: --gradient_checkpointing_keep_gib 1.5 on rows2048_ckpt and short_default
# (step 48 found short_default over its 20 GiB at 1.75), the graphed step harness at all 40 layers beside the
# trainer (the trainer-against-harness gap), and the GPU's clocks and power sampled throughout by nvidia-smi
# (whether sustained runs are power-limited). From the repo root on the GPU machine, .whl carried; results under
# $OUT (or /tmp/clock_trial).
#   QWEN_FT_COMMIT=<rev> bash benchmarks/clock_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && carried_wheels .whl /tmp/quick_site
out=${OUT:-/tmp/clock_trial}
mkdir -p "$out"
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active \
  --format=csv,nounits -lms 500 > "$out/smi.csv" 2>/dev/null &
smi=$!
start=$SECONDS
mark() { echo "$(date -u +%Y/%m/%d\ %H:%M:%S.000) $1" >> "$out/marks.txt"; }
user_path_model
up() { python3 benchmarks/user_path.py --work /tmp/user_path --timeout 200 "$@"; }
mark "rows2048_ckpt keep 1.5"
up --workloads rows2048_ckpt --steps rows2048_ckpt=6 --extra "--gradient_checkpointing_keep_gib 1.5" \
  --out "$out/ckpt_keep15.json"
mark "short_default keep 1.5"
up --workloads short_default --steps short_default=7 --extra "--gradient_checkpointing_keep_gib 1.5" \
  --out "$out/short_keep15.json"
mark "profile 40 layers"
python3 benchmarks/profile_step.py --seq 2048 --layers 40 --ckpt --keep-mlp 6 --docs 3 --graphs \
  --json "$out/profile40_keep6.json" | tail -14
mark "rows2048_ckpt keep 1"
if (( SECONDS - start < 380 )); then
  up --workloads rows2048_ckpt --steps rows2048_ckpt=6 --out "$out/ckpt_keep1.json"
fi
mark "end"
kill $smi 2>/dev/null
