"""The decode engine (finetune/inference/engine.py) on CPU in fp32: the same greedy tokens as generate(), for one row
and for batches of mixed prompt lengths, with and without adapters, beyond seq_length (NTK/logN); continuous
batching (rows leaving, joining, cancelled) never changes another row's tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

import finetune  # noqa: F401
from finetune.inference import Engine, Request, SamplingParams
from finetune.tokenization import SMALL_VOCAB, QWenTokenizer

from _helpers import tiny_model as tiny

GAP = 1e-4  # where generate()'s top-2 logits are closer than this, summation order may pick either token


@pytest.fixture(scope="module")
def tok():
    return QWenTokenizer(str(SMALL_VOCAB))


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1700, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, tok, batch, max_new, penalty=1.0):
    """generate()'s greedy new tokens for LEFT-padded rows (cut at the first stop), and each row's top-2 logit gaps."""
    L = max(len(p) for p in batch)
    ids = torch.zeros(len(batch), L, dtype=torch.long)
    mask = torch.zeros(len(batch), L, dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    stops = [tok.im_end_id, tok.im_start_id]
    gc = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=stops, pad_token_id=0,
                          repetition_penalty=penalty)
    out = model.generate(ids, attention_mask=mask, generation_config=gc, output_scores=True,
                         return_dict_in_generate=True)
    new = out.sequences[:, L:].tolist()
    top2 = torch.stack([s.float().topk(2, dim=-1).values for s in out.scores], 1)  # [B, steps, 2]
    gaps = (top2[..., 0] - top2[..., 1]).tolist()
    rows = []
    for row, g in zip(new, gaps):
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        rows.append((row[:cut], g))
    return rows


def assert_agree(ours, theirs):
    """Each row equal to generate()'s up to the first step whose top-2 gap is below GAP (after which the two
    may diverge legitimately); returns how many rows had such a step (kept small by the callers' seeds)."""
    cut_rows = 0
    for got, (ref, gaps) in zip(ours, theirs):
        n = next((i for i, g in enumerate(gaps) if g < GAP), None)
        if n is None:
            assert got == ref
        else:
            cut_rows += 1
            assert got[:n] == ref[:n]
    return cut_rows


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_batch_1_greedy_equals_generate(tok, penalty):
    model = tiny(seed=1)
    engine = Engine(model, tok, max_batch=1)
    for p in prompts([1, 9, 33], seed=2):
        ours = engine.generate([p], SamplingParams(max_new_tokens=24, repetition_penalty=penalty))
        assert assert_agree(ours, hf_greedy(model, tok, [p], 24, penalty)) == 0


def test_mixed_prompt_lengths_in_one_batch_equal_generate(tok):
    model = tiny(seed=3)
    batch = prompts([3, 40, 11, 25, 1], seed=4)
    engine = Engine(model, tok, max_batch=8)
    ours = engine.generate(batch, SamplingParams(max_new_tokens=20))
    cut = assert_agree(ours, hf_greedy(model, tok, batch, 20))
    assert cut <= 1, f"{cut} of 5 rows compared only up to a near-tie"
    # and each row as generate() computes it alone
    for p, o in zip(batch, ours):
        assert assert_agree([o], hf_greedy(model, tok, [p], 20)) == 0


def test_beyond_seq_length_with_dynamic_ntk_and_logn(tok):
    """seq_length 16: prompts of 10..40 tokens decode 24 more, so rows cross seq_length (logN) and have NTK
    alphas 1, 3 and 7 fixed at prefill; each row equals generate()'s, alone and in one batch."""
    model = tiny(seed=5, seq_length=16)
    assert model.config.use_dynamic_ntk and model.config.use_logn_attn
    batch = prompts([10, 20, 40], seed=6)
    engine = Engine(model, tok, max_batch=4)
    assert engine.max_len >= 64
    ours = engine.generate(batch, SamplingParams(max_new_tokens=24))
    for p, o in zip(batch, ours):
        assert assert_agree([o], hf_greedy(model, tok, [p], 24)) == 0
    # without NTK/logN the answers differ (the test would catch a path that ignored them)
    plain = tiny(seed=5, seq_length=16, use_dynamic_ntk=False, use_logn_attn=False)
    assert Engine(plain, tok, max_batch=4).generate(batch, SamplingParams(max_new_tokens=24)) != ours


def _peft(model, names, seed=0):
    from peft import LoraConfig, get_peft_model

    cfg = dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "w1", "w2"], init_lora_weights=False)
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(**cfg), adapter_name=names[0])
    for i, name in enumerate(names[1:]):
        torch.manual_seed(seed + 1 + i)
        pm.add_adapter(name, LoraConfig(**cfg))
    return pm.eval()


def test_adapter_rows_equal_generate_with_that_adapter(tok):
    pm = _peft(tiny(seed=7), ["default"])
    batch = prompts([6, 21, 13], seed=8)
    engine = Engine(pm, tok, max_batch=4)
    ours = engine.generate(batch, SamplingParams(max_new_tokens=16), adapter="default")
    assert assert_agree(ours, hf_greedy(pm, tok, batch, 16)) <= 1
    base = engine.generate(batch, SamplingParams(max_new_tokens=16), adapter=None)
    with pm.disable_adapter():
        assert assert_agree(base, hf_greedy(pm, tok, batch, 16)) <= 1
    assert base != ours  # the adapter changes the answers


def test_two_adapters_and_the_base_in_one_batch_each_give_their_own_answers(tok):
    pm = _peft(tiny(seed=9), ["first", "second"], seed=3)
    p = prompts([12], seed=10)[0]
    params = SamplingParams(max_new_tokens=16)
    alone = {name: Engine(pm, tok, max_batch=1).generate([p], params, adapter=name)[0] for name in ("first", "second", None)}
    assert len({tuple(v) for v in alone.values()}) == 3  # three different answers
    engine = Engine(pm, tok, max_batch=4)
    reqs = [engine.submit(p, params, adapter=name) for name in ("first", None, "second", "first")]
    while engine.has_work():
        engine.step()
    assert [r.output_ids for r in reqs] == [alone["first"], alone[None], alone["second"], alone["first"]]
    for name in ("first", "second"):
        pm.set_adapter(name)
        assert assert_agree([alone[name]], hf_greedy(pm, tok, [p], 16)) == 0


def test_adapters_loaded_or_deleted_after_the_engine_was_made(tok, monkeypatch):
    """An engine reads the model's adapters again when PEFT loaded or deleted one since: chat() keeps one engine per
    model, so on CUDA a model wrapped by PEFT after a chat, or a further adapter loaded and set, was refused as
    'unknown adapter'; and a request for a deleted adapter decoded as the base."""
    from peft import LoraConfig

    from finetune.inference import chat_decoder

    p = prompts([10], seed=30)[0]
    params = SamplingParams(max_new_tokens=12)
    pm = _peft(tiny(seed=31), ["first"])
    engine = Engine(pm, tok, max_batch=2)
    first = engine.generate([p], params, adapter="first")
    torch.manual_seed(5)
    pm.add_adapter("second", LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "w1"], init_lora_weights=False))
    pm.eval()
    second = engine.generate([p], params, adapter="second")
    assert second == Engine(pm, tok, max_batch=1).generate([p], params, adapter="second") != first
    assert engine.generate([p], params, adapter="first") == first
    pm.delete_adapter("second")
    with pytest.raises(ValueError, match="unknown adapter 'second'"):
        engine.submit(p, params, adapter="second")

    model = tiny(seed=32)
    kwargs = dict(do_sample=False, max_new_tokens=10)
    monkeypatch.setattr(chat_decoder, "_device_ok", lambda ids: True)  # the CUDA path: the engine answers
    model.chat(tok, "what is packing?", **kwargs)  # the plain model's engine made
    wrapped = _peft(model, ["default"])
    through_engine = wrapped.chat(tok, "what is packing?", **kwargs)[0]
    monkeypatch.setattr(chat_decoder, "_device_ok", lambda ids: False)
    assert through_engine == wrapped.chat(tok, "what is packing?", **kwargs)[0]


