#!/usr/bin/env bash
# One device call for NOTES step 60: what a prompt length not seen before costs (SDPA backends, the matmul, the
# engine's prefill with and without cuDNN attention), the GPU test that no inference forward runs cuDNN attention,
# the decode workloads and the serving trace with SDPA's own choice and without cuDNN. From the repo root on the
# GPU machine, .whl carried; results under $OUT.
#   QWEN_FT_COMMIT=<rev> bash benchmarks/sdpa_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/sdpa_out || exit 1
timeout 60 python3 -m pytest -q -m cuda tests/inference/test_inference_cuda.py -k cudnn -p no:cacheprovider 2>&1 | tail -3
timeout 200 python3 benchmarks/new_length_probe.py --model-dir /tmp/m --out "$OUT/new_length_probe_$C.json" 2>&1 \
  | grep -v Warn | tail -16
for flash in 1 0; do
  FINETUNE_SDPA_FLASH=$flash timeout 150 python3 benchmarks/decode_bench.py --part engine --model-dir /tmp/m \
    --workloads b1_512 b64_mixed --out "$OUT/decode_sdpa_flash${flash}_$C.json" 2>&1 | grep "^{" | cut -c1-400
done
for flash in 1 0; do
  FINETUNE_SDPA_FLASH=$flash timeout 120 python3 benchmarks/engine_stalls.py --model-dir /tmp/m --warm-up \
    --out "$OUT/engine_stalls_flash${flash}_$C.json" 2>&1 | tail -2
done
