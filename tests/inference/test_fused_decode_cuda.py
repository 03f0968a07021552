"""GPU tests of the engine's fused decode step (finetune/inference/fused_decode.py, decode_kernels.py): the compiled
kernels against the torch ops they replace in bf16, a decode step fused against unfused in bf16, when the fused
path is used, and how many kernels a layer launches. Run on the GPU machine:
pytest -m cuda tests/inference/test_fused_decode_cuda.py"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

import finetune  # noqa: E402,F401
from finetune.inference import Engine, SamplingParams  # noqa: E402
from finetune.modeling import QWenConfig, QWenLMHeadModel  # noqa: E402
from finetune.modeling.kernels import apply_rotary, rms_norm, swiglu  # noqa: E402
from finetune.modeling.model import RotaryEmbedding, logn_scale  # noqa: E402
from finetune.tokenization import SMALL_VOCAB, QWenTokenizer  # noqa: E402

from _helpers import _model_values, realistic_model  # noqa: E402
from test_inference_engine import prompts  # noqa: E402

BF16_ULP = 2 ** -7  # relative spacing of bf16 values (8 bits of significand)
# One fused decode step against the unfused one, bf16, relative norm of the logits' difference: the kernels round
# where eager torch rounds, so only rare one-ulp flips (RMSNorm's summation order, rsqrt/exp's last bit) differ
# and propagate through two layers; a wrong position, rotary channel, cache row or mask gives O(1).
BF16_STEP_REL = 1e-2


@pytest.fixture(scope="module")
def tok():
    return QWenTokenizer(str(SMALL_VOCAB))


def _close_bf16(got, want, max_flips=0.01):
    """Equal up to one bf16 ulp, on at most ``max_flips`` of the elements (rounding ties of a different fp32
    summation order)."""
    got, want = got.float(), want.float()
    diff = (got - want).abs()
    assert bool((diff <= BF16_ULP * want.abs() + 1e-6).all()), diff.max().item()
    assert (diff > 0).float().mean().item() <= max_flips


def test_compiled_kernels_equal_the_torch_ops_in_bf16():
    from finetune.inference import decode_kernels as K  # triton: imported on the GPU machine only

    g = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16
    x = torch.randn(5, 1, 5120, device="cuda", generator=g).to(dt)
    delta = torch.randn(5, 1, 5120, device="cuda", generator=g).to(dt)
    w = (1 + 0.1 * torch.randn(5120, device="cuda", generator=g)).to(dt)
    stream = x + delta
    res, out = K.add_rms_norm(x.clone(), delta, w, 1e-6)
    assert torch.equal(res, stream)
    _close_bf16(out, rms_norm(stream, w, 1e-6))

    b, heads, D = 5, 40, 128
    qkv = torch.randn(b, 1, 3 * heads * D, device="cuda", generator=g).to(dt)
    pos = torch.tensor([0, 5, 300, 2047, 4100], device="cuda")
    alpha = torch.tensor([1.0, 1.0, 3.0, 3.0, 7.0], device="cuda")
    cos, sin = RotaryEmbedding(D)(pos[:, None], alpha[:, None])
    scale = logn_scale(pos[:, None] + 1, 2048)
    kc = torch.zeros(8, heads, 4352, D, device="cuda", dtype=dt)
    vc = torch.zeros_like(kc)
    q = K.rotary_to_cache(qkv, cos, sin, scale, kc, vc, pos, heads)
    qr, kr, vr = (t.view(b, 1, heads, D).transpose(1, 2) for t in qkv.split(heads * D, dim=-1))
    q_ref = (apply_rotary(qr, cos, sin).float() * scale[:, None, :, None]).to(dt)
    k_ref = apply_rotary(kr, cos, sin)
    _close_bf16(q, q_ref)
    rows = torch.arange(b, device="cuda")
    _close_bf16(kc[rows, :, pos], k_ref[:, :, 0])
    assert torch.equal(vc[rows, :, pos], vr[:, :, 0])
    assert kc.count_nonzero() == k_ref.count_nonzero()  # nothing written elsewhere

    up = torch.randn(5, 1, 13696, device="cuda", generator=g).to(dt)
    gate = torch.randn(5, 1, 13696, device="cuda", generator=g).to(dt)
    _close_bf16(K.swiglu(up, gate), swiglu(up, gate))


def _after_prefill(model, tok, batch):
    engine = Engine(model, tok, max_batch=8, use_graphs=False)
    for p in batch:
        engine.submit(p, SamplingParams(max_new_tokens=30, min_new_tokens=30))
    for _ in range(3):  # prefill + a few decode steps
        engine.step()
    return engine


def _one_step(engine, kernels, own_keys=False):
    """One decode step's logits and the cache it leaves, with ``kernels`` (None: the model's blocks), from the
    engine's current state (restored after)."""
    cache = engine._cache
    saved = cache.k.clone(), cache.v.clone()
    n = len(engine._rows)
    s = engine._state()  # the next step's inputs, as the device has advanced them
    tok, pos, alpha, sel = s["tok"][:n].clone(), s["pos"][:n].clone(), s["alpha"][:n].clone(), s["sel"][:, :n].clone()
    engine._kernels = kernels
    with torch.no_grad():
        logits = engine._decode_forward(tok, pos, alpha, sel, max(r.length for r in engine._rows) + 1,
                                        own_keys).clone()
    written = cache.k.clone(), cache.v.clone()
    cache.k.copy_(saved[0])
    cache.v.copy_(saved[1])
    return logits, written, pos


