#!/usr/bin/env bash
# LoRA adapters on a bf16/fp16 model (e.g. Qwen-14B-Chat).
# Usage: bash scripts/finetune_lora.sh [-m MODEL] [-d DATA] [-o OUTPUT] [CONFIG] [trainer flags ...]
# With no MODEL (and no CONFIG) it runs the built-in demo on the CPU.
MODE=lora
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
