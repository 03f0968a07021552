#!/usr/bin/env bash
# Device call of NOTES step 86: the small-M GEMM with the scale folded into the weights (mma_gemm's FOLD, a config's
# sixth field: one set of fp32 sums a thread, 140 -> 112 registers at 64 rows), so that two to four CTAs an SM fit
# without spills. The GEMM's GPU tests; the decode step's graph replay at 64 and 32 rows (24-token prompts) with fold
# entries for c_attn, the two 5,120-output Linears and w1/w2's pair, at one to four CTAs an SM, against the shipped
# configs in one process (step_config_sweep.py).
#   QWEN_FT_COMMIT=<rev> [TESTS=0] [SWEEP=0] bash benchmarks/fold_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/fold_out || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
[[ "${TESTS:-1}" == 0 ]] || gpu_tests fold_tests 200 tests/quant/test_quant_cuda.py -k mma_gemm
A=8,5120,15360 P1=8,5120,5120 P2=8,13696,5120 W=8,5120,27392
a=4,5120,15360 p1=4,5120,5120 p2=4,13696,5120 w=4,5120,27392
[[ "${SWEEP:-1}" == 0 ]] || step_sweep fold_sweep 420 --rows 64 32 --prompt 24 --reps 50 --candidates base \
  "c1:$A=4,1,1,1,1,1" "c2:$A=4,1,1,2,1,1" "c3:$A=4,1,1,3,1,1" \
  "p2:$P1=4,1,1,2,1,1+$P2=4,1,1,2,1,1" "p4:$P1=4,1,1,4,1,1+$P2=4,1,1,4,1,1" \
  "q2:$P1=4,1,1,2,2,1+$P2=4,1,1,2,2,1" \
  "w1:$W=4,2,1,1,1,1" "w2:$W=4,1,1,2,1,1" \
  "a2:$A=4,1,1,2,1,1+$P1=4,1,1,2,1,1+$P2=4,1,1,2,1,1+$W=4,1,1,2,1,1" \
  "d1:$a=4,1,3,1,1,1" "d2:$a=4,1,1,2,1,1" "e2:$p1=4,1,1,2,1,1+$p2=4,1,1,2,1,1" "v1:$w=4,2,1,1,1,1"
