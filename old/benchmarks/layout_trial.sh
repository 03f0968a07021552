#!/usr/bin/env bash
# One GPU call for a tensor-core kernel change (NOTES step 38): the kernels' GPU tests, the GEMV probe (1, 8, 32 rows)
# and the GEMM probe (16, 32, 64 rows) over the configs CONFIGS uses, then the decode workloads with this tree and with
# the tree of BASE (a commit unpacked into old/: the same machine, the same model dir).
#   QWEN_FT_COMMIT=<hash> BASE=<hash> bash benchmarks/layout_trial.sh     (OUT: results; .whl and old/ carried)
# Knobs: TESTS_K (pytest -k), GEMV_ROWS, GEMM_ROWS (empty: no GEMM probe), GEMM_PER_SM, WORKLOADS, OLD_WORKLOADS,
# T_TESTS, T_DECODE (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/layout_out}"
mkdir -p "$OUT"
source benchmarks/device_site.sh && carried_wheels .whl /tmp/quick_site
timeout "${T_TESTS:-150}" python3 -m pytest -q -m cuda -x tests/quant/test_quant_cuda.py \
  -k "${TESTS_K:-mma or bias or decoding_rows}" > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -2 "$OUT/tests.log"
timeout 120 python3 benchmarks/mma_gemv_probe.py --rows ${GEMV_ROWS:-1 8 32} --baselines 0 --warps 4 8 --depth 1 \
  --per-sm 2 4 --out "$OUT/gemv_probe.json" > "$OUT/gemv_probe.log" 2>&1
echo "gemv probe rc=$?"; grep -E "^copy|^BEST" "$OUT/gemv_probe.log"
GEMM_ROWS="${GEMM_ROWS-16 32 64}"
if [ -n "$GEMM_ROWS" ]; then
  timeout 120 python3 benchmarks/mma_gemm_probe.py --rows $GEMM_ROWS --baselines 0 --warps 4 --tpw 1 --depth 1 \
    --per-sm ${GEMM_PER_SM:-1 2 4} --out "$OUT/gemm_probe.json" > "$OUT/gemm_probe.log" 2>&1
  echo "gemm probe rc=$?"; grep -E "^BEST" "$OUT/gemm_probe.log"
fi
MODEL=/tmp/decode_bench/14b_int4
python3 benchmarks/make_model_dir.py --shape 14b --int4 --out "$MODEL" > "$OUT/make_model.log" 2>&1
W="${WORKLOADS:-b1_512 b1_512_adapter b1_ctx2000 b64_mixed}"
timeout "${T_DECODE:-170}" python3 benchmarks/decode_bench.py --part engine --model-dir "$MODEL" --workloads $W \
  --out "$OUT/decode.json" > "$OUT/decode.log" 2>&1
echo "decode rc=$?"; python3 benchmarks/decode_summary.py "$OUT/decode.json"
if [ -d old ]; then
  (cd old && PYTHONPATH="$PWD:$PYTHONPATH" QWEN_FT_COMMIT="${BASE:-base}" timeout "${T_DECODE:-170}" python3 \
    benchmarks/decode_bench.py --part engine --model-dir "$MODEL" --workloads ${OLD_WORKLOADS:-$W} \
    --out "$OUT/decode_base.json" > "$OUT/decode_base.log" 2>&1)
  echo "decode base rc=$?"; python3 benchmarks/decode_summary.py "$OUT/decode_base.json"
fi
