"""GPU tests for the GPTQ layer (run on the GPU machine: pytest -m cuda tests/quant/test_quant_cuda.py)."""

import functools

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from finetune.quant import GPTQLinear  # noqa: E402
from finetune.quant.packing import dequantize_t  # noqa: E402

from _helpers import random_packed  # noqa: E402

SHAPES = [  # (in, out): Qwen-14B c_attn, attn.c_proj, w1/w2, mlp.c_proj, the 7B ones, and odd small ones
    (5120, 15360),
    (5120, 5120),
    (5120, 13696),
    (13696, 5120),
    (4096, 12288),  # Qwen-7B c_attn, attn.c_proj, w1/w2, mlp.c_proj
    (4096, 4096),
    (4096, 11008),
    (11008, 4096),
    (256, 72),
    (136, 8),
]


_random_packed = functools.partial(random_packed, device="cuda")


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("bits,group_size,desc_act,v2", [
    (4, 128, False, False), (4, 128, True, False), (4, 32, False, True), (4, -1, True, True), (8, 128, False, False),
    (8, 64, True, True),
])
def test_triton_dequant_equals_torch(in_f, out_f, bits, group_size, desc_act, v2, monkeypatch, switches):
    from finetune.quant.triton_dequant import triton_dequantize_t

    switches(gptq_tune=False)  # one kernel config (the tuner's choice only changes speed)

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
def test_gptq_linear_triton_path_matches_torch_path(in_f, out_f, desc_act, monkeypatch, switches):
    p = _random_packed(in_f, out_f, 4, 128, desc_act, seed=1)
    bias = torch.randn(out_f, device="cuda", dtype=torch.bfloat16) * 0.1
    layer = GPTQLinear.from_quantized(**p, bias=bias, bits=4, group_size=128, desc_act=desc_act)
    tokens = 2048 if in_f * out_f > 1e6 else 64
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16)

    def run(backend):
        switches(gptq_backend=backend)
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


# -- fused decode GEMV (triton_gemv.py) ----------------------------------------------------------------------------
# Relative error (norm of the difference / norm of the reference) against x @ W.T with W rounded to x's dtype,
# summed in float64 and rounded once: only the summation order differs, so the output rounding differs by one
# ulp on rare elements at most.
GEMV_TOL = {torch.bfloat16: 2e-3, torch.float16: 1e-3, torch.float32: 1e-5}
GEMV_ROWS = (1, 2, 3, 8, 16, 37, 64)  # GEMV, FMA / dot for a few rows, small-M GEMM


@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("bits,group_size,desc_act,v2", [
    (4, 128, False, False), (4, 128, True, False), (4, 32, False, True), (4, -1, True, True), (8, 128, False, False),
    (8, 32, True, True), (8, -1, False, False),
])
def test_triton_gemv_equals_dequant_matmul(in_f, out_f, bits, group_size, desc_act, v2, monkeypatch, switches):
    from finetune.quant.triton_gemv import triton_gemv

    switches(gptq_tune=False)  # one config per row bucket; every config: the next test
    if in_f * out_f > 30e6 and (bits, group_size, desc_act, v2) not in ((4, 128, False, False), (4, 128, True, False)):
        pytest.skip("large shapes only for the Qwen layouts (time)")
    p = _random_packed(in_f, out_f, bits, group_size, desc_act, v2, seed=3)
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        wt = dequantize_t(**p, bits=bits, v2=v2, dtype=dtype).double()
        for m in GEMV_ROWS:
            x = torch.randn(m, in_f, device="cuda", dtype=torch.float32, generator=g).to(dtype)
            ref = (x.double() @ wt).to(dtype)
            y = triton_gemv(x, **p, bits=bits, v2=v2, group_size=group_size)
            assert y.shape == (m, out_f) and y.dtype == dtype
            err = _rel_err(y, ref)
            assert err < GEMV_TOL[dtype], (dtype, m, err)
            again = triton_gemv(x, **p, bits=bits, v2=v2, group_size=group_size)  # cached fast launch
            assert torch.equal(again, y)  # deterministic (split-K partials are summed in a fixed order)


@pytest.mark.parametrize("in_f,out_f,bits,group_size,desc_act,v2", [
    (13696, 5120, 4, 128, False, False),  # few N blocks: split-K; the K tail
    (5120, 15360, 4, 128, True, False),
    (136, 8, 4, 32, False, True),  # N and K smaller than / not multiples of the blocks; groups inside a block
    (256, 72, 8, -1, True, True),
])
def test_triton_gemv_every_config(in_f, out_f, bits, group_size, desc_act, v2):
    """The tuner may pick any config: each one is correct."""
    from finetune.quant.triton_gemv import configs_for, mma_fits, triton_gemv

    p = _random_packed(in_f, out_f, bits, group_size, desc_act, v2, seed=4)
    g = torch.Generator(device="cuda").manual_seed(1)
    exact = dequantize_t(**p, bits=bits, v2=v2, dtype=torch.float32).double()
    for dtype in (torch.bfloat16, torch.float32):
        wt = dequantize_t(**p, bits=bits, v2=v2, dtype=dtype).double()
        for m in (1, 3, 8, 16, 64):
            x = torch.randn(m, in_f, device="cuda", generator=g).to(dtype)
            rounded_w = (x.double() @ wt).to(dtype)
            exact_w = (x.double() @ exact).to(dtype)
            # (the third design's "mma" configs only where they apply; the next tests cover the others)
            for cfg in configs_for(m, mma=mma_fits(bits, dtype, not desc_act, group_size if group_size > 0 else in_f)):
                y = triton_gemv(x, **p, bits=bits, v2=v2, group_size=group_size, trivial_g_idx=not desc_act,
                                config=cfg)
                # the third design multiplies by the exact weight (never rounded to bf16): its reference is the
                # exact product; the others round each weight to x's dtype, as dequantize + matmul does
                err = _rel_err(y, exact_w if cfg[0] == "mma" else rounded_w)
                assert err < GEMV_TOL[dtype], (dtype, m, cfg, err)


