"""The tensor-core Int4 GEMV (finetune/quant/mma_gemv.py) against PyTorch's int4 kernel and the Triton GEMV, for
the Qwen-14B Linear shapes: each launch configuration of the new kernel, timed as decode_bench.py times a GEMV
(a CUDA graph over > 200 MiB of layer copies, so every call reads HBM), with its relative error against the exact
fp32 dequantized matmul. Prints the best configuration per (shape, rows).

    python benchmarks/mma_gemv_probe.py --rows 1 2 4 8 16 32 --out $OUT/mma_gemv_probe.json
"""

from __future__ import annotations

import argparse
import itertools
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
from finetune.quant import mma_gemv as G  # noqa: E402
from finetune.quant import triton_gemv as tg  # noqa: E402
from finetune.quant.packing import dequantize_t  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--shapes", default="14b", choices=sorted(GEMV_SHAPE_SETS))
    ap.add_argument("--warps", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--depth", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--per-sm", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--extra", nargs="*", default=[], help="more configs to time, each warps,depth,per_sm")
    ap.add_argument("--pick", help="write the CONFIGS line (by 8-row blocks: the fastest config over one layer's five "
                                   "Linears at 1, 16 and 32 rows) to this file")
    ap.add_argument("--apply", action="store_true",
                    help="with --pick: also write those two lines into finetune/quant/mma_gemv.py")
    ap.add_argument("--baselines", type=int, default=1, help="also time int4pack (rows <= 8) and the Triton GEMV")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    why = G.available()
    if why:
        print(f"mma_gemv unavailable: {why}")
        return 1
    copy_bps, _ = copy_bandwidth(device)
    print(f"copy {copy_bps / 1e12:.2f} TB/s", flush=True)
    results = []
    commit = git_commit() or "unknown"
    for name, (K, N) in GEMV_SHAPE_SETS[args.shapes].items():
        weight_bytes, layers = layer_copies(K, N, device)
        mma = repacked(layers)
        packs = int4pack_layers(layers) if args.baselines else None
        exact = dequantize_t(**layers[0], bits=4, dtype=torch.float32)
        for M in args.rows:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            ref = x.float() @ exact
            cands = []
            configs = list(itertools.product(args.warps, args.depth, args.per_sm))
            configs += [tuple(int(v) for v in e.split(",")) for e in args.extra]
            for cfg in configs:

                def fn(x, pk, cfg=cfg):
                    return G.mma_gemv(x, pk["wpack"], pk["scales"], pk["qzeros"], pk["zero_add"], 128, pk["perm"],
                                      config=cfg)
                cands.append((f"mma{cfg}", fn, mma))
            if packs is not None:
                def tiny(x, pk):
                    return P.int4pack_mm(x, pk["packed"], pk["sz"], 128, pk["perm"])

                def gemv(x, lay):
                    return tg.triton_gemv(x, **lay, bits=4, group_size=128, trivial_g_idx=True)
                if M <= 8:
                    cands.append(("int4pack", tiny, packs))
                cands.append(("triton_gemv", gemv, layers))
            best = None
            for label, fn, data in cands:
                row = time_candidate(results, name, K, N, M, label, fn, data, x, ref, weight_bytes, copy_bps, commit)
                if row and label.startswith("mma") and (best is None or row["us"] < best[1]):
                    best = (label, row["us"])
            if best:
                print(f"BEST {name} rows={M}: {best[0]} {best[1]:.1f} us", flush=True)
        del layers, mma, packs
        torch.cuda.empty_cache()
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.pick:
        lines = pick(results)
        Path(args.pick).write_text(lines + "\n")
        print(lines, flush=True)
        if args.apply:
            apply_lines(ROOT / "finetune" / "quant" / "mma_gemv.py", lines)
    return 0


def repacked(layers) -> list[dict]:
    """Each layer copy repacked for the tensor-core kernels, as the keyword arguments after x."""
    return [dict(zip(("wpack", "scales", "qzeros", "zero_add", "perm"), G.repack(**lay, group_size=128)))
            for lay in layers]


def time_candidate(results, name, K, N, M, label, fn, data, x, ref, weight_bytes, copy_bps, commit, width=20):
    """One kernel on one shape: its relative error against ``ref``, whether a second call gives the same bits (the
    split-K workspace must be clean after every call) and its time (``time_gemv``); the row is appended to
    ``results`` and printed, and returned (None, with an error row, when it does not compile or launch)."""
    device = x.device
    try:
        y = fn(x, data[0])
        err = ((y.float() - ref).norm() / ref.norm()).item()
        repeat = torch.equal(y, fn(x, data[0]))
        sec = time_gemv(fn, data, x, device)
    except Exception as e:  # a config that does not compile or launch: reported, not fatal
        print(f"{name:12s} rows={M:<3d} {label:{width}s} failed: {str(e).splitlines()[0][:300]}", flush=True)
        results.append(dict(layer=name, K=K, N=N, rows=M, kernel=label, error=str(e)[:2000]))
        return None
    row = dict(layer=name, K=K, N=N, rows=M, kernel=label, us=sec * 1e6, rel_err=err, repeat=repeat,
               pct_copy=100 * weight_bytes / sec / copy_bps, commit=commit)
    results.append(row)
    print(f"{name:12s} rows={M:<3d} {label:{width}s} {sec * 1e6:7.1f} us {row['pct_copy']:5.1f}% of copy "
          f"err {err:.2e} repeat {repeat}", flush=True)
    return row


def apply_lines(src: Path, lines: str) -> None:
    """Replace each ``NAME = ...`` statement of ``src`` (with the lines a bracket it opens carries on to) by the line
    of ``lines`` that assigns the same NAME."""
    def opened(t: str) -> int:  # brackets a line opens, less those it closes
        return sum(t.count(c) for c in "{([") - sum(t.count(c) for c in "})]")

    text = src.read_text().splitlines()
    for line in lines.splitlines():
        key = line.split(" = ")[0] + " = "
        out, depth = [], 0
        for t in text:
            if depth > 0:  # a continuation line of the statement replaced
                depth += opened(t)
                continue
            if t.startswith(key):
                out.append(line)
                depth = opened(t)
            else:
                out.append(t)
        text = out
    src.write_text("\n".join(text) + "\n")


def pick(results) -> str:
    """The CONFIGS and MAX_ROWS lines of finetune/quant/mma_gemv.py from timed results: per 8-row block count, the
    config with the least time over one decoder layer's Linears (c_attn, attn.c_proj, w1, w2, mlp.c_proj); and the
    largest of 8, 16, 32 rows up to which the best config beats the Triton GEMV where that was timed."""
    per_layer = {"c_attn": 1, "attn.c_proj": 1, "w1/w2": 2, "mlp.c_proj": 1}

    def layer_totals(rows, prefix):
        totals = {}
        for r in results:
            if r.get("rows") == rows and r["kernel"].startswith(prefix) and "us" in r:
                totals.setdefault(r["kernel"], {})[r["layer"]] = r["us"]
        return {k: sum(per_layer[name] * us for name, us in v.items()) for k, v in totals.items()
                if set(v) == set(per_layer)}

    chosen, max_rows = {}, 8
    for mb, rows in ((1, 1), (2, 16), (4, 32)):
        full = layer_totals(rows, "mma")
        if not full:
            continue
        best = min(full, key=full.get)
        chosen[mb] = best[3:]
        triton = layer_totals(rows, "triton_gemv").get("triton_gemv")
        if rows > 8 and max_rows == rows // 2 and (triton is None or full[best] < triton):
            max_rows = rows
    return ("CONFIGS = {" + ", ".join(f"{mb}: {cfg}" for mb, cfg in chosen.items()) + "}  # by row_blocks()\n"
            f"MAX_ROWS = {max_rows}  # GPTQLinear's limit for this kernel (measured against the Triton GEMV)")


if __name__ == "__main__":
    sys.exit(main())
