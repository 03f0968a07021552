"""GPTQ Int4 decoding GEMV / small-M GEMM on tensor cores: a CUDA C kernel compiled at run time by NVRTC.

Why our own kernel: a decode step reads every Int4 weight once, so it is bound by memory bandwidth. PyTorch's
int4 kernel ("tinygemm", ``int4pack.py``) reaches ~40% of the H200's copy rate at one row and falls off from 4
rows; our Triton GEMVs reach 17-26% (benchmarks/NOTES.md). Neither splits K, and both spend several
instructions a weight turning nibbles into floats. This kernel:

- reads a copy of the weight repacked so that one 16-byte load per lane gives that lane its tensor-core
  fragments for 16 output columns x 128 inputs (``repack``), in one contiguous 1 KiB block per warp;
- turns each pair of nibbles into the exact bf16 pair (128 + q, 128 + q') with one shift and one mask-or (the
  nibble becomes the low mantissa bits of 128.0); the zero point is applied once per chunk as (128 + z) * sum(x),
  with sum(x) from one more mma against ones (2-4 row blocks subtract the zero per pair instead: there the
  extra mma's would load the tensor cores). About 145 instructions a warp per 2,048 weights (sm_90 SASS); a
  form with 235 (the zero subtracted per pair, 64-bit addresses recomputed per chunk) reached ~48% of the copy
  rate, this one 50-55% on the large Linears (NOTES step 13: more loads in flight, through registers or a
  cp.async ring in shared memory, did not help);
- multiplies on the tensor cores with the batch rows in the mma's 8-wide N dimension ("swapped" operands:
  the weights fill the 16-wide M), so 1 to 8 rows share every weight load and mma, and sums in fp32; each
  128-input chunk's sum is scaled once by its group's fp16 scale;
- splits K over warps and over CTAs: each CTA writes its fp32 partial sums to its own slot of a workspace, and the
  last CTA of a tile (a counter, which it resets) adds the slots in a fixed order and writes the bf16 result, so
  the call stays a single kernel that CUDA graphs can replay, and its result does not depend on which CTA
  finished first (atomic adds did: greedy decoding must repeat itself).

Within a chunk the inputs are visited in a permuted order, the same for x and the weights, chosen so that each
lane reads 32 contiguous inputs of x (four 16-byte loads) instead of gathering pairs.

Numerics: the products (128 + q) * x are exact in fp32 and summed in fp32 on the tensor cores; (128 + z) * sum(x)
is subtracted and the scale applied per chunk in fp32. The sums are ~17 times the result, so fp32 rounding costs
~1e-6 relative, far below the bf16 rounding of the output: closer to the exact product than dequantizing to bf16
first (the training path, tinygemm). A row of the identity gives each weight exactly.

Limits (else the caller uses another kernel): 4-bit, bf16 activations, N a multiple of 16, K of 128, and the
group size a multiple of 128 (Qwen's releases use 128); act-order (desc_act) weights are reordered at repack
time and x's columns gathered at every call. CUDA compute capability 8.0 or newer, with NVRTC.
"""

from __future__ import annotations

import threading
import warnings

import torch

from .kernel_launch import launch
from .packing import group_sorted_order, groups_even, to_int32_wrapping, unpack_cols, unpack_rows

CHUNK = 128  # inputs per chunk: one warp's 1 KiB block of 16 columns
MAX_ROWS = 32  # the most rows it was measured faster than the Triton GEMV for; GPTQLinear sends it 1-8 (mma_gemm: 9+)
KERNEL_ROWS = 32  # what the kernel computes: four 8-row blocks of the mma's N dimension
LORA_MAX_RANK = 128  # the epilogue's rank sum (LRMAX: its operands sit in shared memory); more: the caller adds it

# Launch configurations by 8-row blocks, chosen on an H200 by benchmarks/mma_gemv_probe.py --pick: (warps a CTA,
# register buffers a warp (1: a chunk's loads are not issued ahead of the previous chunk's compute), target CTAs
# per SM for the split over K).
CONFIGS = {1: (8, 1, 2), 2: (4, 1, 4), 4: (4, 1, 2)}  # by row_blocks()
# Where a layer shape's own config beat its row blocks' CONFIGS entry end to end (an A/B of b1_512 in one call, or the
# decode graph's replay, benchmarks/step_config_sweep.py): (row blocks, K, N) -> config. Qwen-14B at 1-8 rows, 4
# warps a CTA and 4 CTAs an SM: c_attn +1.6-1.9% (NOTES step 73), then w1 and w2's pair (the paired decode launch,
# 27,392 outputs) +3.9% more (step 74), and w1 and w2 alone (unpaired where an adapter's epilogue runs) 0.9% of the
# adapter's step (step 75). The two c_proj keep CONFIGS: (4, 1, 4) gained 0.3% on mlp.c_proj without an adapter and
# lost 4% with one (step 75). mlp.c_proj at (4, 1, 6): three splits, 960 CTAs of 4 warps, ~0.9 of the wave that
# fits where (8, 1, 2) gave 320 CTAs of 8 warps, 0.61 of it: the one-row step 1.4% shorter on an H200, the 8-row step
# 0.9% (step 100). Other shapes use CONFIGS.
SHAPE_CONFIGS = {(1, 5120, 15360): (4, 1, 4), (1, 5120, 27392): (4, 1, 4), (1, 5120, 13696): (4, 1, 4),
                 (1, 13696, 5120): (4, 1, 6)}
# The low-rank build's own entries, where its measured best differs from SHAPE_CONFIGS': mlp.c_proj's (4, 1, 6) made
# the adapter's one-row step 6.5% longer (step 100), so with an adapter it keeps its row blocks' config.
LORA_SHAPE_CONFIGS = {(1, 13696, 5120): CONFIGS[1]}


def config_for(rows: int, K: int, N: int, low_rank: bool = False) -> tuple:
    """The launch configuration for an [rows, K] x [K, N] product: the shape's own (LORA_SHAPE_CONFIGS first for the
    build with the low-rank epilogue, then SHAPE_CONFIGS), else its row blocks' (CONFIGS)."""
    key = (row_blocks(rows), K, N)
    if low_rank and key in LORA_SHAPE_CONFIGS:
        return LORA_SHAPE_CONFIGS[key]
    return SHAPE_CONFIGS.get(key, CONFIGS[key[0]])


def row_blocks(rows: int) -> int:
    """The kernel's MB: 8-row blocks of the mma's N dimension (1, 2 or 4)."""
    return 1 if rows <= 8 else 2 if rows <= 16 else 4