def test_triton_gemv_tuned_cached_and_unaligned_input(monkeypatch, switches):
    from finetune.quant import triton_gemv as tg

    switches(gptq_tune=True)
    in_f, out_f = 5120, 5120
    p = _random_packed(in_f, out_f, seed=5)
    wt = dequantize_t(**p, bits=4, dtype=torch.bfloat16).double()
    for m in (1, 4):
        x = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16)
        ref = (x.double() @ wt).to(torch.bfloat16)
        y = tg.triton_gemv(x, **p, bits=4, group_size=128)  # tunes, then caches the compiled kernels
        assert any(k[:3] == (in_f, out_f, tg.row_bucket(m)) for k in tg._BEST)
        assert any(k[:3] == (in_f, out_f, m) for k in tg._COMPILED)
        assert _rel_err(y, ref) < GEMV_TOL[torch.bfloat16]
        assert torch.equal(tg.triton_gemv(x, **p, bits=4, group_size=128), y)  # fast path
        # the same rows at an address that is not 16-byte aligned: a differently specialized kernel
        buf = torch.empty(m * in_f + 1, device="cuda", dtype=torch.bfloat16)
        xu = buf[1:].view(m, in_f)
        xu.copy_(x)
        assert xu.data_ptr() % 16 != 0
        assert torch.equal(tg.triton_gemv(xu, **p, bits=4, group_size=128), y)


def test_triton_gemv_mma_config_on_a_problem_it_cannot_compute_says_why():
    from finetune.quant.triton_gemv import triton_gemv

    p = _random_packed(256, 128, 4, 128, False, False, seed=2)
    x = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="needs 4-bit weights, bf16 inputs"):
        triton_gemv(x, **p, bits=4, group_size=128, trivial_g_idx=True, config=("mma", 128, 128, -4, 4))


@pytest.mark.parametrize("config", [("fma", 128, 64, -8, 4), ("dot", 128, 128, -4, 4), ("mma", 128, 128, -4, 4)],
                         ids=lambda c: c[0])
def test_triton_gemv2_dequantizes_every_weight_exactly_in_bf16(config):
    """Rows of the identity: y is W.T rounded to bf16 (round to nearest even on the GPU), bit for bit."""
    from finetune.quant.triton_gemv import triton_gemv

    p = _random_packed(1024, 640, 4, 128, False, False, seed=8)
    wt = dequantize_t(**p, bits=4, dtype=torch.bfloat16)
    eye = torch.eye(1024, device="cuda", dtype=torch.bfloat16)
    for start in range(0, 1024, 8):
        y = triton_gemv(eye[start:start + 8], **p, bits=4, group_size=128, trivial_g_idx=True, config=config)
        assert torch.equal(y, wt[start:start + 8]), start


def test_triton_gemv2_split_k_counters_in_cuda_graphs():
    """The in-launch split-K reduction's counters: reset by every launch (graph replays equal the eager result),
    and a capture that finds no counters makes its own, zeroed by the graph, without caching them."""
    from finetune.quant import triton_gemv as tg

    p = _random_packed(5120, 5120, seed=9)
    x = torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16)
    config = ("fma", 128, 64, 8, 4)  # 40 N blocks x 8 splits
    eager = tg.triton_gemv(x, **p, bits=4, group_size=128, trivial_g_idx=True, config=config)  # compiles
    assert int(tg._COUNTERS[("cuda", x.device.index)].abs().sum()) == 0
    saved = dict(tg._COUNTERS)
    tg._COUNTERS.clear()  # as if the first call of the process were inside the capture
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = tg.triton_gemv(x, **p, bits=4, group_size=128, trivial_g_idx=True, config=config)
        assert not tg._COUNTERS
        for _ in range(3):
            y.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, eager)
    finally:
        tg._COUNTERS.update(saved)
    again = tg.triton_gemv(x, **p, bits=4, group_size=128, trivial_g_idx=True, config=config)
    assert torch.equal(again, eager)


def test_triton_gemv_tuner_drops_a_config_with_a_wrong_result(monkeypatch, switches):
    """A config that compiles but computes something else on this GPU is never picked, however fast."""
    from finetune.quant import triton_gemv as tg

    switches(gptq_tune=True)
    ref = torch.randn(1, 64, device="cuda")
    out = torch.empty_like(ref)
    monkeypatch.setattr(tg, "_CONFIGS_M1", [("right",), ("wrong",)])

    def launch(cfg):
        out.copy_(ref if cfg == ("right",) else -ref)
        return cfg

    def fast(hit):
        if hit == ("right",):
            torch.cuda._sleep(100_000)  # the slower one: still the one picked
        out.copy_(ref if hit == ("right",) else -ref)

    with pytest.warns(UserWarning, match="wrong result"):
        best = tg._tune(launch, fast, 1, torch.device("cuda"), ("test",), out, lambda: ref)
    assert best == ("right",)
    assert [cfg for cfg, _ in tg._TUNE_MS.pop(("test",))] == [("right",)]


