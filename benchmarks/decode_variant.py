"""decode_bench.py with the LoRA GEMV changed in one named way, for comparing kernel choices in one device call
without a commit for each (NOTES step 42). Every entry written to decode_bench's --out gets a "variant" field.

    python benchmarks/decode_variant.py --gather-max 0 -- --part engine --model-dir DIR --workloads b1_512_adapter \
        --out $OUT/decode_last_adds.json
    python benchmarks/decode_variant.py --poll-ns 256 -- ...

--gather-max N   mma_gemv.LORA_GATHER_MAX (0: the last producer adds the slots on every shape; 4096: the tiles add
                 them on every 14B shape at one row and r=64)
--poll-ns N      how long a tile sleeps between polls of a slot that is still empty (the kernel's 32 ns)
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.quant import mma_gemv as G  # noqa: E402

POLL = "__nanosleep(32);\n          v[j] = ld_slot("


def apply(gather_max: int | None, poll_ns: int | None) -> str:
    """Change the module as asked; the variant's name ("" for none)."""
    names = []
    if gather_max is not None:
        G.LORA_GATHER_MAX = gather_max
        names.append(f"LORA_GATHER_MAX={gather_max}")
    if poll_ns is not None:
        if G._SOURCE.count(POLL) != 1:
            raise SystemExit("decode_variant: the tiles' poll of a slot is not in mma_gemv's source any more")
        G._SOURCE = G._SOURCE.replace(POLL, POLL.replace("(32)", f"({poll_ns})"))
        names.append(f"poll {poll_ns} ns")
    return ", ".join(names)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, bench = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gather-max", type=int)
    ap.add_argument("--poll-ns", type=int)
    args = ap.parse_args(ours)
    if "--out" not in bench:
        ap.error("give decode_bench's --out after --")
    variant = apply(args.gather_max, args.poll_ns)
    sys.argv = [str(ROOT / "benchmarks" / "decode_bench.py"), *bench]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
    out = Path(bench[bench.index("--out") + 1])
    entries = json.loads(out.read_text())
    for e in entries:
        e["variant"] = variant
    out.write_text(json.dumps(entries, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
