#!/usr/bin/env bash
# Full fine-tuning of a bf16/fp16 model (ZeRO-3 on several GPUs).
# Usage: bash scripts/finetune_full.sh [-m MODEL] [-d DATA] [-o OUTPUT] [CONFIG] [trainer flags ...]
# With no MODEL (and no CONFIG) it runs the built-in demo on the CPU.
MODE=full
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
