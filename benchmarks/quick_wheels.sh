#!/usr/bin/env bash
# Fill .whl/ (gitignored) with the wheels the H200 image lacks for benchmarks/run_quick_all.sh and
# run_user_path.sh: datasets (training data), the server's stack (fastapi, uvicorn and what they import) and the
# openai client that serve_bench.py drives, llguidance (qwen-ft serve requires it: constrained replies; a
# manylinux_2_31 wheel, which the image takes), deepspeed (the ZeRO-2 workload of run_user_path.sh), each at the
# version installed here (pip install -e ".[dev]"), for the image's Python 3.12. Run on the build machine (internet
# to PyPI), then carry .whl in the device call.
#   bash benchmarks/quick_wheels.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUTDIR="${WHL_DIR:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$OUTDIR"
# openai 3.x needs httpx2/httpcore2/truststore, fastapi 0.16x opentelemetry-api and annotated-doc; anyio and
# pydantic need a newer typing_extensions than the image's
PKGS=(datasets dill multiprocess fastapi starlette uvicorn h11 click pydantic pydantic-core annotated-types
      typing-inspection annotated-doc opentelemetry-api anyio sniffio idna certifi openai httpx httpcore httpx2
      httpcore2 truststore distro jiter typing-extensions llguidance prometheus-client
      hjson msgpack py-cpuinfo einops ninja)  # the last five: what deepspeed imports that the image lacks
specs=()
for p in "${PKGS[@]}"; do
  v="$("$PY" -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p')"
  if [[ -z "$v" ]]; then echo "$p is not installed here: pip install -e \".[dev]\" first" >&2; exit 1; fi
  specs+=("$p==$v")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_31_x86_64 --platform any \
  -d "$OUTDIR" "${specs[@]}"
# deepspeed is published as source only: built here into a pure-Python wheel (its ops compile on first use, as
# they do from a pip install); DS_BUILD_OPS=0 keeps the build from compiling anything
v="$("$PY" -m pip show deepspeed 2>/dev/null | sed -n 's/^Version: //p')"
if [[ -n "$v" ]] && ! ls "$OUTDIR"/deepspeed-"$v"-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUTDIR" "deepspeed==$v"
fi
ls "$OUTDIR"
