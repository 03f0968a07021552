"""PyTorch's built-in int4 kernel (aten._weight_int4pack_mm, weights converted from GPTQ by
finetune/quant/int4pack.py) against the project's Triton GEMV (tuned) and dequantize+matmul, for the Qwen-14B
Linear shapes at a few row counts, timed as decode_bench.py times the GEMV (a CUDA graph over > 200 MiB of layer
copies: every call reads HBM). Also the relative error of each against the exact fp32 dequantized matmul.

    python benchmarks/int4pack_probe.py --rows 1 8 32 --out $OUT/int4pack.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode_bench import GEMV_SHAPE_SETS, copy_bandwidth, int4pack_layers, layer_copies, time_gemv  # noqa: E402
from provenance import git_commit  # noqa: E402

from finetune.quant import int4pack as P  # noqa: E402
from finetune.quant import triton_gemv as tg  # noqa: E402
from finetune.quant.packing import dequantize_t  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--shapes", default="14b", choices=sorted(GEMV_SHAPE_SETS))
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    copy_bps, _ = copy_bandwidth(device)
    print(f"copy {copy_bps / 1e12:.2f} TB/s", flush=True)
    results = []
    for name, (K, N) in GEMV_SHAPE_SETS[args.shapes].items():
        weight_bytes, layers = layer_copies(K, N, device)
        packs = int4pack_layers(layers)
        exact = dequantize_t(**layers[0], bits=4, dtype=torch.float32)
        for M in args.rows:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            ref = x.float() @ exact

            def gemv(x, layer):
                return tg.triton_gemv(x, **layer, bits=4, group_size=128, trivial_g_idx=True)

            def tiny(x, pk):
                return P.int4pack_mm(x, pk["packed"], pk["sz"], 128, pk["perm"])

            for label, fn, data in (("triton_gemv", gemv, layers), ("int4pack", tiny, packs)):
                err = ((fn(x, data[0]).float() - ref).norm() / ref.norm()).item()
                sec = time_gemv(fn, data, x, device)
                row = dict(layer=name, K=K, N=N, rows=M, kernel=label, us=sec * 1e6, rel_err=err,
                           pct_copy=100 * weight_bytes / sec / copy_bps, commit=git_commit() or "unknown")
                results.append(row)
                print(f"{name:12s} rows={M:<3d} {label:12s} {sec * 1e6:7.1f} us {row['pct_copy']:5.1f}% of copy "
                      f"err {err:.2e}", flush=True)
        del layers, packs
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