def unsupported(K: int, N: int, bits: int, group_size: int, g_idx: torch.Tensor | None = None) -> str | None:
    """Why a layer cannot use this kernel (None: it can)."""
    if bits != 4:
        return f"{bits}-bit weights (the kernel is 4-bit only)"
    if N % 16:
        return f"{N} outputs (must be a multiple of 16)"
    if K % CHUNK:
        return f"{K} inputs (must be a multiple of {CHUNK})"
    if group_size % CHUNK or K % group_size:
        return f"group size {group_size} (must be a multiple of {CHUNK} that divides {K})"
    if g_idx is not None and not groups_even(g_idx, group_size):
        return "a g_idx whose groups are not all group_size rows"
    return None


# -- the repacked layout ------------------------------------------------------------------------------------
# wpack int32 [N/16, K/128, 32 lanes, 8 words]. Lane L = 4 r + t (r = L // 4, t = L % 4) holds, in word j,
# the weights of output columns n0 + r + 8 h (h = 0, 1) at inputs k = c*128 + 32 t + 4 j + e (e = 0..3), the
# nibble of (e, h) at bit 4 p with p = 4 (e & 1) + 2 (e >> 1) + h. Read back with shifts 0, 4, 8, 12 and the
# mask 0x000F000F, the word gives the four bf16x2 registers of the mma's A fragment (m16n8k16, row-major):
# rows r / r + 8 (h), columns 2t, 2t+1 (e = 0, 1) and 2t+8, 2t+9 (e = 2, 3), in the order reg0 = (h 0, e 0-1),
# reg1 = (h 1, e 0-1), reg2 = (h 0, e 2-3), reg3 = (h 1, e 2-3). The B fragment of the same lane holds x at the
# same inputs: its registers for word j are x's words 2j and 2j+1 of the lane's 32 inputs from c*128 + 32 t.


def repack(qweight, qzeros, scales, g_idx, v2: bool = False, group_size: int = 128):
    """(wpack, scales, qzeros, zero_add, perm) for ``mma_gemv``: the weight in the kernel's layout, the scales and
    zero points reordered to match it (the same tensors when g_idx is trivial), 1 for GPTQ v1's stored
    ``zero - 1`` (0 for v2), and the input order (None when g_idx is trivial)."""
    K = g_idx.shape[0]
    N = scales.shape[1]
    q = unpack_rows(qweight, 4)[:K].to(torch.int64)  # [K, N]
    perm, order = group_sorted_order(g_idx, group_size)
    if perm is not None:
        q = q[perm]
        scales, qzeros = scales[order], qzeros[order]
    C, T = K // CHUNK, N // 16
    # k = c*128 + 32 t + 4 j + 2 e_hi + e_lo ; n = 16 T + 8 h + r
    q = q.view(C, 4, 8, 2, 2, T, 2, 8)  # c, t, j, e_hi, e_lo, T, h, r
    q = q.permute(5, 0, 7, 1, 2, 4, 3, 6)  # T, c, r, t, j, e_lo, e_hi, h -> nibble p = 4 e_lo + 2 e_hi + h
    q = q.reshape(T, C, 32, 8, 8)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = to_int32_wrapping((q << shifts).sum(dim=-1))
    return (words.contiguous(), scales.to(torch.float16).contiguous(), qzeros.to(torch.int32).contiguous(),
            0 if v2 else 1, perm)


def side_by_side(first: tuple, second: tuple) -> tuple | None:
    """Two layers' ``repack`` results (wpack, scales, qzeros, zero_add, perm) as one layer whose outputs are the
    first's then the second's, for two Linears that read the same input (one launch instead of two); None when they
    cannot be one: other inputs, zero conventions or input orders (only layers in the plain input order pair up).
    The weight's tiles are its first dim, so each layer's part of the result is a contiguous view of it."""
    (w1, s1, z1, a1, p1), (w2, s2, z2, a2, p2) = first, second
    if w1.shape[1:] != w2.shape[1:] or s1.shape[0] != s2.shape[0] or a1 != a2 or p1 is not None or p2 is not None:
        return None
    return (torch.cat([w1, w2]), torch.cat([s1, s2], 1).contiguous(), torch.cat([z1, z2], 1).contiguous(), a1, None)


def emulate(x2d: torch.Tensor, wpack: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, zero_add: int,
            group_size: int) -> torch.Tensor:
    """The kernel's arithmetic in torch (fp32), read from the repacked layout the way the kernel reads it: a
    CPU-testable statement of the layout and the fragment mapping. x2d [M, K] (already in the kernel's input
    order) -> [M, N] fp32."""
    T, C = wpack.shape[:2]
    M, K = x2d.shape
    w = wpack.to(torch.int64) & 0xFFFFFFFF  # [T, C, 32, 8]
    regs = []
    for s in (0, 4, 8, 12):  # reg0..reg3 of the A fragment
        v = (w >> s) & 0x000F000F
        regs.append(torch.stack([v & 0xFFFF, v >> 16], dim=-1))  # the bf16x2 halves' nibbles
    # PTX m16n8k16 A fragment: reg i holds row r + 8 (i & 1), columns (k slots) 8 (i >> 1) + 2 t + half; the
    # lane's B fragment holds x at the same slots, which are inputs c*128 + 32 t + 4 j + 2 (i >> 1) + half.
    q = torch.stack(regs, dim=-2)  # T, C, lane, j, reg, half
    q = q.view(T, C, 8, 4, 8, 2, 2, 2)  # T, C, r, t, j, reg >> 1, reg & 1, half
    q = q.permute(1, 3, 4, 5, 7, 0, 6, 2).reshape(K, T * 16)  # k = (c, t, j, i >> 1, half), n = (T, i & 1, r)
    z = unpack_cols(qzeros, 4)[:, : T * 16].to(torch.float32) + zero_add  # [G, N]
    s = scales.to(torch.float32)
    gk = torch.arange(K) // group_size
    wq = (q.to(torch.float32) - z[gk]) * s[gk]
    return x2d.to(torch.float32) @ wq


