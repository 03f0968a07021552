"""The engine's decode step on CUDA with the blocks' elementwise work fused (``decode_kernels.py``).

Per layer a decode step runs: residual add + ln_1 (one kernel), c_attn, rotary on q and k + logN + the KV cache
write (one kernel), attention (decode_kernels.decode_attention over each row's own keys; with
FINETUNE_DECODE_ATTENTION=0, SDPA over the step's length bucket, masked past each row's position), c_proj,
residual add + ln_2 (one kernel), w1, w2, SwiGLU (one kernel), c_proj;
the next layer's first kernel adds c_proj's output to the residual stream. With the engine's unmerged adapters at
up to 32 rows (row_adapters.XA_IN_NORM_MAX_ROWS), the two norm kernels also compute x A for the LoRA products of
c_attn and of w1 and w2 (``_norm``), and at 3-8 rows the SwiGLU kernel for mlp.c_proj's (``_swiglu``), which the GEMVs
then read instead of computing it. The Linears are called as
modules, so GPTQ GEMVs, PEFT layers and the engine's per-row adapter hooks work unchanged. The attention mask is built
once per step as an additive mask in the activation dtype (a bool mask is converted by SDPA in every layer).
The engine's prefill runs on the same kernels (``prefill_blocks``), with causal SDPA over each prompt's new keys
(and a long prompt's later chunks over its keys so far).

Same arithmetic as the model's blocks (``QWenBlock`` under no_grad) up to fp32 summation order (see
decode_kernels.py). Used only where nothing else would run a block's code: eval mode, no hooks on the blocks
or their norms (accelerate's device-map hooks, user hooks), every block on the engine's device.
``FINETUNE_FUSED_DECODE=0`` keeps the model's own blocks (the comparison path); CPU always uses them.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..quant.linear import paired_decode
from ..settings import settings
from . import row_adapters

logger = logging.getLogger(__name__)

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def use_own_keys() -> bool:
    """Whether the fused step's attention is decode_kernels.decode_attention over each row's own keys (else SDPA over
    the step's length bucket under a mask): always, unless FINETUNE_DECODE_ATTENTION=0. Measured on the H200: 64 rows
    of mixed lengths +21% (SDPA reads every row up to the bucket, NOTES step 18); one row with the keys split to fill
    the GPU, b1_512 248.8 against 245.0 tok/s and b1_ctx2000 220.4 against 221.7 (step 65). And no per-shape cost:
    SDPA's choice in a graphed step is cuDNN, which builds a plan for every new (rows, key length) (~40 ms a capture,
    ~0.5 s for the first ones) and compiled ~12 s of kernels in a fresh machine's first warm-up (step 64)."""
    return settings().decode_attention


