#!/usr/bin/env bash
# The usual-stack side of the speed benchmark (issue 7), run on the H200 machine from the
# repo root, with .wheels/ carried (filled by benchmarks/wheels.sh).  About 4-6 minutes.
#
#   bash benchmarks/run_usual.sh                      # default: 2048 with and without checkpointing
#   USUAL_CONFIGS="2048:ckpt 256:nockpt" bash benchmarks/run_usual.sh
#
# Knobs (env): USUAL_CONFIGS ("SEQ:ckpt|nockpt ..."), USUAL_STEPS (5), USUAL_TIMEOUT (seconds per
# configuration, 160), USUAL_SITE (/tmp/usual_site), PYTHON (python), USUAL_EXTRA (extra
# usual_stack.py arguments, e.g. "--tiny --device cpu" for a CPU dry run).
#
# Results: one JSON line per configuration appended to $OUT/usual_stack.jsonl (when OUT is set)
# and benchmarks/results/usual_stack.jsonl; logs in $OUT/usual_*.log (or /tmp).
#
# The wheels go to a --target dir that usual_stack.py APPENDS to sys.path (site.addsitedir),
# so the image's own torch / transformers / peft / accelerate / numpy (and anything else the
# image has) are always the ones imported; the travelling wheels only fill what is missing.
# benchmarks/pcre_shim stands in for pypcre (no cp312 wheel).
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
SITE="${USUAL_SITE:-/tmp/usual_site}"
CONFIGS="${USUAL_CONFIGS:-2048:ckpt 2048:nockpt}"
STEPS="${USUAL_STEPS:-5}"
TMO="${USUAL_TIMEOUT:-160}"
LOGDIR="${OUT:-/tmp}"
RES_REPO="benchmarks/results/usual_stack.jsonl"
OUTS=(--out "$RES_REPO")
[[ -n "${OUT:-}" ]] && OUTS+=(--out "$OUT/usual_stack.jsonl")
mkdir -p benchmarks/results "$LOGDIR"

export GPTQMODEL_DISABLE_PACK_EXT=1   # no C++ pack extension build at import
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export USUAL_SITE="$SITE"

t_start=$(date +%s)
echo "== install .wheels -> $SITE (no index, no deps, nothing of the image replaced)"
if ! ls .wheels/*.whl >/dev/null 2>&1; then
  echo "no .wheels/*.whl: run benchmarks/wheels.sh on the build machine and carry .wheels" >&2
  exit 2
fi
rm -rf "$SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
  --target "$SITE" .wheels/*.whl 2>&1 | grep -v "already exists" || true

echo "== environment check"
"$PY" - <<'EOF' 2>&1 | tee "$LOGDIR/usual_env.log"
import os, site, sys, importlib
site.addsitedir(os.environ["USUAL_SITE"])
try:
    import pcre
except ImportError:
    sys.path.append("benchmarks/pcre_shim")
print("python", sys.version.split()[0])
from importlib import metadata
for name, dist in [("torch",) * 2, ("transformers",) * 2, ("peft",) * 2, ("accelerate",) * 2,
                   ("numpy",) * 2, ("triton",) * 2, ("safetensors",) * 2, ("optimum.gptq", "optimum"),
                   ("gptqmodel",) * 2, ("datasets",) * 2, ("pandas",) * 2, ("PIL", "pillow"),
                   ("requests",) * 2, ("pcre", None), ("torchao",) * 2]:
    try:
        m = importlib.import_module(name)
        try:
            ver = metadata.version(dist) if dist else getattr(m, "__version__", "?")
        except Exception:
            ver = getattr(m, "__version__", "?")
        where = os.path.dirname(m.__file__) if getattr(m, "__file__", None) else list(m.__path__)
        print(f"{name:13s} {ver:24s} {where}")
    except Exception as e:
        print(f"{name:13s} MISSING ({type(e).__name__}: {e})")
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

for cfg in $CONFIGS; do
  seq="${cfg%%:*}"; mode="${cfg##*:}"
  if [[ "$mode" == "ckpt" ]]; then flag=--ckpt; ck=true; else flag=--no-ckpt; ck=false; fi
  log="$LOGDIR/usual_${seq}_${mode}.log"
  echo "== usual stack seq=$seq $mode (timeout ${TMO}s) -> $log"
  t0=$(date +%s)
  timeout -k 15 "$TMO" "$PY" benchmarks/usual_stack.py --seq "$seq" "$flag" --steps "$STEPS" \
    "${OUTS[@]}" ${USUAL_EXTRA:-} >"$log" 2>&1
  rc=$?
  echo "   rc=$rc in $(( $(date +%s) - t0 ))s"
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    line="{\"stack\": \"usual\", \"seq\": $seq, \"ckpt\": $ck, \"tok_s\": null, \"steps\": $STEPS, \"error\": \"timeout after ${TMO}s (rc $rc)\"}"
    echo "$line" >> "$RES_REPO"
    [[ -n "${OUT:-}" ]] && echo "$line" >> "$OUT/usual_stack.jsonl"
  fi
  grep -E '^\{"stack"' "$log" | tail -1 || tail -5 "$log"
  [[ $rc -ne 0 ]] && tail -25 "$log"
done
echo "== usual stack done in $(( $(date +%s) - t_start ))s"
