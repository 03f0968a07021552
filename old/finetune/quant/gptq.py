"""Calibrated GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), written out for the Qwen v1 block Linears, with the project's packing helpers for the output.

Per quantized Linear with weight W [out, in] and calibration inputs X [in, n]:

1. H = 2 X X^T / n (accumulated over the calibration tokens as auto-gptq does); columns that never see a
   non-zero input ("dead", diag(H) = 0) get H_ii = 1 and W[:, i] = 0.
2. Optional act-order (desc_act): columns are processed in order of decreasing diag(H); g_idx records each
   column's group so the stored layout stays the plain GPTQ v1 one.
3. Dampening: H += damp_percent * mean(diag(H)) * I.
4. U = upper Cholesky factor of H^-1.
5. Column by column (in blocks of 128 for speed): quantize w = W[:, i] with its group's scale/zero (found
   from the not-yet-quantized, already-updated weights when a group starts), then spread the error over the
   remaining columns: W[:, j>i] -= ((w - q) / U_ii) * U[i, j>i].

Groups are ``group_size`` (128) columns in processing order; the grid is the same as ``rtn.quantize_weight``'s
(symmetric: zero point 2^(bits-1), scale = 2 max|w| / (2^bits - 1) rounded to fp16 first), so the packed
tensors dequantize to exactly the values GPTQ chose.

The model is quantized block by block ("sequential", as the reference code): the inputs of block i are the
outputs of blocks 0..i-1 already quantized; inside a block, with ``true_sequential``, the Linears are done in
the order attn.c_attn -> attn.c_proj -> mlp.w1 + mlp.w2 -> mlp.c_proj, each seeing inputs produced by the
already-quantized ones before it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .packing import check_bits, num_groups, pack_cols, pack_rows, values_per_word
from .rtn import group_grid

QWEN_SEQUENTIAL_GROUPS = (("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",))


class HessianAccumulator:
    """Running H = 2/n * sum x x^T over the rows x of every input the Linear sees."""

    def __init__(self, in_features: int, device):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        self.H *= self.n / (self.n + m)
        self.n += m
        x = math.sqrt(2.0 / self.n) * x
        self.H += x.t() @ x




def gptq_quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    sym: bool = True,
    v2: bool = False,
    blocksize: int = 128,
) -> dict:
    """GPTQ one weight W [out, in] with Hessian H [in, in] -> packed {qweight, qzeros, scales, g_idx}
    (the layout of ``rtn.quantize_weight``) plus ``"dequantized"``: the float weight they decode to."""
    check_bits(bits)
    per = values_per_word(bits)
    out_features, in_features = W.shape
    if in_features % per or out_features % per:
        raise ValueError(f"weight {tuple(W.shape)}: both dims must be multiples of {per} for {bits}-bit packing")
    maxq = 2**bits - 1
    device = W.device
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float32, copy=True).to(device)
    gs = in_features if group_size in (-1, None) or group_size <= 0 else group_size
    groups = num_groups(in_features, group_size)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    else:
        perm = torch.arange(in_features, device=device)
    W = W[:, perm]
    H = H[perm][:, perm]

    damp = damp_percent * torch.mean(torch.diag(H))
    H[range(in_features), range(in_features)] += damp
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        U = torch.linalg.cholesky(Hinv, upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"GPTQ: the Hessian is not positive definite even after dampening {damp_percent}; "
                         f"raise damp_percent or use more calibration data ({e})") from None

    Q = torch.zeros_like(W)  # dequantized values, processing order
    q_int = torch.zeros_like(W, dtype=torch.int64)
    scales = torch.empty(groups, out_features, dtype=torch.float32, device=device)
    zeros = torch.empty(groups, out_features, dtype=torch.float32, device=device)
    scale = zero = None
    for i1 in range(0, in_features, blocksize):
        i2 = min(i1 + blocksize, in_features)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:  # a new group: its grid from the current (error-updated) weights
                g = col // gs
                cols = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : gs]
                scale, zero = group_grid(cols, bits, sym, v2)
                scales[g], zeros[g] = scale, zero
            w = W1[:, i]
            d = U1[i, i]
            qi = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            q = scale * (qi - zero)
            q_int[:, col] = qi.to(torch.int64)
            Q[:, col] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    inv = torch.argsort(perm)
    g_idx = (torch.arange(in_features, device=device) // gs).to(torch.int32)[inv]
    q_int = q_int[:, inv]
    Q = Q[:, inv]
    stored_zeros = zeros.to(torch.int64) if v2 else zeros.to(torch.int64) - 1
    return {
        "qweight": pack_rows(q_int.t().contiguous(), bits),
        "qzeros": pack_cols(stored_zeros, bits),
        "scales": scales.to(torch.float16),
        "g_idx": g_idx,
        "dequantized": Q,
    }


# -- whole model ------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _capture_block_inputs(model, blocks, samples, device):
    """Run the model on each sample up to the first block; keep (args, kwargs) of that block's call."""
    captured = []

    def pre_hook(module, args, kwargs):
        captured.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for ids in samples:
            ids = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(1, -1)
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    samples,
    bits: int = 4,
    group_size: int = 128,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    sym: bool = True,
    true_sequential: bool = True,
    groups=QWEN_SEQUENTIAL_GROUPS,
    log=None,
) -> dict[str, dict]:
    """GPTQ every block Linear of a float Qwen v1 model (QWenLMHeadModel, not PEFT-wrapped) on ``samples``
    (lists of token ids, run one at a time). The model's Linear weights are replaced in place by their
    quantized values (so later blocks see quantized inputs); returns {module name: packed tensors}."""
    transformer = model.transformer
    blocks = transformer.h
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    captured = _capture_block_inputs(model, blocks, samples, device)
    if not captured:
        raise ValueError("GPTQ needs at least one calibration sample")
    inputs = [args[0] for args, _ in captured]
    kwargs_list = [kw for _, kw in captured]
    order = groups if true_sequential else (tuple(n for g in groups for n in g),)
    result: dict[str, dict] = {}
    for bi, block in enumerate(blocks):
        for group in order:
            linears = {name: block.get_submodule(name) for name in group}
            acc = {name: HessianAccumulator(lin.in_features, device) for name, lin in linears.items()}
            handles = [lin.register_forward_hook(lambda m, a, o, n=name: acc[n].add(a[0]))
                       for name, lin in linears.items()]
            try:
                for x, kw in zip(inputs, kwargs_list):
                    block(x, **kw)
            finally:
                for h in handles:
                    h.remove()
            for name, lin in linears.items():
                packed = gptq_quantize_weight(lin.weight.data, acc[name].H, bits=bits, group_size=group_size,
                                              damp_percent=damp_percent, desc_act=desc_act, sym=sym)
                lin.weight.data.copy_(packed.pop("dequantized").to(lin.weight.dtype))
                full = f"transformer.h.{bi}.{name}"
                result[full] = {k: v.cpu() for k, v in packed.items()}
        inputs = [block(x, **kw) for x, kw in zip(inputs, kwargs_list)]
        inputs = [o[0] if isinstance(o, tuple) else o for o in inputs]
        if log:
            log(f"gptq: block {bi + 1}/{len(blocks)} quantized")
    model.train(was_training)
    return result


def layer_output_error(linear_weight: torch.Tensor, quantized_weight: torch.Tensor, X: torch.Tensor) -> float:
    """Squared Frobenius error ||X W^T - X Q^T||^2 of one Linear on inputs X [n, in] (the GPTQ objective)."""
    X = X.reshape(-1, X.shape[-1]).to(torch.float32)
    diff = X @ (linear_weight.to(torch.float32) - quantized_weight.to(torch.float32)).t()
    return float((diff**2).sum())


__all__ = ["HessianAccumulator", "gptq_quantize_weight", "gptq_quantize_model", "layer_output_error",
           "QWEN_SEQUENTIAL_GROUPS"]
