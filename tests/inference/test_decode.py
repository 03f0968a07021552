"""The static-cache decoder (finetune/inference/static_decode.py): the same tokens as generate(), on CPU without CUDA
graphs and on the GPU with them."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

import finetune  # noqa: F401
from finetune.inference.static_decode import StaticDecoder, can_decode_static, decode_tokens, unsupported_options

from _helpers import realistic_model
from _helpers import tiny_model as tiny


def prompt(n, seed=0, vocab=2048):
    return torch.randint(3, vocab - 300, (1, n), generator=torch.Generator().manual_seed(seed))


def hf_new_tokens(model, ids, gc):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
@pytest.mark.parametrize("n_prompt", [1, 7, 40])
def test_greedy_tokens_equal_generate(n_prompt, penalty):
    model = tiny(seed=1)
    ids = prompt(n_prompt, seed=n_prompt)
    gc = GenerationConfig(max_new_tokens=24, do_sample=False, repetition_penalty=penalty, eos_token_id=None,
                          pad_token_id=0)
    assert list(decode_tokens(model, ids, gc, use_graph=False)) == hf_new_tokens(model, ids, gc)


def test_stops_at_eos_and_respects_min_new_tokens():
    model = tiny(seed=2)
    ids = prompt(9, seed=3)
    free = GenerationConfig(max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    tokens = list(decode_tokens(model, ids, free, use_graph=False))
    eos = tokens[5]  # make the sixth token a stop token
    gc = GenerationConfig(max_new_tokens=30, do_sample=False, eos_token_id=[eos], pad_token_id=0)
    stopped = list(decode_tokens(model, ids, gc, use_graph=False))
    first = tokens.index(eos)
    assert stopped == tokens[: first + 1]  # up to and including the stop token, as generate() returns it
    assert stopped == hf_new_tokens(model, ids, gc)
    gc_min = GenerationConfig(max_new_tokens=30, min_new_tokens=first + 3, do_sample=False, eos_token_id=[eos],
                              pad_token_id=0)
    got = list(decode_tokens(model, ids, gc_min, use_graph=False))
    assert eos not in got[: first + 3] and got == hf_new_tokens(model, ids, gc_min)


def test_with_lora_adapters_equals_generate():
    from peft import LoraConfig, get_peft_model

    model = tiny(seed=4)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "w1", "w2"],
                                          init_lora_weights=False)).eval()
    ids = prompt(12, seed=5)
    gc = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = list(decode_tokens(pm, ids, gc, use_graph=False))
    assert ours == hf_new_tokens(pm, ids, gc)
    with pm.disable_adapter():
        assert ours != list(decode_tokens(pm, ids, gc, use_graph=False))  # the adapters did change the answer


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = tiny(seed=6)
    ids = prompt(10, seed=7)
    greedy = GenerationConfig(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    top1 = GenerationConfig(max_new_tokens=20, do_sample=True, top_k=1, temperature=0.7, eos_token_id=None,
                            pad_token_id=0)
    assert list(decode_tokens(model, ids, top1, use_graph=False)) == list(decode_tokens(model, ids, greedy,
                                                                                          use_graph=False))
    nucleus = GenerationConfig(max_new_tokens=20, do_sample=True, top_k=0, top_p=0.8, repetition_penalty=1.1,
                               eos_token_id=None, pad_token_id=0)

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return list(decode_tokens(model, ids, nucleus, use_graph=False, generator=g))

    assert sample(0) == sample(0)
    assert len({tuple(sample(s)) for s in range(4)}) > 1  # it does sample


def test_top_p_keeps_the_nucleus_only():
    from finetune.inference.static_decode import _pick

    scores = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gc = GenerationConfig(do_sample=True, top_k=0, top_p=0.7)
    g = torch.Generator().manual_seed(0)
    picks = {int(_pick(scores, gc, g)) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 + 0.3 >= 0.7: token 2 and 3 never drawn


def test_routing_rules():
    model = tiny(seed=8)
    ids = prompt(10)
    gc = GenerationConfig(max_new_tokens=16, do_sample=False)
    assert not can_decode_static(model, ids, gc)  # CPU: generate()
    assert unsupported_options(gc) == []
    assert unsupported_options(GenerationConfig(num_beams=2, no_repeat_ngram_size=3)) == ["no_repeat_ngram_size",
                                                                                          "num_beams"]
    with pytest.raises(ValueError, match="seq_length"):
        StaticDecoder(model, model.config.seq_length + 1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_equals_eager_and_generate(dtype, monkeypatch, switches):
    model = realistic_model(0).to("cuda", dtype)
    ids = prompt(30, seed=1).cuda()
    gc = GenerationConfig(max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert can_decode_static(model, ids, gc)
    graphed = list(decode_tokens(model, ids, gc, use_graph=True))
    eager = list(decode_tokens(model, ids, gc, use_graph=False))
    assert graphed == eager
    if dtype == torch.float32:
        assert graphed == hf_new_tokens(model, ids, gc)
    # chat() goes through it on CUDA and answers as generate() does
    from finetune.tokenization import SMALL_VOCAB, QWenTokenizer

    tok = QWenTokenizer(str(SMALL_VOCAB))
    r1, _ = model.chat(tok, "hello", do_sample=False, max_new_tokens=12)
    switches(static_decode=False)
    r2, _ = model.chat(tok, "hello", do_sample=False, max_new_tokens=12)
    if dtype == torch.float32:
        assert r1 == r2


def test_chat_and_chat_stream_through_the_static_decoder_answer_as_generate(monkeypatch):
    """chat()/chat_stream() routed through the static decoder (forced here; on CPU they use generate()) give
    generate()'s answer, streamed growing and ending with it."""
    from finetune.inference import static_decode as decode
    from finetune.modeling import chat as chat_module
    from finetune.tokenization import SMALL_VOCAB, QWenTokenizer

    model = tiny(seed=9)
    tok = QWenTokenizer(str(SMALL_VOCAB))
    kwargs = dict(do_sample=False, max_new_tokens=20)
    expected, _ = model.chat(tok, "what is packing?", **kwargs)
    streamed_ref = list(model.chat_stream(tok, "what is packing?", **kwargs))
    used = []
    original = decode.decode_tokens

    def spy(*args, **kw):
        used.append(1)
        yield from original(*args, **kw)

    # chat() reaches a fast decoder only through the registration hook (the model imports nothing from inference/)
    monkeypatch.setattr(chat_module, "_fast_decoder", lambda m, t, ids, gc: spy(m, ids, gc, use_graph=False))
    got, history = model.chat(tok, "what is packing?", **kwargs)
    streamed = list(model.chat_stream(tok, "what is packing?", **kwargs))
    assert len(used) == 2
    assert got == expected and history == [("what is packing?", expected)]
    assert streamed == streamed_ref and (not streamed or streamed[-1] == expected)
