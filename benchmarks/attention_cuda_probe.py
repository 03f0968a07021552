"""A CUDA C split-KV decode attention for one query row a head (NOTES step 98), against the Triton split kernel.

Question: can a kernel that issues ALL of a split's K and V loads before any dependent math read the KV cache at a
much larger share of the copy rate than decode_kernels._dec_attn_split_kernel (one row, 40 heads of 128, 2,000 keys:
~19 us a layer on an H200, ~2.2 TB/s, half the copy rate)? Each CTA computes one (row, head, split) part and writes it
where the Triton split kernel writes it (acc[128], m, l, fp32, slot ((row*H+h)*S+sp)*(BLOCK_D+2)), so the unchanged
Triton combine kernel makes the output.

The kernel (``kernel_source``): a key row (128 elements) is read by LPK lanes, one 16-byte vector each (16 lanes for
bf16: a warp reads two 256-byte rows a round, a CTA THREADS / 16 consecutive rows: coalesced). A pass's K and V
loads are ALL issued (predicated, no branch) before the first score, so a CTA has 2 x PASS x 256 bytes in flight;
the pass is the whole split except where noted. Two ways to hold them (``MODES``):
- "reg": in registers (at most MAX_ROUNDS vectors of K and as many of V a thread: bf16 SPLIT 256 at 128 threads
  takes 2 passes; fp32 passes are 64 keys at 128 threads, 128 at 256). ptxas interleaves such loads with the math
  that uses them unless forced: .nc loads were re-issued and sunk, and the scores' FMAs were hoisted between the
  loads (each waiting on memory before the next loads issue). So the loads are coherent ones, followed by a
  barrier, and q comes through shared memory read after it (the math cannot move above it): `--ptx-only` checks
  that every 16-byte load of the pass comes before the first FMA in the SASS.
- "cpa": cp.async into shared memory (64 KiB of K and V at most: bf16 SPLIT 256 takes 2 passes), K and V as two
  commit groups, the scores as soon as K's group lands; each thread reads back only what it copied (no barrier).
Then: scores (fp32 FMAs and warp shuffles), the pass's max across the CTA (shared memory), p = 2^((s - m) log2 e)
by ex2.approx.f32 (what Triton's tl.exp lowers to for fp32), the V sums; across passes the usual online rescale. A
split past the row's keys loads nothing and stores m = -inf, l = 0, acc = 0, as the Triton kernel's empty loop does.

    python3 benchmarks/attention_cuda_probe.py --out $OUT/attention_cuda_probe.json   # GPU: checks, then timings
    TRITON_INTERPRET=1 python3 benchmarks/attention_cuda_probe.py --check              # CPU: the reference's layout
    python3 benchmarks/attention_cuda_probe.py --ptx-only --nvrtc /tmp/nvrtc/x/nvidia/cuda_nvrtc/lib/libnvrtc.so.12
      # no GPU: every variant compiled by NVRTC for compute_90 and assembled by Triton's ptxas (registers, spills)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

if "--check" in sys.argv:  # triton's interpreter is chosen when triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from finetune.inference.attention_cuda import float_bits  # noqa: E402  (the engine's kernel passes its scale alike)

HEADS, D, LAYERS = 40, 128, 8
SPLITS, THREADS = (64, 128, 256), (128, 256)
MAX_ROUNDS = 16  # 16-byte vectors of K (and as many of V) a thread holds a pass: 128 registers of data
# (name, rows' key counts): kv_len is the count rounded up to 256 (decode_attention_probe's "exact" grid)
CASES = {
    "b1_n512": [512],
    "b1_n2000": [2000],
    "b1_n4000": [4000],
    "b8_n2000": [2000] * 8,
    "b64_n500": [500] * 64,
}
# correctness cases: (name, rows' positions, kv_len); mixed: an empty row's first key, a split's edges, a position
# past kv_len (a stale slot: its keys are cut at kv_len)
CHECKS = {
    "b1_n512": ([511], 512),
    "b1_n2000": ([1999], 2048),
    "b1_n4000": ([3999], 4096),
    "b8_mixed": ([0, 1, 63, 64, 255, 256, 1999, 2100], 2048),
}
TOL = {torch.bfloat16: 1.6e-2, torch.float32: 1e-4}  # max |out - ref|: ~2 bf16 ulps at |out| ~ 1; fp32 sums
LOG2E = 1.4426950408889634

_SOURCE = r"""
typedef unsigned int u32;
struct alignas(16) U4 { u32 x, y, z, w; };

#define MODE __MODE__              // 0: the pass's vectors in registers; 1: copied into shared memory (cp.async)
#define THREADS __THREADS__
#define SPLIT __SPLIT__
#define ELEM_BYTES __ELEM_BYTES__
#define ROUNDS __ROUNDS__
#define D 128
#define LPK (D * ELEM_BYTES / 16)  // lanes a key row: one 16-byte vector each (16 for bf16, 32 for fp32)
#define EPV (16 / ELEM_BYTES)      // elements a vector
#define KPR (THREADS / LPK)        // keys a round of the CTA (consecutive rows: one contiguous block)
#define PASS (KPR * ROUNDS)        // keys a pass (all its loads issued before its math)
#define NPASS (SPLIT / PASS)
#define WARPS (THREADS / 32)
#define LOG2E 1.4426950408889634f
#define NEG_INF __int_as_float(0xff800000)  // (NVRTC has no math.h)
#if ELEM_BYTES == 2
typedef unsigned short elem_t;
#else
typedef float elem_t;
#endif
typedef __POS_T__ pos_t;

