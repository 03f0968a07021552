"""`qwen-ft serve`'s request handling on a cheap server (the tiny demo model dir, no adapters, no key): sampling
defaults from the model dir's generation_config, the request fields the server refuses (400 naming the field),
bodies that are not JSON, unknown routes and methods as OpenAI error objects, /health."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from finetune.serve.protocol import MAX_STOP  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from finetune.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("serve_requests") / "tiny-qwen", seed=1)


@pytest.fixture(scope="module")
def live(model_dir):
    from finetune.serve.background import serve_in_background
    from finetune.serve.cli import _parser, build_server

    args = _parser().parse_args(["-m", str(model_dir), "--max-batch", "2", "--max-model-len", "200"])
    with serve_in_background(build_server(args), start_timeout=30) as bg:
        yield bg


def _body(**kw):
    from finetune.serve.protocol import ChatCompletionRequest

    return ChatCompletionRequest(**dict(dict(model="tiny-qwen", messages=[{"role": "user", "content": "hi"}]), **kw))


def test_sampling_defaults_are_the_model_dirs_generation_config(live):
    """As model.chat: the demo dir's generation_config.json samples (top_p 0.8, repetition_penalty 1.1);
    temperature 0 is greedy with the rest unchanged; request fields override."""
    server = live.server
    default = server.params(_body(), 30)
    assert (default.do_sample, default.top_p, default.top_k, default.repetition_penalty) == (True, 0.8, 0, 1.1)
    assert default.max_new_tokens == 200 - 30  # the dir's 512, capped by the room left under --max-model-len
    tok = server.tokenizer
    assert {tok.im_end_id, tok.im_start_id, tok.eod_id} <= set(default.stop_token_ids)
    greedy = server.params(_body(temperature=0), 30)
    assert (greedy.do_sample, greedy.repetition_penalty) == (False, 1.1)
    custom = server.params(_body(temperature=0.7, top_p=0.5, top_k=4, seed=3, max_tokens=9, min_tokens=2), 30)
    assert (custom.do_sample, custom.temperature, custom.top_p, custom.top_k, custom.seed, custom.max_new_tokens,
            custom.min_new_tokens) == (True, 0.7, 0.5, 4, 3, 9, 2)
    assert server.params(_body(top_k=-1), 30).top_k == 0  # vLLM's "off", which its clients send (was a 400)
    with pytest.raises(Exception, match="top_k"):
        server.params(_body(top_k=-2), 30)


def test_min_tokens_without_max_tokens_grows_the_default_length(live, monkeypatch):
    """min_tokens over the default length (the generation config's) was cut to it, and the reply ended with
    "length" before the minimum asked for; now the length grows to it, and past the room left it is a 400."""
    from finetune.serve.protocol import APIError

    server = live.server
    monkeypatch.setattr(server.gc, "max_new_tokens", 20)
    p = server.params(_body(min_tokens=50), 30)
    assert (p.max_new_tokens, p.min_new_tokens) == (50, 50)
    p = server.params(_body(min_tokens=5), 30)
    assert (p.max_new_tokens, p.min_new_tokens) == (20, 5)
    assert server.params(_body(min_tokens=170), 30).max_new_tokens == 170  # all the room under --max-model-len 200
    with pytest.raises(APIError) as e:
        server.params(_body(min_tokens=171), 30)
    assert (e.value.status, e.value.param, e.value.code) == (400, "min_tokens", "context_length_exceeded")
    assert "201 tokens" in e.value.message


def test_greedy_base_answer_equals_model_chat_and_max_completion_tokens_limits_it(live, model_dir):
    from finetune import load_model, load_tokenizer

    client = openai.OpenAI(base_url=live.api_url, api_key="none", timeout=60, max_retries=0)
    r = client.chat.completions.create(model="tiny-qwen", messages=[{"role": "user", "content": "Tell me more."}],
                                       temperature=0, max_completion_tokens=6)
    assert r.usage.completion_tokens <= 6
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    # (chat() drops the last token of a reply cut by max_new_tokens, as the official decoding: one more for it)
    assert r.choices[0].message.content == model.chat(tok, "Tell me more.", do_sample=False, max_new_tokens=7)[0]


def test_repetition_penalty_overrides_the_generation_configs(live, model_dir):
    """vLLM's extension (Qwen's docs send it in extra_body) was silently ignored: every request ran the model
    dir's 1.1."""
    from finetune import load_model, load_tokenizer

    assert live.server.params(_body(repetition_penalty=1.5), 30).repetition_penalty == 1.5
    client = openai.OpenAI(base_url=live.api_url, api_key="none", timeout=60, max_retries=0)
    q = "Tell me more, tell me more."
    r = client.chat.completions.create(model="tiny-qwen", messages=[{"role": "user", "content": q}], temperature=0,
                                       max_tokens=12, extra_body={"repetition_penalty": 1.5})
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    expected = model.chat(tok, q, do_sample=False, max_new_tokens=13, repetition_penalty=1.5)[0]  # (as above)
    assert r.choices[0].message.content == expected


