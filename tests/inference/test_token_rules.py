"""vLLM's allowed_token_ids and bad_words in the decode engine (SamplingParams fields; engine.py's _Bans), on CPU in
fp32: each row's tokens equal a plain forward loop's that applies vLLM's rule at every step (only the allowed ids;
a one-token bad word never, a longer word's last token only where the output, not the prompt, ends with its other
tokens), greedy and seeded-sampled, beside plain rows that keep their own tokens, eager and through the graphed
path's stand-in; the words are tokenized as vLLM tokenizes them; a row these rules leave no token ends; bad values
are ValueErrors naming the field."""

from __future__ import annotations

import pytest
import torch

import finetune  # noqa: F401
from finetune.inference import Engine, SamplingParams
from finetune.inference.engine import graph_pick
from finetune.inference.sampling import MAX_BAD_WORDS, FieldProblem, bad_word_ids, pick_one
from finetune.tokenization import SMALL_VOCAB, QWenTokenizer

from _helpers import RerunGraph
from _helpers import tiny_model as tiny
from test_engine_pipeline import run
from test_inference_engine import prompts


@pytest.fixture(scope="module")
def tok():
    return QWenTokenizer(str(SMALL_VOCAB))


@pytest.fixture(scope="module")
def model():
    return tiny(seed=61)


def word_forms(tok, words) -> list[tuple]:
    """The token sequences of bad words, written out here: each word stripped on the left, and after a space where
    that is other tokens than the space's own and then the word's (vLLM's rule, which also asks for as many)."""
    out = []
    for w in words:
        plain, spaced = tok.encode(w.lstrip()), tok.encode(" " + w.lstrip())
        out.append(tuple(plain))
        if spaced != plain and spaced[1:] != plain:
            out.append(tuple(spaced))
    return out


def reference(model, tok, prompt, params: SamplingParams) -> tuple[list[int], str]:
    """A full forward over the whole sequence every step, the rules applied to its raw logits, then argmax or
    sampling.pick_one with the request's seeded generator -> (output, finish reason)."""
    g = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    words = word_forms(tok, params.bad_words)
    stops = {tok.im_end_id, tok.im_start_id, *params.stop_token_ids}
    ids, out = list(prompt), []
    with torch.no_grad():
        while len(out) < params.max_new_tokens:
            scores = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            if params.allowed_token_ids is not None:
                keep = scores[list(params.allowed_token_ids)]
                scores = torch.full_like(scores, -float("inf"))
                scores[list(params.allowed_token_ids)] = keep
            for w in words:
                if len(w) == 1 or tuple(out[-(len(w) - 1):]) == w[:-1]:
                    scores[w[-1]] = -float("inf")
            t = int(pick_one(scores, params, g))
            if t in stops:
                return out, "stop"
            out.append(t)
            ids.append(t)
    return out, "length"


def test_bad_words_are_banned_as_written_and_after_a_space(tok):
    """"xx" and " xx" are two tokens each with other first tokens: both banned; "ab" is one token and " ab" two
    (" a" "b"), "the" two and " the" one: both forms banned (vLLM, which asks for as many tokens, banned neither
    inside a text); leading whitespace is stripped. A spaced form that is the space's token and then the word's is
    left to the plain form's ban."""
    assert tok.encode("xx") == [120, 120] and tok.encode(" xx") == [465, 120]
    assert tok.encode(" ab") == [257, 98] and tok.encode("ab") == [452]
    assert tok.encode("the") == [116, 260] and tok.encode(" the") == [268]
    got = bad_word_ids(tok.encode, ("xx", "  ab", "the"), 2048)
    assert got == word_forms(tok, ("xx", "ab", "the")) == [(120, 120), (465, 120), (452,), (257, 98), (116, 260),
                                                           (268,)]
    with pytest.raises(FieldProblem, match=r"^bad_words\[1\] is 20 tokens: at most 16 a word") as e:
        bad_word_ids(tok.encode, ("ok", "x" * 20), 2048)
    assert e.value.field == "bad_words[1]"
    with pytest.raises(FieldProblem, match=r"^bad_words\[0\]: token id 452 is outside the model's vocabulary"):
        bad_word_ids(tok.encode, ("ab",), 300)


