"""GPTQ weights in PyTorch's int4pack layout (finetune/quant/int4pack.py): the conversion keeps every integer,
moves the zero point into the float term, and the kernel (CPU variant here, CUDA in the GPU tests) computes the
layer's product."""

import pytest
import torch

from finetune.quant import int4pack as P
from finetune.quant.packing import dequantize_t

from _helpers import random_packed


def _reconstruct(q_nk, sz, perm, group_size):
    """W.T [K, N] in fp32 from the converted form, by the kernel's formula (q - 8) * s + m, in the original row
    order."""
    N, K = q_nk.shape
    s = sz[..., 0].float().repeat_interleave(group_size, 0)  # [K, N] in the kernel's row order
    m = sz[..., 1].float().repeat_interleave(group_size, 0)
    w = (q_nk.t().float() - 8) * s + m
    if perm is not None:
        out = torch.empty_like(w)
        out[perm] = w
        w = out
    return w, s, m


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("group_size", [32, 128])
def test_conversion_keeps_the_integers_and_rounds_only_the_float_terms(desc_act, v2, group_size):
    layer = random_packed(256, 136, group_size=group_size, desc_act=desc_act, v2=v2, seed=3)
    exact = dequantize_t(**layer, bits=4, v2=v2, dtype=torch.float32)  # [K, N]
    q_nk, sz, perm = P.gptq_to_int4pack(**layer, v2=v2, group_size=group_size)
    assert q_nk.dtype == torch.int32 and q_nk.shape == (136, 256) and sz.shape == (256 // group_size, 136, 2)
    assert (perm is not None) == desc_act
    w, s, m = _reconstruct(q_nk, sz, perm, group_size)
    # scale and float zero are bf16 (one rounding each, 2**-8 relative at most); the integers are exact
    bound = (8 * s.abs() + m.abs()) * 2**-8
    if perm is not None:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(len(perm))
        bound = bound[inv]
    assert ((w - exact).abs() <= bound + 1e-12).all()


@pytest.mark.parametrize("desc_act", [False, True])
def test_cpu_kernel_on_the_converted_weight_equals_the_dequantized_matmul(desc_act):
    layer = random_packed(512, 256, group_size=128, desc_act=desc_act, seed=1)
    exact = dequantize_t(**layer, bits=4, dtype=torch.float32)
    q_nk, sz, perm = P.gptq_to_int4pack(**layer, group_size=128)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0)).bfloat16()
    y = P.int4pack_mm(x, P.pack_for_cpu(q_nk), sz, 128, perm)
    ref = x.float() @ exact
    assert y.dtype == torch.bfloat16 and y.shape == (3, 256)
    # bf16 scales/zeros and a bf16 output: the error of rounding the weight and the result to bf16
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_unsupported_layers_say_why():
    assert P.unsupported(5120, 15360, 4, 128) is None
    assert "8-bit" in P.unsupported(5120, 15360, 8, 128)
    assert "outputs" in P.unsupported(5120, 100, 4, 128)
    assert "inputs" in P.unsupported(5000, 128, 4, 128)
    assert "group size 512" in P.unsupported(5120, 128, 4, 512)
    uneven = torch.tensor([0] * 200 + [1] * 56, dtype=torch.int32)
    assert "g_idx" in P.unsupported(256, 128, 4, 128, uneven)
