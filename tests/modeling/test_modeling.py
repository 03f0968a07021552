"""The Qwen v1 model: numbers against transformers' Qwen2 (a reference nobody here wrote), masks, long context,
loss, gradient checkpointing, and the official 14B names and shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import finetune  # noqa: F401  (registers the Auto classes)
from finetune.modeling import QWenConfig, QWenLMHeadModel
from finetune.modeling import model as qwen_model
from finetune.modeling.loss import chunked_causal_lm_loss
from finetune.modeling.model import logn_scale, ntk_alpha

from _helpers import realistic_model, tiny_model

ATOL = 1e-4


def to_qwen2(model: QWenLMHeadModel):
    """The same function as transformers' Qwen2ForCausalLM (valid below seq_length)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = model.config
    q2 = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size // 2,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_attention_heads,
            head_dim=c.kv_channels,
            max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.layer_norm_epsilon,
            rope_parameters={"rope_type": "default", "rope_theta": float(c.rotary_emb_base)},
            tie_word_embeddings=False,
            attention_dropout=0.0,
        )
    )
    src = model.state_dict()
    sd = {
        "model.embed_tokens.weight": src["transformer.wte.weight"],
        "model.norm.weight": src["transformer.ln_f.weight"],
        "lm_head.weight": src["lm_head.weight"],
    }
    for i in range(c.num_hidden_layers):
        p, d = f"transformer.h.{i}.", f"model.layers.{i}."
        qw, kw, vw = src[p + "attn.c_attn.weight"].chunk(3, dim=0)
        qb, kb, vb = src[p + "attn.c_attn.bias"].chunk(3, dim=0)
        sd.update({
            d + "self_attn.q_proj.weight": qw, d + "self_attn.k_proj.weight": kw, d + "self_attn.v_proj.weight": vw,
            d + "self_attn.q_proj.bias": qb, d + "self_attn.k_proj.bias": kb, d + "self_attn.v_proj.bias": vb,
            d + "self_attn.o_proj.weight": src[p + "attn.c_proj.weight"],
            d + "mlp.gate_proj.weight": src[p + "mlp.w2.weight"],
            d + "mlp.up_proj.weight": src[p + "mlp.w1.weight"],
            d + "mlp.down_proj.weight": src[p + "mlp.c_proj.weight"],
            d + "input_layernorm.weight": src[p + "ln_1.weight"],
            d + "post_attention_layernorm.weight": src[p + "ln_2.weight"],
        })
    missing, unexpected = q2.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    return q2.eval()


@pytest.fixture(scope="module")
def pair():
    model = tiny_model(seed=1)
    return model, to_qwen2(model)


