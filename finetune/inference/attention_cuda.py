"""The decode step's attention in CUDA C, compiled at run time by NVRTC: what ``decode_kernels.rotary_attention``
and ``decode_kernels.decode_attention`` launch on CUDA (the Triton kernels there serve the rest: CPU tests under
the interpreter, a torch without NVRTC, shapes this kernel does not take, ``FINETUNE_ATTENTION_CUDA=0``).

Why CUDA C: one query row a head reads the KV cache at about half the copy rate through the Triton split kernel
(one row of 40 heads at 2,000 keys: ~19 us a layer on an H200, ~2.2 TB/s); Triton interleaves each tile's loads
with the math that waits on them, and its schedule is not ours to change (NOTES step 76). This kernel issues ALL of
a pass's K and V loads before the first score, so a CTA has its whole split in flight: in the probe (step 98,
benchmarks/attention_cuda_probe.py, an H100) split + combine took 7.4 against 9.0 us at 512 keys, 17.4 against 21.4
at 2,000, 107 against 124 at 8 rows of 2,000 and 212 against 232 at 64 rows of 500.

One CTA a (row, head, key split), as the Triton split kernel's programs:
- ROTARY (``rotary_attention``): the query from c_attn's output, rotary and the logN scale rounded where eager
  torch rounds them (each product apart, then the add; the dtype's rounding, then the scale's); the CTA whose split
  holds the row's position first writes the new key (rotated) and value into the cache, which its loads then read.
  Else (``decode_attention``) the query is given.
- The split's keys 0..min(pos, kv_len - 1): a key row (D elements) is read by LPK lanes, one 16-byte vector each; a
  pass's K and V vectors (up to MAX_ROUNDS of each a thread) are loaded into registers by coherent loads (the cache
  was just written), predicated past the split's keys, then a barrier: the math below cannot move above it (ptxas
  sank the loads among the math otherwise, step 98). fp32 dot products, the pass's max over the CTA, p = 2^((s - m)
  log2 e) by ex2.approx.f32, the V sums; the online rescale across passes.
- The part (acc[D], m, l; fp32, slot ((row * H + h) * S + split) * (D + 2)) is the output where the row has one
  split; else the last CTA of the (row, head) to finish (a counter, reset by it) combines the parts (COMBINE), or the
  combine kernel does after the launch (large grids: decode_kernels.ONE_LAUNCH_PROGRAMS). Both combine in one
  function, a channel's sum over the parts in order, so a row's bits do not depend on which of them ran, nor on
  the batch it is in.
Compiled once per (device, dtype, D, key split, positions' type, rotary, scale, combine): a handful in a process.
"""

from __future__ import annotations

import struct

import torch

from finetune.quant import kernel_launch, mma_gemv  # (absolute, as decode_kernels': the tests load that file alone)
from finetune.settings import settings

# 16-byte vectors of K (and as many of V) a thread holds a pass: 64 registers of data. 8 beat the probe's 16 (step 98)
# inside the step on an H100 at 64 rows (-1.3% of the step) and, with 256-key splits, at one row after 2,000 tokens;
# no change at 32 rows after 500 (NOTES step 99): fewer registers, more CTAs an SM.
MAX_ROUNDS = 8
# key splits a row at most (the combine's weights in shared memory): 64K keys at 256-key splits; more runs Triton
MAX_PARTS = 256
_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_POSITIONS = {torch.int64: "long long", torch.int32: "int"}

_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
struct alignas(16) U4 { u32 x, y, z, w; };

