#!/usr/bin/env bash
# Device call for NOTES step 88: the adapter's w1 and w2 as one launch with each layer's own bt (mma_gemv's bt pair:
# the block-diagonal zeros no longer read), at 1 row as shipped and at 2-8 rows (row_adapters.PAIRED_LORA_MAX_ROWS),
# then what a served request's first tokens wait for. From the repo root on the GPU machine, .whl carried. Parts (each
# 1 by default; 0 skips):
#   TESTS: the GPU tests of the epilogue (the bt pair against each layer alone), the pair and the given x A;
#   SWEEP: the decode step's replay with an r=64 adapter at $ROWS rows (default 1 2 4 8): shipped, w1 and w2 apart
#   (paired_decode=0), the pair up to 8 rows, alternated in one process;
#   BENCH: decode_bench's b1_512 and b1_512_adapter in one process;
#   SERVE: serve_bench at 1 stream with the engine's log of each request's steps.
#   QWEN_FT_COMMIT=<rev> [TESTS=0 SWEEP=0 BENCH=0 SERVE=0] bash benchmarks/pair_bt_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/pair_bt_out || exit 1
[[ "${TESTS:-1}" == 0 ]] || gpu_tests pair_tests 240 tests/quant/test_quant_cuda.py \
  tests/inference/test_inference_cuda.py -k "side_by_side or low_rank or w1_and_w2 or take_x_a or nine_rows"
[[ "${SWEEP:-1}" == 0 ]] || step_sweep pair_bt 200 --rows ${ROWS:-1 2 4 8} --prompt 24 --adapter 64 \
  --candidates base apart:paired_decode=0 pair8:row_adapters.PAIRED_LORA_MAX_ROWS=8
[[ "${BENCH:-1}" == 0 ]] || timeout 150 python3 benchmarks/decode_bench.py --part engine --model-dir /tmp/m \
  --workloads b1_512 b1_512_adapter --out "$OUT/decode_pair_bt_$C.json" 2>&1 | grep "^{" | cut -c1-300
[[ "${SERVE:-1}" == 0 ]] || timeout 100 python3 benchmarks/serve_bench.py --model-dir /tmp/m --streams 1 \
  --engine-log --out "$OUT/serve_log_$C.json" 2>&1 | grep "^{" | cut -c1-400