def left_padded(lengths, vocab=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(3, vocab - 300, (n,), generator=g)
        mask[i, T - n:] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


# ---------------------------------------------------------------------------------------------------------------
# Qwen2 cross-check
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_same_logits_as_qwen2_single(pair):
    model, q2 = pair
    ids = torch.randint(0, 2048, (1, 40), generator=torch.Generator().manual_seed(3))
    a, b = model(ids).logits, q2(ids).logits
    assert a.shape == b.shape == (1, 40, 2048)
    assert (a - b).abs().max() < ATOL
    assert a.std() > 1.0  # the random init is wide enough for clear top-1 margins


@torch.no_grad()
def test_same_logits_as_qwen2_left_padded_batch(pair):
    model, q2 = pair
    ids, mask, pos = left_padded([17, 9, 30, 1])
    a = model(ids, attention_mask=mask, position_ids=pos).logits
    b = q2(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert torch.isfinite(a).all()
    assert (a[real] - b[real]).abs().max() < ATOL
    # positions are derived from the mask when not given (as generate() does)
    assert (model(ids, attention_mask=mask).logits[real] - a[real]).abs().max() < ATOL
    # each row equals that row run alone, unpadded
    for i, n in enumerate(mask.sum(-1).tolist()):
        alone = model(ids[i:i + 1, -n:]).logits[0]
        assert (alone - a[i, -n:]).abs().max() < ATOL


@torch.no_grad()
def test_same_logits_as_qwen2_cached_incremental(pair):
    from transformers import DynamicCache

    model, q2 = pair
    ids, mask, pos = left_padded([12, 7], seed=5)
    extra = torch.randint(3, 1500, (2, 6), generator=torch.Generator().manual_seed(9))
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    full_pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    reference = q2(full_ids, attention_mask=full_mask, position_ids=full_pos).logits

    cache_a, cache_b = DynamicCache(config=model.config), DynamicCache(config=q2.config)
    T = ids.shape[1]
    out_a = model(ids, attention_mask=mask, position_ids=pos, cache=cache_a, use_cache=True)
    out_b = q2(ids, attention_mask=mask, position_ids=pos, cache=cache_b, use_cache=True)
    assert out_a.cache is cache_a
    steps_a, steps_b = [out_a.logits], [out_b.logits]
    for t in range(extra.shape[1]):
        m = full_mask[:, : T + t + 1]
        p = full_pos[:, T + t : T + t + 1]
        steps_a.append(model(extra[:, t:t + 1], attention_mask=m, position_ids=p, cache=cache_a, use_cache=True).logits)
        steps_b.append(q2(extra[:, t:t + 1], attention_mask=m, position_ids=p, cache=cache_b, use_cache=True).logits)
    a, b = torch.cat(steps_a, 1), torch.cat(steps_b, 1)
    real = full_mask.bool()
    assert (a[real] - b[real]).abs().max() < ATOL
    assert (a[real] - reference[real]).abs().max() < ATOL
    # past_key_values= is accepted as the older name of cache=
    cache_c = DynamicCache(config=model.config)
    model(ids, attention_mask=mask, past_key_values=cache_c, use_cache=True)
    assert cache_c.get_seq_length() == T


@torch.no_grad()
def test_same_greedy_generation_as_qwen2(pair):
    model, q2 = pair
    ids, mask, _ = left_padded([10, 4, 7], seed=11)
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    a = model.generate(ids, **kw)
    b = q2.generate(ids, **kw)
    assert a.shape == (3, ids.shape[1] + 24)
    assert torch.equal(a, b)
    # and without the cache (every step recomputes the whole prefix)
    assert torch.equal(model.generate(ids, use_cache=False, **kw), a)


@torch.no_grad()
def test_a_static_cache_is_refused_naming_the_argument(pair):
    """generate(cache_implementation="static") failed in the first forward with 'attention_mask must be 2-D', an
    argument the caller never passed; the dynamic layouts still decode."""
    model, _ = pair
    ids, mask, _ = left_padded([6], seed=12)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    for impl in ("static", "sliding_window"):
        with pytest.raises(ValueError, match=f"cache_implementation='{impl}' is not supported"):
            model.generate(ids, cache_implementation=impl, **kw)
    from transformers import GenerationConfig

    gc = GenerationConfig(cache_implementation="static", max_new_tokens=4, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="cache_implementation='static'"):  # (set in the config passed)
        model.generate(ids, attention_mask=mask, generation_config=gc)
    a = model.generate(ids, **kw)
    assert torch.equal(model.generate(ids, cache_implementation="dynamic", **kw), a)
    assert torch.equal(model.generate(ids, cache_implementation="hybrid", **kw), a)


# ---------------------------------------------------------------------------------------------------------------
# Masks: causality, padding, packing
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_causal(training):
    model = tiny_model(seed=2).train(training)
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids, return_logits=True).logits
        for t in (0, 5, 23):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 7) % 2048
            out = model(changed, return_logits=True).logits
            assert torch.equal(out[:, :t], base[:, :t])
            assert not torch.allclose(out[:, t], base[:, t])


@torch.no_grad()
def test_padding_tokens_are_never_attended():
    model = tiny_model(seed=2)
    ids, mask, pos = left_padded([5, 9], seed=1)
    a = model(ids, attention_mask=mask, position_ids=pos).logits
    ids2 = ids.clone()
    ids2[mask == 0] = 1234  # different pad tokens, same real tokens
    b = model(ids2, attention_mask=mask, position_ids=pos).logits
    assert (a[mask.bool()] - b[mask.bool()]).abs().max() < 1e-6


