"""Triton kernel: y = x @ W.T for a few rows (decoding: M <= 64) read straight from the packed GPTQ buffers.

Imported lazily by ``linear.py`` (CUDA only; CPU code never imports triton). At batch 1 a Linear is a
matrix-vector product: the time is the time to read the weight once. The dequantize-then-matmul path
(``triton_dequant.py``) reads 0.5 byte per weight, writes 2 and reads them again; this kernel reads the
packed int32 words (0.5 byte per weight at 4 bits, 1 at 8) plus the zero points and scales once, and never
writes a float weight.

Numerics (first two designs) match ``x @ packing.dequantize_t(..., dtype=x.dtype)`` up to the summation order: each
weight is computed exactly in fp32 as (q - zero) * scale, rounded once to x's dtype, multiplied by x in fp32 and
accumulated in fp32 (CUDA cores, or tensor cores for the ``dot`` / ``USE_DOT`` configs: bf16/fp16 products are
exact in fp32, fp32 inputs use ``input_precision="ieee"``); the output is rounded once. Results are
deterministic: split-K partials are always summed in split order. The third design (``_gemv3_kernel``, "mma"
configs, bf16 only) never rounds a weight: it multiplies x by the exact integers q - zero and scales the fp32
sums, so it matches the exact product (``dequantize_t(..., dtype=torch.float32)``) instead.

Three designs, all candidates of one tuner (``configs_for``):

- The first (``_gemv_kernel``, int-tuple configs): a [BLOCK_K / PER, PER, BLOCK_N] 3-D tile (PER = 32 / bits
  values per word), the integer -> float conversion by the 2**23 trick (bits ``0x4B000000 | q`` are the float
  2**23 + q), then (qf - zf) * scale; split-K partials summed by a second kernel. It reached 23% of the device
  copy rate at one row on an H200 (benchmarks/NOTES.md, Step 5).
- The second (``_gemv2_kernel``, ``("fma" | "dot", ...)`` configs), built to spend fewer instructions per weight
  (at one row an H200 must dequantize ~2 weights per byte read, ~9 T weights/s: the kernel is as much instruction-
  bound as memory-bound): a 2-D [BLOCK_K / PER, BLOCK_N] tile of packed words (N-contiguous: 16-byte loads),
  unpacked one bit position at a time into a 2-D weight tile (no 3-D broadcast, no reshape); each value is moved
  to bits 12.. of the float 1.0 (one shift and one and/or: the float 1 + q / 2048) and dequantized by ONE
  multiply-add, (1 + q / 2048) * (2048 * scale) - (2048 + zero) * scale == (q - zero) * scale, exact (every term
  fits fp32's 24 bits, see ``_scale_terms``), with the two terms computed once per group and column; the
  accumulator keeps one fp32 per word and column and is summed over the words once, after the loop. The K splits
  of an N block are summed inside the same launch: every split stores its fp32 partial, the program that arrives
  last (an atomic counter per N block, reset by that program) adds the partials in split order and writes y (no
  second kernel, still deterministic). The counters are per device (``_counters``). Measured: 21-24% of the copy
  rate at one row (SASS: ~9.5 instructions a weight for "fma", ~6 for "dot").
- The third (``_gemv3_kernel``, ``("mma", ...)`` configs; 4-bit, bf16, one group per K block): the second's
  tiles and split-K, with the weights made into bf16 integers q - zero two at a time (``_PAIR_ASM``: one lop3 and
  one paired fma) and fed to the tensor cores, the scale applied per K block to the accumulator (~4 instructions
  a weight). Measured: 23-26% at one row, 18-21% at 8: a few % above the others, so the instruction count was
  not what held them back. One- to four-row bf16 decoding now goes to ``int4pack.py`` (aten's kernel, ~40%).

Work split: the grid is (N blocks, K splits). One program handles BLOCK_N outputs for all M rows (the weight
tile is loaded once for every row) over one range of K, prefetching the next tile's words (and, in the second
design, its zero points and scales when a K block lies in one group) while it computes the current one.
Bandwidth needs many loads in flight: a shape such as N=5120 has only 20-80 N blocks for 132 SMs, so the
configs split K for about 2-32 programs per SM. ``EVEN_N`` drops the N masks so the int32 words along
N load as 16-byte vectors; 9..64 rows use a small-M GEMM (the tile dequantized in registers, ``tl.dot``).
``benchmarks/decode_bench.py --part gemv`` times every config against a device copy. The best config per (K, N,
row bucket, bits, g_idx kind, dtype, ...) is picked once by timing (the median of 5 launches, each after an L2
flush: in decoding every layer's weight comes from HBM; ``_TUNE_MS`` keeps what was measured) among the
configs that compile and whose first result matches the dequantized matmul;
``FINETUNE_GPTQ_TUNE=0`` takes the first config of the list instead.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from finetune.settings import settings  # absolute: the interpreter tests load this file on its own

MAX_ROWS = 64

# Two config forms (the tuner times both kinds against each other):
# - ("fma" | "dot", BLOCK_N, BLOCK_K, SPLIT_K, num_warps): the second design, ``_gemv2_kernel`` (module doc):
#   "fma" accumulates on CUDA cores (BLOCK_M = the rows rounded up to a power of two), "dot" on tensor cores
#   (rows padded to 16; BLOCK_K / (32 / bits) >= 16 packed words per K block).
# - (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, USE_DOT[, REDUCE_EACH]): the first design, ``_gemv_kernel`` (kept as a
#   candidate: the best of it measured 23% of the copy rate at one row; Step 5 of benchmarks/NOTES.md).
# BLOCK_K counts input rows. SPLIT_K > 0: that many K splits; 0: enough splits for about 4 programs per SM; -p:
# about p programs per SM (capped so every split runs >= 2 K blocks and the fp32 partials stay well below the
# weight's bytes). The first config of each list is the one FINETUNE_GPTQ_TUNE=0 takes.
# Trimmed to the configs that won or came within ~5% on the H200 for some Qwen-14B shape (the sweep of
# benchmarks/NOTES.md step 8 timed 12, 8 and 6 configs); the first of each list is the most frequent winner.
_CONFIGS_M1 = [
    ("fma", 128, 64, -16, 4),
    (128, 128, 0, 4, False, True),  # attn.c_proj (5120 x 5120)
    ("fma", 128, 64, -8, 4),
    ("mma", 128, 128, -4, 4),  # the third design: 3-7% faster than the others at one row (bf16 only)
]
# 2..8 rows: the weight tile dequantized once for every row; tensor-core dots with the rows padded to 16 (free:
# the kernel is bandwidth bound).
_CONFIGS_MN = [
    ("dot", 128, 128, -4, 4),
    (128, 128, 0, 4, True, False),  # attn.c_proj
    ("dot", 64, 128, -8, 4),
    ("mma", 128, 128, -4, 4),  # 4-8% faster than "dot" at 8 rows for c_attn, w1/w2, mlp.c_proj
]
# 9..64 rows (batched decoding, short prefills): a small-M GEMM, the tile dequantized in registers, tl.dot.
_CONFIGS_MM = [
    (128, 128, 0, 4, True, False),
    (256, 128, 0, 8, True, False),
    (64, 128, 0, 4, True, False),
]  # (the third design's "mma" configs measured 2.3-4x slower than these at 32 rows: 32-row tiles spill)
_KINDS = ("fma", "dot", "mma")
_DOT_M = 16  # tl.dot needs at least 16 rows
_INTERPRET_CONFIG = (32, 32, 2, 4, False, False)  # TRITON_INTERPRET=1 (CPU): small blocks, two K splits, no tuning
_REDUCE_BLOCK = 1024
_BEST: dict = {}
_TUNE_MS: dict = {}  # tune key -> [(config, median ms)] as the tuner measured them (benchmarks print it)
_COMPILED: dict = {}
_SM_COUNT: dict = {}
_COUNTERS: dict = {}
_OLD_COUNTERS: list = []


@triton.jit
def _gemv_kernel(
    x_ptr,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    out_ptr,  # y [M, N] in x's dtype, or with SPLIT_K > 1 the fp32 partials [SPLIT_K, M, N]
    M,
    K,
    N,
    K_PER_SPLIT,  # a multiple of BLOCK_K
    stride_xm,
    stride_qw,
    stride_qz,
    stride_s,
    stride_om,
    stride_os,
    BITS: tl.constexpr,
    V2: tl.constexpr,
    TRIVIAL_G: tl.constexpr,  # g_idx[k] == k // GROUP_SIZE (no desc_act reordering)
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no mask along N (lets the loads along N be 16-byte vectors)
    REDUCE_EACH: tl.constexpr,  # FMA paths: reduce over K every iteration (small accumulator) or once at the end
):
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BKW: tl.constexpr = BLOCK_K // PER  # packed words per column per K block
    MAGIC: tl.constexpr = 0x4B000000  # float bits of 2**23
    DT = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if EVEN_N:
        mask_n = tl.full([BLOCK_N], 1, tl.int1)
    else:
        mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_w = tl.arange(0, BKW)
    offs_j = tl.arange(0, PER)
    # the weight tile is kept as [BKW, PER, BLOCK_N]: element (w, j, n) is input row k0 + w * PER + j, i.e.
    # bits j*BITS.. of word (k0 / PER + w, n): each packed word is loaded once
    shifts = (offs_j * BITS)[None, :, None]
    offs_kl = offs_w[:, None] * PER + offs_j[None, :]  # [BKW, PER]: local input row
    shift_n = (offs_n % PER) * BITS
    zcols = offs_n // PER
    qw_cols = qweight_ptr + offs_n[None, :]

    k_start = pid_s * K_PER_SPLIT
    KW = K // PER
    n_iter = K_PER_SPLIT // BLOCK_K

    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    elif REDUCE_EACH:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros([BKW, PER, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BKW, PER, BLOCK_N], dtype=tl.float32)

    rows = k_start // PER + offs_w
    packed = tl.load(qw_cols + (rows.to(tl.int64) * stride_qw)[:, None], mask=(rows < KW)[:, None] & mask_n[None, :],
                     other=0)
    # A fixed trip count (every split runs concurrently, so the last, shorter split's idle iterations cost no
    # time); its iterations past K load no weights and no x (masks: zero terms). Masks are built from block
    # comparisons only (a block mask combined with a scalar condition fails in triton 3.9's interpreter).
    for it in range(0, n_iter):
        k0 = k_start + it * BLOCK_K
        # prefetch the next tile's words while this one is computed (the last iteration: a limit of 0 words)
        rows = (k0 + BLOCK_K) // PER + offs_w
        next_limit = tl.where(it + 1 < n_iter, KW, 0)
        nxt = tl.load(qw_cols + (rows.to(tl.int64) * stride_qw)[:, None],
                      mask=(rows < next_limit)[:, None] & mask_n[None, :], other=0)

        qf = (((packed[:, None, :] >> shifts) & MASK) | MAGIC).to(tl.float32, bitcast=True)  # 2**23 + q
        if TRIVIAL_G and (GROUP_SIZE % BLOCK_K == 0):
            # the whole K block lies in one group: one row of zero points and scales, broadcast (an iteration
            # past K reads the last group's: finite, and multiplied by a zero x)
            g = tl.minimum(k0, K - 1) // GROUP_SIZE
            zw = tl.load(qzeros_ptr + g * stride_qz + zcols, mask=mask_n, other=0)
            z = (zw >> shift_n) & MASK
            if not V2:
                z = z + 1
            zf = (z | MAGIC).to(tl.float32, bitcast=True)
            s = tl.load(scales_ptr + g * stride_s + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            w = (qf - zf[None, None, :]) * s[None, None, :]
        else:
            kk = k0 + offs_kl
            kmask = kk < K
            if TRIVIAL_G:
                g = kk // GROUP_SIZE
            else:
                g = tl.load(g_idx_ptr + kk, mask=kmask, other=0)
            g3 = g.to(tl.int64)[:, :, None]
            m3 = kmask[:, :, None] & mask_n[None, None, :]
            zw = tl.load(qzeros_ptr + g3 * stride_qz + zcols[None, None, :], mask=m3, other=0)
            z = (zw >> shift_n[None, None, :]) & MASK
            if not V2:
                z = z + 1
            zf = (z | MAGIC).to(tl.float32, bitcast=True)
            s = tl.load(scales_ptr + g3 * stride_s + offs_n[None, None, :], mask=m3, other=0.0).to(tl.float32)
            w = (qf - zf) * s
        w = w.to(DT)  # the weight exactly as dequantize_t(..., dtype=x.dtype) gives it

        if USE_DOT:
            xk = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + xk[None, :], mask=mask_m[:, None] & (xk < K)[None, :],
                         other=0.0)
            w2 = tl.reshape(w, [BLOCK_K, BLOCK_N])
            if DT == tl.float32:
                acc = tl.dot(xt, w2, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, w2, acc)
        elif BLOCK_M == 1:
            kk = k0 + offs_kl
            xt = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            if REDUCE_EACH:
                acc += tl.sum(tl.sum(w.to(tl.float32) * xt[:, :, None], axis=1), axis=0)[None, :]
            else:
                acc += w.to(tl.float32) * xt[:, :, None]
        else:
            kk = k0 + offs_kl
            xt = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + kk[None, :, :],
                         mask=mask_m[:, None, None] & (kk < K)[None, :, :], other=0.0).to(tl.float32)
            if REDUCE_EACH:
                acc += tl.sum(tl.sum(w.to(tl.float32)[None, :, :, :] * xt[:, :, :, None], axis=2), axis=1)
            else:
                acc += w.to(tl.float32)[None, :, :, :] * xt[:, :, :, None]
        packed = nxt

    if USE_DOT or REDUCE_EACH:
        y = acc
    elif BLOCK_M == 1:
        y = tl.sum(tl.sum(acc, axis=1), axis=0)[None, :]
    else:
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
    out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _load_meta(qzeros_ptr, scales_ptr, g, zcols, offs_n, mask, stride_qz, stride_s):
    """The packed zero-point words and the scales of groups ``g`` (any shape that broadcasts with offs_n)."""
    zw = tl.load(qzeros_ptr + g * stride_qz + zcols, mask=mask, other=0)
    s = tl.load(scales_ptr + g * stride_s + offs_n, mask=mask, other=0.0)
    return zw, s


@triton.jit
def _scale_terms(zw, s, zshift, BITS: tl.constexpr, V2: tl.constexpr):
    """(S, C) with (q - zero) * scale == fma(1 + q / 2048, S, C) exactly: S = 2048 * scale, C = -(2048 + zero) * scale.

    Both terms are exact in fp32: 2048 + zero < 4096 (12 bits) times an fp16 scale (11 bits)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    z = (zw >> zshift) & MASK
    if not V2:
        z = z + 1
    s = s.to(tl.float32)
    return s * 2048.0, -(z.to(tl.float32) + 2048.0) * s


