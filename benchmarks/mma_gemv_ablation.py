"""Where the one-row tensor-core GEMV (finetune/quant/mma_gemv.py) waits: the kernel timed as built and with one
part taken out or changed at a time, by editing its CUDA source here (diagnostic builds: their results are wrong on
purpose, only the time counts), beside a sweep of its launch configurations per Linear shape.

NOTES step 37 and session 19: a read-only twin of the GEMV's loads (lane L: 16 bytes at 32 L and at 32 L + 16 of
each 1 KiB chunk) takes ~16.3 us on c_attn, the GEMV's own time, while a twin reading the same tile ranges 16 bytes a
thread in flat order takes 11.8. The variants say which part of the GEMV holds it at the slower rate:

- ``as_built``: the kernel;
- ``full_sector``: each weight load instruction reads 512 contiguous bytes (lane L at 16 L, then 512 + 16 L), the
  read-only fast twin's pattern, with everything else as built (step 38 changed the layout and the HMMA chains
  together, and its GEMV was not faster);
- ``no_w``: the weights made from the chunk index in registers (no weight loads);
- ``no_x``: x made in registers (no x loads);
- ``no_sz``: the scales and zero words made in registers (no scale or zero loads);
- ``no_mma``: the mma's replaced by fp32 adds (loads and unpacking stay);
- ``compute_only``: no_w + no_x + no_sz (unpacking and mma's only);
- ``no_sum_mma``: without the one-row build's second mma a k-step (sum x against ones, for the zero point);
- ``compute_no_sum``: compute_only and no_sum_mma;
- ``no_unpack``: the weight words go to the mma as they are (no shifts or lop3 a word);
- ``skeleton``: compute_only with no chunks (the launch, the CTA's reduction and the write);
- ``chains2`` / ``chains4``: the k-steps' mma's of a chunk into 2 or 4 independent accumulators (even and odd
  steps, or step mod 4), added together before the scale: shorter dependent HMMA chains (fp32 order changes);
- ``compute_chains4``, ``compute_no_sum_chains4``, ``compute_no_mma``: the same with compute_only's fakes.

    python benchmarks/mma_gemv_ablation.py --out $OUT/mma_gemv_ablation.json
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

from decode_bench import GEMV_SHAPES, layer_copies, time_gemv  # noqa: E402
from mma_gemm_ablation import MMA_ASM, NO_MMA  # noqa: E402  (the same mma the GEMM's ablation replaces)
from provenance import git_commit  # noqa: E402

from finetune.quant import mma_gemv as G  # noqa: E402

# the 14B Linears at one row as the fused decode step calls them: w1 and w2 as one paired launch (side_by_side)
SHAPES = dict(GEMV_SHAPES, **{"w1+w2 paired": (5120, 2 * 13696)})
VARIANTS = ("as_built", "full_sector", "no_w", "no_x", "no_sz", "no_mma", "compute_only", "no_sum_mma", "compute_no_sum",
            "no_unpack", "skeleton", "chains2", "chains4", "compute_chains4", "compute_no_sum_chains4",
            "compute_no_mma")

W_START = "p.w = wpack + ((size_t)tile * C + c0) * 64 + lane * 2;"
W_LOADS = "  b.w[0] = ld_stream(p.w);\n  b.w[1] = ld_stream(p.w + 1);\n"
SZ_LOADS = "  b.s0 = s[0];\n  b.s1 = s[8];\n  b.z0 = z[0];\n  b.z1 = z[1];\n"
X_LOAD = "for (int i = 0; i < 4; ++i) b.xv[mb][i] = ld_cached(xp + i);"
# register stand-ins that change every chunk (p.c), so the compiler cannot hoist the work out of the loop
FAKE_W = ("  b.w[0] = U4{(u32)p.c * 0x9E3779B9u, (u32)p.c ^ 0x5A5A5A5Au, (u32)p.c + 0x01234567u, (u32)p.c * 7u};\n"
          "  b.w[1] = U4{(u32)p.c * 0x85EBCA6Bu, (u32)p.c ^ 0xA5A5A5A5u, (u32)p.c + 0x76543210u, (u32)p.c * 13u};\n")
FAKE_SZ = ("  b.s0 = (u16)(0x2000 + (p.c & 255));\n  b.s1 = (u16)(0x2100 + (p.c & 255));\n"
           "  b.z0 = p.c * 0x01010101;\n  b.z1 = p.c * 0x02020202;\n")
SUM_MMA = "      mma(sx[mb], ones, ones, ones, ones, b0, b1);\n"
UNPACK = "    u32 a0 = nibbles(wj, magic), a1 = nibbles(wj >> 4, magic);\n    u32 a2 = nibbles(wj >> 8, magic), a3 = nibbles(wj >> 12, magic);\n"
MINE = "  const int mine = c_end"
TMP_DECL = "  float tmp[MB][4];\n"
SX_DECL = "  float sx[MB][4];\n"
MMA_TMP = "      mma(tmp[mb], a0, a1, a2, a3, b0, b1);\n"
SCALE_START = "  const float sc0 = h2f(b.s0), sc1 = h2f(b.s1);\n"


def chains(src: str, n: int, sub) -> str:
    """The chunk's mma's into n accumulator sets by k-step (j % n), summed before the scale."""
    src = sub(src, TMP_DECL, f"  float tmpc[{n}][MB][4] = {{}};\n  float (&tmp)[MB][4] = tmpc[0];\n")
    src = sub(src, SX_DECL, f"  float sxc[{n}][MB][4] = {{}};\n  float (&sx)[MB][4] = sxc[0];\n")
    src = sub(src, MMA_TMP, f"      mma(tmpc[j % {n}][mb], a0, a1, a2, a3, b0, b1);\n")
    src = sub(src, SUM_MMA, f"      mma(sxc[j % {n}][mb], ones, ones, ones, ones, b0, b1);\n")
    fold = (f"#pragma unroll\n  for (int c = 1; c < {n}; ++c)\n#pragma unroll\n    for (int mb = 0; mb < MB; ++mb)\n"
            "#pragma unroll\n      for (int i = 0; i < 4; ++i) { tmp[mb][i] += tmpc[c][mb][i]; sx[mb][i] += sxc[c][mb][i]; }\n")
    return sub(src, SCALE_START, fold + SCALE_START)
FAKE_X = "for (int i = 0; i < 4; ++i) b.xv[mb][i] = U4{(u32)p.c * 0x3F80u, (u32)i, 0x3F803F80u, (u32)mb + (u32)p.c};"


def patched(src: str, variant: str) -> str:
    def sub(text, old, new):
        if old not in text:
            raise SystemExit(f"{variant}: the kernel source no longer has the piece this ablation edits")
        return text.replace(old, new)

    if variant == "full_sector":
        src = sub(src, W_START, W_START.replace("lane * 2", "lane"))
        src = sub(src, W_LOADS, "  b.w[0] = ld_stream(p.w);\n  b.w[1] = ld_stream(p.w + 32);\n")
    fake_all = variant.startswith("compute") or variant == "skeleton"
    if variant == "no_w" or fake_all:
        src = sub(src, W_LOADS, FAKE_W)
    if variant == "no_sz" or fake_all:
        src = sub(src, SZ_LOADS, FAKE_SZ)
    if variant == "no_x" or fake_all:
        src = sub(src, X_LOAD, FAKE_X)
    if variant in ("chains2", "chains4", "compute_chains4", "compute_no_sum_chains4"):
        src = chains(src, 2 if variant == "chains2" else 4, sub)
    if variant in ("no_sum_mma", "compute_no_sum", "compute_no_sum_chains4"):
        src = sub(src, SUM_MMA if "chains" not in variant else
                  "      mma(sxc[j % 4][mb], ones, ones, ones, ones, b0, b1);\n", "")
    if variant == "no_unpack":
        src = sub(src, UNPACK, "    u32 a0 = wj, a1 = wj ^ magic, a2 = wj + magic, a3 = wj ^ 0x00F000F0u;\n")
    if variant == "skeleton":
        src = sub(src, MINE, "  const int mine = 0 * c_end")
    if variant in ("no_mma", "compute_no_mma"):
        src = sub(src, MMA_ASM, NO_MMA)
    return src


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--ablate", nargs="+", default=["8,1,2", "4,1,4"],
                    help="configs (warps,depth,per_sm) the variants are timed at")
    ap.add_argument("--sweep", nargs="+", default=[f"{w},{d},{s}" for w in (4, 8) for d in (1, 2) for s in (2, 4, 8)],
                    help="configs the kernel as built is timed at (per shape: which is fastest)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    why = G.available()
    if why:
        raise SystemExit(f"mma_gemv unavailable: {why}")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    commit = git_commit()
    results = []
    M = 1
    for name in args.shapes:
        K, N = SHAPES[name]
        weight_bytes, layers = layer_copies(K, N, device)
        packed = [G.repack(**lay, group_size=128) for lay in layers]
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        jobs = [(c, "as_built") for c in args.sweep] + [(c, v) for c in args.ablate for v in args.variants
                                                        if not (v == "as_built" and c in args.sweep)]
        for config, variant in jobs:
            warps, depth, per_sm = (int(v) for v in config.split(","))
            src = patched(G.kernel_source(warps, 1, depth, 128), variant)
            kernel = G._compile(device, src, "gptq_mma_gemv")
            T, C = N // 16, K // 128
            splits = G.split_count(C, T, warps, per_sm, sms)
            ws, counters = G.workspace(device, splits, M, N) if splits > 1 else (None, None)

            def fn(x, pk, kernel=kernel, ws=ws, counters=counters, splits=splits, warps=warps):
                out = torch.empty(M, N, device=device, dtype=torch.bfloat16)
                kernel(grid=(T, splits, 1), block=(warps * 32, 1, 1),
                       args=G.kernel_args(x, pk[0], pk[1], pk[2], pk[3], out, ws, counters, None, None))
                return out

            us = time_gemv(fn, packed, x, device) * 1e6
            row = dict(layer=name, K=K, N=N, rows=M, config=config, variant=variant, us=round(us, 2),
                       weight_bytes=weight_bytes, tb_s=round(weight_bytes / us / 1e6, 3), splits=splits,
                       commit=commit)
            results.append(row)
            print(json.dumps(row), flush=True)
        del layers, packed
        torch.cuda.empty_cache()
    best = {}
    for r in results:
        if r["variant"] == "as_built" and (r["layer"] not in best or r["us"] < best[r["layer"]]["us"]):
            best[r["layer"]] = r
    for name, r in best.items():
        print(f"best as built, {name}: {r['config']} {r['us']} us ({r['tb_s']} TB/s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
