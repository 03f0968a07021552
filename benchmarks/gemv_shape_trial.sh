#!/usr/bin/env bash
# One device call's A/B for NOTES steps 73-75: the one-row decode workloads with mma_gemv's SHAPE_CONFIGS (the
# shapes' own launch configs, mode "shape") against them emptied (mode "general": every shape its row blocks' CONFIGS
# entry), with one more entry (mode "extra", EXTRA="mb,K,N=warps,depth,per_sm"), or with named entries (mode
# "NAME:mb,K,N=w,d,s+mb,K,N=w,d,s", results named by NAME; in round 1 the added entries pass the own-config
# exactness test first), alternated twice, same machine. First the GPU tests of the tensor-core GEMV (TESTS=0: not)
# and, once with SHAPE_CONFIGS as they are, the workloads in ONCE (none by default). From the repo root, .whl carried.
#   QWEN_FT_COMMIT=<rev> [MODES="shape general"] [EXTRA=...] [WORKLOADS="b1_512 b1_ctx2000"] [ONCE="b1_512_adapter"] \
#     bash benchmarks/gemv_shape_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/gemv_shape_out || exit 1
[[ "${TESTS:-1}" == 0 ]] || timeout 120 python3 -m pytest -q -m cuda tests/quant/test_quant_cuda.py -k "mma_gemv" \
  -p no:cacheprovider 2>&1 | tail -3
# decode_bench in a fresh process with SHAPE_CONFIGS set by MODE; its JSON lines shown.
trial() {  # MODE OUT_FILE WORKLOAD...
  local mode="$1" out="$2"
  shift 2
  CHECK="${CHECK:-0}" EXTRA="${EXTRA:-}" timeout 150 python3 - "$mode" "$out" "$@" <<'PY' 2>&1 | grep "^{" | cut -c1-250
import os
import runpy
import sys

import finetune.quant.mma_gemv as gemv

mode, out, workloads = sys.argv[1], sys.argv[2], sys.argv[3:]
entries = {"shape": "", "general": "", "extra": os.environ["EXTRA"]}.get(mode, mode.partition(":")[2])
if mode == "general":
    gemv.SHAPE_CONFIGS.clear()
for entry in filter(None, entries.split("+")):
    shape, config = entry.split("=")
    gemv.SHAPE_CONFIGS[tuple(map(int, shape.split(",")))] = tuple(map(int, config.split(",")))
print('{"mode": "%s", "shape_configs": "%s"}' % (mode, gemv.SHAPE_CONFIGS), flush=True)
if entries and os.environ.get("CHECK") == "1":  # the added entries through the own-config exactness test first
    import pytest

    code = pytest.main(["-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/quant/test_quant_cuda.py", "-k",
                        "at_each_shapes_own_config"])
    print('{"own_config_test": "%s"}' % ("passed" if code == 0 else f"FAILED ({code})"), flush=True)
    if code:
        sys.exit(1)
sys.path.insert(0, "benchmarks")
sys.argv = ["benchmarks/decode_bench.py", "--part", "engine", "--model-dir", "/tmp/m", "--workloads", *workloads,
            "--out", out]
runpy.run_path("benchmarks/decode_bench.py", run_name="__main__")
PY
}
[[ -z "${ONCE:-}" ]] || trial shape "$OUT/decode_once_$C.json" $ONCE
for round in 1 2; do
  for mode in ${MODES:-shape general}; do
    CHECK=$((round == 1)) trial "$mode" "$OUT/decode_${mode%%:*}${round}_$C.json" ${WORKLOADS:-b1_512 b1_ctx2000}
  done
done