@pytest.mark.parametrize("training,seq_length", [(False, 256), (True, 256), (False, 4)])
def test_packed_rows_equal_separate_sequences(training, seq_length):
    # seq_length 4 in eval: NTK and logN apply per packed sequence, from its own length and positions
    model = tiny_model(seed=4, seq_length=seq_length).train(training)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 2048, (n,), generator=g) for n in (5, 11, 3, 9, 8)]
    rows = [[0, 1, 2], [3, 4]]  # two packed rows: 19 and 17 tokens, the second right-padded to 19
    T = 19
    ids = torch.zeros(2, T, dtype=torch.long)
    pos = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for s in members:
            n = len(seqs[s])
            ids[r, at:at + n] = seqs[s]
            pos[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n] = 1
            at += n
    with torch.no_grad():
        packed = model(ids, position_ids=pos, attention_mask=mask, return_logits=True).logits
        packed_nomask = model(ids[:1], position_ids=pos[:1], return_logits=True).logits
        for r, members in enumerate(rows):
            at = 0
            for s in members:
                n = len(seqs[s])
                alone = model(seqs[s][None], return_logits=True).logits[0]
                assert (packed[r, at:at + n] - alone).abs().max() < ATOL
                if r == 0:
                    assert (packed_nomask[0, at:at + n] - alone).abs().max() < ATOL
                at += n