def test_a_batch_without_adapter_rows_computes_no_adapter(tok, monkeypatch):
    """Base rows of a model with adapters (eval's base column, a server's base requests) run the base alone: no
    adapter hook, and the base's answers."""
    from finetune.inference.row_adapters import RowAdapters

    pm = _peft(tiny(seed=7), ["default"])
    calls = []
    real = RowAdapters._pre_hook  # where a layer's adapter computation starts

    def counting(self):
        hook = real(self)
        return lambda *a: calls.append(1) or hook(*a)

    monkeypatch.setattr(RowAdapters, "_pre_hook", counting)
    batch = prompts([6, 21], seed=8)
    engine = Engine(pm, tok, max_batch=4)
    base = engine.generate(batch, SamplingParams(max_new_tokens=10), adapter=None)
    assert calls == []
    with pm.disable_adapter():
        assert assert_agree(base, hf_greedy(pm, tok, batch, 10)) <= 1
    engine.generate(batch, SamplingParams(max_new_tokens=10), adapter="default")
    assert calls  # rows with an adapter do run the hooks


def test_prompts_joining_together_are_prefilled_in_groups_and_answer_as_alone(tok, monkeypatch):
    """Requests that join in the same step share one prefill forward (right-padded, at most PREFILL_TOKENS
    positions a forward), shortest first so that a group pads little, each with its own NTK alpha, and every row
    answers as it does alone."""
    from finetune.inference import engine as engine_mod

    model = tiny(seed=3, seq_length=16)  # prompts past seq_length: per-row NTK alphas and logN differ
    batch = prompts([30, 5, 28, 6], seed=12)
    params = SamplingParams(max_new_tokens=12)
    alone = [Engine(model, tok, max_batch=1).generate([p], params)[0] for p in batch]
    # in arrival order the groups would be [30, 5] and [28, 6]: 2 x 30 + 2 x 28 positions; by length [5, 6] and
    # [28, 30]: 2 x 6 + 2 x 30 (three in one would be 3 x 28 > 64)
    monkeypatch.setattr(engine_mod, "PREFILL_TOKENS", 64)
    engine = Engine(model, tok, max_batch=4)
    groups = []
    real = engine._prefill
    monkeypatch.setattr(engine, "_prefill", lambda reqs, touched: groups.append(
        sorted(len(r.prompt_ids) for r in reqs)) or real(reqs, touched))
    assert engine.generate(batch, params) == alone
    assert groups == [[5, 6], [28, 30]]


def test_adapter_weights_changed_in_place_are_used_at_the_next_step(tok):
    """The engine computes each layer's adapters from stacked copies of their weights: a change to a LoRA weight
    (further training, loading new values) must reach the next forward, never a stale copy."""
    pm = _peft(tiny(seed=7), ["default"])
    batch = prompts([9], seed=4)
    engine = Engine(pm, tok, max_batch=2)
    params = SamplingParams(max_new_tokens=12)
    base = engine.generate(batch, params, adapter=None)
    tuned = engine.generate(batch, params, adapter="default")
    assert tuned != base
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.zero_()  # the adapter now adds nothing
    assert engine.generate(batch, params, adapter="default") == base


def test_finished_rows_never_change_and_a_row_joining_mid_batch_gets_its_solo_tokens(tok):
    model = tiny(seed=11)
    a, b, c = prompts([7, 30, 4], seed=12)
    solo = {i: Engine(model, tok, max_batch=1).generate([p], SamplingParams(max_new_tokens=n))[0]
            for i, (p, n) in enumerate([(a, 5), (b, 20), (c, 12)])}
    engine = Engine(model, tok, max_batch=4)
    ra = engine.submit(a, SamplingParams(max_new_tokens=5))
    rb = engine.submit(b, SamplingParams(max_new_tokens=20))
    frozen = None
    rc = None
    steps = 0
    while engine.has_work():
        got = engine.step()
        steps += 1
        if ra.finished:
            if frozen is None:  # the step it finished in reports it ...
                frozen = list(ra.output_ids)
                assert ra in got and ra.finish_reason == "length"
            else:  # ... and no later step touches it
                assert ra not in got
            assert ra.output_ids == frozen
        if steps == 3:
            rc = engine.submit(c, SamplingParams(max_new_tokens=12))  # joins a running batch
    assert [ra.output_ids, rb.output_ids, rc.output_ids] == [solo[0], solo[1], solo[2]]
    assert all(r.finish_reason == "length" for r in (ra, rb, rc))


def test_cancel_frees_the_row_and_leaves_the_others_unchanged(tok):
    model = tiny(seed=13)
    a, b = prompts([8, 15], seed=14)
    solo_b = Engine(model, tok, max_batch=1).generate([b], SamplingParams(max_new_tokens=10))[0]
    engine = Engine(model, tok, max_batch=2)
    ra, rb = engine.submit(a, SamplingParams(max_new_tokens=10)), engine.submit(b, SamplingParams(max_new_tokens=10))
    engine.step()
    engine.step()
    ra.cancel()
    kept = list(ra.output_ids)
    got = engine.step()
    assert ra in got and ra.finished and ra.finish_reason == "cancelled" and ra.output_ids == kept
    assert len(engine._rows) == 1
    waiting = engine.submit(a, SamplingParams(max_new_tokens=10))
    waiting.cancel()  # cancelled before it joined: never prefilled
    while engine.has_work():
        engine.step()
    assert waiting.finish_reason == "cancelled" and waiting.output_ids == []
    assert rb.output_ids == solo_b and rb.finish_reason == "length"


def test_a_cancel_for_a_stop_found_by_the_caller_ends_the_request_as_a_stop(tok):
    model = tiny(seed=13)
    a, b = prompts([8, 15], seed=14)
    engine = Engine(model, tok, max_batch=2)
    ra, rb = engine.submit(a, SamplingParams(max_new_tokens=10)), engine.submit(b, SamplingParams(max_new_tokens=10))
    engine.step()
    engine.step()
    ra.cancel("stop")  # (the server's stop strings)
    ra.cancel()  # a later cancel (the client leaving after the stop) keeps the first reason
    assert ra in engine.step() and ra.finished and ra.finish_reason == "stop"
    waiting = engine.submit(a, SamplingParams(max_new_tokens=10))
    waiting.cancel("stop")
    while engine.has_work():
        engine.step()
    assert waiting.finish_reason == "stop" and waiting.output_ids == []
    with pytest.raises(ValueError, match="reason must be 'cancelled' or 'stop'"):
        rb.cancel("length")


