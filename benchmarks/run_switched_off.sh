#!/usr/bin/env bash
# One GPU call for the code that is off by default because it has not run on a GPU yet (settings.py:
# FINETUNE_GPTQ_LORA_EPILOGUE, FINETUNE_DECODE_ATTENTION): first its GPU tests, then the decode workloads with
# the switches off and on, on the same machine (benchmarks/NOTES.md steps 17 and 18 hold the predictions).
# Run from the repo root with .whl carried (benchmarks/quick_wheels.sh) and QWEN_FT_COMMIT set; results under
# $OUT/tests.log, $OUT/off/decode.json, $OUT/on/decode.json. A switch whose tests fail is left out of the
# "on" run (and says so in $OUT/on/switches.txt).
#
#   OUT=$OUT bash benchmarks/run_switched_off.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/switched_out}"
mkdir -p "$OUT/off" "$OUT/on"
SITE=/tmp/quick_site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  >/dev/null 2>&1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

on=()
run_tests() {  # $1: the switch, then pytest arguments
  local switch="$1"; shift
  if timeout "${SWITCH_T_TESTS:-240}" python3 -m pytest -q -m cuda "$@" >> "$OUT/tests.log" 2>&1; then
    on+=("$switch=1")
  else
    echo "$switch: GPU tests failed, left off (tests.log)" >> "$OUT/on/switches.txt"
  fi
}
run_tests FINETUNE_GPTQ_LORA_EPILOGUE tests/quant/test_quant_cuda.py tests/inference/test_inference_cuda.py \
  -k "low_rank or epilogue"
run_tests FINETUNE_DECODE_ATTENTION tests/inference/test_fused_decode_cuda.py -k "decode_attention"
echo "on: ${on[*]:-none}" >> "$OUT/on/switches.txt"

MODEL=/tmp/decode_bench/14b_int4
python3 benchmarks/make_model_dir.py --shape 14b --int4 --out "$MODEL" > "$OUT/make_model.log" 2>&1
read -r -a w <<< "${SWITCH_DECODE:-b1_512 b1_512_adapter b1_ctx2000 b64_mixed}"
timeout "${SWITCH_T_DECODE:-200}" python3 benchmarks/decode_bench.py --part engine --model-dir "$MODEL" \
  --workloads "${w[@]}" --out "$OUT/off/decode.json" > "$OUT/off/decode.log" 2>&1
if [ "${#on[@]}" -gt 0 ]; then
  env "${on[@]}" timeout "${SWITCH_T_DECODE:-200}" python3 benchmarks/decode_bench.py --part engine \
    --model-dir "$MODEL" --workloads "${w[@]}" --out "$OUT/on/decode.json" > "$OUT/on/decode.log" 2>&1
fi
tail -n 3 "$OUT/off/decode.log" "$OUT/on/decode.log" 2>/dev/null
cat "$OUT/on/switches.txt"
