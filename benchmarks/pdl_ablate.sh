#!/usr/bin/env bash
# One GPU call: benchmarks/pdl_ablate.py's variants on b1_512 (each its own process), plain and full twice for the
# spread. Run from the repo root with .whl carried. Results to $OUT/pdl_ablate_VARIANT[_2].json and a summary.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/pdl_out}"
mkdir -p "$OUT" /tmp/pdl_logs
source benchmarks/device_site.sh && carried_wheels .whl /tmp/quick_site
MODEL=/tmp/decode_bench/14b_int4
python3 benchmarks/make_model_dir.py --shape 14b --int4 --out "$MODEL" > /tmp/pdl_logs/make_model.log 2>&1
for v in ${PDL_VARIANTS:-plain full no_prefetch prefetch_only no_release prefetch_8k plain full}; do
  f="$OUT/pdl_ablate_$v.json"; [ -e "$f" ] && f="$OUT/pdl_ablate_${v}_2.json"
  timeout 100 python3 benchmarks/pdl_ablate.py "$v" -- --part engine --model-dir "$MODEL" \
    --workloads ${PDL_WORKLOADS:-b1_512} --out "$f" > "/tmp/pdl_logs/$v.log" 2>&1
  echo "$v rc=$? $(grep -ho '"decode_tokens_per_s": [0-9.]*\|"workload": "[a-z0-9_]*"\|"tokens_per_s": [0-9.]*' "$f" 2>/dev/null | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
done
