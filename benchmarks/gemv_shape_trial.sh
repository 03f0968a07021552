#!/usr/bin/env bash
# One device call's A/B for NOTES step 73: the one-row decode workloads with mma_gemv's SHAPE_CONFIGS (the shapes'
# own launch configs) and with them emptied (every shape its row blocks' CONFIGS entry), alternated twice, same
# machine; the GPU tests of the tensor-core GEMV first. From the repo root, .whl carried.
#   QWEN_FT_COMMIT=<rev> [WORKLOADS="b1_512 b1_ctx2000"] bash benchmarks/gemv_shape_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/gemv_shape_out || exit 1
timeout 120 python3 -m pytest -q -m cuda tests/quant/test_quant_cuda.py -k "mma_gemv" -p no:cacheprovider 2>&1 | tail -3
for round in 1 2; do
  for mode in shape general; do
    timeout 150 python3 - "$mode" "$OUT/decode_${mode}${round}_$C.json" ${WORKLOADS:-b1_512 b1_ctx2000} <<'PY' 2>&1 \
      | grep "^{" | cut -c1-250
import runpy
import sys

mode, out, workloads = sys.argv[1], sys.argv[2], sys.argv[3:]
if mode == "general":
    import finetune.quant.mma_gemv as gemv

    gemv.SHAPE_CONFIGS.clear()
sys.path.insert(0, "benchmarks")
sys.argv = ["benchmarks/decode_bench.py", "--part", "engine", "--model-dir", "/tmp/m", "--workloads", *workloads,
            "--out", out]
print('{"mode": "%s"}' % mode, flush=True)
runpy.run_path("benchmarks/decode_bench.py", run_name="__main__")
PY
  done
done