def test_packed_loss_equals_separate_losses():
    model = tiny_model(seed=4).train()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 2048, (1, 7), generator=g), torch.randint(0, 2048, (1, 6), generator=g)
    ids = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7), torch.arange(6)])[None]
    labels = ids.clone()
    labels[0, 7] = -100  # the first token of the second sequence is not predicted from the first one
    packed = model(ids, position_ids=pos, labels=labels).loss
    sep = (model(a, labels=a).loss * 6 + model(b, labels=b).loss * 5) / 11
    assert torch.allclose(packed, sep, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Long context (inference only): dynamic NTK and logN
# ---------------------------------------------------------------------------------------------------------------
def test_ntk_alpha_values():
    S = 2048
    assert [ntk_alpha(n, S) for n in (1, 100, S)] == [1, 1, 1]
    assert [ntk_alpha(n, S) for n in (S + 1, 2 * S)] == [3, 3]
    assert [ntk_alpha(n, S) for n in (2 * S + 1, 4 * S)] == [7, 7]
    assert ntk_alpha(4 * S + 1, S) == 15


def test_logn_scale_only_past_seq_length():
    S = 8
    p = torch.arange(1, 20)
    s = logn_scale(p, S)
    assert torch.equal(s[p <= S], torch.ones(S))
    assert torch.allclose(s[p > S], torch.log(p[p > S].float()) / torch.log(torch.tensor(8.0)))
    assert (s[p > S] > 1).all()


@torch.no_grad()
def test_logn_touches_only_positions_past_seq_length():
    on = tiny_model(seed=6, seq_length=8, use_dynamic_ntk=False, use_logn_attn=True)
    off = tiny_model(seed=6, seq_length=8, use_dynamic_ntk=False, use_logn_attn=False)
    ids = torch.randint(0, 2048, (1, 14), generator=torch.Generator().manual_seed(0))
    a, b = on(ids).logits, off(ids).logits
    assert torch.equal(a[:, :8], b[:, :8])  # positions 1..8 (1-based) untouched
    assert ((a[:, 8:] - b[:, 8:]).abs().amax(-1) > 1e-4).all()  # every position past seq_length changes
    # training mode: no logN
    on.train(), off.train()
    assert torch.equal(on(ids, return_logits=True).logits, off(ids, return_logits=True).logits)


@torch.no_grad()
def test_ntk_only_in_eval_and_only_past_seq_length():
    ntk = tiny_model(seed=7, seq_length=8, use_dynamic_ntk=True, use_logn_attn=False)
    plain = tiny_model(seed=7, seq_length=8, use_dynamic_ntk=False, use_logn_attn=False)
    short = torch.randint(0, 2048, (1, 8), generator=torch.Generator().manual_seed(0))
    long = torch.randint(0, 2048, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ntk(short).logits, plain(short).logits)  # alpha 1 up to seq_length
    assert not torch.allclose(ntk(long).logits, plain(long).logits)  # alpha 3 past it
    ntk.train(), plain.train()
    assert torch.equal(ntk(long, return_logits=True).logits, plain(long, return_logits=True).logits)


@torch.no_grad()
def test_ntk_alpha_per_row_from_unpadded_length_and_fixed_at_prefill(monkeypatch):
    from transformers import DynamicCache

    model = tiny_model(seed=8, seq_length=8)
    # row 0: 12 real tokens (alpha 3), row 1: 6 real tokens (alpha 1) left-padded to 12
    ids, mask, pos = left_padded([12, 6], seed=4)
    cache = DynamicCache(config=model.config)
    batched = model(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits
    assert cache._qwen_ntk_alpha.tolist() == [3.0, 1.0]
    for i, n in enumerate((12, 6)):
        alone = model(ids[i:i + 1, -n:]).logits[0]
        assert (alone - batched[i, -n:]).abs().max() < ATOL

    # decode row 0 from 12 to 20 tokens: a fresh prefill of 17+ tokens would give alpha 7, the cache keeps 3
    cache = DynamicCache(config=model.config)
    x = ids[:1]
    extra = torch.randint(0, 2048, (1, 8), generator=torch.Generator().manual_seed(1))
    steps = [model(x, cache=cache, use_cache=True).logits]
    for t in range(8):
        steps.append(model(extra[:, t:t + 1], cache=cache, use_cache=True).logits)
    assert cache._qwen_ntk_alpha.tolist() == [3.0]
    cached = torch.cat(steps, 1)
    full_ids = torch.cat([x, extra], 1)
    assert ntk_alpha(20, 8) == 7
    recomputed = model(full_ids).logits  # alpha 7 for the whole sequence
    assert not torch.allclose(cached, recomputed, atol=1e-3)
    monkeypatch.setattr(qwen_model, "ntk_alpha", lambda n, s: 3)
    forced3 = model(full_ids).logits
    assert (cached - forced3).abs().max() < ATOL


# ---------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------
def _labels(ids, seed=0):
    labels = ids.clone()
    g = torch.Generator().manual_seed(seed)
    labels[torch.rand(ids.shape, generator=g) < 0.4] = -100
    return labels


def test_chunked_loss_equals_full_cross_entropy_and_gradient():
    model = tiny_model(seed=9).train()
    ids = torch.randint(0, 2048, (3, 21), generator=torch.Generator().manual_seed(0))
    labels = _labels(ids)

    out = model(ids, labels=labels)
    assert out.logits is None  # training: no full logits unless asked
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(ids, return_logits=True).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 2048).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    assert torch.allclose(out.loss, ref, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6, rtol=1e-4), n

    # several chunks give the same numbers as one
    hidden = model.transformer(ids).last_hidden_state
    one = chunked_causal_lm_loss(model.lm_head, hidden, labels, chunk_tokens=4096)
    many = chunked_causal_lm_loss(model.lm_head, hidden, labels, chunk_tokens=5)
    assert torch.allclose(one, many, atol=1e-6)
    # eval mode returns logits with the loss
    model.eval()
    assert model(ids, labels=labels).logits.shape == (3, 21, 2048)


def _backward_nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [n for n, _ in node.next_functions]
    return {type(n).__name__ for n in seen}


@pytest.mark.parametrize("autocast", [False, True])
def test_a_frozen_lm_head_computes_the_hidden_gradient_with_the_loss(autocast):
    # LoRA and Q-LoRA leave lm_head frozen: each chunk's hidden-state gradient is computed in the forward (no
    # checkpointed recomputation); loss and gradient must equal plain cross-entropy's, scaling included
    model = tiny_model(seed=9).train()
    model.lm_head.weight.requires_grad_(False)
    ids = torch.randint(0, 2048, (3, 21), generator=torch.Generator().manual_seed(0))
    labels = _labels(ids)
    hidden = model.transformer(ids).last_hidden_state.detach().requires_grad_(True)
    n = torch.tensor(2 * int((labels[:, 1:] != -100).sum()))  # a global count, as the Trainer passes it
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = chunked_causal_lm_loss(model.lm_head, hidden, labels, num_items_in_batch=n, chunk_tokens=5)
        assert "_FrozenHeadNLLBackward" in _backward_nodes(loss)
        loss.backward()
        fused = hidden.grad.clone()
        hidden.grad = None
        logits = model.lm_head(hidden)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 2048).float(), labels[:, 1:].reshape(-1), ignore_index=-100,
                          reduction="sum") / n
    ref.backward()
    tol = dict(atol=2e-3, rtol=2e-2) if autocast else dict(atol=1e-7, rtol=1e-4)
    assert torch.allclose(loss, ref, atol=1e-5, rtol=1e-4)
    assert torch.allclose(fused, hidden.grad, **tol)
    assert fused.abs().max() > 0
    # rows without a trained label get no gradient
    untrained = (labels[:, 1:] == -100)
    assert torch.count_nonzero(fused[:, :-1][untrained]) == 0 and torch.count_nonzero(fused[:, -1]) == 0
    # a label outside the vocabulary makes the loss NaN (the trainer's non-finite guard reports the step)
    bad = labels.clone()
    bad[0, 3] = 2048
    assert torch.isnan(chunked_causal_lm_loss(model.lm_head, hidden, bad, chunk_tokens=5))
    # a trainable lm_head (full fine-tuning) keeps the checkpointed chunks
    model.lm_head.weight.requires_grad_(True)
    again = chunked_causal_lm_loss(model.lm_head, hidden, labels, num_items_in_batch=n, chunk_tokens=5)
    assert "_FrozenHeadNLLBackward" not in _backward_nodes(again)