def test_stop_tokens_end_the_row_and_are_not_in_the_output(tok):
    model = tiny(seed=15)
    p = prompts([9], seed=16)[0]
    free = Engine(model, tok, max_batch=1).generate([p], SamplingParams(max_new_tokens=12))[0]
    stop = free[4]
    first = free.index(stop)
    engine = Engine(model, tok, max_batch=1)
    req = engine.submit(p, SamplingParams(max_new_tokens=12, stop_token_ids=(stop,)))
    while engine.has_work():
        engine.step()
    assert req.output_ids == free[:first] and req.finish_reason == "stop"
    # min_new_tokens holds the stop back
    held = Engine(model, tok, max_batch=1).generate([p], SamplingParams(max_new_tokens=12, min_new_tokens=first + 2,
                                                                        stop_token_ids=(stop,)))[0]
    assert stop not in held[:first + 2] and len(held) >= first + 2


def test_a_stop_string_ends_the_row_at_the_token_that_completes_it(tok):
    # a random row's text; its stop string taken across a token boundary, so no single token holds it
    model = tiny(seed=15)
    p, other = prompts([9, 14], seed=16)
    free = Engine(model, tok, max_batch=2).generate([p], SamplingParams(max_new_tokens=16))[0]
    texts = [tok.decode(free[:i]) for i in range(len(free) + 1)]
    k = next(i for i in range(2, len(free)) if len(tok.decode(free[i - 1:i])) >= 1 and "\ufffd" not in texts[i]
             and len(texts[i]) > len(texts[i - 1]) and "\ufffd" not in texts[i - 1] and len(texts[i - 1]) >= 1)
    stop = texts[k][len(texts[k - 1]) - 1:]  # the last character of token k-1's text + token k's text
    assert stop not in texts[k - 1]
    first = next(i for i in range(len(free) + 1) if stop in texts[i])
    engine = Engine(model, tok, max_batch=2)
    req = engine.submit(p, SamplingParams(max_new_tokens=16, stop=(stop, "never here \u2603")))
    keep = engine.submit(other, SamplingParams(max_new_tokens=16))
    while engine.has_work():
        engine.step()
    assert req.output_ids == free[:first] and req.finish_reason == "stop" and req.stop_string == stop
    # the other row runs on as alone; a stop string never met changes nothing
    assert keep.output_ids == Engine(model, tok, max_batch=1).generate([other], SamplingParams(max_new_tokens=16))[0]
    assert Engine(model, tok, max_batch=1).generate([p], SamplingParams(max_new_tokens=16, stop="\u2603"))[0] == free
    # min_new_tokens holds a stop string back as it holds stop tokens
    held = Engine(model, tok, max_batch=1).generate([p], SamplingParams(max_new_tokens=16, min_new_tokens=first + 1,
                                                                        stop=(stop,)))[0]
    assert held[:first + 1] == free[:first + 1] and len(held) > first
    with pytest.raises(ValueError, match="stop must be non-empty strings"):
        SamplingParams(stop=("",))
    with pytest.raises(ValueError, match="params: 1 given for 2 prompts"):
        engine.generate([p, other], [SamplingParams()])


def test_stop_strings_wait_for_a_split_character():
    from finetune.inference.stop_strings import StopStrings

    t = QWenTokenizer(str(SMALL_VOCAB))
    ids = t.encode("a\u2603b")
    assert len(ids) == 5  # the snowman's three bytes are three tokens
    s = StopStrings(t, ["\u2603b"])
    hits = [s.add(i) for i in ids]
    assert hits[:-1] == [None] * (len(ids) - 1) and hits[-1] == "\u2603b"


def test_sampling_is_seeded_and_top_k_1_is_greedy(tok):
    model = tiny(seed=17)
    batch = prompts([5, 11], seed=18)
    engine = Engine(model, tok, max_batch=2)
    greedy = engine.generate(batch, SamplingParams(max_new_tokens=12))
    assert engine.generate(batch, SamplingParams(max_new_tokens=12, do_sample=True, top_k=1, seed=1)) == greedy
    nucleus = SamplingParams(max_new_tokens=12, do_sample=True, top_p=0.9, temperature=1.5, seed=7)
    one = engine.generate(batch, nucleus)
    assert engine.generate(batch, nucleus) == one and one != greedy


def test_sampling_params_from_generation_config_and_bad_input(tok):
    gc = GenerationConfig(max_new_tokens=7, do_sample=True, top_p=0.8, top_k=0, repetition_penalty=1.1,
                          eos_token_id=[5, 6], typical_p=0.9)
    p = SamplingParams.from_generation_config(gc, seed=3)
    assert (p.max_new_tokens, p.do_sample, p.top_p, p.repetition_penalty, p.stop_token_ids, p.seed, p.typical_p) == \
        (7, True, 0.8, 1.1, (5, 6), 3, 0.9)
    with pytest.raises(ValueError, match=r"typical_p must be a number in \(0, 1\] \(1: off\), got 0"):
        SamplingParams(typical_p=0)
    with pytest.raises(ValueError, match="num_beams"):
        SamplingParams.from_generation_config(GenerationConfig(num_beams=2))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="eval mode"):
        Engine(tiny(seed=0).train(), tok)
    with pytest.raises(TypeError, match="QWenLMHeadModel"):
        Engine(torch.nn.Linear(2, 2), tok)
    engine = Engine(tiny(seed=0), tok, max_batch=2, max_len=40)
    with pytest.raises(ValueError, match="max_len 40"):
        engine.submit([1] * 30, SamplingParams(max_new_tokens=11))
    with pytest.raises(ValueError, match="unknown adapter 'x'"):
        engine.submit([1, 2], adapter="x")
    with pytest.raises(ValueError, match="empty"):
        engine.submit([])
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit([10**7])
    assert not engine.has_work()


def test_generate_runs_more_prompts_than_max_batch_in_input_order(tok):
    model = tiny(seed=19)
    batch = prompts([4, 12, 7, 2, 9], seed=20)
    solo = Engine(model, tok, max_batch=8).generate(batch, SamplingParams(max_new_tokens=6))
    assert Engine(model, tok, max_batch=2).generate(batch, SamplingParams(max_new_tokens=6), progress=True) == solo
    assert isinstance(Engine(model, tok).submit(batch[0]), Request)


def _memory_held_to(engine, budget):
    """The engine's device memory as ``budget`` bytes in all (what ``_spare_bytes`` reads on CUDA): the cache it
    holds counts against it. Records every cache layout made."""
    layouts = []
    real = engine._make_cache

    def make(slots, capacity, fresh=False):
        real(slots, capacity, fresh)
        layouts.append((engine._slots, engine._capacity, fresh))
        assert engine._cache_bytes(engine._slots, engine._capacity) <= budget  # never more than the device holds

    engine._make_cache = make
    engine._spare_bytes = lambda prefill: budget - (engine._cache_bytes(engine._slots, engine._capacity)
                                                    if engine._cache is not None else 0)
    return layouts


def test_rows_whose_cache_does_not_fit_wait_for_others_to_finish_and_answer_as_alone(tok):
    """Memory for two rows' cache: of six requests two join at a time (the others wait in the queue, in order),
    every row gets the tokens it gets alone, and the cache never outgrows the memory."""
    model = tiny(seed=19)
    batch = prompts([4, 12, 7, 2, 9, 30], seed=20)
    params = SamplingParams(max_new_tokens=6)
    solo = [Engine(model, tok, max_batch=1).generate([p], params)[0] for p in batch]
    engine = Engine(model, tok, max_batch=8)
    layouts = _memory_held_to(engine, engine._cache_bytes(2, engine._capacity_for(36)))
    reqs = [engine.submit(p, params) for p in batch]
    most = 0
    while engine.has_work():
        engine.step()
        most = max(most, len(engine._rows))
        assert engine._pending == type(engine._pending)(r for r in reqs if not r.finished and
                                                        all(row.req is not r for row in engine._rows))
    assert most == 2 and [r.output_ids for r in reqs] == solo
    assert layouts and max(slots for slots, _, _ in layouts) == 2