def test_fused_step_matches_the_unfused_step_in_bf16(tok):
    model = realistic_model(4).to("cuda", torch.bfloat16)
    model.config.seq_length = 64  # rows beyond it: logN scale and NTK alphas above 1
    engine = _after_prefill(model, tok, prompts([5, 90, 33], seed=6))
    kernels = engine._kernels
    assert kernels is not None
    fused, (fk, fv), pos = _one_step(engine, kernels)
    plain, (pk, pv), _ = _one_step(engine, None)
    rel = ((fused - plain).norm() / plain.norm()).item()
    assert rel < BF16_STEP_REL, rel
    rows = torch.arange(len(engine._rows), device="cuda")
    for f, p in ((fk, pk), (fv, pv)):
        got, want = f[:, rows, :, pos], p[:, rows, :, pos]  # [rows, layers, heads, D]
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < BF16_STEP_REL


@pytest.mark.parametrize("cuda_kernel", [True, False], ids=["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_masked_sdpa_on_the_14b_head_shape(dtype, cuda_kernel, switches):
    """The compiled split-key attention (40 heads of 128, rows at mixed positions, a stale padding slot) against
    SDPA over the length bucket under the additive mask, computed in fp64: attention_cuda.py's kernel and the
    Triton ones."""
    from finetune.inference import decode_kernels as K
    from finetune.inference.fused_decode import additive_mask

    switches(attention_cuda=cuda_kernel)

    g = torch.Generator(device="cuda").manual_seed(0)
    rows, heads, D, capacity, kv_len = 6, 40, 128, 2304, 2048
    k_cache = torch.randn(rows, heads, capacity, D, device="cuda", generator=g).to(dtype)
    v_cache = torch.randn(rows, heads, capacity, D, device="cuda", generator=g).to(dtype)
    q = torch.randn(rows, heads, 1, D, device="cuda", generator=g).to(dtype)
    pos = torch.tensor([0, 1999, 255, 256, 700, 2047], device="cuda")
    scale = D ** -0.5
    out = K.decode_attention(q, k_cache, v_cache, pos, scale, kv_len)
    mask = additive_mask(torch.arange(kv_len, device="cuda"), pos, kv_len, torch.float64)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k_cache[:, :, :kv_len].double(),
                                                           v_cache[:, :, :kv_len].double(), attn_mask=mask, scale=scale)
    ref = ref.transpose(1, 2).reshape(rows, 1, heads * D)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=2 ** -8)
    torch.testing.assert_close(out.double(), ref, **tol)
    graph = torch.cuda.CUDAGraph()  # capturable: no host sync, the positions read on the device
    with torch.cuda.graph(graph):
        replayed = K.decode_attention(q, k_cache, v_cache, pos, scale, kv_len)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, out)
    # a graph captured at a longer length with the same split (the engine's covering_length) gives the same bits:
    # only the grid grows, by splits past every row's keys
    assert K.key_split(rows, heads, capacity) == K.key_split(rows, heads, kv_len)
    with torch.cuda.graph(graph := torch.cuda.CUDAGraph()):
        longer = K.decode_attention(q, k_cache, v_cache, pos, scale, capacity)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(longer, out)


# parts combined in the launch (1 row: 16 parts; 64 parts, two passes of the combine's loop), by the combine kernel
# (6 and 64 rows: more programs than ONE_LAUNCH_PROGRAMS), and one part (64 rows at 256 keys)
@pytest.mark.parametrize("rows,split,kv_len,one_launch", [(1, None, 4096, 1 << 20), (1, 64, 4096, 1 << 20),
                                                          (6, None, 4096, None), (64, None, 4096, None),
                                                          (64, None, 256, None)])
