"""Each row's next-token NLL and d NLL / d logits over the vocabulary, in one Triton kernel (CUDA).

For a frozen lm_head the loss chunk computes the hidden states' gradient in its forward (``loss.py``). In torch
that is a cast of the [rows x 152,064] logits to fp32, a log-sum-exp, an exp and a mask, each a full pass over a
chunk of 156 MB in fp32: ~5 ms of a 2048-token micro-batch on an H200 (benchmarks/NOTES.md, step 25). Here a
program takes one row: it reads the logits twice in their own dtype (an online max and sum of exponentials, then
the gradient) and writes the gradient over them, in that dtype: softmax minus the one-hot label, zero for a row
without a trained label. The arithmetic is fp32, as the torch version's (which casts the logits first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 4096


@triton.jit
def _nll_grad_kernel(logits_ptr, y_ptr, nll_ptr, V, stride, IGNORE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    y = tl.load(y_ptr + row)
    trained = y != IGNORE
    cols = tl.arange(0, BLOCK)
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    for start in range(0, V, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    # a label outside the vocabulary gives NaN (the trainer's non-finite guard reports it), never a stray read
    valid = (y >= 0) & (y < V)
    target = tl.load(base + tl.where(valid, y, 0)).to(tl.float32)
    tl.store(nll_ptr + row, tl.where(trained, tl.where(valid, lse - target, float("nan")), 0.0))
    for start in range(0, V, BLOCK):
        c = start + cols
        inside = c < V
        x = tl.load(base + c, mask=inside, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(c == y, 1.0, 0.0)
        g = tl.where(trained, g, 0.0)
        tl.store(base + c, g.to(logits_ptr.dtype.element_ty), mask=inside)


def nll_and_grad_(logits: torch.Tensor, y: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-row NLL [rows] in fp32 of logits [rows, V] against labels y [rows] (``ignore_index``: 0, and a zero
    gradient; a label outside [0, V): NaN); the logits are overwritten with d NLL / d logits in their dtype."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"nll_and_grad_: logits must be [rows, vocab] with contiguous rows, got {tuple(logits.shape)}"
                         f" with strides {logits.stride()}")
    rows, V = logits.shape
    nll = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows:
        _nll_grad_kernel[(rows,)](logits, y.contiguous(), nll, V, logits.stride(0), IGNORE=ignore_index,
                                  BLOCK=_BLOCK, num_warps=8)
    return nll
