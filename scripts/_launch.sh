# Shared by finetune_qlora.sh, finetune_lora.sh and finetune_full.sh (sourced; MODE is set by the caller).
set -euo pipefail
if [[ -z "${MODE:-}" ]]; then  # (run by itself, it ended in bash's "MODE: unbound variable")
  echo "error: ${BASH_SOURCE[0]} is the training scripts' shared part: run scripts/finetune_qlora.sh," \
       "finetune_lora.sh or finetune_full.sh" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CALLER="${BASH_SOURCE[1]:-$0}"
# The trainer names the script, as it was run, in its error for an unknown flag (finetune/training/arguments.py)
export QWEN_FT_SCRIPT="$CALLER"
PYTHON="${PYTHON:-python3}"
# The package is importable from a source checkout too, installed or not.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

usage() {
  # the calling script's header comment, then what all three scripts take
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$CALLER"
  cat <<EOF

  -m, --model, --model_name_or_path DIR   model dir (without one, and without a CONFIG: the built-in demo)
  -d, --data, --data_path FILE            training data (JSON, JSONL, Parquet or a datasets dir)
  -o, --output, --output_dir DIR          where the adapter (or model) is written (default output/qwen-$MODE)
  CONFIG                                  a YAML or JSON file of trainer flags, as for \`qwen-ft train CONFIG\`;
                                          it must come first among the trainer flags and replaces the script's
                                          recipe defaults; flags after it and -m/-d/-o override its values
  trainer flags                           everything else goes to the trainer: python -m finetune.train --help
                                          (the official Qwen finetune.py command lines work as they are)

Environment: MODEL DATA OUTPUT (as -m -d -o); GPUS (e.g. "0,1"; default: all visible); NPROC (CPU processes
when there is no GPU, for testing the multi-process path); DEEPSPEED (a ds_configs/*.json; default zero2,
zero3 for full, on several processes); NNODES NODE_RANK MASTER_ADDR MASTER_PORT (multi-node); PYTHON;
QWEN_FT_CACHE (where the demo model is kept). A --deepspeed trainer flag (or a CONFIG's deepspeed key)
launches through torch.distributed.run even for one process.
EOF
}

need_value() { [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }; }
# An empty -m/-d/-o (a quoted, unset shell variable) was read as none given: -m "" trained the demo model on the
# data, -o "" wrote to the default dir.
not_empty() { [[ -n "$2" ]] || { echo "error: $1 is empty (an unset shell variable?): give a path" >&2; exit 2; }; }
# set VAR (MODEL DATA OUTPUT) from FLAG VALUE: -d a.json -d b.json trained on b.json alone, -o a -o b wrote to b,
# so a second, different value is refused (the environment's MODEL DATA OUTPUT are still overridden by a flag)
declare -A GIVEN=()
take() {
  local var="$1" flag="$2" val="$3" hint="pass it once"
  # (the same path written otherwise, a then ./a or a/, is the same path)
  if [[ -n "${GIVEN[$var]:-}" && "$(realpath -m -s -- "${GIVEN[$var]}")" != "$(realpath -m -s -- "$val")" ]]; then
    [[ "$var" == DATA ]] && hint="several data files are one comma-separated list, a quoted glob or a directory"
    echo "error: $flag is given twice (${GIVEN[$var]}, then $val): $hint" >&2; exit 2
  fi
  GIVEN[$var]="$val"; printf -v "$var" '%s' "$val"
}

# the same for the environment's forms: MODEL= trained the demo model on the user's data, OUTPUT= wrote to the
# default dir (a variable that is set but empty; one that is unset means none given, as before)
for var in MODEL DATA OUTPUT DEEPSPEED; do
  if [[ -v $var && -z "${!var}" ]]; then not_empty "$var" ""; fi
done
MODEL="${MODEL:-}"; DATA="${DATA:-}"; OUTPUT="${OUTPUT:-}"
CONFIG=""; DS_FLAG=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    # The trainer's own names for model, data and output (either spelling, as the trainer takes both) act as
    # -m -d -o (an official command line passes them), so that they decide the demo and the defaults as -m -d -o do.
    # (The dashed ones went on to the trainer, after which the demo's own flags won: the demo trained silently.)
    -m|--model|--model_name_or_path|--model-name-or-path) need_value "$@"; not_empty "$@"; take MODEL "$@"; shift 2 ;;
    -d|--data|--data_path|--data-path) need_value "$@"; not_empty "$@"; take DATA "$@"; shift 2 ;;
    -o|--output|--output_dir|--output-dir) need_value "$@"; not_empty "$@"; take OUTPUT "$@"; shift 2 ;;
    --model_name_or_path=*|--model-name-or-path=*)
      not_empty "${1%%=*}" "${1#*=}"; take MODEL "${1%%=*}" "${1#*=}"; shift ;;
    --data_path=*|--data-path=*) not_empty "${1%%=*}" "${1#*=}"; take DATA "${1%%=*}" "${1#*=}"; shift ;;
    --output_dir=*|--output-dir=*) not_empty "${1%%=*}" "${1#*=}"; take OUTPUT "${1%%=*}" "${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    --deepspeed) need_value "$@"; DS_FLAG="$2"; EXTRA+=("$1" "$2"); shift 2 ;;
    --deepspeed=*) DS_FLAG="${1#*=}"; EXTRA+=("$1"); shift ;;
    *)
      if [[ ${#EXTRA[@]} -eq 0 && -z "$CONFIG" && "$1" != -* && "$1" =~ \.(ya?ml|json)$ ]]; then
        [[ -f "$1" ]] || { echo "error: config file $1: no such file" >&2; exit 2; }
        CONFIG="$1"
      else
        EXTRA+=("$1")
      fi
      shift ;;
  esac
done

if [[ -n "$CONFIG" && -z "$DS_FLAG" ]]; then
  # The launcher depends on whether DeepSpeed runs, so the config's deepspeed key is read here (the trainer
  # reports anything wrong with the file itself).
  DS_FLAG=$("$PYTHON" - "$CONFIG" <<'PY'
import sys
try:
    import yaml  # JSON is YAML too
    with open(sys.argv[1], encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    ds = cfg.get("deepspeed") if isinstance(cfg, dict) else None
    print(ds if isinstance(ds, str) else ("inline" if ds else ""))
except Exception:
    print("")
PY
)
fi

# Counts from the environment: a typo would otherwise be read by bash's arithmetic as 0 (NPROC=two: one process).
for var in NPROC NNODES NODE_RANK MASTER_PORT; do
  val="${!var:-}"
  if [[ -n "$val" && ! "$val" =~ ^[0-9]+$ ]] || [[ "$var" != NODE_RANK && "$val" == 0 ]]; then
    echo "error: $var=$val: must be a whole number$([[ "$var" != NODE_RANK ]] && echo ' >= 1')" >&2
    exit 2
  fi
done
if [[ -n "${GPUS:-}" ]]; then export CUDA_VISIBLE_DEVICES="$GPUS"; fi
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [[ "$NGPU" -eq 0 && -n "${CUDA_VISIBLE_DEVICES+set}" ]] && command -v nvidia-smi >/dev/null \
    && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  # said, not silent: the machine has GPUs and the variable hides them all (CUDA_VISIBLE_DEVICES="" or a bad id)
  echo "note: CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES}' leaves no GPU visible: training on the CPU (GPUS=0,1 or unset it to use the GPUs)" >&2
fi
NNODES="${NNODES:-1}"; NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"; MASTER_PORT="${MASTER_PORT:-29500}"
if [[ "$NGPU" -gt 0 ]]; then NPROC_PER_NODE="$NGPU"; else NPROC_PER_NODE="${NPROC:-1}"; fi
WORLD=$(( NPROC_PER_NODE * NNODES ))
if [[ "$NGPU" -eq 0 ]]; then
  # DeepSpeed (imported by accelerate whenever it is installed) otherwise probes for an accelerator and logs
  # a warning when it finds none.
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi

# Whether DeepSpeed runs, decided (and checked installed) before the demo model is made or anything launched
DS_WHY=""; DS_ADD=""
if [[ -n "$DS_FLAG" ]]; then
  DS_WHY="--deepspeed $([[ "$DS_FLAG" == inline ]] && echo "(inline)" || echo "$DS_FLAG")"
elif [[ "$WORLD" -gt 1 || -n "${DEEPSPEED:-}" ]]; then
  if [[ "$MODE" == "full" ]]; then DS_DEFAULT="$ROOT/ds_configs/zero3.json"; else DS_DEFAULT="$ROOT/ds_configs/zero2.json"; fi
  DS_FLAG="${DEEPSPEED:-$DS_DEFAULT}"
  DS_ADD=1  # (added after the recipe, below)
  if [[ -n "${DEEPSPEED:-}" ]]; then DS_WHY="DEEPSPEED=$DS_FLAG"; else DS_WHY="$WORLD processes train under DeepSpeed ($DS_FLAG)"; fi
fi
if [[ -n "$DS_FLAG" ]] && ! "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("deepspeed") is None)'; then
  # DeepSpeed is an optional extra: said once here, not by every rank after torchrun has started them
  echo "error: $DS_WHY: DeepSpeed is not installed: pip install -e \".[deepspeed]\" in the checkout (or pip install deepspeed)" >&2
  exit 2
fi

if [[ -z "$MODEL" && -z "$CONFIG" && -n "$DATA" ]]; then
  # (a forgotten -m, or a misspelled MODEL variable, trained the tiny random demo model on the user's data)
  # (named as it came: DATA set in the shell for something else read as a -d the user never typed)
  src="-d $DATA"; [[ -n "${GIVEN[DATA]:-}" ]] || src="DATA=$DATA (set in the environment)"
  echo "error: $src without -m MODEL: the built-in demo (no -m) trains a tiny random model on its own data; give -m MODEL to train a model on $DATA" >&2
  exit 2
fi

ARGS=()
TAIL=()  # model, data, output: after the trainer flags and a CONFIG, so that -m -d -o win
if [[ -z "$MODEL" && -z "$CONFIG" ]]; then
  # The built-in demo: a tiny random Qwen v1 model (Int4 for Q-LoRA), made once and cached, trained on the
  # memorise set in data/ on the CPU in a couple of minutes (one conversation a row: memorising a few short
  # chats wants many small steps, not a few packed ones).
  CACHE="${QWEN_FT_CACHE:-$HOME/.cache/qwen-finetune}"
  DATA="$ROOT/data/demo_memorize.json"
  OUTPUT="${OUTPUT:-output/demo-$MODE}"
  # The demo replaces only its own outputs (marked with .qwen-ft-demo), never a dir of anything else.
  if [[ -e "$OUTPUT" && ! -f "$OUTPUT/.qwen-ft-demo" ]] && { [[ ! -d "$OUTPUT" ]] || [[ -n "$(ls -A "$OUTPUT")" ]]; }; then
    echo "error: $OUTPUT is not a demo output (no .qwen-ft-demo in it) and the demo would replace it: pass another -o, or -m MODEL -d DATA to train a real model" >&2
    exit 2
  fi
  if [[ "$MODE" == "qlora" ]]; then MODEL="$CACHE/demo-int4"; MAKE=(--int4); else MODEL="$CACHE/demo"; MAKE=(); fi
  "$PYTHON" -m finetune.demo --make-model "$MODEL" "${MAKE[@]}"
  DEMO_NEW=""; d="$OUTPUT"; while [[ ! -e "$d" ]]; do DEMO_NEW="$d"; d="$(dirname "$d")"; done  # (made below)
  mkdir -p "$OUTPUT" && touch "$OUTPUT/.qwen-ft-demo"
  DEMO=1
  echo "demo: training $MODE on $DATA into $OUTPUT (previous demo output there is replaced)"
  ARGS+=(--num_train_epochs 60 --per_device_train_batch_size 4 --learning_rate 5e-3 --warmup_steps 0.05
         --lr_scheduler_type cosine --weight_decay 0.0
         --model_max_length 256 --logging_steps 20 --save_strategy no --report_to none --disable_tqdm True
         --overwrite_output_dir True --seed 0 --packing False)
  # (a full run refuses LoRA settings)
  if [[ "$MODE" != "full" ]]; then ARGS+=(--lora_r 16 --lora_alpha 32 --lora_dropout 0.0); fi
elif [[ -z "$CONFIG" ]]; then
  DEMO=0
  [[ -n "$DATA" ]] || { echo "error: no data: pass -d DATA (or DATA=..., or --data_path)" >&2; exit 2; }
  OUTPUT="${OUTPUT:-output/qwen-$MODE}"
  # The official Qwen recipe's defaults; any flag given after -m/-d/-o overrides them.
  ARGS+=(--num_train_epochs 5 --per_device_train_batch_size 2 --per_device_eval_batch_size 1
         --gradient_accumulation_steps 8 --learning_rate 3e-4 --weight_decay 0.1 --adam_beta2 0.95
         --warmup_steps 0.01 --lr_scheduler_type cosine --logging_steps 1 --save_strategy steps
         --save_steps 1000 --save_total_limit 10 --model_max_length 2048 --gradient_checkpointing True
         --report_to none)
  if [[ "$MODE" == "full" ]]; then ARGS+=(--learning_rate 1e-5); fi
else
  # A CONFIG is the recipe: only what the launch needs is added to it.
  DEMO=0
  ARGS+=("$CONFIG")
fi
[[ "$NGPU" -eq 0 ]] && ARGS+=(--use_cpu True)
[[ -n "$MODEL" ]] && TAIL+=(--model_name_or_path "$MODEL")
[[ -n "$DATA" ]] && TAIL+=(--data_path "$DATA")
[[ -n "$OUTPUT" ]] && TAIL+=(--output_dir "$OUTPUT")
if [[ "$MODE" == "full" && -n "$MODEL" && -f "$MODEL/config.json" ]] && "$PYTHON" -c '
import sys
from finetune.errors import ModelLoadError
from finetune.model_dir import describe  # (the one place that says whether a dir is GPTQ)
try:
    sys.exit(0 if describe(sys.argv[1]).quantized else 1)
except ModelLoadError:
    sys.exit(1)  # (a config.json it cannot read: the trainer says why)' "$MODEL"; then
  # The trainer reads an Int4 dir as Q-LoRA: this script's full recipe (lr 1e-5) trained an adapter instead, silently
  echo "error: $MODEL is a GPTQ-quantized model, which full fine-tuning cannot train (its weights are integers):" \
       "use scripts/finetune_qlora.sh for Q-LoRA on it, or pass the float model" >&2
  exit 2
fi
case "$MODE" in
  qlora) ARGS+=(--use_lora True --q_lora True) ;;
  lora) ARGS+=(--use_lora True) ;;
esac
if [[ -n "$DS_ADD" ]]; then ARGS+=(--deepspeed "$DS_FLAG"); fi
# A warmup given by the user replaces the recipe's --warmup_steps (the trainer refuses --warmup_ratio beside it)
for a in "${EXTRA[@]}"; do
  if [[ "$a" == --warmup[_-]ratio* || "$a" == --warmup[_-]steps* ]]; then
    KEPT=(); skip=0
    for x in "${ARGS[@]}"; do
      if [[ $skip -eq 1 ]]; then skip=0; elif [[ "$x" == --warmup_steps ]]; then skip=1; else KEPT+=("$x"); fi
    done
    ARGS=("${KEPT[@]}")
    break
  fi
done
# The demo's recipe saves no checkpoint (--save_strategy no): a --save_steps given to it (without a --save_strategy,
# which overrides the recipe's as any later flag does) saved nothing, silently
if [[ "$DEMO" == 1 ]]; then
  steps=0; strategy=0
  for a in "${EXTRA[@]}"; do
    [[ "$a" == --save[_-]steps* ]] && steps=1
    [[ "$a" == --save[_-]strategy* ]] && strategy=1
  done
  if [[ $steps -eq 1 && $strategy -eq 0 ]]; then
    for i in "${!ARGS[@]}"; do
      [[ "${ARGS[$i]}" == --save_strategy && "${ARGS[$((i + 1))]}" == no ]] && ARGS[$((i + 1))]=steps
    done
  fi
fi
ARGS+=("${EXTRA[@]}" "${TAIL[@]}")

if [[ "$WORLD" -gt 1 || -n "$DS_FLAG" ]]; then
  # Through torch.distributed.run (finetune/training/launch.py: torchrun that ends a failed rank in one line)
  # for DeepSpeed even with one process: it sets the rank variables DeepSpeed needs (without them DeepSpeed
  # looks for MPI and fails on mpi4py). DeepSpeed's CPU path runs over gloo; its ops compile on first use into
  # this cache.
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
  LAUNCH=("$PYTHON" -m finetune.training.launch --nnodes "$NNODES" --node_rank "$NODE_RANK"
          --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
          -m finetune.train)
else
  LAUNCH=("$PYTHON" -m finetune.train)
fi
if [[ "$DEMO" -eq 1 ]]; then
  # A run refused before it wrote anything (an unknown flag) leaves no empty demo output dir behind it
  "${LAUNCH[@]}" "${ARGS[@]}" || {
    rc=$?
    [[ -n "$DEMO_NEW" && "$(find "$DEMO_NEW" -type f)" == "$OUTPUT/.qwen-ft-demo" ]] && rm -r "$DEMO_NEW"
    exit "$rc"
  }
  # greedy decoding reproduces the memorised answers (sampling on a tiny model does not)
  exec "$PYTHON" -m finetune.demo --hint "$MODEL" "$OUTPUT" "$DATA"
fi
exec "${LAUNCH[@]}" "${ARGS[@]}"