@pytest.mark.parametrize("cuda_kernel", [True, False], ids=["cuda", "triton"])
def test_rotary_attention_equals_the_three_launches_on_the_14b_head_shape(rows, split, kv_len, one_launch, cuda_kernel,
                                                                          monkeypatch, switches):
    """The one-launch kernel (rotary, cache write, attention over the row's own keys, the parts combined by the last
    program of each head, or by the combine kernel after it for large grids) against rotary_to_cache then
    decode_attention, compiled: the caches and the output bit for bit (each new key and value at its row's position,
    a stale slot's past kv_len too; the combine in either place sums in the same order), and replays of a captured
    graph equal to the eager call (the counters reset after every call)."""
    from finetune.inference import decode_kernels as K

    switches(attention_cuda=cuda_kernel)  # (attention_cuda.py's kernel, else the Triton ones)
    if one_launch is not None:
        monkeypatch.setattr(K, "ONE_LAUNCH_PROGRAMS", one_launch)
    g = torch.Generator(device="cuda").manual_seed(rows)
    heads, D, capacity, dt = 40, 128, 4352, torch.bfloat16
    qkv = torch.randn(rows, 1, 3 * heads * D, device="cuda", generator=g).to(dt)
    pos = torch.tensor([4095, 0, 255, 256, 1999, 4200] * 11, device="cuda")[:rows] % (kv_len + 104)  # a stale slot
    alpha = torch.linspace(1.0, 7.0, rows, device="cuda")
    cos, sin = RotaryEmbedding(D)(pos[:, None], alpha[:, None])
    query_scale = logn_scale(pos[:, None] + 1, 2048)
    K0 = torch.randn(rows, heads, capacity, D, device="cuda", generator=g).to(dt)
    V0 = torch.randn(rows, heads, capacity, D, device="cuda", generator=g).to(dt)
    scale = D ** -0.5
    K1, V1 = K0.clone(), V0.clone()
    q = K.rotary_to_cache(qkv, cos, sin, query_scale, K1, V1, pos, heads)
    want = K.decode_attention(q, K1, V1, pos, scale, kv_len, split)
    K2, V2 = K0.clone(), V0.clone()
    got = K.rotary_attention(qkv, cos, sin, query_scale, K2, V2, pos, heads, scale, kv_len, split)
    torch.cuda.synchronize()
    assert torch.equal(K2, K1) and torch.equal(V2, V1)
    assert torch.equal(got, want)
    K3, V3 = K0.clone(), V0.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = K.rotary_attention(qkv, cos, sin, query_scale, K3, V3, pos, heads, scale, kv_len, split)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed, got) and torch.equal(K3, K1) and torch.equal(V3, V1)


