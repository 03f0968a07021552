"""decode_bench.py's engine workloads with decode_attention's cut of the keys fixed in-process: --fill N makes
every decode_attention call cut a row's keys into N parts (whole 64-key tiles, at most MAX_SPAN keys each) instead
of decode_kernels.fill_parts' choice. The rest of argv (after --) goes to decode_bench. (NOTES step 65 ran an
earlier version, --split N: fixed N-key parts, at 334d57d; the SDPA side is FINETUNE_DECODE_ATTENTION=0.)

    python benchmarks/own_keys_trial.py --fill 16 -- --part engine --model-dir /tmp/m \\
        --workloads b1_512 b1_ctx2000 --out $OUT/decode_own_fill16.json
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import decode_bench  # noqa: E402

from finetune.inference import decode_kernels  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fill", type=int, required=True, help="parts decode_attention cuts a row's keys into")
    args = ap.parse_args(ours)
    decode_kernels.decode_attention = functools.partial(decode_kernels.decode_attention, fill=args.fill)
    print(f"decode_attention with a row's keys in {args.fill} parts", flush=True)
    return decode_bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