def test_gptq_linear_decode_uses_the_gemv_only_without_graph(monkeypatch, switches):
    from finetune.quant import linear as qlinear

    switches(gptq_tune=False)
    switches(gptq_gemv=True, gptq_int4pack=False, gptq_mma=False)  # (int4pack, mma: the tests below)
    calls = []
    real = qlinear.gptq_gemv

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(qlinear, "gptq_gemv", counting)
    in_f, out_f = 5120, 13696
    p = _random_packed(in_f, out_f, seed=6)
    bias = torch.randn(out_f, device="cuda", dtype=torch.bfloat16) * 0.1
    layer = GPTQLinear.from_quantized(**p, bias=bias, bits=4, group_size=128)
    x = torch.randn(1, 1, in_f, device="cuda", dtype=torch.bfloat16)

    with torch.no_grad():
        y = layer(x)
    assert calls == [(1, in_f)]
    assert y.shape == (1, 1, out_f) and y.dtype == torch.bfloat16

    switches(gptq_gemv=False)
    with torch.no_grad():
        y_off = layer(x)  # dequantize + matmul
    assert len(calls) == 1
    assert _rel_err(y, y_off) < GEMV_TOL[torch.bfloat16]
    # the layer's numerics: x @ W.T rounded to bf16, then the bias added in bf16 (two roundings; an unrounded
    # fp32 reference differs from that by the roundings alone, about the tolerance)
    ref = F.linear(x.float(), layer.dequantize(torch.bfloat16).float()).to(torch.bfloat16) + bias
    assert _rel_err(y, ref) < GEMV_TOL[torch.bfloat16]
    switches(gptq_gemv=True)

    xg = x.clone().requires_grad_(True)
    yg = layer(xg)  # an autograd graph is needed: GPTQMatmul
    assert len(calls) == 1
    yg.float().sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ya = layer(x.float())  # autocast: the GEMV runs in the autocast dtype
    assert len(calls) == 2 and ya.dtype == torch.bfloat16
    assert torch.equal(ya, y)

    with torch.no_grad():
        layer(torch.randn(65, in_f, device="cuda", dtype=torch.bfloat16))  # more than 64 rows: dequantize + matmul
    assert len(calls) == 2


