#!/usr/bin/env bash
# Chat with a model dir (float or Int4), optionally with a LoRA / Q-LoRA adapter.
# Usage: bash scripts/chat.sh -m MODEL [-a ADAPTER] [--system S] [--query Q] [--greedy] [sampling flags ...]
# Without -m the base recorded in the adapter is used. Every other flag goes to `qwen-ft chat` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# qwen-ft chat takes -m and -a itself (a flag without its value is its one usage error, not bash's)
for arg in "$@"; do
  if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
    sed -n '2,4s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exec "$PYTHON" -m finetune.cli chat --help
  fi
done
exec "$PYTHON" -m finetune.cli chat "$@"
