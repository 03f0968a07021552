"""POST /v1/completions (OpenAI's legacy completions, as vLLM serves them) through the official `openai` client, on
the tiny demo model: a ChatML prompt the client lays out itself answers what the chat route answers, token-id
prompts answer as their text, several prompts and n choices come back prompt-major, streams join to the
non-streamed text, echo and the legacy logprobs object, and every refusal is a 400 naming its field."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _helpers import demo_server  # noqa: E402

Q = "Tell me more."
CHATML = f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n" \
         "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with demo_server(tmp_path_factory, "serve_completions", "--max-batch", "4", "--max-queue", "2",
                     "--max-model-len", "256") as bg:
        yield bg


def _client(live):
    return openai.OpenAI(base_url=live.api_url, api_key="none", timeout=60, max_retries=0)


def _complete(live, prompt=CHATML, **kw):
    kw = {"model": "tiny-qwen", "temperature": 0, "max_tokens": 8, **kw}
    return _client(live).completions.create(prompt=prompt, **kw)


def _bad(live, **kw) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        _complete(live, **kw)
    err = e.value.body
    assert err["type"] == "invalid_request_error" and "\n" not in err["message"], err
    return err


def test_a_chatml_prompt_is_tokenized_as_the_chat_route_lays_it_out_and_answers_the_same(live):
    """The control tokens' text becomes the tokens (the official tokenizer's default), so the prompt is the chat
    route's prompt id for id, and the greedy continuation is the chat reply (unstripped here, stripped there)."""
    from finetune.serve.completions import prompt_ids
    from finetune.serve.protocol import ChatCompletionRequest

    server = live.server
    chat_ids, _ = server.prompt(ChatCompletionRequest(model="tiny-qwen", messages=[{"role": "user", "content": Q}]))
    assert prompt_ids(server.tokenizer, CHATML) == chat_ids
    chat = _client(live).chat.completions.create(model="tiny-qwen", messages=[{"role": "user", "content": Q}],
                                                 temperature=0, max_tokens=8)
    r = _complete(live)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.usage.prompt_tokens == len(chat_ids) == chat.usage.prompt_tokens
    assert r.choices[0].text.strip() == chat.choices[0].message.content
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (chat.usage.completion_tokens,
                                                                      chat.choices[0].finish_reason)
    # token ids answer as their text; <|im_end|> forced ends the reply at once
    assert _complete(live, chat_ids).choices[0].text == r.choices[0].text
    ended = _complete(live, logit_bias={str(server.tokenizer.im_end_id): 100})
    assert (ended.choices[0].text, ended.choices[0].finish_reason) == ("", "stop")


def test_several_prompts_and_n_choices_come_back_prompt_major(live):
    tok = live.server.tokenizer
    prompts = ["Once upon a time", CHATML, tok.encode("The owl")]
    alone = [_complete(live, p).choices[0].text for p in prompts]
    r = _complete(live, prompts, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices] == [t for t in alone for _ in range(2)]
    assert r.usage.prompt_tokens == sum(_complete(live, p).usage.prompt_tokens for p in prompts)
    seeded = _complete(live, "Once upon a time", n=2, temperature=1.5, seed=7)
    again = [_complete(live, "Once upon a time", temperature=1.5, seed=s).choices[0].text for s in (7, 8)]
    assert [c.text for c in seeded.choices] == again  # (choice j: seed + j, as the chat route)