def test_a_long_request_waits_for_the_batch_to_empty_and_gets_a_cache_of_its_own(tok):
    """A request whose positions do not fit beside the running rows (nor with the cache's slots) waits, without
    being passed by the shorter one behind it; once the batch is empty the cache is made anew for the two, at the
    long one's length. Every row answers as alone."""
    model = tiny(seed=21)
    short, long_, after = prompts([5, 300, 6], seed=22)
    params = SamplingParams(max_new_tokens=8)
    solo = [Engine(model, tok, max_batch=1).generate([p], params)[0] for p in (short, long_, after)]
    engine = Engine(model, tok, max_batch=4)
    # four short rows' cache (256 positions each), or two rows of 512 positions
    assert engine._cache_bytes(4, 256) >= engine._cache_bytes(2, 512)
    layouts = _memory_held_to(engine, engine._cache_bytes(4, 256))
    first = [engine.submit(short, params) for _ in range(4)]
    engine.step()
    assert len(engine._rows) == 4 and layouts[-1][:2] == (4, 256)
    rl, ra = engine.submit(long_, params), engine.submit(after, params)
    while not all(r.finished for r in first):
        engine.step()
        assert rl not in [row.req for row in engine._rows] and ra not in [row.req for row in engine._rows]
    while engine.has_work():
        engine.step()
    assert (2, 512, True) in layouts  # made anew for the long row, then the short one beside it
    assert [first[0].output_ids, rl.output_ids, ra.output_ids] == solo
    assert all(r.output_ids == solo[0] for r in first)


def test_the_memory_plan_keeps_back_what_the_adapters_copies_will_take(tok, monkeypatch):
    """On CUDA the cache may take the device's free memory less what is kept back; with adapters loaded that
    includes the x A operands their first decode steps make (their stacks are made before memory is read, so the
    device's free memory already counts those). Here the device's memory reading is faked on the CPU."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 40, 1 << 41))
    spare = {}
    for name, model in (("plain", tiny(seed=25)), ("adapters", _peft(tiny(seed=25), ["first", "second"]))):
        engine = Engine(model, tok, max_batch=4)
        engine.device = torch.device("cuda")  # (only _spare_bytes reads it here)
        spare[name] = engine._spare_bytes(100)
    layers = engine.adapters.layers
    assert len(engine.adapters._stacks) == len(layers)
    a_bytes = sum(layer.lora_A[n].weight.numel() * 4 for layer in layers for n in ("first", "second"))
    assert spare["plain"] - spare["adapters"] == a_bytes


def test_a_request_too_large_for_the_memory_alone_still_runs(tok):
    """With no room for even one row the queue's first request joins alone (on a GPU it fails with the device's
    own out-of-memory error, which the commands turn into one line); the queue behind it is not stuck."""
    model = tiny(seed=23)
    batch = prompts([5, 9], seed=24)
    params = SamplingParams(max_new_tokens=4)
    solo = [Engine(model, tok, max_batch=1).generate([p], params)[0] for p in batch]
    engine = Engine(model, tok, max_batch=4)
    engine._spare_bytes = lambda prefill: -1
    reqs = [engine.submit(p, params) for p in batch]
    engine.step()
    assert [row.req for row in engine._rows] == reqs[:1]
    while engine.has_work():
        engine.step()
    assert [r.output_ids for r in reqs] == solo


def test_chat_and_chat_stream_through_the_engine_answer_as_generate(tok, monkeypatch, switches):
    """chat()/chat_stream() reach the engine through the registration hook (forced on the CPU here; it is the
    CUDA path): the same answers as generate(), with the active adapter, and the base inside disable_adapter();
    a stream the caller stops early frees its row."""
    from finetune.inference import chat_decoder

    pm = _peft(tiny(seed=21), ["default"])
    kwargs = dict(do_sample=False, max_new_tokens=12)
    with_adapter, _ = pm.chat(tok, "what is packing?", **kwargs)
    with pm.disable_adapter():
        base, _ = pm.chat(tok, "what is packing?", **kwargs)
    streamed_ref = list(pm.chat_stream(tok, "what is packing?", **kwargs))
    inner = pm.get_base_model()  # peft_model.chat() runs chat() on the wrapped model (PEFT's forwarding)
    assert inner not in chat_decoder._ENGINES  # CPU: generate()
    monkeypatch.setattr(chat_decoder, "_device_ok", lambda ids: True)
    assert pm.chat(tok, "what is packing?", **kwargs)[0] == with_adapter
    assert inner in chat_decoder._ENGINES  # the engine answered
    with pm.disable_adapter():
        assert pm.chat(tok, "what is packing?", **kwargs)[0] == base
    assert list(pm.chat_stream(tok, "what is packing?", **kwargs)) == streamed_ref
    stream = pm.chat_stream(tok, "what is packing?", **kwargs)
    next(stream)
    stream.close()  # the caller stops reading
    assert not chat_decoder._ENGINES[inner].has_work()
    switches(static_decode=False)
    assert chat_decoder.chat_tokens(pm, tok, torch.tensor([[1, 2]]), GenerationConfig(max_new_tokens=2)) is None


def test_the_chat_engine_does_not_keep_its_model_alive(tok, monkeypatch):
    import gc
    import weakref

    from finetune.inference import chat_decoder

    monkeypatch.setattr(chat_decoder, "_device_ok", lambda ids: True)
    model = tiny(seed=23)
    model.chat(tok, "hi", do_sample=False, max_new_tokens=3)
    assert model in chat_decoder._ENGINES
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_stop_ids_and_min_new_tokens_as_generate_applies_them(tok):
    """A request's stop ids end it where generate() with those eos ids ends (the stop token itself is not in the
    output: generate() returns it), and min_new_tokens holds the stops back exactly as generate()'s
    MinNewTokensLengthLogitsProcessor does."""
    model = tiny(seed=25)
    p = prompts([9], seed=26)[0]
    ids = torch.tensor([p])

    def hf(**kw):
        gc = GenerationConfig(do_sample=False, max_new_tokens=30, pad_token_id=0, **kw)
        return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)[0, len(p):].tolist()

    free = hf(eos_token_id=None)
    stop = free[5]
    first = free.index(stop)
    engine = Engine(model, tok, max_batch=1)
    stopped = engine.generate([p], SamplingParams(max_new_tokens=30, stop_token_ids=(stop,)))[0]
    assert stopped + [stop] == hf(eos_token_id=[stop]) == free[:first + 1]
    held = SamplingParams(max_new_tokens=30, min_new_tokens=first + 3, stop_token_ids=(stop,))
    got = engine.generate([p], held)[0]
    ref = hf(eos_token_id=[stop], min_new_tokens=first + 3)
    assert stop not in got[:first + 3]
    assert got == (ref[:-1] if ref[-1] == stop else ref)


class _OutputPenalties:
    """OpenAI's presence and frequency penalties as a transformers logits processor, written from OpenAI's formula
    (score - count * frequency - (count > 0) * presence, counting the generated tokens only): the reference."""

    def __init__(self, prompt_len, presence, frequency):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        out = scores.clone()
        for row, ids in enumerate(input_ids[:, self.prompt_len:].tolist()):
            for t in set(ids):
                out[row, t] -= ids.count(t) * self.frequency + self.presence
        return out


def test_presence_and_frequency_penalties_as_openai_defines_them(tok):
    """Greedy fp32: rows with presence and frequency penalties (beside a plain row, one joining mid-batch, one with a
    repetition penalty too) give generate()'s tokens under the reference processor; the penalties change them."""
    from transformers import LogitsProcessorList

    model = tiny(seed=27)
    ps = prompts([7, 21, 12], seed=28)
    kinds = [dict(presence_penalty=1.5), dict(frequency_penalty=0.7, repetition_penalty=1.2),
             dict(presence_penalty=-0.5, frequency_penalty=2.0)]

    def hf(p, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0):
        ids = torch.tensor([p])
        gc = GenerationConfig(do_sample=False, max_new_tokens=24, pad_token_id=0, repetition_penalty=repetition_penalty,
                              eos_token_id=[tok.im_end_id, tok.im_start_id], output_scores=True,
                              return_dict_in_generate=True)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc, logits_processor=
                             LogitsProcessorList([_OutputPenalties(len(p), presence_penalty, frequency_penalty)]))
        new = out.sequences[0, len(p):].tolist()
        cut = next((i for i, t in enumerate(new) if t in (tok.im_end_id, tok.im_start_id)), len(new))
        top2 = torch.stack([s.float().topk(2, dim=-1).values[0] for s in out.scores])
        return new[:cut], (top2[:, 0] - top2[:, 1]).tolist()

    refs = [hf(p, **kw) for p, kw in zip(ps, kinds)]
    engine = Engine(model, tok, max_batch=4)
    reqs = [engine.submit(ps[0], SamplingParams(max_new_tokens=24, **kinds[0])),
            engine.submit(ps[1], SamplingParams(max_new_tokens=24, **kinds[1])),
            engine.submit(ps[2], SamplingParams(max_new_tokens=10))]
    for _ in range(3):
        engine.step()
    reqs.append(engine.submit(ps[2], SamplingParams(max_new_tokens=24, **kinds[2])))
    while engine.has_work():
        engine.step()
    assert assert_agree([reqs[0].output_ids, reqs[1].output_ids, reqs[3].output_ids], refs) == 0
    assert reqs[2].output_ids == hf(ps[2])[0][:10]
    assert [r[0] for r in refs] != [hf(p)[0] for p in ps]


