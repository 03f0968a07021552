"""Round-to-nearest GPTQ-format quantizer and a writer for Qwen v1 Int4/Int8 directories.

No calibration: tiny test models, the demo's Int4 variant and `qwen-ft merge --format int4 --quant-method rtn`
use it (the calibrated route is finetune/quant/gptq.py). The output is the exact on-disk layout of Qwen's
official Int4 releases (auto-gptq v1 by default), so everything that loads those loads these.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..checkpoint import checkpoint_files, read_shard, shard_name, write_index
from .packing import check_bits, num_groups, pack_cols, pack_rows, values_per_word

# The Linears Qwen's official Int4/Int8 checkpoints quantize (module-name suffixes inside each block).
QWEN_QUANTIZED_SUFFIXES = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


def desc_act_permutation(W: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for GPTQ's activation order: input columns by descending L2 norm.

    Real GPTQ sorts by the Hessian diagonal (activation energy); without calibration data any fixed
    permutation exercises the same g_idx layout.
    """
    norms = W.float().norm(dim=0)
    # stable: ties keep index order
    return torch.sort(norms, descending=True, stable=True).indices


def group_grid(w: torch.Tensor, bits: int, sym: bool, v2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-representable, held as float32) and integer zero point per row of one group w [out, cols],
    round-to-nearest's min/max rule; GPTQ uses the same grid."""
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = ((xmax - xmin) / maxq).to(torch.float16).to(torch.float32)
    scale = torch.where(scale == 0, torch.full_like(scale, 2.0**-24), scale)  # fp16 underflow guard
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale)
    lo = 0 if v2 else 1  # v1 stores zero-1, so zero 0 cannot be stored
    return scale, zero.clamp(lo, maxq)