def test_streamed_chunks_join_to_the_text_with_echo_and_logprobs(live):
    kw = dict(prompt="Once upon a time", max_tokens=10, n=2, temperature=1.2, seed=3)
    whole = _complete(live, **kw)
    chunks = list(_complete(live, stream=True, stream_options={"include_usage": True}, **kw))
    for i in range(2):
        parts = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(p.text for p in parts) == whole.choices[i].text
        assert parts[-1].finish_reason == whole.choices[i].finish_reason and parts[-1].text == ""
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    echoed = _complete(live, echo=True, **kw)
    assert [c.text for c in echoed.choices] == ["Once upon a time" + c.text for c in whole.choices]
    streamed = list(_complete(live, echo=True, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == 0) == echoed.choices[0].text

    scored = _complete(live, prompt="Once upon a time", max_tokens=10, logprobs=3)
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == scored.usage.completion_tokens
    assert "".join(lp.tokens).startswith(scored.choices[0].text) or "\ufffd" in "".join(lp.tokens)
    for token, value, tops, offset, nxt in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset,
                                               lp.text_offset[1:] + [None]):
        assert tops[token] == value and 3 <= len(tops) <= 4 and max(tops.values()) >= value
        assert nxt is None or nxt == offset + len(token)
    parts = list(_complete(live, prompt="Once upon a time", max_tokens=10, logprobs=3, stream=True))
    joined = [t for c in parts if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert joined == lp.token_logprobs


def test_default_length_is_openai_s_16_tokens(live):
    r = _client(live).completions.create(model="tiny-qwen", prompt="Once upon a time", temperature=0,
                                         logit_bias={str(live.server.tokenizer.encode("x")[0]): 100})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == "x" * 16


@pytest.mark.parametrize("kw, param", [
    (dict(suffix="def f():"), "suffix"),
    (dict(logprobs=21), "logprobs"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=""), "prompt"),
    (dict(prompt=["a", ""]), "prompt[1]"),
    (dict(prompt=[1, -2]), "prompt"),
    (dict(prompt=[[1], [10**7]]), "prompt[1]"),
    (dict(prompt={"text": "a"}), "prompt"),
    (dict(prompt="word " * 300), "prompt"),  # (over --max-model-len 256)
    (dict(max_tokens=250), "max_tokens"),
    (dict(prompt=["a", "b", "c"], n=3), "prompt"),  # (9 rows: more than --max-batch 4 + --max-queue 2)
    (dict(stop_token_ids=[10**7]), "stop_token_ids"),
    (dict(best_of=2), "best_of"),
    (dict(model="nope"), "model"),
])
def test_what_the_server_cannot_do_is_a_400_naming_the_field(live, kw, param):
    if param == "model":
        with pytest.raises(openai.NotFoundError) as e:
            _complete(live, **kw)
        assert e.value.body["param"] == "model"
        return
    extra = {k: kw.pop(k) for k in ("stop_token_ids", "best_of") if k in kw}
    err = _bad(live, extra_body=extra, **kw)
    assert err["param"] == param, err
    if param == "prompt" and "word" in str(kw.get("prompt")):
        assert err["code"] == "context_length_exceeded" and "the prompt has" in err["message"], err


def test_a_prompt_with_a_lone_surrogate_is_a_400_naming_it(live):
    """JSON lets a broken \\ud800 escape through (the openai client cannot send one: raw JSON here)."""
    httpx = pytest.importorskip("httpx")
    raw = '{"model": "tiny-qwen", "prompt": ["ok", "x \\ud800"], "max_tokens": 2}'
    r = httpx.post(live.api_url + "/completions", content=raw, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[1]", r.text
    assert "surrogate" in r.json()["error"]["message"]


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(live):
    """lm-eval's local-completions log-likelihood request (token ids, echo, logprobs 1, max_tokens 1, temperature 0):
    an entry for every prompt token and the generated one, the first null; each prompt token's log-probability is
    the model's own (the log_softmax of its forward, fp32 here) and sits in its top_logprobs, where the most likely
    token's value is the top one (lm-eval's is_greedy); streamed, the same entries with the prompt's text first."""
    import torch

    from finetune import load_model

    tok = live.server.tokenizer
    ids = tok.encode("The silver owl guards the old library at night.")
    r = _complete(live, ids, echo=True, logprobs=1, max_tokens=1)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 == len(lp.top_logprobs) == len(lp.tokens) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    assert r.choices[0].text.startswith(tok.decode(ids))
    model = load_model(live.model_dir)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)[:-1]
    want = want.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(ids)]), want, atol=1e-4, rtol=0)
    for value, tops in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert value in tops.values() and 1 <= len(tops) <= 2 and max(tops.values()) >= value
    chunks = list(_complete(live, ids, echo=True, logprobs=1, max_tokens=1, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs] == \
        lp.token_logprobs


def test_return_tokens_as_token_ids_names_each_token_by_its_id(live):
    """vLLM's return_tokens_as_token_ids (RL and evaluation clients read the ids back): every token of the logprobs,
    the alternatives too, is "token_id:N", N the id the model generated, on both routes; bytes stay the token's."""
    tok = live.server.tokenizer
    r = _complete(live, "Once upon a time", max_tokens=6, logprobs=2, echo=True,
                  extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    prompt = tok.encode("Once upon a time")
    assert ids[:len(prompt)] == prompt and tok.decode(ids) == r.choices[0].text
    assert all(k.startswith("token_id:") for tops in lp.top_logprobs[1:] for k in tops)
    chat = _client(live).chat.completions.create(model="tiny-qwen", messages=[{"role": "user", "content": Q}],
                                                 temperature=0, max_tokens=6, logprobs=True, top_logprobs=2,
                                                 extra_body={"return_tokens_as_token_ids": True})
    content = chat.choices[0].logprobs.content
    ids = [int(e.token.removeprefix("token_id:")) for e in content]
    assert tok.decode(ids).strip() == chat.choices[0].message.content
    raw = [tok.convert_ids_to_tokens(i) for i in ids]  # (a special token's is its text)
    assert [bytes(e.bytes) for e in content] == [r.encode() if isinstance(r, str) else r for r in raw]
    assert all(t.token.startswith("token_id:") for e in content for t in e.top_logprobs)
