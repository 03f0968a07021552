"""Sampling (finetune/inference/sampling.py): the next-token choice as transformers' warpers make it, which
generation options the engine implements, and one clear line for those it does not."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from finetune.inference.sampling import (RowSampling, SamplingParams, pick_one, pick_tokens, sample_rows,
                                         unsupported_options)


def test_top_p_keeps_the_nucleus_only():
    scores = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(do_sample=True, top_k=0, top_p=0.7)
    g = torch.Generator().manual_seed(0)
    picks = {int(pick_one(scores, params, g)) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are never drawn


def test_top_k_and_temperature():
    scores = torch.log(torch.tensor([0.4, 0.35, 0.2, 0.05]))
    g = torch.Generator().manual_seed(0)
    top2 = {int(pick_one(scores, SamplingParams(do_sample=True, top_k=2), g)) for _ in range(300)}
    assert top2 == {0, 1}
    # a very low temperature makes sampling greedy; greedy is the argmax
    cold = {int(pick_one(scores, SamplingParams(do_sample=True, temperature=1e-4), g)) for _ in range(50)}
    assert cold == {0} and int(pick_one(scores, SamplingParams())) == 0


def test_sample_rows_draws_each_row_as_pick_one_does():
    """The batched sampler with per-row parameters (temperature, top-k on/off/beyond the vocabulary, top-p on/off)
    picks, row by row, the token pick_one picks when both use the same exponential draws (the draw
    torch.multinomial makes from a generator)."""
    V = 400
    params = [SamplingParams(do_sample=True, temperature=0.7, top_p=0.8),
              SamplingParams(do_sample=True, top_k=5),
              SamplingParams(do_sample=True),
              SamplingParams(do_sample=True, temperature=1.5, top_k=50, top_p=0.6),
              SamplingParams(do_sample=True, top_k=V + 3, top_p=0.95),
              SamplingParams(do_sample=True, temperature=0.3, top_k=1),
              SamplingParams(do_sample=True, min_p=0.2),
              SamplingParams(do_sample=True, temperature=0.8, top_p=0.9, min_p=0.05),
              SamplingParams(do_sample=True, typical_p=0.5),
              SamplingParams(do_sample=True, temperature=0.9, top_k=60, min_p=0.02, typical_p=0.9)]
    rs = RowSampling(params, V, "cpu")
    g = torch.Generator().manual_seed(0)
    drawn = set()
    for trial in range(40):
        scores = torch.randn(len(params), V, generator=g) * 2
        seeds = [trial * 100 + i for i in range(len(params))]
        noise = torch.stack([torch.empty(V).exponential_(1, generator=torch.Generator().manual_seed(s)) for s in seeds])
        want = [int(pick_one(scores[i], p, torch.Generator().manual_seed(s)))
                for i, (p, s) in enumerate(zip(params, seeds))]
        assert sample_rows(scores, rs, noise).tolist() == want
        drawn.add(tuple(want))
    assert len(drawn) > 30  # it does sample
    # the top-k row only ever draws from its 5 best, the top_k=1 row is its argmax
    scores = torch.randn(len(params), V, generator=g)
    best5 = set(scores[1].topk(5).indices.tolist())
    picks = [sample_rows(scores, rs).tolist() for _ in range(100)]
    assert {p[1] for p in picks} <= best5 and len({p[1] for p in picks}) > 1
    assert {p[5] for p in picks} == {int(scores[5].argmax())}


@pytest.mark.parametrize("kw", [dict(min_p=0.1), dict(min_p=0.3, temperature=0.7, top_k=40, top_p=0.9),
                                dict(min_p=1.0), dict(temperature=1.3, top_p=0.7), dict(typical_p=0.4),
                                dict(typical_p=0.95, temperature=0.8, top_p=0.9, min_p=0.01), dict(typical_p=1e-6)])
def test_pick_one_draws_what_transformers_warpers_and_multinomial_draw(kw):
    """A seeded pick is generate()'s sampling step: transformers' warpers in its order (temperature, top-k, top-p,
    min-p, typical-p), a softmax, torch.multinomial with the same generator state: the same token, draw for draw."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
                                                        TypicalLogitsWarper)

    params = SamplingParams(do_sample=True, **kw)
    warpers = LogitsProcessorList(
        ([TemperatureLogitsWarper(params.temperature)] if params.temperature != 1.0 else [])
        + ([TopKLogitsWarper(params.top_k)] if params.top_k else [])
        + ([TopPLogitsWarper(params.top_p)] if params.top_p < 1.0 else [])
        + ([MinPLogitsWarper(params.min_p)] if params.min_p else [])
        + ([TypicalLogitsWarper(params.typical_p)] if params.typical_p < 1 else []))
    g = torch.Generator().manual_seed(1)
    picks = set()
    for trial in range(60):
        scores = torch.randn(300, generator=g) * 3
        probs = warpers(None, scores[None].clone()).softmax(-1)
        want = int(torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(trial))[0, 0])
        assert int(pick_one(scores, params, torch.Generator().manual_seed(trial))) == want
        picks.add(want)
    # (min_p 1 keeps the most likely token alone; a tiny typical mass the one nearest the entropy)
    assert len(picks) > (1 if params.min_p == 1.0 or params.typical_p < 1e-3 else 5)


