"""GPU tests for the GPTQ layer (run on the GPU machine: pytest -m cuda tests/test_quant_cuda.py)."""

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from finetune.quant import GPTQLinear  # noqa: E402
from finetune.quant.packing import dequantize_t, pack_cols, pack_rows  # noqa: E402

SHAPES = [  # (in, out): Qwen-14B c_attn, attn.c_proj, w1/w2, mlp.c_proj, and odd small ones
    (5120, 15360),
    (5120, 5120),
    (5120, 13696),
    (13696, 5120),
    (256, 72),
    (136, 8),
]


def _random_packed(in_f, out_f, bits=4, group_size=128, desc_act=False, v2=False, seed=0, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    gs = in_f if group_size == -1 else group_size
    groups = -(-in_f // gs)
    q = torch.randint(0, 2**bits, (in_f, out_f), generator=g)
    zeros = torch.randint(1, 2**bits, (groups, out_f), generator=g)
    scales = (torch.rand(groups, out_f, generator=g) * 0.02 + 0.001).to(torch.float16)
    g_idx = torch.arange(in_f) // gs
    if desc_act:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    return {
        "qweight": pack_rows(q, bits).to(device),
        "qzeros": pack_cols(zeros if v2 else zeros - 1, bits).to(device),
        "scales": scales.to(device),
        "g_idx": g_idx.to(torch.int32).to(device),
    }


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("bits,group_size,desc_act,v2", [
    (4, 128, False, False), (4, 128, True, False), (4, 32, False, True), (4, -1, True, True), (8, 128, False, False),
    (8, 64, True, True),
])
def test_triton_dequant_equals_torch(in_f, out_f, bits, group_size, desc_act, v2, monkeypatch):
    from finetune.quant.triton_dequant import triton_dequantize_t

    monkeypatch.setenv("FINETUNE_GPTQ_TUNE", "0")  # one kernel config (the tuner's choice only changes speed)

    if in_f * out_f > 30e6 and (bits, group_size, desc_act, v2) not in ((4, 128, False, False), (4, 128, True, False)):
        pytest.skip("large shapes only for the Qwen layouts (time)")
    p = _random_packed(in_f, out_f, bits, group_size, desc_act, v2)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ref = dequantize_t(**p, bits=bits, v2=v2, dtype=dtype)
        out = triton_dequantize_t(**p, bits=bits, v2=v2, dtype=dtype, group_size=group_size)
        assert out.shape == (in_f, out_f) and out.dtype == dtype
        assert torch.equal(out, ref), (dtype, _rel_err(out, ref))  # both round the exact value once
        again = triton_dequantize_t(**p, bits=bits, v2=v2, dtype=dtype, group_size=group_size)  # cached launch
        assert torch.equal(again, ref)


@pytest.mark.parametrize("in_f,out_f", SHAPES[:4] + [(256, 72)])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_linear_triton_path_matches_torch_path(in_f, out_f, desc_act, monkeypatch):
    p = _random_packed(in_f, out_f, 4, 128, desc_act, seed=1)
    bias = torch.randn(out_f, device="cuda", dtype=torch.bfloat16) * 0.1
    layer = GPTQLinear.from_quantized(**p, bias=bias, bits=4, group_size=128, desc_act=desc_act)
    tokens = 2048 if in_f * out_f > 1e6 else 64
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16)

    def run(backend):
        monkeypatch.setenv("FINETUNE_GPTQ_BACKEND", backend)
        x.grad = None
        y = layer(x)
        y.backward(gy)
        return y.detach().clone(), x.grad.clone()

    y_t, g_t = run("triton")
    y_ref, g_ref = run("torch")
    assert y_t.dtype == torch.bfloat16 and g_t.dtype == torch.bfloat16
    assert _rel_err(y_t, y_ref) < 1e-2 and _rel_err(g_t, g_ref) < 1e-2
    W = layer.dequantize(torch.float32)
    y32 = F.linear(x.detach().float(), W, bias.float())
    assert _rel_err(y_t, y32) < 1e-2
    assert _rel_err(g_t, gy.float() @ W) < 1e-2


def test_dequantized_weight_not_kept_alive_between_forward_and_backward():
    in_f, out_f, tokens = 5120, 15360, 256
    layer = GPTQLinear.from_quantized(**_random_packed(in_f, out_f), bits=4, group_size=128)
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x.detach())  # warm up (autotune, allocator)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = layer(x)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    w_bytes = in_f * out_f * 2
    y_bytes = tokens * out_f * 2
    assert held < y_bytes + w_bytes // 4, (held, y_bytes, w_bytes)
    y.sum().backward()
    assert x.grad is not None


def test_module_casts_on_cuda_keep_packed_dtypes():
    layer = GPTQLinear.from_quantized(**_random_packed(256, 64, device="cpu"), bias=torch.zeros(64), bits=4,
                                      group_size=128)
    layer = layer.cuda().to(torch.bfloat16)
    assert layer.qweight.is_cuda and layer.scales.dtype == torch.float16 and layer.qweight.dtype == torch.int32
    assert layer.bias.dtype == torch.bfloat16
    y = layer(torch.randn(3, 256, device="cuda", dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_random_model_built_on_device_runs_fwd_bwd():
    pytest.importorskip("finetune.modeling")
    from finetune.modeling import QWenConfig
    from finetune.quant.loading import build_gptq_model_on_device

    cfg = QWenConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, kv_channels=64,
                     intermediate_size=1024, seq_length=256,
                     quantization_config={"bits": 4, "group_size": 128, "quant_method": "gptq", "desc_act": False})
    model = build_gptq_model_on_device(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    assert isinstance(model.transformer.h[0].mlp.w1, GPTQLinear)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 1024, (2, 32), device="cuda")
    model.transformer.wte.weight.requires_grad_(True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
