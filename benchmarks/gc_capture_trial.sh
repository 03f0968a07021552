#!/usr/bin/env bash
# Device call of NOTES step 84's fix (finetune/graph_capture.py: the collector paused during captures). On a fresh
# machine: the new GPU test with the collector left on during captures, as before the fix (expected to fail with
# cudaErrorStreamCaptureInvalidated: the cause), then with the fix (expected to pass), then both GPU test files of
# the engine and the trainer's graph tests, whole logs in $OUT.
#   QWEN_FT_COMMIT=<rev> bash benchmarks/gc_capture_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && inference_trial /tmp/gc_capture_out || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== the collector left on during captures (before the fix)"
timeout 120 python3 - <<'PY' 2>&1 | tee "$OUT/gc_unpaused_$C.log" | grep -E "^E |passed|failed" | head -8
import gc
import sys

import pytest

import finetune.graph_capture as graph_capture


class _CollectorLeftOn:
    def __getattr__(self, name):
        return getattr(gc, name)

    def disable(self):
        pass


graph_capture.gc = _CollectorLeftOn()
sys.exit(pytest.main(["-q", "-m", "cuda", "-p", "no:cacheprovider", "--tb=short", "-W", "ignore",
                      "tests/inference/test_inference_cuda.py", "-k", "collection_that_frees"]))
PY
echo "== with the fix"
gpu_tests gc_paused 120 tests/inference/test_inference_cuda.py -k collection_that_frees
gpu_tests gpu_tests 420 tests/inference/test_fused_decode_cuda.py tests/inference/test_inference_cuda.py \
  tests/training/test_graphs_cuda.py
