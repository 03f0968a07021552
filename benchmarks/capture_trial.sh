#!/usr/bin/env bash
# One device call for NOTES step 64: what a decode step's capture at a new key length costs, with SDPA's own choice
# and with cuDNN attention off (benchmarks/capture_probe.py, each in its own process). From the repo root on the GPU
# machine, .whl carried; results under $OUT.
#   QWEN_FT_COMMIT=<rev> bash benchmarks/capture_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/capture_out || exit 1
timeout 200 python3 benchmarks/capture_probe.py --model-dir /tmp/m --out "$OUT/capture_probe_cudnn_$C.json" 2>&1 | tail -1
timeout 200 python3 benchmarks/capture_probe.py --model-dir /tmp/m --no-cudnn --out "$OUT/capture_probe_nocudnn_$C.json" \
  2>&1 | tail -1
