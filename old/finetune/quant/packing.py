"""The GPTQ on-disk format: packing integers into int32 words, and exact dequantization.

Layout (auto-gptq "v1", as Qwen-*-Chat-Int4/Int8 ship it), per quantized Linear with W [out, in]:

- ``qweight`` int32 [in * bits / 32, out]: 32/bits values per word along the *input* dim, lowest bits
  first (word r of column n holds input rows r*P .. r*P+P-1, P = 32 // bits).
- ``qzeros`` int32 [groups, out * bits / 32]: the zero point of each (group, output), packed along the
  *output* dim, lowest bits first. v1 stores ``zero - 1``; v2 (``checkpoint_format: "gptq_v2"``) stores
  ``zero`` itself.
- ``scales`` fp16 [groups, out].
- ``g_idx`` int32 [in]: the group of each input row (``i // group_size`` without desc_act; an arbitrary
  assignment with desc_act).

W[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n].

The float result is computed in fp32, where it is exact (a (bits+1)-bit integer times an fp16 scale fits
fp32's 24-bit mantissa), and rounded once to the requested dtype.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (4, 8)


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"GPTQ bits={bits} is not supported; supported bit widths are {SUPPORTED_BITS} "
            "(Qwen's official Int4 and Int8 releases)"
        )
    return bits


def values_per_word(bits: int) -> int:
    return 32 // check_bits(bits)


def to_int32_wrapping(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> int32 with the same bit pattern."""
    x = x & 0xFFFFFFFF
    x = torch.where(x >= 2**31, x - 2**32, x)
    return x.to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer values [in, out] in [0, 2**bits) -> int32 words [in * bits / 32, out] (qweight layout)."""
    per = values_per_word(bits)
    rows, cols = q.shape
    if rows % per:
        raise ValueError(f"cannot pack {rows} rows into int32 words of {per} {bits}-bit values")
    q = q.to(torch.int64)
    if q.numel() and (q.min() < 0 or q.max() >= 2**bits):
        raise ValueError(f"values out of range for {bits} bits")
    q = q.reshape(rows // per, per, cols)
    shifts = (torch.arange(per, device=q.device, dtype=torch.int64) * bits).view(1, per, 1)
    return to_int32_wrapping((q << shifts).sum(dim=1))


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [R, out] -> integer values [R * 32 / bits, out] (int32), inverse of pack_rows."""
    per = values_per_word(bits)
    r, cols = packed.shape
    shifts = (torch.arange(per, device=packed.device, dtype=torch.int32) * bits).view(1, per, 1)
    vals = (packed.to(torch.int32).unsqueeze(1) >> shifts) & (2**bits - 1)
    return vals.reshape(r * per, cols)


def pack_cols(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer values [groups, out] -> int32 words [groups, out * bits / 32] (qzeros layout)."""
    return pack_rows(z.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [groups, C] -> integer values [groups, C * 32 / bits] (int32), inverse of pack_cols."""
    return unpack_rows(packed.t(), bits).t().contiguous()


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """g_idx without desc_act: input row i is in group i // group_size (group_size -1: one group)."""
    gs = in_features if group_size in (-1, None) or group_size <= 0 else group_size
    return (torch.arange(in_features, device=device, dtype=torch.int32) // gs).to(torch.int32)


def num_groups(in_features: int, group_size: int) -> int:
    if group_size in (-1, None) or group_size <= 0:
        return 1
    return -(-in_features // group_size)


def groups_even(g_idx: torch.Tensor, group_size: int) -> bool:
    """Every group holds exactly group_size input rows (so sorting by group gives contiguous groups of that size)."""
    counts = torch.bincount(g_idx.long())
    return bool((counts == group_size).all())


def group_sorted_order(g_idx: torch.Tensor, group_size: int):
    """(perm, order) for kernels that need each group's input rows contiguous: perm sorts the input rows by group
    (stably; x[:, perm] and the weight's rows [perm] then pair up), order is the group of each block of
    group_size sorted rows (index the per-group scales and zeros with it). (None, None) when g_idx is already
    ``k // group_size``. Needs groups_even."""
    K = g_idx.shape[0]
    if torch.equal(g_idx.long(), torch.arange(K, device=g_idx.device) // group_size):
        return None, None
    perm = torch.sort(g_idx.long(), stable=True).indices
    return perm, g_idx.long()[perm][::group_size]


def dequantize_t(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    v2: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The transposed weight W.T [in, out] in ``dtype`` (plain torch; any device)."""
    out_features = scales.shape[1]
    in_features = g_idx.shape[0]
    q = unpack_rows(qweight, bits)[:in_features]  # [in, out]
    z = unpack_cols(qzeros, bits)[:, :out_features]  # [groups, out]
    if not v2:
        z = z + 1
    g = g_idx.long()
    wt = (q - z[g]).to(torch.float32) * scales[g].to(torch.float32)
    return wt.to(dtype)


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    v2: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The float weight W [out, in] in ``dtype``, exactly as the format defines it (see module doc)."""
    return dequantize_t(qweight, qzeros, scales, g_idx, bits, v2=v2, dtype=dtype).t().contiguous()


def is_v2_format(quantization_config: dict | None) -> bool:
    """Whether a quantization_config describes the v2 zero-point convention.

    gptqmodel and transformers name it ``checkpoint_format: "gptq_v2"``; older gptqmodel configs used
    ``format``. (gptqmodel's ``meta.v2`` flag is the GPTAQ *algorithm*, not this storage format.)
    """
    if not quantization_config:
        return False
    fmt = quantization_config.get("checkpoint_format", quantization_config.get("format", "gptq"))
    return str(fmt).lower() == "gptq_v2"
