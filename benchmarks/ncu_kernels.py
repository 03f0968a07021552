"""The Int4 kernels of one 14B decoder layer, each launched twice, for Nsight Compute to read its counters: the
tensor-core GEMV (mma_gemv) at 1 row and the small-M GEMM (mma_gemm) at 32 and 64 rows, on c_attn, attn.c_proj,
w1/w2's pair (one launch of 27,392 outputs, as the fused step makes it) and mlp.c_proj, each with its shipped config.
The first launch compiles (NVRTC) and warms up; profile the second (ncu's --launch-skip, or every launch: they are
alike). Nothing here times anything: ncu replays each profiled kernel with the caches flushed.

    ncu --clock-control none -k regex:gptq_mma --section SpeedOfLight --section WarpStateStats ... \
        python3 benchmarks/ncu_kernels.py --rows 1 64 [--shapes c_attn] [--configs 4,1,1,1 4,1,1,1,2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode_bench import GEMV_SHAPES, random_layer  # noqa: E402

from finetune.quant import mma_gemm, mma_gemv  # noqa: E402

PAIR = ("w1/w2 pair", (5120, 27392))  # w1 and w2 side by side: one launch in the fused step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--shapes", nargs="+", help="names among c_attn, attn.c_proj, mlp.c_proj, w1/w2 pair (default all)")
    ap.add_argument("--configs", nargs="+", default=[None], type=lambda v: tuple(map(int, v.split(","))),
                    help="launch configs to run each shape with, comma-separated (default: the shipped ones)")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    shapes = [(n, s) for n, s in GEMV_SHAPES.items() if n != "w1/w2"] + [PAIR]
    if args.shapes:
        if unknown := set(args.shapes) - {n for n, _ in shapes}:
            raise SystemExit(f"--shapes: unknown {sorted(unknown)}; the shapes are {[n for n, _ in shapes]}")
        shapes = [(n, s) for n, s in shapes if n in args.shapes]
    for name, (K, N) in shapes:
        wpack, scales, qzeros, zero_add, perm = mma_gemv.repack(**random_layer(K, N, device), group_size=128)
        for rows in args.rows:
            x = torch.randn(rows, K, device=device, dtype=torch.bfloat16)
            gemv = rows <= mma_gemv.KERNEL_ROWS and rows < mma_gemm.MIN_ROWS
            for config in args.configs:
                for _ in range(2):
                    if gemv:
                        out = mma_gemv.mma_gemv(x, wpack, scales, qzeros, zero_add, 128, perm, config=config)
                    else:
                        out = mma_gemm.mma_gemm(x, wpack, scales, qzeros, zero_add, 128, perm, config=config)
                torch.cuda.synchronize()
                if out is None:
                    raise SystemExit(f"{name} at {rows} rows: the kernel did not run")
                shown = config or (mma_gemv if gemv else mma_gemm).config_for(rows, K, N)
                print(f"{name} K={K} N={N} rows={rows} config={shown}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