@triton.jit
def _store_splits(y, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, mask_m, mask_n, M, N, pid_n, pid_s, SPLIT,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_SPLIT: tl.constexpr):
    """Write the fp32 result tile y [BLOCK_M, BLOCK_N] of one K split (the second and third designs). One split:
    y rounded once into out. Several: every split stores its partial; the program that arrives last at this N
    block's counter sums the partials in split order (deterministic, whatever the arrival order), rounds once,
    and resets the counter for the next launch. The barrier orders all threads' stores before the (acq_rel,
    GPU-scope) atomic; the partials are read from L2 (.cg), never from a stale L1 line."""
    out_mask = mask_m[:, None] & mask_n[None, :]
    out_offs = offs_m[:, None] * N + offs_n[None, :]
    if ONE_SPLIT:
        tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(ws_ptr + pid_s * M * N + out_offs, y, mask=out_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1)
        if arrived == SPLIT - 1:
            tl.debug_barrier()
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, SPLIT):
                total += tl.load(ws_ptr + s * M * N + out_offs, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + out_offs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _gemv2_kernel(
    x_ptr,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    out_ptr,  # y [M, N] in x's dtype
    ws_ptr,  # SPLIT > 1: the fp32 partials [SPLIT, M, N]
    cnt_ptr,  # SPLIT > 1: one int32 arrival counter per N block, 0 between launches
    M,
    K,
    N,
    K_PER_SPLIT,  # a multiple of BLOCK_K
    SPLIT,
    stride_xm,
    stride_qw,
    stride_qz,
    stride_s,
    BITS: tl.constexpr,
    V2: tl.constexpr,
    GMODE: tl.constexpr,  # 0: one group per K block; 1: one group per packed word; 2: per input row (g_idx)
    TRIVIAL_G: tl.constexpr,  # g_idx[k] == k // GROUP_SIZE (GMODE 2 computes it instead of loading g_idx)
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no mask along N (the int32 words along N load as 16-byte vectors)
    ONE_SPLIT: tl.constexpr,  # SPLIT == 1: write y directly
):
    """The second design (see the module doc): a [BLOCK_K / PER, BLOCK_N] tile of packed words, unpacked one bit
    position j at a time into 2-D [words, BLOCK_N] weights (no 3-D tile, no reshape), each weight dequantized by
    one fma; the K splits of an N block are summed by whichever of its programs finishes last."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BKW: tl.constexpr = BLOCK_K // PER  # packed words per column per K block
    POS: tl.constexpr = 12  # a value moved to bits 12.. of the mantissa of 1.0 is the float 1 + q / 2048
    ONE: tl.constexpr = 0x3F800000  # float bits of 1.0
    DT = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if EVEN_N:
        mask_n = tl.full([BLOCK_N], 1, tl.int1)
    else:
        mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_w = tl.arange(0, BKW)
    zshift = (offs_n % PER) * BITS
    zcols = offs_n // PER
    # int32 offsets within a tile, computed once (a Linear's packed words number < 2**31); each K block adds a
    # scalar row offset to the base pointer
    tile = offs_w[:, None] * stride_qw + offs_n[None, :]

    k_start = pid_s * K_PER_SPLIT
    KW = K // PER
    n_iter = K_PER_SPLIT // BLOCK_K

    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros([BKW, BLOCK_N], dtype=tl.float32)  # summed over the words once, after the loop
    else:
        acc = tl.zeros([BLOCK_M, BKW, BLOCK_N], dtype=tl.float32)

    row0 = k_start // PER
    # the weight is read once: evict it first, so x, scales and zero points stay in L2 for the other programs
    packed = tl.load(qweight_ptr + row0 * stride_qw + tile, mask=(row0 + offs_w < KW)[:, None] & mask_n[None, :],
                     other=0, eviction_policy="evict_first")
    if GMODE == 0:  # the whole K block in one group: one row of zero points and scales, also prefetched
        zw, sc = _load_meta(qzeros_ptr, scales_ptr, tl.minimum(k_start, K - 1) // GROUP_SIZE, zcols, offs_n, mask_n,
                            stride_qz, stride_s)
    # A fixed trip count; the last split's iterations past K load no weights (q = 0: finite w) and no x (0).
    for it in range(0, n_iter):
        k0 = k_start + it * BLOCK_K
        # prefetch the next tile's words while this one is computed (the last iteration: a limit of 0 words)
        row0 = (k0 + BLOCK_K) // PER
        next_limit = tl.where(it + 1 < n_iter, KW, 0)
        nxt = tl.load(qweight_ptr + row0 * stride_qw + tile,
                      mask=(row0 + offs_w < next_limit)[:, None] & mask_n[None, :], other=0,
                      eviction_policy="evict_first")
        kw0 = k0 + offs_w * PER  # [BKW]: the first input row of each word
        if GMODE == 0:
            zw_next, sc_next = _load_meta(qzeros_ptr, scales_ptr, tl.minimum(k0 + BLOCK_K, K - 1) // GROUP_SIZE,
                                          zcols, offs_n, mask_n, stride_qz, stride_s)
            S, C = _scale_terms(zw, sc, zshift, BITS, V2)
            S = S[None, :]
            C = C[None, :]
            zw = zw_next
            sc = sc_next
        elif GMODE == 1:  # every word's PER rows in one group (GROUP_SIZE % PER == 0)
            g = (tl.minimum(kw0, K - 1) // GROUP_SIZE).to(tl.int64)[:, None]
            zw, sc = _load_meta(qzeros_ptr, scales_ptr, g, zcols[None, :], offs_n[None, :], mask_n[None, :],
                                stride_qz, stride_s)
            S, C = _scale_terms(zw, sc, zshift[None, :], BITS, V2)
        for j in tl.static_range(PER):
            kk = kw0 + j  # [BKW]: this bit position's input row of each word
            if GMODE == 2:
                if TRIVIAL_G:
                    g = tl.minimum(kk, K - 1) // GROUP_SIZE
                else:
                    g = tl.load(g_idx_ptr + kk, mask=kk < K, other=0)
                zw, sc = _load_meta(qzeros_ptr, scales_ptr, g.to(tl.int64)[:, None], zcols[None, :], offs_n[None, :],
                                    mask_n[None, :], stride_qz, stride_s)
                S, C = _scale_terms(zw, sc, zshift[None, :], BITS, V2)
            if BITS * j < POS:
                v = packed << (POS - BITS * j)
            elif BITS * j > POS:
                v = packed >> (BITS * j - POS)
            else:
                v = packed
            v = ((v & (MASK << POS)) | ONE).to(tl.float32, bitcast=True)  # 1 + q / 2048
            # (q - zero) * scale, exact in fp32 whether or not the compiler fuses the multiply-add (v * S alone is
            # exact: (2048 + q) * scale fits 23 bits), rounded once to x's dtype
            w = (v * S + C).to(DT)
            if USE_DOT:
                xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                             mask=mask_m[:, None] & (kk < K)[None, :], other=0.0)
                if DT == tl.float32:
                    acc = tl.dot(xt, w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(xt, w, acc)
            elif BLOCK_M == 1:
                xt = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
                acc += w.to(tl.float32) * xt[:, None]
            else:
                xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                             mask=mask_m[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
                acc += w.to(tl.float32)[None, :, :] * xt[:, :, None]
        packed = nxt

    if USE_DOT:
        y = acc
    elif BLOCK_M == 1:
        y = tl.sum(acc, axis=0)[None, :]
    else:
        y = tl.sum(acc, axis=1)
    _store_splits(y, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, mask_m, mask_n, M, N, pid_n, pid_s, SPLIT,
                  BLOCK_M, BLOCK_N, ONE_SPLIT)


# Two 4-bit values of one packed word (bits 0-3 and 16-19 after a shift) become two bf16 numbers q - zero in one
# register: the nibbles are placed in the mantissa of bf16 128 (128 + q, exact: bf16's ulp at 128 is 1), then one
# paired fma subtracts 128 + zero (exact: |q - zero| <= 16). Three instructions for two weights.
# Measured on the H200 (benchmarks/NOTES.md step 8): at one row ~26% of the copy rate, 3-7% above the other designs
# in spite of ~2x fewer instructions: the instruction count was not what limits these kernels.
_PAIR_ASM = tl.constexpr("""{
.reg .b32 t, one;
mov.b32 one, 0x3F803F80;
lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xea;
fma.rn.bf16x2 t, t, one, $3;
mov.b32 {$0, $1}, t;
}""")


@triton.jit
def _gemv3_kernel(
    x_ptr,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    out_ptr,  # y [M, N] in x's dtype (bf16)
    ws_ptr,  # SPLIT > 1: the fp32 partials [SPLIT, M, N]
    cnt_ptr,  # SPLIT > 1: one int32 arrival counter per N block, 0 between launches
    M,
    K,
    N,
    K_PER_SPLIT,  # a multiple of BLOCK_K
    SPLIT,
    stride_xm,
    stride_qw,
    stride_qz,
    stride_s,
    BITS: tl.constexpr,
    V2: tl.constexpr,
    GMODE: tl.constexpr,
    TRIVIAL_G: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    EVEN_N: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
):
    """The third design ("mma" configs; 4-bit, bf16, one group per K block only): the weights enter the tensor
    cores as the exact integers q - zero in bf16 (two per register, ``_PAIR_ASM``), so the scale is applied once
    per K block to the [BLOCK_M, BLOCK_N] accumulator instead of once per weight: about 1.5 instructions a weight
    for the dequantization instead of 5-6. Same arguments as ``_gemv2_kernel``."""
    BKW: tl.constexpr = BLOCK_K // 8  # packed words per column per K block
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if EVEN_N:
        mask_n = tl.full([BLOCK_N], 1, tl.int1)
    else:
        mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_w = tl.arange(0, BKW)
    zshift = (offs_n % 8) * 4
    zcols = offs_n // 8
    tile = offs_w[:, None] * stride_qw + offs_n[None, :]
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    k_start = pid_s * K_PER_SPLIT
    KW = K // 8
    n_iter = K_PER_SPLIT // BLOCK_K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    row0 = k_start // 8
    packed = tl.load(qweight_ptr + row0 * stride_qw + tile, mask=(row0 + offs_w < KW)[:, None] & mask_n[None, :],
                     other=0, eviction_policy="evict_first")
    zw, sc = _load_meta(qzeros_ptr, scales_ptr, tl.minimum(k_start, K - 1) // GROUP_SIZE, zcols, offs_n, mask_n,
                        stride_qz, stride_s)
    for it in range(0, n_iter):
        k0 = k_start + it * BLOCK_K
        row0 = (k0 + BLOCK_K) // 8
        next_limit = tl.where(it + 1 < n_iter, KW, 0)
        nxt = tl.load(qweight_ptr + row0 * stride_qw + tile,
                      mask=(row0 + offs_w < next_limit)[:, None] & mask_n[None, :], other=0,
                      eviction_policy="evict_first")
        zw_next, sc_next = _load_meta(qzeros_ptr, scales_ptr, tl.minimum(k0 + BLOCK_K, K - 1) // GROUP_SIZE, zcols,
                                      offs_n, mask_n, stride_qz, stride_s)
        z = (zw >> zshift) & 15
        if not V2:
            z = z + 1
        # bf16 -(128 + zero) in both halves: sign, exponent of 128, and zero in the mantissa's low bits
        nz = (z | (z << 16)) | (0xC300C300 - (1 << 32))
        kw0 = k0 + offs_w * 8  # [BKW]: the first input row of each word
        blk = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(4):
            lo, hi = tl.inline_asm_elementwise(_PAIR_ASM, "=h,=h,r,r", [packed >> (4 * j), nz[None, :]],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
            x_lo = tl.load(x_rows + (kw0 + j)[None, :], mask=mask_m[:, None] & (kw0 + j < K)[None, :], other=0.0)
            x_hi = tl.load(x_rows + (kw0 + j + 4)[None, :], mask=mask_m[:, None] & (kw0 + j + 4 < K)[None, :],
                           other=0.0)
            blk = tl.dot(x_lo, lo, blk)
            blk = tl.dot(x_hi, hi, blk)
        acc += blk * sc.to(tl.float32)[None, :]
        packed = nxt
        zw = zw_next
        sc = sc_next

    _store_splits(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, mask_m, mask_n, M, N, pid_n, pid_s, SPLIT,
                  BLOCK_M, BLOCK_N, ONE_SPLIT)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, out_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum over splits of ws[s, i] (fixed order), rounded once to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


_INTERPRET = type(_gemv_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 when this was imported


def row_bucket(m: int) -> int:
    """Rows rounded up to a power of two (1, 2, 4, ..., 64): the unit of tuning, and the FMA configs' BLOCK_M."""
    b = 1
    while b < m:
        b *= 2
    return b


def configs_for(m: int, mma: bool | None = None) -> list:
    """The candidate configs for ``m`` rows (tests run every one of them); ``mma=False`` leaves out the third
    design's, which need 4-bit weights, bf16 inputs and one group per K block (``mma_fits``). None: all of them,
    except in Triton's interpreter (which cannot run the third design's inline PTX)."""
    configs = _CONFIGS_M1 if m == 1 else _CONFIGS_MN if m <= 8 else _CONFIGS_MM
    if mma is None:
        mma = not _INTERPRET
    return configs if mma else [c for c in configs if not (_is_v2(c) and c[0] == "mma")]


def mma_fits(bits: int, dtype: torch.dtype, trivial: bool, group_size: int, block_k: int = 128) -> bool:
    """Whether the third design ("mma" configs) can compute this problem."""
    return bits == 4 and dtype == torch.bfloat16 and trivial and group_size % block_k == 0


def _is_v2(cfg) -> bool:
    return isinstance(cfg[0], str)


def _full(cfg) -> tuple:
    """A config in its full form: v2 configs checked, v1 5-tuples given REDUCE_EACH False."""
    cfg = tuple(cfg)
    if _is_v2(cfg):
        if len(cfg) != 5 or cfg[0] not in _KINDS:
            raise ValueError(f"triton_gemv: a second-design config is (kind in {_KINDS}, BLOCK_N, BLOCK_K, SPLIT_K, "
                             f"num_warps), got {cfg}")
        return cfg
    return cfg if len(cfg) == 6 else cfg + (False,)


def _check_v2(cfg, bits: int) -> None:
    """A second-design config this problem cannot compile says so in one line (instead of a compiler error)."""
    kind, block_n, block_k = cfg[:3]
    per = 32 // bits
    if block_k % per or block_n & (block_n - 1) or (block_k // per) & (block_k // per - 1):
        raise ValueError(f"triton_gemv: config {cfg}: BLOCK_N and BLOCK_K / {per} must be powers of two")
    if kind in ("dot", "mma") and (block_n < 16 or block_k // per < 16):
        raise ValueError(f"triton_gemv: config {cfg}: tl.dot needs BLOCK_N >= 16 and BLOCK_K >= {16 * per} "
                         f"({bits}-bit values, {per} per word)")


def _dims(cfg) -> tuple:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps, uses tensor cores) of either config form."""
    if _is_v2(cfg):
        return cfg[1], cfg[2], cfg[3], cfg[4], cfg[0] in ("dot", "mma")
    return cfg[0], cfg[1], cfg[2], cfg[3], bool(cfg[4])


def _block_m(cfg, M) -> int:
    return max(_DOT_M, row_bucket(M)) if _dims(cfg)[4] else row_bucket(M)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    n = _SM_COUNT.get(device.index)
    if n is None:
        n = torch.cuda.get_device_properties(device).multi_processor_count
        _SM_COUNT[device.index] = n
    return n


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """The split-K arrival counters: int32, zero between launches (the last program of each N block resets its
    own). One buffer per device, made by an eager call (the tuning call precedes any graph capture) and never
    freed: graphs captured earlier keep pointing at it. A call inside a graph capture that finds no buffer large
    enough gets its own zeroed one (the graph then zeroes it before each replay). Two GEMVs running concurrently
    on two streams of one device would share the counters: the callers here (engine, chat) decode on one stream."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.zeros(n, dtype=torch.int32, device=device)
        buf = torch.zeros(max(n, 65536), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
        _OLD_COUNTERS.append(buf)  # kept alive for the graphs that captured it
    return buf


def _plan(cfg, M, K, N, bits, device):
    """(grid, split, k_per_split) for a config (see the config lists for what SPLIT_K <= 0 means)."""
    block_n, block_k, split = _dims(cfg)[:3]
    n_blocks = triton.cdiv(N, block_n)
    k_blocks = triton.cdiv(K, block_k)
    if split <= 0:
        per_sm = -split if split < 0 else 4
        split = triton.cdiv(per_sm * _sm_count(device), n_blocks)
        # >= 2 K blocks per split; the partials (written and read: 8 bytes per row and output per split) at most
        # half the packed weight's bytes
        split = max(1, min(split, k_blocks // 2, (K * bits) // (128 * max(M, 1))))
    split = max(1, min(split, k_blocks))
    k_per_split = triton.cdiv(k_blocks, split) * block_k
    split = triton.cdiv(K, k_per_split)
    return (n_blocks, split, 1), split, k_per_split


def _gmode(trivial: bool, group_size: int, block_k: int, per: int) -> int:
    """How the second design finds each weight's group: 0 once per K block, 1 per packed word, 2 per input row."""
    if trivial and group_size % block_k == 0:
        return 0
    if trivial and group_size % per == 0:
        return 1
    return 2


def triton_gemv(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    v2: bool = False,
    group_size: int | None = None,
    trivial_g_idx: bool | None = None,
    config: tuple | None = None,
) -> torch.Tensor:
    """y = x2d @ W.T [M, N] in x2d's dtype (bf16/fp16/fp32) for x2d [M, K] with 1 <= M <= 64, from GPTQ buffers.

    ``trivial_g_idx``: whether g_idx[k] == k // group_size; None = find out (cached per g_idx tensor).
    ``config``: one config (either form, see the config lists) to use instead of the tuned one (tests,
    benchmarks).
    """
    index = qweight.device.index
    if index is not None and index != torch.cuda.current_device():  # triton launches on the current device
        with torch.cuda.device(index):
            return triton_gemv(x2d, qweight, qzeros, scales, g_idx, bits, v2, group_size, trivial_g_idx, config)
    M, K = x2d.shape
    N = scales.shape[1]
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"triton_gemv handles 1..{MAX_ROWS} rows, got {M}")
    if K != g_idx.shape[0]:
        raise ValueError(f"x has {K} columns but the layer has {g_idx.shape[0]} inputs")
    if x2d.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"triton_gemv supports bf16, fp16 and fp32 inputs, got {x2d.dtype}")
    if group_size is None or group_size <= 0:
        groups = scales.shape[0]
        group_size = K if groups == 1 else -(-K // groups)
    if trivial_g_idx is None:
        from .triton_dequant import _g_idx_trivial

        trivial = _g_idx_trivial(g_idx, group_size)
    else:
        trivial = bool(trivial_g_idx)
    if not trivial:
        group_size = 1  # unused by the kernels then: one compiled kernel for every group size
    x2d = x2d.contiguous()
    qweight = qweight.contiguous()
    qzeros = qzeros.contiguous()
    scales = scales.contiguous()
    g_idx = g_idx.contiguous()
    dtype = x2d.dtype
    per = 32 // bits
    device = x2d.device
    y = torch.empty(M, N, dtype=dtype, device=device)
    ptrs = (x2d, qweight, qzeros, scales, g_idx)
    key = (K, N, M, bits, bool(v2), trivial, group_size, dtype, qweight.device,
           tuple(t.data_ptr() % 16 == 0 for t in ptrs))

    def args1(out, k_per_split, stride_os, cfg):
        """The first design's arguments."""
        block_n, block_k, _, _, use_dot, reduce_each = cfg
        return (x2d, qweight, qzeros, scales, g_idx, out, M, K, N, k_per_split, K, N, N // per, N, N, stride_os,
                bits, bool(v2), trivial, group_size, _block_m(cfg, M), block_n, block_k, bool(use_dot),
                N % block_n == 0, bool(reduce_each) and not use_dot)

    def args2(split, k_per_split, cfg):
        """The second design's arguments (with one split, y and g_idx stand in for the unused buffers)."""
        kind, block_n, block_k = cfg[:3]
        if split == 1:
            ws, cnt = y, g_idx
        else:
            ws = torch.empty(split, M, N, dtype=torch.float32, device=device)
            cnt = _counters(device, triton.cdiv(N, block_n))
        return (x2d, qweight, qzeros, scales, g_idx, y, ws, cnt, M, K, N, k_per_split, split, K, N, N // per, N,
                bits, bool(v2), _gmode(trivial, group_size, block_k, per), trivial, group_size, _block_m(cfg, M),
                block_n, block_k, kind == "dot", N % block_n == 0, split == 1)

    def fast(hit):
        """Launch from a compiled entry (skips triton's argument binding: host time matters at decode)."""
        compiled, grid, split, k_per_split, cfg, reduce_compiled, reduce_grid = hit
        if _is_v2(cfg):
            compiled[grid](*args2(split, k_per_split, cfg))
        elif split == 1:
            compiled[grid](*args1(y, k_per_split, 0, cfg))
        else:
            ws = torch.empty(split, M, N, dtype=torch.float32, device=device)
            compiled[grid](*args1(ws, k_per_split, M * N, cfg))
            reduce_compiled[reduce_grid](ws, y, M * N, split, _REDUCE_BLOCK)

    if config is None:
        hit = _COMPILED.get(key)
        if hit is not None:
            fast(hit)
            return y

    def launch(cfg):
        """Launch through triton (compiles on first use); returns the entry ``fast`` takes."""
        cfg = _full(cfg)
        grid, split, k_per_split = _plan(cfg, M, K, N, bits, device)
        warps = _dims(cfg)[3]
        if _is_v2(cfg):
            _check_v2(cfg, bits)
            kernel = _gemv2_kernel
            if cfg[0] == "mma":
                if not mma_fits(bits, dtype, trivial, group_size, cfg[2]):
                    raise ValueError(f"triton_gemv: config {cfg} needs 4-bit weights, bf16 inputs and one group per "
                                     f"K block (got {bits}-bit, {dtype}, group size {group_size}, trivial g_idx "
                                     f"{trivial})")
                kernel = _gemv3_kernel
            compiled = kernel[grid](*args2(split, k_per_split, cfg), num_warps=warps)
            return compiled, grid, split, k_per_split, cfg, None, None
        if split == 1:
            compiled = _gemv_kernel[grid](*args1(y, k_per_split, 0, cfg), num_warps=warps)
            return compiled, grid, split, k_per_split, cfg, None, None
        ws = torch.empty(split, M, N, dtype=torch.float32, device=device)
        compiled = _gemv_kernel[grid](*args1(ws, k_per_split, M * N, cfg), num_warps=warps)
        reduce_grid = (triton.cdiv(M * N, _REDUCE_BLOCK), 1, 1)
        reduce_compiled = _splitk_reduce_kernel[reduce_grid](ws, y, M * N, split, _REDUCE_BLOCK, num_warps=4)
        return compiled, grid, split, k_per_split, cfg, reduce_compiled, reduce_grid

    if config is not None:
        launch(tuple(config))
        return y
    tune_key = (K, N, row_bucket(M), bits, bool(v2), trivial, group_size, dtype, qweight.device)
    cfg = _BEST.get(tune_key)
    if cfg is None:
        def reference():
            """x @ W.T from the plain-torch dequantization (the tuner drops a config whose result is wrong)."""
            from .packing import dequantize_t

            return x2d.float() @ dequantize_t(qweight, qzeros, scales, g_idx, bits, v2=v2, dtype=dtype).float()

        cfg = _tune(launch, fast, M, device, tune_key, y, reference, mma_fits(bits, dtype, trivial, group_size))
        _BEST[tune_key] = cfg
    hit = launch(cfg)
    if hit[0] is not None and not _INTERPRET:
        _COMPILED[key] = hit
    return y


def _tune(launch, fast, M, device, tune_key, out, reference, mma: bool = True):
    """The fastest config for one problem (each compiled once, timed from a cold L2; first call only). Every
    candidate's first result is compared with ``reference()`` (the dequantized matmul): a config that fails to
    compile or gives a wrong result on this GPU is left out with a warning."""
    if _INTERPRET:
        return _INTERPRET_CONFIG
    configs = configs_for(M, mma)
    if not settings().gptq_tune:  # e.g. tests: one compile per problem kind
        return configs[0]
    ref = reference()
    ref_norm = max(ref.norm().item(), 1e-30)
    hits, ok = [], []
    for cfg in configs:  # compile; a config this GPU cannot run (e.g. out of shared memory) is left out
        try:
            hit = launch(cfg)
        except Exception as exc:  # noqa: BLE001  (test_quant_cuda runs every config without this net)
            warnings.warn(f"triton_gemv: config {cfg} failed ({type(exc).__name__}: {exc}); skipped", stacklevel=3)
            continue
        err = (out.float() - ref).norm().item() / ref_norm
        if not err < 1e-2:  # the summation order alone stays near 1e-3 even in bf16
            warnings.warn(f"triton_gemv: config {cfg} gave a wrong result (relative error {err:.2e} against the "
                          "dequantized matmul); skipped", stacklevel=3)
            continue
        hits.append(hit)
        ok.append(cfg)
    del ref
    if not hits:
        raise RuntimeError("triton_gemv: no kernel config compiled and gave the right result for this problem")
    configs = ok
    # Each timed launch follows an L2 flush (> the 50 MiB L2 of an H100/H200): in decoding every layer's
    # weight comes from HBM. The flush also gives the host time to enqueue the launch, so the events time
    # the kernels, not the launch overhead.
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    reps = 5
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
              for _ in configs]
    torch.cuda.synchronize()
    for rep in range(reps):
        for i, hit in enumerate(hits):  # interleaved, so clock or thermal drift hits every config alike
            start, end = events[i][rep]
            flush.zero_()
            start.record()
            fast(hit)
            end.record()
    torch.cuda.synchronize()
    del flush
    best, best_ms = configs[0], float("inf")
    measured = []
    for cfg, evs in zip(configs, events):
        ms = sorted(s.elapsed_time(e) for s, e in evs)[reps // 2]  # median
        measured.append((cfg, ms))
        if ms < best_ms:
            best, best_ms = cfg, ms
    _TUNE_MS[tune_key] = measured
    return best