#define THREADS __THREADS__
#define SPLIT __SPLIT__
#define D __D__
#define DTYPE __DTYPE__          // 0: bf16, 1: fp16, 2: fp32 (the query's, the cache's and the output's)
#define ROUNDS __ROUNDS__
#define ROTARY __ROTARY__        // 1: q, k and v from c_attn's output; the new key and value written first
#define HAS_SCALE __HAS_SCALE__  // the logN query scale
#define COMBINE __COMBINE__      // 1: the last CTA of a (row, head) combines its parts
#define MAX_PARTS __MAX_PARTS__  // key splits a row at most
#define ELEM_BYTES (DTYPE == 2 ? 4 : 2)
#define LPK (D * ELEM_BYTES / 16)  // lanes a key row: one 16-byte vector each
#define EPV (16 / ELEM_BYTES)      // elements a vector
#define KPR (THREADS / LPK)        // keys a round of the CTA (consecutive rows: one contiguous block)
#define PASS (KPR * ROUNDS)        // keys a pass (all its loads issued before its math)
#define NPASS (SPLIT / PASS)
#define WARPS (THREADS / 32)
#define LOG2E 1.4426950408889634f
#define NEG_INF __int_as_float(0xff800000)  // (NVRTC has no math.h)
#if DTYPE == 2
typedef float elem_t;
#else
typedef u16 elem_t;
#endif
typedef __POS_T__ pos_t;

__device__ __forceinline__ float to_f(elem_t x) {
#if DTYPE == 0
  return __uint_as_float((u32)x << 16);
#elif DTYPE == 1
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x)); return f;
#else
  return x;
