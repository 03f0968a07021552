# Shared by finetune_qlora.sh, finetune_lora.sh and finetune_full.sh (sourced; MODE is set by the caller).
# Usage: bash scripts/finetune_<mode>.sh [-m MODEL] [-d DATA] [-o OUTPUT] [trainer flags ...]
# Env: MODEL DATA OUTPUT (same as -m -d -o), GPUS (e.g. "0,1"; default: all visible), NPROC (CPU processes
# when there is no GPU, for testing the multi-process path), DEEPSPEED (a ds_configs/*.json; default zero2
# for several processes), NNODES NODE_RANK MASTER_ADDR MASTER_PORT (multi-node), PYTHON.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
# The package is importable from a source checkout too, installed or not.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
MODEL="${MODEL:-}"; DATA="${DATA:-}"; OUTPUT="${OUTPUT:-}"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -m|--model) MODEL="$2"; shift 2 ;;
    -d|--data) DATA="$2"; shift 2 ;;
    -o|--output) OUTPUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,6p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done

if [[ -n "${GPUS:-}" ]]; then export CUDA_VISIBLE_DEVICES="$GPUS"; fi
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
NNODES="${NNODES:-1}"; NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"; MASTER_PORT="${MASTER_PORT:-29500}"
if [[ "$NGPU" -gt 0 ]]; then NPROC_PER_NODE="$NGPU"; else NPROC_PER_NODE="${NPROC:-1}"; fi
WORLD=$(( NPROC_PER_NODE * NNODES ))

ARGS=()
if [[ -z "$MODEL" ]]; then
  # The built-in demo: a tiny random Qwen v1 model (Int4 for Q-LoRA), made once and cached, trained on the
  # memorise set in data/ on the CPU in a couple of minutes.
  CACHE="${QWEN_FT_CACHE:-$HOME/.cache/qwen-finetune}"
  DATA="${DATA:-$ROOT/data/demo_memorize.json}"
  OUTPUT="${OUTPUT:-output/demo-$MODE}"
  # The demo replaces only its own outputs (marked with .qwen-ft-demo), never a dir of anything else.
  if [[ -e "$OUTPUT" && ! -f "$OUTPUT/.qwen-ft-demo" ]] && { [[ ! -d "$OUTPUT" ]] || [[ -n "$(ls -A "$OUTPUT")" ]]; }; then
    echo "error: $OUTPUT is not a demo output (no .qwen-ft-demo in it) and the demo would replace it: pass another -o, or -m MODEL -d DATA to train a real model" >&2
    exit 2
  fi
  if [[ "$MODE" == "qlora" ]]; then MODEL="$CACHE/demo-int4"; MAKE=(--int4); else MODEL="$CACHE/demo"; MAKE=(); fi
  "$PYTHON" -m finetune.demo --make-model "$MODEL" "${MAKE[@]}"
  mkdir -p "$OUTPUT" && touch "$OUTPUT/.qwen-ft-demo"
  echo "demo: training $MODE on $DATA into $OUTPUT (previous demo output there is replaced)"
  ARGS+=(--num_train_epochs 60 --per_device_train_batch_size 4 --learning_rate 5e-3 --warmup_steps 0.05
         --lr_scheduler_type cosine --weight_decay 0.0 --lora_r 16 --lora_alpha 32 --lora_dropout 0.0
         --model_max_length 256 --logging_steps 20 --save_strategy no --report_to none --disable_tqdm True
         --overwrite_output_dir True --seed 0)
  [[ "$NGPU" -eq 0 ]] && ARGS+=(--use_cpu True)
else
  [[ -n "$DATA" ]] || { echo "error: no data: pass -d DATA (or DATA=...)" >&2; exit 2; }
  OUTPUT="${OUTPUT:-output/qwen-$MODE}"
  # The official Qwen recipe's defaults; any flag given after -m/-d/-o overrides them.
  ARGS+=(--num_train_epochs 5 --per_device_train_batch_size 2 --per_device_eval_batch_size 1
         --gradient_accumulation_steps 8 --learning_rate 3e-4 --weight_decay 0.1 --adam_beta2 0.95
         --warmup_steps 0.01 --lr_scheduler_type cosine --logging_steps 1 --save_strategy steps
         --save_steps 1000 --save_total_limit 10 --model_max_length 2048 --gradient_checkpointing True
         --report_to none)
  if [[ "$MODE" == "full" ]]; then ARGS+=(--learning_rate 1e-5); fi
  [[ "$NGPU" -eq 0 ]] && ARGS+=(--use_cpu True)
fi
ARGS=(--model_name_or_path "$MODEL" --data_path "$DATA" --output_dir "$OUTPUT" "${ARGS[@]}")
case "$MODE" in
  qlora) ARGS+=(--use_lora True --q_lora True) ;;
  lora) ARGS+=(--use_lora True) ;;
esac
if [[ "$WORLD" -gt 1 || -n "${DEEPSPEED:-}" ]]; then
  if [[ "$MODE" == "full" ]]; then DS_DEFAULT="$ROOT/ds_configs/zero3.json"; else DS_DEFAULT="$ROOT/ds_configs/zero2.json"; fi
  ARGS+=(--deepspeed "${DEEPSPEED:-$DS_DEFAULT}")
fi
ARGS+=("${EXTRA[@]}")

if [[ "$WORLD" -gt 1 || -n "${DEEPSPEED:-}" ]]; then
  # Through torch.distributed.run for DeepSpeed even with one process: it sets the rank variables DeepSpeed
  # needs (without them DeepSpeed looks for MPI). DeepSpeed's CPU path runs over gloo; its ops compile on
  # first use into this cache.
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
  exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m finetune.train "${ARGS[@]}"
else
  exec "$PYTHON" -m finetune.train "${ARGS[@]}"
fi
