#!/usr/bin/env bash
# Serve a model dir (float or Int4) and its LoRA adapters through an OpenAI-compatible API, with a chat page.
# Usage: bash scripts/serve.sh [-m MODEL] [--adapter NAME=DIR ...] [--host H] [--port P] [--api-key KEY]
#        [--max-batch N] [--max-model-len N]. Every flag goes to `qwen-ft serve` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
for arg in "$@"; do
  if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
    sed -n '2,4s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exec "$PYTHON" -m finetune.cli serve --help
  fi
done
exec "$PYTHON" -m finetune.cli serve "$@"
