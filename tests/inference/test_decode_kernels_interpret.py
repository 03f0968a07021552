"""The fused decode kernels (``finetune/inference/decode_kernels.py``) on the CPU through Triton's interpreter,
against the plain torch ops the model runs (``modeling/kernels.py``, the engine's cache write), and the engine's
whole fused decode step against its unfused one.

Run with ``TRITON_INTERPRET=1 python -m pytest tests/inference/test_decode_kernels_interpret.py`` (without it,
or on a machine with a GPU, the kernel tests skip: see ``load_interpreted``; the GPU tests in
test_fused_decode_cuda.py cover the compiled kernels). The interpreter casts fp32 -> bf16 by truncation (numpy
has no bf16), so exact comparisons are made in fp32 and fp16; bf16 is checked to within three bf16 ulps.
"""

from __future__ import annotations

import pytest
import torch

from finetune.inference import Engine, SamplingParams
from finetune.modeling.kernels import apply_rotary, rms_norm, swiglu
from finetune.modeling.model import RotaryEmbedding, logn_scale
from finetune.tokenization import SMALL_VOCAB, QWenTokenizer

from _helpers import ROOT, RerunGraph, load_interpreted
from _helpers import tiny_model as tiny

KERNELS_PY = ROOT / "finetune" / "inference" / "decode_kernels.py"
# fp32/fp16: only the summation order of RMSNorm's mean and the last bits of rsqrt/exp differ (numpy's, here);
# bf16: up to two truncations (the interpreter's casts) against eager's round-to-nearest, each < 1 ulp (2**-7)
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=3 * 2 ** -7, atol=1e-2)}


@pytest.fixture(scope="module")
def kernels():
    with pytest.MonkeyPatch.context() as mp:
        yield load_interpreted(KERNELS_PY, "_decode_kernels_interpreted", mp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("rows,hidden", [(1, 64), (3, 80)])
def test_add_rms_norm_equals_residual_add_then_rms_norm(kernels, dtype, with_delta, rows, hidden):
    g = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, 1, hidden, generator=g).to(dtype)
    delta = torch.randn(rows, 1, hidden, generator=g).to(dtype) if with_delta else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    stream = x + delta if with_delta else x.clone()
    expected = rms_norm(stream, weight, 1e-6)

    x_in = x.clone()
    res, out = kernels.add_rms_norm(x_in, delta, weight, 1e-6)
    assert res is x_in  # the residual stream is updated in place
    if dtype != torch.bfloat16:
        assert torch.equal(res, stream)  # one rounding of the fp32 sum, as eager x + delta
    torch.testing.assert_close(res.float(), stream.float(), **TOL[dtype])
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), **TOL[dtype])


