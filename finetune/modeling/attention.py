"""What attention needs besides q, k, v, shared by the model, the graphed training step and the decoders:
causal attention, a padding mask for left-padded batches, and packed rows (position ids restarting inside a
row) that never attend across sequences (a block-diagonal mask on CPU, FlexAttention with a document block
mask on CUDA)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from finetune.settings import settings

# ---------------------------------------------------------------------------------------------------------------
class AttentionSpec:
    """What attention needs besides q, k, v: a bool mask [B, 1, T, S] (True = attend), or is_causal, or a
    FlexAttention block mask."""

    def __init__(self, mask=None, is_causal=False, block_mask=None):
        self.mask, self.is_causal, self.block_mask = mask, is_causal, block_mask


def document_ids(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 none_without_restart: bool = True) -> torch.Tensor | None:
    """[B, T] sequence index inside each packed row: a new sequence wherever the positions restart between two
    real tokens (padding, whose positions are 0, is not a restart: the padding mask handles it); a row without a
    restart is sequence 0 throughout, whose document mask is the plain causal one.

    none_without_restart: None when no row restarts, so that the caller can use the plain causal (or padded)
    kernel. Asking is a host read of a device value, a GPU sync: the graphed training step passes False and
    always gets the ids, so the host never waits for the GPU between micro-batches."""
    if position_ids.shape[1] < 2:
        return None
    restart = position_ids[:, 1:] <= position_ids[:, :-1]
    if attention_mask is not None:
        real = attention_mask.bool()
        restart = restart & real[:, 1:] & real[:, :-1]
    if none_without_restart and not bool(restart.any()):
        return None
    return F.pad(restart.long(), (1, 0)).cumsum(-1)


# No cuDNN: SDPA's first pick for bf16 on the H200 (torch 2.11) builds an execution graph for each new shape, 40-70 ms
# a length (benchmarks/NOTES.md step 60), and inference meets a new length with nearly every prompt, generate() with
# every step. Flash and memory-efficient attention have no per-shape cost. (The engine's CUDA-graphed decode steps
# keep cuDNN: a graph is captured once for its key length.)
_SHAPE_FREE = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def inference_sdpa(device):
    """Context for a forward without gradients: SDPA on CUDA never through cuDNN (``Settings.sdpa_flash``).
    Training keeps SDPA's own choice, since its shapes repeat."""
    if torch.is_grad_enabled() or torch.device(device).type != "cuda" or not settings().sdpa_flash:
        return contextlib.nullcontext()
    # (enable flags only: sdpa_kernel(..., set_priority=True) restores the priority order by setting it, after which
    # SDPA stopped preferring cuDNN anywhere in the process: b1_ctx2000 decoded at 131 tok/s against 222, step 60)
    return sdpa_kernel(_SHAPE_FREE)


_FLEX = None


def _flex_attention():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention)  # uncompiled, flex_attention would materialise the scores
    return _FLEX


def build_attention(
    attention_mask: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    q_len: int,
    past: int,
    device,
    use_flex: bool,
) -> AttentionSpec:
    """Causal attention over [past + q_len] keys, plus padding (attention_mask [B, past + q_len], 1 = real token)
    and packed-sequence boundaries (doc_ids [B, q_len], prefill only)."""
    kv_len = past + q_len
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if attention_mask is None and doc_ids is None:
        if past == 0:
            return AttentionSpec(is_causal=q_len > 1)
        if q_len == 1:
            return AttentionSpec()
    if use_flex and doc_ids is not None and past == 0:
        from torch.nn.attention.flex_attention import create_block_mask

        docs = doc_ids
        valid = attention_mask.bool() if attention_mask is not None else None

        def mask_mod(b, h, q_idx, kv_idx):
            keep = (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx])
            if valid is not None:
                keep = keep & valid[b, kv_idx]
            return keep | (q_idx == kv_idx)

        B = doc_ids.shape[0]
        # _compile=True: the block mask is built block by block, never as a dense L x L tensor
        return AttentionSpec(block_mask=create_block_mask(mask_mod, B, None, q_len, kv_len, device=device,
                                                          _compile=True))

    q_pos = torch.arange(past, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None]  # [1, T, S]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
    # Every query keeps itself: padded query rows would otherwise be all-masked and give NaN (which would then
    # leak through 0 * NaN into real rows of later layers).
    mask = mask | (k_pos[None, :] == q_pos[:, None])[None]
    return AttentionSpec(mask=mask[:, None])
