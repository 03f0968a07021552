#!/usr/bin/env bash
# Chat with a model dir (float or Int4), optionally with a LoRA / Q-LoRA adapter.
# Usage: bash scripts/chat.sh -m MODEL [-a ADAPTER] [--system S] [--query Q] [--greedy] [sampling flags ...]
# Without -m the base recorded in the adapter is used. Every other flag goes to `qwen-ft chat` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -a) ARGS+=(--adapter "$2"); shift 2 ;;
    -h|--help) sed -n '2,4p' "${BASH_SOURCE[0]}"; exec "$PYTHON" -m finetune.cli chat --help ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
exec "$PYTHON" -m finetune.cli chat "${ARGS[@]}"
