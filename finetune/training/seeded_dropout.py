"""Dropout whose mask is a pure function of (a seed tensor on the GPU, a per-site salt, the element index).

Why: CUDA-graphed training (``graphs.py``) replays checkpointed blocks, and checkpointing normally re-creates
a dropout mask in the recomputation by saving and restoring the global RNG state, which cannot be done
inside a graph capture. Here the mask is recomputed from the seed instead: the recomputation, and the
backward, regenerate exactly the forward's mask (Philox, ``tl.randint4x``), and nothing is saved for backward.

The seed is a one-element int64 tensor that the caller advances once per training forward (in place, so a
captured graph advances it on every replay); each dropout site adds its own salt, so no two sites or steps
share a mask. As ``nn.Dropout``: zero with probability p (to the nearest 1/65536: each element draws 16 random
bits), survivors scaled by 1/(1-p).
CUDA with Triton only (and Triton's CPU interpreter, which the tests use).

At a LoRA site the dropout's only reader is lora_A, so ``SeededDropout.project`` computes lora_A(dropout(x)) in
one kernel that applies the mask as it loads x, and its backward gives x's gradient (mask applied) and lora_A's
weight gradient from x and the same mask: the dropped copy of x is never written, read or kept for backward.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import nn

from finetune.settings import settings  # absolute: the interpreter tests load this file on its own

_BLOCK = 4096  # elements a program: 512 Philox calls of 8 elements each
SALTS = 1 << 16  # sites per seed value: key = seed * SALTS + salt is unique per (step, site)
_LEVELS = 1 << 16  # a mask draws 16 random bits an element


def drop_threshold(p: float) -> int:
    """An element is dropped when its 16 random bits are below this: p taken to the nearest 1/65536 (0.05 drops
    with probability 3277/65536 = 0.0500030). Survivors are scaled by 1/(1-p) for the p asked, as nn.Dropout."""
    return round(p * _LEVELS)


@triton.jit
def _keep_bits(key, counters, C: tl.constexpr):
    """The 16-bit numbers of elements 8c..8c+7 for each of the C counters c: [C, 8]. One Philox call makes four
    32-bit words, eight numbers (a word's low half, then its high half). Every kernel here draws an element's
    number through this, so the fused LoRA kernels below reproduce _seeded_dropout_kernel's mask exactly."""
    r0, r1, r2, r3 = tl.randint4x(key, counters)
    words = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (C, 4)).to(tl.uint32, bitcast=True)
    return tl.reshape(tl.join(words & 0xFFFF, words >> 16), (C, 8))


@triton.jit
def _seeded_dropout_kernel(x_ptr, y_ptr, seed_ptr, salt, n, threshold, scale, BLOCK: tl.constexpr,
                           SALTS: tl.constexpr):
    # Counter c of the program serves its elements 8c..8c+7, so each thread loads and stores 16 contiguous bytes.
    # The generator's arithmetic bounded this kernel: one number a call made it ~50 us a launch over a 14B step's
    # LoRA inputs on an H200, four a call (31-bit numbers) ~26 us, where the bytes need 12-32 (benchmarks/NOTES.md,
    # steps 25 and 46).
    C: tl.constexpr = BLOCK // 8
    pid = tl.program_id(0)
    key = tl.load(seed_ptr) * SALTS + salt
    bits = _keep_bits(key, pid * C + tl.arange(0, C), C)
    offs = pid * BLOCK + tl.arange(0, C)[:, None] * 8 + tl.arange(0, 8)[None, :]
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    y = tl.where(bits >= threshold, x.to(tl.float32) * scale, 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inside)


