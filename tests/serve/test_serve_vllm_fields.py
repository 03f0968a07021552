"""vLLM's allowed_token_ids, bad_words, truncate_prompt_tokens and prompt_logprobs (extra_body) on both routes,
through the official `openai` client on the tiny demo model: greedy allowed_token_ids answer as a +100 logit bias on
the same ids does (the tiny model's logits span a few units), running to max_tokens without <|im_end|> among them; a
one-token bad word answers as a -100 bias on its tokens, a longer word's last token is refused only after its other
tokens; a truncated prompt answers as its last tokens sent alone, and counts them in the usage; prompt_logprobs
score the prompt's tokens as echo with logprobs does, in vLLM's shape; every bad value is a 400 naming the field."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _helpers import demo_server  # noqa: E402

Q = "Tell me more."
ASK = [{"role": "user", "content": Q}]
ROUTES = ["chat", "completions"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with demo_server(tmp_path_factory, "serve_vllm_fields", "--max-batch", "4", "--max-queue", "4",
                     "--max-model-len", "256") as bg:
        yield bg


def _client(live):
    return openai.OpenAI(base_url=live.api_url, api_key="none", timeout=60, max_retries=0)


def _chatml(live) -> list[int]:
    from finetune.serve.protocol import ChatCompletionRequest

    return live.server.prompt(ChatCompletionRequest(model="tiny-qwen", messages=ASK))[0]


def _ask(live, route, prompt=None, extra=None, **kw):
    """A greedy reply -> (its token ids, read back through return_tokens_as_token_ids; the response). No repetition
    penalty (the demo's generation config has one): a logit bias of +100 is then the same pick as a mask."""
    kw = {"model": "tiny-qwen", "temperature": 0, "max_tokens": 8, **kw}
    extra = {"return_tokens_as_token_ids": True, "repetition_penalty": 1.0, **(extra or {})}
    if route == "chat":
        r = _client(live).chat.completions.create(messages=prompt or ASK, logprobs=True, extra_body=extra, **kw)
        tokens = [e.token for e in r.choices[0].logprobs.content]
    else:
        r = _client(live).completions.create(prompt=prompt or _chatml(live), logprobs=0, extra_body=extra, **kw)
        tokens = r.choices[0].logprobs.tokens
    return [int(t.removeprefix("token_id:")) for t in tokens], r


def _bad(live, route, extra, **kw) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        _ask(live, route, extra=extra, **kw)
    err = e.value.body
    assert err["type"] == "invalid_request_error" and "\n" not in err["message"], err
    return err


def _word(tok, ids, n) -> tuple[int, str]:
    """The first place i in ``ids`` whose n tokens, written out, are those n tokens again -> (i, that text)."""
    for i in range(len(ids) - n + 1):
        text = tok.decode(ids[i:i + n])
        if tok.encode(text) == ids[i:i + n]:
            return i, text
    raise AssertionError(f"no {n} tokens of {ids} that a word gives back")


@pytest.mark.parametrize("route", ROUTES)
def test_allowed_token_ids_answer_as_a_bias_on_them_and_run_to_max_tokens(live, route):
    tok = live.server.tokenizer
    plain, _ = _ask(live, route)
    pair = [plain[1], tok.encode("x")[0]]
    ids, r = _ask(live, route, extra={"allowed_token_ids": pair})
    biased, _ = _ask(live, route, logit_bias={str(t): 100 for t in pair})
    assert ids == biased and set(ids) <= set(pair) and ids != plain
    # (no stop among them: the reply runs to max_tokens, as in vLLM)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    ended, r = _ask(live, route, extra={"allowed_token_ids": [tok.im_end_id]})
    assert ended == [] and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("route", ROUTES)
def test_bad_words_refuse_a_word_as_vllm_does(live, route):
    """A one-token word of the plain reply never comes (as with a -100 bias on its tokens); a two-token word's second
    token is refused right after its first, which still comes; [] (vLLM's default) asks for nothing."""
    tok = live.server.tokenizer
    plain, _ = _ask(live, route)
    assert _ask(live, route, extra={"bad_words": []})[0] == plain
    i, word = _word(tok, plain, 1)
    ids, _ = _ask(live, route, extra={"bad_words": [word]})
    forms = {tok.encode(word)[0], *(tok.encode(" " + word) if len(tok.encode(" " + word)) == 1 else ())}
    assert ids == _ask(live, route, logit_bias={str(t): -100 for t in forms})[0]
    assert plain[i] not in ids and ids[:i] == plain[:i]
    i, word = _word(tok, plain, 2)
    ids, _ = _ask(live, route, extra={"bad_words": [word]})
    assert ids[:i + 1] == plain[:i + 1] and ids[i + 1] != plain[i + 1]


def test_truncate_prompt_tokens_keeps_the_prompt_s_last_tokens(live):
    """Completions: a prompt over the length limit, cut to its last 100 tokens, answers as those tokens sent alone
    (echo gives their text) and counts 100 in the usage; chat: the ChatML prompt's last 10 tokens, as completions
    answer them; -1 keeps up to the model's length (a short prompt whole; a longer one's 256 leave no room)."""
    tok = live.server.tokenizer
    long = "word " * 300
    ids = tok.encode(long)
    got, r = _ask(live, "completions", long, extra={"truncate_prompt_tokens": 100}, echo=True)
    alone, a = _ask(live, "completions", ids[-100:])
    assert got[100:] == alone and r.usage.prompt_tokens == 100 == a.usage.prompt_tokens
    assert r.choices[0].text == tok.decode(ids[-100:]) + a.choices[0].text
    chat = _chatml(live)
    got, r = _ask(live, "chat", extra={"truncate_prompt_tokens": 10})
    assert got == _ask(live, "completions", chat[-10:])[0] and r.usage.prompt_tokens == 10
    assert got != _ask(live, "chat")[0]
    whole, r = _ask(live, "chat", extra={"truncate_prompt_tokens": -1})
    assert whole == _ask(live, "chat")[0] and r.usage.prompt_tokens == len(chat)
    err = _bad(live, "completions", {"truncate_prompt_tokens": -1}, prompt=long)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt", err


def test_prompt_logprobs_score_the_prompt_as_echo_with_logprobs_does(live):
    """vLLM's shape: None for the first prompt token, then {"<id>": {logprob, rank, decoded_token}} holding the
    prompt token itself and the k most likely (ranks 1..k, most likely first); the chat route's (top level, of the
    ChatML prompt its messages make) equal the completions route's for those tokens (in each choice), and both equal
    the legacy echo log-probabilities; rank 1 is the most likely token; decoded_token is the token's text, or with
    return_tokens_as_token_ids "token_id:N"; the reply is the one asked without them."""
    tok, chat_ids = live.server.tokenizer, _chatml(live)
    plain, _ = _ask(live, "chat")
    got, r = _ask(live, "chat", extra={"prompt_logprobs": 2})
    scores = r.model_extra["prompt_logprobs"]
    assert got == plain and len(scores) == len(chat_ids) and scores[0] is None
    _, c = _ask(live, "completions", chat_ids, extra={"prompt_logprobs": 2}, n=2, temperature=1.0, seed=3)
    assert [choice.model_extra["prompt_logprobs"] for choice in c.choices] == [scores, scores]
    legacy = _client(live).completions.create(model="tiny-qwen", prompt=chat_ids, echo=True, logprobs=2, max_tokens=1,
                                              extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    for k, (token, entry) in enumerate(zip(chat_ids[1:], scores[1:]), 1):
        mine = entry[str(token)]
        others = [e for i, e in entry.items() if int(i) != token]
        assert 2 <= len(entry) <= 3 and mine["logprob"] == legacy.token_logprobs[k] <= 0
        assert all(e["decoded_token"] == f"token_id:{i}" for i, e in entry.items())
        assert sorted([mine["rank"]] * (mine["rank"] <= 2) + [e["rank"] for e in others]) == [1, 2], entry
        assert all(e["logprob"] <= mine["logprob"] for e in others) == (mine["rank"] == 1)
        assert {e["decoded_token"]: e["logprob"] for e in entry.values()} == legacy.top_logprobs[k]
    texts = _client(live).chat.completions.create(model="tiny-qwen", messages=ASK, max_tokens=1,
                                                  extra_body={"prompt_logprobs": 0}).model_extra["prompt_logprobs"]
    assert [(list(e), list(e.values())[0]["decoded_token"]) for e in texts[1:]] == [
        ([str(t)], tok.decode([t])) for t in chat_ids[1:]]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("extra, param", [
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [10**7]}, "allowed_token_ids"),
    ({"allowed_token_ids": [5] * 2049}, "allowed_token_ids"),  # (more than the vocabulary's 2048)
    ({"allowed_token_ids": ["a"]}, "allowed_token_ids[0]"),
    ({"allowed_token_ids": [5, -1]}, "allowed_token_ids[1]"),
    ({"allowed_token_ids": [5, True]}, "allowed_token_ids[1]"),
    ({"allowed_token_ids": 5}, "allowed_token_ids"),
    ({"allowed_token_ids": [120], "bad_words": ["x"]}, "allowed_token_ids"),  # (every allowed token banned)
    ({"allowed_token_ids": [1842], "min_tokens": 2}, "allowed_token_ids"),  # (only <|im_end|>, held back)
    ({"bad_words": [""]}, "bad_words[0]"),
    ({"bad_words": ["ok", "  "]}, "bad_words[1]"),
    ({"bad_words": "word"}, "bad_words"),
    ({"bad_words": [5]}, "bad_words[0]"),
    ({"bad_words": ["w"] * 1025}, "bad_words"),
    ({"bad_words": ["ok", "x" * 40]}, "bad_words[1]"),  # (40 tokens: at most 16)
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": "5"}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": 1.5}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": 257}, "truncate_prompt_tokens"),  # (more than --max-model-len 256)
    ({"prompt_logprobs": -1}, "prompt_logprobs"),  # (vLLM's whole vocabulary: 152k entries a token)
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": True}, "prompt_logprobs"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
])
def test_a_bad_value_is_a_400_naming_the_field(live, route, extra, param):
    err = _bad(live, route, extra)
    assert err["param"] == param, err
    assert param.split("[")[0] in err["message"], err
