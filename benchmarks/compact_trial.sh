#!/usr/bin/env bash
# One device call for NOTES step 53: the compact input embedding (and the keep budget it frees) on the user's path.
# The GPU test of compact against whole, then rows2048_ckpt and short_default with the script's defaults, and
# rows2048_ckpt with FINETUNE_COMPACT_EMBEDDING=0 (the whole table, keep 1 GiB) last. From the repo root on the GPU
# machine, .whl carried; results under $OUT.
#   QWEN_FT_COMMIT=<rev> bash benchmarks/compact_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && carried_wheels .whl /tmp/quick_site
out=${OUT:-/tmp/compact_trial}
mkdir -p "$out"
start=$SECONDS
timeout 120 python3 -m pytest -q -m cuda -x tests/training/test_graphs_cuda.py -k compact_input_embedding \
  > "$out/tests.log" 2>&1
echo "tests rc=$? ($((SECONDS - start)) s)"; tail -2 "$out/tests.log"
user_path_model
up() { python3 benchmarks/user_path.py --work /tmp/user_path --timeout 170 "$@"; }
up --workloads rows2048_ckpt --steps rows2048_ckpt=6 --out "$out/ckpt_compact.json"
echo "rows2048 compact ($((SECONDS - start)) s)"
up --workloads short_default --steps short_default=7 --out "$out/short_compact.json"
echo "short compact ($((SECONDS - start)) s)"
if (( SECONDS - start < 420 )); then
  FINETUNE_COMPACT_EMBEDDING=0 up --workloads rows2048_ckpt --steps rows2048_ckpt=6 --out "$out/ckpt_whole.json"
fi
echo "end ($((SECONDS - start)) s)"
for f in "$out"/*.json; do
  python3 -c "import json,sys; [print(sys.argv[1].split('/')[-1], e['workload'], e['tokens_per_s'], e['peak_reserved_gib']) for e in json.load(open(sys.argv[1]))]" "$f"
done
