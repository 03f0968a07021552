#!/usr/bin/env bash
# One GPU call (~7-8 minutes on an H200) that re-measures the user-facing figures after a change: the decode
# workloads (decode_bench.py), where a decode step's time goes (decode_profile.py), serving through the HTTP
# server (serve_bench.py) and the training script's default path on short chats (user_path.py), all on one
# 14B-shaped random Int4 dir. Run from the repo root with .whl carried (benchmarks/quick_wheels.sh fills it);
# set QWEN_FT_COMMIT (the machine's copy of .git may be stale). Every part has its own time limit and writes
# under $OUT as it finishes, so a part that runs long costs only itself.
#
#   QUICK_PARTS="decode profile serve train" QUICK_DECODE="b1_512 b1_512_adapter b64_mixed b1_ctx2000" \
#     bash benchmarks/run_quick_all.sh
#   QUICK_PARTS="train step_profile" QUICK_TRAIN="rows2048_ckpt=5 rows2048_zero2=5" QUICK_T_TRAIN=400 \
#     bash benchmarks/run_quick_all.sh
#   QUICK_PARTS="harness train" QUICK_TRAIN="rows2048_ckpt=8" bash benchmarks/run_quick_all.sh   # trainer vs harness
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/quick_out}"
mkdir -p "$OUT"
source benchmarks/device_site.sh && carried_wheels .whl /tmp/quick_site
MODEL=/tmp/decode_bench/14b_int4
python3 benchmarks/make_model_dir.py --shape 14b --int4 --out "$MODEL" > "$OUT/make_model.log" 2>&1
read -r -a parts <<< "${QUICK_PARTS:-decode profile serve train}"
for part in "${parts[@]}"; do
  t0=$(date +%s)
  case "$part" in
    decode)
      read -r -a w <<< "${QUICK_DECODE:-b1_512 b1_512_adapter b64_mixed b1_ctx2000}"
      timeout "${QUICK_T_DECODE:-200}" python3 benchmarks/decode_bench.py --part engine --model-dir "$MODEL" \
        --workloads "${w[@]}" --out "$OUT/decode.json" > "$OUT/decode.log" 2>&1 ;;
    profile)
      timeout "${QUICK_T_PROFILE:-90}" python3 benchmarks/decode_profile.py --model-dir "$MODEL" --rows 1 32 \
        --out "$OUT/decode_profile.json" > "$OUT/profile.log" 2>&1 ;;
    serve)
      timeout "${QUICK_T_SERVE:-120}" python3 benchmarks/serve_bench.py --model-dir "$MODEL" \
        --out "$OUT/serve.json" > "$OUT/serve.log" 2>&1 ;;
    train)
      # QUICK_TRAIN: user_path.py workloads as NAME=STEPS (default short_default=4)
      read -r -a tw <<< "${QUICK_TRAIN:-short_default=4}"
      mkdir -p /tmp/user_path && ln -sfn "$MODEL" /tmp/user_path/14b_int4
      timeout "${QUICK_T_TRAIN:-150}" python3 benchmarks/user_path.py --work /tmp/user_path \
        --workloads "${tw[@]%%=*}" --steps "${tw[@]}" --out "$OUT/user_path.json" > "$OUT/train.log" 2>&1 ;;
    harness)
      # the step harness on the trainer's own 2048-token rows (same data, packing, order): with the train part's
      # rows2048_ckpt in the same call, the trainer-against-harness comparison of issue 15
      timeout "${QUICK_T_HARNESS:-240}" python3 benchmarks/train_speed.py --seq 2048 --ckpt \
        --packed-rows chats:400:680:1 --packed-layout documents --tokenizer "$MODEL" --accum 16 --warmup 32 \
        --steps 96 --out "$OUT/same_rows.jsonl" > "$OUT/harness.log" 2>&1 ;;
    step_profile)
      # GPU time of one checkpointed 2048-token Q-LoRA step (8 of the 14B model's layers) by kind of kernel
      timeout "${QUICK_T_STEP_PROFILE:-120}" python3 benchmarks/profile_step.py --seq 2048 --ckpt --layers 8 \
        --json "$OUT/step_profile.json" > "$OUT/step_profile.log" 2>&1 ;;
    *) echo "unknown part $part (decode, profile, serve, train, harness, step_profile)"; continue ;;
  esac
  echo "$part rc=$? $(( $(date +%s) - t0 )) s"
done
