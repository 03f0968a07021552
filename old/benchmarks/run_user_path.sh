#!/usr/bin/env bash
# Issue 15's measurement on the GPU machine, from the repo root, with .whl (datasets and what it needs) and
# .wheels (the usual stack: benchmarks/wheels.sh) carried: the scripts' defaults per workload
# (benchmarks/user_path.py), then the usual stack through transformers' Trainer on the same short chats
# (benchmarks/run_usual.sh, USUAL_CONFIGS=chats). Results: benchmarks/results/user_path.json (and $OUT).
#
#   UP_WORKLOADS="short_default rows2048_ckpt" UP_STEPS="short_default=6" bash benchmarks/run_user_path.sh
#
# Knobs (env): UP_WORKLOADS (default: short_default short_padded rows2048_ckpt rows2048_no_ckpt),
# UP_STEPS (user_path.py --steps values), UP_USUAL (1: also the usual stack; default 1), USUAL_MAX_STEPS (6),
# QWEN_FT_COMMIT (the commit to record: the machine's copy of the tree may carry a stale .git).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && carried_wheels .whl /tmp/up_site
WORK=/tmp/user_path
RES=benchmarks/results/user_path.json
read -r -a workloads <<< "${UP_WORKLOADS:-short_default short_padded rows2048_ckpt rows2048_no_ckpt}"
read -r -a steps <<< "${UP_STEPS:-}"
python3 benchmarks/user_path.py --work "$WORK" --out "$RES" --workloads "${workloads[@]}" \
  ${steps[@]:+--steps "${steps[@]}"}
[[ -n "${OUT:-}" ]] && cp "$RES" "$OUT/"
if [[ "${UP_USUAL:-1}" == 1 ]]; then
  USUAL_CONFIGS=chats USUAL_CHATS="$WORK/short.json" USUAL_TOKENIZER="$WORK/14b_int4" \
    USUAL_MAX_STEPS="${USUAL_MAX_STEPS:-6}" PYTHON=python3 bash benchmarks/run_usual.sh
  # the usual stack's line joins user_path.json as workload usual_stack_short
  python3 - "$RES" <<'PY'
import json, sys
from pathlib import Path
res = Path(sys.argv[1])
lines = [json.loads(l) for l in Path("benchmarks/results/usual_stack.jsonl").read_text().splitlines() if l.strip()]
usual = [l for l in lines if l.get("workload") == "usual_stack_short"]
if usual:
    entries = [e for e in json.loads(res.read_text()) if e.get("workload") != "usual_stack_short"]
    entries.append(usual[-1])
    res.write_text(json.dumps(entries, indent=2) + "\n")
PY
  [[ -n "${OUT:-}" ]] && cp "$RES" "$OUT/"
fi
