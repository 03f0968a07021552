"""decode_bench.py's engine workloads with decode_attention's cut of the keys fixed in-process: --split N makes
every decode_attention call cut the keys into N-key parts instead of decode_kernels.key_split's choice. The rest of
argv (after --) goes to decode_bench. (NOTES step 65 ran it at 334d57d, session 30's --fill at a058090; the SDPA side
is FINETUNE_DECODE_ATTENTION=0.)

    python benchmarks/own_keys_trial.py --split 128 -- --part engine --model-dir /tmp/m \\
        --workloads b1_512 b1_ctx2000 --out $OUT/decode_own_split128.json
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
    ap.add_argument("--split", type=int, required=True, help="keys a decode_attention program reads")
    args = ap.parse_args(ours)
    decode_kernels.decode_attention = functools.partial(decode_kernels.decode_attention, split=args.split)
    print(f"decode_attention in {args.split}-key splits", flush=True)
    return decode_bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
