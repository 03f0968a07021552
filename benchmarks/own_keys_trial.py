"""decode_bench.py's engine workloads with the fused step's attention choice changed in-process (NOTES step 65):
decode_attention (each row's own keys) from --min-rows rows where at least --min-skipped of the bucket's keys lie
past the rows' positions (fused_decode's OWN_KEYS_MIN_ROWS / OWN_KEYS_MIN_SKIPPED: 2 and 0.25 as shipped), its keys
split in --split-key parts (decode_kernels.decode_attention's default 256). The rest of argv goes to decode_bench.

    python benchmarks/own_keys_trial.py --min-rows 1 --min-skipped 0 -- --part engine --model-dir /tmp/m \\
        --workloads b1_512 b1_ctx2000 --out $OUT/decode_own1.json
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

from finetune.inference import decode_kernels, fused_decode  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-rows", type=int, default=fused_decode.OWN_KEYS_MIN_ROWS)
    ap.add_argument("--min-skipped", type=float, default=fused_decode.OWN_KEYS_MIN_SKIPPED)
    ap.add_argument("--split", type=int, default=256)
    args = ap.parse_args(ours)
    fused_decode.OWN_KEYS_MIN_ROWS = args.min_rows
    fused_decode.OWN_KEYS_MIN_SKIPPED = args.min_skipped
    decode_kernels.decode_attention = functools.partial(decode_kernels.decode_attention, split=args.split)
    print(f"own keys from {args.min_rows} rows, {args.min_skipped} skipped, split {args.split}", flush=True)
    return decode_bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
