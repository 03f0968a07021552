#!/usr/bin/env bash
# Merge a LoRA / Q-LoRA adapter into its base and write a standalone model dir (bf16, or Int4 by RTN / GPTQ).
# Usage: bash scripts/merge.sh -a ADAPTER -o OUTPUT [-m BASE] [--format float|int4] [--dtype bf16|fp16|fp32] [--quant-method rtn|gptq]
#        [--calib-data FILE] [--eval-data FILE] [...]   (every other flag goes to `qwen-ft merge`, see --help)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# qwen-ft merge takes -a, -m and -o itself (a flag without its value is its one usage error, not bash's)
for arg in "$@"; do
  if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
    sed -n '2,4s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exec "$PYTHON" -m finetune.cli merge --help
  fi
done
exec "$PYTHON" -m finetune.cli merge "$@"