def test_num_items_in_batch_sums_over_the_global_batch():
    model = tiny_model(seed=9).train()
    ids = torch.randint(0, 2048, (4, 15), generator=torch.Generator().manual_seed(1))
    labels = _labels(ids, seed=2)
    whole = model(ids, labels=labels).loss
    n = int((labels[:, 1:] != -100).sum())
    # two micro-batches (gradient accumulation), each divided by the global count, add up to the global mean
    parts = [model(ids[i:i + 2], labels=labels[i:i + 2], num_items_in_batch=torch.tensor(n)).loss for i in (0, 2)]
    assert torch.allclose(parts[0] + parts[1], whole, atol=1e-5)
    assert torch.allclose(model(ids, labels=labels, num_items_in_batch=n).loss, whole, atol=1e-6)


def test_loss_with_nothing_to_train_is_zero_and_differentiable():
    model = tiny_model(seed=9).train()
    ids = torch.randint(0, 2048, (1, 6))
    loss = model(ids, labels=torch.full_like(ids, -100)).loss
    assert loss.item() == 0.0
    loss.backward()


# ---------------------------------------------------------------------------------------------------------------
# Gradient checkpointing with PEFT LoRA
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_with_peft_lora_same_grads(use_reentrant):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(seed=10)
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "w1", "w2"], init_lora_weights=False)
    )
    lora.train()
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 5 * 2  # A and B, five Linears per block, two blocks
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))

    def grads():
        lora.zero_grad()
        lora(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}

    plain = grads()
    lora.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    blocks = lora.base_model.model.transformer.h
    assert all(b.gradient_checkpointing for b in blocks)
    calls = []
    orig = blocks[0]._gradient_checkpointing_func
    blocks[0]._gradient_checkpointing_func = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    ckpt = grads()
    assert calls, "the block was not checkpointed"
    for n in names:
        assert plain[n].abs().sum() > 0
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6, rtol=1e-5), n


# ---------------------------------------------------------------------------------------------------------------
# Official names and shapes (Qwen-14B, on the meta device)
# ---------------------------------------------------------------------------------------------------------------
QWEN_14B = dict(
    vocab_size=152064, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, kv_channels=128,
    intermediate_size=27392, seq_length=2048, max_position_embeddings=8192, rotary_emb_base=10000,
    layer_norm_epsilon=1e-6, no_bias=True, tie_word_embeddings=False,
)


