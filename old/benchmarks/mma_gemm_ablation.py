"""Where the small-M GEMM (finetune/quant/mma_gemm.py) waits: the kernel timed as built and with one part taken out
at a time, by editing its CUDA source here (diagnostic builds: their results are wrong on purpose, only the time
counts). NOTES step 21: the 64-row loop issues ~9 us of instructions and ~14 us of mma's per sub-partition on c_attn
against 51 us measured.

- ``as_built``: the kernel;
- ``no_weight_loads``: each warp loads its first chunk's weights once and reuses them (no global-load latency);
- ``no_x_staging``: x staged for the first two chunks only, no cp.async, wait or barrier inside the loop;
- ``no_mma``: the mma's replaced by four fp32 adds each (the loads, barrier and unpacking stay);
- ``compute_only``: no weight loads and no x staging (unpacking, shared-memory reads and mma's only).

    python benchmarks/mma_gemm_ablation.py --rows 64 --out $OUT/mma_gemm_ablation.json
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

from decode_bench import GEMV_SHAPE_SETS, layer_copies, time_gemv  # noqa: E402

from finetune.quant import mma_gemm as MG  # noqa: E402
from finetune.quant import mma_gemv as G  # noqa: E402

LOOP_LOAD_W = "        if (i + DEPTH - 1 < chunks) load_w(buf[(d + DEPTH - 1) % DEPTH], wp, sp, zp, cw, N, tile_stride);\n"
STAGE_START = "  int stage = 0, next_stage = STAGES - 1;\n"
LOOP_X = """        cp_async_wait_group<STAGES - 2>();  // this thread's copies of chunk i have landed
        __syncthreads();                    // and every thread's
        if (i + STAGES - 1 < chunks) load_x(xs + next_stage * XSTAGE, x, M, x_stride, c_begin + i + STAGES - 1);
        else cp_async_commit();
"""
MMA_ASM = """  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
"""
NO_MMA = """  d[0] += __uint_as_float(a0 ^ b0); d[1] += __uint_as_float(a1 ^ b1);
  d[2] += __uint_as_float(a2 ^ b0); d[3] += __uint_as_float(a3 ^ b1);
"""


def patched(src: str, variant: str) -> str:
    def sub(text, old, new):
        if old not in text:
            raise SystemExit(f"{variant}: the kernel source no longer has the piece this ablation edits")
        return text.replace(old, new)

    if variant in ("no_weight_loads", "compute_only"):
        src = sub(src, LOOP_LOAD_W, "")
        src = sub(src, STAGE_START, "  load_w(buf[0], wp, sp, zp, cw, N, tile_stride);\n" + STAGE_START)
    if variant in ("no_x_staging", "compute_only"):
        src = sub(src, LOOP_X, "")
        src = sub(src, "  int stage = 0,", "  cp_async_wait_group<0>();\n  __syncthreads();\n  int stage = 0,")
    if variant == "no_mma":
        src = sub(src, MMA_ASM, NO_MMA)
    return src


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", type=int, default=[64])
    ap.add_argument("--layers", nargs="+", default=["c_attn", "mlp.c_proj"])
    ap.add_argument("--config", default="4,1,1,1", help="warps,tiles a warp,depth (1: the edits assume it),per SM")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    warps, tpw, depth, per_sm = (int(v) for v in args.config.split(","))
    if depth != 1:
        raise SystemExit("the ablations edit the depth-1 loop: --config with depth 1")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    results = []
    for name in args.layers:
        K, N = GEMV_SHAPE_SETS["14b"][name]
        _, layers = layer_copies(K, N, device)
        packed = [G.repack(**lay, group_size=128) for lay in layers]
        for M in args.rows:
            mb, warps_, tpw_, depth_, ctas, splits = MG.plan(M, N // 16, K // 128, (warps, tpw, depth, per_sm), sms)
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            for variant in ("as_built", "no_weight_loads", "no_x_staging", "no_mma", "compute_only"):
                src = patched(MG.kernel_source(warps_, mb, tpw_, depth_, 128, per_sm), variant)
                kernel = G._compile(device, src, "gptq_mma_gemm")
                ws, counters = G.workspace(device, splits, M, N) if splits > 1 else (None, None)

                def fn(x, pk, kernel=kernel, ws=ws, counters=counters):
                    out = torch.empty(M, N, device=device, dtype=torch.bfloat16)
                    kernel(grid=(ctas, splits, 1), block=(warps_ * 32, 1, 1),
                           args=[pk[0], x, pk[1], pk[2], out, ws if ws is not None else out,
                                 counters if counters is not None else out, M, N, K, pk[3], x.stride(0),
                                 out, 0])  # (no bias)
                    return out
                us = time_gemv(fn, packed, x, device) * 1e6
                row = dict(layer=name, rows=M, variant=variant, us=us, config=args.config, splits=splits, ctas=ctas)
                results.append(row)
                print(json.dumps(row), flush=True)
        del layers, packed
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
