#!/usr/bin/env bash
# Device calls for NOTES steps 79-81: rotary, the cache write, the split attention and its combine as one launch a
# layer (decode_kernels.rotary_attention). The GPU tests of the fused step and the engine; the decode step's graph
# replay with it against three launches (FINETUNE_ATTENTION_ONE_LAUNCH=0) in one process, at 1 and 64 rows after
# 24-token prompts, at one row after 2,000 and at one row with an r=64 adapter; decode_bench's workloads with it and
# (AB_WORKLOADS) without; serve_bench with the defaults. From the repo root on the GPU machine, .whl carried.
# Parts (each 1 by default; 0 skips): TESTS, SWEEPS, BENCH, SERVE (the whole is more than one 10-minute call);
# LONG_REPEATS: how many processes run the one-row 2,000-token sweep (default 1).
#   QWEN_FT_COMMIT=<rev> [BENCH=0 SERVE=0] [WORKLOADS="b1_512 ..."] [AB_WORKLOADS=...] \
#     bash benchmarks/one_launch_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/one_launch_out || exit 1
[[ "${TESTS:-1}" == 0 ]] || timeout 240 python3 -m pytest -q -m cuda tests/inference/test_fused_decode_cuda.py \
  tests/inference/test_inference_cuda.py \
  -p no:cacheprovider 2>&1 | tail -4
sweep() {  # OUT_NAME ARGS...: the one-launch attention (base) against three launches
  local name="$1"
  shift
  step_sweep "$name" 200 --candidates base three:attention_one_launch=0 "$@"
}
if [[ "${SWEEPS:-1}" == 1 ]]; then
  sweep one_launch_short --rows 1 64 --prompt 24
  # (several fresh processes: the first of these died once with an illegal memory access, NOTES step 81)
  for i in $(seq "${LONG_REPEATS:-1}"); do sweep "one_launch_long$i" --rows 1 --prompt 2000; done
  sweep one_launch_adapter --rows 1 --prompt 24 --adapter 64
fi
# the defaults with every README workload, then three launches on the one-row pair (AB_WORKLOADS) for the A/B
for v in $([[ "${BENCH:-1}" == 1 ]] && echo 1 0); do
  w="${AB_WORKLOADS-b1_512 b1_ctx2000}"
  [[ $v == 0 ]] || w="${WORKLOADS:-b1_512 b1_ctx2000 b1_512_adapter b64_mixed}"
  [[ -z "$w" ]] || FINETUNE_ATTENTION_ONE_LAUNCH=$v timeout 200 python3 benchmarks/decode_bench.py --part engine \
    --model-dir /tmp/m --workloads $w --out "$OUT/decode_one_launch${v}_$C.json" 2>&1 | grep "^{" | cut -c1-300
done
[[ "${SERVE:-1}" == 0 ]] || timeout 150 python3 benchmarks/serve_bench.py --model-dir /tmp/m \
  --out "$OUT/serve_$C.json" 2>&1 | grep "^{" | cut -c1-400