def test_add_rms_norm_rejects_a_mismatched_delta(kernels):
    x = torch.randn(2, 1, 64)
    with pytest.raises(ValueError, match="delta"):
        kernels.add_rms_norm(x, torch.randn(2, 1, 64, dtype=torch.float16), torch.ones(64), 1e-6)
    with pytest.raises(ValueError, match="weight"):
        kernels.add_rms_norm(x, None, torch.ones(32), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_delta", [False, True])
# (3, 80, 136): two columns a program, a part one; (9, 80, 64), (12, 64, 136): more columns a program than taken at once
@pytest.mark.parametrize("rows,hidden,rank", [(1, 64, 24), (3, 80, 136), (9, 80, 64), (12, 64, 136)])
def test_add_rms_norm_low_rank_is_add_rms_norm_and_x_a(kernels, dtype, with_delta, rows, hidden, rank):
    """The norm kernel that also computes x A for the Linears reading its output: the residual and the normed rows
    as add_rms_norm gives them, bit for bit (the old x left as it was: the new residual is a new tensor), and h the
    normed rows times A, summed in fp32 and rounded once."""
    g = torch.Generator().manual_seed(rows + rank)
    x = torch.randn(rows, 1, hidden, generator=g).to(dtype)
    delta = torch.randn(rows, 1, hidden, generator=g).to(dtype) if with_delta else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    at = (torch.randn(rank, hidden, generator=g) * hidden ** -0.5).to(dtype)
    res_plain, out_plain = kernels.add_rms_norm(x.clone(), delta, weight, 1e-6)

    x_in = x.clone()
    res, out, h = kernels.add_rms_norm_low_rank(x_in, delta, weight, 1e-6, at)
    assert torch.equal(res, res_plain) and torch.equal(out, out_plain)
    assert torch.equal(x_in, x) and (res is x_in) == (delta is None)
    assert h.shape == (rows, rank) and h.dtype == dtype
    exact = out.reshape(rows, hidden).double() @ at.double().t()
    torch.testing.assert_close(h.double(), exact, **(TOL[dtype] if dtype == torch.bfloat16 else dict(rtol=1e-5,
                                                                                                    atol=1e-5)))
    with pytest.raises(ValueError, match="A.T"):
        kernels.add_rms_norm_low_rank(x, delta, weight, 1e-6, at[:, :-8])


def _reference_rotary_to_cache(qkv, cos, sin, query_scale, K, V, pos, heads):
    """What the model's attention and the engine's _KV.update compute: q rotated (and logN-scaled), k rotated,
    both at each row's position."""
    b = qkv.shape[0]
    P = qkv.shape[-1] // 3
    q, k, v = (t.view(b, 1, heads, P // heads).transpose(1, 2) for t in qkv.split(P, dim=-1))
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if query_scale is not None:
        q = (q.float() * query_scale[:, None, :, None]).type_as(q)
    rows = torch.arange(b)
    K[rows, :, pos] = k[:, :, 0]
    V[rows, :, pos] = v[:, :, 0]
    return q


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rot_pct,logn", [(1.0, True), (1.0, False), (0.5, True)])
def test_rotary_to_cache_equals_rotary_logn_and_the_cache_write(kernels, dtype, rot_pct, logn):
    b, heads, D, slots, cap = 3, 4, 16, 4, 40
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(b, 1, 3 * heads * D, generator=g).to(dtype)
    pos = torch.tensor([0, 17, 39])
    alpha = torch.tensor([1.0, 3.0, 7.0])  # every row its own NTK base
    cos, sin = RotaryEmbedding(int(D * rot_pct))(pos[:, None], alpha[:, None])
    query_scale = logn_scale(pos[:, None] + 1, 16) if logn else None
    assert not logn or query_scale[2, 0] > 1  # the last row is beyond seq_length: a real scale
    K0 = torch.randn(slots, heads, cap, D, generator=g).to(dtype)
    V0 = torch.randn(slots, heads, cap, D, generator=g).to(dtype)
    K_ref, V_ref = K0.clone(), V0.clone()
    q_ref = _reference_rotary_to_cache(qkv, cos, sin, query_scale, K_ref, V_ref, pos, heads)

    K, V = K0.clone(), V0.clone()
    q = kernels.rotary_to_cache(qkv, cos, sin, query_scale, K, V, pos, heads)
    assert q.shape == (b, heads, 1, D) and q.dtype == dtype
    torch.testing.assert_close(q.float(), q_ref.float(), **TOL[dtype])
    torch.testing.assert_close(K.float(), K_ref.float(), **TOL[dtype])
    assert torch.equal(V, V_ref)  # v is copied as is
    written = torch.zeros(slots, cap, dtype=torch.bool)
    written[torch.arange(b), pos] = True
    assert torch.equal(K.transpose(1, 2)[~written], K0.transpose(1, 2)[~written])  # nothing else touched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("logn", [True, False])
def test_prefill_rotary_to_cache_equals_the_model_attention_and_the_prefill_cache_write(kernels, dtype, logn):
    """A prefill of 2 prompts padded to T, joining at cache row 1: q rotated (and logN-scaled past seq_length), k
    rotated, both as the model computes them, and k/v written at rows 1-2, positions 0..T-1; nothing else."""
    n, T, heads, D, slots, cap, slot = 2, 9, 4, 16, 4, 24, 1
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(n, T, 3 * heads * D, generator=g).to(dtype)
    pos = torch.arange(T)[None].expand(n, T)
    alpha = torch.tensor([[1.0], [5.0]])  # each prompt its own NTK base
    cos, sin = RotaryEmbedding(D)(pos, alpha)
    query_scale = logn_scale(pos + 1, 4) if logn else None
    P = heads * D
    q_ref, k_ref, v_ref = (t.view(n, T, heads, D).transpose(1, 2) for t in qkv.split(P, dim=-1))
    q_ref, k_ref = apply_rotary(q_ref, cos, sin), apply_rotary(k_ref, cos, sin)
    if logn:
        q_ref = (q_ref.float() * query_scale[:, None, :, None]).type_as(q_ref)
    K0 = torch.randn(slots, heads, cap, D, generator=g).to(dtype)
    V0 = torch.randn(slots, heads, cap, D, generator=g).to(dtype)
    K_ref, V_ref = K0.clone(), V0.clone()
    K_ref[slot:slot + n, :, :T], V_ref[slot:slot + n, :, :T] = k_ref, v_ref

    K, V = K0.clone(), V0.clone()
    q = kernels.prefill_rotary_to_cache(qkv, cos, sin, query_scale, K, V, slot, heads,
                                        kernels.prefill_index(n, T, slot, qkv.device))
    assert q.shape == (n, heads, T, D) and q.dtype == dtype
    torch.testing.assert_close(q.float(), q_ref.float(), **TOL[dtype])
    torch.testing.assert_close(K.float(), K_ref.float(), **TOL[dtype])
    assert torch.equal(V, V_ref)  # v copied as is, and nothing outside rows 1-2, positions 0..T-1 touched
    with pytest.raises(ValueError, match="does not fit"):  # rows 3-4 of a 4-slot cache
        kernels.prefill_rotary_to_cache(qkv, cos, sin, None, K, V, 3, heads, kernels.prefill_index(n, T, 3, "cpu"))


def test_rotary_to_cache_rejects_shapes_that_do_not_fit(kernels):
    qkv = torch.randn(2, 1, 3 * 4 * 16)
    cos = sin = torch.ones(2, 1, 16)
    K = torch.zeros(2, 4, 8, 16)
    with pytest.raises(ValueError, match="KV cache"):
        kernels.rotary_to_cache(qkv, cos, sin, None, K, torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="split"):
        kernels.rotary_to_cache(qkv, cos, sin, None, K, K.clone(), torch.zeros(2, dtype=torch.long), 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_swiglu_equals_up_times_silu_gate(kernels, dtype):
    g = torch.Generator().manual_seed(3)
    up = (3 * torch.randn(2, 1, 1500, generator=g)).to(dtype)
    gate = (3 * torch.randn(2, 1, 1500, generator=g)).to(dtype)
    out = kernels.swiglu(up, gate)
    assert out.shape == up.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), swiglu(up, gate).float(), **TOL[dtype])


def test_swiglu_of_the_two_halves_of_one_product(kernels):
    # w1 and w2 run as one GEMV: up and gate are the halves of one [rows, 1, 2 n] tensor (rows 2 n apart)
    g = torch.Generator().manual_seed(4)
    both = (3 * torch.randn(3, 1, 2 * 700, generator=g)).half()
    up, gate = both[..., :700], both[..., 700:]
    out = kernels.swiglu(up, gate)
    assert out.is_contiguous() and out.shape == (3, 1, 700)
    torch.testing.assert_close(out.float(), swiglu(up.contiguous(), gate.contiguous()).float(), **TOL[torch.float16])
    with pytest.raises(ValueError, match="row layout"):
        kernels.swiglu(up, gate.contiguous())  # rows 2 n apart against n apart
    with pytest.raises(ValueError, match="row layout"):
        kernels.swiglu(both[..., ::2], both[..., 1::2])  # last dim not contiguous


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("halves", [False, True])
# with 256-element tiles: (1, 700, 24) one column a program, chunks of 256, the last a part; (20, 300, 136) 16 columns
# a program, the last program's partly past R; (40, 130, 64) 16 columns, a second chunk of two elements
@pytest.mark.parametrize("rows,n,rank", [(1, 700, 24), (20, 300, 136), (40, 130, 64)])
def test_swiglu_low_rank_is_swiglu_and_x_a(kernels, dtype, halves, rows, n, rank, monkeypatch):
    """The SwiGLU kernel that also computes x A for mlp.c_proj's LoRA product: out is swiglu's bit for bit (also
    from the two halves of one product), and h is out times A, summed in fp32 and rounded once."""
    monkeypatch.setattr(kernels, "XA_TILE", 256)  # several chunks a row at these small widths
    g = torch.Generator().manual_seed(rows + rank)
    both = (3 * torch.randn(rows, 1, 2 * n, generator=g)).to(dtype)
    up, gate = (both[..., :n], both[..., n:]) if halves else (both[..., :n].contiguous(), both[..., n:].contiguous())
    at = (torch.randn(rank, n, generator=g) * n ** -0.5).to(dtype)
    out, h = kernels.swiglu_low_rank(up, gate, at)
    assert torch.equal(out, kernels.swiglu(up, gate)) and out.shape == (rows, 1, n) and out.is_contiguous()
    assert h.shape == (rows, rank) and h.dtype == dtype
    exact = out.reshape(rows, n).double() @ at.double().t()
    torch.testing.assert_close(h.double(), exact, **(TOL[dtype] if dtype == torch.bfloat16 else dict(rtol=1e-5,
                                                                                                    atol=1e-5)))
    with pytest.raises(ValueError, match="A.T"):
        kernels.swiglu_low_rank(up, gate, at[:, :-8])
    with pytest.raises(ValueError, match="row layout"):
        kernels.swiglu_low_rank(up, gate[..., :-1], at)


def _attention_case(dtype, rows=3, heads=4, D=32, capacity=700, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(rows + 1, heads, capacity, D, generator=g).to(dtype)  # one slot more than the rows
    v_cache = torch.randn(rows + 1, heads, capacity, D, generator=g).to(dtype)
    q = torch.randn(rows, heads, 1, D, generator=g).to(dtype)
    pos = torch.tensor([0, 517, 130][:rows])  # a first token, a row across three splits, one inside the first
    return q, k_cache, v_cache, pos


def _sdpa_reference(q, k_cache, v_cache, pos, scale, kv_len):
    """The unfused step's attention in fp64: every row up to kv_len keys, masked past its position."""
    from finetune.inference.fused_decode import additive_mask

    b = q.shape[0]
    mask = additive_mask(torch.arange(kv_len), pos, kv_len, torch.float64)
    y = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k_cache[:b, :, :kv_len].double(), v_cache[:b, :, :kv_len].double(), attn_mask=mask, scale=scale)
    return y.transpose(1, 2).reshape(b, 1, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_masked_sdpa_over_each_rows_own_keys(kernels, dtype):
    q, k_cache, v_cache, pos = _attention_case(dtype)
    kv_len, scale = 528, 32 ** -0.5
    out = kernels.decode_attention(q, k_cache, v_cache, pos, scale, kv_len)
    assert out.shape == (3, 1, 4 * 32) and out.dtype == dtype
    ref = _sdpa_reference(q, k_cache, v_cache, pos, scale, kv_len)
    # fp32 softmax and sums either way: only the order differs; bf16: the output's rounding (truncated here)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(out.double(), ref, **tol)
    # other splits of the rows' keys give the same result (16 keys: 33 splits, more than the combine reads at once)
    for split in (16, 64, 128, 256):
        torch.testing.assert_close(kernels.decode_attention(q, k_cache, v_cache, pos, scale, kv_len, split).double(),
                                   ref, **tol)


def test_decode_attention_is_the_same_for_every_length_its_grid_covers(kernels):
    """A graph captured at one key length replays for every step up to it: with the same split, any kv_len at or
    past the longest row gives the same bits (more splits, all past the rows' keys)."""
    q, k_cache, v_cache, pos = _attention_case(torch.float32, seed=2)
    scale = 32 ** -0.5
    for split in (64, 256):
        outs = [kernels.decode_attention(q, k_cache, v_cache, pos, scale, kv_len, split) for kv_len in (518, 640, 700)]
        assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_decode_attention_never_reads_past_a_rows_position(kernels):
    """A short row in a batch with a long one reads only its own keys: NaN written past each row's position (and
    past kv_len) does not reach any output."""
    q, k_cache, v_cache, pos = _attention_case(torch.float32, seed=1)
    kv_len, scale = 528, 32 ** -0.5
    want = kernels.decode_attention(q, k_cache, v_cache, pos, scale, kv_len)
    for i, p in enumerate(pos.tolist()):
        k_cache[i, :, p + 1:] = float("nan")
        v_cache[i, :, p + 1:] = float("nan")
    got = kernels.decode_attention(q, k_cache, v_cache, pos, scale, kv_len)
    assert torch.equal(got, want)
    stale = pos.clone()
    stale[0] = 10_000  # a padding slot's stale position: cut at kv_len, not past it
    k_cache[0, :, :kv_len] = torch.randn(4, kv_len, 32)
    v_cache[0, :, :kv_len] = torch.randn(4, kv_len, 32)
    assert torch.isfinite(kernels.decode_attention(q, k_cache, v_cache, stale, scale, kv_len)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rot_pct,logn", [(1.0, True), (0.5, False)])
def test_rotary_attention_is_rotary_to_cache_then_decode_attention(kernels, dtype, rot_pct, logn, monkeypatch):
    """The one-launch kernel gives the two calls' bits: the output, and the cache with each row's new key and value
    at its position (a stale slot's past kv_len too) and nothing else; for splits of 16-1,024 keys (16: 33 parts,
    more than the combine reads at once; 1,024: one part), the parts combined in the launch or by the combine kernel
    after it. Its counters are zero again after every call, so a second call (a graph replay) gives the same."""
    rows, heads, D, cap, kv_len = 4, 4, 32, 700, 528
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(rows, 1, 3 * heads * D, generator=g).to(dtype)
    pos = torch.tensor([0, 517, 130, 600])  # a first token, three splits, inside the first, a stale slot
    alpha = torch.tensor([1.0, 3.0, 7.0, 1.0])
    cos, sin = RotaryEmbedding(int(D * rot_pct))(pos[:, None], alpha[:, None])
    query_scale = logn_scale(pos[:, None] + 1, 64) if logn else None
    K0 = torch.randn(rows, heads, cap, D, generator=g).to(dtype)
    V0 = torch.randn(rows, heads, cap, D, generator=g).to(dtype)
    counters = torch.zeros(rows * heads, dtype=torch.int32)
    monkeypatch.setattr(kernels, "_counters", lambda device, n: counters)
    for split, one_launch in ((None, 1024), (16, 1024), (64, 1024), (256, 1024), (1024, 1024), (64, 0)):
        monkeypatch.setattr(kernels, "ONE_LAUNCH_PROGRAMS", one_launch)  # 0: the combine kernel after it
        K1, V1 = K0.clone(), V0.clone()
        q = kernels.rotary_to_cache(qkv, cos, sin, query_scale, K1, V1, pos, heads)
        want = kernels.decode_attention(q, K1, V1, pos, D ** -0.5, kv_len, split)
        for _ in range(2):
            K2, V2 = K0.clone(), V0.clone()
            got = kernels.rotary_attention(qkv, cos, sin, query_scale, K2, V2, pos, heads, D ** -0.5, kv_len, split)
            assert got.shape == (rows, 1, heads * D) and got.dtype == dtype
            assert torch.equal(got, want) and torch.equal(K2, K1) and torch.equal(V2, V1), split
            assert not counters.any()


def test_decode_attention_rejects_shapes_that_do_not_fit(kernels):
    q, k_cache, v_cache, pos = _attention_case(torch.float32)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.decode_attention(q, k_cache, v_cache, pos, 1.0, 800)  # more keys than the cache holds
    with pytest.raises(ValueError, match="query"):
        kernels.decode_attention(q.transpose(0, 1), k_cache, v_cache, pos, 1.0, 100)


# -- the engine's fused decode step (fp32, CPU, interpreted kernels) --------------------------------------------
def _engine_logits(model, tok, batch, kernels, new=12, adapters=None):
    """Every request's fp32 logits per step (the prefill's first), and the output ids, with the fused path given
    ``kernels`` (None: the model's own blocks); ``adapters``: each request's adapter name (or None)."""
    engine = Engine(model, tok, max_batch=8)
    engine._kernels = kernels
    seen: dict[int, list[torch.Tensor]] = {}
    emit = engine._emit

    def record(rows, logits, touched):
        for i, r in enumerate(rows):
            seen.setdefault(r.req.id, []).append(logits[i].clone())
        return emit(rows, logits, touched)

    engine._emit = record
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=new, min_new_tokens=new), adapter=a)
            for p, a in zip(batch, adapters or [None] * len(batch))]
    while engine.has_work():
        engine.step()
    return [torch.stack(seen[r.id]) for r in reqs], [r.output_ids for r in reqs]


# SDPA over the length bucket, or each row's own keys in one launch (rotary_attention) or three (rotary_to_cache,
# decode_attention)
@pytest.mark.parametrize("own_keys,one_launch", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("seq_length", [256, 16])  # 16: rows cross seq_length (NTK per row, logN scale)
def test_fused_decode_step_equals_the_model_blocks_in_fp32(kernels, seq_length, own_keys, one_launch, switches,
                                                           monkeypatch):
    switches(decode_attention=own_keys, attention_one_launch=one_launch)
    calls = []
    name = "rotary_attention" if one_launch else "decode_attention"
    real = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    tok = QWenTokenizer(str(SMALL_VOCAB))
    model = tiny(seed=11, seq_length=seq_length)
    g = torch.Generator().manual_seed(5)
    batch = [torch.randint(3, 1700, (n,), generator=g).tolist() for n in (3, 20, 9)]
    with torch.no_grad():
        plain_logits, plain_ids = _engine_logits(model, tok, batch, None)
        fused_logits, fused_ids = _engine_logits(model, tok, batch, kernels)
    assert bool(calls) == own_keys
    for a, b in zip(fused_logits, plain_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert fused_ids == plain_ids


def test_key_split_fills_the_gpu_and_covering_length_keeps_the_split():
    """decode_kernels.key_split: 256-key splits, halved (to 64) while a step has fewer than FILL_PROGRAMS programs
    (one row of the 14B's 40 heads: 64 keys up to 1,536, 128 up to 3,072, as measured best on the H200, NOTES step
    65); covering_length: the longest key length with the same split (a graph captured there serves every step up
    to it), 256 x a power of two once the split is 256."""
    from finetune.inference.decode_kernels import MAX_SPLIT, covering_length, key_split

    assert [key_split(1, 40, n) for n in (1, 512, 1536, 1537, 3072, 3073)] == [64] * 3 + [128] * 2 + [256]
    assert [key_split(rows, 40, 300) for rows in (1, 8, 16, 64)] == [64, 256, 256, 256]
    # one row of 40 heads: graphs at 1,536, 3,072, 4,096 and 8,192 keys; 32 rows: 256, 512, 1,024, ...
    assert [covering_length(1, 40, n) for n in (1, 537, 1537, 3072, 3073, 4097)] == [1536, 1536, 3072, 3072, 4096, 8192]
    assert [covering_length(32, 40, n) for n in (1, 256, 257, 700, 2001)] == [256, 256, 512, 1024, 2048]
    for rows, heads in [(1, 40), (2, 40), (4, 40), (8, 40), (3, 4), (64, 40), (1, 1)]:
        for n in range(1, 9000, 61):
            length = covering_length(rows, heads, n)
            assert length >= n and covering_length(rows, heads, length) == length
            assert key_split(rows, heads, length) == key_split(rows, heads, n)
            if key_split(rows, heads, length + 1) == key_split(rows, heads, length) < MAX_SPLIT:
                raise AssertionError(f"a longer graph keeps the split: {rows} x {heads} at {n}")


def test_every_fused_step_reads_its_rows_own_keys_and_answers_as_the_blocks(kernels, switches, monkeypatch):
    """The fused steps (eager here) attend through rotary_attention for one row and for two; with
    FINETUNE_DECODE_ATTENTION=0 through SDPA; each gives the model blocks' logits (fp32)."""
    from finetune.inference.fused_decode import use_own_keys

    calls = []
    real = kernels.rotary_attention
    monkeypatch.setattr(kernels, "rotary_attention", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    tok = QWenTokenizer(str(SMALL_VOCAB))
    model = tiny(seed=11)
    one, two = [[5, 9, 300, 41]], [[5, 9, 300, 41] * 10, [7, 8]]
    for on in (True, False):
        switches(decode_attention=on)
        assert use_own_keys() == on
        with torch.no_grad():
            for batch in (one, two):
                plain_logits, plain_ids = _engine_logits(model, tok, batch, None)
                calls.clear()
                fused_logits, fused_ids = _engine_logits(model, tok, batch, kernels)
                assert set(calls) == ({len(batch)} if on else set())
                for a, b in zip(fused_logits, plain_logits):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                assert fused_ids == plain_ids


def test_fused_prefill_and_steps_with_two_adapters_equal_the_model_blocks_in_fp32(kernels):
    """Rows on two adapters and the base, prefilled together and decoded, through the fused kernels (the
    adapters' per-row hooks on the Linears, inputs [prompts, tokens, ...] in the prefill): the model blocks'
    logits at every step."""
    from test_inference_engine import _peft

    tok = QWenTokenizer(str(SMALL_VOCAB))
    pm = _peft(tiny(seed=13), ["a", "b"]).eval()
    g = torch.Generator().manual_seed(8)
    batch = [torch.randint(3, 1700, (n,), generator=g).tolist() for n in (6, 15, 2)]

    with torch.no_grad():
        plain_logits, plain_ids = _engine_logits(pm, tok, batch, None, new=6, adapters=["a", "b", None])
        fused_logits, fused_ids = _engine_logits(pm, tok, batch, kernels, new=6, adapters=["a", "b", None])
    for a, b in zip(fused_logits, plain_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert fused_ids == plain_ids


def test_one_prompt_joining_alone_is_prefilled_from_a_graph_of_its_padded_length(kernels, monkeypatch):
    """A prompt of up to PREFILL_GRAPH_LENGTHS[-1] tokens that joins alone, into an empty batch or beside running
    rows, is prefilled from the graph of the first of those lengths that holds it (a CPU stand-in re-runs the
    captured forward, which reads the graph's inputs, its cache row among them): one capture a (length, adapters or
    not), into an empty batch, replayed for every later prompt of that length, and the first-token logits and the
    tokens of the eager fused prefill (fp32). Several prompts joining together, a prompt whose graph length is past
    the cache and a join beside running rows whose graph is not held prefill eagerly."""
    from finetune.inference.engine import PREFILL_GRAPH_LENGTHS
    from test_inference_engine import _peft

    tok = QWenTokenizer(str(SMALL_VOCAB))
    pm = _peft(tiny(seed=13), ["a"]).eval()
    g = torch.Generator().manual_seed(10)
    lengths = (5, 20, 32, 33, 100, 300)
    batch = [torch.randint(3, 1700, (n,), generator=g).tolist() for n in lengths]
    adapters = ["a", None, "a", None, "a", None]
    params = SamplingParams(max_new_tokens=4, min_new_tokens=4)
    captures = []

    def stand_ins(engine):
        monkeypatch.setattr(engine, "_capture", RerunGraph.capturing(engine))
        monkeypatch.setattr(engine, "_graph_of", lambda forward: RerunGraph.graph_of(engine, forward, captures))

    def run(use_graphs):  # (max_len 384: the 300-token prompt's graph, 512, is past the cache)
        engine = Engine(pm, tok, max_batch=4, max_len=384, use_graphs=False)
        engine.use_graphs = use_graphs  # (a CPU model: Engine refuses use_graphs=True there; stand-ins below)
        engine._kernels = kernels
        if use_graphs:
            stand_ins(engine)
        firsts, emit = [], engine._emit

        def record(rows, logits, touched):
            firsts.append(logits.clone())
            return emit(rows, logits, touched)

        engine._emit = record
        with torch.no_grad():
            outs = [engine.generate([p], params, adapter=a)[0] for p, a in zip(batch, adapters)]
        return engine, firsts, outs

    _, want_firsts, want = run(False)
    engine, firsts, got = run(True)
    assert PREFILL_GRAPH_LENGTHS[-1] == 512 and got == want
    for a, b in zip(firsts, want_firsts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # 5 and 32 tokens on the adapter share a graph; 300 tokens prefill eagerly, their graph's 512 positions past the
    # cache's 384 (which they grow: graphs dropped)
    assert len(captures) == 4
    engine = Engine(pm, tok, max_batch=4, max_len=512, use_graphs=False)
    engine.use_graphs = True  # (a CPU model: Engine refuses use_graphs=True there; stand-ins below)
    engine._kernels = kernels
    stand_ins(engine)
    graphed, replayed = [], engine._prefill_graphed

    def spy(length, prompt, select, slot):
        graphed.append((len(prompt), slot))
        return replayed(length, prompt, select, slot)

    monkeypatch.setattr(engine, "_prefill_graphed", spy)
    with torch.no_grad():
        assert engine.generate(batch[1:3], params) == [want[1], engine.generate([batch[2]], params)[0]]
        assert graphed == [(32, 0)]  # the two together eagerly, then the second alone from its graph
        first = engine.submit(batch[1], params)
        engine.step()  # joins the empty batch: from the graph, into cache row 0
        second = engine.submit(batch[1], params)  # beside it: the same graph (captured at row 0) into row 1
        engine.step()
        third = engine.submit(batch[3], params)  # beside both, no graph of 64 held: eagerly (none captured)
        while engine.has_work():
            engine.step()
    assert graphed == [(32, 0), (20, 0), (20, 1)] and ("prefill", 64, False) not in engine._graphs
    assert [first.output_ids, second.output_ids, third.output_ids] == [want[1], want[1], want[3]]


def test_a_long_prompt_prefilled_in_chunks_beside_graphed_steps_answers_as_alone(kernels, switches, monkeypatch):
    """Through the fused kernels: a prompt longer than prefill_chunk joins three running rows a chunk a step (each
    chunk's attention over the row's keys so far, crossing seq_length), between graphed steps of four rows (a CPU
    stand-in replays what Engine._capture captures), whose padding row writes its key and value at position 0 of the
    slot being prefilled; every row gets the tokens of its eager fused run alone (fp32)."""
    switches(decode_attention=True)
    tok = QWenTokenizer(str(SMALL_VOCAB))
    model = tiny(seed=3, seq_length=16)
    g = torch.Generator().manual_seed(12)
    batch = [torch.randint(3, 1700, (n,), generator=g).tolist() for n in (5, 9, 4, 30)]
    params = SamplingParams(max_new_tokens=10)

    def alone(p):
        engine = Engine(model, tok, max_batch=1, use_graphs=False)
        engine._kernels = kernels
        return engine.generate([p], params)[0]

    with torch.no_grad():
        want = [alone(p) for p in batch]
    engine = Engine(model, tok, max_batch=4, max_len=256, use_graphs=False, prefill_chunk=8)
    engine.use_graphs = True  # (a CPU model: Engine refuses use_graphs=True there; stand-ins below)
    engine._kernels = kernels
    monkeypatch.setattr(engine, "_capture", RerunGraph.capturing(engine))
    monkeypatch.setattr(engine, "_graph_of", lambda forward: RerunGraph.graph_of(engine, forward))
    chunks, real = [], engine._forward_chunk
    monkeypatch.setattr(engine, "_forward_chunk", lambda row, slot, start, end: chunks.append(
        (slot, start, end, engine._bucket(len(engine._rows)))) or real(row, slot, start, end))
    with torch.no_grad():
        reqs = [engine.submit(p, params) for p in batch[:3]]
        engine.step()
        engine.step()
        reqs.append(engine.submit(batch[3], params))
        while engine.has_work():
            engine.step()
    assert chunks == [(3, 0, 8, 4), (3, 8, 16, 4), (3, 16, 24, 4), (3, 24, 30, 4)]  # slot 3: the steps' padding row
    assert [r.output_ids for r in reqs] == want


# -- where the fused path runs (no triton needed) -----------------------------------------------------------------
def test_the_cpu_keeps_the_model_blocks():
    """(the switch and the hooks: test_fused_decode_cuda.py)"""
    from finetune.inference.fused_decode import fused_kernels

    model = tiny(seed=1)
    assert fused_kernels(model.transformer, torch.device("cpu"), torch.float32) is None
    assert Engine(model, QWenTokenizer(str(SMALL_VOCAB)))._kernels is None  # plain torch, no triton import


def test_own_keys_graphs_serve_every_length_they_cover_and_warm_up_captures_each_one(kernels, switches, monkeypatch):
    """Graphed fused steps over own keys (a CPU stand-in replays what Engine._capture captures) are keyed by
    decode_kernels.covering_length: warm_up captures every (batch bucket, graph length) the cache holds, for the
    sampling it is told to expect; then rows of mixed lengths, crossing graph lengths, leaving and
    joining, meet no new capture and get the tokens of eager fused steps (fp32)."""
    switches(decode_attention=True)
    monkeypatch.setattr(kernels, "FILL_PROGRAMS", 8)  # a tiny model's 4 heads then meet several splits
    tok = QWenTokenizer(str(SMALL_VOCAB))
    model = tiny(seed=11)
    g = torch.Generator().manual_seed(9)
    batch = [torch.randint(3, 1700, (n,), generator=g).tolist() for n in (250, 20, 9, 300)]
    params = [SamplingParams(max_new_tokens=n) for n in (12, 4, 9, 6)]

    def run(engine):
        reqs = [engine.submit(p, sp) for p, sp in zip(batch[:3], params[:3])]
        steps = 0
        while engine.has_work() or len(reqs) < 4:
            engine.step()
            steps += 1
            if steps == 3:  # a long row joins: the step's length passes 256, then 512 (its graphs' lengths)
                reqs.append(engine.submit(batch[3], params[3]))
        return [r.output_ids for r in reqs]

    eager = Engine(model, tok, max_batch=4, max_len=1024, use_graphs=False)
    eager._kernels = kernels
    with torch.no_grad():
        want = run(eager)
    engine = Engine(model, tok, max_batch=4, max_len=1024, use_graphs=False)
    engine.use_graphs = True  # (a CPU model: Engine refuses use_graphs=True there; stand-ins below)
    engine._kernels = kernels
    keys, replayed = [], []

    class Counted(RerunGraph):
        def replay(self):
            replayed.append((self.b, self.kv_len))
            super().replay()

    monkeypatch.setattr(engine, "_capture", Counted.capturing(engine, keys))
    # (warm_up's one-row prefill)
    monkeypatch.setattr(engine, "_graph_of", lambda forward: RerunGraph.graph_of(engine, forward))
    sampled, penalised = SamplingParams(do_sample=True, top_p=0.8), SamplingParams(repetition_penalty=1.1)
    engine.warm_up([sampled, penalised, SamplingParams()])
    heads = model.config.num_attention_heads
    assert engine._capacity == 1024 and [kernels.key_split(1, heads, n) for n in (128, 256, 257)] == [64, 128, 256]
    lengths = {1: [128, 256, 512, 1024], 2: [256, 512, 1024], 4: [256, 512, 1024]}
    assert {b: engine._graph_lengths(b) for b in (1, 2, 4)} == lengths
    expected = {(b, n) + pick + ("own_keys",) for b in lengths for n in lengths[b]
                for pick in [(), (False,), (True,)]}
    assert set(keys) == expected and len(keys) == len(expected)  # each captured once
    replayed.clear()
    with torch.no_grad():
        got = run(engine)
    assert len(keys) == len(expected)  # no capture after warm_up
    assert {n for _, n in replayed} == {256, 512} and len({b for b, _ in replayed}) > 1  # rows left: buckets
    assert got == want and [len(ids) for ids in want] == [12, 4, 9, 6]
