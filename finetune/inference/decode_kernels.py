"""Triton kernels for the engine's decode step: the elementwise work of a block, and its attention.

Imported lazily by ``fused_decode.py`` (CUDA with Triton only; CPU code never imports triton). In eager torch a
decode step spends ~50 small kernels per layer besides the GEMVs and attention (RMSNorm alone is eight: casts,
pow, mean, add, rsqrt, two multiplies; rotary with its cats and casts about fourteen; the cache write an
index_put per tensor), each 1.5-3 us even inside a CUDA graph. These replace them:

- ``add_rms_norm``: the residual add of the previous half (written back into the residual stream) and the next
  RMSNorm, one program per row; ``add_rms_norm_low_rank`` also computes x A for the LoRA products of the Linears
  that read the normed rows (the engine's unmerged adapters, up to 32 rows), spread over ~64-256 programs;
- ``rotary_to_cache``: from c_attn's output, rotary on q and k, the logN query scale, and the write of k and v
  into the layer's KV cache at each row's position; returns q [b, H, 1, D]; ``prefill_rotary_to_cache`` does the
  same for a prefill's prompts (every token to its row and position);
- ``swiglu``: up * silu(gate); ``swiglu_low_rank`` also computes x A for the LoRA product of mlp.c_proj, which
  reads it (as ``add_rms_norm_low_rank`` does for the Linears after a norm);
- ``decode_attention`` (``fused_decode.use_own_keys``): each row's query against its own keys only (the cache up to
  its position), split over the keys as flash-decoding does, in fp32, written in the layout c_proj reads. SDPA
  instead reads every row up to the step's length bucket under a mask, so a short row pays for the longest one's
  keys.
- ``rotary_attention``: ``rotary_to_cache`` and ``decode_attention`` in one launch (the fused step's default), the
  parts combined by the last program of each (row, head) where the grid is about one wave, else by the combine
  kernel after it.
On CUDA those two attention calls launch the CUDA C kernel of ``attention_cuda.py`` where it takes them (its key
splits read at a larger share of the copy rate, NOTES step 99); the Triton kernels here serve the rest (the CPU tests
under the interpreter, FINETUNE_ATTENTION_CUDA=0).

Numerics are the model's (``modeling/kernels.py``), rounding for rounding: fp32 arithmetic, rounded to the
activation dtype exactly where eager torch rounds (the residual sum; RMSNorm's normalised value before the
weight; rotary's output, then again after the logN scale; silu's output), and no multiply-add contraction
(``enable_fp_fusion=False``: eager torch rounds rotary's two products before adding them; ``rotary_attention``
keeps fusion for the attention's own sums and rounds those products apart, ``_mul_rn``). What can differ is
the fp32 summation order of RMSNorm's mean and the last bit of rsqrt/exp, so a bf16 result may differ by one
ulp on rare elements. The wrappers take a decode step's shapes (one token per row), except the prefill's rotary;
add_rms_norm and swiglu take any number of tokens, so the engine's prefill runs on them too
(``fused_decode.prefill_blocks``: 17 kernels a layer instead of the model's ~52 eager ones, NOTES step 59).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from finetune.quant.mma_gemv import grown_buffer  # (absolute: the CPU tests load this file on its own)

# Under Triton's interpreter (the CPU tests) numpy never contracts a product into an fma, and inline PTX cannot run
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _add_rms_norm_row(x_ptr, d_ptr, w_ptr, out_ptr, row, N, eps, stride_x, stride_d, offs, mask,
                      HAS_DELTA: tl.constexpr):
    """(the new residual, the normed row) of ``row``: the residual add rounded to the stream's dtype (as eager
    x + delta), then RMSNorm rounded where eager rounds it; both norm kernels compute it here."""
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)
    xf = x.to(tl.float32)
    ms = tl.sum(xf * xf, axis=0) / N
    y = (xf * tl.rsqrt(ms + eps)).to(x_ptr.dtype.element_ty)  # .type_as(x), then the weight
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    return x, (y.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty)


@triton.jit
def _dec_add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, out_ptr, N, eps, stride_x, stride_d, stride_o,
                             HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x, out = _add_rms_norm_row(x_ptr, d_ptr, w_ptr, out_ptr, row, N, eps, stride_x, stride_d, offs, mask,
                               HAS_DELTA)
    if HAS_DELTA:  # the residual written back
        tl.store(x_ptr + row * stride_x + offs, x, mask=mask)
    tl.store(out_ptr + row * stride_o + offs, out, mask=mask)


@triton.jit
def _dec_add_rms_norm_xa_kernel(x_ptr, d_ptr, w_ptr, at_ptr, xo_ptr, out_ptr, h_ptr, N, R, eps, stride_x, stride_d,
                                stride_xo, stride_o, stride_at, stride_h, HAS_DELTA: tl.constexpr, COLS: tl.constexpr,
                                SUB: tl.constexpr, BLOCK: tl.constexpr):
    # program (row, c): the row's add + RMSNorm (_add_rms_norm_row: every program of the row recomputes it, 30 KB
    # from L2 at 5,120 wide), then COLS columns of h = normed @ at.T, SUB at a time; program (row, 0) writes the new
    # residual (to xo: x is read by the row's other programs) and the normed row
    row = tl.program_id(0)
    col0 = tl.program_id(1) * COLS
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    cols = col0 + tl.arange(0, SUB)
    a = tl.load(at_ptr + cols[:, None] * stride_at + offs[None, :], mask=(cols[:, None] < R) & mask[None, :],
                other=0.0)  # issued first: the first columns' A.T, the only load from DRAM
    x, out = _add_rms_norm_row(x_ptr, d_ptr, w_ptr, out_ptr, row, N, eps, stride_x, stride_d, offs, mask,
                               HAS_DELTA)
    if tl.program_id(1) == 0:
        tl.store(out_ptr + row * stride_o + offs, out, mask=mask)
        if HAS_DELTA:
            tl.store(xo_ptr + row * stride_xo + offs, x, mask=mask)
    of = out.to(tl.float32)
    h = tl.sum(of[None, :] * a.to(tl.float32), axis=1)
    tl.store(h_ptr + row * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=cols < R)
    for c in tl.static_range(SUB, COLS, SUB):
        cols = col0 + c + tl.arange(0, SUB)
        a = tl.load(at_ptr + cols[:, None] * stride_at + offs[None, :], mask=(cols[:, None] < R) & mask[None, :],
                    other=0.0)
        h = tl.sum(of[None, :] * a.to(tl.float32), axis=1)
        tl.store(h_ptr + row * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=cols < R)


@triton.jit
def _mul_rn(a, b, EXACT: tl.constexpr):
    """a * b rounded on its own: never contracted into an fma with an add after it (eager torch rounds rotary's two
    products before adding them). Kernels compiled with enable_fp_fusion=False (and the interpreter) need no more
    than ``*``; the fused attention kernel keeps fusion for its own sums and passes EXACT."""
    if EXACT:
        r = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        r = a * b
    return r


@triton.jit
def _rotated(ptr, d, dmask, rot, partner, sign, c, s, EXACT: tl.constexpr):
    """fp32 rotary of the D channels at ``ptr`` (q or k of one head): t * cos + rotate_half(t) * sin, where
    rotate_half gives channel d < ROT/2 -t[d + ROT/2] and ROT/2 <= d < ROT t[d - ROT/2] (``partner``, ``sign``);
    channels past ROT pass through (cos 1, sin 0)."""
    t = tl.load(ptr + d, mask=dmask, other=0.0).to(tl.float32)
    t2 = tl.load(ptr + partner, mask=rot, other=0.0).to(tl.float32) * sign
    return _mul_rn(t, c, EXACT) + _mul_rn(t2, s, EXACT)


@triton.jit
def _rotary_operands(cos_ptr, sin_ptr, row, stride_cs, D: tl.constexpr, ROT: tl.constexpr, BLOCK_D: tl.constexpr):
    """(d, dmask, rot, partner, sign, cos, sin) of a token's rotary: its channels, those that rotate, each one's
    partner in rotate_half and that one's sign, and the token's cos/sin (1 and 0 past ROT)."""
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    HALF = ROT // 2
    rot = dmask & (d < ROT)
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    sign = tl.where(d < HALF, -1.0, 1.0)
    c = tl.load(cos_ptr + row * stride_cs + d, mask=rot, other=1.0)
    s = tl.load(sin_ptr + row * stride_cs + d, mask=rot, other=0.0)
    return d, dmask, rot, partner, sign, c, s


@triton.jit
def _rotated_query(base, scale_ptr, row, d, dmask, rot, partner, sign, c, s, dtype: tl.constexpr,
                   HAS_SCALE: tl.constexpr, EXACT: tl.constexpr):
    """q of one head after rotary, rounded to ``dtype``, then the logN scale (q.float() * scale).type_as(q)."""
    qr = _rotated(base, d, dmask, rot, partner, sign, c, s, EXACT).to(dtype)
    if HAS_SCALE:
        qr = (qr.to(tl.float32) * tl.load(scale_ptr + row)).to(dtype)
    return qr


@triton.jit
def _dec_rotary_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, scale_ptr, pos_ptr, crow_ptr, k_ptr, v_ptr, q_ptr,
                             stride_qkv, P, stride_cs, stride_cr, stride_ch, stride_cp,
                             D: tl.constexpr, ROT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CROW: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    # one program per (token, head); the token's cache row is crow[row] (a prefill's tokens), else row itself
    row = tl.program_id(0)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    d, dmask, rot, partner, sign, c, s = _rotary_operands(cos_ptr, sin_ptr, row, stride_cs, D, ROT, BLOCK_D)
    base = qkv_ptr + row * stride_qkv + h * D
    qr = _rotated_query(base, scale_ptr, row, d, dmask, rot, partner, sign, c, s, q_ptr.dtype.element_ty, HAS_SCALE,
                        False)
    kr = _rotated(base + P, d, dmask, rot, partner, sign, c, s, False)
    v = tl.load(base + 2 * P + d, mask=dmask, other=0.0)
    tl.store(q_ptr + (row * H + h) * D + d, qr, mask=dmask)
    pos = tl.load(pos_ptr + row).to(tl.int64)
    if HAS_CROW:
        crow = tl.load(crow_ptr + row).to(tl.int64)
    else:
        crow = row.to(tl.int64)
    dst = crow * stride_cr + h * stride_ch + pos * stride_cp + d
    tl.store(k_ptr + dst, kr.to(qkv_ptr.dtype.element_ty).to(k_ptr.dtype.element_ty), mask=dmask)
    tl.store(v_ptr + dst, v.to(v_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _swiglu_chunk(up_ptr, gate_ptr, src, mask, dtype: tl.constexpr):
    """up * silu(gate) of the elements at ``src``, rounded where eager rounds (both swiglu kernels compute it here)."""
    g = tl.load(gate_ptr + src, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + src, mask=mask, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(dtype)  # F.silu rounds to the input dtype
    return (u * silu.to(tl.float32)).to(dtype)


@triton.jit
def _dec_swiglu_kernel(up_ptr, gate_ptr, out_ptr, n, cols, stride, BLOCK: tl.constexpr):
    # element i of the output is row i // cols, column i % cols of up and gate, whose rows are `stride` apart (the
    # two halves of one [rows, 2 cols] product when w1 and w2 ran as one GEMV)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    src = (offs // cols) * stride + offs % cols
    tl.store(out_ptr + offs, _swiglu_chunk(up_ptr, gate_ptr, src, mask, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dec_swiglu_xa_kernel(up_ptr, gate_ptr, at_ptr, out_ptr, h_ptr, N, R, stride, stride_at, stride_h,
                          COLS: tl.constexpr, CHUNK: tl.constexpr):
    # program (row, c): the row's SwiGLU, CHUNK elements at a time (up and gate from L2: every program of the row
    # recomputes it), and COLS columns of h = out @ at.T summed in fp32 over the chunks; program (row, 0) writes out
    row = tl.program_id(0)
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
    acc = tl.zeros((COLS,), dtype=tl.float32)
    for k in range(0, N, CHUNK):
        offs = k + tl.arange(0, CHUNK)
        mask = offs < N
        a = tl.load(at_ptr + cols[:, None] * stride_at + offs[None, :], mask=(cols[:, None] < R) & mask[None, :],
                    other=0.0)  # issued first: the only load from DRAM
        out = _swiglu_chunk(up_ptr, gate_ptr, row * stride + offs, mask, out_ptr.dtype.element_ty)
        if tl.program_id(1) == 0:
            tl.store(out_ptr + row * N + offs, out, mask=mask)
        acc += tl.sum(out.to(tl.float32)[None, :] * a.to(tl.float32), axis=1)
    tl.store(h_ptr + row * stride_h + cols, acc.to(h_ptr.dtype.element_ty), mask=cols < R)


# The lengths and counts are plain ints (not specialised): a serving trace once compiled both kernels again at new
# lengths, inside graph captures that first tokens waited for (0.9 and 0.4 s, NOTES step 62); and the combine reads
# the splits COMBINE_SPLITS at a time (one compile for any count; masked slots cost next to nothing).
# The split's length is the host's choice, one per graph (key_split): cutting each row's keys in the kernel by its own
# length, so that one graph served more lengths, ran 10% slower at 32-64 rows and up to 24% at one row for the same
# cuts (NOTES step 71).
COMBINE_SPLITS = 32
# The combine kernel's warps = the one-launch kernel's: Triton lays a reduction out by the warps, so the same count
# makes a head's output the same bits whichever of them combined its parts (a row's bits would otherwise depend on
# the grid size of the batch it is in, rotary_attention's ONE_LAUNCH_PROGRAMS)
COMBINE_WARPS = 4


@triton.jit
def _attention_part(q, k_ptr, v_ptr, base, start, end, scale, stride_cp, d, dmask, BLOCK_D: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """(m, l, acc) of one head's query q (fp32) over the keys start..end-1 of the cache rows at ``base``: the
    running max, the sum of exp(score - m) and the sum of those times V, online (fp32). An empty range (a split
    past the row's keys) leaves m = -inf, l = 0."""
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < end
        tile = base + offs[:, None].to(tl.int64) * stride_cp + d[None, :]
        kmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + tile, mask=kmask, other=0.0).to(tl.float32)
        sc = tl.where(nmask, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new)
        v = tl.load(v_ptr + tile, mask=kmask, other=0.0).to(tl.float32)
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    return m, l, acc