#if MODE == 0
// Coherent loads (not ld.global.nc): ptxas re-issued .nc loads to save registers and sank them among the math, and
// may not move these below the barrier that follows them. L1 not allocated: the cache is read once a step. A lane
// whose key is past the split's keys loads nothing (zeros), without a branch.
__device__ __forceinline__ U4 ld_pred(const void* p, bool ok) {
  U4 v;
  asm volatile("{\n.reg .pred q;\nsetp.ne.b32 q, %5, 0;\nmov.b32 %0, 0;\nmov.b32 %1, 0;\nmov.b32 %2, 0;\n"
               "mov.b32 %3, 0;\n@q ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n}\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p), "r"((int)ok) : "memory");
  return v;
}
#else
// 16 bytes global -> shared, L2 only; src-size 0 (a key past the split's keys) reads nothing and writes zeros
__device__ __forceinline__ void cp_pred(u32 dst, const void* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
__device__ __forceinline__ U4 lds(u32 a) {
  U4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a)
               : "memory");
  return v;
}
#endif
__device__ __forceinline__ u32 word_of(const U4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
// element e of a vector as fp32 (bf16: the word's low half is the lower address)
__device__ __forceinline__ float elem(const U4& v, int e) {
#if ELEM_BYTES == 2
  const u32 w = word_of(v, e >> 1);
  return __uint_as_float((e & 1) ? (w & 0xFFFF0000u) : (w << 16));
#else
  return __uint_as_float(word_of(v, e));
#endif
}
// 2^x as Triton's tl.exp computes exp for fp32 (ex2.approx.f32 of x log2 e); 2^-inf = 0
__device__ __forceinline__ float ex2(float x) {
  float y; asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x)); return y;
}

extern "C" __global__ void __launch_bounds__(THREADS, 1) attn_split_cuda(
    const elem_t* __restrict__ q, const elem_t* __restrict__ kc, const elem_t* __restrict__ vc,
    const pos_t* __restrict__ pos, float* __restrict__ ws, int scale_bits, int kv_len,
    int stride_qb, int stride_cr, int stride_ch, int stride_cp, int S)
{
  const int sp = blockIdx.x, h = blockIdx.y, row = blockIdx.z, H = gridDim.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int sub = tid % LPK;  // the vector of the key row this lane reads: elements sub * EPV ..
  const int grp = tid / LPK;  // the key of a round this lane's group reads
  float* part = ws + ((size_t)(row * H + h) * S + sp) * (D + 2);
  __shared__ float red_m[2][WARPS];
  __shared__ float red_l[WARPS];
  __shared__ float red_acc[WARPS][D];
  // keys 0..pos (the one written this step included), cut at kv_len (a stale slot's position)
  const long long p1 = (long long)pos[row] + 1;
  const int n = p1 < kv_len ? (int)p1 : kv_len;
  const int start = sp * SPLIT;
  const int end = min(start + SPLIT, n);
  if (start >= end) {  // past the row's keys: the empty part, no loads (as the Triton kernel's empty loop)
    if (tid < D) part[tid] = 0.f;
    if (tid == 0) { part[D] = NEG_INF; part[D + 1] = 0.f; }
    return;
  }
  const size_t cbase = (size_t)row * stride_cr + (size_t)h * stride_ch + sub * EPV;
  const elem_t* kb = kc + cbase;
  const elem_t* vb = vc + cbase;
#if MODE == 1
  // K then V of a pass, key rows of 256 (bf16) bytes in order; a thread reads back only the vectors it copied
  extern __shared__ __align__(16) unsigned char stage[];
  const u32 sk = (u32)__cvta_generic_to_shared(stage) + (grp * LPK + sub) * 16;
  const u32 sv = sk + PASS * D * ELEM_BYTES;
#endif
  // q through shared memory, read back after the first barrier: in registers, ptxas hoisted the scores' math
  // above that barrier, between the loads, where each waited on a load before the next loads could issue
  __shared__ float sq[D];
  if (tid < D) {
    const elem_t x = q[(size_t)row * stride_qb + h * D + tid];
#if ELEM_BYTES == 2
    sq[tid] = __uint_as_float((u32)x << 16);
#else
    sq[tid] = x;
#endif
  }
  float qf[EPV];
  const float scale = __int_as_float(scale_bits);
  float m = NEG_INF, lsum = 0.f, acc[EPV];
#pragma unroll
  for (int e = 0; e < EPV; ++e) acc[e] = 0.f;

#pragma unroll 1
  for (int ps = 0; ps < NPASS; ++ps) {
    const int p0 = start + ps * PASS;
    if (p0 >= end) break;  // (the same for the whole CTA)
    // every K load of the pass, then every V load: nothing below waits on memory until all are in flight (a key
    // past the split's keys reads nothing; its address is the split's first key's, which is in the cache)
#if MODE == 0
    U4 kr[ROUNDS], vr[ROUNDS];
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      const int key = p0 + r * KPR + grp;
      kr[r] = ld_pred(kb + (size_t)(key < end ? key : start) * stride_cp, key < end);
    }
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      const int key = p0 + r * KPR + grp;
      vr[r] = ld_pred(vb + (size_t)(key < end ? key : start) * stride_cp, key < end);
    }
    __syncthreads();  // (for ptxas: the loads above stay above, the math below stays below; nothing waits here)
    if (ps == 0) {
#pragma unroll
      for (int e = 0; e < EPV; ++e) qf[e] = sq[sub * EPV + e];
    }
