#!/usr/bin/env bash
# One device call for NOTES steps 75-77: the Int4 kernels' launch configs judged inside the decode step
# (benchmarks/step_config_sweep.py), at 1 and 8 rows (the GEMV's one-row-block entries), at LORA_ROWS with an r=64
# adapter on every row (the LoRA epilogue's launches), and at GEMM_ROWS (the GEMM's); with ATTN=1 the decode attention
# alone against copies written another way (benchmarks/attention_variants.py, step 76); then the GPU tests
# (TEST_FILES, TEST_K; TESTS=0: none) and (ONCE, optional) decode_bench workloads with the shipped configs. The
# default candidate lists are session 34's first call's; a list set empty skips its sweep. From the repo root, .whl
# carried.
#   QWEN_FT_COMMIT=<rev> [GEMV_CANDIDATES=...] [GEMM_CANDIDATES=...] [ONCE="b1_ctx2000 b1_512_adapter"] \
#     bash benchmarks/config_sweep_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/config_sweep_out || exit 1
A=1,5120,5120 M=1,13696,5120 W=1,5120,13696 P64=8,5120,27392 C64=8,5120,15360 P32=4,5120,27392
GEMV_CANDIDATES="${GEMV_CANDIDATES-base A414:$A=4,1,4 A412:$A=4,1,2 A814:$A=8,1,4 M414:$M=4,1,4 M412:$M=4,1,2
  M814:$M=8,1,4}"
GEMM_CANDIDATES="${GEMM_CANDIDATES-base P64w2:$P64=4,1,1,2 P64x8:$P64=8,1,1,1 C64w2:$C64=4,1,1,2 P64t2:$P64=4,2,1,1
  C64t2:$C64=4,2,1,1 P32d2:$P32=4,1,2,1 P32s4:$P32=4,1,1,4}"
LORA_CANDIDATES="${LORA_CANDIDATES-base W414:$W=4,1,4 W414M414:$W=4,1,4+$M=4,1,4}"
LORA_ROWS="${LORA_ROWS:-1}"
[[ -z "$GEMV_CANDIDATES" ]] || step_sweep sweep_gemv 170 --rows 1 8 --prompt 24 --candidates $GEMV_CANDIDATES
[[ -z "$LORA_CANDIDATES" ]] || step_sweep sweep_lora 120 --rows $LORA_ROWS --prompt 24 --adapter 64 \
  --candidates $LORA_CANDIDATES
if [[ "${ATTN:-0}" == 1 ]]; then
  V=()
  for v in $(python3 benchmarks/attention_variants.py /tmp/attn_variants); do V+=(--variant "$v"); done
  timeout 120 python3 benchmarks/decode_attention_probe.py "${V[@]}" --out "$OUT/attn_variants_$C.json" 2>&1 \
    | grep "^{" | python3 -c 'import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(r["case"], {k[:-3]: v for k, v in r.items() if k.endswith("_us")})'
fi
[[ -z "$GEMM_CANDIDATES" ]] || step_sweep sweep_gemm 170 --rows ${GEMM_ROWS:-32 64} --prompt 24 \
  --candidates $GEMM_CANDIDATES
[[ "${TESTS:-1}" == 0 ]] || timeout 150 python3 -m pytest -q -m cuda ${TEST_FILES:-tests/quant/test_quant_cuda.py} \
  -k "${TEST_K:-mma_gemv}" -p no:cacheprovider 2>&1 | tail -3
[[ -z "${ONCE:-}" ]] || timeout 200 python3 benchmarks/decode_bench.py --part engine --model-dir /tmp/m \
  --workloads $ONCE --out "$OUT/decode_once_$C.json" 2>&1 | grep "^{" | cut -c1-250