#endif
}
// fp32 to the dtype, to nearest even (torch's casts)
__device__ __forceinline__ elem_t from_f(float x) {
#if DTYPE == 0
  u16 r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r;
#elif DTYPE == 1
  u16 r; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r;
#else
  return x;
#endif
}
// Coherent loads (not ld.global.nc: the new key was written by this CTA; and ptxas re-issued .nc loads to save
// registers, sinking them among the math). L1 not allocated: the cache is read once a step. A lane whose key is past
// the split's keys loads nothing (zeros), without a branch.
__device__ __forceinline__ U4 ld_pred(const void* p, bool ok) {
  U4 v;
  asm volatile("{\n.reg .pred q;\nsetp.ne.b32 q, %5, 0;\nmov.b32 %0, 0;\nmov.b32 %1, 0;\nmov.b32 %2, 0;\n"
               "mov.b32 %3, 0;\n@q ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n}\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p), "r"((int)ok) : "memory");
  return v;
}
// L2's copy (the parts were written by other CTAs of this launch, or the launch before)
__device__ __forceinline__ float ld_cg(const float* p) {
  float v; asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ float ld_cg_pred(const float* p, bool ok) {
  float v;
  asm volatile("{\n.reg .pred q;\nsetp.ne.b32 q, %2, 0;\nmov.b32 %0, 0;\n@q ld.global.cg.f32 %0, [%1];\n}\n"
               : "=f"(v) : "l"(p), "r"((int)ok) : "memory");
  return v;
}
__device__ __forceinline__ u32 word_of(const U4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
// element e of a vector as fp32 (16-bit types: the word's low half is the lower address)
__device__ __forceinline__ float elem(const U4& v, int e) {
#if DTYPE == 0
  const u32 w = word_of(v, e >> 1);
  return __uint_as_float((e & 1) ? (w & 0xFFFF0000u) : (w << 16));
#elif DTYPE == 1
  const u32 w = word_of(v, e >> 1);
  return to_f((u16)((e & 1) ? (w >> 16) : (w & 0xFFFFu)));
#else
  return __uint_as_float(word_of(v, e));
#endif
}
// 2^x as Triton's tl.exp computes exp for fp32 (ex2.approx.f32 of x log2 e); 2^-inf = 0
__device__ __forceinline__ float ex2(float x) {
  float y; asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x)); return y;
}
#if ROTARY
// channel c of a head's t after rotary: t cos + rotate_half(t) sin over the first rot channels, each product rounded
// apart and then added (eager torch's two multiplies and its add), fp32; channels past rot pass through
__device__ __forceinline__ float rotated(const elem_t* t, int c, int rot, float cs, float sn) {
  const float x = to_f(t[c]);
  if (c >= rot) return x;
  const int half = rot >> 1;
  const float y = c < half ? -to_f(t[c + half]) : to_f(t[c - half]);
  return __fadd_rn(__fmul_rn(x, cs), __fmul_rn(y, sn));
}
#endif

// One head's output from its S parts (acc[D], m, l each, D + 2 apart) into o[0..D), whichever CTA runs it (the
// launch's last one, or the combine kernel's: every thread of it calls this): each part's m and l into shared memory
// (one round trip), M their max, each part's weight 2^((m - M) log2 e) (0 for a part with no key); then channel c's
// sums over the parts in their order, CHUNK parts' loads in flight at a time. A head with no key at all: 0.
#define CHUNK 16
__device__ __forceinline__ void combine_parts(const float* parts, int S, elem_t* o, int tid, int nthreads,
                                              float* sw, float* sl) {
  for (int s = tid; s < S; s += nthreads) {
    sw[s] = ld_cg(parts + s * (D + 2) + D);
    sl[s] = ld_cg(parts + s * (D + 2) + D + 1);
  }
  __syncthreads();
  float M = NEG_INF;
  for (int s = 0; s < S; ++s) M = fmaxf(M, sw[s]);  // (a max: the same in any order)
  __syncthreads();  // every thread has read the m's before they become weights
  for (int s = tid; s < S; s += nthreads) sw[s] = sw[s] > NEG_INF ? ex2((sw[s] - M) * LOG2E) : 0.f;
  __syncthreads();
  for (int c = tid; c < D; c += nthreads) {
    float a = 0.f, total = 0.f;
    for (int s0 = 0; s0 < S; s0 += CHUNK) {
      float v[CHUNK];
#pragma unroll
      for (int j = 0; j < CHUNK; ++j) v[j] = ld_cg_pred(parts + (s0 + j) * (D + 2) + c, s0 + j < S);
#pragma unroll
      for (int j = 0; j < CHUNK; ++j) {
        if (s0 + j < S) {
          a = fmaf(sw[s0 + j], v[j], a);
          total = fmaf(sw[s0 + j], sl[s0 + j], total);
        }
      }
    }
    o[c] = from_f(total > 0.f ? a / total : 0.f);
  }
}

// This thread's K and V vectors of the pass starting at key p0 (ROUNDS of each), all issued before any is used. A key
// past the split's keys reads nothing (its address the split's first key's, which is in the cache); so does the
// row's new key (``skip``: the writer's first pass, issued before that key is written), taken from shared memory
// after the barrier instead.
__device__ __forceinline__ void issue_pass(U4* kr, U4* vr, const elem_t* kb, const elem_t* vb, int p0, int start,
                                           int end, int grp, int stride_cp, long long skip) {
#pragma unroll
  for (int r = 0; r < ROUNDS; ++r) {
    const int key = p0 + r * KPR + grp;
    kr[r] = ld_pred(kb + (size_t)(key < end ? key : start) * stride_cp, key < end && key != skip);
  }
#pragma unroll
  for (int r = 0; r < ROUNDS; ++r) {
    const int key = p0 + r * KPR + grp;
    vr[r] = ld_pred(vb + (size_t)(key < end ? key : start) * stride_cp, key < end && key != skip);
  }
}

extern "C" __global__ void __launch_bounds__(THREADS, 1) decode_attention_cuda(
    const elem_t* __restrict__ src, const float* __restrict__ cosv, const float* __restrict__ sinv,
    const float* __restrict__ qscale, const pos_t* __restrict__ pos, elem_t* kc, elem_t* vc, float* __restrict__ ws,
    int* __restrict__ cnt, elem_t* __restrict__ out, int scale_bits, int kv_len, int stride_src, int P, int rot,
    int stride_cs, int stride_cr, int stride_ch, int stride_cp, int S, int stride_ob)
{
  // src: c_attn's output [rows, stride_src] (q, k, v of head h at h * D, P + h * D, 2P + h * D) when ROTARY, else the
  // query [rows, stride_src] (head h at h * D); caches [rows, heads, capacity, D] by their strides
  const int sp = blockIdx.x, h = blockIdx.y, row = blockIdx.z, H = gridDim.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int sub = tid % LPK;  // the vector of the key row this lane reads: elements sub * EPV ..
  const int grp = tid / LPK;  // the key of a round this lane's group reads
  __shared__ float sq[D];
  __shared__ __align__(16) elem_t snew[2][D];  // the row's new key (rotated) and value: the writer's first pass reads
  __shared__ float red_m[2][WARPS];
  __shared__ float red_l[WARPS];
  __shared__ float red_acc[WARPS][D];
  __shared__ float sw[MAX_PARTS], sl[MAX_PARTS];
  __shared__ int last;
  const pos_t p = pos[row];
  const size_t cbase = (size_t)row * stride_cr + (size_t)h * stride_ch;
  const elem_t* qsrc = src + (size_t)row * stride_src + h * D;
  // keys 0..pos (the one written this step included), cut at kv_len (a stale slot's position)
  const int n = p + 1 < (pos_t)kv_len ? (int)(p + 1) : kv_len;
  const int start = sp * SPLIT;
  const int end = min(start + SPLIT, n);
  const bool empty = start >= end;  // a split past the row's keys (the same for the whole CTA)
  const elem_t* kb = kc + cbase + sub * EPV;
  const elem_t* vb = vc + cbase + sub * EPV;
#if ROTARY
  // the writer: the split holding the position (the last one for a stale position past kv_len, which no split reads)
  const pos_t last_split = S - 1;
  const bool writer = sp == (p / SPLIT < last_split ? p / SPLIT : last_split);
  const long long skip = writer ? (long long)p : -1;
#else
  const long long skip = -1;
#endif
  // the first pass's K and V loads before anything else: the query's loads and the rotary then overlap them
  U4 kr[ROUNDS], vr[ROUNDS];
  if (!empty) issue_pass(kr, vr, kb, vb, start, start, end, grp, stride_cp, skip);
#if ROTARY
  for (int c = tid; c < D; c += THREADS) {
    const float cs = c < rot ? cosv[(size_t)row * stride_cs + c] : 1.f;
    const float sn = c < rot ? sinv[(size_t)row * stride_cs + c] : 0.f;
    if (!empty) {
      elem_t qr = from_f(rotated(qsrc, c, rot, cs, sn));
#if HAS_SCALE
      qr = from_f(__fmul_rn(to_f(qr), qscale[row]));  // (q.float() * scale).type_as(q)
#endif
      sq[c] = to_f(qr);
    }
    if (writer) {
      const size_t dst = cbase + (size_t)p * stride_cp + c;
      const elem_t kn = from_f(rotated(qsrc + P, c, rot, cs, sn)), vn = qsrc[2 * P + c];
      kc[dst] = kn;
      vc[dst] = vn;
      snew[0][c] = kn;
      snew[1][c] = vn;
    }
  }
#else
  for (int c = tid; c < D; c += THREADS) sq[c] = to_f(qsrc[c]);
#endif
  const float scale = __int_as_float(scale_bits);
  float m = NEG_INF, lsum = 0.f, acc[EPV];
#pragma unroll
  for (int e = 0; e < EPV; ++e) acc[e] = 0.f;
  float qf[EPV];
  if (!empty) {
    __syncthreads();  // sq, snew, and the new key and value in the cache (a later pass reads them there)
#pragma unroll
    for (int e = 0; e < EPV; ++e) qf[e] = sq[sub * EPV + e];
    if (skip >= start && skip < start + PASS) {  // the new key in the first pass (the writer's): from shared memory
      const U4 nk = *reinterpret_cast<const U4*>(&snew[0][sub * EPV]);
      const U4 nv = *reinterpret_cast<const U4*>(&snew[1][sub * EPV]);
#pragma unroll
      for (int r = 0; r < ROUNDS; ++r) {
        if (start + r * KPR + grp == skip) {
          kr[r] = nk;
          vr[r] = nv;
        }
      }
    }
  }
#pragma unroll 1
  for (int ps = 0; ps < NPASS; ++ps) {  // (no pass at all for an empty split)
    const int p0 = start + ps * PASS;
    if (p0 >= end) break;  // (the same for the whole CTA)
    if (ps > 0) {
      issue_pass(kr, vr, kb, vb, p0, start, end, grp, stride_cp, -1);
      __syncthreads();  // (for ptxas: the loads above stay above, the math below stays below; nothing waits here)
    }
    float s[ROUNDS];
    float mx = NEG_INF;
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      float d = 0.f;
#pragma unroll
      for (int e = 0; e < EPV; ++e) d = fmaf(qf[e], elem(kr[r], e), d);
#pragma unroll
      for (int o = LPK / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);  // the key's LPK lanes
      s[r] = (p0 + r * KPR + grp < end) ? d * scale : NEG_INF;
      mx = fmaxf(mx, s[r]);
    }
    // the pass's max over the CTA: across the warp's key groups, then the warps (a buffer a pass parity: the
    // barrier of pass ps + 1 orders pass ps's reads before pass ps + 2's writes)
#pragma unroll
    for (int o = LPK; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (lane == 0) red_m[ps & 1][warp] = mx;
    __syncthreads();
    mx = red_m[ps & 1][0];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) mx = fmaxf(mx, red_m[ps & 1][w]);
    const float m_new = fmaxf(m, mx);  // finite: the pass holds key p0 < end
    const float alpha = ex2((m - m_new) * LOG2E);  // 0 on the first pass (m = -inf)
    lsum *= alpha;
#pragma unroll
    for (int e = 0; e < EPV; ++e) acc[e] *= alpha;
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      const float pr = ex2((s[r] - m_new) * LOG2E);  // a key past the split's keys: 0 (its V loaded as zeros)
      lsum += pr;  // (each of the key's LPK lanes holds it: the CTA sum below takes one lane a group)
#pragma unroll
      for (int e = 0; e < EPV; ++e) acc[e] = fmaf(pr, elem(vr[r], e), acc[e]);
    }
    m = m_new;
  }
  elem_t* o = out + (size_t)row * stride_ob + h * D;
  float* parts = ws + (size_t)(row * H + h) * S * (D + 2);
  float* part = parts + (size_t)sp * (D + 2);
  if (empty) {  // the empty part: m = -inf, l = 0, acc = 0 (S > 1: split 0 holds key 0)
    for (int c = tid; c < D; c += THREADS) part[c] = 0.f;
    if (tid == 0) {
      part[D] = NEG_INF;
      part[D + 1] = 0.f;
    }
  } else {
    // the part: sums over the warp's key groups (lanes LPK apart), then over the warps in a fixed order
#pragma unroll
    for (int o = LPK; o < 32; o <<= 1) {
      lsum += __shfl_xor_sync(0xffffffffu, lsum, o);
#pragma unroll
      for (int e = 0; e < EPV; ++e) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], o);
    }
    if (lane == 0) red_l[warp] = lsum;
    if (lane < LPK) {
#pragma unroll
      for (int e = 0; e < EPV; ++e) red_acc[warp][sub * EPV + e] = acc[e];
    }
    __syncthreads();
    float l = red_l[0];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) l += red_l[w];
    for (int c = tid; c < D; c += THREADS) {
      float a = red_acc[0][c];
#pragma unroll
      for (int w = 1; w < WARPS; ++w) a += red_acc[w][c];
      if (S == 1) {  // the part is the output (the combine of one part gives these bits: its weight is 2^0 = 1)
        o[c] = from_f(l > 0.f ? a / l : 0.f);
      } else {
        part[c] = a;
      }
    }
    if (S == 1) return;
    if (tid == 0) {
      part[D] = m;
      part[D + 1] = l;
    }
  }
