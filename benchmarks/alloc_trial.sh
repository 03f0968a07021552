#!/usr/bin/env bash
# One device call for NOTES step 55: rows2048_ckpt's reserved-but-unallocated 2.8 GiB (step 54). rows2048_ckpt and
# short_default with the defaults, then both with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (one growing
# segment a pool instead of many fixed ones: less fragmentation, if this torch lets the graphs' private pool use it).
# The training log's "captured" line gives the memory after the capture, run_info the whole run's peaks. From the
# repo root on the GPU machine, .whl carried; results under $OUT.
#   QWEN_FT_COMMIT=<rev> bash benchmarks/alloc_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && carried_wheels .whl /tmp/quick_site
out=${OUT:-/tmp/alloc_trial}
mkdir -p "$out"
start=$SECONDS
user_path_model
up() { python3 benchmarks/user_path.py --work /tmp/user_path --timeout 170 "$@"; }
run() {  # name workload steps
  up --workloads "$2" --steps "$2=$3" --out "$out/$1.json"
  grep -h "captured before\|gradient checkpointing:" "/tmp/user_path/$2.log" | tee "$out/$1.log"
  echo "$1 ($((SECONDS - start)) s)"
}
run ckpt rows2048_ckpt 6
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run ckpt_expandable rows2048_ckpt 6
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run short_expandable short_default 7
(( SECONDS - start < 420 )) && run short short_default 7
echo "end ($((SECONDS - start)) s)"
