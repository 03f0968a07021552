#!/usr/bin/env bash
# The small-M tensor-core GEMM (finetune/quant/mma_gemm.py; benchmarks/NOTES.md step 21) on one GPU call:
#   GEMM_PARTS="tests probe"  its GPU tests, then every launch config at 16-64 rows against the GEMV and Triton
#                             (--pick --apply writes the fastest CONFIGS into this machine's copy of mma_gemm.py;
#                             $OUT/pick.txt says what to commit)
#   GEMM_PARTS="engine"       the engine's GPU tests (batched rows, adapters, graphs) on the kernels as they are
# Run from the repo root with .whl carried (benchmarks/quick_wheels.sh, plus pytest's wheels); the decode and
# serving figures then come from benchmarks/run_quick_all.sh. Logs go into $OUT/gemm_logs.tgz (a call returns at
# most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gemm_out}"
mkdir -p "$OUT/logs"
source benchmarks/device_site.sh && carried_wheels .whl /tmp/quick_site
read -r -a parts <<< "${GEMM_PARTS:-tests probe}"
for part in "${parts[@]}"; do
  t0=$(date +%s)
  case "$part" in
    tests)
      timeout "${GEMM_T_TESTS:-240}" python3 -m pytest -q -x -m cuda -p no:cacheprovider tests/quant/test_quant_cuda.py \
        -k "${GEMM_TESTS_K:-mma_gemm or mma_copy or mma_gemv_equals}" > "$OUT/logs/tests.log" 2>&1 ;;
    probe)
      timeout "${GEMM_T_PROBE:-300}" python3 benchmarks/mma_gemm_probe.py --rows ${GEMM_ROWS:-16 32 64} ${GEMM_PROBE_ARGS:-} \
        --out "$OUT/mma_gemm_probe.json" --pick "$OUT/pick.txt" --apply > "$OUT/logs/probe.log" 2>&1 ;;
    engine)
      timeout "${GEMM_T_ENGINE:-300}" python3 -m pytest -q -m cuda -p no:cacheprovider tests/inference/test_inference_cuda.py \
        tests/quant/test_quant_cuda.py -k "not triton_dequant and not test_triton_gemv" > "$OUT/logs/engine.log" 2>&1 ;;
    *) echo "unknown part $part (tests, probe, engine)"; continue ;;
  esac
  echo "$part rc=$? $(( $(date +%s) - t0 )) s"
  tail -3 "$OUT/logs/$part.log"
done
tar czf "$OUT/gemm_logs.tgz" -C "$OUT/logs" . && rm -rf "$OUT/logs"
