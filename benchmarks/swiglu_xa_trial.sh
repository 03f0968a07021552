#!/usr/bin/env bash
# Device call for NOTES step 87: mlp.c_proj's LoRA x A from the SwiGLU kernel (decode_kernels.swiglu_low_rank)
# against its GEMV's own producers (FINETUNE_LORA_XA_IN_SWIGLU=0), then what the first tokens of a served request
# wait for (serve_bench --engine-log, the question session 39 left). From the repo root on the GPU machine, .whl
# carried. Parts (each 1 by default; 0 skips):
#   SWEEP: the decode step's replay with an r=64 adapter at $ROWS rows (default 1 8), both ways alternated in one
#   process;
#   TESTS: the GPU tests of the x A given to the GEMVs (one row, and 9+ rows through the GEMM);
#   BENCH: decode_bench's $WORKLOADS (default b1_512 b1_512_adapter) with it, and b1_512_adapter without it (one
#   process each);
#   SERVE: serve_bench at 1 and 32 streams with the engine's log of each request's steps;
#   PROFILE: decode_profile at one row with an r=64 adapter and without ($PROFILE_RANKS, default 64 0: the eager
#   step's kernels by family and the top kernels, where the adapter's extra time a step goes).
#   QWEN_FT_COMMIT=<rev> [SWEEP=0 BENCH=0 SERVE=0] bash benchmarks/swiglu_xa_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/swiglu_xa_out || exit 1
[[ "${SWEEP:-1}" == 0 ]] || step_sweep swiglu_xa 200 --rows ${ROWS:-1 8} --prompt 24 --adapter 64 \
  --candidates base noswiglu:lora_xa_in_swiglu=0
[[ "${TESTS:-1}" == 0 ]] || gpu_tests xa_tests 150 tests/inference/test_inference_cuda.py -k "take_x_a or nine_rows"
if [[ "${BENCH:-1}" == 1 ]]; then
  for v in 1 0; do
    w="b1_512_adapter"
    [[ $v == 0 ]] || w="${WORKLOADS:-b1_512 b1_512_adapter}"
    FINETUNE_LORA_XA_IN_SWIGLU=$v timeout 150 python3 benchmarks/decode_bench.py --part engine --model-dir /tmp/m \
      --workloads $w --out "$OUT/decode_swiglu${v}_$C.json" 2>&1 | grep "^{" | cut -c1-300
  done
fi
[[ "${SERVE:-1}" == 0 ]] || timeout 150 python3 benchmarks/serve_bench.py --model-dir /tmp/m --streams 1,32 \
  --engine-log --out "$OUT/serve_log_$C.json" 2>&1 | grep "^{" | cut -c1-400
if [[ "${PROFILE:-1}" == 1 ]]; then
  for r in ${PROFILE_RANKS:-64 0}; do
    timeout 100 python3 benchmarks/decode_profile.py --model-dir /tmp/m --rows 1 --adapter $r \
      --out "$OUT/profile_adapter${r}_$C.json" 2>&1 | tail -2 | cut -c1-300
  done
fi
