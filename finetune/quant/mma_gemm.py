"""GPTQ Int4 small-M GEMM on tensor cores for 9-64 rows (batched decoding, serving): x staged in shared memory.

Why a second kernel: the GEMV of ``mma_gemv.py`` gives each warp one 16-column tile and a share of K, and every
lane loads its own x fragments from global memory. At one row that is 64 bytes of x per 1 KiB of weights; at 32
rows it is 8 KiB of x per 1 KiB of weights, read through L2 by every tile: 1.3 GB a decoder layer of the 14B
model against 158 MB of weights, and 32 rows took 265 us a layer, as long as Triton's GEMM (benchmarks/NOTES.md,
step 13). Here a CTA's warps take different tiles of the same K range instead: each 128-input chunk of x (all the
rows) is copied once per CTA into shared memory (cp.async, three stages, one barrier a chunk) and every warp reads
its mma's B fragments from there, so x crosses L2 once per CTA (WARPS x TPW tiles) instead of once per tile.
On an H200 that took one 14B layer from 265 to 182 us at 32 rows, and 64 rows to 280 us (Triton: 288); the time
still grows by ~0.5 us a row on the largest Linear, and neither L2 nor shared-memory bandwidth was what bound it
(NOTES step 21 lists what was tried).

Everything else is the GEMV's: the same repacked weight (``mma_gemv.repack``: one warp's 1 KiB block of a tile and
chunk, loaded as two 16-byte words per lane into a register ring), the nibble pairs made into exact bf16 (q - z)
with one lop3 and one paired fma, the rows in the mma's 8-wide N dimension (MB 8-row blocks), fp32 sums scaled
once per chunk, and a split over K whose partials go to a workspace that the last CTA sums in a fixed order
(deterministic, one kernel, graph-safe). Numerics equal the GEMV's for more than 8 rows (exact products, fp32
sums, one rounding of the output).

The shared stage holds MG*MB*8 rows of 128 bf16 (256 bytes); a lane reads 16 bytes at a time, four pieces of its 64
contiguous bytes, and the pieces are stored XOR-swizzled ((piece ^ ((t >> 1) | ((row & 1) << 1))) so that the 8
lanes of each quarter-warp read 8 different bank groups.

MG (a config's fifth field, 1 by default): MG groups of WARPS warps take the same tiles and chunks, group g the
rows g MB 8 .. (g + 1) MB 8 - 1 of the stage, each with MB / MG row blocks' sums. At 64 rows Nsight Compute found
the kernel latency-bound for lack of warps (NOTES step 82: ~7 warps an SM, 64 fp32 sums and 140-162 registers a
thread); splitting the CTA's chunks between two groups instead lost 5-35% to the register cap's spills (step 83).
Splitting the rows halves the sums a thread holds, so two groups fit two CTAs an SM uncapped; the cost is that each
group unpacks the same weights (read through L1, which the groups' second reads hit).
Shipped for the two 5,120-output Linears at 33-64 rows (SHAPE_CONFIGS; NOTES step 85).

Limits: those of ``mma_gemv`` (4-bit, bf16, N a multiple of 16, K of 128, group size a multiple of 128), 1 to 64
rows (``MIN_ROWS`` and more in GPTQLinear), compute capability 8.0+ with NVRTC. No LoRA epilogue: the engine's
hook adds the product for rows this kernel serves.
"""

from __future__ import annotations

import torch

from . import mma_gemv
from .kernel_launch import launch
from .mma_gemv import CHUNK

MIN_ROWS = 9  # GPTQLinear's threshold: fewer rows go to the GEMV (measured by benchmarks/mma_gemm_probe.py)
MAX_ROWS = 64
STAGES = 3

