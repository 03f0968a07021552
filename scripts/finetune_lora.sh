#!/usr/bin/env bash
# LoRA adapters on a bf16/fp16 model (e.g. Qwen-14B-Chat).
# Usage: bash scripts/finetune_lora.sh [-m MODEL] [-d DATA] [-o OUTPUT] [trainer flags ...]
# With no MODEL it runs the built-in demo on the CPU. See scripts/_launch.sh for GPUS, NPROC, DEEPSPEED, NNODES.
MODE=lora
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
