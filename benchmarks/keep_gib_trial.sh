#!/usr/bin/env bash
# One device call for NOTES step 48: --gradient_checkpointing_keep_gib at its default (1) and at 1.75 on the
# 2048-token rows with checkpointing, short_default at 1.75 (its peak is what bounds the default), then the
# 2048-token rows without checkpointing at today's code and the graphed 8-layer step profile without checkpointing.
# From the repo root on the GPU machine, .whl carried; results under $OUT (or /tmp/keep_trial).
#   QWEN_FT_COMMIT=<rev> bash benchmarks/keep_gib_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && carried_wheels .whl /tmp/quick_site
out=${OUT:-/tmp/keep_trial}
mkdir -p "$out"
user_path_model
up() { python3 benchmarks/user_path.py --work /tmp/user_path --timeout 200 "$@"; }
up --workloads rows2048_ckpt --steps rows2048_ckpt=6 --out "$out/ckpt_keep1.json"
up --workloads rows2048_ckpt --steps rows2048_ckpt=6 --extra "--gradient_checkpointing_keep_gib 1.75" \
  --out "$out/ckpt_keep175.json"
up --workloads short_default --steps short_default=7 --extra "--gradient_checkpointing_keep_gib 1.75" \
  --out "$out/short_keep175.json"
up --workloads rows2048_no_ckpt --steps rows2048_no_ckpt=6 --out "$out/no_ckpt.json"
python3 benchmarks/profile_step.py --seq 2048 --layers 8 --docs 3 --graphs --json "$out/profile_no_ckpt.json" \
  | tail -40