@triton.jit
def _store_part(ws_ptr, slot, d, m, l, acc, BLOCK_D: tl.constexpr):
    tl.store(ws_ptr + slot + d, acc)
    tl.store(ws_ptr + slot + BLOCK_D, m)
    tl.store(ws_ptr + slot + BLOCK_D + 1, l)


@triton.jit
def _combined(ws_ptr, first, S, d, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """One head's attention output (fp32) from its S parts at slots first..first+S-1 of ws: BLOCK_S parts at a time,
    so that one compile serves any number of splits (up to 32: one pass, the same sums as one block). The loads
    bypass L1 (.cg): in the one-launch kernel the parts were written by other programs of the same launch."""
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        smask = sp < S
        slots = (first + sp) * (BLOCK_D + 2)
        ms = tl.load(ws_ptr + slots + BLOCK_D, mask=smask, other=float("-inf"), cache_modifier=".cg")
        ls = tl.load(ws_ptr + slots + BLOCK_D + 1, mask=smask, other=0.0, cache_modifier=".cg")
        parts = tl.load(ws_ptr + slots[:, None] + d[None, :], mask=smask[:, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(ms, axis=0))  # -inf until a split with a key (split 0 holds key 0)
        alpha = tl.where(m > float("-inf"), tl.exp(m - m_new), 0.0)
        w = tl.where(ms > float("-inf"), tl.exp(ms - m_new), 0.0)
        total = total * alpha + tl.sum(w * ls, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * parts, axis=0)
        m = m_new
    return tl.where(total > 0, acc / total, 0.0)  # (a padding slot with no key: 0)


@triton.jit(do_not_specialize=["kv_len", "SPLIT", "S"])
def _dec_attn_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, ws_ptr, scale, kv_len, SPLIT,
                           stride_qb, stride_cr, stride_ch, stride_cp, S,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    H = tl.num_programs(1)
    # keys 0..pos (the one written this step included); a slot past the step's keys (a stale position) is cut
    n = tl.minimum(tl.load(pos_ptr + row).to(tl.int32) + 1, kv_len)
    start = sp * SPLIT
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + row * stride_qb + h * D + d, mask=dmask, other=0.0).to(tl.float32)
    base = row.to(tl.int64) * stride_cr + h * stride_ch
    m, l, acc = _attention_part(q, k_ptr, v_ptr, base, start, tl.minimum(start + SPLIT, n), scale, stride_cp, d,
                                dmask, BLOCK_D, BLOCK_N)
    _store_part(ws_ptr, ((row * H + h) * S + sp) * (BLOCK_D + 2), d, m, l, acc, BLOCK_D)


@triton.jit(do_not_specialize=["S"])
def _dec_attn_combine_kernel(ws_ptr, out_ptr, S, stride_ob, D: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    d = tl.arange(0, BLOCK_D)
    y = _combined(ws_ptr, (row * H + h) * S, S, d, BLOCK_D, BLOCK_S)
    tl.store(out_ptr + row * stride_ob + h * D + d, y.to(out_ptr.dtype.element_ty), mask=d < D)


@triton.jit(do_not_specialize=["kv_len", "SPLIT", "S"])
def _dec_rotary_attn_kernel(qkv_ptr, cos_ptr, sin_ptr, qscale_ptr, pos_ptr, k_ptr, v_ptr, ws_ptr, cnt_ptr, out_ptr,
                            scale, kv_len, SPLIT, stride_qkv, P, stride_cs, stride_cr, stride_ch, stride_cp, S,
                            stride_ob, D: tl.constexpr, ROT: tl.constexpr, HAS_SCALE: tl.constexpr,
                            EXACT: tl.constexpr, COMBINE: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    # rotary_to_cache and the split kernel as one launch (program (row, head, split), as the split kernel's): each
    # program rotates the row's query itself; the program whose split holds the row's position writes the new key and
    # value into the cache before its loop reads them. One split: its part is the output. COMBINE: the last program
    # of a (row, head) to finish its part (a counter, reset by it for the next call) combines the parts; else the
    # combine kernel does, launched after.
    row = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    H = tl.num_programs(1)
    d, dmask, rot, partner, sign, c, s = _rotary_operands(cos_ptr, sin_ptr, row, stride_cs, D, ROT, BLOCK_D)
    base = qkv_ptr + row * stride_qkv + h * D
    q = _rotated_query(base, qscale_ptr, row, d, dmask, rot, partner, sign, c, s, qkv_ptr.dtype.element_ty,
                       HAS_SCALE, EXACT).to(tl.float32)
    pos = tl.load(pos_ptr + row).to(tl.int32)
    cbase = row.to(tl.int64) * stride_cr + h * stride_ch
    # the writer: the split holding pos (the last one for a stale position past kv_len, which no split reads)
    if sp == tl.minimum(pos // SPLIT, S - 1):
        kr = _rotated(base + P, d, dmask, rot, partner, sign, c, s, EXACT)
        v = tl.load(base + 2 * P + d, mask=dmask, other=0.0)
        dst = cbase + pos.to(tl.int64) * stride_cp + d
        tl.store(k_ptr + dst, kr.to(qkv_ptr.dtype.element_ty).to(k_ptr.dtype.element_ty), mask=dmask)
        tl.store(v_ptr + dst, v.to(v_ptr.dtype.element_ty), mask=dmask)
    tl.debug_barrier()  # the key and value written above are read by this program's other threads below
    start = sp * SPLIT
    end = tl.minimum(start + SPLIT, tl.minimum(pos + 1, kv_len))
    m, l, acc = _attention_part(q, k_ptr, v_ptr, cbase, start, end, scale, stride_cp, d, dmask, BLOCK_D, BLOCK_N)
    first = (row * H + h) * S
    if S == 1:  # (the combine of one part gives these bits: its weight is exp(0) = 1)
        y = tl.where(l > 0, acc / l, 0.0)
        tl.store(out_ptr + row * stride_ob + h * D + d, y.to(out_ptr.dtype.element_ty), mask=dmask)
    else:
        _store_part(ws_ptr, (first + sp) * (BLOCK_D + 2), d, m, l, acc, BLOCK_D)
        if COMBINE:
            tl.debug_barrier()  # every thread's share of the part is stored before the counter says so
            if tl.atomic_add(cnt_ptr + row * H + h, 1, sem="acq_rel") == S - 1:
                y = _combined(ws_ptr, first, S, d, BLOCK_D, BLOCK_S)
                tl.store(out_ptr + row * stride_ob + h * D + d, y.to(out_ptr.dtype.element_ty), mask=dmask)
                tl.store(cnt_ptr + row * H + h, 0)


# A step's programs (rows x heads x key splits) that fill the H200's 132 SMs: one row of 40 heads at 512 keys in
# 256-key splits is 80 programs, and its decode ran at 233 tok/s against 249 with 64-key splits (320 programs); at
# 2,000 keys 128-key splits (640) beat 256 (320) and 64 (1,280): 220 against 214 and 216 (NOTES step 65).
FILL_PROGRAMS = 512
MAX_SPLIT = 256
# attention_cuda.py's kernel, whose CTAs each hold their whole split in flight, does better with fewer, longer ones: at
# one row after 2,000 tokens 8 splits of 256 keys a head (and a graph of 2,048 keys) beat 16 of 128 (and 3,072 keys)
# by 1.9% of the step on an H100, and 32 or 64 rows were unchanged (NOTES step 99)
CUDA_FILL_PROGRAMS = 256


def fill_programs() -> int:
    """The programs key_split fills the GPU with: CUDA_FILL_PROGRAMS where attention_cuda.py's kernel is on
    (``attention_cuda.enabled``; a call it does not take runs the Triton kernels, split alike), else FILL_PROGRAMS
    (the Triton kernels; the CPU)."""
    from finetune.inference import attention_cuda  # (absolute, as _cuda_kernel's)

    return CUDA_FILL_PROGRAMS if attention_cuda.enabled() else FILL_PROGRAMS  # (enabled: a GPU, asked once)


def key_split(rows: int, heads: int, kv_len: int) -> int:
    """The keys a decode_attention program reads: MAX_SPLIT, halved (to 64 at least) while the step would have fewer
    than ``fill_programs()`` programs."""
    split, fill = MAX_SPLIT, fill_programs()
    while split > 64 and rows * heads * -(-kv_len // split) < fill:
        split //= 2
    return split


def covering_length(rows: int, heads: int, need: int) -> int:
    """The key length a graph of this step is captured at, >= ``need``: the longest with the split of ``need``'s
    (key_split), and for MAX_SPLIT, MAX_SPLIT x a power of two. A graph replays for every step up to its length, and
    the splits past a row's keys cost next to nothing at 8-64 rows (NOTES step 71), so a row meets a new graph at a
    few lengths only (one row of 40 heads: 1,536, 3,072, 4,096, 8,192 with the Triton kernels, 768, 1,536, 2,048,
    4,096, 8,192 with attention_cuda.py's; 64 rows: 256 x a power of two)."""
    split = key_split(rows, heads, need)
    if split < MAX_SPLIT:  # split is kept up to the longest length at which key_split did not stop at 2 x split
        return 2 * split * ((fill_programs() - 1) // (rows * heads))
    splits = 1
    while splits * MAX_SPLIT < need:
        splits *= 2
    return splits * MAX_SPLIT


def _parts(b: int, heads: int, D: int, kv_len: int, split: int | None, like: torch.Tensor):
    """(BLOCK_D, split, S, ws, out) of a decode attention call: the keys' split (``key_split`` unless given) and its
    part count, the parts' workspace (fp32, BLOCK_D + 2 a part: acc, m, l) and the output [b, 1, heads * D] in
    ``like``'s dtype. One place for both wrappers, whose parts must be split alike (their outputs are the same bits)."""
    block_d = triton.next_power_of_2(D)
    split = split or key_split(b, heads, kv_len)
    S = triton.cdiv(kv_len, split)
    ws = torch.empty(b * heads * S * (block_d + 2), dtype=torch.float32, device=like.device)
    out = torch.empty(b, 1, heads * D, dtype=like.dtype, device=like.device)
    return block_d, split, S, ws, out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float, kv_len: int, split: int | None = None) -> torch.Tensor:
    """One decode step's attention: q [b, heads, 1, D] (rotary and logN applied), row i attending to its keys
    0..pos[i] of ``k_cache``/``v_cache`` [slots >= b, heads, capacity, D] (at most ``kv_len``), scores times
    ``scale``. Returns [b, 1, heads * D] in q's dtype, the layout c_proj reads. The keys are split in ``split``-key
    parts (default ``key_split`` of kv_len), each one program a head (fp32 online softmax), combined by a second
    kernel; splits past a row's own keys run no iteration, so a graph of this call serves every step whose rows
    have at most kv_len keys."""
    b, heads, one, D = q.shape
    if one != 1 or not q.is_contiguous():
        raise ValueError(f"decode_attention takes a contiguous [b, heads, 1, D] query, got {tuple(q.shape)}")
    _check_cache(k_cache, v_cache, b, heads, D, kv_len)
    block_d, split, S, ws, out = _parts(b, heads, D, kv_len, split, q)
    cuda = _cuda_kernel(q, k_cache, v_cache, D, pos, split)
    if cuda is not None and cuda.attention(q.view(b, heads * D), None, None, None, pos, k_cache, v_cache, ws, None,
                                           out, scale, kv_len, split, S, heads, D):
        return out
    _dec_attn_split_kernel[(b, heads, S)](q, k_cache, v_cache, pos, ws, float(scale), kv_len, split,
                                          q.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), S,
                                          D=D, BLOCK_D=block_d, BLOCK_N=64, num_warps=4)
    _dec_attn_combine_kernel[(b, heads)](ws, out, S, out.stride(0), D=D, BLOCK_D=block_d, BLOCK_S=COMBINE_SPLITS,
                                         num_warps=COMBINE_WARPS)
    return out


# The most programs (rows x heads x key splits) whose parts the last program of each (row, head) combines inside the
# one launch: at one row (40-640 programs) that beat the combine kernel launched after (NOTES step 79); at 64 rows of
# one split each (2,560) the counter's round trip at the end of every program cost more than the launch it saves, so
# larger grids launch the combine kernel (one wave of programs is about 1,000 on the H200).
ONE_LAUNCH_PROGRAMS = 1024


def _counters(device: torch.device, n: int) -> torch.Tensor | None:
    """rotary_attention's per-(row, head) counters: int32 zeros (each call leaves them zero), at least n, grown
    outside graph capture only (None during one when too few: the combine kernel is launched instead)."""
    if device.type != "cuda":  # the interpreter's CPU tensors (tests): no graphs to keep buffers for
        return torch.zeros(n, dtype=torch.int32, device=device)

    def make(held):
        return torch.zeros(max(n, 64 * 128, held.numel() if held is not None else 0), dtype=torch.int32,
                           device=device)

    return grown_buffer("attention counters", device, lambda held: held.numel() >= n, make)


def rotary_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, query_scale: torch.Tensor | None,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, heads: int, scale: float,
                     kv_len: int, split: int | None = None) -> torch.Tensor:
    """``rotary_to_cache`` then ``decode_attention`` in one launch (two where the grid is large): from c_attn's
    output ``qkv`` [b, 1, 3 * heads * D], rotary and the logN scale on q and k, k and v written into the caches at
    each row's position, and each row's attention over its own keys 0..pos[i] (at most ``kv_len``), split over the
    keys as ``decode_attention`` splits them. The parts are combined by the last program of each (row, head) where
    the grid has at most ONE_LAUNCH_PROGRAMS programs, else by the combine kernel; one split needs no combine. The
    same arithmetic as the two calls, and the same bits (COMBINE_WARPS). On CUDA attention_cuda.py's kernel runs it
    where it takes the call (``_cuda_kernel``), as it runs ``decode_attention``: the same bits again between the two.
    Returns [b, 1, heads * D] in qkv's dtype."""
    b = qkv.shape[0]
    qkv2 = _rows(qkv, "qkv")
    if qkv2.shape[0] != b:
        raise ValueError(f"rotary_attention takes one token per row, got qkv of shape {tuple(qkv.shape)}")
    P, D, rot, cs, sn, qscale = _rotary_inputs(qkv2, cos, sin, query_scale, heads)
    _check_cache(k_cache, v_cache, b, heads, D, kv_len)
    block_d, split, S, ws, out = _parts(b, heads, D, kv_len, split, qkv)  # (ws not read at S = 1)
    counters = _counters(qkv.device, b * heads) if 1 < S and b * heads * S <= ONE_LAUNCH_PROGRAMS else None
    cuda = _cuda_kernel(qkv, k_cache, v_cache, D, pos, split)
    if cuda is not None and cuda.attention(qkv2, cs, sn, qscale if query_scale is not None else None, pos, k_cache,
                                           v_cache, ws, counters, out, scale, kv_len, split, S, heads, D):
        return out
    _dec_rotary_attn_kernel[(b, heads, S)](
        qkv2, cs, sn, qscale, pos, k_cache, v_cache, ws, counters if counters is not None else pos.new_empty(1,
        dtype=torch.int32), out, float(scale), kv_len, split, qkv2.stride(0), P, cs.stride(0), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), S, out.stride(0), D=D, ROT=rot, HAS_SCALE=query_scale is not None,
        EXACT=not _INTERPRETED, COMBINE=counters is not None, BLOCK_D=block_d, BLOCK_N=64, BLOCK_S=COMBINE_SPLITS,
        num_warps=COMBINE_WARPS)
    if S > 1 and counters is None:
        _dec_attn_combine_kernel[(b, heads)](ws, out, S, out.stride(0), D=D, BLOCK_D=block_d, BLOCK_S=COMBINE_SPLITS,
                                             num_warps=COMBINE_WARPS)
    return out


def _cuda_kernel(like: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, D: int, pos: torch.Tensor,
                 split: int):
    """attention_cuda where it serves this call (CUDA, FINETUNE_ATTENTION_CUDA on, NVRTC, a dtype and head size it
    takes, both caches in the query's dtype: the kernel reads them as that type), else None: the Triton kernels here
    run it."""
    if not like.is_cuda or k_cache.dtype != like.dtype or v_cache.dtype != like.dtype:
        return None
    from finetune.inference import attention_cuda  # (absolute, as above; never imported on the CPU)

    return attention_cuda if attention_cuda.serves(like.device, like.dtype, D, pos.dtype, split) else None


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, b: int, heads: int, D: int, kv_len: int = 0) -> None:
    """A layer's K and V caches [slots, heads, capacity, D] hold b rows of these heads (and kv_len keys), with one
    layout for both and D contiguous (the kernels index them by the same strides)."""
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.shape[0] < b \
            or k_cache.shape[1] != heads or k_cache.shape[3] != D or k_cache.stride(3) != 1 \
            or kv_len > k_cache.shape[2]:
        keys = f" and {kv_len} keys" if kv_len else ""
        raise ValueError(f"KV cache {tuple(k_cache.shape)} / {tuple(v_cache.shape)} does not fit {b} rows x "
                         f"{heads} heads x {D}{keys}")


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """t as a [rows, last] view (add_rms_norm writes the residual back in place: never a copy)."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got shape {tuple(t.shape)} strides {tuple(t.stride())}")
    return t.view(-1, t.shape[-1])


def _norm_operands(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor):
    """The norm kernels' operands, checked: x and delta as [rows, N] views (delta: x's when None) and the normed
    rows' output (the dtype of x * weight)."""
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"RMSNorm weight has shape {tuple(weight.shape)}, expected ({N},)")
    x2 = _rows(x, "x")
    if delta is not None:
        if delta.shape != x.shape or delta.dtype != x.dtype:
            raise ValueError(f"delta {tuple(delta.shape)} {delta.dtype} does not match x {tuple(x.shape)} {x.dtype}")
        d2 = _rows(delta, "delta")
    else:
        d2 = x2
    return x2, d2, torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """``x += delta`` (in place, rounded to x's dtype; skipped when delta is None), then RMSNorm of the new x
    as ``modeling.kernels.rms_norm`` computes it. Returns (x, normed); normed has x's shape and the dtype of
    x * weight."""
    x2, d2, out = _norm_operands(x, delta, weight)
    N = x2.shape[1]
    block = triton.next_power_of_2(N)
    _dec_add_rms_norm_kernel[(x2.shape[0],)](x2, d2, weight, out, N, float(eps), x2.stride(0), d2.stride(0),
                                             out.stride(0), HAS_DELTA=delta is not None, BLOCK=block,
                                             num_warps=min(16, max(1, block // 512)), enable_fp_fusion=False)
    return x, out.view(x.shape)


XA_PROGRAMS = 256


def add_rms_norm_low_rank(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                          at: torch.Tensor):
    """``add_rms_norm``, and h = normed @ ``at``.T for the LoRA products of the Linears that read the normed rows
    (``at`` [R, N]: their A matrices transposed, stacked), summed in fp32 and rounded once to normed's dtype, as the
    GEMV's own producers compute it. Returns (x, normed, h [rows, R]); x is a new tensor holding x + delta (the
    kernel's programs all read the old x), or x itself when delta is None."""
    x2, d2, out = _norm_operands(x, delta, weight)
    rows, N = x2.shape
    if at.dim() != 2 or at.shape[1] != N or at.stride(1) != 1 or at.dtype != x.dtype:
        raise ValueError(f"the stacked A.T {tuple(at.shape)} {at.dtype} does not fit rows of {N} {x.dtype} "
                         "(expected [R, N], unit column stride)")
    xo = torch.empty_like(x2) if delta is not None else x2
    R = at.shape[0]
    h = torch.empty(rows, R, dtype=out.dtype, device=x.device)
    block = triton.next_power_of_2(N)
    sub = 1 if R <= 64 else 2  # one row: 64 programs at one or two adapters' r=64 (NOTES step 43)
    # more rows: columns a program grow so that about XA_PROGRAMS programs redo a row's norm (each reads the row)
    cols = max(sub, min(triton.next_power_of_2(R), triton.next_power_of_2(triton.cdiv(rows * R, XA_PROGRAMS))))
    _dec_add_rms_norm_xa_kernel[(rows, triton.cdiv(R, cols))](
        x2, d2, weight, at, xo, out, h, N, R, float(eps), x2.stride(0), d2.stride(0), xo.stride(0), out.stride(0),
        at.stride(0), h.stride(0), HAS_DELTA=delta is not None, COLS=cols, SUB=sub, BLOCK=block,
        num_warps=min(16, max(1, block // 512)), enable_fp_fusion=False)
    return (xo.view(x.shape) if delta is not None else x), out.view(x.shape), h


def _rotary_inputs(qkv2: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, query_scale: torch.Tensor | None,
                   heads: int):
    """The rotary kernels' operands for the tokens of ``qkv2`` [tokens, 3 * heads * D], checked: (P = heads * D, D,
    rot, cos and sin as [tokens, rot] fp32, the logN scale a token as fp32 (cos when None: not read))."""
    tokens = qkv2.shape[0]
    P = qkv2.shape[1] // 3
    D = P // heads
    rot = cos.shape[-1]
    if 3 * heads * D != qkv2.shape[1] or rot > D or rot % 2:
        raise ValueError(f"qkv width {qkv2.shape[1]} does not split into 3 x {heads} heads, or rotary width {rot} "
                         f"is odd or above the head size")
    cs, sn = cos.reshape(tokens, rot), sin.reshape(tokens, rot)
    if cs.dtype != torch.float32 or sn.dtype != torch.float32 or cs.stride() != sn.stride() or cs.stride(1) != 1:
        raise ValueError("cos and sin must be fp32 with the same contiguous layout")
    scale = query_scale.reshape(tokens).float() if query_scale is not None else cs
    return P, D, rot, cs, sn, scale


def _rotary_cache(qkv2: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, query_scale: torch.Tensor | None,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None,
                  heads: int, slots: int, keys: int = 0) -> torch.Tensor:
    """The rotary kernel over the tokens of ``qkv2`` [tokens, 3 * heads * D]: token i's k and v to cache row
    ``rows[i]`` (None: row i) at position ``pos[i]``, cos/sin/query_scale one row a token. The cache must hold
    ``slots`` rows (and ``keys`` positions). Returns q [tokens, heads, D]."""
    tokens = qkv2.shape[0]
    P, D, rot, cs, sn, scale = _rotary_inputs(qkv2, cos, sin, query_scale, heads)
    _check_cache(k_cache, v_cache, slots, heads, D, keys)
    q = torch.empty(tokens, heads, D, dtype=qkv2.dtype, device=qkv2.device)
    _dec_rotary_cache_kernel[(tokens, heads)](qkv2, cs, sn, scale, pos, rows if rows is not None else pos, k_cache,
                                              v_cache, q, qkv2.stride(0), P, cs.stride(0), k_cache.stride(0),
                                              k_cache.stride(1), k_cache.stride(2), D=D, ROT=rot,
                                              HAS_SCALE=query_scale is not None, HAS_CROW=rows is not None,
                                              BLOCK_D=triton.next_power_of_2(D), num_warps=1,
                                              enable_fp_fusion=False)
    return q


def rotary_to_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, query_scale: torch.Tensor | None,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, heads: int) -> torch.Tensor:
    """One decode step's attention inputs from c_attn's output ``qkv`` [b, 1, 3 * heads * D]: rotary on q and k
    (``cos``/``sin`` [b, 1, rot] fp32, rot <= D), q scaled by ``query_scale`` [b, 1] (logN; None = 1), k and v
    written into ``k_cache``/``v_cache`` [slots >= b, heads, capacity, D] at row i, position ``pos[i]``.
    Returns q [b, heads, 1, D] in qkv's dtype."""
    b = qkv.shape[0]
    qkv2 = _rows(qkv, "qkv")
    if qkv2.shape[0] != b:
        raise ValueError(f"rotary_to_cache takes one token per row, got qkv of shape {tuple(qkv.shape)}")
    q = _rotary_cache(qkv2, cos, sin, query_scale, k_cache, v_cache, pos, None, heads, b)
    return q.view(b, heads, 1, q.shape[-1])


def prefill_index(n: int, T: int, slot, device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(position, cache row) of each token of a prefill of n prompts right-padded to T, joining at cache row
    ``slot`` (an int, or a one-element int64 tensor on the device: a graph's input), at positions start..start+T-1
    (``start`` > 0: a later chunk of one long prompt): what ``prefill_rotary_to_cache`` takes (made once a prefill,
    not once a layer)."""
    pos = torch.arange(start, start + T, device=device).repeat(n)  # (int64, as a decode step's: one kernel build)
    rows = (torch.arange(n, device=device) + slot).repeat_interleave(T)
    return pos, rows


def prefill_rotary_to_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            query_scale: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot: int | torch.Tensor, heads: int,
                            index: tuple[torch.Tensor, torch.Tensor], start: int = 0) -> torch.Tensor:
    """A prefill's attention inputs from c_attn's output ``qkv`` [n, T, 3 * heads * D] (n prompts right-padded to
    T): rotary on q and k (``cos``/``sin`` [n, T, rot] fp32), q scaled by ``query_scale`` [n, T] (logN; None = 1),
    k and v written into ``k_cache``/``v_cache`` [slots, heads, capacity, D] at rows slot..slot+n-1, positions
    start..start+T-1 (``index``: ``prefill_index`` with the same ``start``). The same arithmetic as
    ``rotary_to_cache`` a token. Returns q as [n, heads, T, D] (a view of token-major storage, as the model's
    attention takes it)."""
    if qkv.dim() != 3:
        raise ValueError(f"prefill_rotary_to_cache takes qkv as [prompts, tokens, width], got {tuple(qkv.shape)}")
    n, T = qkv.shape[:2]
    pos, rows = index
    if pos.shape != (n * T,) or rows.shape != (n * T,):
        raise ValueError(f"the prefill index holds {tuple(pos.shape)} positions for {n * T} tokens")
    if cos.shape[:2] != (n, T) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin {tuple(cos.shape)} do not cover {n} prompts x {T} tokens")
    slots = slot + n if isinstance(slot, int) else n  # (a tensor names a free row of the cache: the engine's)
    q = _rotary_cache(_rows(qkv, "qkv"), cos, sin, query_scale, k_cache, v_cache, pos, rows, heads, slots,
                      start + T)
    return q.view(n, T, heads, q.shape[-1]).transpose(1, 2)


def _row_stride(t: torch.Tensor) -> int | None:
    """The distance between t's rows when its leading dims collapse into one (its last dim contiguous), else None."""
    if t.dim() == 0 or (t.stride(-1) != 1 and t.shape[-1] > 1):
        return None
    lead = [(size, stride) for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size != 1]
    if not lead:
        return t.shape[-1]
    row = lead[-1][1]
    inner = 1
    for size, stride in reversed(lead):
        if stride != row * inner:
            return None
        inner *= size
    return row if row >= t.shape[-1] else None


def swiglu(up: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``up * F.silu(gate)`` (Qwen's w1(x) * silu(w2(x))), same shape and dtype, contiguous. up and gate may be
    views whose rows are the same distance apart (the halves of w1 and w2's product from one GEMV)."""
    stride = _swiglu_operands(up, gate)
    out = torch.empty(up.shape, device=up.device, dtype=up.dtype)
    n = up.numel()
    if n:
        block = 1024
        _dec_swiglu_kernel[(triton.cdiv(n, block),)](up, gate, out, n, up.shape[-1], stride, BLOCK=block,
                                                      num_warps=4, enable_fp_fusion=False)
    return out


def _swiglu_operands(up: torch.Tensor, gate: torch.Tensor) -> int:
    """The distance between up's (and gate's) rows, checked."""
    stride = _row_stride(up)
    if (up.shape != gate.shape or up.dtype != gate.dtype or stride is None or _row_stride(gate) != stride):
        raise ValueError(f"swiglu needs up and gate of one shape, dtype and row layout (last dim contiguous), got "
                         f"{tuple(up.shape)} {up.dtype} strides {up.stride()} and {tuple(gate.shape)} {gate.dtype} "
                         f"strides {gate.stride()}")
    return stride


# Elements of A.T a swiglu_low_rank program holds at once (its columns x the chunk of the row), over 16 warps: a
# 13,696-wide row in two passes at one column a program (16 elements a thread, as the norm's 8,192; 16,384 spilled
# registers). With 4,096 over 4 warps (four dependent passes) the kernel took 9.3 us a layer at one row on the H100
# where SwiGLU alone takes 1.3; this form 5.9 us on the H200, which pays only at 3-8 rows (row_adapters.
# XA_IN_SWIGLU_ROWS, NOTES step 87)
XA_TILE = 8192
XA_WARPS = 16


def swiglu_low_rank(up: torch.Tensor, gate: torch.Tensor, at: torch.Tensor):
    """``swiglu``, and h = out @ ``at``.T for the LoRA product of the Linear that reads it (mlp.c_proj; ``at``
    [R, N]: its adapters' A matrices transposed, stacked), summed in fp32 and rounded once to out's dtype, as
    ``add_rms_norm_low_rank`` computes it. Returns (out, h [rows, R]); out is bit for bit ``swiglu``'s. The programs
    as the norm's: 64 a row at r=64 and one row (one column each), more columns a program as rows grow."""
    stride = _swiglu_operands(up, gate)
    N = up.shape[-1]
    if at.dim() != 2 or at.shape[1] != N or at.stride(1) != 1 or at.dtype != up.dtype:
        raise ValueError(f"the stacked A.T {tuple(at.shape)} {at.dtype} does not fit rows of {N} {up.dtype} "
                         "(expected [R, N], unit column stride)")
    out = torch.empty(up.shape, device=up.device, dtype=up.dtype)
    rows, R = out.numel() // max(N, 1), at.shape[0]
    h = torch.empty(rows, R, dtype=up.dtype, device=up.device)
    if rows and N:
        cols = min(triton.next_power_of_2(R), triton.next_power_of_2(triton.cdiv(rows * R, XA_PROGRAMS)))
        chunk = min(triton.next_power_of_2(N), max(128, XA_TILE // cols))
        _dec_swiglu_xa_kernel[(rows, triton.cdiv(R, cols))](
            up, gate, at, out, h, N, R, stride, at.stride(0), h.stride(0), COLS=cols, CHUNK=chunk,
            num_warps=max(1, min(XA_WARPS, cols * chunk // 1024)), enable_fp_fusion=False)
    return out, h


__all__ = ["add_rms_norm", "add_rms_norm_low_rank", "decode_attention", "prefill_index", "prefill_rotary_to_cache",
           "rotary_attention", "rotary_to_cache", "swiglu", "swiglu_low_rank"]
