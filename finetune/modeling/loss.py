"""The causal-LM loss from hidden states, in chunks: the fp32 [tokens x vocab] logits never exist at once.
Used by the model's forward and by the graphed training step (static shapes, `select=False`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # labels not trained on (the data pipeline's IGNORE is this value)
LOSS_CHUNK_TOKENS = 1024


def chunked_causal_lm_loss(
    lm_head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
) -> torch.Tensor:
    """Next-token cross-entropy from hidden states [B, T, H] and labels [B, T] (-100 = not trained): the sum
    over trained tokens divided by `num_items_in_batch` when given, else the mean over trained tokens."""
    total, count = causal_lm_nll_sum(lm_head, hidden, labels, chunk_tokens)
    return normalize_loss(total, count, num_items_in_batch)


def normalize_loss(total: torch.Tensor, count: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    if num_items_in_batch is not None:
        denom = num_items_in_batch
        if isinstance(denom, torch.Tensor):
            denom = denom.to(device=total.device, dtype=torch.float32)
        return total / denom
    return total / count.clamp(min=1)  # a device tensor: no host sync between forward and backward


def causal_lm_nll_sum(
    lm_head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
    select: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL in fp32, number of trained positions as a device tensor).

    lm_head runs `chunk_tokens` positions at a time, each chunk's fp32 log-softmax under gradient
    checkpointing, so neither the full logits nor their fp32 copy ever exist at once. `select=True` sends
    only trained positions through lm_head (a data-dependent shape); `select=False` sends every position
    and lets cross-entropy ignore the untrained ones (static shapes, as a captured CUDA graph needs)."""
    labels = labels.to(hidden.device)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    if select:
        h, y = h[keep], y[keep]

    def chunk_nll(h_chunk: torch.Tensor, y_chunk: torch.Tensor) -> torch.Tensor:
        logits = lm_head(h_chunk).float()
        return F.cross_entropy(logits, y_chunk, reduction="sum", ignore_index=IGNORE_INDEX)

    total = hidden.new_zeros((), dtype=torch.float32)
    if h.shape[0] == 0:
        total = total + hidden.sum() * 0.0  # keep the graph connected (zero loss, zero grads)
    for start in range(0, h.shape[0], chunk_tokens):
        hc, yc = h[start : start + chunk_tokens], y[start : start + chunk_tokens]
        if torch.is_grad_enabled() and hc.requires_grad:
            # no random ops in a chunk: nothing to stash (and stashing the CUDA RNG state cannot be captured)
            total = total + checkpoint(chunk_nll, hc, yc, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + chunk_nll(hc, yc)
    return total, keep.sum()
