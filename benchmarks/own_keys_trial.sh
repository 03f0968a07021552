#!/usr/bin/env bash
# One device call for the one-row workloads with the decode step's attention as shipped (decode_attention,
# key_split's cut), over SDPA in the graphed steps (FINETUNE_DECODE_ATTENTION=0: cuDNN on the H200), and with the
# keys cut into fixed 256/128/64-key splits (benchmarks/own_keys_trial.py), a process each (NOTES step 65's call;
# session 30's version cut a row into 8/16/32 parts). From the repo root on the GPU machine, .whl carried; results
# under $OUT.
#   QWEN_FT_COMMIT=<rev> bash benchmarks/own_keys_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/own_out || exit 1
W=(--part engine --model-dir /tmp/m --workloads b1_512 b1_ctx2000)
timeout 150 python3 benchmarks/decode_bench.py "${W[@]}" --out "$OUT/decode_own_$C.json" 2>&1 | grep "^{" | cut -c1-300
FINETUNE_DECODE_ATTENTION=0 timeout 150 python3 benchmarks/decode_bench.py "${W[@]}" --out "$OUT/decode_sdpa_$C.json" \
  2>&1 | grep "^{" | cut -c1-300
for split in 256 128 64; do
  timeout 150 python3 benchmarks/own_keys_trial.py --split $split -- "${W[@]}" \
    --out "$OUT/decode_own_split${split}_$C.json" 2>&1 | grep "^{\|^decode_attention" | cut -c1-300
done
