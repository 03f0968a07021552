#!/usr/bin/env bash
# Full fine-tuning of a bf16/fp16 model (ZeRO-3 on several GPUs).
# Usage: bash scripts/finetune_full.sh [-m MODEL] [-d DATA] [-o OUTPUT] [trainer flags ...]
# With no MODEL it runs the built-in demo on the CPU. See scripts/_launch.sh for GPUS, NPROC, DEEPSPEED, NNODES.
MODE=full
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
