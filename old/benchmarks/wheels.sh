#!/usr/bin/env bash
# Fill .wheels/ (gitignored) with the wheels the H200 image lacks to run the
# "usual stack" side of the speed benchmark (issue 7): transformers' GPTQ
# integration with gptqmodel, torch backend.  Run on the CPU build machine
# (any Python >= 3.10, internet to PyPI).  The H200 image has Python 3.12,
# torch 2.11, transformers 5.17, peft 0.21, accelerate 1.15, numpy, triton,
# pyarrow, xxhash, safetensors, tokenizers; those are NOT downloaded.
#
# Binary wheels: pip download for cp312 / manylinux x86_64 (or py3-none-any).
# Sdist-only pure-Python packages: pip wheel --no-deps (py3-none-any).
# pypcre has no cp312 wheel: benchmarks/pcre_shim stands in for it.
# torchao: not shipped, see the note at TORCHAO below.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
W="$ROOT/.wheels"
PY="${PYTHON:-python}"
mkdir -p "$W"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

PIP_DL=("$PY" -m pip download --no-deps --python-version 3.12 --implementation cp
        --abi cp312 --abi abi3 --abi none
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux_2_28_x86_64 --platform any
        --only-binary=:all: -d "$W")

# Packages that ship wheels on PyPI (pure-Python or cp312 manylinux).
BINARY=(
  "optimum==2.3.0"
  "datasets==5.2.0"
  "dill==0.4.1"
  "multiprocess==0.70.19"
  "threadpoolctl==3.8.0"
)
FALLBACK=(
  # Fallbacks: imported at import time by datasets (pandas) and gptqmodel (PIL,
  # requests) but absent from a bare torch+transformers environment.  The notes suggest
  # the image has them; they are shipped anyway (about 20 MiB) because run_usual.sh
  # appends the install dir AFTER the image's site-packages, so an image copy always
  # wins and these are only used where the image has none.  NO_FALLBACK=1 skips them
  # (.wheels/ then about 3 MiB instead of 23 MiB).
  "pandas==3.1.1"
  "python-dateutil==4.0.0"
  "tzdata==2026.6"
  "pillow==13.0.0"
  "requests==2.34.2"
  "urllib3==2.8.0"
  "charset-normalizer==3.5.2"
  "idna==3.20"
  "certifi==2026.10.19.post1"
)
# TORCHAO: gptqmodel 7.6.0 lists torchao>=0.18.0 in requirements.txt, but every torchao
# import in its source is inside try/except (quantization/dtype.py, nn_modules/qlinear/fp4.py,
# quantization/rotation/hadamard_utils.py: NVFP4 / MX formats and Hadamard rotation only);
# optimum and the GPTQ TorchLinear path never import it, and the CPU dry run
# (usual_stack.py --tiny) loads and trains without it.  Set WITH_TORCHAO=1 to ship it anyway.
if [[ "${WITH_TORCHAO:-0}" == "1" ]]; then
  BINARY+=("torchao==0.18.0")
fi

if [[ "${NO_FALLBACK:-0}" != "1" ]]; then
  BINARY+=("${FALLBACK[@]}")
fi
for spec in "${BINARY[@]}"; do
  echo "== download $spec"
  "${PIP_DL[@]}" "$spec"
done

# Sdist-only (or sdist-preferred) pure-Python packages: build py3-none-any wheels.
SDIST=(
  "gptqmodel==7.6.0"
  "tokenicer==0.0.14"
  "logbar==0.4.15"
  "device-smi==0.5.7"
  "defuser==0.0.28"
)
for spec in "${SDIST[@]}"; do
  echo "== build $spec"
  # Try a ready wheel first (pure-Python only), else build from the sdist.
  if ! "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --platform any --implementation py --abi none -d "$W" "$spec" 2>/dev/null; then
    "$PY" -m pip download --no-deps --no-binary=:all: -d "$TMP" "$spec"
    shopt -s nullglob
    sdists=("$TMP"/*.tar.gz "$TMP"/*.zip)
    shopt -u nullglob
    [[ ${#sdists[@]} -eq 1 ]] || { echo "expected one sdist in $TMP, got: ${sdists[*]}" >&2; exit 1; }
    "$PY" -m pip wheel --no-deps -w "$W" "${sdists[0]}"
    rm -f "${sdists[0]}"
  fi
done

# Check every wheel installs on CPython 3.12 x86_64 Linux.
echo "== compatibility check"
"$PY" - "$W" <<'EOF'
import os, sys, re
bad = []
for f in sorted(os.listdir(sys.argv[1])):
    if not f.endswith(".whl"):
        continue
    parts = f[:-4].split("-")
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    ok_py = any(t in ("py3", "py312", "cp312") or (t.startswith("cp3") and abi == "abi3" and int(t[3:]) <= 12)
                for t in py.split("."))
    ok_abi = any(a in ("none", "cp312", "abi3") for a in abi.split("."))
    ok_plat = any(p == "any" or (p.endswith("x86_64") and ("manylinux" in p or p.startswith("linux")))
                  for p in plat.split("."))
    status = "ok" if (ok_py and ok_abi and ok_plat) else "INCOMPATIBLE"
    if status != "ok":
        bad.append(f)
    print(f"{status:12s} {os.path.getsize(os.path.join(sys.argv[1], f))/2**20:8.2f} MiB  {f}")
if bad:
    sys.exit(f"incompatible wheels: {bad}")
EOF
du -sh "$W"
