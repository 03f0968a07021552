#!/usr/bin/env bash
# Device call of NOTES step 85: the small-M GEMM with groups of warps taking the rows in turn (mma_gemm's MG, a
# config's fifth field). The GEMM's GPU tests; the decode step's graph replay at 64 and 32
# rows (24-token prompts) with MG=2 entries for c_attn, the two 5,120-output Linears and w1/w2's pair, alone and
# together, against the shipped configs in one process (step_config_sweep.py); ncu of c_attn at 64 rows, shipped
# against MG=2 (benchmarks/ncu_kernels.py --configs).
#   QWEN_FT_COMMIT=<rev> [TESTS=0] [SWEEP=0] [NCU=0] bash benchmarks/rowgroups_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/rowgroups_out || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
[[ "${TESTS:-1}" == 0 ]] || gpu_tests rowgroups_tests 200 tests/quant/test_quant_cuda.py -k mma_gemm
c8="8,5120,15360=4,1,1,1,2" p8="8,5120,5120=4,1,1,1,2+8,13696,5120=4,1,1,1,2" w8="8,5120,27392=4,1,1,1,2"
q8="8,5120,5120=4,1,1,2,2+8,13696,5120=4,1,1,2,2"
c4="4,5120,15360=4,1,1,1,2" p4="4,5120,5120=4,1,1,2,2+4,13696,5120=4,1,1,2,2" w4="4,5120,27392=4,1,1,1,2"
[[ "${SWEEP:-1}" == 0 ]] || step_sweep rowgroups_sweep 400 --rows 64 32 --prompt 24 --reps 50 --candidates base \
  "c8:$c8" "p8:$p8" "q8:$q8" "w8:$w8" "a8:$c8+$p8+$w8" "c4:$c4" "p4:$p4" "w4:$w4"
[[ "${NCU:-1}" == 0 ]] || ncu_layer rowgroups_ncu 150 --rows 64 --shapes c_attn --configs 4,1,1,1 4,1,1,1,2