# -- the kernel ----------------------------------------------------------------------------------------------
# Device helpers shared by this GEMV and the small-M GEMM (mma_gemm.py): loads, bf16 conversions, the nibble
# unpacking, the mma and cp.async.
HELPERS = r"""
typedef unsigned int u32;
typedef unsigned short u16;
struct alignas(16) U4 { u32 x, y, z, w; };

__device__ __forceinline__ U4 ld_stream(const U4* p) {
  U4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ U4 ld_cached(const U4* p) {
  U4 v;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ u32 word_of(const U4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
__device__ __forceinline__ float h2f(u16 h) {
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ u16 f2bf(float f) {
  u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
// output n's bias (bf16; has_bias 0: none), added in fp32 before the output's one rounding (as F.linear's epilogue)
__device__ __forceinline__ float bias_of(const u16* bias, int has_bias, int n) {
  return has_bias ? __uint_as_float((u32)bias[n] << 16) : 0.f;
}
// (128 + q) - (128 + z) for both halves, exact: fma(a, 1.0, -(128 + z))
__device__ __forceinline__ u32 sub_zero(u32 a, u32 negz) {
  u32 d; asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(0x3F803F80u), "r"(negz)); return d;
}
__device__ __forceinline__ void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// (w >> shift) & 0x000F000F | magic in one instruction (the compiler splits the two constants otherwise)
__device__ __forceinline__ u32 nibbles(u32 w, u32 magic) {
  u32 d;
  asm("lop3.b32 %0, %1, 0x000F000F, %2, 0xEA;" : "=r"(d) : "r"(w), "r"(magic));
  return d;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  unsigned s;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(s) : "l"(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// wait until at most N of this thread's committed groups are still in flight
template <int N> __device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}
"""

