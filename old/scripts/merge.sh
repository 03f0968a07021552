#!/usr/bin/env bash
# Merge a LoRA / Q-LoRA adapter into its base and write a standalone model dir (bf16, or Int4 by RTN / GPTQ).
# Usage: bash scripts/merge.sh -a ADAPTER -o OUTPUT [-m BASE] [--format float|int4] [--dtype bf16|fp16|fp32] [--quant-method rtn|gptq]
#        [--calib-data FILE] [--eval-data FILE] [...]   (every other flag goes to `qwen-ft merge`, see --help)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -a) ARGS+=(--adapter "$2"); shift 2 ;;
    -m) ARGS+=(--model "$2"); shift 2 ;;
    -o) ARGS+=(--output "$2"); shift 2 ;;
    -h|--help) sed -n '2,4p' "${BASH_SOURCE[0]}"; exec "$PYTHON" -m finetune.cli merge --help ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
exec "$PYTHON" -m finetune.cli merge "${ARGS[@]}"