def test_mma_gemv_at_each_shapes_own_config_equals_the_exact_product():
    """The shapes SHAPE_CONFIGS gives a launch config of their own (w1 and w2's pair is 27,392 outputs: no layer
    of SHAPES has it), at the row counts that use it, with and without the low-rank epilogue's producers."""
    from finetune.quant import mma_gemv as G

    for (mb, K, N), config in G.SHAPE_CONFIGS.items():
        p = _random_packed(K, N, seed=12)
        exact = dequantize_t(**p, bits=4, dtype=torch.float32)
        packed = G.repack(**p, group_size=128)
        gen = torch.Generator(device="cuda").manual_seed(1)
        a = (torch.randn(K, 16, device="cuda", generator=gen) * K ** -0.5).to(torch.bfloat16)
        bt = (torch.randn(N, 16, device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
        for rows in range(8 * mb - 7, 8 * mb + 1, 3):
            assert G.config_for(rows, K, N) == config
            x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16, generator=gen)
            sel = torch.ones(rows, 16, device="cuda", dtype=torch.bfloat16)
            h = (x.float() @ a.float()).to(torch.bfloat16).float()
            assert _rel_err(G.mma_gemv(x, *packed[:4], 128, packed[4]), x.float() @ exact) < 4e-3, (K, N, rows)
            with_lora = G.mma_gemv(x, *packed[:4], 128, packed[4], low_rank=(a, sel, bt))
            assert _rel_err(with_lora, x.float() @ exact + h @ bt.float().t()) < 4e-3, (K, N, rows)


# the 14B shapes, act order, and the tiny model's (one or two chunks, one producer, a rank sum of three 16-byte pieces)
@pytest.mark.parametrize("in_f,out_f,desc_act", [(5120, 15360, False), (13696, 5120, False), (4096, 11008, True),
                                                 (128, 384, False), (256, 128, False)])
def test_gptq_linear_one_to_four_rows_use_the_int4pack_copy(in_f, out_f, desc_act, monkeypatch, switches):
    from finetune.quant import linear as qlinear

    switches(gptq_tune=False, gptq_gemv=True, gptq_int4pack=True, gptq_mma=False)
    gemv_rows = []
    real = qlinear.gptq_gemv
    monkeypatch.setattr(qlinear, "gptq_gemv", lambda *a, **k: gemv_rows.append(a[0].shape[0]) or real(*a, **k))
    p = _random_packed(in_f, out_f, desc_act=desc_act, seed=8)
    layer = GPTQLinear.from_quantized(**p, bits=4, group_size=128, desc_act=desc_act)
    w = layer.dequantize(torch.float32)
    for rows in (1, 2, 4, 8):
        x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y = layer(x)
        # bf16 scales and float zeros, bf16 output: about the error of rounding W and y to bf16
        assert _rel_err(y, x.float() @ w.t()) < 1e-2
    assert gemv_rows == [8]  # 1, 2 and 4 rows: the int4pack kernel; 8 rows: the Triton GEMV
    held = layer.__dict__["_int4pack"][2]
    assert held is not None and "_int4pack" not in str(list(layer.state_dict()))
    # new packed values: the copy is remade (it follows qweight's version), not reused stale
    layer.qweight.bitwise_xor_(0x11111111)
    x = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert layer.__dict__["_int4pack"][2] is not held
    assert _rel_err(y, x.float() @ layer.dequantize(torch.float32).t()) < 1e-2
    # switched off: no copy is made, the GEMV serves one row
    switches(gptq_int4pack=False)
    fresh = GPTQLinear.from_quantized(**p, bits=4, group_size=128, desc_act=desc_act)
    with torch.no_grad():
        fresh(x)
    assert "_int4pack" not in fresh.__dict__ and gemv_rows == [8, 1]


# -- the tensor-core GEMV (mma_gemv.py) ------------------------------------------------------------------------
MMA_SHAPES = [s for s in SHAPES if s[0] % 128 == 0 and s[1] % 16 == 0]


@pytest.mark.parametrize("in_f,out_f", MMA_SHAPES)
@pytest.mark.parametrize("desc_act,v2", [(False, False), (True, True)])
def test_mma_gemv_equals_the_exact_product(in_f, out_f, desc_act, v2):
    from finetune.quant import mma_gemv as G

    p = _random_packed(in_f, out_f, desc_act=desc_act, v2=v2, seed=11)
    exact = dequantize_t(**p, bits=4, v2=v2, dtype=torch.float32)  # [K, N]
    packed = G.repack(**p, v2=v2, group_size=128)
    for rows in (1, 3, 8, 9, 16, 17, 32):
        x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
        y = G.mma_gemv(x, *packed[:4], 128, packed[4])
        ref = x.float() @ exact
        # fp32 sums of exact products: the bf16 rounding of the output is the error
        assert y.dtype == torch.bfloat16 and y.shape == (rows, out_f)
        assert _rel_err(y, ref) < 4e-3, rows
        assert torch.equal(G.mma_gemv(x, *packed[:4], 128, packed[4]), y), rows  # the workspace is clean again


# the 14B shapes, act order, and the tiny model's (one or two chunks, one producer, a rank sum of three 16-byte pieces)
@pytest.mark.parametrize("in_f,out_f,desc_act", [(5120, 15360, False), (13696, 5120, False), (4096, 11008, True),
                                                 (128, 384, False), (256, 128, False)])
@pytest.mark.parametrize("ranks", [(64,), (16, 8), (64, 64)])  # (64, 64): the epilogue's largest rank sum
def test_mma_gemv_low_rank_epilogue_adds_the_lora_product(in_f, out_f, desc_act, ranks):
    """The engine's LoRA in the GEMV's kernel: h = x A (rounded to bf16, as a separate matmul gives it) computed by
    the kernel's producer CTAs, then (h * sel) @ bt.T added to every output before its rounding, for each row its
    own 0/1 column selection (two adapters, a row with none), with and without the split over K, for act-order
    weights too (the producers read x in A's order, the product in the repacked order). Repeated calls are equal
    bit for bit, and the counters the producers and waiters share are zero, and the h buffer empty, after each call."""
    from finetune.quant import mma_gemv as G

    p = _random_packed(in_f, out_f, desc_act=desc_act, seed=14)
    exact = dequantize_t(**p, bits=4, dtype=torch.float32)
    packed = G.repack(**p, group_size=128)
    R = sum(ranks)
    gen = torch.Generator(device="cuda").manual_seed(0)
    bt = (torch.randn(out_f, R, device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
    a = (torch.randn(in_f, R, device="cuda", generator=gen) * in_f ** -0.5).to(torch.bfloat16)
    for rows in (1, 3, 9, 32):
        x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16, generator=gen)
        cols = torch.cat([torch.full((r,), a_) for a_, r in enumerate(ranks)]).cuda()
        pick = torch.arange(rows, device="cuda") % (len(ranks) + 1)  # adapter 0, 1, ..., then none
        sel = (cols[None, :] == pick[:, None]).to(torch.bfloat16).contiguous()
        h = (x.float() @ a.float()).to(torch.bfloat16).float()
        lora = (h * sel.float()) @ bt.float().t()
        ref = x.float() @ exact + lora
        for config in (None, (4, 1, 8), (8, 1, 1), (4, 2, 4)):  # (4, 2, 4): two chunks in flight a warp
            y = G.mma_gemv(x, *packed[:4], 128, packed[4], config=config, low_rank=(a, sel, bt))
            assert _rel_err(y, ref) < 4e-3, (rows, config)
            # the low-rank term itself is there, once (a fifth to a half of the base product's size here)
            assert _rel_err(y.float() - x.float() @ exact, lora) < 2e-2, (rows, config)
            assert torch.equal(G.mma_gemv(x, *packed[:4], 128, packed[4], config=config, low_rank=(a, sel, bt)), y)
            _, h_buf, counters = G._workspaces[("lora", x.device.index)]
            assert int(counters.abs().sum()) == 0  # reset for the next call, and h empty again
            assert bool((h_buf.view(torch.int16) == G.H_EMPTY - 0x10000).all())
    with pytest.raises(ValueError, match="rank sum 12"):
        G.mma_gemv(x, *packed[:4], 128, packed[4], low_rank=(a[:, :12].contiguous(), sel[:, :12].contiguous(),
                                                             bt[:, :12].contiguous()))


def test_mma_gemv_low_rank_in_cuda_graphs():
    """Graph replays of the LoRA build (producers, the flag, the waiting tiles, the split-K counters) equal the eager
    call bit for bit, with new x, A and selection values copied into the captured buffers between replays."""
    from finetune.quant import mma_gemv as G

    p = _random_packed(5120, 5120, seed=15)
    packed = G.repack(**p, group_size=128)
    gen = torch.Generator(device="cuda").manual_seed(1)
    R = 64
    x = torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16, generator=gen)
    a = (torch.randn(5120, R, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    bt = (torch.randn(5120, R, device="cuda", generator=gen) * 0.05).to(torch.bfloat16)
    sel = torch.ones(1, R, device="cuda", dtype=torch.bfloat16)
    G.mma_gemv(x, *packed[:4], 128, packed[4], config=(4, 1, 8), low_rank=(a, sel, bt))  # compiled, workspaces made
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = G.mma_gemv(x, *packed[:4], 128, packed[4], config=(4, 1, 8), low_rank=(a, sel, bt))
    for step in range(4):
        x.copy_(torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16, generator=gen))
        a.copy_((torch.randn(5120, R, device="cuda", generator=gen) * 0.02).to(torch.bfloat16))
        sel.fill_(step % 2)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, G.mma_gemv(x, *packed[:4], 128, packed[4], config=(4, 1, 8), low_rank=(a, sel, bt)))
        plain = G.mma_gemv(x, *packed[:4], 128, packed[4], config=(4, 1, 8))
        assert torch.equal(y, plain) == (step % 2 == 0), step  # a row selecting nothing gets the base alone


@pytest.mark.parametrize("in_f,out_f,desc_act", [(5120, 15360, False), (13696, 5120, False), (4096, 11008, True),
                                                 (256, 128, False)])
def test_mma_gemv_low_rank_with_h_given_equals_the_producers_route(in_f, out_f, desc_act):
    """h = x A computed before the call (the engine's norm kernel) and handed in, here a column range of a wider
    tensor (rows 16-byte aligned, wider than R): no producers run, and the output equals the producers' route bit
    for bit where both have the same h (x and A small integers: every sum exact in fp32, in any order); the
    producers' workspace is left as it was; a graph replay with new h values equals the eager call."""
    from finetune.quant import mma_gemv as G

    p = _random_packed(in_f, out_f, desc_act=desc_act, seed=16)
    packed = G.repack(**p, group_size=128)
    R = 64
    gen = torch.Generator(device="cuda").manual_seed(2)
    bt = (torch.randn(out_f, R, device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
    a = torch.randint(-1, 2, (in_f, R), device="cuda", generator=gen).to(torch.bfloat16)
    for rows in (1, 3, 9, 32):
        x = torch.randint(-3, 4, (rows, in_f), device="cuda", generator=gen).to(torch.bfloat16)
        sel = (torch.arange(rows, device="cuda")[:, None] % 2 == 0).expand(rows, R).to(torch.bfloat16).contiguous()
        wide = torch.zeros(rows, R + 24, device="cuda", dtype=torch.bfloat16)
        wide[:, 8:8 + R] = (x.float() @ a.float()).to(torch.bfloat16)  # integer sums: exact in fp32, one rounding
        h = wide[:, 8:8 + R]
        for config in (None, (4, 1, 8)):
            y = G.mma_gemv(x, *packed[:4], 128, packed[4], config=config, low_rank=(a, sel, bt))
            held = [t.clone() for t in G._workspaces[("lora", x.device.index)]]
            given = G.mma_gemv(x, *packed[:4], 128, packed[4], config=config, low_rank=(None, sel, bt, h))
            assert torch.equal(given, y), (rows, config)
            # (bytes compared: the h buffer holds its NaN sentinel between calls)
            assert all(torch.equal(t.view(torch.uint8), u.view(torch.uint8))
                       for t, u in zip(held, G._workspaces[("lora", x.device.index)]))
            assert torch.equal(wide[:, 8:8 + R], (x.float() @ a.float()).to(torch.bfloat16))  # h read, not emptied
    with pytest.raises(ValueError, match="h "):
        G.mma_gemv(x, *packed[:4], 128, packed[4], low_rank=(None, sel, bt, wide[:, 4:4 + R]))  # 8-byte aligned
    x = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16, generator=gen)
    sel, h = torch.ones(1, R, device="cuda", dtype=torch.bfloat16), torch.zeros(1, R, device="cuda",
                                                                                  dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = G.mma_gemv(x, *packed[:4], 128, packed[4], low_rank=(None, sel, bt, h))
    for step in range(3):
        h.copy_(torch.randn(1, R, device="cuda", generator=gen).to(torch.bfloat16) * step)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, G.mma_gemv(x, *packed[:4], 128, packed[4], low_rank=(None, sel, bt, h))), step
        assert torch.equal(y, G.mma_gemv(x, *packed[:4], 128, packed[4])) == (step == 0), step


@pytest.mark.parametrize("in_f,outs,ranks", [(5120, (13696, 13696), (64, 64)), (256, (48, 64), (16, 8)),
                                              (256, (64, 48), (8, 24))])
def test_mma_gemv_low_rank_of_two_layers_side_by_side_equals_each_alone(in_f, outs, ranks):
    """Two layers as one launch (the decode step's w1 and w2, side_by_side), each with its own adapters' bt: outputs
    of the first take h's first R1 columns with bt1, the second's the rest with bt2, and the result equals each layer
    called alone with its own h and bt, and the pair's block-diagonal bt, bit for bit (x, A, h and bt small
    integers: every sum exact in fp32, in any order; and one split over K at these shapes and configs, so the base
    product is summed alike), with h given and through the producers; bt1 and bt2 swapped is far off."""
    from finetune.quant import mma_gemv as G

    gen = torch.Generator(device="cuda").manual_seed(3)
    (n1, n2), (r1, r2) = outs, ranks
    layers = [G.repack(**_random_packed(in_f, n, seed=20 + i), group_size=128) for i, n in enumerate(outs)]
    pair = G.side_by_side(layers[0], layers[1])
    bts = [torch.randint(-2, 3, (n, r), device="cuda", generator=gen).to(torch.bfloat16) for n, r in zip(outs, ranks)]
    a = torch.randint(-1, 2, (in_f, r1 + r2), device="cuda", generator=gen).to(torch.bfloat16)
    block = torch.zeros(n1 + n2, r1 + r2, device="cuda", dtype=torch.bfloat16)
    block[:n1, :r1], block[n1:, r1:] = bts
    for rows in (1, 3, 8):
        x = torch.randint(-3, 4, (rows, in_f), device="cuda", generator=gen).to(torch.bfloat16)
        h = (x.float() @ a.float()).to(torch.bfloat16)  # integer sums: exact in fp32, one rounding
        sel = (torch.rand(rows, r1 + r2, device="cuda", generator=gen) < 0.7).to(torch.bfloat16)
        for config in (None, (4, 1, 4), (8, 1, 1)):
            alone = torch.cat([G.mma_gemv(x, *layers[0][:4], 128, config=config,
                                          low_rank=(None, sel[:, :r1].contiguous(), bts[0], h[:, :r1].contiguous())),
                               G.mma_gemv(x, *layers[1][:4], 128, config=config,
                                          low_rank=(None, sel[:, r1:].contiguous(), bts[1], h[:, r1:].contiguous()))],
                              1)
            for low_rank in ((None, sel, tuple(bts), h), (a, sel, tuple(bts))):
                y = G.mma_gemv(x, *pair[:4], 128, config=config, low_rank=low_rank)
                assert torch.equal(y, alone), (rows, config, len(low_rank))
            assert torch.equal(G.mma_gemv(x, *pair[:4], 128, config=config, low_rank=(None, sel, block, h)), alone)
            if r1 == r2:
                swapped = G.mma_gemv(x, *pair[:4], 128, config=config, low_rank=(None, sel, tuple(bts[::-1]), h))
                assert _rel_err(swapped, alone) > 0.05, (rows, config)
    with pytest.raises(ValueError, match="bt1"):
        G.mma_gemv(x, *pair[:4], 128, low_rank=(None, sel, (bts[0][:n1 - 8], bts[1]), h))


def test_prepare_decode_weights_makes_the_copies_the_first_decode_call_would():
    """The engine makes the tensor-core kernels' repacked weights before it sizes its KV cache: every Int4 layer's
    copy made once (the bytes returned; none the second time), the one a bf16 decoding call then uses (no other
    made), and nothing for another dtype or with FINETUNE_GPTQ_MMA=0."""
    from finetune.quant.linear import prepare_decode_weights
    from finetune.settings import override

    model = torch.nn.Sequential(*[GPTQLinear.from_quantized(**_random_packed(256, n, seed=30 + n), bits=4,
                                                            group_size=128) for n in (64, 128)]).cuda()
    assert prepare_decode_weights(model, torch.float16) == 0
    with override(gptq_mma=False):
        assert prepare_decode_weights(model, torch.bfloat16) == 0
    assert all(layer._mma_weight(build=False) is None for layer in model)
    assert prepare_decode_weights(model, torch.bfloat16) == (256 * 64 + 256 * 128) // 2  # int4: half a byte each
    held = [layer._mma_weight(build=False)[0] for layer in model]
    assert prepare_decode_weights(model, torch.bfloat16) == 0
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        model[0](x)
    assert model[0]._mma_weight(build=False)[0] is held[0]


@pytest.mark.parametrize("config", [(4, 4, 4), (8, 2, 2), (2, 2, 8), (4, 2, 1), (16, 3, 2)])
def test_mma_gemv_gives_every_weight_exactly(config):
    """Rows of the identity: each output is one weight, (q - z) * s computed exactly and rounded once to bf16,
    what the exact dequantization rounded to bf16 gives, bit for bit (for every split over K)."""
    from finetune.quant import mma_gemv as G

    p = _random_packed(512, 4096, seed=12)
    wt = dequantize_t(**p, bits=4, dtype=torch.float32).to(torch.bfloat16)  # [K, N]
    packed = G.repack(**p, group_size=128)
    eye = torch.eye(512, device="cuda", dtype=torch.bfloat16)
    for start in range(0, 512, 32):
        y = G.mma_gemv(eye[start:start + 32], *packed[:4], 128, packed[4], config=config)
        assert torch.equal(y, wt[start:start + 32]), start


def test_mma_gemv_split_k_workspace_in_cuda_graphs():
    """The split-K counters are reset by the last CTA of each tile and the slots are summed in a fixed order: graph
    replays and repeated calls equal the eager call bit for bit (with 3+ splits, atomic adds would not), and a
    capture that finds no workspace falls back (None) instead of allocating one inside the graph."""
    from finetune.quant import mma_gemv as G

    p = _random_packed(5120, 5120, seed=13)
    packed = G.repack(**p, group_size=128)
    x = torch.randn(2, 5120, device="cuda", dtype=torch.bfloat16)
    eager = G.mma_gemv(x, *packed[:4], 128, packed[4], config=(4, 2, 8))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = G.mma_gemv(x, *packed[:4], 128, packed[4], config=(4, 2, 8))
    for _ in range(3):
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager)
    ws, counters = G._workspaces[("split-K", x.device.index)]
    assert int(counters.abs().sum()) == 0
    for _ in range(5):
        assert torch.equal(G.mma_gemv(x, *packed[:4], 128, packed[4], config=(4, 2, 8)), eager)
    saved = dict(G._workspaces)
    G._workspaces.clear()
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            assert G.mma_gemv(x, *packed[:4], 128, packed[4], config=(4, 2, 8)) is None
    finally:
        G._workspaces.update(saved)


# -- the tensor-core small-M GEMM (mma_gemm.py) -------------------------------------------------------------
# mma_gemm.CONFIGS's form; the last three with groups of warps taking the rows in turn (MG 2, 2 and 4)
GEMM_CONFIGS = [None, (4, 1, 1, 4), (8, 2, 3, 1), (4, 2, 2, 2), (8, 1, 3, 8), (4, 1, 1, 1, 2), (8, 2, 2, 2, 2),
                (4, 1, 1, 2, 4)]


@pytest.mark.parametrize("in_f,out_f", MMA_SHAPES)
@pytest.mark.parametrize("desc_act,v2", [(False, False), (True, True)])
def test_mma_gemm_equals_the_exact_product(in_f, out_f, desc_act, v2):
    """1 to 64 rows, x staged in shared memory: the exact product up to the bf16 rounding of the output, the same
    bits on a second call (the split-K workspace and counters are clean again), for the default and other
    launch configurations."""
    from finetune.quant import mma_gemm as MG
    from finetune.quant import mma_gemv as G

    p = _random_packed(in_f, out_f, desc_act=desc_act, v2=v2, seed=21)
    exact = dequantize_t(**p, bits=4, v2=v2, dtype=torch.float32)
    packed = G.repack(**p, v2=v2, group_size=128)
    configs = GEMM_CONFIGS if in_f * out_f > 30e6 else GEMM_CONFIGS[:2]
    for rows in (3, 9, 16, 17, 31, 32, 33, 47, 64):
        x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ exact
        for config in configs:
            y = MG.mma_gemm(x, *packed[:4], 128, packed[4], config=config)
            assert y.dtype == torch.bfloat16 and y.shape == (rows, out_f)
            assert _rel_err(y, ref) < 4e-3, (rows, config)
            assert torch.equal(MG.mma_gemm(x, *packed[:4], 128, packed[4], config=config), y), (rows, config)


def test_mma_gemm_at_each_shapes_own_config_equals_the_exact_product():
    """The shapes SHAPE_CONFIGS gives a launch config of their own (w1 and w2's pair, 27,392 outputs, among them), at
    row counts of the row blocks that use it, twice (the split-K workspace and counters clean again)."""
    from finetune.quant import mma_gemm as MG
    from finetune.quant import mma_gemv as G

    for (mb, K, N), config in MG.SHAPE_CONFIGS.items():
        p = _random_packed(K, N, seed=23)
        exact = dequantize_t(**p, bits=4, dtype=torch.float32)
        packed = G.repack(**p, group_size=128)
        for rows in sorted({max(MG.MIN_ROWS, 8 * mb - 7), 8 * mb - 3, 8 * mb}):
            assert MG.config_for(rows, K, N) == config
            x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
            y = MG.mma_gemm(x, *packed[:4], 128, packed[4])
            assert _rel_err(y, x.float() @ exact) < 4e-3, (K, N, rows)
            assert torch.equal(MG.mma_gemm(x, *packed[:4], 128, packed[4]), y), (K, N, rows)


@pytest.mark.parametrize("config", GEMM_CONFIGS)
@pytest.mark.parametrize("out_f,group_size", [(4096, 128), (1040, 256), (528, 128)])
def test_mma_gemm_gives_every_weight_exactly(config, out_f, group_size):
    """Rows of the identity give each weight, (q - z) * s exact and rounded once to bf16, bit for bit: for groups of
    two chunks, and for tile counts that leave warps of the last CTA without a tile (65 and 33 tiles)."""
    from finetune.quant import mma_gemm as MG
    from finetune.quant import mma_gemv as G

    p = _random_packed(1024, out_f, group_size=group_size, seed=22)
    wt = dequantize_t(**p, bits=4, dtype=torch.float32).to(torch.bfloat16)  # [K, N]
    packed = G.repack(**p, group_size=group_size)
    eye = torch.eye(1024, device="cuda", dtype=torch.bfloat16)
    for start, rows in [(0, 64), (64, 64), (128, 40), (168, 9), (177, 33), (210, 5), (960, 64)]:
        y = MG.mma_gemm(eye[start:start + rows], *packed[:4], group_size, packed[4], config=config)
        assert torch.equal(y, wt[start:start + rows]), (start, rows)


def test_mma_gemm_in_cuda_graphs_and_its_limits():
    """Graph replays equal the eager call bit for bit (the counters are reset by each tile group's last CTA); a
    capture that finds no workspace gives None; rows outside 1..64 say so."""
    from finetune.quant import mma_gemm as MG
    from finetune.quant import mma_gemv as G

    p = _random_packed(13696, 5120, seed=23)
    packed = G.repack(**p, group_size=128)
    x = torch.randn(64, 13696, device="cuda", dtype=torch.bfloat16)
    eager = MG.mma_gemm(x, *packed[:4], 128, packed[4], config=(8, 1, 2, 4))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = MG.mma_gemm(x, *packed[:4], 128, packed[4], config=(8, 1, 2, 4))
    for _ in range(3):
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager)
    assert int(G._workspaces[("split-K", x.device.index)][1].abs().sum()) == 0
    saved = dict(G._workspaces)
    G._workspaces.clear()
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            assert MG.mma_gemm(x, *packed[:4], 128, packed[4], config=(8, 1, 2, 4)) is None
    finally:
        G._workspaces.update(saved)
    for rows in (0, 65):
        with pytest.raises(ValueError, match=f"1 to 64 rows, got {rows}"):
            MG.mma_gemm(torch.randn(rows, 13696, device="cuda", dtype=torch.bfloat16), *packed[:4], 128, packed[4])


