"""GPTQLinear: forward/backward against the dequantized weight, frozen buffers, memory, dtype policy."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune.quant import GPTQLinear, quantize_weight


def _layer(in_f=256, out_f=96, bits=4, group_size=64, desc_act=False, v2=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    p = quantize_weight(W, bits=bits, group_size=group_size, desc_act=desc_act, v2=v2)
    b = (torch.randn(out_f, generator=g) * 0.1) if bias else None
    return GPTQLinear.from_quantized(**p, bias=b, bits=bits, group_size=group_size, v2=v2, desc_act=desc_act)


def _snapshot(layer):
    return {k: v.clone() for k, v in layer.named_buffers()}


def _same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_input_grad_equal_reference(bits, desc_act, v2, bias):
    torch.manual_seed(bits + 2 * desc_act + 4 * v2 + 8 * bias)
    layer = _layer(bits=bits, desc_act=desc_act, v2=v2, bias=bias)
    W = layer.dequantize(torch.float32)
    assert W.shape == (96, 256)
    x = torch.randn(2, 5, 256, requires_grad=True)
    y = layer(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.linear(ref_x, W, None if layer.bias is None else layer.bias.float())
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)  # fp32 summation order only
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-4)


def test_buffers_get_no_grad_and_stay_bit_identical():
    layer = _layer()
    before = _snapshot(layer)
    assert list(layer.parameters()) == []
    with torch.no_grad():  # a no-grad forward first (gptqmodel repacks here; we must not)
        layer(torch.randn(3, 256))
    x = torch.randn(3, 256, requires_grad=True)
    layer(x).pow(2).sum().backward()
    for name, buf in layer.named_buffers():
        assert buf.grad is None and not buf.requires_grad, name
    assert _same(before, _snapshot(layer))


def test_dequantized_weight_not_saved_for_backward():
    layer = _layer(in_f=512, out_f=128)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(4, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    # nothing goes through the saved-tensor hooks: no [out, in] weight, no activations, and not even the
    # packed buffers (kept as plain references, so checkpointing can stop recomputing before this matmul)
    assert saved == []
    y.sum().backward()
    assert x.grad is not None
    ref = x.detach() @ layer.dequantize(torch.float32).t()
    if layer.bias is not None:
        ref = ref + layer.bias
    assert torch.allclose(y, ref, atol=1e-5)
    assert torch.allclose(x.grad, layer.dequantize(torch.float32).sum(0).expand(4, -1), atol=1e-5)


def test_dtype_policy_scales_never_cast_bias_follows():
    layer = _layer()
    qw = layer.qweight.clone()
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16
    assert layer.qweight.dtype == layer.qzeros.dtype == layer.g_idx.dtype == torch.int32
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.qweight, qw)
    layer.float()
    assert layer.scales.dtype == torch.float16 and layer.bias.dtype == torch.float32
    layer.half()
    assert layer.scales.dtype == torch.float16 and layer.bias.dtype == torch.float16
    layer.double()
    assert layer.scales.dtype == torch.float16
    # whole models too
    model = nn.Sequential(layer, nn.Linear(96, 8)).to(torch.bfloat16)
    assert model[0].scales.dtype == torch.float16 and model[1].weight.dtype == torch.bfloat16
    y = model(torch.randn(2, 256, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_forward_in_activation_dtype_and_autocast():
    layer = _layer()
    W = layer.dequantize(torch.bfloat16)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.linear(x, W, layer.bias.to(torch.bfloat16)).float(), rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = layer(torch.randn(3, 256))
    assert y2.dtype == torch.bfloat16


def test_dequantize_exact_and_dtypes():
    layer = _layer(bits=8, desc_act=True)
    W32 = layer.dequantize()
    assert W32.dtype == torch.float32 and W32.shape == (96, 256)
    assert torch.equal(layer.dequantize(torch.bfloat16), W32.to(torch.bfloat16))


def test_qwen14b_shapes_on_meta():
    c_attn = GPTQLinear(5120, 15360, bias=True, bits=4, group_size=128, device="meta")
    assert c_attn.qweight.shape == (640, 15360) and c_attn.qweight.dtype == torch.int32
    assert c_attn.qzeros.shape == (40, 1920)
    assert c_attn.scales.shape == (40, 15360) and c_attn.scales.dtype == torch.float16
    assert c_attn.g_idx.shape == (5120,)
    assert c_attn.bias.shape == (15360,)
    w2 = GPTQLinear(13696, 5120, bits=4, group_size=128, device="meta")
    assert w2.qweight.shape == (1712, 5120) and w2.qzeros.shape == (107, 640) and w2.scales.shape == (107, 5120)
    int8 = GPTQLinear(5120, 15360, bits=8, group_size=128, device="meta")
    assert int8.qweight.shape == (1280, 15360) and int8.qzeros.shape == (40, 3840)


def test_bad_shapes_and_bits_errors():
    with pytest.raises(ValueError, match="supported bit widths"):
        GPTQLinear(64, 64, bits=3)
    with pytest.raises(ValueError, match="multiples of 8"):
        GPTQLinear(60, 64, bits=4)
    layer = _layer()
    with pytest.raises(ValueError, match="qzeros has shape"):
        GPTQLinear.from_quantized(layer.qweight, layer.qzeros[:, :2], layer.scales, layer.g_idx, bits=4, group_size=64)


def test_state_dict_roundtrip_keys():
    layer = _layer()
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    fresh = GPTQLinear(256, 96, bias=True, bits=4, group_size=64, bias_dtype=torch.float32)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 256)
    assert torch.equal(fresh(x), layer(x))
