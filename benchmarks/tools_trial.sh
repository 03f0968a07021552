#!/usr/bin/env bash
# Device calls of NOTES step 82: the checks step 81 left open, now with the device's compute-sanitizer and Nsight
# Compute (the image has both since November; sessions before 36 had neither).
# Parts (each 1 by default; 0 skips):
#   TESTS: both GPU test files of the fused step and the engine;
#   MEMCHECK: compute-sanitizer's memcheck over the one-launch attention's GPU tests, then over the one-row
#     2,000-token decode step of the 14B model (step_config_sweep's base, the configuration call 6 died in);
#     API errors are not reported (PyTorch's allocator retries an out-of-memory cudaMalloc), and accesses that stay
#     inside the caching allocator's segments are not seen;
#   LONG: the one-row 2,000-token sweep in LONG_REPEATS fresh processes (default 3);
#   NCU: Nsight Compute's counters for the Int4 kernels of one layer at NCU_ROWS (default "1 64") rows
#     (benchmarks/ncu_kernels.py), as CSV in $OUT/ncu_<commit>.csv.
#   QWEN_FT_COMMIT=<rev> [TESTS=0] [MEMCHECK=0] [LONG=0] [NCU=0] bash benchmarks/tools_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/tools_out || exit 1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
# (a fresh machine's first run has failed one graph test in each session so far, NOTES step 84: the whole log is kept
# in $OUT)
[[ "${TESTS:-1}" == 0 ]] || gpu_tests gpu_tests 240 tests/inference/test_fused_decode_cuda.py \
  tests/inference/test_inference_cuda.py
if [[ "${MEMCHECK:-1}" == 1 ]]; then
  echo "== memcheck: the one-launch attention's GPU tests"
  timeout 200 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 10 python3 -m pytest -q -m cuda \
    tests/inference/test_fused_decode_cuda.py -k "rotary_attention or compiles_once" -p no:cacheprovider 2>&1 \
    | grep -vE "^\s*$" | tail -12
  echo "== memcheck: one row after 2,000 tokens, the 14B decode step"
  timeout 240 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 10 \
    python3 benchmarks/step_config_sweep.py \
    --model-dir /tmp/m --out "$OUT/memcheck_long_$C.json" --rounds 1 --reps 5 --candidates base --rows 1 \
    --prompt 2000 2>&1 \
    | grep -E "^\{|Invalid|ERROR SUMMARY|=========     (at|by)|Address|Error" | head -30 | cut -c1-200
fi
if [[ "${LONG:-1}" == 1 ]]; then
  for i in $(seq "${LONG_REPEATS:-3}"); do
    step_sweep "one_launch_long$i" 200 --candidates base three:attention_one_launch=0 --rows 1 --prompt 2000
  done
fi
[[ "${NCU:-1}" == 0 ]] || ncu_layer ncu 240 --rows ${NCU_ROWS:-1 64}