def test_logit_bias_is_added_to_the_logits_as_generate_s_sequence_bias(tok):
    """Greedy fp32: rows with a logit bias (one banning the plain reply's tokens, one favouring a token, beside a
    plain row) give generate()'s tokens with the same biases as its sequence_bias; -100 bans, +100 forces."""
    model = tiny(seed=29)
    ps = prompts([9, 16, 5], seed=30)
    engine = Engine(model, tok, max_batch=4)
    plain = engine.generate(ps, SamplingParams(max_new_tokens=12))
    biases = [{t: -100 for t in plain[0][:3]}, {plain[1][4]: 5.0, 77: -2.5}, {1234: 100}]

    def hf(p, bias):
        ids = torch.tensor([p])
        gc = GenerationConfig(do_sample=False, max_new_tokens=12, pad_token_id=0,
                              eos_token_id=[tok.im_end_id, tok.im_start_id],
                              sequence_bias={(t,): float(b) for t, b in bias.items()} or None)
        new = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)[0, len(p):].tolist()
        return new[:next((i for i, t in enumerate(new) if t in (tok.im_end_id, tok.im_start_id)), len(new))]

    reqs = [engine.submit(p, SamplingParams(max_new_tokens=12, logit_bias=b)) for p, b in zip(ps, biases)]
    reqs.append(engine.submit(ps[0], SamplingParams(max_new_tokens=12)))
    while engine.has_work():
        engine.step()
    got = [r.output_ids for r in reqs]
    assert got[:3] == [hf(p, b) for p, b in zip(ps, biases)] and got[3] == plain[0]
    assert not set(plain[0][:3]) & set(got[0]) and got[2] == [1234] * 12
    with pytest.raises(ValueError, match=r"logit_bias: token id 4096 is outside the model's vocabulary \[0, 2048\)"):
        engine.submit(ps[0], SamplingParams(logit_bias={4096: 1}))


def test_prompt_logprobs_equal_the_model_s_forward_with_each_adapter_and_past_seq_length(tok):
    """prompt_logprobs (lm-eval's log-likelihoods through the server's echo): each prompt token's log-probability
    given the tokens before it, its top k and its rank, equal the log_softmax of the model's own forward (fp32), for
    the base and an adapter in one batch, and for a prompt past seq_length (NTK and logN); the generated tokens are
    those of a request without them."""
    pm = _peft(tiny(seed=7, seq_length=16), ["first", "second"], seed=4)
    ps = prompts([9, 30], seed=31)

    def reference(p, adapter):
        ids = torch.tensor([p])
        if adapter is None:
            with pm.disable_adapter():
                logits = pm(ids).logits[0]
        else:
            pm.set_adapter(adapter)
            logits = pm(ids).logits[0]
        lp = torch.log_softmax(logits.float(), -1)[:-1]
        return lp.gather(1, ids[0, 1:, None])[:, 0], lp.topk(3, -1), lp

    engine = Engine(pm, tok, max_batch=4)
    jobs = [(ps[0], None), (ps[0], "second"), (ps[1], "first")]
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=5, prompt_logprobs=3), adapter=a) for p, a in jobs]
    plain = [engine.submit(p, SamplingParams(max_new_tokens=5), adapter=a) for p, a in jobs]
    while engine.has_work():
        engine.step()
    for r, q, (p, a) in zip(reqs, plain, jobs):
        chosen, top, lp = reference(p, a)
        assert len(r.prompt_logprobs) == len(p) - 1 and r.output_ids == q.output_ids and q.prompt_logprobs is None
        got = torch.tensor([lp for lp, _, _ in r.prompt_logprobs])
        torch.testing.assert_close(got, chosen, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor([[v for _, v in t] for _, t, _ in r.prompt_logprobs]), top.values,
                                   atol=1e-4, rtol=0)
        assert [[i for i, _ in t] for _, t, _ in r.prompt_logprobs] == top.indices.tolist()
        # the rank: 1 + the tokens more likely (where no other token is within 1e-4 of it: the random tiny model's
        # logits are nearly flat, and the two forwards differ in the last bits)
        ranks, clear = (lp > chosen[:, None]).sum(-1) + 1, ((lp - chosen[:, None]).abs() < 1e-4).sum(-1) == 1
        got_ranks = torch.tensor([rank for _, _, rank in r.prompt_logprobs])
        assert clear.sum() >= len(p) // 2 and torch.equal(got_ranks[clear], ranks[clear]), (got_ranks, ranks, clear)
    assert reqs[0].prompt_logprobs != reqs[1].prompt_logprobs  # (the adapter counts)
    with pytest.raises(ValueError, match=r"prompt_logprobs must be None or an integer in \[0, 20\], got 21"):
        SamplingParams(prompt_logprobs=21)


