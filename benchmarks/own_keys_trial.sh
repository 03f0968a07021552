#!/usr/bin/env bash
# One device call for NOTES step 65: the one-row workloads with the decode step's attention as shipped (SDPA's own
# choice in the graphed steps: cuDNN on the H200) against decode_attention over the row's own keys at 256-, 128- and
# 64-key splits (benchmarks/own_keys_trial.py, a process each). From the repo root on the GPU machine, .whl carried.
#   QWEN_FT_COMMIT=<rev> bash benchmarks/own_keys_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/own_out || exit 1
W=(--part engine --model-dir /tmp/m --workloads b1_512 b1_ctx2000)
timeout 150 python3 benchmarks/decode_bench.py "${W[@]}" --out "$OUT/decode_sdpa_$C.json" 2>&1 | grep "^{" | cut -c1-300
for split in 256 128 64; do
  timeout 150 python3 benchmarks/own_keys_trial.py --min-rows 1 --min-skipped 0 --split $split -- "${W[@]}" \
    --out "$OUT/decode_own_split${split}_$C.json" 2>&1 | grep "^{\|^own" | cut -c1-300
done
