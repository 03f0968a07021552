#!/usr/bin/env bash
# One device call for NOTES steps 66-70: the GPU tests of the fused decode step and the engine's warm-up, the one-row
# workloads with every step over its own keys against FINETUNE_DECODE_ATTENTION=0 (SDPA, cuDNN in graphs), `qwen-ft
# serve` under 1, 8 and 32 streams with the engine's log (and its warm_up's seconds), the serving trace after warm_up,
# and with B64=1 b64_mixed. From the repo root on the GPU machine, .whl carried; results under $OUT.
#   QWEN_FT_COMMIT=<rev> [B64=1] bash benchmarks/final_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/final_out || exit 1
timeout 120 python3 -m pytest -q -m cuda tests/inference/test_fused_decode_cuda.py tests/inference/test_inference_cuda.py \
  -k "decode_attention or warm or fused or cudnn or launches or graph" -p no:cacheprovider 2>&1 | tail -3
timeout 100 python3 benchmarks/engine_stalls.py --model-dir /tmp/m --warm-up --out "$OUT/engine_stalls_warm_$C.json" \
  2>&1 | tail -3 | cut -c1-500
timeout 150 python3 benchmarks/serve_bench.py --model-dir /tmp/m --engine-log --out "$OUT/serve_$C.json" 2>&1 \
  | grep "^{" | cut -c1-400
W=(--part engine --model-dir /tmp/m --workloads b1_512 b1_ctx2000)
timeout 100 python3 benchmarks/decode_bench.py "${W[@]}" --out "$OUT/decode_own_$C.json" 2>&1 | grep "^{" | cut -c1-300
FINETUNE_DECODE_ATTENTION=0 timeout 100 python3 benchmarks/decode_bench.py "${W[@]}" --out "$OUT/decode_sdpa_$C.json" \
  2>&1 | grep "^{" | cut -c1-300
if [[ "${B64:-0}" == 1 ]]; then
  timeout 120 python3 benchmarks/decode_bench.py --part engine --model-dir /tmp/m --workloads b64_mixed \
    --out "$OUT/decode_b64_$C.json" 2>&1 | grep "^{" | cut -c1-300
fi