def test_ignore_eos_runs_past_im_end_to_max_new_tokens_and_stop_ids_still_end_it(tok):
    """vLLM's ignore_eos (benchmark clients' fixed-length replies): a row that picks <|im_end|> every step (biased
    +100) ends at once without it, runs to max_new_tokens with it (<|im_end|> part of the output, "length"), and a
    stop id the request gives still ends it; the rows beside it are unchanged."""
    model = tiny(seed=29)
    ps = prompts([9, 16], seed=30)
    forced = {tok.im_end_id: 100}
    engine = Engine(model, tok, max_batch=4)
    plain = engine.generate([ps[1]], SamplingParams(max_new_tokens=8))[0]
    assert len(plain) == 8  # (no stop in it: the same tokens with ignore_eos)
    reqs = [engine.submit(ps[0], SamplingParams(max_new_tokens=8, logit_bias=forced)),
            engine.submit(ps[0], SamplingParams(max_new_tokens=8, logit_bias=forced, ignore_eos=True)),
            engine.submit(ps[0], SamplingParams(max_new_tokens=8, logit_bias=forced, ignore_eos=True,
                                                stop_token_ids=(tok.im_end_id,))),
            engine.submit(ps[1], SamplingParams(max_new_tokens=8, ignore_eos=True))]
    while engine.has_work():
        engine.step()
    assert [(r.output_ids, r.finish_reason) for r in reqs] == [
        ([], "stop"), ([tok.im_end_id] * 8, "length"), ([], "stop"), (plain, "length")]
    with pytest.raises(ValueError, match="ignore_eos cannot be combined with regex"):
        SamplingParams(regex="a+", ignore_eos=True)
    with pytest.raises(ValueError, match="ignore_eos must be True or False, got 1"):
        SamplingParams(ignore_eos=1)


@pytest.mark.parametrize("bias", [{5: 101}, {-1: 1}, {"5": 1}, {5: float("nan")}, [5]])
def test_logit_bias_maps_token_ids_to_numbers_in_openai_s_range(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)


def test_logprobs_are_the_raw_logits_log_softmax_of_each_output_token(tok):
    """Greedy fp32: a row's Request.logprobs hold, for every output token, its log-probability and the k most likely
    tokens' under the model's raw logits (generate()'s output_logits), for the prefill's first token and every
    decode step, beside a row without them and one joining later; a repetition penalty changes the pick, not them."""
    model = tiny(seed=31)
    ps = prompts([6, 14], seed=32)

    def hf(p, penalty=1.0):
        ids = torch.tensor([p])
        gc = GenerationConfig(do_sample=False, max_new_tokens=10, pad_token_id=0, repetition_penalty=penalty,
                              eos_token_id=[tok.im_end_id, tok.im_start_id], output_logits=True,
                              return_dict_in_generate=True)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        return out.sequences[0, len(p):].tolist(), [torch.log_softmax(x[0].float(), -1) for x in out.logits]

    engine = Engine(model, tok, max_batch=4)
    reqs = [engine.submit(ps[0], SamplingParams(max_new_tokens=10, logprobs=3)),
            engine.submit(ps[1], SamplingParams(max_new_tokens=10))]
    engine.step()
    engine.step()
    reqs.append(engine.submit(ps[1], SamplingParams(max_new_tokens=10, logprobs=0, repetition_penalty=1.3)))
    while engine.has_work():
        engine.step()
    assert reqs[1].logprobs is None
    for req, (tokens, lps), k in ((reqs[0], hf(ps[0]), 3), (reqs[2], hf(ps[1], 1.3), 0)):
        assert req.output_ids == tokens[:len(req.output_ids)] and len(req.logprobs) == len(req.output_ids) > 5
        for t, (chosen, top), lp in zip(req.output_ids, req.logprobs, lps):
            assert abs(chosen - lp[t].item()) < 1e-4 and len(top) == k
            values, ids = lp.topk(k) if k else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
            assert [i for i, _ in top] == ids.tolist()
            assert all(abs(v - w) < 1e-4 for (_, v), w in zip(top, values.tolist()))


@pytest.mark.parametrize("value", [21, -1, 1.5, True])
def test_logprobs_asks_for_0_to_20_alternatives(value):
    with pytest.raises(ValueError, match=r"logprobs must be None or an integer in \[0, 20\]"):
        SamplingParams(logprobs=value)


@pytest.mark.parametrize("value", [2.5, -3, float("nan"), "1", True])
def test_presence_and_frequency_penalties_are_numbers_in_openai_s_range(value):
    for name in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(ValueError, match=rf"{name} must be a number in \[-2, 2\]"):
            SamplingParams(**{name: value})


def test_warm_up_leaves_an_idle_engine_that_answers_as_a_fresh_one(tok):
    """warm_up runs every batch bucket, a sampled row and each adapter through the engine, then leaves it idle:
    what comes after is what a fresh engine gives (greedy, mixed lengths, and a seeded sample)."""
    model = tiny(seed=5)
    batch = prompts([7, 30, 2], seed=6)
    sampled = SamplingParams(max_new_tokens=12, do_sample=True, top_p=0.8, seed=3)
    fresh = Engine(model, tok, max_batch=6)
    want = fresh.generate(batch, SamplingParams(max_new_tokens=12)), fresh.generate(batch[:1], sampled)
    warmed = Engine(model, tok, max_batch=6)
    seconds = warmed.warm_up()
    assert seconds > 0 and not warmed.has_work()
    assert (warmed.generate(batch, SamplingParams(max_new_tokens=12)), warmed.generate(batch[:1], sampled)) == want
    with pytest.raises(RuntimeError, match="idle"):
        warmed.submit(batch[0], SamplingParams(max_new_tokens=2))
        warmed.warm_up()


def test_warm_up_fits_a_tiny_max_len(tok):
    engine = Engine(tiny(seed=5), tok, max_batch=2, max_len=3)
    engine.warm_up()
    assert not engine.has_work()


def alone_under(pm, tok, ps, names, n):
    """generate()'s greedy tokens of each prompt alone, under its adapter (None: the base, adapters disabled)."""
    refs = []
    for p, name in zip(ps, names):
        if name is None:
            with pm.disable_adapter():
                refs.append(hf_greedy(pm, tok, [p], n))
        else:
            pm.set_adapter(name)
            refs.append(hf_greedy(pm, tok, [p], n))
    return refs