_SOURCE = HELPERS + r"""
#define WARPS __WARPS__
#define MB __MB__
#define DEPTH __DEPTH__
#define GCHUNKS __GCHUNKS__  // chunks of 128 inputs per quantization group
#define LORA __LORA__  // 1: the low-rank epilogue (a build of its own, so the plain kernel's code is unchanged)

struct Chunk {
  U4 w[2];        // the lane's 32 bytes of weights (8 words: k16 tiles 0..7)
  U4 xv[MB][4];   // x at the lane's 32 inputs, for batch rows mb * 8 + r
  u16 s0, s1;     // scales of columns n0 + r, n0 + r + 8
  int z0, z1;     // the qzeros words of columns n0..n0+7 and n0+8..n0+15
};

// A warp's load cursor: where its next chunk's loads read, advanced by WARPS chunks after each load (running
// pointers: recomputing 64-bit addresses from the chunk index cost ~50 instructions a chunk).
struct Cursor {
  const U4* w;          // this lane's first 16 bytes of the chunk
  const u16* x[MB];     // x at the lane's 32 inputs, rows mb * 8 + r (null: a row past M)
  const u16* s;         // scale of column n0 + r in the chunk's group
  const int* z;         // the qzeros word of columns n0..n0+7 in the chunk's group
  int c;                // the chunk
};

__device__ __forceinline__ void load_chunk(Chunk& b, Cursor& p, int N) {
  b.w[0] = ld_stream(p.w);
  b.w[1] = ld_stream(p.w + 1);
#if GCHUNKS == 1
  const u16* s = p.s;
  const int* z = p.z;
  p.s += WARPS * N;
  p.z += WARPS * (N >> 3);
#else
  const int g = p.c / GCHUNKS;
  const u16* s = p.s + g * N;
  const int* z = p.z + g * (N >> 3);
#endif
  b.s0 = s[0];
  b.s1 = s[8];
  b.z0 = z[0];
  b.z1 = z[1];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
    if (p.x[mb]) {
      const U4* xp = (const U4*)p.x[mb];
#pragma unroll
      for (int i = 0; i < 4; ++i) b.xv[mb][i] = ld_cached(xp + i);
      p.x[mb] += WARPS * 128;
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) b.xv[mb][i] = U4{0u, 0u, 0u, 0u};
    }
  }
  p.w += WARPS * 64;
  p.c += WARPS;
}

// One row block (ZERO_BY_SUM): the A fragments are the bf16 values 128 + q (the nibble as the low mantissa bits of
// 128.0), so the mma gives sum (128 + q) x; sum x comes from one more mma with A = 1, and (128 + z) sum x is
// subtracted once per chunk in fp32 (the products are exact; the fp32 sums are ~17 times larger than the result,
// far below bf16's rounding). More row blocks: the zero is subtracted from each pair (q - z exact in bf16), one
// paired add shared by MB mma's, where the extra mma per block would make the tensor pipe the limit.
#define ZERO_BY_SUM (MB == 1)
__device__ __forceinline__ void compute_chunk(const Chunk& b, float (&acc)[MB][4], int r, int zero_add) {
  u32 magic;
  asm volatile("mov.b32 %0, 0x43004300;" : "=r"(magic));
  float tmp[MB][4];
#if ZERO_BY_SUM
  u32 ones;
  asm volatile("mov.b32 %0, 0x3F803F80;" : "=r"(ones));
  float sx[MB][4];
#else
  const u32 nz0 = (u32)(0xC300 + ((b.z0 >> (4 * r)) & 15) + zero_add) * 0x10001u;
  const u32 nz1 = (u32)(0xC300 + ((b.z1 >> (4 * r)) & 15) + zero_add) * 0x10001u;
#endif
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      tmp[mb][i] = 0.f;
#if ZERO_BY_SUM
      sx[mb][i] = 0.f;
#endif
    }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const u32 wj = word_of(b.w[j >> 2], j & 3);
    u32 a0 = nibbles(wj, magic), a1 = nibbles(wj >> 4, magic);
    u32 a2 = nibbles(wj >> 8, magic), a3 = nibbles(wj >> 12, magic);
#if !ZERO_BY_SUM
    a0 = sub_zero(a0, nz0);
    a1 = sub_zero(a1, nz1);
    a2 = sub_zero(a2, nz0);
    a3 = sub_zero(a3, nz1);
#endif
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
      const u32 b0 = word_of(b.xv[mb][j >> 1], (2 * j) & 3), b1 = word_of(b.xv[mb][j >> 1], (2 * j + 1) & 3);
      mma(tmp[mb], a0, a1, a2, a3, b0, b1);
#if ZERO_BY_SUM
      mma(sx[mb], ones, ones, ones, ones, b0, b1);
#endif
    }
  }
  const float sc0 = h2f(b.s0), sc1 = h2f(b.s1);
#if ZERO_BY_SUM
  const float zc0 = (float)(128 + ((b.z0 >> (4 * r)) & 15) + zero_add);
  const float zc1 = (float)(128 + ((b.z1 >> (4 * r)) & 15) + zero_add);
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
    acc[mb][0] += sc0 * (tmp[mb][0] - zc0 * sx[mb][0]);
    acc[mb][1] += sc0 * (tmp[mb][1] - zc0 * sx[mb][1]);
    acc[mb][2] += sc1 * (tmp[mb][2] - zc1 * sx[mb][2]);
    acc[mb][3] += sc1 * (tmp[mb][3] - zc1 * sx[mb][3]);
  }
#else
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
    acc[mb][0] += sc0 * tmp[mb][0];
    acc[mb][1] += sc0 * tmp[mb][1];
    acc[mb][2] += sc1 * tmp[mb][2];
    acc[mb][3] += sc1 * tmp[mb][3];
  }
#endif
}

__device__ __forceinline__ float bf_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(u32 w) { return __uint_as_float(w & 0xFFFF0000u); }

// The low-rank term (the engine's unmerged LoRA): out += (h * sel) @ bt.T with h = x A, all in the kernel.
//
// Producers: the grid's first P CTAs compute h = x A (A [K, R] bf16, each CTA a range of K, partial sums in fp32 to
// a workspace slot of its own); the last producer to finish (a counter, which it resets) adds the P slots in a fixed
// order and writes h rounded to bf16 (as the separate matmul it replaces gave it) over a buffer that holds a
// sentinel (a NaN the producer never writes) between calls. The other CTAs compute the Int4 product as the plain
// build does and, in split 0 of each tile, read h only after their main loop, by when the producers (a few
// microseconds of work) are done: they poll h itself until no sentinel is left, one L2 round trip when it is there
// (a flag and then h took two, and the counter below a third: ~5 us a Linear on the H200, NOTES step 39). So x A
// costs no launch and little time (two cuBLAS kernels a Linear before, ~5.9 us). The wait relies on CTAs being
// dispatched in the order of their index, as CUTLASS's serial split-K does: the producers, first, are resident
// before any CTA that waits for them. The last of the T waiting CTAs (a counter its last warp checks when it is
// done) writes the sentinel back for the next call (graph replays).
//
// The epilogue: each warp adds its share of the rank's columns (16-byte pieces warp, warp + WARPS, ...) to its
// accumulators before the CTA's warps are summed, so no warp does all R products alone after the main loop (one
// warp did before: ~2.3 us a Linear, NOTES step 19). bt's 16 rows and sel are copied into shared memory by
// cp.async when the kernel starts; h after the wait.
#define LRMAX __LRMAX__
#define LSTRIDE (LRMAX + 8)  // a shared row's length: rows 272 bytes apart fall on different banks
#define LROWS 4              // batch rows a producer pass accumulates (registers: LROWS x 8 floats a thread)
#define H_EMPTY 0xFFC1u      // lh between calls: a NaN that h_value never writes (mma_gemv.H_EMPTY)
#define H_NAN 0x7FFFu
__device__ __forceinline__ u16 h_value(float s) {  // h as bf16, never the sentinel
  const u16 v = f2bf(s);
  return v == H_EMPTY ? (u16)H_NAN : v;
}
__device__ __forceinline__ U4 ld_volatile(const void* p) {
  U4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ bool has_empty(u32 w) { return (w & 0xFFFFu) == H_EMPTY || (w >> 16) == H_EMPTY; }

// this warp's share of sum_j h[j] sel[j] bt[j]: the 16-byte pieces warp, warp + WARPS, ... of the R values
__device__ __forceinline__ float lora_part(const u16* h, const u16* sel, const u16* bt, int pieces, int warp) {
  float s = 0.f;
  for (int q = warp; q < pieces; q += WARPS) {
    const U4 hv = *(const U4*)(h + 8 * q), sv = *(const U4*)(sel + 8 * q), bv = *(const U4*)(bt + 8 * q);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const u32 hw = word_of(hv, i), sw = word_of(sv, i), bw = word_of(bv, i);
      s += bf_lo(hw) * bf_lo(sw) * bf_lo(bw);
      s += bf_hi(hw) * bf_hi(sw) * bf_hi(bw);
    }
  }
  return s;
}

// Producer p of P: the partial sums of h = x A over its range of K for all M rows, into lws[p][M][R]; the last
// producer adds the slots in order and writes h [M, R] bf16 over lh's sentinels. Thread (g, q): piece q of A's rows
// k0 + g, k0 + g + G, ... (G row groups of R / 8 pieces; its 8 loads of A at r=64 and 8 warps all in flight: +1.1-1.6%
// for b1_512_adapter against two rounds of 4, NOTES step 42); the groups are summed in shared memory in a fixed order.
__device__ void lora_produce(int p, int P, const u16* __restrict__ lx, int lx_stride, const u16* __restrict__ la,
                             int M, int K, int R, float* __restrict__ lws, u16* __restrict__ lh, int* lcnt,
                             float* part) {
  const int tid = threadIdx.x, threads = WARPS * 32;
  const int pieces = R >> 3, G = threads / pieces;
  const int q = tid % pieces, g = tid / pieces;
  const int k0 = (int)((long long)K * p / P), k1 = (int)((long long)K * (p + 1) / P);
  for (int m0 = 0; m0 < M; m0 += LROWS) {
    float acc[LROWS][8];
#pragma unroll
    for (int mm = 0; mm < LROWS; ++mm)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[mm][i] = 0.f;
    if (g < G) {
#pragma unroll 8
      for (int k = k0 + g; k < k1; k += G) {
        const uint4 a4 = __ldg((const uint4*)(la + (size_t)k * R) + q);
        const U4 av = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
        for (int mm = 0; mm < LROWS; ++mm) {
          if (m0 + mm < M) {
            const float xv = bf_lo(__ldg(lx + (size_t)(m0 + mm) * lx_stride + k));
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              acc[mm][2 * i] += xv * bf_lo(word_of(av, i));
              acc[mm][2 * i + 1] += xv * bf_hi(word_of(av, i));
            }
          }
        }
      }
    }
#pragma unroll
    for (int mm = 0; mm < LROWS; ++mm) {
      if (m0 + mm >= M) continue;  // (the same for every thread: the barriers stay uniform)
      __syncthreads();  // part is free
      if (g < G) {
#pragma unroll
        for (int i = 0; i < 8; ++i) part[g * R + 8 * q + i] = acc[mm][i];
      }
      __syncthreads();
      for (int j = tid; j < R; j += threads) {
        float s = 0.f;
#pragma unroll 8
        for (int gg = 0; gg < G; ++gg) s += part[gg * R + j];
        __stcg(lws + ((size_t)p * M + m0 + mm) * R + j, s);
      }
    }
  }
  __threadfence();
  __syncthreads();
  __shared__ int last;
  if (tid == 0) last = atomicAdd(lcnt, 1) == P - 1;
  __syncthreads();
  if (!last) return;
  if (tid == 0) lcnt[0] = 0;  // every producer has arrived: ready for the next call
  __threadfence();
  // the P slots summed in a fixed order: when the M R sums are fewer than the threads, S threads share one, each
  // a stride-S subset of the slots (its loads in flight together: one after another, 54 slots on the 14B's
  // mlp.c_proj kept the tiles waiting), then the S subtotals in order
  const int O = M * R, S = O < threads ? threads / O : 1;
  const int s_of = tid / O;
  for (int i = tid % O; i < O && s_of < S; i += (S == 1 ? threads : O)) {
    float s = 0.f;
#pragma unroll 8
    for (int pp = s_of; pp < P; pp += S) s += __ldcg(lws + (size_t)pp * O + i);
    if (S == 1)
      lh[i] = h_value(s);
    else
      part[s_of * O + i] = s;
  }
  if (S > 1) {
    __syncthreads();
    for (int i = tid; i < O; i += threads) {
      float s = 0.f;
      for (int k = 0; k < S; ++k) s += part[k * O + i];
      lh[i] = h_value(s);
    }
  }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
gptq_mma_gemv(const U4* __restrict__ wpack, const u16* __restrict__ x, const u16* __restrict__ scales,
              const int* __restrict__ qzeros, u16* __restrict__ out, float* __restrict__ ws,
              int* __restrict__ counters, int M, int N, int K, int zero_add, int x_stride,
              const u16* __restrict__ lx, int lx_stride, const u16* __restrict__ la, const u16* __restrict__ lsel,
              const u16* __restrict__ lbt, const u16* __restrict__ lbt2, int R, int R1, int N1, int P,
              float* __restrict__ lws, u16* __restrict__ lh, int lh_stride, int* __restrict__ lcnt,
              const u16* __restrict__ bias, int has_bias) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r = lane >> 2, t = lane & 3;
#if LORA
  // a 1-D grid: P producers of h = x A, then the tiles' CTAs (tile fastest, as the plain build's (T, splits) grid)
  __shared__ __align__(16) float l_part[WARPS * 32 * 8];
  if ((int)blockIdx.x < P) {
    lora_produce(blockIdx.x, P, lx, lx_stride, la, M, K, R, lws, lh, lcnt, l_part);
    return;
  }
  const int T = N >> 4;
  const int tile = ((int)blockIdx.x - P) % T, split = ((int)blockIdx.x - P) / T, splits = (gridDim.x - P) / T;
#else
  const int tile = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
#endif
  const int C = K >> 7;
  const int c_begin = (int)((long long)C * split / splits);
  const int c_end = (int)((long long)C * (split + 1) / splits);
  const int n0 = tile << 4;
  const int c0 = c_begin + warp;  // this warp's first chunk; then every WARPS-th
#if LORA
  __shared__ __align__(16) u16 l_bt[16 * LSTRIDE];
  __shared__ __align__(16) u16 l_h[MB * 8 * LSTRIDE];
  __shared__ __align__(16) u16 l_sel[MB * 8 * LSTRIDE];
  const int pieces = R >> 3;  // 16-byte pieces a row of h and sel
  if (split == 0) {  // split 0 of each tile adds the low-rank term
    // this tile's ranks: all R of bt's, or, for two layers side by side (N1 < N), the first R1 columns of h and sel
    // with bt's rows below N1, the rest with bt2's (the other layer's columns are not read: no zero block)
    const int second = n0 >= N1, rb = second ? R - R1 : R1, bpieces = rb >> 3;
    const u16* bt_rows = second ? lbt2 + (size_t)(n0 - N1) * rb : lbt + (size_t)n0 * rb;
    for (int i = threadIdx.x; i < 16 * bpieces; i += WARPS * 32) {
      const int row = i / bpieces, c = (i - row * bpieces) << 3;
      cp_async16(l_bt + row * LSTRIDE + c, bt_rows + (size_t)row * rb + c);
    }
    for (int i = threadIdx.x; i < M * pieces; i += WARPS * 32) {
      const int row = i / pieces, c = (i - row * pieces) << 3;
      cp_async16(l_sel + row * LSTRIDE + c, lsel + (size_t)row * R + c);
    }
    if (P == 0)  // h given (computed before the kernel, rows lh_stride apart): copied now, nothing to wait for later
      for (int i = threadIdx.x; i < M * pieces; i += WARPS * 32) {
        const int row = i / pieces, c = (i - row * pieces) << 3;
        cp_async16(l_h + row * LSTRIDE + c, lh + (size_t)row * lh_stride + c);
      }
  }
#endif
  Cursor p;
  p.w = wpack + ((size_t)tile * C + c0) * 64 + lane * 2;
#if GCHUNKS == 1
  p.s = scales + (size_t)c0 * N + n0 + r;
  p.z = qzeros + (size_t)c0 * (N >> 3) + (n0 >> 3);
#else
  p.s = scales + n0 + r;
  p.z = qzeros + (n0 >> 3);
#endif
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
    p.x[mb] = mb * 8 + r < M ? x + (size_t)(mb * 8 + r) * x_stride + c0 * 128 + (t << 5) : nullptr;
  p.c = c0;
  float acc[MB][4];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) acc[mb][0] = acc[mb][1] = acc[mb][2] = acc[mb][3] = 0.f;

  // This warp's chunks: c_begin + warp + i * WARPS for i < mine.
  const int mine = c_end - c_begin - warp > 0 ? (c_end - c_begin - warp + WARPS - 1) / WARPS : 0;
  // A ring of DEPTH register buffers: the loads of
  // chunk i + DEPTH - 1 are issued before chunk i is computed, so loads stay in flight while the warp computes.
  Chunk buf[DEPTH];
#pragma unroll
  for (int d = 0; d < DEPTH - 1; ++d)
    if (d < mine) load_chunk(buf[d], p, N);
  for (int base = 0; base < mine; base += DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const int i = base + d;
      if (i < mine) {
        const int ahead = i + DEPTH - 1;
        if (ahead < mine)
          load_chunk(buf[(d + DEPTH - 1) % DEPTH], p, N);
        compute_chunk(buf[d], acc, r, zero_add);
      }
    }
  }

#if LORA
  int readers = 0;  // the waiting tiles that had read h before this one (the last warp's thread 0)
  if (split == 0) {
    for (int i = threadIdx.x; i < (P > 0 ? M * pieces : 0); i += WARPS * 32) {
      const int row = i / pieces, c = (i - row * pieces) << 3;
      U4 v = ld_volatile(lh + (size_t)row * lh_stride + c);  // L2: written in this kernel
      while (has_empty(v.x) || has_empty(v.y) || has_empty(v.z) || has_empty(v.w)) {
        __nanosleep(32);
        v = ld_volatile(lh + (size_t)row * lh_stride + c);
      }
      *(U4*)(l_h + row * LSTRIDE + c) = v;
    }
    cp_async_wait_all();  // this thread's copies of bt and sel (and h, given); the barrier makes every thread's visible
    __syncthreads();
    // counted now, its answer used only when the last warp is done (the round trip overlaps the work below)
    if (P > 0 && threadIdx.x == (WARPS - 1) * 32) readers = atomicAdd(lcnt + 1, 1);
    const int second = n0 >= N1, off = second ? R1 : 0, bpieces = (second ? R - R1 : R1) >> 3;  // (as above)
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int b = mb * 8 + 2 * t + (i & 1), n = n0 + r + 8 * ((i >> 1) & 1);
        if (b < M)
          acc[mb][i] += lora_part(l_h + b * LSTRIDE + off, l_sel + b * LSTRIDE + off, l_bt + (n - n0) * LSTRIDE,
                                  bpieces, warp);
      }
  }
#endif
  // the CTA's warps: sum in shared memory; warp 0 writes (or adds to the split-K workspace)
  __shared__ float red[WARPS][MB * 4][32];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][mb * 4 + i][lane] = acc[mb][i];
  __syncthreads();
#if LORA
  if (P > 0 && split == 0 && warp == WARPS - 1) {  // the last tile to read h writes the sentinel back for the next call
    const int last_reader = __shfl_sync(0xffffffffu, readers, 0) == (N >> 4) - 1;
    if (last_reader) {
      for (int i = lane; i < M * pieces; i += 32) {
        const int row = i / pieces, c = (i - row * pieces) << 3;
        *(U4*)(lh + (size_t)row * lh_stride + c) = U4{H_EMPTY * 0x10001u, H_EMPTY * 0x10001u, H_EMPTY * 0x10001u,
                                              H_EMPTY * 0x10001u};
      }
      if (lane == 0) lcnt[1] = 0;
    }
  }
#endif
  if (warp != 0) return;
  float v[MB * 4];
#pragma unroll
  for (int i = 0; i < MB * 4; ++i) {
    float s = 0.f;
#pragma unroll
    for (int wi = 0; wi < WARPS; ++wi) s += red[wi][i][lane];
    v[i] = s;
  }
  if (splits == 1) {
#pragma unroll
    for (int i = 0; i < MB * 4; ++i) {
      const int b = (i >> 2) * 8 + 2 * t + (i & 1), n = n0 + r + 8 * ((i >> 1) & 1);
      if (b < M) out[(size_t)b * N + n] = f2bf(v[i] + bias_of(bias, has_bias, n));
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < MB * 4; ++i) {
    const int b = (i >> 2) * 8 + 2 * t + (i & 1), n = n0 + r + 8 * ((i >> 1) & 1);
    if (b < M) __stcg(ws + ((size_t)split * M + b) * N + n, v[i]);
  }
  __threadfence();
  __syncwarp();
  int last = 0;
  if (lane == 0) last = atomicAdd(counters + tile, 1) == splits - 1;
  last = __shfl_sync(0xffffffffu, last, 0);
  if (!last) return;
  __threadfence();
#pragma unroll
  for (int i = 0; i < MB * 4; ++i) {
    const int b = (i >> 2) * 8 + 2 * t + (i & 1), n = n0 + r + 8 * ((i >> 1) & 1);
    if (b < M) {
      float s = 0.f;
      for (int sp = 0; sp < splits; ++sp) s += __ldcg(ws + ((size_t)sp * M + b) * N + n);  // a fixed order
      out[(size_t)b * N + n] = f2bf(s + bias_of(bias, has_bias, n));
    }
  }
  if (lane == 0) counters[tile] = 0;
}
"""

