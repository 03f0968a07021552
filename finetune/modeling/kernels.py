"""The block's elementwise pieces: RMSNorm, rotary embedding, SwiGLU.

Each is written once as plain torch (the official arithmetic: RMSNorm and rotary in fp32, rounded back to the
input dtype). On CUDA each is run through ``torch.compile``, which fuses its handful of elementwise kernels
(and those of its backward) into one or two: in eager mode RMSNorm alone is seven kernels forward and more
backward, each reading and writing a [tokens x 5120] fp32 tensor; at 2048 tokens on the 14B shape these
pieces were most of the step's non-matmul time. Elsewhere (CPU) they run eagerly, unchanged.

Only training compiles: a forward that records gradients, on inputs of at least ``COMPILE_MIN_NUMEL`` elements.
Smaller inputs stay eager (the host time of a compiled call outweighs the kernels it saves), and so does every
forward without gradients (prefill, evaluation, chat): the first compile of the three pieces took 15 s on an H200
(NOTES step 58), which a server's or a chat's first long prompt waited for, to save ~1-3 ms of a prefill's
~100 ms; a training run repays it within its first steps. ``FINETUNE_COMPILE=0`` turns compilation off (eager
everywhere). The compiled versions may round intermediate values differently from eager mode (a fused kernel
keeps fp32 where eager mode stores bf16), which is within bf16 noise; a GPU test in tests/modeling/test_modeling.py
compares the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..settings import settings


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back to the input dtype, then scale (the official order)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.type_as(x) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary in fp32 on the first `rot` channels of t's last dim (cos/sin [..., rot], broadcast to t); the rest
    passes through."""
    rot = cos.shape[-1]
    tf = t.float()
    t_rot, t_pass = tf[..., :rot], tf[..., rot:]
    t_rot = t_rot * cos + rotate_half(t_rot) * sin
    return torch.cat((t_rot, t_pass), dim=-1).type_as(t)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t [B, H, T, D]; cos/sin [B, T, rot]."""
    return _rotate(t, cos[:, None], sin[:, None])


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary on queries and keys together (one fused kernel for both when compiled). q, k [B, T, H, D], as c_attn
    writes them, and so are the results: attention then takes them as [B, H, T, D] views, and FlexAttention writes
    its output (and its gradients) in that same token-major order, so neither the output's reshape for c_proj nor
    the gradients' way back to c_attn copies (a head-major layout cost five copies a layer)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def swiglu(up: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """up * silu(gate) (Qwen: w1(x) * silu(w2(x)))."""
    return up * F.silu(gate)


def compile_enabled() -> bool:
    return settings().compile


_COMPILED: dict = {}


def _compiled(fn):
    c = _COMPILED.get(fn)
    if c is None:
        c = _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return c


def _mark_dynamic(args) -> None:
    """Every dim but the last (batch, heads, tokens) compiles as dynamic from the first call: padded batches
    change length every step, and a shape-specialised first compile would recompile mid-training."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() >= 2:
            torch._dynamo.maybe_mark_dynamic(a, list(range(a.dim() - 1)))


# Below this many elements eager mode is faster: a compiled call costs ~100-150 us of host time (guards, the
# autograd wrapper), more than launching the eager kernels over a few rows (decoding, prefill of a prompt).
COMPILE_MIN_NUMEL = 1 << 21


def compile_pays(x: torch.Tensor) -> bool:
    """Whether ``fused`` runs its compiled version for first argument ``x``: a large CUDA tensor in a forward that
    records gradients (training), compilation on, and not already inside a compiled region."""
    return (x.is_cuda and torch.is_grad_enabled() and x.numel() >= COMPILE_MIN_NUMEL and compile_enabled()
            and not torch.compiler.is_compiling())


def fused(fn, *args):
    """``fn(*args)``, through its compiled version where that pays (``compile_pays``), else eagerly."""
    if compile_pays(args[0]):
        _mark_dynamic(args)
        return _compiled(fn)(*args)
    return fn(*args)


__all__ = ["rms_norm", "apply_rotary", "rotary_qk", "swiglu", "fused", "compile_enabled", "compile_pays"]