def quantize_weight(
    W: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    v2: bool = False,
    perm: torch.Tensor | None = None,
) -> dict:
    """Round-to-nearest quantize W [out, in] into GPTQ tensors (see packing.py for the layout).

    Returns dict(qweight int32 [in*bits/32, out], qzeros int32 [groups, out*bits/32], scales fp16
    [groups, out], g_idx int32 [in]). Scales are rounded to fp16 *before* the integers are chosen, so the
    stored tensors dequantize to the nearest grid point of the stored scale. With desc_act, input columns
    are grouped in the order ``perm`` (default: ``desc_act_permutation``) and g_idx records each column's
    group, as GPTQ does. v1 stores zero-1 (auto-gptq), v2 stores zero.
    """
    check_bits(bits)
    per = values_per_word(bits)
    out_features, in_features = W.shape
    if in_features % per or out_features % per:
        raise ValueError(f"weight {tuple(W.shape)}: both dims must be multiples of {per} for {bits}-bit packing")
    maxq = 2**bits - 1
    gs = in_features if group_size in (-1, None) or group_size <= 0 else group_size
    groups = num_groups(in_features, group_size)
    W = W.detach().to(torch.float32)
    device = W.device

    if desc_act:
        order = desc_act_permutation(W) if perm is None else perm.to(device).long()
    else:
        order = torch.arange(in_features, device=device)
    g_idx = torch.empty(in_features, dtype=torch.int32, device=device)
    g_idx[order] = (torch.arange(in_features, device=device) // gs).to(torch.int32)

    scales = torch.empty(groups, out_features, dtype=torch.float32, device=device)
    zeros = torch.empty(groups, out_features, dtype=torch.int64, device=device)
    for g in range(groups):
        cols = order[g * gs : (g + 1) * gs]
        scale, zero = group_grid(W[:, cols], bits, sym, v2)
        zeros[g] = zero.to(torch.int64)
        scales[g] = scale

    gl = g_idx.long()
    q = torch.round(W.t() / scales[gl]) + zeros[gl]  # [in, out]
    q = q.clamp(0, maxq).to(torch.int64)
    stored_zeros = zeros if v2 else zeros - 1
    return {
        "qweight": pack_rows(q, bits),
        "qzeros": pack_cols(stored_zeros, bits),
        "scales": scales.to(torch.float16),
        "g_idx": g_idx,
    }


def quantization_config(bits=4, group_size=128, desc_act=False, sym=True, v2=False) -> dict:
    """config.json's quantization_config as Qwen's official Int4/Int8 releases write it."""
    qc = {
        "bits": bits,
        "group_size": group_size,
        "damp_percent": 0.01,
        "desc_act": desc_act,
        "static_groups": False,
        "sym": sym,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
    }
    if v2:
        qc["checkpoint_format"] = "gptq_v2"
    return qc


def is_quantized_module_name(module_name: str, suffixes=QWEN_QUANTIZED_SUFFIXES) -> bool:
    return any(module_name == s or module_name.endswith("." + s) for s in suffixes)


def quantize_state_dict(
    state_dict: dict,
    bits: int = 4,
    group_size: int = 128,
    desc_act: bool = False,
    sym: bool = True,
    v2: bool = False,
    float_dtype: torch.dtype | None = torch.float16,
    suffixes=QWEN_QUANTIZED_SUFFIXES,
) -> dict:
    """A float Qwen v1 state dict -> the Int4/Int8 layout: each quantized Linear's ``weight`` becomes
    ``qweight/qzeros/scales/g_idx``; everything else (embedding, lm_head, norms, c_attn bias) stays float,
    cast to ``float_dtype`` (fp16 as the official releases; None keeps each tensor's dtype)."""
    out = {}
    for name, t in state_dict.items():
        module_name, _, attr = name.rpartition(".")
        if attr == "weight" and t.dim() == 2 and is_quantized_module_name(module_name, suffixes):
            packed = quantize_weight(t, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, v2=v2)
            for k, v in packed.items():
                out[f"{module_name}.{k}"] = v.contiguous()
        elif float_dtype is not None and t.is_floating_point():
            out[name] = t.to(float_dtype).contiguous()
        else:
            out[name] = t.contiguous()
    return out


def quantize_model_dir(
    src_dir,
    dst_dir,
    bits: int = 4,
    group_size: int = 128,
    desc_act: bool = False,
    sym: bool = True,
    v2: bool = False,
) -> Path:
    """Convert a float Qwen v1 model dir into an Int4/Int8 GPTQ dir in the official layout.

    Shard by shard (one float shard in memory at a time): quantize the block Linears, keep the rest fp16,
    write ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + index when the source is
    sharded), ``config.json`` with ``quantization_config`` and ``torch_dtype: float16``, and copy every
    other file (tokenizer, generation config, ...).
    """
    from ..file_modes import save_weights

    check_bits(bits)
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    files = checkpoint_files(src)
    weight_map = {}
    n = len(files)
    for i, (path, _names) in enumerate(files, 1):
        sd = read_shard(path)
        qsd = quantize_state_dict(sd, bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, v2=v2)
        out_name = shard_name(i, n)
        save_weights(qsd, dst / out_name, metadata={"format": "pt"})
        weight_map.update({k: out_name for k in qsd})
        del sd, qsd
    if n > 1:
        write_index(dst, weight_map, sum((dst / f).stat().st_size for f in set(weight_map.values())))

    with open(src / "config.json") as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config(bits, group_size, desc_act, sym, v2)
    config["torch_dtype"] = "float16"
    for flag, value in (("fp16", True), ("bf16", False), ("fp32", False)):
        if flag in config:
            config[flag] = value
    with open(dst / "config.json", "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)

    skip = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
    for p in src.iterdir():
        if p.name in skip or p.name.endswith((".safetensors", ".bin")) or not p.is_file():
            continue
        shutil.copy2(p, dst / p.name)
    return dst


__all__ = [
    "QWEN_QUANTIZED_SUFFIXES",
    "group_grid",
    "desc_act_permutation",
    "quantize_weight",
    "quantize_state_dict",
    "quantize_model_dir",
    "quantization_config",
    "is_quantized_module_name",
]
