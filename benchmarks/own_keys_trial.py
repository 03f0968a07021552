"""decode_bench.py's engine workloads with decode_attention's key split fixed in-process (NOTES step 65):
--split N makes every decode_attention call split its keys in N-key parts instead of decode_kernels.key_split's
choice. The rest of argv (after --) goes to decode_bench. (Step 65 ran this at 334d57d, where one-row steps still
went through SDPA unless fused_decode's thresholds were patched; the SDPA side is now FINETUNE_DECODE_ATTENTION=0.)

    python benchmarks/own_keys_trial.py --split 64 -- --part engine --model-dir /tmp/m \\
        --workloads b1_512 b1_ctx2000 --out $OUT/decode_own64.json
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
    print(f"decode_attention with {args.split}-key splits", flush=True)
    return decode_bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
