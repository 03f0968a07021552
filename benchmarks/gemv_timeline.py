"""Where the one-row GEMV's time goes, without a profiler: each CTA of the tensor-core GEMV (finetune/quant/mma_gemv.py)
records the global timer when it starts and when its warps have finished their chunks, for every call of a CUDA graph
of back-to-back calls on different layer copies (as decoding runs them); beside it, kernels that only read the same
weights with the same grid and the same chunk order, one chunk a warp in flight (as the GEMV's depth 1) and four, so
the memory side is timed apart from the arithmetic. Per kernel: its time (events over the graph), the span of its
CTAs, how long the CTAs take to be dispatched, a CTA's mean lifetime, and the gap between one call's last CTA and the
next call's first.

    python benchmarks/gemv_timeline.py --out $OUT/gemv_timeline.json
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

from decode_bench import GEMV_SHAPES, copy_bandwidth, layer_copies, time_gemv  # noqa: E402
from provenance import git_commit  # noqa: E402

from finetune.quant import mma_gemv as G  # noqa: E402

STAMP = r"""
__device__ __forceinline__ unsigned long long gtime() {
  unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t;
}
__device__ __forceinline__ unsigned sm_id() { unsigned s; asm volatile("mov.u32 %0, %%smid;" : "=r"(s)); return s; }
// a read-only kernel's end: its folded word kept (stored only if it has an unlikely value), then thread 0 records the
// CTA's start, its end (every thread done) and its SM
__device__ __forceinline__ void stamp_end(unsigned long long* tl, unsigned long long t0, unsigned acc, unsigned* sink) {
  if (acc == 0x9E3779B9u) sink[0] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    tl[3 * blockIdx.x] = t0;
    tl[3 * blockIdx.x + 1] = gtime();
    tl[3 * blockIdx.x + 2] = sm_id();
  }
}
"""

# Reads a tile's chunks as the GEMV does (warp w: chunks w, w + WARPS, ...; each lane its 32 bytes), with INFLIGHT
# chunks' loads issued before any is used, and folds them into one word so that nothing is optimised away.
READ = G.HELPERS + STAMP + r"""
#define WARPS __WARPS__
#define INFLIGHT __INFLIGHT__
extern "C" __global__ void __launch_bounds__(WARPS * 32)
read_like_gemv(const U4* __restrict__ wpack, int C, unsigned* sink, unsigned long long* tl) {
  const unsigned long long t0 = gtime();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const U4* p = wpack + ((size_t)blockIdx.x * C + warp) * 64 + lane * 2;
  unsigned acc = 0;
  for (int c = warp; c < C; c += WARPS * INFLIGHT) {
    U4 v[INFLIGHT][2];
#pragma unroll
    for (int i = 0; i < INFLIGHT; ++i)
      if (c + i * WARPS < C) {
        v[i][0] = ld_stream(p + (size_t)i * WARPS * 64);
        v[i][1] = ld_stream(p + (size_t)i * WARPS * 64 + 1);
      } else {
        v[i][0] = v[i][1] = U4{0u, 0u, 0u, 0u};
      }
#pragma unroll
    for (int i = 0; i < INFLIGHT; ++i) acc ^= v[i][0].x ^ v[i][0].y ^ v[i][0].z ^ v[i][0].w ^ v[i][1].x ^ v[i][1].w;
    p += (size_t)WARPS * INFLIGHT * 64;
  }
  stamp_end(tl, t0, acc, sink);
}
"""


# The same bytes read as a copy kernel would: every thread 16 bytes at a time, grid-stride over the whole weight
# (4 loads in flight a thread), CTAs enough for the SMs: what one kernel's read of those bytes can take.
FLAT = G.HELPERS + STAMP + r"""
extern "C" __global__ void __launch_bounds__(256)
read_flat(const U4* __restrict__ w, int n, unsigned* sink, unsigned long long* tl) {  // (int: torch passes ints as C int)
  const unsigned long long t0 = gtime();
  const long long stride = (long long)gridDim.x * blockDim.x;
  unsigned acc = 0;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += 4 * stride) {
    U4 v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = i + k * stride < n ? ld_stream(w + i + k * stride) : U4{0u, 0u, 0u, 0u};
#pragma unroll
    for (int k = 0; k < 4; ++k) acc ^= v[k].x ^ v[k].w;
  }
  stamp_end(tl, t0, acc, sink);
}
"""


# Two more read-only twins, to tell apart what separates the GEMV's grid from the flat read (NOTES, "where it stands
# after session 18"): RANGE, each CTA reads its own tile's contiguous range (as the GEMV's CTAs) but in the flat read's
# order (thread t: 16 bytes at 16 t, then 16 t + 4 KiB, ...); PERSIST, one wave of CTAs (CTAs an SM x SMs) each
# taking tiles i, i + G, ... in turn, reading each range as the GEMV's warps do (lane L: 32 bytes at 32 L a chunk).
RANGE = G.HELPERS + STAMP + r"""
extern "C" __global__ void __launch_bounds__(256)
read_range(const U4* __restrict__ wpack, int C, unsigned* sink, unsigned long long* tl) {
  const unsigned long long t0 = gtime();
  const U4* base = wpack + (size_t)blockIdx.x * C * 64;  // the tile's C chunks: C * 64 U4
  const int n = C * 64;
  unsigned acc = 0;
  for (int i = threadIdx.x; i < n; i += 4 * 256) {
    U4 v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = i + k * 256 < n ? ld_stream(base + i + k * 256) : U4{0u, 0u, 0u, 0u};
#pragma unroll
    for (int k = 0; k < 4; ++k) acc ^= v[k].x ^ v[k].w;
  }
  stamp_end(tl, t0, acc, sink);
}
"""
PERSIST = G.HELPERS + STAMP + r"""
#define WARPS 8
extern "C" __global__ void __launch_bounds__(WARPS * 32)
read_persistent(const U4* __restrict__ wpack, int C, int T, unsigned* sink, unsigned long long* tl) {
  const unsigned long long t0 = gtime();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned acc = 0;
  for (int tile = blockIdx.x; tile < T; tile += gridDim.x) {
    const U4* p = wpack + ((size_t)tile * C + warp) * 64 + lane * 2;
    for (int c = warp; c < C; c += WARPS) {
      const U4 a = ld_stream(p), b = ld_stream(p + 1);
      acc ^= a.x ^ a.w ^ b.x ^ b.w;
      p += WARPS * 64;
    }
  }
  stamp_end(tl, t0, acc, sink);
}
"""


def stamped_gemv_source(warps: int, depth: int) -> str:
    """mma_gemv's one-row-block kernel with a timeline argument: thread 0 writes (start, all warps' chunks done, SM)."""
    src = G.kernel_source(warps, 1, depth, 128)
    src = src.replace("const u16* __restrict__ bias, int has_bias) {",
                      "const u16* __restrict__ bias, int has_bias, unsigned long long* tl) {\n"
                      "  const unsigned long long t_start = gtime();", 1)
    marker = "red[warp][mb * 4 + i][lane] = acc[mb][i];\n  __syncthreads();\n"  # every warp's chunks are done
    assert src.count(marker) == 1, "the kernel's end-of-loop barrier moved: update stamped_gemv_source"
    src = src.replace(marker, marker + "  if (threadIdx.x == 0) {\n"
                                       "    const int cta = blockIdx.y * gridDim.x + blockIdx.x;\n"
                                       "    tl[3 * cta] = t_start; tl[3 * cta + 1] = gtime(); tl[3 * cta + 2] = sm_id();\n"
                                       "  }\n", 1)
    return src.replace('extern "C"', STAMP + 'extern "C"', 1)


def two_chains(src: str) -> str:
    """The GEMV source with each chunk's eight HMMA's into two accumulators (even and odd k16 steps) instead of one
    chain, added before the scale: half the dependent chain a chunk, if the HMMA latency is what binds (not bit-equal:
    the fp32 sums are added in another order)."""
    swaps = [("  float tmp[MB][4];", "  float tmp[MB][4], tmp2[MB][4];"),
             ("  float sx[MB][4];", "  float sx[MB][4], sx2[MB][4];"),
             ("      tmp[mb][i] = 0.f;", "      tmp[mb][i] = tmp2[mb][i] = 0.f;"),
             ("      sx[mb][i] = 0.f;", "      sx[mb][i] = sx2[mb][i] = 0.f;"),
             ("      mma(tmp[mb], a0,", "      mma((j & 1) ? tmp2[mb] : tmp[mb], a0,"),
             ("      mma(sx[mb], ones,", "      mma((j & 1) ? sx2[mb] : sx[mb], ones,"),
             ("  const float sc0 = h2f(b.s0), sc1 = h2f(b.s1);",
              "#pragma unroll\n  for (int mb = 0; mb < MB; ++mb)\n#pragma unroll\n    for (int i = 0; i < 4; ++i) {\n"
              "      tmp[mb][i] += tmp2[mb][i];\n#if ZERO_BY_SUM\n      sx[mb][i] += sx2[mb][i];\n#endif\n    }\n"
              "  const float sc0 = h2f(b.s0), sc1 = h2f(b.s1);")]
    for a, b in swaps:
        assert src.count(a) == 1, f"two_chains: {a!r} not found once in the kernel source"
        src = src.replace(a, b)
    return src


def summarise(tls: list[torch.Tensor]) -> dict:
    """Timeline statistics over the calls of one graph (the first call left out: it follows the graph's start)."""
    rows = []
    prev_end = None
    for tl in tls:
        t = tl.view(-1, 3).cpu().to(torch.float64)
        start, end = t[:, 0], t[:, 1]
        sms = t[:, 2].long()
        per_sm = torch.bincount(sms, minlength=int(sms.max()) + 1)
        rows.append(dict(span_us=(end.max() - start.min()).item() / 1e3,
                         dispatch_us=(start.max() - start.min()).item() / 1e3,
                         cta_us=(end - start).mean().item() / 1e3,
                         first_end_us=(end.min() - start.min()).item() / 1e3,
                         gap_before_us=None if prev_end is None else (start.min().item() - prev_end) / 1e3,
                         ctas_per_sm_max=int(per_sm.max()), ctas_per_sm_min=int(per_sm[per_sm > 0].min())))
        prev_end = end.max().item()
    keep = rows[1:]
    return {k: sum(r[k] for r in keep) / len(keep) for k in keep[0] if keep[0][k] is not None} | {"calls": rows}


def timed_kernel(label: str, kernel, grid: tuple, block: int, args, ctas: int, packs: list, words: int = 3) -> tuple:
    """(label, one call per layer copy, their timeline buffers) for a stamped kernel: ``args(pack)`` gives the
    arguments before the timeline buffer, which holds ``words`` words for each of ``ctas`` CTAs."""
    tls = [torch.zeros(ctas * words, dtype=torch.int64, device=pk[0].device) for pk in packs]
    calls = [lambda pk=pk, tl=tl: kernel(grid=grid, block=(block, 1, 1), args=args(pk) + [tl])
             for pk, tl in zip(packs, tls)]
    return label, calls, tls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["c_attn", "attn.c_proj", "mlp.c_proj"])
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    copy_bps, _ = copy_bandwidth(device)
    print(f"copy {copy_bps / 1e12:.2f} TB/s", flush=True)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    results = []
    sink = torch.zeros(1, dtype=torch.int32, device=device)
    for name in args.shapes:
        K, N = GEMV_SHAPES[name]
        weight_bytes, layers = layer_copies(K, N, device)
        packs = [G.repack(**lay, group_size=128) for lay in layers]
        T, C = packs[0][0].shape[:2]
        x = torch.randn(1, K, device=device, dtype=torch.bfloat16)
        warps, depth, per_sm = G.CONFIGS[1]
        splits = G.split_count(C, T, warps, per_sm, sms)
        ws, counters = G.workspace(device, splits, 1, N)
        out = torch.empty(1, N, device=device, dtype=torch.bfloat16)

        def gemv_args(pk):  # mma_gemv's arguments: one row, no LoRA, no bias
            return G.kernel_args(x, pk[0], pk[1], pk[2], pk[3], out, ws, counters)
        gemv_grid = (T, splits, 1)
        variants = [
            timed_kernel(f"gemv{(warps, depth, per_sm)} splits {splits}",
                         G._compile(device, stamped_gemv_source(warps, depth)), gemv_grid, warps * 32, gemv_args,
                         T * splits, packs),
            timed_kernel("gemv, two HMMA chains", G._compile(device, two_chains(stamped_gemv_source(warps, depth))),
                         gemv_grid, warps * 32, gemv_args, T * splits, packs)]
        for w, inflight in ((warps, 1), (warps, 4), (4, 1), (4, 4)):
            src = READ.replace("__WARPS__", str(w)).replace("__INFLIGHT__", str(inflight))
            variants.append(timed_kernel(f"read {w} warps, {inflight} in flight",
                                         G._compile(device, src, "read_like_gemv"), (T, 1, 1), w * 32,
                                         lambda pk: [pk[0], C, sink], T, packs))
        flat = G._compile(device, FLAT, "read_flat")
        for flat_per_sm in (4, 8):
            variants.append(timed_kernel(f"read flat, {flat_per_sm} CTAs an SM", flat, (sms * flat_per_sm, 1, 1), 256,
                                         lambda pk: [pk[0], pk[0].numel() // 4, sink], sms * flat_per_sm, packs))
        variants.append(timed_kernel("read each tile's range, flat order", G._compile(device, RANGE, "read_range"),
                                     (T, 1, 1), 256, lambda pk: [pk[0], C, sink], T, packs))
        persist = G._compile(device, PERSIST, "read_persistent")
        for persist_per_sm in (2, 4):
            grid = min(T, sms * persist_per_sm)
            variants.append(timed_kernel(f"read persistent, {persist_per_sm} CTAs an SM", persist, (grid, 1, 1), 256,
                                         lambda pk: [pk[0], C, T, sink], grid, packs))
        for label, calls, tl_list in variants:
            sec = time_gemv(lambda _, call: call(), calls, None, device)  # (a graph of the calls, as the probes)
            stats = summarise(tl_list)
            row = dict(layer=name, K=K, N=N, kernel=label, us=sec * 1e6, pct_copy=100 * weight_bytes / sec / copy_bps,
                       commit=git_commit() or "unknown", **{k: v for k, v in stats.items() if k != "calls"},
                       calls=stats["calls"])
            results.append(row)
            print(f"{name:12s} {label:34s} {sec * 1e6:6.1f} us {row['pct_copy']:5.1f}% | span {row['span_us']:5.1f} "
                  f"dispatch {row['dispatch_us']:5.1f} cta {row['cta_us']:5.1f} first end {row['first_end_us']:5.1f} "
                  f"gap {row.get('gap_before_us', float('nan')):5.1f} us, CTAs an SM {row['ctas_per_sm_min']}-"
                  f"{row['ctas_per_sm_max']}", flush=True)
        del layers, packs
        torch.cuda.empty_cache()
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
