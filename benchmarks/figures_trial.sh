#!/usr/bin/env bash
# One device call for the README's decode and serving figures at this code, and the engine's memory plan with
# adapters (NOTES "Where it stands after session 41", calls 1-2). From the repo root on the GPU machine, .whl
# carried. Parts (each 1 by default; 0 skips):
#   BENCH: decode_bench's four README workloads in one process (b1_512, b1_ctx2000, b1_512_adapter, b64_mixed: its
#          rows_in_first_step says how many rows the memory plan let join at once);
#   ADAPTERS: decode_bench's b64_mixed_adapters in a process of its own (three r=64 adapters and the base, 64 rows:
#          the plan must count the adapters' copies, or an 80 GB card runs out of memory);
#   SERVE: serve_bench with its defaults (1, 8 and 32 streams; since session 43 `qwen-ft serve` in its own process);
#   THREAD: the same with --server thread (the server in a thread beside the client, as every figure before);
#   LOG: serve_bench at $LOG_STREAMS streams (default 1; comma-separated) with the engine's log of each round's
#        submits, prefills and captures.
#   STAGGER: serve_bench --stagger 100 at 8 streams (each request joins a decoding batch alone) with prompts of
#        $STAGGER_TOKENS tokens (default 500), here and, where $OLD holds a tree (`git archive <rev> finetune
#        benchmarks | tar -x -C ab_old`), on that tree's package with this serve_bench, in alternating server
#        processes, $STAGGER_ROUNDS times (default 2).
#   QWEN_FT_COMMIT=<rev> [BENCH=0 ADAPTERS=0 SERVE=0 THREAD=0 LOG=0 STAGGER=0] [LOG_STREAMS=1,8,32] [OLD=ab_old] \
#     [STAGGER_TOKENS=1500 STAGGER_ROUNDS=1] \
#     bash benchmarks/figures_trial.sh
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
source benchmarks/device_site.sh && inference_trial /tmp/figures_out || exit 1
[[ "${BENCH:-1}" == 0 ]] || timeout 240 python3 benchmarks/decode_bench.py --part engine --model-dir /tmp/m \
  --workloads b1_512 b1_ctx2000 b1_512_adapter b64_mixed --out "$OUT/decode_$C.json" 2>&1 | grep "^{" | cut -c1-400
[[ "${ADAPTERS:-1}" == 0 ]] || timeout 150 python3 benchmarks/decode_bench.py --part engine --model-dir /tmp/m \
  --workloads b64_mixed_adapters --out "$OUT/decode_adapters_$C.json" 2>&1 | grep -E "^\{|Error" | cut -c1-400
[[ "${SERVE:-1}" == 0 ]] || timeout 180 python3 benchmarks/serve_bench.py --model-dir /tmp/m \
  --out "$OUT/serve_$C.json" 2>&1 | grep "^{" | cut -c1-400
[[ "${THREAD:-1}" == 0 ]] || timeout 120 python3 benchmarks/serve_bench.py --model-dir /tmp/m --server thread \
  --out "$OUT/serve_thread_$C.json" 2>&1 | grep "^{" | cut -c1-400
[[ "${LOG:-1}" == 0 ]] || timeout 90 python3 benchmarks/serve_bench.py --model-dir /tmp/m --streams "${LOG_STREAMS:-1}" \
  --engine-log --out "$OUT/serve_log_$C.json" 2>&1 | grep "^{" | cut -c1-400
if [[ "${STAGGER:-1}" == 1 ]]; then
  old="${OLD:-ab_old}"
  [[ -d $old/benchmarks ]] && cp benchmarks/serve_bench.py "$old/benchmarks/"
  for r in $(seq "${STAGGER_ROUNDS:-2}"); do
    for v in old new; do
      d=.; [[ $v == old ]] && d="$old"
      [[ -d $d/benchmarks ]] || { [[ $r == 1 ]] && echo "no tree at $d: STAGGER skipped for $v"; continue; }
      timeout 120 python3 "$d/benchmarks/serve_bench.py" --model-dir /tmp/m --streams 8 --stagger 100 \
        --prompt-tokens "${STAGGER_TOKENS:-500}" --out "$OUT/serve_stagger${STAGGER_TOKENS:-500}_${v}${r}_$C.json" \
        2>&1 | grep "^{" | cut -c1-400 | sed "s/^/$v$r /"
    done
  done
fi
