#!/usr/bin/env bash
# Device call for NOTES step 92: one short prompt joining an empty batch prefilled from a CUDA graph of its padded
# length (engine.PREFILL_GRAPH_LENGTHS). From the repo root on the GPU machine, .whl carried. Parts (each 1 by
# default; 0 skips):
#   TESTS: the engine's and the fused step's GPU test files whole (the new graph tests among them);
#   AB: decode_bench's b1_512 and b1_512_adapter (their first step is the graphed prefill) here and in $OLD (a tree of
#       the commit before, made beside the repo with `git archive <rev> finetune benchmarks | tar -x -C ab_old`), in
#       alternating processes, twice;
#   PROFILE: prefill_profile.py at 24, 128 and 500 tokens, with and without an r=64 adapter;
#   JOIN: prefill_profile.py --warm-up --beside 4 at 24 and 200 tokens, with and without an r=64 adapter, here and in
#       $OLD (this script's prefill_profile.py copied there, run on that tree's package): a prompt joining four
#       decoding rows, as a busy server's request (NOTES step 93).
#   QWEN_FT_COMMIT=<rev> [OLD=ab_old] [TESTS=0 AB=0 PROFILE=0 JOIN=0] bash benchmarks/prefill_graph_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name --format=csv,noheader
source benchmarks/device_site.sh && inference_trial /tmp/prefill_graph_out || exit 1
[[ "${TESTS:-1}" == 0 ]] || gpu_tests graph_tests 240 tests/inference/test_inference_cuda.py \
  tests/inference/test_fused_decode_cuda.py
if [[ "${AB:-1}" == 1 ]]; then
  for r in 1 2; do
    for v in old new; do
      d=.; [[ $v == old ]] && d="${OLD:-ab_old}"
      [[ -d $d/benchmarks ]] || { echo "no tree at $d: AB skipped for $v"; continue; }
      timeout 100 python3 "$d/benchmarks/decode_bench.py" --part engine --model-dir /tmp/m \
        --workloads b1_512 b1_512_adapter --out "$OUT/decode_ab_${v}${r}_$C.json" 2>&1 | grep "^{" | cut -c1-300 \
        | sed "s/^/$v$r /"
    done
  done
fi
if [[ "${PROFILE:-1}" == 1 ]]; then
  timeout 100 python3 benchmarks/prefill_profile.py --model-dir /tmp/m --lengths 24 128 500 \
    --out "$OUT/prefill_profile_base_$C.json" 2>&1 | grep "^{" | cut -c1-250
  timeout 100 python3 benchmarks/prefill_profile.py --model-dir /tmp/m --lengths 24 500 --adapter 64 \
    --out "$OUT/prefill_profile_adapter_$C.json" 2>&1 | grep "^{" | cut -c1-250
fi
if [[ "${JOIN:-1}" == 1 ]]; then
  for v in old new; do
    d=.; [[ $v == old ]] && d="${OLD:-ab_old}"
    [[ -d $d/benchmarks ]] || { echo "no tree at $d: JOIN skipped for $v"; continue; }
    [[ $v == old ]] && cp benchmarks/prefill_profile.py "$d/benchmarks/"
    for r in 0 64; do
      timeout 150 python3 "$d/benchmarks/prefill_profile.py" --model-dir /tmp/m --lengths 24 200 --warm-up --beside 4 \
        --adapter $r --out "$OUT/join_${v}_r${r}_$C.json" 2>&1 | grep "^{" | cut -c1-250 | sed "s/^/$v r$r /"
    done
  done
fi