#else
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      const int key = p0 + r * KPR + grp;
      cp_pred(sk + r * KPR * D * ELEM_BYTES, kb + (size_t)(key < end ? key : start) * stride_cp, key < end);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      const int key = p0 + r * KPR + grp;
      cp_pred(sv + r * KPR * D * ELEM_BYTES, vb + (size_t)(key < end ? key : start) * stride_cp, key < end);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("cp.async.wait_group 1;" ::: "memory");  // this thread's K copies (V's still in flight)
    if (ps == 0) {
      __syncthreads();  // (sq)
#pragma unroll
      for (int e = 0; e < EPV; ++e) qf[e] = sq[sub * EPV + e];
    }
#endif
    float s[ROUNDS];
    float mx = NEG_INF;
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
#if MODE == 0
      const U4 kv = kr[r];
#else
      const U4 kv = lds(sk + r * KPR * D * ELEM_BYTES);
#endif
      float d = 0.f;
#pragma unroll
      for (int e = 0; e < EPV; ++e) d = fmaf(qf[e], elem(kv, e), d);
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
#if MODE == 1
    asm volatile("cp.async.wait_group 0;" ::: "memory");  // this thread's V copies
#endif
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
#if MODE == 0
      const U4 vv = vr[r];
#else
      const U4 vv = lds(sv + r * KPR * D * ELEM_BYTES);
#endif
      const float p = ex2((s[r] - m_new) * LOG2E);  // a key past the split's keys: 0 (its V loaded as zeros)
      lsum += p;  // (each of the key's LPK lanes holds it: the CTA sum below takes one lane a group)