@pytest.mark.parametrize("graphed", [False, True])
def test_allowed_token_ids_pick_only_among_them_beside_plain_rows(tok, model, monkeypatch, graphed):
    """Greedy: every token is the argmax over the allowed ids of the model's logits, none other (no stop among them:
    the row runs to max_new_tokens, as in vLLM); a seeded sampled row draws as pick_one does over them; a plain row
    beside them keeps its own tokens; eager and through the graphed path (the pick after the forward's graph)."""
    ps = prompts([7, 12, 5], seed=62)
    plain = Engine(model, tok, max_batch=1).generate(ps, SamplingParams(max_new_tokens=12))
    pair = (plain[0][0], plain[1][1])  # (the first is the unconstrained greedy choice at the first step)
    many = tuple(sorted(set(plain[1]) | {5, 900}))
    jobs = [(ps[0], SamplingParams(max_new_tokens=12, allowed_token_ids=pair)),
            (ps[1], SamplingParams(max_new_tokens=12, allowed_token_ids=many, do_sample=True, seed=3,
                                   temperature=1.5)),
            (ps[2], SamplingParams(max_new_tokens=12))]
    want = [reference(model, tok, p, sp) for p, sp in jobs[:2]]
    engine = Engine(model, tok, max_batch=4, use_graphs=False)
    if graphed:
        engine.use_graphs = True  # (a CPU model: Engine refuses use_graphs=True there; the stand-in below)
        monkeypatch.setattr(engine, "_capture", RerunGraph.capturing(engine))
    reqs = run(engine, jobs, join_at={1: 2})
    assert [(r.output_ids, r.finish_reason) for r in reqs[:2]] == want
    assert reqs[2].output_ids == plain[2]
    assert set(reqs[0].output_ids) <= set(pair) and len(set(reqs[0].output_ids)) == 2
    assert reqs[0].finish_reason == "length" and len(reqs[0].output_ids) == 12
    assert reqs[0].output_ids != plain[0] and set(reqs[1].output_ids) <= set(many)
    assert graph_pick(jobs[0][1]) is None and graph_pick(jobs[2][1]) == (False,)  # (plain rows: the graph's pick)


def test_a_one_token_bad_word_is_never_picked(tok, model):
    """The plain greedy reply's first token, written as a word, is banned at every step (greedy and sampled), though
    it is the unconstrained choice at the first step; a plain row beside it is unchanged."""
    ps = prompts([9, 6], seed=63)
    plain = Engine(model, tok, max_batch=1).generate(ps, SamplingParams(max_new_tokens=16))
    first = plain[0][0]
    word = tok.decode([first])
    assert tok.encode(word) == [first]
    jobs = [(ps[0], SamplingParams(max_new_tokens=16, bad_words=(word,))),
            (ps[0], SamplingParams(max_new_tokens=16, bad_words=[word, "xx"], do_sample=True, seed=5)),
            (ps[1], SamplingParams(max_new_tokens=16))]
    reqs = run(Engine(model, tok, max_batch=4), jobs)
    assert [(r.output_ids, r.finish_reason) for r in reqs[:2]] == [reference(model, tok, p, sp) for p, sp in jobs[:2]]
    assert reqs[2].output_ids == plain[1]
    for r in reqs[:2]:
        assert first not in r.output_ids
    assert reqs[0].output_ids[0] != first


def test_a_longer_bad_word_s_last_token_is_banned_only_after_its_other_tokens(tok, model):
    """A two-token word (p, q) with only p and q allowed: without the ban the reply holds "p q"; with it q never
    follows p but still comes elsewhere (the reference's rule, step by step); a prompt ending with p does not ban q
    at the first step (vLLM looks at the output only)."""
    def greedy(p, q, word=None):
        return Engine(model, tok, max_batch=1).generate([[5, 6, 7]], SamplingParams(
            max_new_tokens=16, allowed_token_ids=(p, q), bad_words=(word,) if word else ()))[0]

    found = None
    for word in (a + b for a in "abcefghijkmopqrtuvwxyz" for b in "abcefghijkmopqrtuvwxyz"):
        p, q = tok.encode(word) if len(tok.encode(word)) == 2 else (0, 0)
        if p != q and any(greedy(p, q)[i:i + 2] == [p, q] for i in range(15)) and q in greedy(p, q, word):
            found = word, p, q, greedy(p, q)
            break
    assert found, "no two-letter word whose allowed-only reply holds its two tokens in a row, and q without the ban"
    word, p, q, alone = found
    params = SamplingParams(max_new_tokens=16, allowed_token_ids=(p, q), bad_words=(word,))
    jobs = [([5, 6, 7], params), ([5, 6, 7], SamplingParams(**{**params.__dict__, "do_sample": True, "seed": 9})),
            ([5, 6, 7], SamplingParams(max_new_tokens=16))]
    reqs = run(Engine(model, tok, max_batch=4), jobs, join_at={1: 3})
    assert [(r.output_ids, r.finish_reason) for r in reqs[:2]] == [reference(model, tok, pr, sp)
                                                                   for pr, sp in jobs[:2]]
    for r in reqs[:2]:
        assert not any(r.output_ids[i:i + 2] == [p, q] for i in range(15))
    assert q in reqs[0].output_ids and reqs[0].output_ids != alone
    (after_p,) = Engine(model, tok, max_batch=1).generate([[5, 6, p]], SamplingParams(
        max_new_tokens=6, allowed_token_ids=(q,), bad_words=(word,)))
    assert after_p == [q] * 6


