#!/usr/bin/env bash
# One device call for NOTES step 62: the decode attention's compiles at key lengths warm_up did not meet (the GPU
# test that one variant serves 256-8,192 keys), the serving trace after warm_up, `qwen-ft serve` under 1, 8 and 32
# streams with the engine's submits, prefills and captures logged, and b64_mixed (the one workload whose steps read
# own keys at several lengths; B64=1). From the repo root on the GPU machine, .whl carried; results under $OUT.
#   QWEN_FT_COMMIT=<rev> bash benchmarks/warm_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/warm_out || exit 1
timeout 150 python3 -m pytest -q -m cuda tests/inference/test_fused_decode_cuda.py tests/inference/test_inference_cuda.py \
  -k "decode_attention or warm" -p no:cacheprovider 2>&1 | tail -3
timeout 120 python3 benchmarks/engine_stalls.py --model-dir /tmp/m --warm-up \
  --out "$OUT/engine_stalls_warm_$C.json" 2>&1 | tail -2 | cut -c1-600
timeout 240 python3 benchmarks/serve_bench.py --model-dir /tmp/m --engine-log --out "$OUT/serve_log_$C.json" 2>&1 \
  | grep "^{" | cut -c1-400
if [[ "${B64:-0}" == 1 ]]; then
  timeout 120 python3 benchmarks/decode_bench.py --part engine --model-dir /tmp/m --workloads b64_mixed \
    --out "$OUT/decode_b64_$C.json" 2>&1 | grep "^{" | cut -c1-400
fi
