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
