#!/usr/bin/env bash
# Device calls for NOTES step 99: the decode step's attention through attention_cuda.py's CUDA C kernel (the default)
# against the Triton kernels (FINETUNE_ATTENTION_CUDA=0). Its GPU tests and the fused step's; the decode step's graph
# replay with each in one process (step_config_sweep: 1 and 64 rows after 24-token prompts, one row after 2,000);
# decode_bench's one-row workloads with each; serve_bench at 32 streams with each (a fresh server apiece). From the
# repo root on the GPU machine, .whl carried. Parts (each 1 by default; 0 skips): TESTS, SWEEPS, BENCH, SERVE (the
# whole is more than one 10-minute call); CANDIDATES: the sweeps' (default: base and triton); MORE_TESTS: test files
# run with the attention's, within TESTS_S seconds (default 240).
#   QWEN_FT_COMMIT=<rev> [TESTS=0 SWEEPS=0] [CANDIDATES="base triton:attention_cuda=0 ..."] \
#     [WORKLOADS="b1_512 b1_ctx2000"] [AB_WORKLOADS=...] [SERVE=0] bash benchmarks/attention_cuda_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/attention_cuda_out || exit 1
[[ "${TESTS:-1}" == 0 ]] || gpu_tests attention_cuda_tests "${TESTS_S:-240}" tests/inference/test_attention_cuda.py \
  tests/inference/test_fused_decode_cuda.py ${MORE_TESTS:-}
if [[ "${SWEEPS:-1}" == 1 ]]; then
  c="${CANDIDATES:-base triton:attention_cuda=0}"
  step_sweep attention_cuda_short 200 --candidates $c --rows 1 64 --prompt 24
  step_sweep attention_cuda_long 200 --candidates $c --rows 1 --prompt 2000
fi
for v in $([[ "${BENCH:-1}" == 1 ]] && echo 1 0); do  # (AB_WORKLOADS: the Triton kernels' run)
  w="${WORKLOADS:-b1_512 b1_ctx2000}"
  [[ $v == 1 ]] || w="${AB_WORKLOADS:-$w}"
  FINETUNE_ATTENTION_CUDA=$v timeout 240 python3 benchmarks/decode_bench.py --part engine --model-dir /tmp/m \
    --workloads $w --out "$OUT/decode_attention_cuda${v}_$C.json" 2>&1 | grep "^{" | cut -c1-300
done
for v in $([[ "${SERVE:-1}" == 1 ]] && echo 1 0); do
  FINETUNE_ATTENTION_CUDA=$v timeout 150 python3 benchmarks/serve_bench.py --model-dir /tmp/m --streams 32 \
    --out "$OUT/serve_attention_cuda${v}_$C.json" 2>&1 | grep "^{" | cut -c1-400
done
