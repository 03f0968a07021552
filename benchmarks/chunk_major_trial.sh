#!/usr/bin/env bash
# The chunk-major weight copy (mma_gemv.to_chunk_major; NOTES step 36) on one GPU call: the GPU test of equal bits,
# then the GEMV probe (1, 8, 32 rows) and the GEMM probe (16, 32, 64 rows), each config on both copies.
#   QWEN_FT_COMMIT=<hash> bash benchmarks/chunk_major_trial.sh        (OUT: where results go; .whl carried)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/cmajor_out}"
mkdir -p "$OUT"
source benchmarks/device_site.sh && carried_wheels .whl /tmp/quick_site
timeout 150 python3 -m pytest -q -m cuda tests/quant/test_quant_cuda.py -k "chunk_major or gives_every_weight" \
  > "$OUT/cmajor_tests.log" 2>&1
echo "tests rc=$?"; tail -2 "$OUT/cmajor_tests.log"
timeout 200 python3 benchmarks/mma_gemv_probe.py --rows 1 8 32 --baselines 0 --warps 4 8 --depth 1 --per-sm 2 4 \
  --chunk-major --out "$OUT/cmajor_gemv_probe.json" > "$OUT/cmajor_gemv_probe.log" 2>&1
echo "gemv probe rc=$?"; grep -E "^copy|^LAYER" "$OUT/cmajor_gemv_probe.log"
timeout 220 python3 benchmarks/mma_gemm_probe.py --rows 16 32 64 --baselines 0 --warps 4 8 --tpw 1 --depth 1 \
  --per-sm 1 2 4 --chunk-major --out "$OUT/cmajor_gemm_probe.json" > "$OUT/cmajor_gemm_probe.log" 2>&1
echo "gemm probe rc=$?"; grep -E "^LAYER" "$OUT/cmajor_gemm_probe.log"
