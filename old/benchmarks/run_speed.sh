#!/usr/bin/env bash
# The project's side of the speed benchmark on the H200: one process per configuration, each appending a
# JSON line to $OUT/speed.jsonl (and benchmarks/results/speed.jsonl). SPEED_SET picks a group:
#   sweep   seq 256..8192, with and without checkpointing
#   short   2,000 chats of 100-600 tokens: padded batches vs packed rows
#   extra   fast-vs-plain correctness check and batch-1 generation
#   graphs  seq 2048 with and without CUDA graphs
#   levers  the same points with one lever off: eager elementwise ops (--no-compile), no decoding GEMV
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT" benchmarks/results
RES="$OUT/speed.jsonl"
TIMEOUT="${SPEED_TIMEOUT:-150}"
export PYTHONUNBUFFERED=1
run() {
  timeout "$TIMEOUT" python3 benchmarks/train_speed.py --out "$RES" "$@" 2>>"$OUT/speed_stderr.log" \
    || echo "{\"args\": \"$*\", \"error\": \"exit $? (timeout ${TIMEOUT}s or crash)\"}" >> "$RES"
}
for set in ${SPEED_SET:-sweep short extra}; do
  case "$set" in
    sweep)
      for seq in ${SPEED_SEQS:-256 1024 2048 4096 8192}; do run --seq "$seq" --ckpt; run --seq "$seq"; done ;;
    short)
      run --workload short --batch 1 --steps 16 --warmup 4  # padded rows change shape: compile settles first
      run --workload short --batch 4 --steps 8 --warmup 4
      run --workload short --packing --row-len 4096 --steps 6 --ckpt
      run --workload short --packing --row-len 4096 --steps 6 ;;
    extra)
      run --check --seq 1024 --check-layers 4
      run --generate --new 512 ;;
    graphs)  # CUDA-graphed steps (the default) against eager ones, same call
      run --seq 2048 --ckpt; run --seq 2048 --ckpt --no-graphs; run --seq 2048; run --seq 2048 --no-graphs ;;
    levers)
      run --seq 2048 --ckpt --no-compile
      run --seq 2048 --no-compile
      run --generate --new 512 --no-gemv ;;
  esac
done
cp "$RES" benchmarks/results/speed.jsonl 2>/dev/null || true
