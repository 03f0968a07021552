#!/usr/bin/env bash
# One device call for NOTES step 52: w1 and w2 as one decode launch (quant.linear.paired_decode). The GPU tests of
# the change, then issue 16's base workloads with the pairing and with FINETUNE_PAIRED_DECODE=0, one after the
# other on the same machine. From the repo root on the GPU machine, .whl carried; results under $OUT.
#   QWEN_FT_COMMIT=<rev> bash benchmarks/paired_decode_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/paired_out}"
mkdir -p "$OUT"
source benchmarks/device_site.sh && carried_wheels .whl /tmp/quick_site
timeout "${T_TESTS:-200}" python3 -m pytest -q -m cuda -x tests/inference/test_fused_decode_cuda.py \
  -k "w1_and_w2 or fused_step_matches" > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -3 "$OUT/tests.log"
MODEL=/tmp/decode_bench/14b_int4
python3 benchmarks/make_model_dir.py --shape 14b --int4 --out "$MODEL" > "$OUT/make_model.log" 2>&1
W="${WORKLOADS:-b1_512 b1_ctx2000 b64_mixed}"
timeout "${T_DECODE:-170}" python3 benchmarks/decode_bench.py --part engine --model-dir "$MODEL" --workloads $W \
  --out "$OUT/decode_paired.json" > "$OUT/decode_paired.log" 2>&1
echo "decode paired rc=$?"; python3 benchmarks/decode_summary.py "$OUT/decode_paired.json"
FINETUNE_PAIRED_DECODE=0 timeout "${T_DECODE:-170}" python3 benchmarks/decode_bench.py --part engine \
  --model-dir "$MODEL" --workloads $W --out "$OUT/decode_apart.json" > "$OUT/decode_apart.log" 2>&1
echo "decode apart rc=$?"; python3 benchmarks/decode_summary.py "$OUT/decode_apart.json"