def _with_modules_to_save(model, names, saved, seed=0, modules=("wte", "lm_head")):
    """A PeftModel whose adapters in ``saved`` also carry their own trained copies of ``modules`` (modules_to_save;
    by default wte and lm_head, as the official finetune.py's LoRA mode saves them), the others plain LoRA."""
    from peft import LoraConfig, get_peft_model

    pm = None
    for i, name in enumerate(names):
        cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "w1", "w2"], init_lora_weights=False,
                         modules_to_save=list(modules) if name in saved else None)
        torch.manual_seed(seed + i)
        if pm is None:
            pm = get_peft_model(model, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return pm.eval()


def test_modules_to_save_reach_only_their_adapters_rows(tok):
    # the engine ran the active adapter's own wte and lm_head for every row: base rows and rows of another adapter
    # got them too
    pm = _with_modules_to_save(tiny(seed=11), ["saved", "plain"], saved={"saved"}, seed=4)
    p = prompts([14], seed=12)[0]
    params = SamplingParams(max_new_tokens=16)
    refs = dict(zip(("saved", "plain", None), alone_under(pm, tok, [p] * 3, ("saved", "plain", None), 16)))
    assert len({tuple(r[0][0]) for r in refs.values()}) == 3
    for active in ("saved", "plain"):  # whichever adapter PEFT has active, each row gets its own
        pm.set_adapter(active)
        engine = Engine(pm, tok, max_batch=4)
        reqs = [engine.submit(p, params, adapter=name) for name in ("saved", None, "plain", "saved")]
        while engine.has_work():
            engine.step()
        for req, name in zip(reqs, ("saved", None, "plain", "saved")):
            assert assert_agree([req.output_ids], refs[name]) == 0, (active, name)


def test_an_adapter_s_own_norms_reach_only_its_rows(tok):
    # the model's own blocks (the path the engine takes for such an adapter on the GPU too, and always on the CPU)
    pm = _with_modules_to_save(tiny(seed=11), ["saved", "plain"], saved={"saved"}, seed=4, modules=("ln_1", "ln_f"))
    p = prompts([14], seed=12)[0]
    refs = dict(zip(("saved", "plain", None), alone_under(pm, tok, [p] * 3, ("saved", "plain", None), 16)))
    assert len({tuple(r[0][0]) for r in refs.values()}) == 3
    engine = Engine(pm, tok, max_batch=4)
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=16), adapter=name) for name in ("saved", None, "plain")]
    while engine.has_work():
        engine.step()
    for req, name in zip(reqs, ("saved", None, "plain")):
        assert assert_agree([req.output_ids], refs[name]) == 0, name


def test_an_adapter_that_trained_base_biases_runs_alone(tok):
    # PEFT loads bias "all" / "lora_only" adapters' biases into the base layers: rows of the base (or of another
    # adapter) beside it would carry them, so they are refused in one line; its own rows are exact
    from peft import LoraConfig, get_peft_model

    from finetune.inference.row_adapters import AdapterMixError

    torch.manual_seed(0)
    pm = get_peft_model(tiny(seed=13), LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "w1"], bias="all",
                                                  init_lora_weights=False)).eval()
    with torch.no_grad():
        pm.base_model.model.transformer.h[0].attn.c_attn.base_layer.bias.add_(0.5)
    engine = Engine(pm, tok, max_batch=2)
    p = prompts([9], seed=14)[0]
    with pytest.raises(AdapterMixError, match=r"adapter 'default' trained base-layer biases .* the base model cannot "
                                              r"run beside it"):
        engine.submit(p, SamplingParams(max_new_tokens=8), adapter=None)
    ours = engine.generate([p], SamplingParams(max_new_tokens=12), adapter="default")
    assert assert_agree(ours, hf_greedy(pm, tok, [p], 12)) == 0
    # a server of that adapter warms up on its rows (base rows would be refused), and answers the same after
    engine.warm_up()
    assert engine.generate([p], SamplingParams(max_new_tokens=12), adapter="default") == ours


def _chunk_spy(engine, monkeypatch):
    """Records (slot, start, end, tokens the running rows had by then) of every chunk the engine prefills."""
    chunks = []
    real = engine._forward_chunk

    def spy(row, slot, start, end):
        chunks.append((slot, start, end, [len(r.req.output_ids) for r in engine._rows]))
        return real(row, slot, start, end)

    monkeypatch.setattr(engine, "_forward_chunk", spy)
    return chunks


@pytest.mark.parametrize("adapter", [None, "default"])
def test_a_long_prompt_joining_running_rows_is_prefilled_a_chunk_a_step_and_answers_as_alone(tok, monkeypatch,
                                                                                              adapter):
    """With ``prefill_chunk`` set, a prompt longer than it that joins running rows goes in that many positions a step
    while the rows go on decoding (each chunk follows a decode step), its chunks crossing seq_length (its NTK alpha from the
    whole prompt, logN by position); everyone answers as alone. The decode graphs of a GPU may write a padding row's
    key at position 0 of the chunked row's slot between chunks: simulated here before every decode step."""
    model = tiny(seed=3, seq_length=16)
    if adapter:
        model = _peft(model, [adapter], seed=4)
    running, long_ = prompts([5, 30], seed=12)
    params = SamplingParams(max_new_tokens=12)
    alone = [Engine(model, tok, max_batch=1).generate([p], params, adapter=adapter)[0] for p in (running, long_)]
    engine = Engine(model, tok, max_batch=4, prefill_chunk=8)
    chunks = _chunk_spy(engine, monkeypatch)
    real_launch = engine._launch

    def launch():  # what a graph's padding row in the chunked row's slot writes
        if engine._chunked is not None:
            engine._cache.k[:, engine._chunked.slot, :, 0] = 1e3
            engine._cache.v[:, engine._chunked.slot, :, 0] = -1e3
        return real_launch()

    monkeypatch.setattr(engine, "_launch", launch)
    first = engine.submit(running, params, adapter=adapter)
    engine.step()
    engine.step()
    second = engine.submit(long_, params, adapter=adapter)
    while engine.has_work():
        engine.step()
    assert [(slot, start, end) for slot, start, end, _ in chunks] == [(1, 0, 8), (1, 8, 16), (1, 16, 24), (1, 24, 30)]
    seen = [got[0] for *_, got in chunks]
    assert seen == sorted(seen) and seen[-1] - seen[0] == 3  # one decode step between chunks
    assert [first.output_ids, second.output_ids] == alone
    assert engine._chunked is None and not engine.has_work()


def test_a_long_prompt_is_prefilled_whole_into_an_empty_batch_and_without_prefill_chunk(tok, monkeypatch):
    model = tiny(seed=3)
    engine = Engine(model, tok, max_batch=2, prefill_chunk=8)
    chunks = _chunk_spy(engine, monkeypatch)
    engine.generate(prompts([30, 20], seed=5), SamplingParams(max_new_tokens=4))
    assert chunks == []
    engine = Engine(model, tok, max_batch=2)  # the default: never in chunks
    chunks = _chunk_spy(engine, monkeypatch)
    first = engine.submit(prompts([5], seed=6)[0], SamplingParams(max_new_tokens=8))
    engine.step()
    engine.submit(prompts([30], seed=7)[0], SamplingParams(max_new_tokens=4))
    engine.step()
    assert len(engine._rows) == 2 and not first.finished and chunks == []
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="prefill_chunk must be an integer >= 0"):
            Engine(model, tok, prefill_chunk=bad)


