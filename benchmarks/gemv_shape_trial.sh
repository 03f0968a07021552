#!/usr/bin/env bash
# One device call's A/B for NOTES steps 73-74: the one-row decode workloads with mma_gemv's SHAPE_CONFIGS (the
# shapes' own launch configs, mode "shape") against them emptied (mode "general": every shape its row blocks' CONFIGS
# entry) or with one more entry (mode "extra", EXTRA="mb,K,N=warps,depth,per_sm"), alternated twice, same machine;
# the GPU tests of the tensor-core GEMV first (TESTS=0: not). From the repo root, .whl carried.
#   QWEN_FT_COMMIT=<rev> [MODES="shape general"] [EXTRA=...] [WORKLOADS="b1_512 b1_ctx2000"] bash benchmarks/gemv_shape_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/gemv_shape_out || exit 1
[[ "${TESTS:-1}" == 0 ]] || timeout 120 python3 -m pytest -q -m cuda tests/quant/test_quant_cuda.py -k "mma_gemv" \
  -p no:cacheprovider 2>&1 | tail -3
for round in 1 2; do
  for mode in ${MODES:-shape general}; do
    EXTRA="${EXTRA:-}" timeout 150 python3 - "$mode" "$OUT/decode_${mode}${round}_$C.json" ${WORKLOADS:-b1_512 b1_ctx2000} <<'PY' 2>&1 \
      | grep "^{" | cut -c1-250
import os
import runpy
import sys

import finetune.quant.mma_gemv as gemv

mode, out, workloads = sys.argv[1], sys.argv[2], sys.argv[3:]
if mode == "general":
    gemv.SHAPE_CONFIGS.clear()
elif mode == "extra":
    shape, config = os.environ["EXTRA"].split("=")
    gemv.SHAPE_CONFIGS[tuple(map(int, shape.split(",")))] = tuple(map(int, config.split(",")))
print('{"mode": "%s", "shape_configs": "%s"}' % (mode, gemv.SHAPE_CONFIGS), flush=True)
sys.path.insert(0, "benchmarks")
sys.argv = ["benchmarks/decode_bench.py", "--part", "engine", "--model-dir", "/tmp/m", "--workloads", *workloads,
            "--out", out]
runpy.run_path("benchmarks/decode_bench.py", run_name="__main__")
PY
  done
done
