#!/usr/bin/env bash
# One device call for NOTES step 71: the decode attention alone at the workloads' shapes (this tree's kernel at the
# exact and the covering grid, fixed splits, and older copies of decode_kernels.py named in VARIANTS, e.g.
# "step67=/tmp/dk.py" from `git show REV:finetune/inference/decode_kernels.py`), the GPU tests of the fused step,
# warm-up and the graphed pick, b1_ctx2000 and b64_mixed over own keys against FINETUNE_DECODE_ATTENTION=0 (SDPA),
# and `qwen-ft serve` under 1, 8 and 32 streams with the engine's log. From the repo root, .whl carried.
#   QWEN_FT_COMMIT=<rev> VARIANTS="a=FILE b=FILE" [WORKLOADS="b1_512 b1_ctx2000 b64_mixed"] bash benchmarks/attention_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/attention_out || exit 1
V=()
for v in ${VARIANTS:-}; do V+=(--variant "$v"); done
timeout 120 python3 benchmarks/decode_attention_probe.py --splits 64 128 256 "${V[@]}" --out "$OUT/attn_probe_$C.json" \
  2>&1 | grep "^{" | cut -c1-1200
timeout 120 python3 -m pytest -q -m cuda tests/inference/test_fused_decode_cuda.py tests/inference/test_inference_cuda.py \
  -k "decode_attention or warm or fused or graph or pick" -p no:cacheprovider 2>&1 | tail -3
W=(--part engine --model-dir /tmp/m --workloads ${WORKLOADS:-b1_ctx2000 b64_mixed})
timeout 120 python3 benchmarks/decode_bench.py "${W[@]}" --out "$OUT/decode_own_$C.json" 2>&1 | grep "^{" | cut -c1-250
FINETUNE_DECODE_ATTENTION=0 timeout 120 python3 benchmarks/decode_bench.py "${W[@]}" --out "$OUT/decode_sdpa_$C.json" \
  2>&1 | grep "^{" | cut -c1-250
timeout 150 python3 benchmarks/serve_bench.py --model-dir /tmp/m --engine-log --out "$OUT/serve_$C.json" 2>&1 \
  | grep "^{" | cut -c1-400
