#!/usr/bin/env bash
# The usual-stack side of the speed benchmark (issue 7), run on the H200 machine from the
# repo root, with .wheels/ carried (filled by benchmarks/wheels.sh).  About 4-6 minutes.
#
#   bash benchmarks/run_usual.sh                      # default: 2048 with and without checkpointing
#   USUAL_CONFIGS="2048:ckpt 256:nockpt" bash benchmarks/run_usual.sh
#   USUAL_CONFIGS=chats USUAL_CHATS=/tmp/up/chats.json USUAL_TOKENIZER=/tmp/up/int4 bash benchmarks/run_usual.sh
#
# Knobs (env): USUAL_CONFIGS ("SEQ:ckpt|nockpt ..." and/or "chats" / "chats:nockpt"), USUAL_STEPS (5),
# USUAL_TIMEOUT (seconds per configuration, 160; 540 for chats), USUAL_SITE (/tmp/usual_site),
# PYTHON (python), USUAL_EXTRA (extra usual_stack.py arguments, e.g. "--tiny --device cpu" for a CPU
# dry run).
# "chats" (issue 15, workload usual_stack_short) trains through transformers' Trainer on the chat
# file USUAL_CHATS (required), the same file our scripts train on, tokenized with the tokenizer of
# USUAL_TOKENIZER (the model dir our run trains; default the project's small vocabulary, which
# benchmarks/make_model_dir.py puts in its dirs): batch 2, accumulation 8, checkpointing, bf16,
# USUAL_MAX_STEPS (12) optimizer steps, throughput over the steps after the first 2.  About 3-4
# minutes on the H200 for 12 steps of short chats.
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

for cfg in $CONFIGS; do
  if [[ "${cfg%%:*}" == "chats" && -z "${USUAL_CHATS:-}" ]]; then
    echo "error: configuration $cfg needs USUAL_CHATS=FILE (the chat file our run trains on)" >&2
    exit 2
  fi
done

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

# what usual_stack.py records as "launched_by" in the chats mode
launch=()
for v in USUAL_CONFIGS USUAL_CHATS USUAL_TOKENIZER USUAL_MAX_STEPS USUAL_TIMEOUT USUAL_EXTRA; do
  [[ -n "${!v:-}" ]] && launch+=("$v=$(printf %q "${!v}")")
done
export USUAL_LAUNCH="${launch[*]}${launch:+ }bash benchmarks/run_usual.sh"

for cfg in $CONFIGS; do
  seq="${cfg%%:*}"; mode="${cfg##*:}"
  [[ "$cfg" == *:* ]] || mode=ckpt
  if [[ "$mode" == "ckpt" ]]; then flag=--ckpt; ck=true; else flag=--no-ckpt; ck=false; fi
  log="$LOGDIR/usual_${seq}_${mode}.log"
  t0=$(date +%s)
  if [[ "$seq" == "chats" ]]; then
    tmo="${USUAL_TIMEOUT:-540}"
    echo "== usual stack through Trainer on $USUAL_CHATS, $mode (timeout ${tmo}s) -> $log"
    cmd=(benchmarks/usual_stack.py --chats "$USUAL_CHATS" "$flag" --max-steps "${USUAL_MAX_STEPS:-12}")
    [[ -n "${USUAL_TOKENIZER:-}" ]] && cmd+=(--tokenizer "$USUAL_TOKENIZER")
    timeout_line=$("$PY" -c 'import json, sys; print(json.dumps({"workload": "usual_stack_short", "stack": "usual",
"ckpt": sys.argv[1] == "true", "tokens_per_s": None, "command": sys.argv[2],
"error": f"timeout after {sys.argv[3]}s (rc RC)"}))' "$ck" "$USUAL_LAUNCH" "$tmo")
  else
    tmo="$TMO"
    echo "== usual stack seq=$seq $mode (timeout ${tmo}s) -> $log"
    cmd=(benchmarks/usual_stack.py --seq "$seq" "$flag" --steps "$STEPS")
    timeout_line="{\"stack\": \"usual\", \"seq\": $seq, \"ckpt\": $ck, \"tok_s\": null, \"steps\": $STEPS, \"error\": \"timeout after ${tmo}s (rc RC)\"}"
  fi
  timeout -k 15 "$tmo" "$PY" "${cmd[@]}" "${OUTS[@]}" ${USUAL_EXTRA:-} >"$log" 2>&1
  rc=$?
  echo "   rc=$rc in $(( $(date +%s) - t0 ))s"
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    line="${timeout_line/RC/$rc}"
    echo "$line" >> "$RES_REPO"
    [[ -n "${OUT:-}" ]] && echo "$line" >> "$OUT/usual_stack.jsonl"
  fi
  grep -E '^\{"(stack|workload)"' "$log" | tail -1 || tail -5 "$log"
  [[ $rc -ne 0 ]] && tail -25 "$log"
done
echo "== usual stack done in $(( $(date +%s) - t_start ))s"
