#!/usr/bin/env bash
# Q-LoRA: LoRA adapters on a GPTQ Int4 model (e.g. Qwen-14B-Chat-Int4).
# Usage: bash scripts/finetune_qlora.sh [-m MODEL] [-d DATA] [-o OUTPUT] [CONFIG] [trainer flags ...]
# With no MODEL (and no CONFIG) it runs the built-in demo on the CPU.
MODE=qlora
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
