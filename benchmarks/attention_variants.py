"""Copies of finetune/inference/decode_kernels.py with the decode attention's split kernel launched or written
another way, for decode_attention_probe.py --variant (NOTES step 76). Writes them into DIR and prints the probe's
--variant arguments, one NAME=FILE a line; a variant whose edit no longer applies stops with the line it looked for.

    python3 benchmarks/attention_variants.py /tmp/attn_variants
"""

from __future__ import annotations

import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "finetune" / "inference" / "decode_kernels.py"

LAUNCH = "D=D, BLOCK_D=block_d, BLOCK_N=64, num_warps=4)"
K_LOAD = "        k = tl.load(k_ptr + tile, mask=kmask, other=0.0).to(tl.float32)\n"
V_LOAD = "        v = tl.load(v_ptr + tile, mask=kmask, other=0.0).to(tl.float32)\n"

# name -> [(text, replacement)]: each text must occur exactly once in the source
VARIANTS = {
    "w8": [(LAUNCH, "D=D, BLOCK_D=block_d, BLOCK_N=64, num_warps=8)")],  # twice the warps for the same tile
    "bn128w8": [(LAUNCH, "D=D, BLOCK_D=block_d, BLOCK_N=128, num_warps=8)")],  # a 128-key split in one iteration
    "vfirst": [(V_LOAD, ""), (K_LOAD, K_LOAD + V_LOAD)],  # V's load issued with K's, before the scores
    "bn128w8_vfirst": [(LAUNCH, "D=D, BLOCK_D=block_d, BLOCK_N=128, num_warps=8)"), (V_LOAD, ""),
                       (K_LOAD, K_LOAD + V_LOAD)],
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    text = SOURCE.read_text()
    for name, edits in VARIANTS.items():
        patched = text
        for old, new in edits:
            if patched.count(old) != 1:
                print(f"attention_variants: {name}: {old.strip()!r} is not in {SOURCE} exactly once", file=sys.stderr)
                return 1
            patched = patched.replace(old, new)
        path = out / f"decode_kernels_{name}.py"
        path.write_text(patched)
        print(f"{name}={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