#pragma unroll
      for (int e = 0; e < EPV; ++e) acc[e] = fmaf(p, elem(vv, e), acc[e]);
    }
    m = m_new;
  }
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
  if (tid < D) {
    float a = red_acc[0][tid];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) a += red_acc[w][tid];
    part[tid] = a;
  }
  if (tid == 0) {
    float l = red_l[0];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) l += red_l[w];
    part[D] = m;
    part[D + 1] = l;
  }
}
"""


# -- variants ------------------------------------------------------------------------------------------------
# (mode, split, threads): "reg" holds a pass's vectors in registers (MAX_ROUNDS a thread and tensor at most), "cpa"
# copies them into shared memory with cp.async (STAGE_BYTES of K and V at most: 3 CTAs an SM)
MODES = ("reg", "cpa")
STAGE_BYTES = 65536
VARIANTS = [(m, s, t) for m in MODES for s in SPLITS for t in THREADS]


def lanes_a_key(elem_bytes: int) -> int:
    return D * elem_bytes // 16


def rounds(mode: str, split: int, threads: int, elem_bytes: int) -> int:
    """Rounds of the CTA a pass (a round: THREADS / lanes_a_key consecutive keys): the whole split's where it fits."""
    keys_a_round = threads // lanes_a_key(elem_bytes)
    if mode == "reg":
        return min(MAX_ROUNDS, split // keys_a_round)
    return min(split, STAGE_BYTES // (2 * D * elem_bytes)) // keys_a_round


def pass_keys(mode: str, split: int, threads: int, elem_bytes: int) -> int:
    return threads // lanes_a_key(elem_bytes) * rounds(mode, split, threads, elem_bytes)


def shared_bytes(mode: str, split: int, threads: int, elem_bytes: int) -> int:
    """The dynamic shared memory a CTA takes (the cp.async stage of K and V)."""
    return 2 * pass_keys(mode, split, threads, elem_bytes) * D * elem_bytes if mode == "cpa" else 0


def kernel_source(mode: str, split: int, threads: int, elem_bytes: int = 2, pos64: bool = True) -> str:
    """The CUDA C of one variant: registers or cp.async, keys a split, threads a CTA, cache and query element size
    (2: bf16, 4: fp32), and the positions' type (int64 or int32)."""
    if mode not in MODES or split not in SPLITS or threads not in THREADS or elem_bytes not in (2, 4):
        raise ValueError(f"variant {mode} split={split} threads={threads} elem_bytes={elem_bytes}: not the probe's")
    return (_SOURCE.replace("__MODE__", str(MODES.index(mode))).replace("__THREADS__", str(threads))
            .replace("__SPLIT__", str(split)).replace("__ELEM_BYTES__", str(elem_bytes))
            .replace("__ROUNDS__", str(rounds(mode, split, threads, elem_bytes)))
            .replace("__POS_T__", "long long" if pos64 else "int"))


def variant_name(mode: str, split: int, threads: int) -> str:
    return f"{mode}_s{split}_t{threads}"


# -- the reference: what the kernel computes, in torch ------------------------------------------------------------
def reference_parts(q, k_cache, v_cache, pos, scale: float, kv_len: int, split: int, pass_len: int | None = None):
    """The split kernel's workspace, in fp32 torch (any device): for each (row, head, split) slot
    ((row * H + h) * S + sp) * (BLOCK_D + 2), acc[BLOCK_D] = sum_j exp(s_j - m) v_j, m = max_j s_j, l = sum_j
    exp(s_j - m) over the split's keys j < min(pos + 1, kv_len), s_j = (q . k_j) scale; an empty split m = -inf,
    l = 0, acc = 0. ``pass_len``: the CUDA kernel's passes (each pass's max and sums, rescaled online), else one
    pass. q [b, H, 1, D]; caches [slots, H, capacity, D]. Returns (ws flat fp32, S)."""
    b, H, _, Dq = q.shape
    block_d = 1 << (Dq - 1).bit_length()
    S = -(-kv_len // split)
    P = pass_len or split
    L = S * split
    inf = float("-inf")

    def keys(cache):  # [b, H, L, D] fp32, zeros past the cache's capacity
        t = cache[:b, :, :min(L, cache.shape[2])].float()
        return torch.nn.functional.pad(t, (0, 0, 0, L - t.shape[2]))

    k, v = keys(k_cache), keys(v_cache)
    n = torch.clamp(pos[:b].to(torch.int64) + 1, max=kv_len)
    valid = torch.arange(L, device=q.device)[None, :] < n[:, None]  # [b, L]
    s = torch.einsum("bhd,bhld->bhl", q[:, :, 0].float(), k) * scale
    s = torch.where(valid[:, None, :], s, inf).view(b, H, S, split // P, P)
    v = v.view(b, H, S, split // P, P, Dq)
    m = torch.full((b, H, S), inf, device=q.device)
    lsum = torch.zeros(b, H, S, device=q.device)
    acc = torch.zeros(b, H, S, Dq, device=q.device)
    for i in range(split // P):  # a pass without keys changes nothing (the kernel skips it)
        m_new = torch.maximum(m, s[..., i, :].max(dim=-1).values)
        alpha = torch.where(m_new > inf, torch.exp(m - m_new), 0.0)
        p = torch.where(m_new[..., None] > inf, torch.exp(s[..., i, :] - m_new[..., None]), 0.0)
        lsum = lsum * alpha + p.sum(dim=-1)
        acc = acc * alpha[..., None] + torch.einsum("bhsp,bhspd->bhsd", p, v[..., i, :, :])
        m = m_new
    ws = torch.zeros(b, H, S, block_d + 2, dtype=torch.float32, device=q.device)
    ws[..., :Dq], ws[..., block_d], ws[..., block_d + 1] = acc, m, lsum
    return ws.reshape(-1), S


def reference_combine(ws, b: int, H: int, Dq: int, S: int) -> torch.Tensor:
    """The combine kernel's arithmetic in torch: [b, 1, H * D] fp32 (a head with no key: 0)."""
    block_d = 1 << (Dq - 1).bit_length()
    parts = ws.view(b, H, S, block_d + 2)
    m, lsum, acc = parts[..., block_d], parts[..., block_d + 1], parts[..., :Dq]
    mmax = m.max(dim=2, keepdim=True).values
    w = torch.where(m > float("-inf"), torch.exp(m - mmax), torch.zeros_like(m))
    total = (w * lsum).sum(dim=2)
    out = (w[..., None] * acc).sum(dim=2) / torch.where(total > 0, total, torch.ones_like(total))[..., None]
    return torch.where(total[..., None] > 0, out, torch.zeros_like(out)).reshape(b, 1, H * Dq)


def reference_attention(q, k_cache, v_cache, pos, scale: float, kv_len: int) -> torch.Tensor:
    """Plain softmax attention of each row over its keys 0..min(pos, kv_len - 1), fp64: [b, 1, H * D]."""
    b, H, _, Dq = q.shape
    out = torch.empty(b, H, Dq, dtype=torch.float64, device=q.device)
    for row in range(b):
        n = min(int(pos[row]) + 1, kv_len)
        k, v = k_cache[row, :, :n].double(), v_cache[row, :, :n].double()
        s = torch.einsum("hd,hkd->hk", q[row, :, 0].double(), k) * scale
        out[row] = torch.einsum("hk,hkd->hd", torch.softmax(s, dim=1), v)
    return out.reshape(b, 1, H * Dq)


def make_inputs(positions: list[int], kv_len: int, heads: int, dim: int, dtype, device, seed: int = 0,
                layers: int = 1):
    """q [b, heads, 1, dim] and caches [layers, b, heads, capacity, dim] (capacity: kv_len rounded up to 256, and
    past the largest position) of ``dtype``, positions int64."""
    g = torch.Generator(device=device).manual_seed(seed)  # (made on the device: b64's 8 layers are 5.4 GB)
    b = len(positions)
    cap = -(-max(kv_len, max(positions) + 1) // 256) * 256
    k = torch.randn(layers, b, heads, cap, dim, generator=g, device=device).to(dtype)
    v = torch.randn(layers, b, heads, cap, dim, generator=g, device=device).to(dtype)
    q = torch.randn(b, heads, 1, dim, generator=g, device=device).to(dtype)
    return q, k, v, torch.tensor(positions, dtype=torch.int64, device=device)


# -- CPU check: the reference's layout against the Triton kernels in the interpreter ------------------------------
def _patch_interpreter() -> None:
    """numpy >= 2 and Triton's interpreter (tests/_helpers.interpreter_index_patch)."""
    from triton.runtime import interpreter

    sys.path.insert(0, str(ROOT / "tests"))
    from _helpers import interpreter_index_patch

    if (patched := interpreter_index_patch()) is not None:
        interpreter._patch_lang_tensor = patched


def triton_parts(dk, q, k_cache, v_cache, pos, scale: float, kv_len: int, split: int):
    """The Triton split kernel's workspace at ``split`` (as decode_attention launches it)."""
    b, heads, _, Dq = q.shape
    block_d, split, S, ws, _ = dk._parts(b, heads, Dq, kv_len, split, q)
    dk._dec_attn_split_kernel[(b, heads, S)](q, k_cache, v_cache, pos, ws, float(scale), kv_len, split, q.stride(0),
                                             k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), S, D=Dq,
                                             BLOCK_D=block_d, BLOCK_N=64, num_warps=4)
    return ws, S


def combine(dk, ws, S: int, b: int, heads: int, Dq: int, dtype) -> torch.Tensor:
    """The Triton combine kernel over a workspace, as decode_attention launches it: [b, 1, heads * D]."""
    block_d = 1 << (Dq - 1).bit_length()
    out = torch.empty(b, 1, heads * Dq, dtype=dtype, device=ws.device)
    dk._dec_attn_combine_kernel[(b, heads)](ws, out, S, out.stride(0), D=Dq, BLOCK_D=block_d,
                                            BLOCK_S=dk.COMBINE_SPLITS, num_warps=dk.COMBINE_WARPS)
    return out


def compare_parts(ws, ref, block_d: int) -> dict:
    """Max differences of two workspaces: acc and l relative to their part's l, m absolute; m = -inf (and l = 0)
    slot for slot."""
    a, r = ws.view(-1, block_d + 2).double(), ref.view(-1, block_d + 2).double()
    empty_a, empty_r = a[:, block_d] == float("-inf"), r[:, block_d] == float("-inf")
    full = ~empty_r
    lr = r[full, block_d + 1]
    return dict(empty_slots_equal=bool(torch.equal(empty_a, empty_r)),
                empty_parts_zero=bool((a[empty_a, block_d + 1] == 0).all() and (a[empty_a, :block_d] == 0).all()),
                m_abs=float((a[full, block_d] - r[full, block_d]).abs().max()) if full.any() else 0.0,
                l_rel=float(((a[full, block_d + 1] - lr) / lr).abs().max()) if full.any() else 0.0,
                acc_rel=float(((a[full, :block_d] - r[full, :block_d]) / lr[:, None]).abs().max())
                if full.any() else 0.0)


def check_cpu() -> int:
    """The torch reference of the parts (with the kernel's passes) against the Triton split kernel under the
    interpreter, and both combined by the Triton combine kernel against decode_attention and softmax attention:
    small heads, fp32 (the interpreter's bf16 casts truncate). Prints one line a case, ``ok`` or ``FAIL``."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("--check runs under TRITON_INTERPRET=1 (CPU)")
        return 2
    _patch_interpreter()
    from finetune.inference import decode_kernels as dk

    failed = 0
    heads, dim, dtype = 3, D, torch.float32
    cases = [([0], 64, 64, 64), ([200], 256, 64, 64), ([130], 256, 128, 64), ([255], 256, 256, 128),
             ([5, 70, 199, 300], 256, 64, 64), ([5, 70, 199, 300], 256, 128, 32), ([63, 64, 65], 192, 64, 16)]
    for positions, kv_len, split, pass_len in cases:
        q, kc, vc, pos = make_inputs(positions, kv_len, heads, dim, dtype, "cpu", seed=len(positions) + split)
        kc, vc = kc[0], vc[0]
        scale = dim ** -0.5
        ref, S = reference_parts(q, kc, vc, pos, scale, kv_len, split, pass_len)
        tri, S2 = triton_parts(dk, q, kc, vc, pos, scale, kv_len, split)
        diff = compare_parts(tri, ref, D)
        out_ref = combine(dk, ref, S, len(positions), heads, dim, dtype)
        out_torch = reference_combine(ref, len(positions), heads, dim, S)
        out_tri = dk.decode_attention(q, kc, vc, pos, scale, kv_len, split)
        exact = reference_attention(q, kc, vc, pos, scale, kv_len)
        errs = dict(vs_decode_attention=float((out_ref - out_tri).abs().max()),
                    vs_softmax=float((out_ref.double() - exact).abs().max()),
                    torch_combine_vs_softmax=float((out_torch.double() - exact).abs().max()))
        ok = (S == S2 and diff["empty_slots_equal"] and diff["empty_parts_zero"] and diff["m_abs"] < 1e-5
              and diff["l_rel"] < 1e-5 and diff["acc_rel"] < 1e-5 and max(errs.values()) < 1e-5)
        failed += not ok
        print(f"positions={positions} kv_len={kv_len} split={split} pass={pass_len}: {json.dumps({**diff, **errs})}"
              f": {'ok' if ok else 'FAIL'}", flush=True)
    return 1 if failed else 0


# -- the GPU side -------------------------------------------------------------------------------------------------
_compiled: dict = {}


def compiled(variant: tuple, elem_bytes: int, pos64: bool = True):
    """A variant's kernel, compiled by NVRTC for the current device (torch.cuda._compile_kernel, as mma_gemv.py), once;
    the cp.async stage's shared memory opted into past 48 KiB."""
    key = (*variant, elem_bytes, pos64)
    if key not in _compiled:
        kernel = torch.cuda._compile_kernel(kernel_source(*variant, elem_bytes, pos64), "attn_split_cuda",
                                            nvcc_options=["-std=c++17"])
        kernel.set_shared_memory_config(shared_bytes(*variant, elem_bytes))
        _compiled[key] = kernel
    return _compiled[key]


def launch_shared(kernel, grid: tuple, block: tuple, args, shared: int) -> None:
    """kernel_launch.launch with dynamic shared memory: the same packed arguments and current stream."""
    import ctypes

    from finetune.quant import kernel_launch as kl

    buf, params = kl.param_array(kl.param_words(args))
    lib = kl._library()
    rc = lib.cuLaunchKernel(kernel.func, grid[0], grid[1], grid[2], block[0], block[1], block[2], shared,
                            ctypes.c_void_p(kl._current_stream()), params, None)
    if rc:
        name = ctypes.c_char_p()
        lib.cuGetErrorString(rc, ctypes.byref(name))
        raise RuntimeError(f"CUDA error {rc} launching a kernel: {(name.value or b'unknown').decode()}")
    del buf


def cuda_split(variant: tuple, q, k_cache, v_cache, pos, ws, scale: float, kv_len: int, S: int) -> None:
    """The CUDA kernel's parts into ws (the Triton split kernel's layout): grid (splits, heads, rows)."""
    b, heads, _, Dq = q.shape
    if Dq != D or not q.is_contiguous() or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride() \
            or q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError("the CUDA kernel takes D = 128, a contiguous q and caches of q's dtype and one layout")
    elem = q.element_size()
    if any(t.data_ptr() % 16 for t in (q, k_cache, v_cache)) or k_cache.stride(2) * elem % 16:
        raise ValueError("the CUDA kernel's 16-byte loads need 16-byte aligned rows")
    kernel = compiled(variant, elem, pos.dtype == torch.int64)
    launch_shared(kernel, (S, heads, b), (variant[2], 1, 1),
                  [q, k_cache, v_cache, pos, ws, float_bits(scale), kv_len, q.stride(0), k_cache.stride(0),
                   k_cache.stride(1), k_cache.stride(2), S], shared_bytes(*variant, elem))


def cuda_attention(variant: tuple, q, k_cache, v_cache, pos, scale: float, kv_len: int, combine_too: bool = True):
    """decode_attention with the CUDA split kernel: its parts, then the Triton combine kernel (combine_too False:
    the workspace of parts)."""
    from finetune.inference import decode_kernels as dk

    b, heads, _, Dq = q.shape
    block_d, split, S, ws, out = dk._parts(b, heads, Dq, kv_len, variant[1], q)
    cuda_split(variant, q, k_cache, v_cache, pos, ws, scale, kv_len, S)
    if not combine_too:
        return ws
    dk._dec_attn_combine_kernel[(b, heads)](ws, out, S, out.stride(0), D=Dq, BLOCK_D=block_d,
                                            BLOCK_S=dk.COMBINE_SPLITS, num_warps=dk.COMBINE_WARPS)
    return out


def triton_split_only(q, k_cache, v_cache, pos, scale: float, kv_len: int):
    from finetune.inference import decode_kernels as dk

    return triton_parts(dk, q, k_cache, v_cache, pos, scale, kv_len, dk.key_split(q.shape[0], q.shape[1], kv_len))


def check_variant(variant: tuple) -> list[dict]:
    """One variant's parts and combined output against the Triton kernels' and the references, bf16 and fp32."""
    from finetune.inference import decode_kernels as dk

    mode, split, threads = variant
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for case, (positions, kv_len) in CHECKS.items():
            q, kc, vc, pos = make_inputs(positions, kv_len, HEADS, D, dtype, "cuda", seed=kv_len + len(positions))
            kc, vc = kc[0], vc[0]
            scale = D ** -0.5
            ws = cuda_attention(variant, q, kc, vc, pos, scale, kv_len, combine_too=False)
            ws_tri, S = triton_parts(dk, q, kc, vc, pos, scale, kv_len, split)
            ws_ref, _ = reference_parts(q, kc, vc, pos, scale, kv_len, split,
                                        pass_keys(*variant, q.element_size()))
            out = cuda_attention(variant, q, kc, vc, pos, scale, kv_len)
            out_tri = dk.decode_attention(q, kc, vc, pos, scale, kv_len)
            exact = reference_attention(q, kc, vc, pos, scale, kv_len)
            torch.cuda.synchronize()
            parts_ref, parts_tri = compare_parts(ws, ws_ref, D), compare_parts(ws, ws_tri, D)
            err_tri = float((out.float() - out_tri.float()).abs().max())
            err_ref = float((out.double() - exact).abs().max())
            tri_ref = float((out_tri.double() - exact).abs().max())
            ok = (math.isfinite(err_ref) and err_ref <= TOL[dtype] and err_tri <= TOL[dtype]
                  and parts_ref["empty_slots_equal"] and parts_ref["empty_parts_zero"] and parts_ref["l_rel"] < 1e-4
                  and parts_ref["acc_rel"] < 1e-4 and parts_ref["m_abs"] < 1e-4)
            rows.append(dict(kind="check", variant=variant_name(*variant), dtype=str(dtype).split(".")[-1], case=case,
                             ok=ok, max_abs_vs_triton=err_tri, max_abs_vs_fp64=err_ref,
                             triton_max_abs_vs_fp64=tri_ref, parts_vs_torch=parts_ref, parts_vs_triton=parts_tri))
    return rows


def time_case(case: str, keys: list[int], variants: list, calls: int) -> list[dict]:
    """us a layer of the Triton path (split + combine, and its split alone) and of each variant (its split + the
    Triton combine, and its split alone), graphs of ``calls`` calls cycling through LAYERS layers' caches."""
    from finetune.inference import decode_kernels as dk
    from lora_xa_probe import graphed_us

    b, need = len(keys), max(keys)
    kv_len = -(-need // 256) * 256
    q, kc, vc, pos = make_inputs([n - 1 for n in keys], kv_len, HEADS, D, torch.bfloat16, "cuda", layers=LAYERS)
    scale = D ** -0.5
    read = sum(keys) * HEADS * D * 2 * 2  # K and V, bf16
    layer = [0]

    def cycled(fn, *extra):
        def call():
            layer[0] = (layer[0] + 1) % LAYERS
            return fn(q, kc[layer[0]], vc[layer[0]], pos, scale, kv_len, *extra)
        return call

    timed = {"triton": (cycled(dk.decode_attention), dk.key_split(b, HEADS, kv_len)),
             "triton_split_only": (cycled(triton_split_only), dk.key_split(b, HEADS, kv_len))}
    for v in variants:
        timed[variant_name(*v)] = (cycled(lambda *a, v=v: cuda_attention(v, *a)), v[1])
        timed[variant_name(*v) + "_split_only"] = (cycled(lambda *a, v=v: cuda_attention(v, *a, combine_too=False)),
                                                  v[1])
    rows = []
    for name, (fn, split) in timed.items():
        print(json.dumps(dict(kind="timing", name=name)), flush=True)  # (the parent's note of what a fault ended)
        try:
            us = graphed_us(fn, calls=calls, reps=10)
            rows.append(dict(kind="time", case=case, rows=b, kv_len=kv_len, name=name, split=split, us=round(us, 2),
                             gb_s=round(read / us / 1e3, 1)))
        except Exception as e:  # a variant that fails to compile or launch: reported, the others go on
            if "CUDA error" in str(e) or "illegal" in str(e):
                raise  # (a fault: the context is gone; the parent leaves this variant out)
            rows.append(dict(kind="time", case=case, name=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def child(tasks: list[str], calls: int) -> int:
    """Runs tasks ("compile:reg_s128_t128", "check:reg_s128_t128", "time:b1_n2000"), one JSON line each, a "start"
    line before each, so that the parent knows which task a fault ended. An exception ends the child (a CUDA error
    poisons its context): the parent starts a fresh one for the tasks after it."""
    names = {variant_name(*v): v for v in VARIANTS}
    variants = [names[n] for n in os.environ.get("PROBE_VARIANTS", ",".join(names)).split(",") if n]
    broken = set()
    for task in tasks:
        kind, arg = task.split(":", 1)
        print(json.dumps(dict(kind="start", task=task)), flush=True)
        t0 = time.perf_counter()
        try:
            if kind == "compile":
                for elem in (2, 4):
                    try:
                        compiled(names[arg], elem)
                        row = dict(kind="compile", variant=arg, elem_bytes=elem, ok=True)
                    except Exception as e:  # NVRTC's refusal: reported, the variant left out
                        broken.add(arg)
                        row = dict(kind="compile", variant=arg, elem_bytes=elem, ok=False,
                                   error=" ".join(f"{type(e).__name__}: {e}".split())[:2000])
                    row["s"] = round(time.perf_counter() - t0, 2)
                    print(json.dumps(row), flush=True)
            elif kind == "check" and arg not in broken:
                for row in check_variant(names[arg]):
                    print(json.dumps(row), flush=True)
            elif kind == "time":
                keys = CASES[arg]
                time_case(arg, keys, [v for v in variants if variant_name(*v) not in broken],
                          calls if len(keys) == 1 else max(20, calls // 4))  # (~0.1-0.3 ms calls at 8-64 rows)
                torch.cuda.empty_cache()  # (the case's caches, gone with its closures)
            torch.cuda.synchronize()
        except Exception as e:
            print(json.dumps(dict(kind="error", task=task, error=" ".join(f"{type(e).__name__}: {e}".split())[:1000])),
                  flush=True)
            return 3
    return 0


def run_children(tasks: list[str], calls: int, variants: list, deadline: float) -> list[dict]:
    """The tasks in child processes: a task whose child dies (a fault ends the CUDA context) is recorded as
    ``fault`` and the next child starts after it; a variant whose compile or launch faulted is left out after."""
    results: list[dict] = []
    todo = list(tasks)
    live = [variant_name(*v) for v in variants]
    while todo:
        left = deadline - time.time()
        if left < 5:
            results.append(dict(kind="skipped", tasks=todo, why="out of the probe's time"))
            print(json.dumps(results[-1]), flush=True)
            break
        env = dict(os.environ, PROBE_VARIANTS=",".join(live))
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(calls), *todo], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        current = timing = None
        try:
            out, err = proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err = (err or "") + "\n(timed out: the probe's deadline)"
        for line in out.splitlines():
            if not line.startswith("{"):
                continue
            row = json.loads(line)
            if row["kind"] == "start":
                current, timing = row["task"], None
                todo.remove(current)
                continue
            if row["kind"] == "timing":
                timing = row["name"]
                continue
            bad = (row["kind"] == "check" and not row["ok"]) or row["kind"] == "error" or "error" in row
            print(("FAIL " if bad else "") + json.dumps(row), flush=True)
            results.append(row)
            if row["kind"] == "compile" and not row["ok"] and row["variant"] in live:
                print(f"FAIL {row['variant']} does not compile: left out", flush=True)
                live.remove(row["variant"])
                todo = [t for t in todo if t != f"check:{row['variant']}"]
        if proc.returncode and current is not None:
            last = (err.strip().splitlines() or ["no message"])[-1]
            row = dict(kind="fault", task=current, timing=timing, returncode=proc.returncode, error=last[:500])
            print("FAIL " + json.dumps(row), flush=True)
            results.append(row)
            kind, arg = current.split(":", 1)
            if kind == "time" and timing:  # the variant being timed is left out of the next cases
                arg = timing.removesuffix("_split_only")
            if arg in live:  # a variant that faults is not run again
                live.remove(arg)
                todo = [t for t in todo if t != f"check:{arg}"]
        elif proc.returncode:
            print(err[-2000:], file=sys.stderr)
            break
    return results


def summary_table(results: list[dict]) -> str:
    times = [r for r in results if r["kind"] == "time" and "us" in r]
    names = list(dict.fromkeys(r["name"] for r in times if not r["name"].endswith("_split_only")))
    cases = list(dict.fromkeys(r["case"] for r in times))
    by = {(r["case"], r["name"]): r for r in times}
    lines = ["us a layer (split + combine) [TB/s of K+V]: " + " | ".join(["case"] + names)]
    for c in cases:
        cells = [f"{by[c, n]['us']} [{by[c, n]['gb_s'] / 1000:.2f}]" if (c, n) in by else "-" for n in names]
        lines.append(" | ".join([c] + cells))
    return "\n".join(lines)


def ptx_only(nvrtc: str | None) -> int:
    """Every variant (bf16 and fp32, int64 and int32 positions) compiled by NVRTC for compute_90 and assembled for
    sm_90 by Triton's ptxas: registers, spills, and whether all of a pass's 16-byte loads come before the first FMA
    in the SASS (the design's point; else FAIL). Returns 1 on any failure."""
    import ctypes
    import re
    import tempfile

    from mma_sass import assemble_ptx, compile_ptx, find_nvrtc, nvidia_tools

    lib_path = nvrtc or find_nvrtc()
    if not lib_path:
        print("no libnvrtc found: pass --nvrtc (pip download --no-deps nvidia-cuda-nvrtc-cu12, then unzip the wheel)")
        return 2
    lib = ctypes.CDLL(lib_path)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for v, elem, pos64 in [(v, e, p) for v in VARIANTS for e in (2, 4) for p in (True, False)]:
            label = f"{variant_name(*v)} {'bf16' if elem == 2 else 'fp32'} pos{'64' if pos64 else '32'}"
            try:
                ptx = compile_ptx(lib, kernel_source(*v, elem, pos64), "90")
            except RuntimeError as e:
                print(f"{label}: NVRTC failed: {e}")
                failed += 1
                continue
            asm, cubin = assemble_ptx(ptx, "90", Path(tmp), "attn")
            if asm.returncode:
                print(f"{label}: ptxas failed: {asm.stderr.strip()[:1500]}")
                failed += 1
                continue
            info = " ".join(asm.stderr.split())
            regs = re.search(r"Used (\d+) registers", info)
            spill = re.search(r"(\d+) bytes spill stores", info)
            sass = subprocess.run([str(nvidia_tools() / "cuobjdump"), "-sass", str(cubin)], capture_output=True,
                                  text=True, check=True).stdout
            ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?P\d\s+)?([A-Z][A-Z0-9.]*)", sass)
            first_math = next((i for i, op in enumerate(ops) if op.startswith(("FFMA", "FMUL"))), len(ops))
            # the split's 16-byte loads (LDG.E.128 or LDGSTS) issued before the first score's FMA: all of a pass's
            # (2 x rounds) when the loads stay in front of the math
            early = sum(op.startswith(("LDG.E.128", "LDG.E.NA.128", "LDGSTS")) for op in ops[:first_math])
            total = sum(op.startswith(("LDG.E.128", "LDG.E.NA.128", "LDGSTS")) for op in ops)
            ok = early == total == 2 * rounds(*v, elem)
            failed += not ok
            print(f"{label}: {regs.group(1) if regs else '?'} registers, {spill.group(1) if spill else '?'} bytes "
                  f"spilled, {pass_keys(*v, elem)} keys a pass, {shared_bytes(*v, elem)} bytes of stage, "
                  f"{early} of {total} 16-byte loads before the first FMA{'' if ok else ': FAIL'}", flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--check", action="store_true", help="CPU: the torch reference against the Triton interpreter")
    ap.add_argument("--ptx-only", action="store_true", help="no GPU: compile and assemble every variant")
    ap.add_argument("--nvrtc", default=None, help="libnvrtc.so.12 for --ptx-only")
    ap.add_argument("--variants", nargs="+", default=[variant_name(*v) for v in VARIANTS])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--calls", type=int, default=160, help="calls in the timed graph (cycling through the layers)")
    ap.add_argument("--no-check", action="store_true", help="timings only")
    ap.add_argument("--budget-s", type=float, default=140.0, help="stop starting children after this long")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child[1:], int(args.child[0]))
    if args.check:
        return check_cpu()
    if args.ptx_only:
        return ptx_only(args.nvrtc)
    if not torch.cuda.is_available():
        print("attention_cuda_probe.py needs a CUDA device (or --check / --ptx-only)", file=sys.stderr)
        return 2
    t0 = time.time()
    names = {variant_name(*v): v for v in VARIANTS}
    variants = [names[n] for n in args.variants]
    tasks = [f"compile:{variant_name(*v)}" for v in variants]
    if not args.no_check:
        tasks += [f"check:{variant_name(*v)}" for v in variants]
    tasks += [f"time:{c}" for c in args.cases]
    results = run_children(tasks, args.calls, variants, t0 + args.budget_s)
    fails = [r for r in results if r["kind"] == "check" and not r["ok"]] + \
        [r for r in results if r["kind"] in ("fault", "skipped", "error") or (r["kind"] == "compile" and not r["ok"])
         or (r["kind"] == "time" and "error" in r)]
    for r in fails:
        print("FAIL " + json.dumps(r))
    table = summary_table(results)
    print(table)
    checks = [r for r in results if r["kind"] == "check"]
    print(f"checks: {sum(r['ok'] for r in checks)} of {len(checks)} ok; {len(fails)} failures; "
          f"{time.time() - t0:.0f} s")
    if args.out:
        from provenance import git_commit

        Path(args.out).write_text(json.dumps(dict(results=results, summary=table, device=torch.cuda.get_device_name(),
                                                  torch=torch.__version__, commit=git_commit()), indent=1))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
