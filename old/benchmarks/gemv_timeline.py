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

from decode_bench import GEMV_SHAPES, copy_bandwidth, layer_copies  # noqa: E402
from provenance import git_commit  # noqa: E402

from finetune.quant import mma_gemv as G  # noqa: E402

STAMP = r"""
__device__ __forceinline__ unsigned long long gtime() {
  unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t;
}
__device__ __forceinline__ unsigned sm_id() { unsigned s; asm volatile("mov.u32 %0, %%smid;" : "=r"(s)); return s; }
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
  if (acc == 0x9E3779B9u) sink[0] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    tl[3 * blockIdx.x] = t0;
    tl[3 * blockIdx.x + 1] = gtime();
    tl[3 * blockIdx.x + 2] = sm_id();
  }
}
"""


# The same bytes read as a copy kernel would: every thread 16 bytes at a time, grid-stride over the whole weight
# (4 loads in flight a thread), CTAs enough for the SMs: what one kernel's read of those bytes can take.
FLAT = G.HELPERS + STAMP + r"""
extern "C" __global__ void __launch_bounds__(256)
read_flat(const U4* __restrict__ w, long long n, unsigned* sink, unsigned long long* tl) {
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
  if (acc == 0x9E3779B9u) sink[0] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    tl[3 * blockIdx.x] = t0;
    tl[3 * blockIdx.x + 1] = gtime();
    tl[3 * blockIdx.x + 2] = sm_id();
  }
}
"""


def stamped_gemv_source(warps: int, depth: int) -> str:
    """mma_gemv's one-row-block kernel with a timeline argument: thread 0 writes (start, all warps' chunks done, SM)."""
    src = G.kernel_source(warps, 1, depth, 128)
    src = src.replace("const u16* __restrict__ bias, int has_bias) {",
                      "const u16* __restrict__ bias, int has_bias, unsigned long long* tl) {\n"
                      "  const unsigned long long t_start = gtime();", 1)
    marker = "  __syncthreads();\n  if (warp != 0) return;"
    assert marker in src, "the kernel's end-of-loop barrier moved: update stamped_gemv_source"
    src = src.replace(marker, "  __syncthreads();\n  if (threadIdx.x == 0) {\n"
                              "    const int cta = blockIdx.y * gridDim.x + blockIdx.x;\n"
                              "    tl[3 * cta] = t_start; tl[3 * cta + 1] = gtime(); tl[3 * cta + 2] = sm_id();\n  }\n"
                              "  if (warp != 0) return;", 1)
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


def run(fn_calls, device) -> float:
    """Seconds a call over a graph of the given calls (best of 3 replays)."""
    for f in fn_calls:
        f()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fn_calls:
            f()
    best = float("inf")
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize(device)
        best = min(best, a.elapsed_time(b) / 1e3 / len(fn_calls))
    return best


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
        variants = []
        warps, depth, per_sm = G.CONFIGS[1]
        splits = max(1, min(C // warps if C >= warps else 1, -(-per_sm * sms // T)))
        gemv = torch.cuda._compile_kernel(stamped_gemv_source(warps, depth), "gptq_mma_gemv",
                                          nvcc_options=["-std=c++17"])
        ws, counters = G.workspace(device, splits, 1, N)
        tls = [torch.zeros(T * splits * 3, dtype=torch.int64, device=device) for _ in packs]
        out = torch.empty(1, N, device=device, dtype=torch.bfloat16)

        def gemv_call(pk, tl):
            return lambda: gemv(grid=(T, splits, 1), block=(warps * 32, 1, 1),
                                args=[pk[0], x, pk[1], pk[2], out, ws, counters, 1, N, K, pk[3], x.stride(0),
                                      out, out, out, 0, out, 0, tl])
        variants.append((f"gemv{(warps, depth, per_sm)} splits {splits}", [gemv_call(pk, tl) for pk, tl in zip(packs, tls)],
                         tls))
        chained = torch.cuda._compile_kernel(two_chains(stamped_gemv_source(warps, depth)), "gptq_mma_gemv",
                                             nvcc_options=["-std=c++17"])
        ctls = [torch.zeros(T * splits * 3, dtype=torch.int64, device=device) for _ in packs]

        def chained_call(pk, tl):
            return lambda: chained(grid=(T, splits, 1), block=(warps * 32, 1, 1),
                                   args=[pk[0], x, pk[1], pk[2], out, ws, counters, 1, N, K, pk[3], x.stride(0),
                                         out, out, out, 0, out, 0, tl])
        variants.append(("gemv, two HMMA chains", [chained_call(pk, tl) for pk, tl in zip(packs, ctls)], ctls))
        for w, inflight in ((warps, 1), (warps, 4), (4, 1), (4, 4)):
            src = READ.replace("__WARPS__", str(w)).replace("__INFLIGHT__", str(inflight))
            k = torch.cuda._compile_kernel(src, "read_like_gemv", nvcc_options=["-std=c++17"])
            rtls = [torch.zeros(T * 3, dtype=torch.int64, device=device) for _ in packs]

            def read_call(pk, tl, k=k, w=w):
                return lambda: k(grid=(T, 1, 1), block=(w * 32, 1, 1), args=[pk[0], C, sink, tl])
            variants.append((f"read {w} warps, {inflight} in flight", [read_call(pk, tl) for pk, tl in zip(packs, rtls)],
                             rtls))
        flat = torch.cuda._compile_kernel(FLAT, "read_flat", nvcc_options=["-std=c++17"])
        for per_sm in (4, 8):
            ftls = [torch.zeros(sms * per_sm * 3, dtype=torch.int64, device=device) for _ in packs]

            def flat_call(pk, tl, per_sm=per_sm):
                return lambda: flat(grid=(sms * per_sm, 1, 1), block=(256, 1, 1),
                                    args=[pk[0], pk[0].numel() // 4, sink, tl])
            variants.append((f"read flat, {per_sm} CTAs an SM", [flat_call(pk, tl) for pk, tl in zip(packs, ftls)],
                             ftls))
        for label, calls, tl_list in variants:
            sec = run(calls, device)
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