def test_pick_tokens_mixes_greedy_and_seeded_sampling_rows():
    scores = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.34, 0.33, 0.33], [0.2, 0.2, 0.6]]))
    params = [SamplingParams(), SamplingParams(do_sample=True, seed=1), SamplingParams()]

    def run(seed):
        return pick_tokens(scores, params, [None, torch.Generator().manual_seed(seed), None])

    assert run(5) == run(5)
    assert run(5)[0] == 1 and run(5)[2] == 2  # the greedy rows are their argmax
    assert len({run(s)[1] for s in range(30)}) > 1  # the sampled row does sample


def test_unsupported_options_are_named():
    assert unsupported_options(GenerationConfig(max_new_tokens=16, do_sample=True, top_p=0.8, top_k=0,
                                                repetition_penalty=1.1, eos_token_id=[1, 2])) == []
    assert unsupported_options(GenerationConfig(num_beams=2, no_repeat_ngram_size=3)) == ["no_repeat_ngram_size",
                                                                                          "num_beams"]


def test_unsupported_options_and_bad_values_are_refused_in_one_line():
    with pytest.raises(ValueError) as err:
        SamplingParams.from_generation_config(GenerationConfig(num_beams=2, no_repeat_ngram_size=3))
    msg = str(err.value)
    assert "\n" not in msg and "no_repeat_ngram_size, num_beams" in msg and "inference engine" in msg
    with pytest.raises(ValueError, match="from_generation_config needs a transformers GenerationConfig, got NoneType"):
        SamplingParams.from_generation_config(None)  # (an AttributeError on its to_dict)
    with pytest.raises(ValueError) as err:
        SamplingParams(max_new_tokens=0, do_sample=True, temperature=0, top_p=1.5)
    msg = str(err.value)
    assert "\n" not in msg and all(k in msg for k in ("max_new_tokens", "temperature", "top_p"))
    for bad in (-1.0, float("nan"), "0.7", True):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            SamplingParams(temperature=bad)
    with pytest.raises(ValueError, match="top_k must be an integer"):
        SamplingParams(top_k=2.0)


def test_a_greedy_config_with_temperature_0_is_greedy_and_sampling_needs_a_temperature():
    """A generation_config.json that says do_sample false often has temperature 0: greedy rows ignore it, as
    transformers' generate() does (the engine refused it, so such a model dir crashed chat on CUDA and serve)."""
    gc = GenerationConfig(do_sample=False, temperature=0.0, top_p=0.8, eos_token_id=[5])
    p = SamplingParams.from_generation_config(gc)
    assert (p.do_sample, p.temperature) == (False, 0.0)
    with pytest.raises(ValueError, match="temperature must be > 0 to sample"):
        SamplingParams.from_generation_config(gc, do_sample=True)
    with pytest.raises(ValueError, match="no field.*bogus"):
        SamplingParams.from_generation_config(GenerationConfig(), bogus=1)


def test_chat_falls_back_to_generate_for_options_the_engine_lacks(monkeypatch):
    """chat() with an option the engine does not implement (beams) is answered by generate(), not refused."""
    from finetune.inference import chat_decoder

    from _helpers import tiny_model

    model = tiny_model(seed=2)
    monkeypatch.setattr(chat_decoder, "_device_ok", lambda ids: True)  # the CUDA route, on the CPU
    assert chat_decoder.chat_tokens(model, _tok(), torch.tensor([[5, 6]]),
                                    GenerationConfig(max_new_tokens=3, num_beams=2)) is None
    assert chat_decoder.chat_tokens(model, _tok(), torch.tensor([[5, 6]]),
                                    GenerationConfig(max_new_tokens=3)) is not None


def _tok():
    from finetune.tokenization import SMALL_VOCAB, QWenTokenizer

    return QWenTokenizer(str(SMALL_VOCAB))


def test_a_stop_string_met_before_min_new_tokens_does_not_end_the_row_later():
    """A stop string completed before min_new_tokens is held back, as a stop token is; it ended the row at the
    min_new_tokens-th token anyway (that token completed nothing: the stop string was still in the text kept for a
    longer stop string), and the caller's cut at it gave a reply shorter than min_new_tokens."""
    from _helpers import tiny_model

    from finetune.inference import Engine
    from finetune.tokenization import SMALL_VOCAB, QWenTokenizer

    tok = QWenTokenizer(str(SMALL_VOCAB))
    model = tiny_model(seed=15)
    p = torch.randint(3, 1700, (9,), generator=torch.Generator().manual_seed(16)).tolist()
    free = Engine(model, tok, max_batch=1).generate([p], SamplingParams(max_new_tokens=16))[0]
    texts = [tok.decode(free[:i]) for i in range(len(free) + 1)]
    # a stop string of two clean tokens' texts, met once in the row's text
    k = next(i for i in range(2, len(free)) if "\ufffd" not in texts[i] and len(texts[i - 1]) >= 1
             and len(texts[i]) > len(texts[i - 1]) and texts[-1].count(texts[i][len(texts[i - 1]) - 1:]) == 1)
    stop = texts[k][len(texts[k - 1]) - 1:]
    first = next(i for i in range(len(free) + 1) if stop in texts[i])
    longer = "a stop string never met, long enough to keep the other in view \u2603"
    engine = Engine(model, tok, max_batch=1)
    req = engine.submit(p, SamplingParams(max_new_tokens=16, min_new_tokens=first + 2, stop=(stop, longer)))
    while engine.has_work():
        engine.step()
    assert req.output_ids == free and req.stop_string is None  # (met once, before min_new_tokens: no stop)
