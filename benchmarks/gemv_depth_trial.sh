#!/usr/bin/env bash
# Device call of NOTES step 85's second part: the one-row GEMV of the two 5,120-output Linears with two chunks in
# flight a warp (depth 2, 4 warps, 4 CTAs an SM: their grids split in two and still one wave). The GEMV's GPU tests;
# the decode step's graph replay at one row (24-token prompts; then with an r=64 adapter, whose epilogue build the
# two c_proj run) against the shipped configs in one process (step_config_sweep.py); ncu of the two Linears at one
# row, shipped (8, 1, 2) against (4, 2, 4). From the repo root on the GPU machine, .whl carried.
#   QWEN_FT_COMMIT=<rev> [TESTS=0] [SWEEP=0] [ADAPTER=0] [NCU=0] bash benchmarks/gemv_depth_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/gemv_depth_out || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
# the GEMV's GPU tests (depth 2 with and without the LoRA epilogue among their configs)
[[ "${TESTS:-1}" == 0 ]] || gpu_tests gemv_depth_tests 200 tests/quant/test_quant_cuda.py -k mma_gemv
m="1,13696,5120=4,2,4" a="1,5120,5120=4,2,4"
candidates=(base "M424:$m" "A424:$a" "AM424:$a+$m")
[[ "${SWEEP:-1}" == 0 ]] || step_sweep gemv_depth_sweep 200 --rows 1 --prompt 24 --reps 100 \
  --candidates "${candidates[@]}"
[[ "${ADAPTER:-1}" == 0 ]] || step_sweep gemv_depth_adapter 200 --rows 1 --prompt 24 --reps 100 --adapter 64 \
  --candidates "${candidates[@]}"
[[ "${NCU:-1}" == 0 ]] || ncu_layer gemv_depth_ncu 150 --rows 1 --shapes attn.c_proj mlp.c_proj --configs 8,1,2 4,2,4