# Launch configurations by 8-row blocks: (warps a CTA (tiles side by side), tiles a warp, register buffers of
# weights a warp, target CTAs per SM for the split over K and for the register cap[, groups of warps along the
# rows, MG]). Measured on an H200 by benchmarks/mma_gemm_probe.py (NOTES steps 21 and 30); 1 (8 rows, which
# GPTQLinear gives the GEMV) is not measured.
CONFIGS = {1: (4, 1, 1, 4), 2: (4, 1, 1, 2), 4: (4, 1, 1, 2), 8: (4, 1, 1, 1)}
# Where a layer shape's own best beats its row count's CONFIGS entry by more than 3%: (row blocks, K, N) -> config.
# Mostly the split target: at 64 rows the 5,120-output Linears (320 tiles) want two CTAs an SM where 13,696-15,360
# outputs want one, as in sessions 13 and 14's timings too. Qwen-14B's shapes on an H200 (NOTES step 30); other
# shapes use CONFIGS. w1 and w2's pair (27,392 outputs, one launch) at 32 and 64 rows: two tiles a warp, chosen inside
# the decode step's graph (benchmarks/step_config_sweep.py, NOTES steps 75 and 77: the 64-row step 5.8% shorter, the
# 32-row step 1.6%). The two 5,120-output Linears at 64 rows: two groups of warps taking the rows in turn (MG = 2),
# also chosen in the step's graph (NOTES step 85: the 64-row step 2.8% shorter on an H200; MG = 2 lost 2.6-15% on
# c_attn, the w1/w2 pair and every shape at 32 rows).
SHAPE_CONFIGS = {(2, 5120, 13696): (4, 1, 1, 4), (4, 5120, 13696): (4, 1, 2, 1), (4, 5120, 15360): (4, 1, 3, 1),
                 (4, 5120, 27392): (4, 2, 1, 1), (8, 5120, 5120): (4, 1, 1, 2, 2), (8, 13696, 5120): (4, 1, 1, 2, 2),
                 (8, 5120, 27392): (4, 2, 1, 1)}


def config_for(rows: int, K: int, N: int) -> tuple:
    """The launch configuration for an [rows, K] x [K, N] product: the shape's own (SHAPE_CONFIGS), else its row
    count's (CONFIGS)."""
    mb = row_blocks(rows)
    return SHAPE_CONFIGS.get((mb, K, N), CONFIGS[mb])


def row_blocks(rows: int) -> int:
    """The kernel's MB for ``rows``: 1, 2, 4 or 8 8-row blocks (8, 16, 32 or 64 rows)."""
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"mma_gemm takes 1 to {MAX_ROWS} rows, got {rows}")
    return 1 if rows <= 8 else 2 if rows <= 16 else 4 if rows <= 32 else 8


