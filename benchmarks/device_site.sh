# Sourced by the device scripts: the GPU machine has no internet, so a call carries the wheels its image lacks
# (.whl from benchmarks/quick_wheels.sh, .dswheels, ...). carried_wheels installs them into a private target
# directory, without dependencies and without touching the image's packages, and puts that directory and the
# repo first on PYTHONPATH.
#   source benchmarks/device_site.sh && carried_wheels .whl /tmp/quick_site
carried_wheels() {
  local wheels="$1" site="$2"
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$wheels"/*.whl >/dev/null 2>&1; then
    echo "carried_wheels: installing $wheels/*.whl into $site failed (run: python3 -m pip install --no-index" \
         "--no-deps --target $site $wheels/*.whl)" >&2
  fi
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
}

# The 14B-shaped Int4 model dir the benchmarks use, made once a machine (/tmp/m; its log shown if it fails).
#   source benchmarks/device_site.sh && int4_model_dir
int4_model_dir() {
  [[ -f /tmp/m/config.json ]] || python3 benchmarks/make_model_dir.py --shape 14b --int4 --out /tmp/m \
    > /tmp/make_model.log 2>&1 || { tail -5 /tmp/make_model.log >&2; return 1; }
}

# That dir, linked where benchmarks/user_path.py --work /tmp/user_path looks for the model it trains.
#   source benchmarks/device_site.sh && user_path_model
user_path_model() {
  mkdir -p /tmp/user_path
  int4_model_dir || return 1
  ln -sfn /tmp/m /tmp/user_path/14b_int4
}

# What an inference trial's call starts with (run from the repo root): $OUT made (default $1), the carried .whl on
# PYTHONPATH, the model dir at /tmp/m, and $C the commit its results are named by (QWEN_FT_COMMIT, else HEAD).
#   source benchmarks/device_site.sh && inference_trial /tmp/my_out || exit 1
inference_trial() {
  OUT="${OUT:-$1}"
  mkdir -p "$OUT"
  carried_wheels .whl /tmp/quick_site
  C="${QWEN_FT_COMMIT:-$(git rev-parse --short HEAD)}"
  int4_model_dir
}

# The GPU tests ARGS (pytest's: files, -k) within TIMEOUT seconds: the whole log in $OUT/NAME_$C.log (a failure's text
# kept whole, NOTES step 84), the failures, the tests' places and the count on stdout.
#   gpu_tests NAME TIMEOUT tests/quant/test_quant_cuda.py -k mma_gemv
gpu_tests() {
  local name="$1" limit="$2"
  shift 2
  timeout "$limit" python3 -m pytest -q -m cuda "$@" -p no:cacheprovider --tb=short -W ignore 2>&1 \
    | tee "$OUT/${name}_$C.log" | grep -E "^E |^tests/|passed|failed" | head -40
}

# benchmarks/step_config_sweep.py on /tmp/m within TIMEOUT seconds: its JSON in $OUT/NAME_$C.json, its result lines
# (and errors) on stdout. Rounds: $ROUNDS (default 2); ARGS given later win (argparse keeps the last).
#   step_sweep NAME TIMEOUT --rows 1 --prompt 24 --candidates base ...
step_sweep() {
  local name="$1" limit="$2"
  shift 2
  timeout "$limit" python3 benchmarks/step_config_sweep.py --model-dir /tmp/m --out "$OUT/${name}_$C.json" \
    --rounds "${ROUNDS:-2}" "$@" 2>&1 | grep -E '^\{|Error|error' | cut -c1-300
}

# Nsight Compute over benchmarks/ncu_kernels.py ARGS (the Int4 kernels of one 14B layer) within TIMEOUT seconds:
# throughput, occupancy, scheduler, warp-state, memory and instruction sections and the warp stall ratios, as CSV in
# $OUT/NAME_$C.csv (ncu's own messages in .err), then benchmarks/ncu_summary.py's table (and its JSON beside).
#   ncu_layer NAME TIMEOUT --rows 1 64 [--shapes c_attn] [--configs 4,1,1,1 ...]
ncu_layer() {
  local name="$1" limit="$2" sections=()
  shift 2
  for s in SpeedOfLight Occupancy LaunchStats WarpStateStats SchedulerStats MemoryWorkloadAnalysis \
           ComputeWorkloadAnalysis InstructionStats SourceCounters; do sections+=(--section "$s"); done
  timeout "$limit" ncu --clock-control none -k regex:gptq_mma "${sections[@]}" \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" --csv --page details \
    python3 benchmarks/ncu_kernels.py "$@" > "$OUT/${name}_$C.csv" 2> "$OUT/${name}_$C.err"
  echo "ncu: rc $?, $(grep -c . "$OUT/${name}_$C.csv") lines"; tail -3 "$OUT/${name}_$C.err"
  python3 benchmarks/ncu_summary.py "$OUT/${name}_$C.csv" --json "$OUT/${name}_summary_$C.json" | cut -c1-300
}