#if COMBINE
  __threadfence();  // this thread's share of the part is in L2 before the counter says the part is there
  __syncthreads();
  if (tid == 0) last = atomicAdd(cnt + row * H + h, 1) == S - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  combine_parts(parts, S, o, tid, THREADS, sw, sl);
  if (tid == 0) cnt[row * H + h] = 0;  // (for the next call: every CTA of this head has counted)
#endif
}

extern "C" __global__ void attention_combine_cuda(const float* __restrict__ ws, elem_t* __restrict__ out, int S,
                                                  int stride_ob)
{
  __shared__ float sw[MAX_PARTS], sl[MAX_PARTS];
  const int h = blockIdx.y, row = blockIdx.z, H = gridDim.y;
  combine_parts(ws + (size_t)(row * H + h) * S * (D + 2), S, out + (size_t)row * stride_ob + h * D, threadIdx.x,
                blockDim.x, sw, sl);
}
"""
COMBINE_THREADS = 128


def lanes_a_key(dim: int, elem_bytes: int) -> int:
    """The lanes that read one key row, a 16-byte vector each."""
    return dim * elem_bytes // 16


# a CTA's threads at splits of up to 128 keys, and at longer ones (the probe's best at each, H100, step 98)
SHORT_SPLIT_THREADS = 256
LONG_SPLIT_THREADS = 128


def threads_for(split: int, dim: int, elem_bytes: int) -> int:
    """A CTA's threads: SHORT_SPLIT_THREADS for 64- and 128-key splits and LONG_SPLIT_THREADS for 256, fewer where
    a round of the CTA would hold more keys than the split."""
    threads = SHORT_SPLIT_THREADS if split <= 128 else LONG_SPLIT_THREADS
    while threads > 32 and threads // lanes_a_key(dim, elem_bytes) > split:
        threads //= 2
    return threads


def rounds(split: int, threads: int, dim: int, elem_bytes: int) -> int:
    """Rounds of the CTA a pass (a round: threads / lanes_a_key consecutive keys): the whole split's where it fits."""
    return min(MAX_ROUNDS, split // (threads // lanes_a_key(dim, elem_bytes)))


def unsupported(dtype: torch.dtype, dim: int, pos_dtype: torch.dtype, split: int) -> str | None:
    """Why this kernel does not take a call (None: it does): the dtype, the head size (a power of two whose row is
    16 to 512 bytes: 1 to 32 lanes of 16 bytes), the positions' type, a key split that is not a power of two."""
    if dtype not in _DTYPES:
        return f"dtype {dtype}"
    if pos_dtype not in _POSITIONS:
        return f"positions of dtype {pos_dtype}"
    row_bytes = dim * dtype.itemsize
    if dim & (dim - 1) or not 16 <= row_bytes <= 512:
        return f"head size {dim}"
    if split & (split - 1) or threads_for(split, dim, dtype.itemsize) // lanes_a_key(dim, dtype.itemsize) > split:
        return f"key split {split}"
    return None


_available: list = []  # mma_gemv.available()'s answer, asked once (a decode step's eager calls ask at every layer)


def enabled() -> bool:
    """Whether this process's CUDA decode attention runs here: FINETUNE_ATTENTION_CUDA on, a GPU, NVRTC
    (mma_gemv.available)."""
    if not settings().attention_cuda:
        return False
    if not _available:
        _available.append(mma_gemv.available())
    return _available[0] is None


def serves(device: torch.device, dtype: torch.dtype, dim: int, pos_dtype: torch.dtype, split: int) -> bool:
    """Whether a decode attention call on ``device`` goes through this kernel: ``enabled``, and a call it takes
    (``unsupported``)."""
    return device.type == "cuda" and enabled() and unsupported(dtype, dim, pos_dtype, split) is None


def kernel_source(dtype: torch.dtype, dim: int, split: int, pos_dtype: torch.dtype, rotary: bool, has_scale: bool,
                  combine: bool) -> str:
    """The CUDA C of one configuration (both kernels; also compiled without a GPU by the tests, where NVRTC is at
    hand)."""
    why = unsupported(dtype, dim, pos_dtype, split)
    if why:
        raise ValueError(f"the CUDA decode attention does not take {why}")
    eb = dtype.itemsize
    threads = threads_for(split, dim, eb)
    values = {"THREADS": threads, "SPLIT": split, "D": dim, "DTYPE": _DTYPES[dtype],
              "ROUNDS": rounds(split, threads, dim, eb), "ROTARY": int(rotary), "HAS_SCALE": int(has_scale),
              "COMBINE": int(combine), "POS_T": _POSITIONS[pos_dtype], "MAX_PARTS": MAX_PARTS}
    src = _SOURCE
    for key, value in values.items():
        src = src.replace(f"__{key}__", str(value))
    return src


def float_bits(x: float) -> int:
    """A float's 32 bits as the signed int that kernel_launch passes (the kernel reads them with __int_as_float)."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _kernel(device: torch.device, name: str, config: tuple):
    dtype, dim, split = config[:3]
    threads = threads_for(split, dim, dtype.itemsize)  # (in the key: the module's constants may change, in sweeps)
    # MAX_PARTS too: it sizes the combine's shared arrays, and attention() checks S against the current value
    shape = ("attention", threads, rounds(split, threads, dim, dtype.itemsize), MAX_PARTS)
    return mma_gemv.compiled(device, shape + config, name, lambda: kernel_source(*config),
                             "the decode attention runs the Triton kernels")


def launchable(k_cache: torch.Tensor, v_cache: torch.Tensor, rows: int, S: int, elem_bytes: int) -> bool:
    """Whether a call's launch and loads fit the kernel (else the Triton kernels take it, as they take any of these):
    a grid of at least one CTA, its rows in gridDim.z (65,535 at most); the caches' 16-byte vector loads aligned
    (each base, and the row, head and key strides whole vectors); the strides within the C ints kernel_launch
    passes."""
    if not 0 < rows <= 65535 or S < 1:
        return False
    strides = k_cache.stride()[:3]
    vector = 16 // elem_bytes
    return (k_cache.data_ptr() % 16 == 0 and v_cache.data_ptr() % 16 == 0 and max(strides) < 2**31
            and all(s % vector == 0 for s in strides))


def attention(src: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, query_scale: torch.Tensor | None,
              pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ws: torch.Tensor,
              counters: torch.Tensor | None, out: torch.Tensor, scale: float, kv_len: int, split: int, S: int,
              heads: int, dim: int) -> bool:
    """One decode step's attention through this kernel, into ``out`` [b, 1, heads * D]; False (nothing launched) where
    the kernel is not compiled and cannot be now (a failed compile, warned once; or a graph capture before its first
    call), and the caller runs the Triton kernels. ``src``: c_attn's output [b, 3 * heads * D] when ``cos`` is given
    (rotary, logN scale, the cache write: ``rotary_attention``), else the query [b, heads * D]. ``counters``: the
    per-(row, head) counters when the last CTA combines the parts (S > 1), else None (the combine kernel runs after).
    Operands are checked by the callers (decode_kernels)."""
    b = src.shape[0]
    if S > MAX_PARTS or not launchable(k_cache, v_cache, b, S, src.dtype.itemsize):
        return False
    rotary = cos is not None
    combine = counters is not None
    config = (src.dtype, dim, split, pos.dtype, rotary, query_scale is not None, combine)
    kernel = _kernel(src.device, "decode_attention_cuda", config)
    combiner = _kernel(src.device, "attention_combine_cuda", config) if S > 1 and not combine else True
    if not kernel or isinstance(kernel, str) or not combiner or isinstance(combiner, str):
        return False
    threads = threads_for(split, dim, src.dtype.itemsize)
    P = heads * dim
    cs = cos if rotary else src  # (not read without rotary; any device pointer)
    args = (src, cs, sin if rotary else src, query_scale if query_scale is not None else cs, pos, k_cache, v_cache,
            ws, counters if combine else pos, out, float_bits(float(scale)), kv_len, src.stride(0), P,
            cos.shape[1] if rotary else 0, cs.stride(0) if rotary else 0, k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), S, out.stride(0))
    kernel_launch.launch(kernel, (S, heads, b), (threads, 1, 1), args)
    if S > 1 and not combine:
        kernel_launch.launch(combiner, (1, heads, b), (COMBINE_THREADS, 1, 1), (ws, out, S, out.stride(0)))
    return True


__all__ = ["attention", "serves", "unsupported", "kernel_source"]