def test_a_row_left_no_token_ends_with_a_stop(tok, model):
    """Only x allowed, "xx" banned: after the first x nothing is left; the row ends there ("stop"), rather than an
    argmax over nothing picking token 0 (or a draw over nothing failing the step for the batch)."""
    x = tok.encode("x")[0]
    engine = Engine(model, tok, max_batch=4)
    reqs = [engine.submit([5, 6], SamplingParams(max_new_tokens=8, allowed_token_ids=(x,), bad_words=("xx",))),
            engine.submit([5, 6], SamplingParams(max_new_tokens=8, allowed_token_ids=(x,), bad_words=("xx",),
                                                 do_sample=True)),
            engine.submit([5, 6], SamplingParams(max_new_tokens=8))]
    while engine.has_work():
        engine.step()
    assert [(r.output_ids, r.finish_reason) for r in reqs[:2]] == [([x], "stop")] * 2
    assert len(reqs[2].output_ids) > 1


@pytest.mark.parametrize("kw, message", [
    (dict(allowed_token_ids=()), "allowed_token_ids must be None or a non-empty list of token ids"),
    (dict(allowed_token_ids=(5, -1)), "allowed_token_ids must be None or a non-empty list"),
    (dict(allowed_token_ids=(5, True)), "allowed_token_ids must be None or a non-empty list"),
    (dict(allowed_token_ids=(5, 2.0)), "allowed_token_ids must be None or a non-empty list"),
    (dict(allowed_token_ids=5), "allowed_token_ids must be None or a non-empty list"),
    (dict(bad_words=("ok", "")), "bad_words must be words"),
    (dict(bad_words=("  ",)), "bad_words must be words"),
    (dict(bad_words=(5,)), "bad_words must be words"),
    (dict(bad_words=("w",) * (MAX_BAD_WORDS + 1)), f"bad_words holds {MAX_BAD_WORDS + 1} words: at most"),
])
def test_sampling_params_name_a_wrong_rule(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


@pytest.mark.parametrize("kw, field, message", [
    (dict(allowed_token_ids=(5, 2048)), "allowed_token_ids",
     r"allowed_token_ids: token id 2048 is outside the model's vocabulary \[0, 2048\)"),
    (dict(allowed_token_ids=(5,) * 2049), "allowed_token_ids", r"holds 2049 ids: more than the model's vocabulary"),
    (dict(allowed_token_ids=(120,), bad_words=("x",)), "allowed_token_ids", "every one of its tokens is a bad word"),
    (dict(allowed_token_ids=(1842, 120), bad_words=("x",), min_new_tokens=2), "allowed_token_ids",
     "every token it leaves ends the reply"),
    (dict(bad_words=("ok", "x" * 40)), "bad_words[1]", r"bad_words\[1\] is 40 tokens"),
])
def test_submit_names_the_rule_at_fault(tok, model, kw, field, message):
    engine = Engine(model, tok, max_batch=1)
    with pytest.raises(FieldProblem, match=message) as e:
        engine.submit([5, 6], SamplingParams(**kw))
    assert e.value.field == field and not engine.has_work()
    # (with ignore_eos <|im_end|> is no stop: the minimum length holds nothing back)
    engine.submit([5, 6], SamplingParams(max_new_tokens=2, allowed_token_ids=(1842,), min_new_tokens=2,
                                         ignore_eos=True))


def test_allowed_token_ids_are_checked_once_and_kept_by_copies():
    """The ids are read once (a list of the whole vocabulary took 20 ms to read again for each of a request's seeded
    choices, on the server's event loop): a copy of the params keeps the checked tuple itself; numpy-like integers
    become ints; a bad id is still refused."""
    import dataclasses

    import numpy as np

    from finetune.inference.sampling import TokenIds

    p = SamplingParams(max_new_tokens=4, allowed_token_ids=[5, np.int64(2), 9], seed=1)
    assert isinstance(p.allowed_token_ids, TokenIds) and p.allowed_token_ids == (5, 2, 9)
    q = dataclasses.replace(p, seed=2)
    assert q.allowed_token_ids is p.allowed_token_ids
    for bad in ([], [3, -1], [1.5], ["7"]):
        with pytest.raises(ValueError, match="allowed_token_ids must be"):
            SamplingParams(max_new_tokens=4, allowed_token_ids=bad)