# the 14B shapes, act order, and the tiny model's (one or two chunks, one producer, a rank sum of three 16-byte pieces)
@pytest.mark.parametrize("in_f,out_f,desc_act", [(5120, 15360, False), (13696, 5120, False), (4096, 11008, True),
                                                 (128, 384, False), (256, 128, False)])
def test_gptq_linear_decoding_rows_use_the_mma_copy(in_f, out_f, desc_act, monkeypatch, switches):
    from finetune.quant import linear as qlinear
    from finetune.quant import mma_gemv as G

    from finetune.quant import mma_gemm as MG

    switches(gptq_tune=False, gptq_gemv=True, gptq_int4pack=True, gptq_mma=True)
    gemv_rows, mma_rows, gemm_rows = [], [], []
    real, real_mma, real_gemm = qlinear.gptq_gemv, G.mma_gemv, MG.mma_gemm
    monkeypatch.setattr(qlinear, "gptq_gemv", lambda *a, **k: gemv_rows.append(a[0].shape[0]) or real(*a, **k))
    monkeypatch.setattr(G, "mma_gemv", lambda *a, **k: mma_rows.append(a[0].shape[0]) or real_mma(*a, **k))
    monkeypatch.setattr(MG, "mma_gemm", lambda *a, **k: gemm_rows.append(a[0].shape[0]) or real_gemm(*a, **k))
    p = _random_packed(in_f, out_f, desc_act=desc_act, seed=14)
    layer = GPTQLinear.from_quantized(**p, bits=4, group_size=128, desc_act=desc_act)
    w = layer.dequantize(torch.float32)
    first = qlinear.MMA_GEMM_MIN_ROWS
    for rows in (1, 4, 8, first - 1, first, 33, 64, 65):
        x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y = layer(x)
        assert _rel_err(y, x.float() @ w.t()) < 1e-2
    # 65 rows: dequantize + matmul (neither list, nor the Triton GEMM's)
    assert mma_rows == [1, 4, 8, first - 1] and gemm_rows == [first, 33, 64] and gemv_rows == []
    assert "_int4pack" not in layer.__dict__  # the int4pack copy is not made when the mma copy serves
    held = layer.__dict__["_mma"][2]
    layer.scales.mul_(2)  # changed in place: the copy is remade
    x = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert layer.__dict__["_mma"][2] is not held
    assert _rel_err(y, x.float() @ layer.dequantize(torch.float32).t()) < 1e-2
    # a short forward of 20 positions (training's evaluation, a prefill) makes no copy; a decoding call does
    fresh = GPTQLinear.from_quantized(**p, bits=4, group_size=128, desc_act=desc_act)
    with torch.no_grad():
        fresh(torch.randn(1, 20, in_f, device="cuda", dtype=torch.bfloat16))
    assert "_mma" not in fresh.__dict__ and "_int4pack" not in fresh.__dict__
    with torch.no_grad():
        fresh(torch.randn(20, 1, in_f, device="cuda", dtype=torch.bfloat16))
    assert fresh.__dict__["_mma"][2] is not None


