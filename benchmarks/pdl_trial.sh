#!/usr/bin/env bash
# One GPU call: the dependent-launch change (finetune/quant/pdl.py) checked and measured against plain launches.
# GPU tests of the products and the fused decode step, then decode_bench.py with FINETUNE_PDL=1 and =0 in
# separate processes on the same 14B-shaped random Int4 dir. Run from the repo root with .whl carried; set
# QWEN_FT_COMMIT. Logs stay in /tmp/pdl_logs on the machine; the JSON results and a summary go to $OUT.
#   PDL_DECODE="b1_512 b64_mixed" PDL_TESTS=1 bash benchmarks/pdl_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/pdl_out}"
LOGS=/tmp/pdl_logs
mkdir -p "$OUT" "$LOGS"
source benchmarks/device_site.sh && carried_wheels .whl /tmp/quick_site
python3 -c "import triton, triton.language as tl; print('triton', triton.__version__, 'gdc', hasattr(tl.extra.cuda, 'gdc_launch_dependents'))" > "$OUT/summary.txt" 2>&1
MODEL=/tmp/decode_bench/14b_int4
python3 benchmarks/make_model_dir.py --shape 14b --int4 --out "$MODEL" > "$LOGS/make_model.log" 2>&1
if [ "${PDL_TESTS:-1}" = 1 ]; then
  timeout "${PDL_T_TESTS:-200}" python3 -m pytest -q -m cuda -x tests/quant/test_quant_cuda.py \
    -k "dependent or mma_gemv_split or mma_gemm_in_cuda or mma_gemm_equals or lora_epilogue" \
    tests/inference/test_fused_decode_cuda.py > "$LOGS/tests.log" 2>&1
  echo "tests rc=$? $(tail -1 "$LOGS/tests.log")" >> "$OUT/summary.txt"
  grep -E "^(FAILED|ERROR)|Error" "$LOGS/tests.log" | head -20 >> "$OUT/summary.txt"
fi
read -r -a w <<< "${PDL_DECODE:-b1_512 b64_mixed}"
for pdl in 1 0; do
  t0=$(date +%s)
  FINETUNE_PDL=$pdl timeout "${PDL_T_DECODE:-170}" python3 benchmarks/decode_bench.py --part engine \
    --model-dir "$MODEL" --workloads "${w[@]}" --out "$OUT/decode_pdl$pdl.json" > "$LOGS/decode_pdl$pdl.log" 2>&1
  echo "decode pdl=$pdl rc=$? $(( $(date +%s) - t0 )) s" >> "$OUT/summary.txt"
  tail -5 "$LOGS/decode_pdl$pdl.log" >> "$OUT/summary.txt"
done
cat "$OUT/summary.txt"
