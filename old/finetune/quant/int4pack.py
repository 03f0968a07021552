"""GPTQ Int4 weights in PyTorch's own int4 layout (``aten._weight_int4pack_mm``, the "tinygemm" kernel), for
decoding: a second copy of a layer's weight, made once, that a fast built-in kernel reads.

Why: at one to a few rows a decode step is a matrix-vector product per Linear, bound by reading the packed
weight. PyTorch ships a tuned CUDA kernel for exactly that (bf16 activations, 4-bit weights in groups of 32-256
along the input, a per-(group, output) scale and a float zero point); the project's Triton GEMV reaches ~22% of
the copy rate on an H200 at one row (benchmarks/NOTES.md). GPTQ's format maps onto it exactly as far as the
integers go:

    GPTQ:      W[n, k] = (q[k, n] - z[g, n]) * s[g, n]            (z from qzeros, +1 in the v1 format)
    int4pack:  W[n, k] = (q[k, n] - 8) * s'[g, n] + m[g, n]       with s' = s, m = (8 - z) * s

s' and m are stored in bf16 (the kernel's format), so the scale loses fp16's last 3 mantissa bits and m is
rounded once: each weight differs from the exact dequantization by about one bf16 rounding (relative 2**-8 of
the group's scale), the same order as rounding the dequantized weight itself to bf16, as the training path
does. The integers q are kept exactly.

desc_act (a g_idx that is not ``k // group_size``): the input rows are reordered so that each group's rows are
contiguous (a stable sort by g_idx); ``perm`` then reorders x's columns the same way at every call.
"""

from __future__ import annotations

import torch

from .packing import group_sorted_order, groups_even, unpack_cols, unpack_rows

GROUP_SIZES = (32, 64, 128, 256)  # what the kernel accepts
INNER_K_TILES = 8  # the kernel's packing parameter: K must be a multiple of INNER_K_TILES * 16


def unsupported(K: int, N: int, bits: int, group_size: int, g_idx: torch.Tensor | None = None) -> str | None:
    """Why a layer cannot use the int4pack kernel (None: it can)."""
    if bits != 4:
        return f"{bits}-bit weights (the kernel is 4-bit only)"
    if N % 8:
        return f"{N} outputs (must be a multiple of 8)"
    if K % (INNER_K_TILES * 16):
        return f"{K} inputs (must be a multiple of {INNER_K_TILES * 16})"
    if g_idx is not None and not groups_even(g_idx, group_size):
        return "a g_idx whose groups are not all group_size rows"
    if group_size not in GROUP_SIZES:
        return f"group size {group_size} (the kernel takes {GROUP_SIZES})"
    return None


def gptq_to_int4pack(qweight, qzeros, scales, g_idx, v2: bool = False, group_size: int = 128):
    """(q [N, K] int32 0..15 in the kernel's row order, scales_and_zeros [G, N, 2] bf16, perm or None).

    perm: the input-row order (None when g_idx is trivial); x[:, perm] is what the kernel multiplies."""
    K = g_idx.shape[0]
    N = scales.shape[1]
    q = unpack_rows(qweight, 4)[:K].to(torch.int32)  # [K, N]
    z = unpack_cols(qzeros, 4)[:, :N].to(torch.float32)  # [G, N]
    if not v2:
        z = z + 1
    s = scales.to(torch.float32)
    perm, order = group_sorted_order(g_idx, group_size)
    if perm is not None:
        q = q[perm]
        s, z = s[order], z[order]
    sz = torch.stack([s, (8.0 - z) * s], dim=2).to(torch.bfloat16)  # [G, N, 2]
    return q.t().contiguous(), sz.contiguous(), perm


def pack_for_cuda(q_nk: torch.Tensor) -> torch.Tensor:
    """q [N, K] (0..15) -> the CUDA kernel's packed int4 tensor (two values a byte, the even k in the high nibble)."""
    u8 = ((q_nk[:, ::2] << 4) | q_nk[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(u8.contiguous(), INNER_K_TILES)


def pack_for_cpu(q_nk: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_nk.contiguous(), INNER_K_TILES)


def int4pack_mm(x2d: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int,
                perm: torch.Tensor | None = None) -> torch.Tensor:
    """x2d [M, K] bf16 @ W.T -> [M, N] bf16, with W given by (packed, sz) from the functions above."""
    if perm is not None:
        x2d = x2d.index_select(1, perm)
    if x2d.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x2d, packed, group_size, sz)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, packed, group_size, sz)