_lock = threading.Lock()
_kernels: dict = {}  # (device index, warps, MB, depth, group size, LoRA epilogue) -> the compiled kernel, or why not
_workspaces: dict = {}
# workspaces replaced by larger ones, kept alive: a CUDA graph captured before the growth still launches the kernels
# on the old buffers (their addresses are in the graph), which must not go back to the allocator for other tensors
_retired: list = []


def kernel_source(warps: int, mb: int, depth: int, group_size: int, lora: bool = False) -> str:
    """The CUDA C of one configuration (also compiled without a GPU by benchmarks/mma_sass.py)."""
    return (_SOURCE.replace("__WARPS__", str(warps)).replace("__MB__", str(mb)).replace("__DEPTH__", str(depth))
            .replace("__GCHUNKS__", str(group_size // CHUNK)).replace("__LORA__", str(int(lora)))
            .replace("__LRMAX__", str(LORA_MAX_RANK)))


def _compile(device: torch.device, source: str, name: str = "gptq_mma_gemv"):
    with torch.cuda.device(device):
        return torch.cuda._compile_kernel(source, name, nvcc_options=["-std=c++17"])


def _kernel(device: torch.device, warps: int, mb: int, depth: int, group_size: int, lora: bool = False):
    """The compiled kernel for a configuration (NVRTC, once per device and configuration), or a string saying why
    it could not be compiled (warned once; callers then use another kernel); None when it is not compiled yet
    and the stream is capturing a graph (loading a module there is not a stream operation)."""
    return compiled(device, (warps, mb, depth, group_size, lora), "gptq_mma_gemv",
                    lambda: kernel_source(warps, mb, depth, group_size, lora))


def compiled(device: torch.device, config: tuple, name: str, source,
             instead: str = "decoding uses the other Int4 kernels"):
    """Kernel ``name`` of ``source()`` compiled for ``device`` once per ``config``; what ``_kernel`` says it returns
    (also used by ``mma_gemm.py`` and ``inference/attention_cuda.py``; ``instead``: what runs when it does not
    compile, said in the warning)."""
    key = (device.index, name) + config
    k = _kernels.get(key)
    if k is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        with _lock:
            k = _kernels.get(key)
            if k is None:
                try:
                    k = _compile(device, source(), name)
                except Exception as e:  # NVRTC missing or refusing: the other decode kernels still work
                    detail = " ".join(str(e).split())[:300]
                    k = f"the CUDA kernel {name} did not compile ({type(e).__name__}: {detail})"
                    warnings.warn(f"{k}; {instead}", stacklevel=4)
                _kernels[key] = k
    return k


def compile_error(device: torch.device, group_size: int) -> str | None:
    """Why this kernel cannot be compiled for ``device`` (one configuration tried, and kept); None: it can. Checked
    before a layer makes its repacked copy, so a failure costs no memory."""
    warps, depth, _ = CONFIGS[1]
    k = _kernel(device, warps, 1, depth, group_size)
    return k if isinstance(k, str) else None


def available() -> str | None:
    """Why the kernel cannot run here (None: it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability() < (8, 0):
        return "compute capability below 8.0 (no bf16 tensor cores)"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return f"torch {torch.__version__} has no torch.cuda._compile_kernel (NVRTC)"
    return None


def grown_buffer(kind: str, device: torch.device, fits, make):
    """The device's workspace of ``kind``: kept while ``fits(held)``, else made by ``make(held)`` (held: the one it
    replaces, or None), which only happens outside graph capture (None is returned during one). A replaced workspace
    is kept alive in ``_retired``."""
    key = (kind, device.index if device.index is not None else torch.cuda.current_device())
    held = _workspaces.get(key)
    if held is None or not fits(held):
        if torch.cuda.is_current_stream_capturing():
            return None
        if held is not None:
            _retired.append(held)
        held = _workspaces[key] = make(held)
    return held


def workspace(device: torch.device, splits: int, rows: int, N: int):
    """The split-K workspace (fp32, a [rows, N] slot per split) and tile counters (int32 [N/16], zero) of a device,
    grown on demand outside graph capture. None when they are too small during a capture."""
    need = splits * rows * N

    def make(held):
        size = max(need, held[0].numel() if held else 0, 4 * KERNEL_ROWS * 32768)
        tiles = max(N // 16, held[1].numel() if held else 0, 32768 // 16)
        return (torch.zeros(size, device=device, dtype=torch.float32),
                torch.zeros(tiles, device=device, dtype=torch.int32))

    return grown_buffer("split-K", device, lambda held: held[0].numel() >= need and held[1].numel() >= N // 16, make)


def lora_unfit(low_rank, M: int, K: int, N: int) -> str | None:
    """Why ``mma_gemv``'s epilogue cannot take ``low_rank`` = (a, sel, bt) or (a, sel, bt, h) for x [M, K] and an
    [M, N] output (None: it can). With h [M, R] given (x a computed before the call: rows may be a wider tensor's,
    16-byte aligned), a is not read and may be None. bt may be a pair (bt1 [N1, R1], bt2 [N - N1, R2]) for two
    layers side by side (``mma_gemv``)."""
    a, sel, bt = low_rank[:3]
    h = low_rank[3] if len(low_rank) > 3 else None
    pair = isinstance(bt, tuple)
    if pair and (len(bt) != 2 or not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in bt)):
        return "bt: a tensor, or two 2-d tensors (bt1, bt2) for two layers side by side"
    R = sum(t.shape[-1] for t in bt) if pair else bt.shape[-1]
    if R % 8 or R == 0 or R > LORA_MAX_RANK:
        return f"rank sum {R} (must be a positive multiple of 8, at most {LORA_MAX_RANK})"
    want = {"sel": (sel, (M, R))}
    if pair:
        (N1, R1), R2 = bt[0].shape, bt[1].shape[1]
        if N1 % 16 or not 0 < N1 < N or R1 % 8 or R2 % 8 or not (R1 and R2):
            return (f"bt1 {tuple(bt[0].shape)} and bt2 {tuple(bt[1].shape)} for {N} outputs (the first layer's "
                    "outputs a positive multiple of 16 below N, each rank a positive multiple of 8)")
        want.update(bt1=(bt[0], (N1, R1)), bt2=(bt[1], (N - N1, R2)))
    else:
        want["bt"] = (bt, (N, R))
    if h is None or a is not None:
        want["a"] = (a, (K, R))
    for name, (t, shape) in want.items():
        if t is None or tuple(t.shape) != shape or t.dtype != torch.bfloat16 or not t.is_contiguous() \
                or t.data_ptr() % 16:
            got = "None" if t is None else f"{tuple(t.shape)} {t.dtype}"
            return f"{name} {got} (expected a contiguous, 16-byte aligned bf16 {shape})"
    if h is not None and (tuple(h.shape) != (M, R) or h.dtype != torch.bfloat16 or h.stride(1) != 1
                          or (M > 1 and h.stride(0) % 8) or h.data_ptr() % 16):
        return (f"h {tuple(h.shape)} {h.dtype} strides {tuple(h.stride())} (expected bf16 ({M}, {R}), unit column "
                "stride, rows 16-byte aligned)")
    return None


LORA_ROWS_A_PRODUCER = 256 * 64  # rows of A x rank a producer CTA reads: 32 KB of A (r=64: 8 rows a thread)


def lora_producers(K: int, R: int) -> int:
    """CTAs that compute h = x A in the LoRA build (``R`` the rank sum): ~32 KB of A each."""
    return max(1, -(-K * R // LORA_ROWS_A_PRODUCER))


H_EMPTY = 0xFFC1  # what the kernel's h buffer holds between calls (a bf16 NaN the kernel never writes)


def lora_workspace(device: torch.device, producers: int, rows: int, R: int):
    """(partial sums fp32 [producers * rows * R], h [rows * R] bf16 holding H_EMPTY, counters int32 [2], zero) for the
    LoRA build, grown on demand outside graph capture; None when too small during a capture."""
    need = producers * rows * R

    def make(held):
        size = max(need, held[0].numel() if held else 0, 256 * KERNEL_ROWS * LORA_MAX_RANK)  # 4 MB: K to 32,768
        hsize = max(rows * R, held[1].numel() if held else 0, KERNEL_ROWS * LORA_MAX_RANK)
        return (torch.zeros(size, device=device, dtype=torch.float32),
                torch.full((hsize,), H_EMPTY - 0x10000, device=device, dtype=torch.int16).view(torch.bfloat16),
                torch.zeros(2, device=device, dtype=torch.int32))

    return grown_buffer("lora", device, lambda held: held[0].numel() >= need and held[1].numel() >= rows * R, make)


def check_bias(bias: torch.Tensor | None, N: int, device: torch.device, name: str) -> None:
    """The kernels' bias epilogue takes a contiguous bf16 [N] on the output's device (or None)."""
    if bias is not None and (bias.shape != (N,) or bias.dtype != torch.bfloat16 or not bias.is_contiguous()
                             or bias.device != device):
        raise ValueError(f"{name} bias: {tuple(bias.shape)} {bias.dtype} on {bias.device} (expected a contiguous "
                         f"bf16 ({N},) on {device})")


def split_count(C: int, T: int, warps: int, per_sm: int, sms: int) -> int:
    """CTAs a 16-column tile's C chunks are split over: enough for ``per_sm`` CTAs on every SM of ``sms``, at least
    one chunk a warp."""
    return max(1, min(C // warps if C >= warps else 1, -(-per_sm * sms // T)))


def kernel_input(x2d: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """x as the tensor-core kernels read it (also ``mma_gemm``): columns in the repacked weight's input order
    (act-order weights), unit column stride, rows 16-byte aligned."""
    if perm is not None:
        x2d = x2d.index_select(1, perm)
    if x2d.stride(1) != 1 or x2d.stride(0) % 8 or x2d.data_ptr() % 16:
        x2d = x2d.contiguous()
    return x2d


def kernel_args(x2d: torch.Tensor, wpack: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, zero_add: int,
                out: torch.Tensor, ws: torch.Tensor | None = None, counters: torch.Tensor | None = None,
                lora: tuple | None = None, bias: torch.Tensor | None = None) -> list:
    """The kernel's arguments in its order (x2d already ``kernel_input``'s). ``lora`` = (lx, a, sel, bt, producers,
    lws, lh, lcnt) for the LoRA build: x in A's row order, the operands, the producer count and ``lora_workspace``'s
    tensors; with no producers, lh holds h (given: [M, R] rows at its row stride; a flat buffer: R apart).
    Pointers the call does not use are ``out``."""
    M, K = x2d.shape
    if lora is None:
        lora_args = [out, 0, out, out, out, out, 0, 0, 0, 0, out, out, 0, out]
    else:
        lx, a, sel, bt, producers, lws, lh, lcnt = lora
        R = sel.shape[1]
        # bt1's rows are the first N1 outputs, with h's first R1 columns (unpaired: all of both)
        bt1, bt2 = bt if isinstance(bt, tuple) else (bt, bt)
        R1, N1 = (bt1.shape[1], bt1.shape[0]) if isinstance(bt, tuple) else (R, out.shape[1])
        lh_stride = lh.stride(0) if lh.dim() == 2 else R
        lora_args = [lx, lx.stride(0), a if a is not None else out, sel, bt1, bt2, R, R1, N1, producers, lws, lh,
                     lh_stride, lcnt]
    return [wpack, x2d, scales, qzeros, out, ws if ws is not None else out, counters if counters is not None else out,
            M, out.shape[1], K, zero_add, x2d.stride(0), *lora_args, bias if bias is not None else out,
            int(bias is not None)]


def mma_gemv(x2d: torch.Tensor, wpack: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, zero_add: int,
             group_size: int, perm: torch.Tensor | None = None, config: tuple | None = None,
             low_rank: tuple | None = None, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x2d [M, K] bf16 (M <= KERNEL_ROWS) @ W.T -> [M, N] bf16 with W given by ``repack``'s tensors; None inside a
    graph capture that finds the kernel not compiled or a workspace too small (made only outside captures; the
    caller then uses another kernel).

    ``low_rank`` = (a [K, R], sel [M, R], bt [N, R]), bf16: adds (h * sel) @ bt.T with h = x a rounded to bf16, all
    in the same kernel (the engine's unmerged LoRA: a = the adapters' A side by side, sel the rows' 0/1 adapter
    selection, bt = B with the scaling folded in), summed in fp32 with the product before its one rounding to bf16;
    (a, sel, bt, h): h [M, R] bf16 given, computed before the call (the engine's norm kernel does it for the Linears
    it feeds), so the kernel has no producers and nothing to wait for. bt may be a pair (bt1 [N1, R1], bt2
    [N - N1, R2]) for two layers side by side (``side_by_side``, each with its own adapters): outputs below N1 take
    h's first R1 columns with bt1, the others the rest with bt2 (a block-diagonal bt's product, its zeros not read).
    ``lora_unfit`` says which inputs it takes.
    ``bias`` [N] bf16: added the same way (``check_bias``)."""
    M, K = x2d.shape
    T, C = wpack.shape[:2]
    N = T * 16
    if low_rank is not None and (why := lora_unfit(low_rank, M, K, N)) is not None:
        raise ValueError(f"mma_gemv low_rank: {why}")
    check_bias(bias, N, x2d.device, "mma_gemv")
    x_given = x2d
    x2d = kernel_input(x2d, perm)
    mb = row_blocks(M)
    warps, depth, per_sm = config or config_for(M, K, N, low_rank is not None)
    splits = split_count(C, T, warps, per_sm, torch.cuda.get_device_properties(x2d.device).multi_processor_count)
    kernel = _kernel(x2d.device, warps, mb, depth, group_size, lora=low_rank is not None)
    if kernel is None or isinstance(kernel, str):
        return None
    ws, counters = (None, None)
    if splits > 1:
        held = workspace(x2d.device, splits, M, N)
        if held is None:
            return None
        ws, counters = held
    out = torch.empty(M, N, device=x2d.device, dtype=torch.bfloat16)
    lora, grid = None, (T, splits, 1)
    if low_rank is not None and len(low_rank) > 3 and low_rank[3] is not None:
        _, sel, bt, h = low_rank
        lora, grid = (x2d, None, sel, bt, 0, out, h, out), (T * splits, 1, 1)
    elif low_rank is not None:
        a, sel, bt = low_rank[:3]
        producers = lora_producers(K, a.shape[1])
        held = lora_workspace(x2d.device, producers, M, a.shape[1])
        if held is None:
            return None
        lx = x2d if perm is None else kernel_input(x_given, None)  # the producers read x in A's row order
        lora, grid = (lx, a, sel, bt, producers, *held), (producers + T * splits, 1, 1)
    launch(kernel, grid, (warps * 32, 1, 1), kernel_args(x2d, wpack, scales, qzeros, zero_add, out, ws, counters, lora,
                                                        bias))
    return out
