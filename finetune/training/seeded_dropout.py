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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

_BLOCK = 4096  # elements a program: 512 Philox calls of 8 elements each
SALTS = 1 << 16  # sites per seed value: key = seed * SALTS + salt is unique per (step, site)
_LEVELS = 1 << 16  # a mask draws 16 random bits an element


def drop_threshold(p: float) -> int:
    """An element is dropped when its 16 random bits are below this: p taken to the nearest 1/65536 (0.05 drops
    with probability 3277/65536 = 0.0500030). Survivors are scaled by 1/(1-p) for the p asked, as nn.Dropout."""
    return round(p * _LEVELS)


@triton.jit
def _seeded_dropout_kernel(x_ptr, y_ptr, seed_ptr, salt, n, threshold, scale, BLOCK: tl.constexpr,
                           SALTS: tl.constexpr):
    # One Philox call makes four 32-bit words, eight 16-bit numbers: counter c of the program serves its elements
    # 8c..8c+7, so each thread loads and stores 16 contiguous bytes. The generator's arithmetic bounded this
    # kernel: one number a call made it ~50 us a launch over a 14B step's LoRA inputs on an H200, four a call
    # (31-bit numbers) ~26 us, where the bytes need 12-32 (benchmarks/NOTES.md, steps 25 and 46).
    C: tl.constexpr = BLOCK // 8
    pid = tl.program_id(0)
    key = tl.load(seed_ptr) * SALTS + salt
    r0, r1, r2, r3 = tl.randint4x(key, pid * C + tl.arange(0, C))
    words = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (C, 4)).to(tl.uint32, bitcast=True)
    bits = tl.reshape(tl.join(words & 0xFFFF, words >> 16), (C, 8))
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

    def extra_repr(self) -> str:
        return f"p={self.p}, salt={self.salt}"
