"""Where the tensor-core GEMV's LoRA build spends its extra time at one row (NOTES step 39): on the H200 a LoRA Linear
took ~5 us more than the plain kernel, and neither a parallel final reduce of the producers nor one L2 round trip
fewer in the tiles' wait changed that. Each CTA of the LoRA build records the global timer:

  producers (the first P CTAs): start, thread 0's loads of A consumed, the arrival counter read, end (the last one:
                                h written)
  tiles:                        start, thread 0's chunks done, h read (split 0), the CTA's warps summed

beside the plain kernel, the LoRA build with the wait taken out (its tiles read h whatever it holds: timing only),
and the LoRA build given h computed before it (no producers; every tile copies h with bt and sel before its main
loop, so nothing is left for after it: the engine's norm kernel computes x A for c_attn, w1 and w2, NOTES step 43),
each in a CUDA graph of back-to-back calls over layer copies (A and B per copy too), as the probes time
them.
Per kernel: its time, when h is written after the kernel's first CTA starts, when the tiles' chunks are done (first,
mean, last), and how long the tiles of split 0 wait for h.

    python benchmarks/lora_gemv_timeline.py --out $OUT/lora_gemv_timeline.json
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
from gemv_timeline import STAMP, stamped_gemv_source, timed_kernel  # noqa: E402
from provenance import git_commit  # noqa: E402

from finetune.quant import mma_gemv as G  # noqa: E402

WORDS = 5  # a CTA's record: start, mark 1, mark 2, end, SM


def _patch(src: str, old: str, new: str) -> str:
    assert src.count(old) == 1, f"lora_gemv_timeline: {old[:70]!r} not found once in the LoRA build's source"
    return src.replace(old, new)


def stamped_lora_source(warps: int, depth: int, wait: bool = True) -> str:
    """The one-row-block LoRA build with a timeline argument (WORDS words a CTA, thread 0 writes them); ``wait``
    False: the tiles read h without polling for it (wrong values, the same work otherwise). Launched without
    producers, it is the build given h (copied when a tile starts, left as it is)."""
    src = G.kernel_source(warps, 1, depth, 128, lora=True)
    src = _patch(src, "const u16* __restrict__ bias, int has_bias) {",
                 "const u16* __restrict__ bias, int has_bias, unsigned long long* tl) {\n"
                 "  const unsigned long long t_start = gtime();\n"
                 "  unsigned long long t_main = 0, t_h = 0;")
    # producers
    src = _patch(src, "int M, int K, int R, float* __restrict__ lws, u16* __restrict__ lh, int* lcnt,\n"
                      "                             float* part) {",
                 "int M, int K, int R, float* __restrict__ lws, u16* __restrict__ lh, int* lcnt,\n"
                 "                             float* part, unsigned long long* tl, unsigned long long t_start) {\n"
                 "  unsigned long long t_loaded = 0, t_counted = 0;")
    src = _patch(src, "    }\n#pragma unroll\n    for (int mm = 0; mm < LROWS; ++mm) {\n",
                 "    }\n    if (m0 == 0) t_loaded = gtime();\n#pragma unroll\n    for (int mm = 0; mm < LROWS; ++mm) {\n")
    src = _patch(src, "  __syncthreads();\n  if (!last) return;\n  if (tid == 0) lcnt[0] = 0;",
                 "  __syncthreads();\n  t_counted = gtime();\n"
                 "  if (!last) {\n    if (tid == 0) stamp5(tl, t_start, t_loaded, t_counted, t_counted);\n    return;\n  }\n"
                 "  if (tid == 0) lcnt[0] = 0;")
    src = _patch(src, "      lh[i] = h_value(s);\n    }\n  }\n}\n",
                 "      lh[i] = h_value(s);\n    }\n  }\n  __syncthreads();\n"
                 "  if (tid == 0) stamp5(tl, t_start, t_loaded, t_counted, gtime());\n}\n")
    src = _patch(src, "lora_produce(blockIdx.x, P, lx, lx_stride, la, M, K, R, lws, lh, lcnt, l_part);",
                 "lora_produce(blockIdx.x, P, lx, lx_stride, la, M, K, R, lws, lh, lcnt, l_part, tl, t_start);")
    # tiles
    src = _patch(src, "#if LORA\n  int readers = 0;", "  t_main = t_h = gtime();\n#if LORA\n  int readers = 0;")
    src = _patch(src, "    cp_async_wait_all();  // this thread's copies of bt and sel (and h, given); the barrier makes "
                      "every thread's visible\n    __syncthreads();\n",
                 "    cp_async_wait_all();  // this thread's copies of bt and sel (and h, given); the barrier makes "
                 "every thread's visible\n    __syncthreads();\n    t_h = gtime();\n")
    src = _patch(src, "    for (int i = 0; i < 4; ++i) red[warp][mb * 4 + i][lane] = acc[mb][i];\n  __syncthreads();\n",
                 "    for (int i = 0; i < 4; ++i) red[warp][mb * 4 + i][lane] = acc[mb][i];\n  __syncthreads();\n"
                 "  if (threadIdx.x == 0) stamp5(tl, t_start, t_main, t_h, gtime());\n")
    if not wait:
        src = _patch(src, "      while (has_empty(v.x) || has_empty(v.y) || has_empty(v.z) || has_empty(v.w)) {",
                     "      while (false) {")
    stamp5 = (STAMP + "__device__ __forceinline__ void stamp5(unsigned long long* tl, unsigned long long a, "
              "unsigned long long b, unsigned long long c, unsigned long long d) {\n"
              "  unsigned long long* r = tl + 5 * blockIdx.x;\n  r[0] = a; r[1] = b; r[2] = c; r[3] = d; r[4] = sm_id();\n}\n")
    return src.replace("#define LRMAX", stamp5 + "#define LRMAX", 1)


def summarise_lora(tls: list[torch.Tensor], producers: int) -> dict:
    """Per call (the first left out: it follows the graph's start), in us from the call's first CTA start: when the
    last producer wrote h, the producers' loads done (mean), the tiles' chunks done (first, mean, last), the tiles'
    wait for h (mean, max; split 0, every tile at one row), and the span."""
    rows = []
    for tl in tls[1:]:
        t = tl.view(-1, WORDS).cpu().to(torch.float64)
        t0 = t[:, 0].min()
        rel = (t[:, :4] - t0) / 1e3
        prod, tiles = rel[:producers], rel[producers:]
        wait = tiles[:, 2] - tiles[:, 1]
        def of_producers(col: int, stat: str) -> float:  # nan without producers (h was ready before the call)
            return getattr(prod[:, col], stat)().item() if producers else float("nan")

        rows.append(dict(h_written_us=of_producers(3, "max"), producer_loaded_us=of_producers(1, "mean"),
                         producer_counted_us=of_producers(2, "max"),
                         tiles_chunks_first_us=tiles[:, 1].min().item(), tiles_chunks_mean_us=tiles[:, 1].mean().item(),
                         tiles_chunks_last_us=tiles[:, 1].max().item(), wait_mean_us=wait.mean().item(),
                         wait_max_us=wait.max().item(), tiles_waiting_over_1us=int((wait > 1.0).sum()),
                         span_us=rel[:, 3].max().item()))
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["c_attn", "attn.c_proj", "mlp.c_proj"])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    R = args.rank
    results = []
    for name in args.shapes:
        K, N = GEMV_SHAPES[name]
        _, layers = layer_copies(K, N, device)
        packs = [G.repack(**lay, group_size=128) for lay in layers]
        gen = torch.Generator(device=device).manual_seed(0)
        lora = [((torch.randn(K, R, device=device, generator=gen) * K ** -0.5).to(torch.bfloat16),
                 (torch.randn(N, R, device=device, generator=gen) * 0.05).to(torch.bfloat16)) for _ in packs]
        packs = [pk + lo for pk, lo in zip(packs, lora)]  # (wpack, scales, qzeros, zero_add, perm, a, bt)
        T, C = packs[0][0].shape[:2]
        x = torch.randn(1, K, device=device, dtype=torch.bfloat16)
        sel = torch.ones(1, R, device=device, dtype=torch.bfloat16)
        warps, depth, per_sm = G.CONFIGS[1]
        splits = G.split_count(C, T, warps, per_sm, sms)
        P = G.lora_producers(K, R)
        ws, counters = G.workspace(device, splits, 1, N)
        lws = torch.zeros(P * R, device=device, dtype=torch.float32)
        lh = torch.full((R,), G.H_EMPTY - 0x10000, device=device, dtype=torch.int16).view(torch.bfloat16)
        lcnt = torch.zeros(2, device=device, dtype=torch.int32)
        out = torch.empty(1, N, device=device, dtype=torch.bfloat16)

        def plain_args(pk):
            return G.kernel_args(x, pk[0], pk[1], pk[2], pk[3], out, ws, counters)

        def lora_args(pk, producers=P):  # (0: h given; lh holds x A of the first copy, written before)
            return G.kernel_args(x, pk[0], pk[1], pk[2], pk[3], out, ws, counters,
                                 (x, pk[5], sel, pk[6], producers, lws, lh, lcnt))

        variants = [
            ("plain", timed_kernel("plain", G._compile(device, stamped_gemv_source(warps, depth)), (T, splits, 1),
                                   warps * 32, plain_args, T * splits, packs), None),
            ("lora", timed_kernel("lora", G._compile(device, stamped_lora_source(warps, depth)),
                                  (P + T * splits, 1, 1), warps * 32, lora_args, P + T * splits, packs, WORDS), P),
            ("lora, no wait", timed_kernel("lora, no wait", G._compile(device, stamped_lora_source(warps, depth, False)),
                                           (P + T * splits, 1, 1), warps * 32, lora_args, P + T * splits, packs,
                                           WORDS), P),
            ("lora, h given", timed_kernel("lora, h given", G._compile(device, stamped_lora_source(warps, depth)),
                                           (T * splits, 1, 1), warps * 32, lambda pk: lora_args(pk, 0),
                                           T * splits, packs, WORDS), 0)]
        for label, (_, calls, tl_list), producers in variants:
            if producers == 0:
                lh.copy_((x.float() @ packs[0][5].float()).to(torch.bfloat16).view(-1))
            sec = time_gemv(lambda _, call: call(), calls, None, device)
            row = dict(layer=name, K=K, N=N, rank=R, producers=P, splits=splits, kernel=label, us=sec * 1e6,
                       commit=git_commit() or "unknown")
            if producers is not None:
                row.update(summarise_lora(tl_list, producers))
                lh.view(torch.int16).fill_(G.H_EMPTY - 0x10000)  # after the no-wait build's races
                lcnt.zero_()
            results.append(row)
            extra = "" if producers is None else (
                (f" | h written {row['h_written_us']:5.1f} us (loads {row['producer_loaded_us']:4.1f}, counted "
                 f"{row['producer_counted_us']:4.1f})" if producers else " | h given")
                + f", tiles' chunks done {row['tiles_chunks_first_us']:4.1f} / "
                f"{row['tiles_chunks_mean_us']:4.1f} / {row['tiles_chunks_last_us']:4.1f}, wait mean "
                f"{row['wait_mean_us']:4.2f} max {row['wait_max_us']:4.2f} (>1 us: {row['tiles_waiting_over_1us']:.0f})")
            print(f"{name:12s} {label:14s} {sec * 1e6:6.1f} us{extra}", flush=True)
        del layers, packs, lora
        torch.cuda.empty_cache()
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