def test_rows_joining_and_leaving_while_a_long_prompt_is_prefilled_in_chunks(tok, monkeypatch):
    """A short request behind the long one joins while it is prefilled in chunks (the cache grows with the long
    prompt's keys so far kept, and they move past the new row); a second long prompt waits until the first has
    joined (one is prefilled in chunks at a time, the queue not reordered); rows that finish meanwhile leave, and the
    chunked row joins in the first free slot. A long prompt cancelled between chunks finishes at once and frees its
    slot. Everyone answers as alone."""
    model = tiny(seed=11)
    short, long_, after, other_long = prompts([6, 40, 7, 25], seed=13)
    few, many = SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=10)
    alone = {name: Engine(model, tok, max_batch=1).generate([p], q)[0]
             for name, p, q in (("short", short, few), ("keep", short, many), ("long", long_, many),
                                ("after", after, many), ("other", other_long, many))}
    engine = Engine(model, tok, max_batch=8, prefill_chunk=8)
    chunks = _chunk_spy(engine, monkeypatch)
    keep = engine.submit(short, many)
    leave = [engine.submit(short, few) for _ in range(2)]
    engine.step()
    rl = engine.submit(long_, many)
    ra = engine.submit(after, many)
    ro = engine.submit(other_long, many)
    engine.step()  # the long prompt's first chunk, into slot 3 of a cache of 4
    assert chunks[0][:3] == (3, 0, 8) and engine.occupancy() == (4, 2) and engine._slots == 4
    joined_meanwhile = False
    while not rl.output_ids:
        engine.step()
        running = [row.req for row in engine._rows]
        joined_meanwhile |= engine._chunked is not None and ra in running
        assert ro not in running and (engine._chunked is None or engine._chunked.row.req is rl)
    assert joined_meanwhile and engine._slots == 5
    slots = [c[0] for c in chunks]
    assert slots == [3, 4, 4, 4, 4], chunks  # moved past the short row that joined in slot 3
    assert len(chunks[-1][3]) == 2  # the two leaving rows had left: the long row joined in slot 2
    while engine.has_work():
        engine.step()
    assert [keep.output_ids, rl.output_ids, ra.output_ids, ro.output_ids] == [alone["keep"], alone["long"],
                                                                              alone["after"], alone["other"]]
    assert all(r.output_ids == alone["short"] for r in leave)
    # cancelled between chunks: finished with nothing, and the batch goes on
    keep = engine.submit(short, many)
    engine.step()
    gone = engine.submit(other_long, many)
    engine.step()
    assert engine._chunked is not None and engine._chunked.row.req is gone
    gone.cancel()
    got = engine.step()
    assert gone in got and gone.finished and gone.finish_reason == "cancelled" and gone.output_ids == []
    assert engine._chunked is None
    again = engine.submit(other_long, many)
    while engine.has_work():
        engine.step()
    assert keep.output_ids == alone["keep"] and again.output_ids == alone["other"]


def test_no_prefill_graph_is_captured_beside_a_prompt_being_prefilled_in_chunks(tok, monkeypatch):
    """A capture holds a second prefill's activations that the join plan did not keep: a prompt joining while another
    is prefilled in chunks (its rows all gone, the batch otherwise empty) replays a held graph or prefills eagerly."""
    engine = Engine(tiny(seed=3), tok, max_batch=4, use_graphs=False, prefill_chunk=8)
    monkeypatch.setattr(engine, "use_graphs", True)
    monkeypatch.setattr(engine, "_kernels", object())  # (what _prefill_graph_length asks of the fused path)
    engine._make_cache(4, 256)
    row = engine._new_row(Request(prompts([20], seed=1)[0], SamplingParams(), None))
    assert engine._prefill_graph_length(1, 20, [row], 0, False) == 32  # an empty batch: captured if not held
    engine._chunked = object()
    assert engine._prefill_graph_length(1, 20, [row], 0, False) is None
    engine._graphs["prefill", 32, False] = None
    assert engine._prefill_graph_length(1, 20, [row], 0, False) == 32  # held: replayed


@pytest.mark.parametrize("fields, message", [
    (dict(seed=2**70), r"seed must be an integer in \[-2\*\*63, 2\*\*64\), got 1180591620717411303424"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(stop_token_ids="12"), "stop_token_ids must be token ids"),  # read as the ids 1 and 2
    (dict(stop_token_ids=(3.7,)), "stop_token_ids must be token ids"),  # read as 3
    (dict(stop_token_ids=(-5,)), "stop_token_ids must be token ids"),  # masked the token -5 % vocab
    (dict(stop_token_ids=5), "stop_token_ids must be token ids"),  # "'int' object is not iterable"
    (dict(do_sample="no"), "do_sample must be true or false, got 'no'"),  # sampled
])
def test_sampling_params_name_a_wrong_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_submit_checks_everything_a_step_would_fail_on(tok):
    """A seed torch.Generator cannot take failed the step after the rows joining with it had left the queue: they
    were lost (never finished, has_work() False). Fields changed after construction were not checked again."""
    engine = Engine(tiny(seed=50), tok, max_batch=4)
    params = SamplingParams(max_new_tokens=3, do_sample=True)
    params.seed = 2**70
    with pytest.raises(ValueError, match="seed must be an integer"):
        engine.submit([5, 6], params)
    params = SamplingParams(max_new_tokens=3)
    params.max_new_tokens = 0
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        engine.submit([5, 6], params)
    for ids, message in (([1.9, 2.5], "must be integer token ids, got 1.9"), (["12"], "must be integer token ids"),
                         ([[1, 2]], "must be integer token ids"), ("hello", "must be a list of token ids, got str"),
                         ([True], "must be integer token ids, got True")):
        with pytest.raises(ValueError, match=message):
            engine.submit(ids, SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match=r"stop_token_ids: token id 99999 is outside the model's vocabulary"):
        engine.submit([5, 6], SamplingParams(max_new_tokens=3, stop_token_ids=(99999,)))
    assert engine.occupancy() == (0, 0)
    assert engine.submit(torch.tensor([5, 6]), SamplingParams(max_new_tokens=3)).prompt_ids == [5, 6]


def test_generate_queues_nothing_when_one_prompt_is_bad(tok):
    # the prompts before the bad one stayed queued, and the next call decoded them (and counted them)
    engine = Engine(tiny(seed=51), tok, max_batch=4)
    with pytest.raises(ValueError, match=r"prompts\[2\]: prompt_ids is empty"):
        engine.generate([[1, 2], [3, 4], []], SamplingParams(max_new_tokens=3))
    assert engine.occupancy() == (0, 0) and not engine.has_work()


def test_cancelling_a_finished_request_changes_nothing(tok):
    engine = Engine(tiny(seed=52), tok, max_batch=2)
    req = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=2))
    while engine.has_work():
        engine.step()
    reason, out = req.finish_reason, list(req.output_ids)
    req.cancel()
    assert not req.cancelled and req.finish_reason == reason and req.output_ids == out


def test_the_constructor_refuses_values_it_used_to_convert(tok):
    """max_len=2.9 was taken as 2, use_graphs="no" as True, max_batch=True as 1; use_graphs=True on a CPU model
    failed at the first step, after the prompt's prefill; a max_len past the model's positions was accepted."""
    model = tiny(seed=3)
    limit = max(model.config.max_position_embeddings, 4 * model.config.seq_length)
    for kwargs, words in (({"max_len": 2.9}, "max_len must be an integer"),
                          ({"max_len": "64"}, "max_len must be an integer"),
                          ({"use_graphs": "no"}, "use_graphs must be True, False or None"),
                          ({"use_graphs": 1}, "use_graphs must be True, False or None"),
                          ({"max_batch": True}, "max_batch must be an integer >= 1"),
                          ({"use_graphs": True}, "use_graphs=True needs a CUDA model; this one is on cpu"),
                          ({"max_len": limit + 1}, f"max_len {limit + 1} is more than the model holds "
                                                   f"\\(at most {limit}")):
        with pytest.raises(ValueError, match=words):
            Engine(model, tok, **kwargs)
    engine = Engine(model, tok, max_batch=torch.tensor(2).item(), max_len=limit, use_graphs=False)
    assert (engine.max_batch, engine.max_len, engine.use_graphs) == (2, limit, False)