def test_qwen14b_names_and_shapes_on_meta():
    with torch.device("meta"):
        model = QWenLMHeadModel(QWenConfig(**QWEN_14B))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "transformer.wte.weight": (152064, 5120),
        "transformer.ln_f.weight": (5120,),
        "lm_head.weight": (152064, 5120),
    }
    for i in range(40):
        p = f"transformer.h.{i}."
        expected.update({
            p + "ln_1.weight": (5120,),
            p + "attn.c_attn.weight": (15360, 5120),
            p + "attn.c_attn.bias": (15360,),
            p + "attn.c_proj.weight": (5120, 5120),
            p + "ln_2.weight": (5120,),
            p + "mlp.w1.weight": (13696, 5120),
            p + "mlp.w2.weight": (13696, 5120),
            p + "mlp.c_proj.weight": (5120, 13696),
        })
    assert shapes == expected
    n = sum(p.numel() for p in model.parameters())
    assert 14.1e9 < n < 14.2e9  # Qwen-14B: 14.17B parameters


def test_config_official_defaults():
    c = QWenConfig()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (151936, 4096, 32, 32)
    assert (c.kv_channels, c.intermediate_size, c.seq_length, c.max_position_embeddings) == (128, 22016, 2048, 8192)
    assert (c.rotary_pct, c.rotary_emb_base, c.layer_norm_epsilon) == (1.0, 10000, 1e-6)
    assert c.use_dynamic_ntk and c.use_logn_attn and c.no_bias and c.scale_attn_weights and c.use_cache
    assert c.use_flash_attn == "auto" and not c.tie_word_embeddings and c.model_type == "qwen"


# ---------------------------------------------------------------------------------------------------------------
# GPU (run with -m cuda on the GPU machine)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@torch.no_grad()
def test_cuda_bf16_sdpa_matches_fp32():
    bf = realistic_model(12).to("cuda", torch.bfloat16)
    ref_model = realistic_model(12).to("cuda")
    ref_model.load_state_dict({k: v.float() for k, v in bf.state_dict().items()})  # same (bf16-rounded) weights
    ids, mask, pos = left_padded([200, 120, 37], seed=3)
    ids, mask, pos = ids.cuda(), mask.cuda(), pos.cuda()
    real = mask.bool()
    ref = ref_model(ids, attention_mask=mask, position_ids=pos).logits.float()
    out = bf(ids, attention_mask=mask, position_ids=pos).logits.float()
    rel = (out[real] - ref[real]).norm() / ref[real].norm()
    assert rel < 1e-2, rel.item()
    # without padding (the is_causal fast path)
    ref1, out1 = ref_model(ids[:1]).logits, bf(ids[:1]).logits.float()
    assert (out1 - ref1).norm() / ref1.norm() < 1e-2
    # cached greedy generation runs on the GPU in bf16
    gen = bf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert gen.shape == (3, ids.shape[1] + 8)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_flex_packed_equals_unpacked(dtype):
    model = realistic_model(13).to("cuda", dtype).train()
    g = torch.Generator().manual_seed(0)
    lengths = [100, 37, 250, 13, 112]
    seqs = [torch.randint(0, 2048, (n,), generator=g) for n in lengths]
    ids = torch.cat(seqs)[None].cuda()
    pos = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    with torch.no_grad():
        packed = model(ids, position_ids=pos, return_logits=True).logits.float()
        at = 0
        for s in seqs:
            alone = model(s[None].cuda(), return_logits=True).logits.float()[0]
            part = packed[0, at:at + len(s)]
            tol = 1e-3 if dtype == torch.float32 else 2e-2
            assert (part - alone).norm() / alone.norm() < tol
            at += len(s)
    # gradients flow through the flex path
    labels = ids.clone()
    loss = model(ids, position_ids=pos, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.h[0].attn.c_attn.weight.grad is not None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_kernels_match_eager(dtype, monkeypatch):
    """RMSNorm, rotary and SwiGLU compiled on CUDA give the eager results: logits and every gradient (norm
    weights included), with and without checkpointing, over three sequence lengths (the third recompiles
    with dynamic shapes)."""
    from finetune.modeling import kernels

    monkeypatch.setattr(kernels, "COMPILE_MIN_NUMEL", 0)  # this model is small: compile it anyway

    def run(compiled: bool, ckpt: bool, T: int):
        from finetune.settings import override

        with override(compile=compiled):
            return _run(compiled, ckpt, T)

    def _run(compiled: bool, ckpt: bool, T: int):
        model = realistic_model(14).to("cuda", dtype).train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(0, 2048, (2, T), generator=torch.Generator().manual_seed(T)).cuda()
        out = model(ids, labels=ids, return_logits=True)
        out.loss.backward()
        return out.logits.float(), {n: p.grad.float() for n, p in model.named_parameters()}

    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for T, ckpt in ((64, False), (96, True), (200, True)):
        ref_logits, ref_grads = run(False, ckpt, T)
        logits, grads = run(True, ckpt, T)
        assert (logits - ref_logits).norm() / ref_logits.norm() < tol
        for n, g in ref_grads.items():
            assert (grads[n] - g).norm() / g.norm().clamp_min(1e-12) < 5 * tol, n
    assert kernels._COMPILED, "nothing was compiled"


def test_left_padding_is_not_packing():
    from finetune.modeling.attention import document_ids

    ids, mask, pos = left_padded([3, 6])
    assert document_ids(pos, mask) is None
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 0]])
    right_pad = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    assert document_ids(packed, right_pad).tolist() == [[0, 0, 0, 1, 1, 1, 1]]


