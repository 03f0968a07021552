"""The small-M tensor-core GEMM (finetune/quant/mma_gemm.py) against the tensor-core GEMV (mma_gemv.py) and the
Triton GEMM, for the Qwen-14B Linear shapes at 8, 16, 32 and 64 rows: every candidate configuration, timed as
decode_bench.py times a GEMV (a CUDA graph over > 200 MiB of layer copies, so every call reads HBM), with its
relative error against the exact fp32 dequantized matmul and a repeat check (the split-K workspace is clean again).

    python benchmarks/mma_gemm_probe.py --out $OUT/mma_gemm_probe.json --pick $OUT/pick.txt --apply
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

from decode_bench import GEMV_SHAPE_SETS, copy_bandwidth, layer_copies  # noqa: E402
from mma_gemv_probe import apply_lines, repacked, time_candidate  # noqa: E402
from provenance import git_commit  # noqa: E402

from finetune.quant import mma_gemm as MG  # noqa: E402
from finetune.quant import mma_gemv as G  # noqa: E402
from finetune.quant import triton_gemv as tg  # noqa: E402
from finetune.quant.packing import dequantize_t  # noqa: E402

PER_LAYER = {"c_attn": 1, "attn.c_proj": 1, "w1/w2": 2, "mlp.c_proj": 1}  # Linears of one decoder layer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", type=int, default=[8, 16, 32, 64])
    ap.add_argument("--shapes", default="14b", choices=sorted(GEMV_SHAPE_SETS))
    ap.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--tpw", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--depth", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--per-sm", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--baselines", type=int, default=1, help="also time the GEMV (rows <= 32) and the Triton GEMM")
    ap.add_argument("--pick", help="write the CONFIGS and MIN_ROWS lines chosen from the timings to this file")
    ap.add_argument("--apply", action="store_true", help="with --pick: also write them into finetune/quant/mma_gemm.py")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    why = G.available()
    if why:
        print(f"mma_gemm unavailable: {why}")
        return 1
    copy_bps, _ = copy_bandwidth(device)
    print(f"copy {copy_bps / 1e12:.2f} TB/s", flush=True)
    results = []
    commit = git_commit() or "unknown"
    for name, (K, N) in GEMV_SHAPE_SETS[args.shapes].items():
        weight_bytes, layers = layer_copies(K, N, device)
        packed = repacked(layers)
        exact = dequantize_t(**layers[0], bits=4, dtype=torch.float32)
        for M in args.rows:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            ref = x.float() @ exact
            cands, seen = [], set()
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            for cfg in itertools.product(args.warps, args.tpw, args.depth, args.per_sm):
                launch = MG.plan(M, N // 16, K // 128, cfg, sms) + (cfg[3],)
                if launch in seen:  # the same launch as a config already listed
                    continue
                seen.add(launch)
                def fn(x, pk, cfg=cfg):
                    return MG.mma_gemm(x, pk["wpack"], pk["scales"], pk["qzeros"], pk["zero_add"], 128, pk["perm"],
                                       config=cfg)
                cands.append((f"gemm{cfg}", fn, packed))
            if args.baselines:
                if M <= G.KERNEL_ROWS:
                    def gemv(x, pk):
                        return G.mma_gemv(x, pk["wpack"], pk["scales"], pk["qzeros"], pk["zero_add"], 128, pk["perm"])
                    cands.append(("mma_gemv", gemv, packed))

                def triton(x, lay):
                    return tg.triton_gemv(x, **lay, bits=4, group_size=128, trivial_g_idx=True)
                cands.append(("triton_gemv", triton, layers))
            best = None
            for label, fn, data in cands:
                row = time_candidate(results, name, K, N, M, label, fn, data, x, ref, weight_bytes, copy_bps, commit,
                                     width=24)
                ok = row is not None and timed_right(row)
                if label.startswith("gemm") and ok and (best is None or row["us"] < best[1]):
                    best = (label, row["us"])
            if best:
                print(f"BEST {name} rows={M}: {best[0]} {best[1]:.1f} us", flush=True)
        del layers, packed
        torch.cuda.empty_cache()
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.pick:
        lines = pick(results)
        Path(args.pick).write_text(lines + "\n")
        print(lines, flush=True)
        if args.apply:
            apply_lines(ROOT / "finetune" / "quant" / "mma_gemm.py", lines)
    return 0


def timed_right(r: dict) -> bool:
    """A result row that was timed and whose output was right (the exact product within bf16 rounding, repeats
    equal)."""
    return "us" in r and r["rel_err"] < 4e-3 and r["repeat"]


def gemm_config(label: str) -> tuple:
    """The config tuple of a GEMM label: "gemm(4, 1, 2, 2)" -> (4, 1, 2, 2)."""
    return tuple(int(v) for v in label[len("gemm("):-1].split(","))


def layer_totals(results, rows: int, prefix: str) -> dict:
    """kernel label -> us for one decoder layer's Linears at ``rows`` (only labels timed, right, on all of them)."""
    totals = {}
    for r in results:
        if r.get("rows") == rows and r["kernel"].startswith(prefix) and timed_right(r):
            totals.setdefault(r["kernel"], {})[r["layer"]] = r["us"]
    return {k: sum(PER_LAYER[name] * us for name, us in v.items()) for k, v in totals.items()
            if set(v) == set(PER_LAYER)}


def pick(results) -> str:
    """The CONFIGS line (per 8-row block count, the config with the least time over one decoder layer; counts not
    timed keep mma_gemm.py's) and MIN_ROWS (17 when the GEMV beat the GEMM's best at 16 rows, 9 when it did not,
    unchanged when 16 rows were not timed)."""
    chosen, min_rows = dict(MG.CONFIGS), MG.MIN_ROWS
    for mb, rows in ((1, 8), (2, 16), (4, 32), (8, 64)):
        full = layer_totals(results, rows, "gemm")
        if not full:
            continue
        best = min(full, key=full.get)
        chosen[mb] = gemm_config(best)
        gemv = layer_totals(results, rows, "mma_gemv").get("mma_gemv")
        if rows == 16 and gemv is not None:
            min_rows = 17 if gemv < full[best] else 9
    shapes = pick_shapes(results, chosen)
    return ("CONFIGS = {" + ", ".join(f"{mb}: {cfg}" for mb, cfg in sorted(chosen.items())) + "}\n"
            "SHAPE_CONFIGS = {" + ", ".join(f"{key}: {cfg}" for key, cfg in sorted(shapes.items())) + "}\n"
            f"MIN_ROWS = {min_rows}  # GPTQLinear's threshold: fewer rows go to the GEMV (measured by "
            "benchmarks/mma_gemm_probe.py)")


def pick_shapes(results, chosen: dict, margin: float = 0.03) -> dict:
    """SHAPE_CONFIGS: (row blocks, K, N) -> the shape's fastest config, where it beats ``chosen[row blocks]`` (the
    CONFIGS entry) on that shape by more than ``margin`` (timing noise between configs is a few percent)."""
    times = {}
    for r in results:
        if r["kernel"].startswith("gemm") and timed_right(r):
            times.setdefault((MG.row_blocks(r["rows"]), r["K"], r["N"]), {})[gemm_config(r["kernel"])] = r["us"]
    out = {}
    for key, by_cfg in times.items():
        best = min(by_cfg, key=by_cfg.get)
        general = by_cfg.get(chosen.get(key[0]))
        if general is not None and by_cfg[best] < (1 - margin) * general:
            out[key] = best
    return out


if __name__ == "__main__":
    sys.exit(main())