def seeded_dropout_apply(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """x with the mask of (seed, salt) applied and survivors scaled by 1/(1-p) (no autograd)."""
    if x.numel() >= 2**31:
        raise ValueError(f"seeded dropout: {x.numel()} elements is more than the kernel's int32 offsets cover")
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        _seeded_dropout_kernel[(triton.cdiv(n, _BLOCK),)](x, y, seed, salt, n, drop_threshold(p), 1.0 / (1.0 - p),
                                                          BLOCK=_BLOCK, SALTS=SALTS)
    return y


@triton.jit
def _tile_keep(key, rows, K, k0, threshold, BM: tl.constexpr, BK: tl.constexpr):
    """The mask of x[rows, k0:k0+BK] for x of K columns (K and k0 multiples of 8): element (m, k) is element
    m K + k of the flat tensor, drawn as _seeded_dropout_kernel draws it."""
    C: tl.constexpr = BK // 8
    counters = tl.reshape((rows[:, None] * K + k0) // 8 + tl.arange(0, C)[None, :], (BM * C,))
    return tl.reshape(_keep_bits(key, counters, BM * C), (BM, BK)) >= threshold


@triton.jit
def _dropout_xa_kernel(x_ptr, a_ptr, out_ptr, seed_ptr, salt, M, K, R, threshold, scale, BM: tl.constexpr,
                       BK: tl.constexpr, RP: tl.constexpr, SALTS: tl.constexpr):
    # out[M, R] = dropout(x)[M, K] @ a[R, K].T: a program takes BM rows through all of K
    pid = tl.program_id(0)
    key = tl.load(seed_ptr) * SALTS + salt
    rows = pid * BM + tl.arange(0, BM)
    rs = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        x = tl.where(_tile_keep(key, rows, K, k0, threshold, BM, BK), x, tl.zeros_like(x))
        a = tl.load(a_ptr + rs[None, :] * K + ks[:, None], mask=(rs[None, :] < R) & (ks[:, None] < K), other=0.0)
        acc = tl.dot(x, a, acc)
    out = (acc * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * R + rs[None, :], out, mask=(rows[:, None] < M) & (rs[None, :] < R))


@triton.jit
def _dropout_xa_backward_kernel(x_ptr, a_ptr, g_ptr, gx_ptr, ga_ptr, seed_ptr, salt, M, K, R, split, threshold,
                                scale, BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, WRITE_GX: tl.constexpr,
                                SALTS: tl.constexpr):
    # Program (kb, s) owns columns kb BK.. of K and the row blocks s, s + split, ...: it writes gx = mask * (g @ a)
    # there and its part of ga = g.T @ dropout(x) (the parts summed afterwards in a fixed order: deterministic)
    kb = tl.program_id(0)
    s = tl.program_id(1)
    key = tl.load(seed_ptr) * SALTS + salt
    k0 = kb * BK
    ks = k0 + tl.arange(0, BK)
    rs = tl.arange(0, RP)
    a = tl.load(a_ptr + rs[:, None] * K + ks[None, :], mask=(rs[:, None] < R) & (ks[None, :] < K), other=0.0)
    acc = tl.zeros((RP, BK), dtype=tl.float32)
    for m0 in range(s * BM, M, split * BM):
        rows = m0 + tl.arange(0, BM)
        inside = (rows[:, None] < M) & (ks[None, :] < K)
        g = tl.load(g_ptr + rows[:, None] * R + rs[None, :], mask=(rows[:, None] < M) & (rs[None, :] < R), other=0.0)
        keep = _tile_keep(key, rows, K, k0, threshold, BM, BK)
        if WRITE_GX:
            gx = tl.where(keep, tl.dot(g, a) * scale, 0.0)
            tl.store(gx_ptr + rows[:, None] * K + ks[None, :], gx.to(gx_ptr.dtype.element_ty), mask=inside)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=inside, other=0.0)
        x = tl.where(keep, x, tl.zeros_like(x))
        acc = tl.dot(tl.trans(g), x, acc)
    tl.store(ga_ptr + s * R * K + rs[:, None] * K + ks[None, :], acc * scale,
             mask=(rs[:, None] < R) & (ks[None, :] < K))


# Tiles (H200, 14B shapes: benchmarks/NOTES.md step 51). The backward splits the rows so that about two programs
# an SM run; the interpreter (tests) gets the smallest tiles.
_FWD_TILE = dict(BM=32, BK=64, num_warps=4, num_stages=3)
_BWD_TILE = dict(BM=32, BK=64, num_warps=4, num_stages=2)
_FUSED_MAX_RANK = 128  # r past this keeps the two kernels (the tiles' [BM, r] accumulators)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _programs_wanted(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _rank_tile(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot wants 16+ and a power of two


def dropout_xa(x2d: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """dropout(x2d) @ a.T with the mask of (seed, salt) (as seeded_dropout_apply draws it), in x2d's dtype; no
    autograd. x2d [M, K] contiguous, K a multiple of 8; a [r, K] in x2d's dtype."""
    M, K = x2d.shape
    R = a.shape[0]
    out = torch.empty(M, R, device=x2d.device, dtype=x2d.dtype)
    if M:
        t = _FWD_TILE
        _dropout_xa_kernel[(triton.cdiv(M, t["BM"]),)](
            x2d, a, out, seed, salt, M, K, R, drop_threshold(p), 1.0 / (1.0 - p), BM=t["BM"], BK=t["BK"],
            RP=_rank_tile(R), SALTS=SALTS, num_warps=t["num_warps"], num_stages=t["num_stages"])
    return out


def dropout_xa_backward(x2d, a, g, seed, salt, p, need_gx: bool = True):
    """The gradients of dropout_xa: (x2d's, mask applied; None unless need_gx) and a's in fp32, from the output's
    gradient g [M, r]."""
    M, K = x2d.shape
    R = a.shape[0]
    t = _BWD_TILE
    blocks = triton.cdiv(K, t["BK"])
    split = max(1, min(triton.cdiv(M, t["BM"]), triton.cdiv(_programs_wanted(x2d.device), blocks)))
    gx = torch.empty_like(x2d) if need_gx else None
    parts = torch.empty(split, R, K, device=x2d.device, dtype=torch.float32)
    if M:
        _dropout_xa_backward_kernel[(blocks, split)](
            x2d, a, g, gx if need_gx else x2d, parts, seed, salt, M, K, R, split, drop_threshold(p), 1.0 / (1.0 - p),
            BM=t["BM"], BK=t["BK"], RP=_rank_tile(R), WRITE_GX=need_gx, SALTS=SALTS, num_warps=t["num_warps"],
            num_stages=t["num_stages"])
    else:
        parts.zero_()
    return gx, parts.sum(0)


class _SeededDropoutXA(torch.autograd.Function):
    """lora_A(dropout(x)) for a bias-free lora_A: the adapter weight cast to x's dtype (as autocast casts it), the
    product in x's dtype, the weight's gradient in its own dtype (fp32 master weights: accumulated in fp32)."""

    @staticmethod
    def forward(ctx, x, weight, seed, salt, p):
        x2d = x.reshape(-1, x.shape[-1])
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        ctx.save_for_backward(x2d)  # through saved tensors: a checkpointed block recomputes it
        ctx.weight, ctx.seed, ctx.salt, ctx.p, ctx.shape = weight, seed, salt, p, x.shape
        out = dropout_xa(x2d, weight.to(x.dtype), seed, salt, p)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        (x2d,) = ctx.saved_tensors
        weight = ctx.weight
        g = grad.reshape(-1, grad.shape[-1]).to(x2d.dtype).contiguous()
        gx, ga = dropout_xa_backward(x2d, weight.to(x2d.dtype), g, ctx.seed, ctx.salt, ctx.p,
                                     need_gx=ctx.needs_input_grad[0])
        ctx.weight = None
        return (gx.view(ctx.shape) if gx is not None else None,
                ga.to(weight.dtype) if ctx.needs_input_grad[1] else None, None, None, None)


class _SeededDropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seed, salt, p):
        # the seed is a persistent module buffer, kept by reference: nothing goes through saved-tensor hooks
        ctx.seed, ctx.salt, ctx.p = seed, salt, p
        return seeded_dropout_apply(x, seed, salt, p)

    @staticmethod
    def backward(ctx, grad):
        return seeded_dropout_apply(grad, ctx.seed, ctx.salt, ctx.p), None, None, None


class SeededDropout(nn.Module):
    """Stands in for an ``nn.Dropout(p)`` (same p, same train/eval behaviour) at one site."""

    def __init__(self, p: float, seed: torch.Tensor, salt: int):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        if not 0 <= salt < SALTS:
            raise ValueError(f"salt must be in [0, {SALTS}), got {salt}")
        self.p = float(p)
        self.salt = int(salt)
        self.seed = seed  # shared by every site of a model; deliberately not a buffer (not saved, not cast)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return _SeededDropoutFn.apply(x, self.seed, self.salt, self.p)

    def project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """lora_A(self(x)) for a bias-free lora_A of `weight` [r, in], in one kernel (and one in backward); None
        where that path does not apply, and the caller runs the two modules: in eval mode or at p 0, off CUDA, an
        input that is not bf16/fp16 or whose last dim is not a multiple of 8, r past 128, an output dtype that
        would differ from lora_A's (autocast to another dtype), or FINETUNE_FUSED_LORA_DROPOUT=0."""
        if not self.training or self.p == 0.0 or not settings().fused_lora_dropout:
            return None
        if x.device.type != "cuda" and not _INTERPRETED:
            return None
        if x.dtype not in (torch.bfloat16, torch.float16) or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
            return None
        if x.shape[-1] % 8 or weight.shape[0] > _FUSED_MAX_RANK or x.numel() >= 2**31:
            return None
        kind = x.device.type
        lora_a_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
        if lora_a_dtype != x.dtype:
            return None
        return _SeededDropoutXA.apply(x, weight, self.seed, self.salt, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, salt={self.salt}"