def test_a_tiny_temperature_is_greedy_and_fails_no_request(live):
    """Below 0.01 is greedy, as in the official server: a seeded 1e-40 used to divide the scores to inf/NaN,
    and the failed draw ended every request in the batch with a 500."""
    client = openai.OpenAI(base_url=live.api_url, api_key="none", timeout=60, max_retries=0)
    kw = dict(model="tiny-qwen", messages=[{"role": "user", "content": "Tell me more."}], max_tokens=6)
    greedy = client.chat.completions.create(temperature=0, **kw).choices[0].message.content
    assert client.chat.completions.create(temperature=1e-40, seed=1, **kw).choices[0].message.content == greedy


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("kw, param", [
    (dict(stream_options={"include_usage": True}), "stream_options"),  # without stream: true
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),  # (OpenAI's limit: 20)
    (dict(top_logprobs=2), "top_logprobs"),  # without logprobs: true
    (dict(presence_penalty=2.5), "presence_penalty"),  # (OpenAI's range: [-2, 2])
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logit_bias={"5": 101}), "logit_bias"),  # (OpenAI's range: [-100, 100])
    (dict(logit_bias={"x": 1}), "logit_bias"),  # keys are token ids
    (dict(logit_bias={"-3": 1}), "logit_bias"),
    (dict(logit_bias={"999999": 1}), "logit_bias"),  # outside the vocabulary
    (dict(logit_bias={str(i): 1 for i in range(1025)}), "logit_bias"),  # more than MAX_BIASED
    (dict(response_format={"type": "xml"}), "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": "{}"}), "response_format.json_schema"),
    (dict(tool_choice={"type": "function", "function": {"name": "f"}}), "tool_choice"),
    (dict(modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}), "modalities"),
    (dict(audio={"voice": "alloy", "format": "wav"}), "audio"),
    (dict(web_search_options={}), "web_search_options"),  # ({} asks for a search with the defaults)
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(stop=[f"s{i}" for i in range(MAX_STOP + 1)]), "stop"),
    (dict(stop=""), "stop"),
    (dict(stop="\ud800"), "stop"),  # a lone surrogate: no generated text could ever match it
    (dict(stop=["a", "x\udfff"]), "stop[1]"),
    (dict(top_p=-0.1), "top_p"),
    (dict(repetition_penalty=1e-40), "repetition_penalty"),  # overflows the scores: a failed step for every row
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_completion_tokens=0), "max_completion_tokens"),
    (dict(max_completion_tokens=500), "max_completion_tokens"),  # over --max-model-len 200
    (dict(model=None), "model"),
])
def test_unsupported_or_bad_fields_are_400_naming_the_field(live, kw, param):
    body = {"model": "tiny-qwen", "messages": HI, **kw}
    body = {k: v for k, v in body.items() if v is not None}
    # (json.dumps' ASCII escapes: httpx's json= writes UTF-8, which has no lone surrogates)
    r = httpx.post(live.api_url + "/chat/completions", content=json.dumps(body), timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and "\n" not in err["message"], err


def test_text_output_and_openais_bookkeeping_fields_are_accepted(live):
    """modalities ["text"] is OpenAI's default; user, store, metadata, service_tier are ignored, as OpenAI does
    for a server that keeps no records."""
    body = {"model": "tiny-qwen", "messages": HI, "max_tokens": 1, "modalities": ["text"], "audio": None,
            "web_search_options": None, "user": "u1", "store": False, "metadata": {"a": "b"}, "service_tier": "auto"}
    r = httpx.post(live.api_url + "/chat/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant", r.text


def test_a_body_that_is_not_json_is_400(live):
    r = httpx.post(live.api_url + "/chat/completions", content=b"{not json", timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_unknown_routes_and_methods_are_openai_error_objects(live):
    r = httpx.get(live.api_url + "/completions/nope", timeout=30)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(live.api_url + "/chat/completions", timeout=30)
    assert r.status_code == 405 and "error" in r.json()


def test_health_and_models_without_a_key(live):
    h = httpx.get(live.url + "/health", timeout=30).json()
    assert h["status"] == "ok" and h["in_flight"] == 0
    models = openai.OpenAI(base_url=live.api_url, api_key="anything", timeout=30, max_retries=0).models.list()
    assert [m.id for m in models] == ["tiny-qwen"]


def test_a_model_dir_that_decodes_greedily_with_temperature_0_serves_greedy_answers(tmp_path):
    """generation_config.json with do_sample false and temperature 0 (a common way to write greedy) crashed
    `qwen-ft serve` with a traceback while it built the default sampling; now requests that set no temperature
    answer greedily, as model.chat does, and a request's own temperature still samples."""
    import json

    from finetune import load_model, load_tokenizer
    from finetune.demo import make_demo_model
    from finetune.serve.background import serve_in_background
    from finetune.serve.cli import _parser, build_server

    model_dir = make_demo_model(tmp_path / "tiny-qwen", seed=1)
    gen = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps(dict(gen, do_sample=False, temperature=0.0)))
    args = _parser().parse_args(["-m", str(model_dir), "--max-batch", "2", "--max-model-len", "200"])
    with serve_in_background(build_server(args), start_timeout=30) as bg:
        sampled, greedy = bg.server.default_sampling()
        assert (sampled.do_sample, sampled.temperature, greedy.do_sample) == (True, 1.0, False)
        assert bg.server.params(_body(temperature=0.7), 30).do_sample
        client = openai.OpenAI(base_url=bg.api_url, api_key="none", timeout=60, max_retries=0)
        r = client.chat.completions.create(model="tiny-qwen", messages=[{"role": "user", "content": "Tell me more."}],
                                           max_tokens=6)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    assert not model.generation_config.do_sample
    assert r.choices[0].message.content == model.chat(tok, "Tell me more.", max_new_tokens=7)[0]  # (as above)


def test_history_over_the_window_leaves_out_the_oldest_pairs_and_says_so(live, monkeypatch):
    """make_context leaves out the oldest user/assistant pairs past max_window_size, as model.chat does: the
    response says how many (a header), and a length error counts the prompt as built and says pairs were left
    out (it named the left-out prompt's count as the messages' own)."""
    from finetune import react
    from finetune.serve.app import LEFT_OUT_HEADER

    monkeypatch.setattr(live.server, "window", 60)
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"Question number {i} about the owl?"},
                    {"role": "assistant", "content": f"Answer number {i}: the owl is silver."}]
    messages = history + [{"role": "user", "content": "And now?"}]
    stats = {}
    ids = react.prompt_ids(live.server.tokenizer, react.build_turns(messages, []), 60, stats)
    assert 0 < stats["history_left_out"] < 6
    body = {"model": "tiny-qwen", "messages": messages, "max_tokens": 2, "temperature": 0}
    r = httpx.post(live.api_url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers[LEFT_OUT_HEADER] == str(stats["history_left_out"])
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    with httpx.stream("POST", live.api_url + "/chat/completions", json={**body, "stream": True}, timeout=60) as s:
        assert s.status_code == 200 and s.headers[LEFT_OUT_HEADER] == str(stats["history_left_out"])
        s.read()
    short = {**body, "messages": messages[-1:]}  # nothing left out: no header
    assert LEFT_OUT_HEADER not in httpx.post(live.api_url + "/chat/completions", json=short, timeout=60).headers
    r = httpx.post(live.api_url + "/chat/completions", json={**body, "max_tokens": 200 - len(ids) + 1}, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded", r.text
    assert f"{len(ids)} in the messages after the oldest {stats['history_left_out']} user/assistant pair" in \
        err["message"], err


def test_an_unsupported_tool_choice_is_quoted_as_the_json_sent():
    from finetune.serve.protocol import APIError

    with pytest.raises(APIError) as e:
        _body(tool_choice={"type": "custom", "custom": {"name": "f"}}).check()
    assert e.value.param == "tool_choice"
    assert """'{"type": "custom", "custom": {"name": "f"}}' is not supported""" in str(e.value), str(e.value)