def _hooked(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


def saved_in_blocks(tr) -> list[str]:
    """The modules of QWenModel ``tr``'s blocks and final norm that an adapter keeps its own copy of (PEFT's
    modules_to_save wrapper): the fused kernels read such weights directly (a norm's, the w1/w2 pair's), where only
    the wrapper's forward puts each adapter's copy into its rows (row_adapters' hook), so that adapter's rows would
    decode with the base's. (wte is called as a module by the engine: its copies apply.)"""
    return [name for name, m in tr.named_modules() if hasattr(m, "modules_to_save") and name != "wte"]


def fused_kernels(tr, device: torch.device, dtype: torch.dtype):
    """The Triton kernel module for the fused decode step of QWenModel ``tr``, or None where the model's own
    blocks must run (CPU, Triton missing, the switch off, hooks on a block, a block on another device, a module of
    the blocks an adapter saves its own copy of)."""
    if device.type != "cuda" or not settings().fused_decode or dtype not in _DTYPES:
        return None
    if saved := saved_in_blocks(tr):
        logger.info("decode: an adapter has its own %s (modules_to_save), which the fused decode kernels would not "
                    "apply to its rows: the model's own blocks decode (slower)", saved[0])
        return None
    norms = [tr.ln_f] + [n for block in tr.h for n in (block.ln_1, block.ln_2)]
    if any(n.weight.device != device or n.weight.dtype != dtype for n in norms):
        return None  # (e.g. fp32 norms in a bf16 model: eager torch would then carry an fp32 residual stream)
    if any(_hooked(m) for block in tr.h for m in (block, block.ln_1, block.ln_2, block.attn, block.mlp)) \
            or _hooked(tr.ln_f):
        return None
    try:
        from . import decode_kernels as kernels
    except ImportError:
        return None
    return kernels


def additive_mask(key_pos: torch.Tensor, pos: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[b, 1, 1, kv_len]: 0 where key position <= the row's position, -inf elsewhere (each row attends to its
    own keys and the one it writes now)."""
    keep = key_pos[None, :kv_len] <= pos[:, None]
    mask = torch.zeros(keep.shape, dtype=dtype, device=pos.device).masked_fill_(~keep, float("-inf"))
    return mask[:, None, None, :]


def _xa_operand(adapters, consumers, x, switch: bool):
    """A.T for the kernel before ``consumers`` to compute their LoRA products' x A (``RowAdapters.xa_operand``), or
    None: no adapters, the switch off, or consumers whose GEMVs would not take it."""
    if adapters is None or not switch:
        return None
    return adapters.xa_operand(consumers, x.numel() // x.shape[-1], x.dtype)


def _norm(kernels, adapters, x, delta, norm, consumers):
    """(x, normed) of ``kernels.add_rms_norm``; where the engine's adapters want it, the norm kernel also computes
    x A for the LoRA products of ``consumers`` and hands it to them."""
    at = _xa_operand(adapters, consumers, x, settings().lora_xa_in_norm)
    if at is None:
        return kernels.add_rms_norm(x, delta, norm.weight, norm.eps)
    x, normed, h = kernels.add_rms_norm_low_rank(x, delta, norm.weight, norm.eps, at)
    adapters.give_h(consumers, h)
    return x, normed


def _swiglu(kernels, adapters, up, gate, c_proj):
    """``kernels.swiglu(up, gate)``; where the engine's adapters want it, at the rows where it pays
    (``row_adapters.XA_IN_SWIGLU_ROWS``), the kernel also computes x A for the LoRA product of ``c_proj``, which
    reads its output, and hands it over (as ``_norm`` does)."""
    rows = up.numel() // up.shape[-1]
    at = _xa_operand(adapters, (c_proj,), up, settings().lora_xa_in_swiglu and rows in row_adapters.XA_IN_SWIGLU_ROWS)
    if at is None:
        return kernels.swiglu(up, gate)
    out, h = kernels.swiglu_low_rank(up, gate, at)
    adapters.give_h((c_proj,), h)
    return out


def decode_blocks(kernels, tr, lm_head, k_cache, v_cache, x, pos, cos, sin, query_scale, kv_len, mask,
                  adapters=None) -> torch.Tensor:
    """fp32 logits [b, V] of one decode step: ``x`` [b, 1, hidden] the embedded tokens, ``pos`` [b] their
    positions, ``cos``/``sin`` [b, 1, rot] and ``query_scale`` [b, 1] (or None) as the model computes them,
    ``k_cache``/``v_cache`` [layers, slots, heads, capacity, D] with rows 0..b-1 the batch, attending over at most
    ``kv_len`` keys. ``mask``: None for attention through kernels.rotary_attention over each row's own keys
    (``use_own_keys``; with FINETUNE_ATTENTION_ONE_LAUNCH=0 rotary_to_cache and decode_attention), else
    [b, 1, 1, kv_len] additive (``additive_mask``) for SDPA over the bucket.
    ``kernels``: decode_kernels (or its interpreted copy in tests). ``adapters``: the engine's RowAdapters,
    applied (their x A for c_attn, w1 and w2 then comes from the norms)."""
    b = x.shape[0]
    x = x.contiguous()
    delta = None
    one_launch = settings().attention_one_launch
    for block in tr.h:
        attn, mlp = block.attn, block.mlp
        layer = attn.layer_idx
        x, h = _norm(kernels, adapters, x, delta, block.ln_1, (attn.c_attn,))
        qkv = attn.c_attn(h)
        if mask is None and one_launch:  # each row's keys only, written as c_proj reads them
            y = kernels.rotary_attention(qkv, cos, sin, query_scale, k_cache[layer], v_cache[layer], pos,
                                         attn.num_heads, attn.scale, kv_len)
        else:
            q = kernels.rotary_to_cache(qkv, cos, sin, query_scale, k_cache[layer], v_cache[layer], pos, attn.num_heads)
            if mask is None:
                y = kernels.decode_attention(q, k_cache[layer], v_cache[layer], pos, attn.scale, kv_len)
            else:
                keys, values = k_cache[layer, :b, :, :kv_len], v_cache[layer, :b, :, :kv_len]
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scale)
                y = y.transpose(1, 2).reshape(b, 1, attn.projection_size)
        delta = attn.c_proj(y)
        x, h = _norm(kernels, adapters, x, delta, block.ln_2, (mlp.w1, mlp.w2))
        # one launch for both where it can (with adapters: their products in its epilogue at one row, else each
        # Linear's own call adds its product)
        up_gate = adapters.paired(mlp.w1, mlp.w2, h) if adapters is not None else None
        if up_gate is None:
            up_gate = paired_decode(mlp.w1, mlp.w2, h)
        if up_gate is None:
            up_gate = mlp.w1(h), mlp.w2(h)
        delta = mlp.c_proj(_swiglu(kernels, adapters, *up_gate, mlp.c_proj))
    _, h = kernels.add_rms_norm(x, delta, tr.ln_f.weight, tr.ln_f.eps)
    return lm_head(h)[:, -1].float()


def prefill_blocks(kernels, tr, lm_head, k_cache, v_cache, x, cos, sin, query_scale, slot, last,
                   start: int = 0) -> torch.Tensor:
    """fp32 logits [n, V] at each prompt's last position of a prefill through the same fused kernels as the decode
    step: ``x`` [n, T, hidden] the embedded prompts right-padded to T, ``cos``/``sin`` [n, T, rot] and
    ``query_scale`` [n, T] (or None) as the model computes them, keys and values written into ``k_cache``/
    ``v_cache`` [layers, slots, heads, capacity, D] at rows slot..slot+n-1, positions 0..T-1, ``last`` [n] each
    prompt's last index. ``slot``: an int, or a one-element tensor on the device (a graph's input: one prompt, its
    keys then gathered from the cache row it names instead of sliced). Causal SDPA over each prompt's own new keys,
    as the model's blocks attend in a prefill (padding comes after a prompt's tokens, so no real position sees it).
    ``start`` > 0 (one prompt, ``slot`` an int): a later chunk of a long prompt whose positions 0..start-1 are in
    the cache already; x holds positions start..start+T-1, and attention reads the row's keys up to each query's
    position (a lower-right causal mask over start+T keys).
    The Linears are called as modules on [n, T, ...] inputs, as the blocks call them (GPTQ dequantize + matmul,
    the engine's per-row adapter hooks). Why: the model's eager blocks launch ~52 kernels a layer, and a prefill of
    a short prompt was bound by their host time (~65 ms a prompt on the 14B against ~20 ms of GPU time,
    benchmarks/NOTES.md step 58)."""
    n, T, _ = x.shape
    x = x.contiguous()
    index = kernels.prefill_index(n, T, slot, x.device, start)
    mask = None
    if start:
        if n != 1 or not isinstance(slot, int):
            raise ValueError(f"prefill_blocks: a chunk at position {start} takes one prompt and an int slot")
        # (SDPA's own lower-right causal bias, which flash attention takes: a dense mask, which it does not, made a
        # 512-position chunk's stall ~8 ms longer on an H100, NOTES step 96)
        mask = causal_lower_right(T, start + T)
    delta = None
    for block in tr.h:
        attn, mlp = block.attn, block.mlp
        layer = attn.layer_idx
        x, h = kernels.add_rms_norm(x, delta, block.ln_1.weight, block.ln_1.eps)
        q = kernels.prefill_rotary_to_cache(attn.c_attn(h), cos, sin, query_scale, k_cache[layer], v_cache[layer],
                                            slot, attn.num_heads, index, start)
        if isinstance(slot, torch.Tensor):
            keys = k_cache[layer, :, :, :T].index_select(0, slot)
            values = v_cache[layer, :, :, :T].index_select(0, slot)
        else:
            S = start + T
            keys, values = k_cache[layer, slot:slot + n, :, :S], v_cache[layer, slot:slot + n, :, :S]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and T > 1,
                                           scale=attn.scale)
        delta = attn.c_proj(y.transpose(1, 2).reshape(n, T, attn.projection_size))
        x, h = kernels.add_rms_norm(x, delta, block.ln_2.weight, block.ln_2.eps)
        delta = mlp.c_proj(kernels.swiglu(mlp.w1(h), mlp.w2(h)))
    rows = torch.arange(n, device=x.device)
    x, delta = x[rows, last][:, None].contiguous(), delta[rows, last][:, None].contiguous()
    _, h = kernels.add_rms_norm(x, delta, tr.ln_f.weight, tr.ln_f.eps)
    return lm_head(h)[:, -1].float()


__all__ = ["fused_kernels", "additive_mask", "decode_blocks", "prefill_blocks", "use_own_keys"]