def test_trainer_facing_attributes():
    model = tiny_model()
    assert model.loss_type == "ForCausalLM" and model.accepts_loss_kwargs
    assert model.supports_gradient_checkpointing and set(model._no_split_modules) == {"QWenBlock"}
    assert model.base_model_prefix == "transformer" and model._supports_sdpa


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_packed_long_rows_never_materialise_a_dense_mask():
    model = realistic_model(14).to("cuda", torch.bfloat16)
    for total in (32768, 20000):  # two lengths: recompiles stay sparse too
        lengths = [total // 4, total // 2, total - total // 4 - total // 2]
        pos = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
        ids = torch.randint(0, 2048, (1, total), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        hidden = model.transformer(ids, position_ids=pos).last_hidden_state
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        assert torch.isfinite(hidden.float()).all()
        # a dense L x L bool mask alone would take total**2 bytes (1 GiB at 32k), fp32 scores 16x that
        assert peak < total * total / 2, f"{peak / 2**20:.0f} MiB for {total} tokens: an L x L tensor was built"
        # the last sequence's states equal that sequence run alone (attention stayed inside it)
        n = lengths[-1]
        alone = model.transformer(ids[:, -n:]).last_hidden_state
        rel = (hidden[:, -n:].float() - alone.float()).norm() / alone.float().norm()
        assert rel < 2e-2, rel.item()


@torch.no_grad()
def test_logits_to_keep_and_tuple_output():
    model = tiny_model()
    ids = torch.randint(0, 2048, (2, 9))
    full = model(ids).logits
    assert torch.allclose(model(ids, logits_to_keep=1).logits, full[:, -1:], atol=1e-5)
    assert torch.allclose(model(ids, logits_to_keep=torch.tensor([0, 4])).logits, full[:, [0, 4]], atol=1e-5)
    out = model(ids, return_dict=False, use_cache=False)
    assert isinstance(out, tuple) and torch.equal(out[0], full)


def test_bad_forward_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="attention_mask covers"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="Cache"):
        model(torch.ones(1, 4, dtype=torch.long), past_key_values=((None, None),))


def test_peft_wraps_the_model_without_transformers_deprecation_warning():
    """PEFT reads model.is_gradient_checkpointing whenever it wraps a model (every adapter load, every training
    run); transformers deprecated the name with a FutureWarning that eval, chat, merge and serve printed. The model
    answers it (the same value as is_activation_checkpointing) without the warning."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from _helpers import tiny_model

    model = tiny_model(seed=0)
    assert model.is_gradient_checkpointing is False
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"]))
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]
    model.transformer.gradient_checkpointing = True
    assert model.is_gradient_checkpointing is True


@pytest.mark.cuda
def test_cuda_frozen_head_loss_kernel_equals_cross_entropy(monkeypatch):
    # the loss chunk's Triton kernel (nll_grad.py) at Qwen's vocabulary, bf16 under autocast: loss and the hidden
    # states' gradient against plain fp32 cross-entropy over the same bf16 logits
    from finetune.modeling import nll_grad

    calls = []
    real = nll_grad.nll_and_grad_
    monkeypatch.setattr(nll_grad, "nll_and_grad_", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    head = torch.nn.Linear(512, 152064, bias=False).cuda().requires_grad_(False)
    hidden = torch.randn(2, 300, 512, device="cuda").requires_grad_(True)
    labels = torch.randint(0, 152064, (2, 300), device="cuda")
    labels[torch.rand(labels.shape, device="cuda") < 0.3] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = chunked_causal_lm_loss(head, hidden, labels, chunk_tokens=256)
        loss.backward()
        fused = hidden.grad.clone()
        hidden.grad = None
        logits = head(hidden)
    trained = int((labels[:, 1:] != -100).sum())  # only trained positions go through lm_head (select=True)
    assert len(calls) == -(-trained // 256)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 152064).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5)
    err = (fused - hidden.grad).abs().max() / hidden.grad.abs().max()
    assert err < 2e-2, err


def test_qwen_lm_finds_the_model_through_its_wrappers():
    from peft import LoraConfig, get_peft_model

    from finetune.modeling.model import qwen_lm

    model = tiny_model(seed=3)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"]))

    class Engine(torch.nn.Module):  # DeepSpeed's engine and DDP hold the model as `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert qwen_lm(model) is model and qwen_lm(peft) is model and qwen_lm(Engine(peft)) is model
    assert qwen_lm(torch.nn.Linear(2, 2)) is None and qwen_lm(Engine(torch.nn.Linear(2, 2))) is None
    assert qwen_lm(model.transformer) is None  # the body alone is not the LM


def test_only_training_forwards_compile_the_elementwise_pieces():
    """torch.compile of RMSNorm/rotary/SwiGLU costs ~15 s the first time (NOTES step 58): training repays it, a
    prefill or an evaluation (no gradients) does not, so those stay eager however long the input."""
    from finetune.modeling import kernels
    from finetune.settings import override

    class Big:  # what compile_pays reads of a CUDA tensor
        is_cuda = True

        def __init__(self, n):
            self.n = n

        def numel(self):
            return self.n

    big, small = Big(kernels.COMPILE_MIN_NUMEL), Big(kernels.COMPILE_MIN_NUMEL - 1)
    with override(compile=True):
        with torch.enable_grad():
            assert kernels.compile_pays(big)
            assert not kernels.compile_pays(small)
        with torch.no_grad():
            assert not kernels.compile_pays(big)
        with torch.inference_mode():
            assert not kernels.compile_pays(big)
    with override(compile=False), torch.enable_grad():
        assert not kernels.compile_pays(big)
    with override(compile=True), torch.enable_grad():
        assert not kernels.compile_pays(torch.zeros(kernels.COMPILE_MIN_NUMEL))  # a CPU tensor


def test_output_hidden_states_as_the_official():
    # modeling_qwen.QWenModel.forward: each block's input, then ln_f's output (num_hidden_layers + 1 entries);
    # token_type_ids is accepted and unused; output_attentions is refused in one ValueError (SDPA has no weights)
    model = tiny_model().eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, token_type_ids=torch.zeros_like(ids))
        plain = model(ids)
    assert plain.hidden_states is None
    hs = out.hidden_states
    assert len(hs) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(hs[0], model.transformer.wte(ids))
    torch.testing.assert_close(hs[-1], model.transformer(ids).last_hidden_state)
    torch.testing.assert_close(model.lm_head(hs[-1]), out.logits)
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)
