"""The causal-LM loss from hidden states, in chunks: the fp32 [tokens x vocab] logits never exist at once.
Used by the model's forward and by the graphed training step (static shapes, `select=False`).

A frozen lm_head (LoRA, Q-LoRA) computes each chunk's gradient with its loss: the loss is the last op, so d loss /
d logits (softmax minus the one-hot label) is known in the forward, and the hidden states' gradient is one more
product there; the backward only scales it. A checkpointed chunk instead ran the [chunk x vocab] product three
times (forward, recomputation, backward) and its log-softmax twice: on the 14B shape about 5% of a 2048-token
micro-batch. A trainable lm_head (full fine-tuning) keeps the checkpointed chunks."""

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


def _nll_grad_kernel():
    """The Triton kernel of nll_grad.py, or None where it cannot run (no triton)."""
    try:
        from . import nll_grad
    except ImportError:
        return None
    return nll_grad.nll_and_grad_


class _FrozenHeadNLL(torch.autograd.Function):
    """Summed NLL of one chunk through a frozen, bias-free lm_head, the hidden states' gradient computed with it."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, weight)  # under autocast: the product in its dtype, as lm_head(h) computes it
        kernel = _nll_grad_kernel() if logits.is_cuda else None
        if kernel is not None:
            nll = kernel(logits, y, IGNORE_INDEX)  # the logits now hold the gradient, in their dtype
            grad = logits
        else:
            logp = torch.log_softmax(logits.float(), dim=-1)
            trained = y != IGNORE_INDEX
            valid = (y >= 0) & (y < logp.shape[-1])  # as the kernel: a label outside the vocabulary gives NaN
            target = torch.where(valid, y, 0)[:, None]
            nll = torch.where(trained, torch.where(valid, -logp.gather(1, target).squeeze(1), float("nan")), 0.0)
            grad = logp.exp_()  # softmax minus the one-hot label; zero for rows without a trained label
            grad.scatter_add_(1, target, torch.full(target.shape, -1.0, device=grad.device))
            grad = grad.mul_(trained[:, None]).to(logits.dtype)
        ctx.dh, ctx.h_dtype = torch.mm(grad, weight.to(grad.dtype)), h.dtype
        return nll.sum()

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        dh, ctx.dh = ctx.dh, None
        if dh is None:
            raise RuntimeError("lm_head loss chunk: backward ran twice, or without its forward's gradient")
        return (dh.float() * grad_nll).to(ctx.h_dtype), None, None


def _frozen_head(lm_head: nn.Module) -> bool:
    """A plain bias-free Linear whose weight is not trained and that nothing hooks: its chunks take _FrozenHeadNLL."""
    return (type(lm_head) is nn.Linear and lm_head.bias is None and not lm_head.weight.requires_grad
            and not lm_head._forward_hooks and not lm_head._forward_pre_hooks)


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
    frozen = _frozen_head(lm_head)
    for start in range(0, h.shape[0], chunk_tokens):
        hc, yc = h[start : start + chunk_tokens], y[start : start + chunk_tokens]
        if frozen and torch.is_grad_enabled() and hc.requires_grad:
            total = total + _FrozenHeadNLL.apply(hc, lm_head.weight, yc)
        elif torch.is_grad_enabled() and hc.requires_grad:
            # no random ops in a chunk: nothing to stash (and stashing the CUDA RNG state cannot be captured)
            total = total + checkpoint(chunk_nll, hc, yc, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + chunk_nll(hc, yc)
    return total, keep.sum()
