#!/usr/bin/env bash
# The bulk-copy GEMV build (finetune/quant/mma_gemv.py, BULK; NOTES step 35) on one GPU call: its GPU tests, then the
# probe timing it against the register-load build on the 14B shapes at 1 and 8 rows (stage counts x warps x CTAs an
# SM), then (BULK_DECODE=1) the one-row decode workloads with the switch on and off, each its own process.
#   QWEN_FT_COMMIT=<hash> bash benchmarks/bulk_gemv_trial.sh        (OUT: where results go; .whl carried)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bulk_out}"
mkdir -p "$OUT"
source benchmarks/device_site.sh && carried_wheels .whl /tmp/quick_site
if [ "${BULK_TESTS:-1}" = 1 ]; then
  timeout 240 python3 -m pytest -q -m cuda -x tests/quant/test_quant_cuda.py \
    -k "mma_gemv or bias or decoding_rows" > "$OUT/bulk_tests.log" 2>&1
  echo "tests rc=$?"; tail -3 "$OUT/bulk_tests.log"
fi
if [ "${BULK_PROBE:-1}" = 1 ]; then
  timeout "${BULK_T_PROBE:-240}" python3 benchmarks/mma_gemv_probe.py --rows ${BULK_ROWS:-1 8} --baselines 0 \
    --warps ${BULK_WARPS:-4 8} --depth 1 --per-sm ${BULK_PER_SM:-2 4 8} --stages ${BULK_STAGES:-2 4 6} \
    --out "$OUT/bulk_gemv_probe.json" > "$OUT/bulk_probe.log" 2>&1
  echo "probe rc=$?"; grep -E "^copy|^LAYER|^BEST" "$OUT/bulk_probe.log"
fi
if [ "${BULK_DECODE:-0}" = 1 ]; then
  MODEL=/tmp/decode_bench/14b_int4
  python3 benchmarks/make_model_dir.py --shape 14b --int4 --out "$MODEL" > "$OUT/make_model.log" 2>&1
  for on in 1 0; do
    FINETUNE_GPTQ_BULK=$on timeout "${BULK_T_DECODE:-150}" python3 benchmarks/decode_bench.py --part engine \
      --model-dir "$MODEL" --workloads ${BULK_WORKLOADS:-b1_512 b1_512_adapter b1_ctx2000} \
      --out "$OUT/decode_bulk$on.json" > "$OUT/decode_bulk$on.log" 2>&1
    echo "decode bulk=$on rc=$?"; grep -iE "tok/s|decode" "$OUT/decode_bulk$on.log" | tail -6
  done
fi