# -- the bias in the tensor-core kernels' epilogue ---------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 8, 9, 17, 33, 64])
@pytest.mark.parametrize("out_f,group_size", [(4096, 128), (1040, 256)])
def test_mma_kernels_add_the_bias_before_the_one_rounding(rows, out_f, group_size):
    """Rows of the identity with a bias give bf16(w + b) bit for bit, w the exact weight and the sum in fp32: the
    bias is added to the fp32 result before its single rounding (as F.linear's epilogue), in the GEMV and the
    GEMM, with and without a split over K."""
    from finetune.quant import mma_gemm as MG
    from finetune.quant import mma_gemv as G

    p = _random_packed(1024, out_f, group_size=group_size, seed=31)
    w = dequantize_t(**p, bits=4, dtype=torch.float32)  # [K, N], exact
    packed = G.repack(**p, group_size=group_size)
    bias = torch.randn(out_f, device="cuda").to(torch.bfloat16)
    eye = torch.eye(1024, device="cuda", dtype=torch.bfloat16)[100:100 + rows]
    want = (w[100:100 + rows] + bias.float()).to(torch.bfloat16)
    if rows <= 32:
        for config in (None, (4, 1, 8)):  # (4, 1, 8): split over K
            assert torch.equal(G.mma_gemv(eye, *packed[:4], group_size, packed[4], config=config, bias=bias), want)
    if rows >= 9:
        for config in (None, (4, 1, 1, 8)):
            assert torch.equal(MG.mma_gemm(eye, *packed[:4], group_size, packed[4], config=config, bias=bias), want)
    with pytest.raises(ValueError, match=r"mma_gemv bias: \(7,\) torch.bfloat16"):
        G.mma_gemv(eye[:1], *packed[:4], group_size, packed[4], bias=bias[:7])


@pytest.mark.parametrize("rows", [1, 16, 64])
def test_gptq_linear_decoding_adds_its_bias_once(rows, switches):
    """A biased GPTQLinear (Qwen's c_attn) decodes through the tensor-core kernels with the bias in their epilogue:
    the result is the dequantized product plus the bias (added once, not twice, not zero times)."""
    switches(gptq_gemv=True, gptq_mma=True)
    p = _random_packed(5120, 15360, seed=32)
    x = torch.randn(rows, 5120, device="cuda", dtype=torch.bfloat16)
    product = x.float() @ GPTQLinear.from_quantized(**p, bits=4, group_size=128).dequantize(torch.float32).t()
    # a bias as large as the product: added twice or not at all, the error would be ~100%
    bias = (torch.randn(15360, device="cuda") * product.abs().mean()).to(torch.bfloat16)
    layer = GPTQLinear.from_quantized(**p, bias=bias, bits=4, group_size=128)
    with torch.no_grad():
        y = layer(x)
    assert _rel_err(y, product + bias.float()) < 1e-2
    assert "_mma" in layer.__dict__  # (the tensor-core copy served it)
