#!/usr/bin/env bash
# Device call of NOTES step 83: the small-M GEMM with two groups of warps along K (mma_gemm's KG). The GEMM's GPU
# tests, then the decode step's graph replay at 64 and 32 rows (24-token prompts) with KG=2 configs for c_attn, the
# two 5,120-output Linears and w1/w2's pair (alone and together) against the shipped configs, in one process
# (benchmarks/step_config_sweep.py); BENCH=1 adds decode_bench's b64_mixed with and without the winner (WINNER, a
# candidate spec as the sweep takes it).
#   QWEN_FT_COMMIT=<rev> [TESTS=0] [SWEEP=0] [BENCH=1 WINNER=...] bash benchmarks/kgroups_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/kgroups_out || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
[[ "${TESTS:-1}" == 0 ]] || timeout 200 python3 -m pytest -q -m cuda tests/quant/test_quant_cuda.py -k mma_gemm \
  -p no:cacheprovider 2>&1 | grep -E "passed|failed|Error|assert" | tail -8
K2="4,1,1,2,2"
c8="8,5120,15360=$K2" p8="8,5120,5120=$K2+8,13696,5120=$K2" w8="8,5120,27392=$K2"
c4="4,5120,15360=$K2" p4="4,5120,5120=$K2+4,13696,5120=$K2" w4="4,5120,27392=$K2"
[[ "${SWEEP:-1}" == 0 ]] || timeout 400 python3 benchmarks/step_config_sweep.py --model-dir /tmp/m --rows 64 32 \
  --prompt 24 --rounds 2 --reps 50 --out "$OUT/kgroups_sweep_$C.json" --candidates base "c8:$c8" "p8:$p8" "w8:$w8" \
  "a8:$c8+$p8+$w8" "c4:$c4" "p4:$p4" "w4:$w4" "a4:$c4+$p4+$w4" 2>&1 | grep -E '^\{|Error|error' | cut -c1-150