_SOURCE = r"""
#define WARPS __WARPS__
#define MB __MB__
#define TPW __TPW__
#define DEPTH __DEPTH__
#define GCHUNKS __GCHUNKS__
#define STAGES __STAGES__
#define MINB __MINB__            // CTAs an SM must hold: caps the registers a thread (the config's per-SM target)
#define MG __MG__                // groups of WARPS warps taking the rows in turn: MB 8-row blocks each (module doc)
#define THREADS (WARPS * MG * 32)
#define XROW 128                 // bf16 a shared row of x: one chunk
#define XSTAGE (MG * MB * 8 * XROW)  // bf16 a stage: every group's rows

// A warp's weights for one chunk: its TPW tiles' 32 bytes a lane, their scales and zero-point words.
struct WChunk {
  U4 w[TPW][2];
  u16 s[TPW][2];
  int z[TPW][2];
};

// x of chunk c (rows < M) into a shared stage, each lane's four 16-byte pieces swizzled (module doc); one group.
__device__ __forceinline__ void load_x(u16* stage, const u16* x, int M, int x_stride, int c) {
  for (int i = threadIdx.x; i < M * 16; i += THREADS) {
    const int row = i >> 4, p = i & 15, pt = p >> 2;
    const int sw = (pt >> 1) | ((row & 1) << 1);
    cp_async16(stage + row * XROW + pt * 32 + (((p & 3) ^ sw) << 3),
               x + (size_t)row * x_stride + (size_t)c * 128 + p * 8);
  }
  cp_async_commit();
}

// the weights, scales and zeros of the next chunk; the pointers advance by one chunk
__device__ __forceinline__ void load_w(WChunk& b, const U4*& w, const u16*& s, const int*& z, int& c, int N,
                                       size_t tile_stride) {
#pragma unroll
  for (int tp = 0; tp < TPW; ++tp) {
#if MG == 1
    b.w[tp][0] = ld_stream(w + tp * tile_stride);
    b.w[tp][1] = ld_stream(w + tp * tile_stride + 1);
#else  // every group reads the same weights: through L1, where the groups' second reads find them
    b.w[tp][0] = ld_cached(w + tp * tile_stride);
    b.w[tp][1] = ld_cached(w + tp * tile_stride + 1);
#endif
  }
#if GCHUNKS == 1
  const u16* sc = s;
  const int* zc = z;
  s += N;
  z += N >> 3;
#else
  const u16* sc = s + (c / GCHUNKS) * N;
  const int* zc = z + (c / GCHUNKS) * (N >> 3);
#endif
#pragma unroll
  for (int tp = 0; tp < TPW; ++tp) {
    b.s[tp][0] = sc[16 * tp];
    b.s[tp][1] = sc[16 * tp + 8];
    b.z[tp][0] = zc[2 * tp];
    b.z[tp][1] = zc[2 * tp + 1];
  }
  w += 64;
  c += 1;
}

// One chunk: for each 16-input step the weights' A fragments ((q - z) in bf16, exact), x's B fragments from the
// shared stage (one 16-byte read serves two steps and every tile of the warp), fp32 sums scaled once.
__device__ __forceinline__ void gemm_chunk(const WChunk& b, const u16* xr, int sw, float (&acc)[TPW][MB][4], int r,
                                           int zero_add) {
  u32 magic;
  asm volatile("mov.b32 %0, 0x43004300;" : "=r"(magic));
  u32 nz[TPW][2];
  float tmp[TPW][MB][4];
#pragma unroll
  for (int tp = 0; tp < TPW; ++tp) {
    nz[tp][0] = (u32)(0xC300 + ((b.z[tp][0] >> (4 * r)) & 15) + zero_add) * 0x10001u;
    nz[tp][1] = (u32)(0xC300 + ((b.z[tp][1] >> (4 * r)) & 15) + zero_add) * 0x10001u;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) tmp[tp][mb][0] = tmp[tp][mb][1] = tmp[tp][mb][2] = tmp[tp][mb][3] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    u32 a[TPW][2][4];
#pragma unroll
    for (int tp = 0; tp < TPW; ++tp)
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const int j = 2 * i + jj;
        const u32 wj = word_of(b.w[tp][j >> 2], j & 3);
        a[tp][jj][0] = sub_zero(nibbles(wj, magic), nz[tp][0]);
        a[tp][jj][1] = sub_zero(nibbles(wj >> 4, magic), nz[tp][1]);
        a[tp][jj][2] = sub_zero(nibbles(wj >> 8, magic), nz[tp][0]);
        a[tp][jj][3] = sub_zero(nibbles(wj >> 12, magic), nz[tp][1]);
      }
    const u16* xp = xr + ((i ^ sw) << 3);
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
      const U4 xv = *(const U4*)(xp + mb * 8 * XROW);
#pragma unroll
      for (int tp = 0; tp < TPW; ++tp) {
        mma(tmp[tp][mb], a[tp][0][0], a[tp][0][1], a[tp][0][2], a[tp][0][3], xv.x, xv.y);
        mma(tmp[tp][mb], a[tp][1][0], a[tp][1][1], a[tp][1][2], a[tp][1][3], xv.z, xv.w);
      }
    }
  }
#pragma unroll
  for (int tp = 0; tp < TPW; ++tp) {
    const float sc0 = h2f(b.s[tp][0]), sc1 = h2f(b.s[tp][1]);
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
      acc[tp][mb][0] += sc0 * tmp[tp][mb][0];
      acc[tp][mb][1] += sc0 * tmp[tp][mb][1];
      acc[tp][mb][2] += sc1 * tmp[tp][mb][2];
      acc[tp][mb][3] += sc1 * tmp[tp][mb][3];
    }
  }
}

extern "C" __global__ void __launch_bounds__(THREADS, MINB)
gptq_mma_gemm(const U4* __restrict__ wpack, const u16* __restrict__ x, const u16* __restrict__ scales,
              const int* __restrict__ qzeros, u16* __restrict__ out, float* __restrict__ ws,
              int* __restrict__ counters, int M, int N, int K, int zero_add, int x_stride,
              const u16* __restrict__ bias, int has_bias) {
  __shared__ __align__(16) u16 xs[STAGES * XSTAGE];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#if MG == 1
  const int wt = warp, row0 = 0;
#else
  const int wt = warp % WARPS, row0 = (warp / WARPS) * MB * 8;  // the warp's tile slot and its group's first row
#endif
  const int r = lane >> 2, t = lane & 3;
  const int T = N >> 4, C = K >> 7;
  const int tile0 = (blockIdx.x * WARPS + wt) * TPW;  // this warp's first tile
  const bool active = tile0 < T;  // the last CTA's extra warps load tile 0's weights and store nothing
  const int ltile = active ? tile0 : 0;
  const int split = blockIdx.y, splits = gridDim.y;
  const int c_begin = (int)((long long)C * split / splits);
  const int chunks = (int)((long long)C * (split + 1) / splits) - c_begin;

  const size_t tile_stride = (size_t)C * 64;  // U4 between two tiles' blocks
  const U4* wp = wpack + ((size_t)ltile * C + c_begin) * 64 + lane * 2;
#if GCHUNKS == 1
  const u16* sp = scales + (size_t)c_begin * N + ltile * 16 + r;
  const int* zp = qzeros + (size_t)c_begin * (N >> 3) + ltile * 2;
#else
  const u16* sp = scales + ltile * 16 + r;
  const int* zp = qzeros + ltile * 2;
#endif
  int cw = c_begin;
  const int sw = (t >> 1) | ((r & 1) << 1);
  const u16* xr = xs + (row0 + r) * XROW + t * 32;

  float acc[TPW][MB][4];
#pragma unroll
  for (int tp = 0; tp < TPW; ++tp)
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) acc[tp][mb][0] = acc[tp][mb][1] = acc[tp][mb][2] = acc[tp][mb][3] = 0.f;

  // x: chunks 0 and 1 in flight before the loop; chunk i + 2 is issued after the barrier of chunk i (every warp
  // has then finished chunk i - 1, whose stage it reuses). Every step commits one group (empty past the end).
#pragma unroll
  for (int d = 0; d < STAGES - 1; ++d) {
    if (d < chunks) load_x(xs + d * XSTAGE, x, M, x_stride, c_begin + d);
    else cp_async_commit();
  }
  WChunk buf[DEPTH];
#pragma unroll
  for (int d = 0; d < DEPTH - 1; ++d)
    if (d < chunks) load_w(buf[d], wp, sp, zp, cw, N, tile_stride);
  int stage = 0, next_stage = STAGES - 1;
  for (int base = 0; base < chunks; base += DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const int i = base + d;
      if (i < chunks) {
        if (i + DEPTH - 1 < chunks) load_w(buf[(d + DEPTH - 1) % DEPTH], wp, sp, zp, cw, N, tile_stride);
        cp_async_wait_group<STAGES - 2>();  // this thread's copies of chunk i have landed
        __syncthreads();                    // and every thread's
        if (i + STAGES - 1 < chunks) load_x(xs + next_stage * XSTAGE, x, M, x_stride, c_begin + i + STAGES - 1);
        else cp_async_commit();
        gemm_chunk(buf[d], xr + stage * XSTAGE, sw, acc, r, zero_add);
        stage = stage == STAGES - 1 ? 0 : stage + 1;
        next_stage = next_stage == STAGES - 1 ? 0 : next_stage + 1;
      }
    }
  }
  cp_async_wait_group<0>();

  if (splits == 1) {
    if (active) {
#pragma unroll
      for (int tp = 0; tp < TPW; ++tp)
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int b = row0 + mb * 8 + 2 * t + (q & 1), n = (tile0 + tp) * 16 + r + 8 * (q >> 1);
            if (b < M) out[(size_t)b * N + n] = f2bf(acc[tp][mb][q] + bias_of(bias, has_bias, n));
          }
    }
    return;
  }
  if (active) {
#pragma unroll
    for (int tp = 0; tp < TPW; ++tp)
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int b = row0 + mb * 8 + 2 * t + (q & 1), n = (tile0 + tp) * 16 + r + 8 * (q >> 1);
          if (b < M) __stcg(ws + ((size_t)split * M + b) * N + n, acc[tp][mb][q]);
        }
  }
  __threadfence();
  __syncthreads();
  int last = 0;
  if (threadIdx.x == 0) last = atomicAdd(counters + blockIdx.x, 1) == splits - 1;
  if (!__syncthreads_or(last)) return;
  __threadfence();
  if (active) {
#pragma unroll
    for (int tp = 0; tp < TPW; ++tp)
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int b = row0 + mb * 8 + 2 * t + (q & 1), n = (tile0 + tp) * 16 + r + 8 * (q >> 1);
          if (b < M) {
            float s = 0.f;
            for (int sp_ = 0; sp_ < splits; ++sp_) s += __ldcg(ws + ((size_t)sp_ * M + b) * N + n);  // a fixed order
            out[(size_t)b * N + n] = f2bf(s + bias_of(bias, has_bias, n));
          }
        }
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}
"""


