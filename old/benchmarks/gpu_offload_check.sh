#!/usr/bin/env bash
# On the H200 (device tool), with .dswheels carried (deepspeed, datasets and what they need that the image
# lacks): the real scripts with DeepSpeed's offload configs, which need DeepSpeed's compiled CPU Adam.
# Q-LoRA + zero2_offload on the tiny Int4 demo model; LoRA + zero3_offload on the tiny float one.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_site.sh && carried_wheels .dswheels /tmp/ds_site
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext QWEN_FT_CACHE=/tmp/qft
python3 -m finetune.demo --make-model /tmp/qft/demo-int4 --int4
python3 -m finetune.demo --make-model /tmp/qft/demo
common=(--max_steps 6 --logging_steps 1 --save_strategy no --model_max_length 128 --per_device_train_batch_size 4
        --learning_rate 5e-3 --lora_r 16 --report_to none --disable_tqdm True)
run() {  # name script model config
  DEEPSPEED=ds_configs/$4.json bash scripts/$2 -m "$3" -d data/demo_memorize.json -o /tmp/o_$1 "${common[@]}" \
    > "${OUT:-/tmp}/$1.log" 2>&1
  echo "$1 rc=$?"
}
# DS_RUNS picks a subset (the offload runs compile DeepSpeed's CPU Adam first, about a minute)
RUNS="${DS_RUNS:-z2 z2off z3 z3off}"
for r in $RUNS; do
  case "$r" in
    z2) run z2 finetune_qlora.sh /tmp/qft/demo-int4 zero2 ;;
    z2off) run z2off finetune_qlora.sh /tmp/qft/demo-int4 zero2_offload ;;
    z3) run z3 finetune_lora.sh /tmp/qft/demo zero3 ;;
    z3off) run z3off finetune_lora.sh /tmp/qft/demo zero3_offload ;;
  esac
done
for r in $RUNS; do
  o=/tmp/o_$r
  echo "== $o"; python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in ('zero_stage', 'world_size', 'compute_dtype', 'dtypes')})" "$o/run_info.json"
  python3 - "$o" <<'PY'
import json, sys
h = json.load(open(sys.argv[1] + "/trainer_state.json"))["log_history"]
print("losses", [round(x["loss"], 3) for x in h if "loss" in x], "lr", [x["learning_rate"] for x in h if "learning_rate" in x])
PY
done
grep -h -iE "cpu_adam|DeepSpeedCPUAdam|Error" "${OUT:-/tmp}"/z*.log | grep -v Warning | head -8
