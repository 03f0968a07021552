#!/usr/bin/env bash
# One device call for NOTES step 54: where rows2048_ckpt's peak comes from with the compact input embedding.
# The compact GPU tests; rows2048_ckpt with the defaults (compact: the keep budget grows by what the GPU got back);
# the same kept blocks with the whole table (FINETUNE_COMPACT_EMBEDDING=0 and the budget the compact run used), so
# the two peaks differ by the table alone if it was freed; then rows2048_zero2 (issue 15's ZeRO-2 ratio). From the
# repo root on the GPU machine, .whl carried; results under $OUT.
#   QWEN_FT_COMMIT=<rev> bash benchmarks/memory_trial.sh [whole-table keep GiB, default 2.45]
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && carried_wheels .whl /tmp/quick_site
out=${OUT:-/tmp/memory_trial}
keep=${1:-2.45}
mkdir -p "$out"
start=$SECONDS
timeout 150 python3 -m pytest -q -m cuda -x tests/training/test_graphs_cuda.py -k compact > "$out/tests.log" 2>&1
echo "tests rc=$? ($((SECONDS - start)) s)"; tail -2 "$out/tests.log"
user_path_model
up() { python3 benchmarks/user_path.py --work /tmp/user_path --timeout 170 "$@"; }
up --workloads rows2048_ckpt --steps rows2048_ckpt=6 --out "$out/ckpt_compact.json"
grep -h "input embedding\|gradient checkpointing:" /tmp/user_path/rows2048_ckpt.log | tee "$out/ckpt_compact.log"
echo "rows2048 compact ($((SECONDS - start)) s)"
FINETUNE_COMPACT_EMBEDDING=0 up --workloads rows2048_ckpt --steps rows2048_ckpt=6 \
  --extra "--gradient_checkpointing_keep_gib $keep" --out "$out/ckpt_whole_same_blocks.json"
grep -h "input embedding\|gradient checkpointing:" /tmp/user_path/rows2048_ckpt.log | tee "$out/ckpt_whole.log"
echo "rows2048 whole ($((SECONDS - start)) s)"
if (( SECONDS - start < 380 )); then
  up --workloads rows2048_zero2 --steps rows2048_zero2=5 --out "$out/zero2.json"
  grep -h "input embedding\|gradient checkpointing:" /tmp/user_path/rows2048_zero2.log | tee "$out/zero2.log"
fi
echo "end ($((SECONDS - start)) s)"