def kernel_source(warps: int, mb: int, tpw: int, depth: int, group_size: int, min_blocks: int = 1,
                  mg: int = 1) -> str:
    """The CUDA C of one configuration (also compiled without a GPU by benchmarks/mma_sass.py); ``mb``: 8-row blocks
    a warp; ``min_blocks``: CTAs an SM must be able to hold (the compiler caps the registers a thread to fit them);
    ``mg``: groups of ``warps`` warps taking the rows in turn (mb blocks each)."""
    if group_size % CHUNK:
        raise ValueError(f"mma_gemm: group size {group_size} is not a multiple of {CHUNK}")
    body = (_SOURCE.replace("__WARPS__", str(warps)).replace("__MB__", str(mb)).replace("__TPW__", str(tpw))
            .replace("__DEPTH__", str(depth)).replace("__GCHUNKS__", str(group_size // CHUNK))
            .replace("__STAGES__", str(STAGES)).replace("__MINB__", str(max(1, min_blocks)))
            .replace("__MG__", str(mg)))
    return mma_gemv.HELPERS + body


def row_groups(mb: int, config: tuple) -> tuple[int, int]:
    """(groups of warps along the rows, 8-row blocks a warp) for ``mb`` row blocks under ``config`` (its fifth
    field, 1 when absent; never more groups than row blocks)."""
    want = config[4] if len(config) > 4 else 1
    if want not in (1, 2, 4, 8):
        raise ValueError(f"mma_gemm: {want} groups of warps along the rows (1, 2, 4 or 8)")
    mg = min(want, mb)
    return mg, mb // mg


def shared_bytes(mb: int) -> int:
    """The x stages' static shared memory (at most 48 KiB: 64 rows x 256 bytes x 3 stages is exactly that)."""
    return STAGES * mb * 8 * CHUNK * 2


def plan(M: int, T: int, C: int, config: tuple, sms: int) -> tuple:
    """(row blocks, warps, tiles a warp, depth, CTAs along N, splits over K) for an [M, K] x [K, 16 T] product;
    ``config`` = (warps, tiles a warp, depth, CTAs per SM[, groups of warps along the rows])."""
    mb = row_blocks(M)
    warps, tpw, depth, per_sm = config[:4]
    if T % tpw:
        tpw = 1  # a warp's tiles side by side: an odd tile count gives one tile a warp
    ctas = -(-T // (warps * tpw))
    # at least 2 chunks a split (the pipeline fills in two), and enough CTAs for per_sm on every SM
    splits = max(1, min(C // 2 if C >= 2 else 1, -(-per_sm * sms // ctas)))
    return mb, warps, tpw, depth, ctas, splits


def mma_gemm(x2d: torch.Tensor, wpack: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, zero_add: int,
             group_size: int, perm: torch.Tensor | None = None, config: tuple | None = None,
             bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x2d [M, K] bf16 (1 <= M <= 64; GPTQLinear sends it ``MIN_ROWS`` and more) @ W.T -> [M, N] bf16 from
    ``mma_gemv.repack``'s tensors; None inside a graph capture that finds the kernel not compiled or the split-K
    workspace too small (the caller uses another kernel). ``config``: a tuple of ``CONFIGS``'s form instead of
    ``config_for``'s. ``bias`` [N] bf16: added in fp32 before the output's one rounding."""
    M, K = x2d.shape
    T, C = wpack.shape[:2]
    N = T * 16
    if K != C * CHUNK:
        raise ValueError(f"mma_gemm: x has {K} columns, the repacked weight {C * CHUNK} inputs")
    mma_gemv.check_bias(bias, N, x2d.device, "mma_gemm")
    x2d = mma_gemv.kernel_input(x2d, perm)
    sms = torch.cuda.get_device_properties(x2d.device).multi_processor_count
    config = config or config_for(M, K, N)
    mb, warps, tpw, depth, ctas, splits = plan(M, T, C, config, sms)
    per_sm = config[3]
    mg, mbw = row_groups(mb, config)
    kernel = mma_gemv.compiled(x2d.device, (warps, mbw, tpw, depth, group_size, per_sm, mg), "gptq_mma_gemm",
                               lambda: kernel_source(warps, mbw, tpw, depth, group_size, per_sm, mg))
    if kernel is None or isinstance(kernel, str):
        return None
    ws, counters = (None, None)
    if splits > 1:
        held = mma_gemv.workspace(x2d.device, splits, M, N)
        if held is None:
            return None
        ws, counters = held
    out = torch.empty(M, N, device=x2d.device, dtype=torch.bfloat16)
    launch(kernel, (ctas, splits, 1), (warps * mg * 32, 1, 1),
           [wpack, x2d, scales, qzeros, out, ws if ws is not None else out, counters if counters is not None else out,
            M, N, K, zero_add, x2d.stride(0), bias if bias is not None else out, int(bias is not None)])
    return out