def test_decode_attention_compiles_once_for_every_key_length_up_to_8192(switches):
    """A decode step at a key length not met before must not compile the attention kernels again: in a serving
    trace that happened inside graph captures the first tokens waited for (NOTES step 62). One variant of each
    kernel serves 256 to 8,192 keys, whatever key_split picks (up to 64 splits a row, past the 32 the combine reads
    at once; a non-multiple of 16 among the lengths), with 4 heads (a small model: the most halving) and with the
    14B's 40; the one-launch kernel (rotary_attention) likewise, one variant for each way its parts are combined."""
    from finetune.inference import decode_kernels as K

    switches(attention_cuda=False)  # the Triton kernels (test_attention_cuda.py has the CUDA kernel's counterpart)
    kernels = (K._dec_attn_split_kernel, K._dec_attn_combine_kernel, K._dec_rotary_attn_kernel)

    def variants():  # Triton's compiled kernels of each function, over every device
        return [sum(len(cache[0]) for cache in fn.device_caches.values()) for fn in kernels]

    D, capacity = 128, 8192
    first = None
    one_launch_before = variants()[2]  # (the file's other tests compile their own variants of it: HAS_SCALE, ...)
    for heads in (4, 40):
        k_cache = torch.zeros(2, heads, capacity, D, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        q = torch.zeros(2, heads, 1, D, device="cuda", dtype=torch.bfloat16)
        qkv = torch.zeros(2, 1, 3 * heads * D, device="cuda", dtype=torch.bfloat16)
        cos, sin = torch.ones(2, 1, D, device="cuda"), torch.zeros(2, 1, D, device="cuda")
        for kv_len in (256, 512, 1024, 1280, 2056, 4096, 8192):
            pos = torch.tensor([3, kv_len - 1], device="cuda")
            K.decode_attention(q, k_cache, v_cache, pos, 0.1, kv_len)
            first = first or variants()[:2]
            K.rotary_attention(qkv, cos, sin, None, k_cache, v_cache, pos, heads, 0.1, kv_len)
        torch.cuda.synchronize()
        # one variant of the one-launch kernel for each way of combining its parts (in the launch, or after it)
        assert variants()[:2] == first and variants()[2] - one_launch_before <= 2, (heads, variants())


def test_fused_step_with_decode_attention_matches_sdpa_in_bf16(tok, switches):
    model = realistic_model(4).to("cuda", torch.bfloat16)
    model.config.seq_length = 64
    engine = _after_prefill(model, tok, prompts([5, 90, 33], seed=6))
    kernels = engine._kernels
    own, _, _ = _one_step(engine, kernels, own_keys=True)
    sdpa, _, _ = _one_step(engine, kernels, own_keys=False)
    rel = ((own - sdpa).norm() / sdpa.norm()).item()
    assert rel < BF16_STEP_REL, rel


def test_the_fused_path_is_used_only_where_it_computes_the_same(tok, switches):
    model = realistic_model(5).to("cuda", torch.bfloat16)
    assert Engine(model, tok)._kernels is not None
    switches(fused_decode=False)
    assert Engine(model, tok)._kernels is None
    switches(fused_decode=True)
    handle = model.transformer.h[0].register_forward_hook(lambda m, a, o: o)
    assert Engine(model, tok)._kernels is None  # a hook on a block would be skipped
    handle.remove()
    model.transformer.h[1].ln_2.float()
    assert Engine(model, tok)._kernels is None  # an fp32 norm: eager torch would carry an fp32 stream


def _kernels_per_step(model, tok):
    """Names of the CUDA kernels of one eager decode step (batch 2)."""
    from torch.profiler import ProfilerActivity, profile

    engine = _after_prefill(model, tok, prompts([5, 12], seed=7))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _besides_matmul_and_attention(names):
    # cuBLAS's kernels (its split-K matmuls add a splitKreduce kernel) and SDPA's
    skip = ("gemm", "gemv", "nvjet", "cutlass", "sm90", "sm80", "splitk", "fmha", "attention", "flash", "efficient",
            "sdpa", "_dec_attn")
    return [n for n in names if not any(s in n.lower() for s in skip)]


def test_a_fused_layer_launches_few_kernels(tok, switches):
    """The kernels one layer adds to a decode step (a 6-layer model's step minus a 2-layer model's, over 4),
    besides matmuls and attention: two add + RMSNorm, rotary + cache write, SwiGLU, c_attn's bias add, and room
    for SDPA's own helpers (issue 16's goal: <= 12); the model's own blocks launch several times more."""
    counts = {}
    for fused in (True, False):
        switches(fused_decode=fused)
        n = {}
        for layers in (2, 6):
            torch.manual_seed(6)
            values = _model_values(hidden_size=256, num_attention_heads=4, kv_channels=64, intermediate_size=1024,
                                   num_hidden_layers=layers)
            model = QWenLMHeadModel(QWenConfig(**values)).eval().to("cuda", torch.bfloat16)
            n[layers] = len(_besides_matmul_and_attention(_kernels_per_step(model, tok)))
        counts[fused] = (n[6] - n[2]) / 4
    assert counts[True] <= 8, counts
    assert counts[False] >= 3 * counts[True], counts


@pytest.mark.parametrize("rows", [3, 12])  # the GEMV, and from 9 rows the small-M GEMM
def test_w1_and_w2_decode_as_one_launch_with_the_logits_of_two(tok, monkeypatch, rows):
    """Int4 model: the fused step runs w1 and w2 as one tensor-core launch over their weights side by side
    (quant.linear.paired_decode). Its logits equal the step with the two called apart within the bf16 tolerance,
    and each layer's own repacked weight is a view of the pair's, not a second copy."""
    from finetune.inference import fused_decode
    from finetune.quant.loading import build_gptq_model_on_device

    values = _model_values(hidden_size=256, num_attention_heads=4, kv_channels=64, intermediate_size=1024,
                           quantization_config={"bits": 4, "group_size": 128, "quant_method": "gptq",
                                                "desc_act": False})
    model = build_gptq_model_on_device(QWenConfig(**values), device="cuda", dtype=torch.bfloat16, seed=0).eval()
    engine = _after_prefill(model, tok, prompts([5, 90, 33, 17, 60, 8, 21, 44, 9, 30, 12, 70][:rows], seed=6))
    paired, _, _ = _one_step(engine, engine._kernels)
    mlp = model.transformer.h[0].mlp
    pair = mlp.w1.__dict__["_mma_pair"][2]
    assert pair, "w1 and w2 did not pair"
    split = mlp.w1.out_features // 16
    assert mlp.w1.__dict__["_mma"][2][0].data_ptr() == pair[0].data_ptr()
    assert mlp.w2.__dict__["_mma"][2][0].data_ptr() == pair[0][split:].data_ptr()
    monkeypatch.setattr(fused_decode, "paired_decode", lambda *args: None)
    apart, _, _ = _one_step(engine, engine._kernels)
    rel = ((paired - apart).norm() / apart.norm()).item()
    assert rel < BF16_STEP_REL, rel
