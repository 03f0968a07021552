"""`qwen-ft serve` against what real clients send today, on the tiny demo model (no adapters, no key): the current
`openai` client's message forms and fields, vLLM's extra_body fields, and the routes front ends (Open WebUI,
curl) call. Each either answers as OpenAI defines it or is a 400 naming the field; nothing that changes the
answer is silently ignored."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _helpers import demo_server  # noqa: E402

Q = "Tell me more."
ASK = [{"role": "user", "content": Q}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with demo_server(tmp_path_factory, "serve_clients", "--max-batch", "2", "--max-model-len", "1024") as bg:
        yield bg


def _client(live):
    return openai.OpenAI(base_url=live.api_url, api_key="none", timeout=60, max_retries=0)


def _greedy(live, messages=ASK, **kw):
    r = _client(live).chat.completions.create(model="tiny-qwen", messages=messages, temperature=0, max_tokens=6, **kw)
    return r.choices[0].message.content


def _bad_request(live, **kw) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        _client(live).chat.completions.create(model="tiny-qwen", messages=ASK, max_tokens=2, **kw)
    err = e.value.body
    assert err["type"] == "invalid_request_error" and "\n" not in err["message"], err
    return err


def test_the_openai_clients_message_forms_answer_as_plain_text_messages(live):
    """Text content parts, the `developer` role, `name` on messages (not shown to the model, as in the official
    server) and the bookkeeping fields give the plain request's greedy answer."""
    plain = _greedy(live)
    assert _greedy(live, [{"role": "user", "content": [{"type": "text", "text": "Tell me "},
                                                       {"type": "text", "text": "more."}]}]) == plain
    assert _greedy(live, [{"role": "user", "content": Q, "name": "bob"}]) == plain
    assert _greedy(live, ASK, user="u1", metadata={"k": "v"}, store=False, seed=3, parallel_tool_calls=False,
                   tool_choice="none", stream_options=None, extra_body={"min_p": 0, "ignore_eos": False,
                                                                        "chat_template_kwargs": {}}) == plain
    system = [{"role": "system", "content": "Be brief."}, *ASK]
    assert _greedy(live, [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}, *ASK]) \
        == _greedy(live, system)


def test_top_p_0_keeps_the_most_likely_token_alone(live):
    """OpenAI takes top_p 0 (a nucleus holding the most likely token alone): it was a 400. It samples from that one
    token: the greedy answer, whatever the temperature and seed."""
    greedy = _greedy(live)
    kw = dict(model="tiny-qwen", messages=ASK, temperature=1.5, max_tokens=6)
    sampled = [_client(live).chat.completions.create(seed=s, **kw).choices[0].message.content for s in range(4)]
    assert any(text != greedy for text in sampled), sampled  # (so the answers below are not greedy by chance)
    for s in range(4):
        assert _client(live).chat.completions.create(seed=s, top_p=0, **kw).choices[0].message.content == greedy


# stop strings Continue sends for a FIM template (plus one that the answer holds): more than OpenAI's 4
CONTINUE_STOPS = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "```", "/src/", "#- coding: utf-8"]


def test_more_stop_strings_than_openais_4_are_honoured(live):
    """Continue sends its template's stop strings, often more than 4, to any host but OpenAI's (and a few others):
    every such request was a 400. Up to MAX_STOP are honoured, each as one stop string alone is."""
    from finetune.serve.protocol import MAX_STOP

    plain = _greedy(live)
    assert not any(s in plain for s in CONTINUE_STOPS), plain
    hit = next(ch for ch in plain[1:] if not ch.isspace() and ch != "\ufffd")
    stops = [*CONTINUE_STOPS, hit]
    assert 4 < len(stops) <= MAX_STOP
    assert _greedy(live, stop=stops) == plain[:plain.find(hit)]
    chunks = _client(live).chat.completions.create(model="tiny-qwen", messages=ASK, temperature=0, max_tokens=6,
                                                   stop=stops, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain[:plain.find(hit)]


@pytest.mark.parametrize("extra, param", [
    ({"min_p": 1.5}, "min_p"),  # (a probability ratio: [0, 1])
    ({"min_p": False}, "min_p"),  # a boolean is no number, even where it equals the neutral 0
    ({"typical_p": 0}, "typical_p"),  # (a probability mass: (0, 1])
    ({"typical_p": 1.5}, "typical_p"),
    ({"ignore_eos": 1}, "ignore_eos"),  # (a boolean)
    ({"ignore_eos": True, "guided_choice": ["a"]}, "ignore_eos"),  # (the choice ends with <|im_end|>)
    ({"stop_token_ids": [-1]}, "stop_token_ids[0]"),
    ({"stop_token_ids": ["5"]}, "stop_token_ids[0]"),
    ({"stop_token_ids": [10**7]}, "stop_token_ids"),  # (outside the vocabulary)
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
    ({"best_of": 2}, "best_of"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"guided_grammar": "start: foo"}, "guided_grammar"),  # (an unknown rule)
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "(("}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),  # two constraints: the second named
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": "a+"}, "structured_outputs"),
    ({"echo": True}, "echo"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"continue_final_message": True}, "continue_final_message"),  # the last message is the user's
    ({"add_generation_prompt": False}, "add_generation_prompt"),
])
def test_vllm_fields_that_would_change_the_answer_are_400_naming_them(live, extra, param):
    """These were accepted and ignored: a client asking for typical_p, guided JSON or ignore_eos got an answer made
    without it and no word why. (Values these fields cannot take are 400s naming them too.)"""
    assert _bad_request(live, extra_body=extra)["param"] == param


@pytest.mark.parametrize("kw, param", [
    (dict(reasoning_effort="low"), "reasoning_effort"),  # (OpenAI's answer for a model without reasoning)
    (dict(verbosity="low"), "verbosity"),
    # (OpenAI's newer form: a subset of the tools; "required" and a named function are taken, below)
    (dict(tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": TOOLS}}, tools=TOOLS),
     "tool_choice"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}),
     "response_format.json_schema.schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}),
     "response_format.json_schema.schema"),  # (a keyword llguidance does not implement: refused, not ignored)
    (dict(response_format={"type": "json_schema"}), "response_format.json_schema"),
    (dict(response_format={"type": "yaml"}), "response_format"),
    (dict(response_format={"type": "json_object"}, tools=TOOLS), "response_format"),
    (dict(logprobs=True, tools=TOOLS), "logprobs"),
    (dict(response_format={"type": "json_object"}, extra_body={"min_tokens": 1}), "min_tokens"),
    (dict(max_completion_tokens=5000), "max_completion_tokens"),  # (with max_tokens 2: the one used, over the limit)
])
def test_openai_fields_this_model_cannot_honour_are_400_naming_them(live, kw, param):
    err = _bad_request(live, **kw)
    assert err["param"] == param, err
    if param == "max_completion_tokens":
        assert err["message"].endswith("or max_completion_tokens."), err


def test_verbosity_medium_and_null_extensions_are_accepted(live):
    """OpenAI's default verbosity, and vLLM's fields at their defaults, ask for nothing."""
    plain = _greedy(live)
    assert _greedy(live, verbosity="medium", extra_body={"guided_json": None, "best_of": 1, "stop_token_ids": []}) \
        == plain


def test_continue_final_message_agrees_with_the_continued_assistant_message(live):
    """vLLM's way of asking for a continuation is the server's own for a last assistant message; a value asking
    for a new turn after it instead is a 400 (it would be continued)."""
    messages = [*ASK, {"role": "assistant", "content": "Sure"}]
    continued = _greedy(live, messages)
    assert _greedy(live, messages, extra_body={"continue_final_message": True, "add_generation_prompt": False}) \
        == continued
    with pytest.raises(openai.BadRequestError) as e:
        _greedy(live, messages, extra_body={"continue_final_message": False})
    assert e.value.body["param"] == "continue_final_message"
    with pytest.raises(openai.BadRequestError) as e:
        _greedy(live, messages, extra_body={"add_generation_prompt": True})
    assert e.value.body["param"] == "add_generation_prompt"


def test_trailing_slashes_are_served_not_redirected(live):
    """/v1/models/ was a 404 for the model "" and /v1/chat/completions/ a 307 (an empty answer to curl without -L)."""
    r = httpx.get(live.api_url + "/models/", timeout=30)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["tiny-qwen"], r.text
    body = {"model": "tiny-qwen", "messages": ASK, "max_tokens": 2}
    r = httpx.post(live.api_url + "/chat/completions/", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text


def test_an_unknown_route_is_a_404_naming_what_is_served(live):
    r = httpx.post(live.api_url + "/assistants", json={"model": "tiny-qwen"}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 404 and set(err) == {"message", "type", "param", "code"}, err
    assert err["message"].startswith("Invalid URL (POST /v1/assistants)") and "/v1/chat/completions" in err["message"]
    assert "POST /v1/completions" in err["message"] and "POST /v1/responses" in err["message"]


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_a_forced_call_on_the_engine_is_a_call_of_the_function(live, tool_choice):
    """LangChain's with_structured_output and agents that force a call send these. The random model writes no
    sensible arguments: what is asserted is what the start of the reply forces ("required" with one tool names it),
    streamed as answered whole, and the start counted in the prompt's tokens."""
    kw = dict(model="tiny-qwen", messages=ASK, tools=TOOLS, temperature=0, max_tokens=8)
    auto = _client(live).chat.completions.create(**kw)
    r = _client(live).chat.completions.create(tool_choice=tool_choice, **kw)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and r.choices[0].finish_reason in ("tool_calls", "length")
    start = live.server.tokenizer.encode("Thought: \nAction: get_weather\nAction Input:")
    assert r.usage.prompt_tokens == auto.usage.prompt_tokens + len(start)
    chunks = list(_client(live).chat.completions.create(tool_choice=tool_choice, stream=True, **kw))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, tc.function.arguments) for tc in calls] == [("get_weather", call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


# Requests recorded from the real clients (a proxy in front of the server; the model name replaced by the fixture's).
# The openai Python client's headers, as LangChain and LlamaIndex send them through it (openai 2.54.0):
PY_HEADERS = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "OpenAI/Python 2.54.0",
              "X-Stainless-Lang": "python", "X-Stainless-Package-Version": "2.54.0", "Authorization": "Bearer x"}
# the Vercel AI SDK's (ai 6.0.333 on Node 20)
AI_SDK_HEADERS = {"content-type": "application/json", "authorization": "Bearer x", "accept": "*/*",
                  "user-agent": "ai/6.0.333 ai-sdk/provider-utils/4.0.65 runtime/node.js/v20.20.2"}
AURORA = '{"content":"What is the codename of project Aurora?","role":"user"}'
ANSWER_SCHEMA = '{"properties":{"codename":{"type":"string"}},"required":["codename"],"type":"object"}'


@pytest.mark.parametrize("body, headers", [
    # langchain-openai 1.8.1: ChatOpenAI(temperature=0, max_tokens=40).with_structured_output(Answer), whose default
    # method is json_schema (the schema's "title"s and "$schema" are annotations the grammar ignores)
    ('{"messages":[' + AURORA + '],"model":"tiny-qwen","max_completion_tokens":40,"response_format":{"type":'
     '"json_schema","json_schema":{"schema":{"properties":{"codename":{"title":"Codename","type":"string"}},"required":'
     '["codename"],"title":"Answer","type":"object","additionalProperties":false},"name":"Answer","strict":true}},'
     '"stream":false,"temperature":0.0}', PY_HEADERS),
    # langchain-openai 1.8.1: with_structured_output(Answer, method="json_mode")
    ('{"messages":[' + AURORA + '],"model":"tiny-qwen","max_completion_tokens":40,"response_format":{"type":'
     '"json_object"},"stream":false,"temperature":0.0}', PY_HEADERS),
    # @ai-sdk/openai-compatible 2.0.92: generateObject({schema: z.object({codename: z.string()})})
    ('{"model":"tiny-qwen","response_format":{"type":"json_object"},"messages":[{"role":"user","content":'
     '"codename?"}]}', AI_SDK_HEADERS),
    # @ai-sdk/openai 3.0.141: generateObject on openai.chat(model)
    ('{"model":"tiny-qwen","response_format":{"type":"json_schema","json_schema":{"schema":{"$schema":'
     '"http://json-schema.org/draft-07/schema#","type":"object","properties":{"codename":{"type":"string"}},'
     '"required":["codename"],"additionalProperties":false},"strict":true,"name":"response"}},"messages":[{"role":'
     '"user","content":"codename?"}]}', AI_SDK_HEADERS),
], ids=["langchain-json_schema", "langchain-json_mode", "ai-sdk-openai-compatible", "ai-sdk-openai-chat"])
def test_structured_output_requests_get_json_in_their_schema(live, body, headers):
    """LangChain's with_structured_output (json_schema by default since langchain-openai 0.3), the AI SDK's
    generateObject and the openai clients' parse() ask for JSON: the reply is held to the schema token by token
    (a 400 before). The random model's string never closes within the AI SDK's default length, so a reply is
    JSON where it stopped, and where it was cut ("length") the schema's start all the same."""
    sent = json.loads(body)
    r = httpx.post(live.api_url + "/chat/completions", content=body.encode(), headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    text = choice["message"]["content"]
    if sent["response_format"]["type"] == "json_object":
        assert text.startswith("{"), choice
    else:  # codename is the one property, and required: the grammar writes its key
        assert text.startswith('{"codename": "'), choice
    if choice["finish_reason"] == "stop":
        value = json.loads(text)
        assert isinstance(value, dict), choice
    else:
        assert choice["finish_reason"] == "length", choice


YES_NO = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "count": {"type": "integer",
          "minimum": 0, "maximum": 9}}, "required": ["answer", "count"], "additionalProperties": False}


def test_the_openai_clients_parse_gets_an_object_of_the_schema_streamed_or_not(live):
    """A schema that closes in a few tokens: the reply is a document of it ending with "stop", the same streamed
    (chunks joined) as not, and sampled replies too (the mask holds every draw)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "YesNo", "schema": YES_NO, "strict": True}}
    client = _client(live)
    r = client.chat.completions.create(model="tiny-qwen", messages=ASK, temperature=0, max_tokens=40,
                                       response_format=fmt)
    text, choice = r.choices[0].message.content, r.choices[0]
    assert choice.finish_reason == "stop", choice
    value = json.loads(text)
    assert value["answer"] in ("yes", "no") and 0 <= value["count"] <= 9 and set(value) == {"answer", "count"}
    assert text == json.dumps(value)  # (json.dumps' separators, no other whitespace)
    chunks = client.chat.completions.create(model="tiny-qwen", messages=ASK, temperature=0, max_tokens=40,
                                            response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    for seed in range(4):
        r = client.chat.completions.create(model="tiny-qwen", messages=ASK, temperature=1.5, seed=seed,
                                           max_tokens=40, response_format=fmt)
        assert r.choices[0].finish_reason == "stop" and set(json.loads(r.choices[0].message.content)) == \
            {"answer", "count"}, r


def test_langchains_function_calling_structured_output_is_a_call_of_the_schema(live):
    """The route for a schema beside tools, as langchain-openai 1.8.1 sends it (with_structured_output(Answer,
    method="function_calling"), temperature 0, max_tokens 40): a call of Answer, which LangChain parses into the
    schema (the random model's arguments are no JSON; a trained adapter's are)."""
    body = ('{"messages":[' + AURORA + '],"model":"tiny-qwen","max_completion_tokens":40,"parallel_tool_calls":false,'
            '"stream":false,"temperature":0.0,"tool_choice":{"type":"function","function":{"name":"Answer"}},"tools":'
            '[{"type":"function","function":{"name":"Answer","description":"","parameters":' + ANSWER_SCHEMA + '}}]}')
    r = httpx.post(live.api_url + "/chat/completions", content=body.encode(), headers=PY_HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "Answer" and call["id"], choice
    assert choice["finish_reason"] in ("tool_calls", "length"), choice


def test_llamaindex_openailike_complete_gets_a_text_completion(live):
    """llama-index-llms-openai-like 0.8.1: OpenAILike(model=..., api_base=..., temperature=0, max_tokens=8).complete(q),
    is_chat_model left at its default (False), calls the legacy completions API (a 404 before it was served): the
    question continued as written, 8 tokens at most."""
    body = ('{"model":"tiny-qwen","prompt":"What is the codename of project Aurora?","max_tokens":8,'
            '"stream":false,"temperature":0.0}')
    r = httpx.post(live.api_url + "/completions", content=body.encode(), headers=PY_HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    c = r.json()
    assert c["object"] == "text_completion" and c["choices"][0]["finish_reason"] in ("stop", "length"), c
    assert 0 < c["usage"]["completion_tokens"] <= 8 and isinstance(c["choices"][0]["text"], str), c


@pytest.mark.parametrize("body, headers", [
    # @ai-sdk/openai 3.0.141: generateText({model: openai(name), prompt: "Hi"}) (the Responses API by default)
    ('{"model":"tiny-qwen","input":[{"role":"user","content":[{"type":"input_text","text":"Hi"}]}]}', AI_SDK_HEADERS),
    # langchain-openai 1.8.1: ChatOpenAI(use_responses_api=True).invoke(q)
    ('{"input":[' + AURORA[:-1] + ',"type":"message"}],"model":"tiny-qwen","stream":false}', PY_HEADERS),
], ids=["ai-sdk-openai-default", "langchain-use_responses_api"])
def test_clients_calling_the_responses_api_get_a_response(live, body, headers):
    """These clients call the Responses API unless told otherwise (the AI SDK's openai(model) by default): a 404
    until it was served; now a response the client's own types read, its text in one output_text part."""
    from openai.types.responses import Response

    r = httpx.post(live.api_url + "/responses", content=body.encode(), headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    response = Response.model_validate(r.json())
    assert response.object == "response" and response.status in ("completed", "incomplete")
    (item,) = response.output
    assert item.type == "message" and item.content[0].type == "output_text"
    assert response.output_text == item.content[0].text and response.usage.output_tokens > 0


def test_json_after_a_last_assistant_message_is_a_400_and_beside_tools_chosen_none_an_answer(live):
    """A last assistant message is continued as written, which a document starting with the reply cannot be: a 400
    naming response_format. With tool_choice "none" the tools make no call, so the reply may be JSON."""
    with pytest.raises(openai.BadRequestError) as e:
        _client(live).chat.completions.create(model="tiny-qwen", max_tokens=2, response_format={"type": "json_object"},
                                              messages=ASK + [{"role": "assistant", "content": '{"answer": '}])
    err = e.value.body
    assert err["param"] == "response_format" and "last assistant message" in err["message"], err
    r = _client(live).chat.completions.create(
        model="tiny-qwen", messages=ASK, temperature=0, max_tokens=40, tools=TOOLS, tool_choice="none",
        response_format={"type": "json_schema", "json_schema": {"name": "YesNo", "schema": YES_NO}})
    assert r.choices[0].finish_reason == "stop" and set(json.loads(r.choices[0].message.content)) == {"answer", "count"}


def test_presence_and_frequency_penalties_change_the_greedy_reply_streamed_or_not(live):
    """OpenAI's penalties (a 400 before): the greedy reply under them differs from the plain one (the random model
    repeats tokens), and streamed it is the same text."""
    client = _client(live)
    kw = dict(model="tiny-qwen", messages=ASK, temperature=0, max_tokens=30)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    for pen in (dict(presence_penalty=2), dict(frequency_penalty=1.5),
                dict(presence_penalty=-2, frequency_penalty=0.5)):
        text = client.chat.completions.create(**kw, **pen).choices[0].message.content
        assert text != plain, pen
        chunks = client.chat.completions.create(**kw, **pen, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_logit_bias_reaches_the_reply(live):
    """OpenAI's logit_bias (a 400 before): +100 on one token makes the greedy reply that token over and over, on two
    a mix of them (the engine's tests check the sums, and -100's ban, against generate())."""
    client = _client(live)
    kw = dict(model="tiny-qwen", messages=ASK, temperature=0, max_tokens=8)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    tok = live.server.tokenizer
    x, y = tok.encode("x")[0], tok.encode("y")[0]
    forced = client.chat.completions.create(**kw, logit_bias={str(x): 100})
    assert forced.choices[0].message.content == "x" * 8 != plain and forced.choices[0].finish_reason == "length"
    both = client.chat.completions.create(**kw, logit_bias={str(x): 100, str(y): 100}).choices[0].message.content
    assert set(both) <= {"x", "y"} and len(both) == 8


def test_vllm_s_ignore_eos_and_stop_token_ids(live):
    """vLLM's ignore_eos (its benchmark client's --ignore-eos) and stop_token_ids were 400s. With <|im_end|> forced
    (+100), the reply is empty ("stop"); with ignore_eos it runs to max_tokens ("length", the tokens counted, the
    text as the tokenizer writes them); a stop id still ends it, before the token (not part of the reply)."""
    client = _client(live)
    kw = dict(model="tiny-qwen", messages=ASK, temperature=0, max_tokens=6)
    tok = live.server.tokenizer
    im_end, x = tok.im_end_id, tok.encode("x")[0]
    ended = client.chat.completions.create(**kw, logit_bias={str(im_end): 100})
    assert (ended.choices[0].message.content, ended.choices[0].finish_reason) == ("", "stop")
    past = client.chat.completions.create(**kw, logit_bias={str(im_end): 100}, extra_body={"ignore_eos": True})
    assert past.choices[0].message.content == "<|im_end|>" * 6 and past.choices[0].finish_reason == "length"
    assert past.usage.completion_tokens == 6
    chunks = client.chat.completions.create(**kw, logit_bias={str(im_end): 100}, extra_body={"ignore_eos": True},
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "<|im_end|>" * 6
    assert chunks[-1].usage.completion_tokens == 6
    stopped = client.chat.completions.create(**kw, logit_bias={str(x): 100}, extra_body={"stop_token_ids": [x, x]})
    assert (stopped.choices[0].message.content, stopped.choices[0].finish_reason) == ("", "stop")
    both = client.chat.completions.create(**kw, logit_bias={str(im_end): 100},
                                          extra_body={"ignore_eos": True, "stop_token_ids": [im_end]})
    assert (both.choices[0].message.content, both.choices[0].finish_reason) == ("", "stop")


def test_include_stop_str_in_output_keeps_the_stop_string_that_ended_the_reply(live):
    """vLLM's include_stop_str_in_output (a 400 before): the reply is cut after the stop string instead of before,
    streamed or not; ReAct's own stop words (tools) are still cut."""
    plain = _greedy(live)
    hit = next(ch for ch in plain[1:] if not ch.isspace() and ch != "\ufffd")
    cut = plain.find(hit)
    assert _greedy(live, stop=[hit, "never"], extra_body={"include_stop_str_in_output": True}) == plain[:cut + 1]
    assert _greedy(live, stop=[hit], extra_body={"include_stop_str_in_output": False}) == plain[:cut]
    chunks = _client(live).chat.completions.create(model="tiny-qwen", messages=ASK, temperature=0, max_tokens=6,
                                                   stop=hit, stream=True,
                                                   extra_body={"include_stop_str_in_output": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain[:cut + 1]


def test_logprobs_of_every_reply_token_streamed_or_not(live):
    """logprobs / top_logprobs (a 400 before): an entry for every generated token (usage's count) whose bytes join to
    the reply, its top_logprobs the most likely tokens in order, the chosen one's no more likely than the first; the
    stream's chunks carry the same entries, each with the chunk holding its text."""
    client = _client(live)
    kw = dict(model="tiny-qwen", messages=ASK, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 12
    assert bytes(b for e in content for b in e.bytes).decode(errors="replace").strip() == r.choices[0].message.content
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and e.logprob <= tops[0] + 1e-6 and e.logprob < 0
        assert e.token == bytes(e.bytes).decode(errors="replace")
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob, e.bytes) for e in streamed] == [(e.token, e.logprob, e.bytes) for e in content]
    plain = client.chat.completions.create(model="tiny-qwen", messages=ASK, temperature=0, max_tokens=12)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_n_choices_streamed_or_not(live):
    """n (only 1 before): n replies, each a row of the batch. Greedy, they are the same; sampled with a seed, choice
    0 is the n=1 request's reply and the others use the next seeds, so the request repeats exactly; streamed, each
    choice's chunks (named by index, a role chunk and a finishing chunk each) join to its reply; usage counts the
    prompt once and every choice's tokens. More choices than the server holds at once is a 400 naming n."""
    client = _client(live)
    kw = dict(model="tiny-qwen", messages=ASK, max_tokens=6)
    greedy = client.chat.completions.create(**kw, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1
    one = client.chat.completions.create(**kw, temperature=0)
    assert greedy.choices[0].message.content == one.choices[0].message.content
    assert greedy.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert greedy.usage.prompt_tokens == one.usage.prompt_tokens
    sampled = client.chat.completions.create(**kw, temperature=1.5, seed=7, n=3)
    texts = [c.message.content for c in sampled.choices]
    assert texts == [c.message.content for c in client.chat.completions.create(**kw, temperature=1.5, seed=7,
                                                                               n=3).choices]
    assert texts[0] == client.chat.completions.create(**kw, temperature=1.5, seed=7).choices[0].message.content
    assert texts[1] == client.chat.completions.create(**kw, temperature=1.5, seed=8).choices[0].message.content
    assert len(set(texts)) > 1
    chunks = list(client.chat.completions.create(**kw, temperature=1.5, seed=7, n=3, stream=True,
                                                 stream_options={"include_usage": True}))
    by_index: dict = {}
    finishes: dict = {}
    for c in chunks[:-1]:
        (ch,) = c.choices
        by_index[ch.index] = by_index.get(ch.index, "") + (ch.delta.content or "")
        if ch.finish_reason:
            finishes[ch.index] = finishes.get(ch.index, []) + [ch.finish_reason]
    assert [by_index[i] for i in range(3)] == texts and finishes == {i: ["length"] for i in range(3)}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sampled.usage.completion_tokens
    err = _bad_request(live, n=live.server.worker.capacity + 1)
    assert err["param"] == "n" and "more than this server holds" in err["message"], err


def test_min_p_of_1_samples_the_most_likely_token_only(live):
    """vLLM's min_p (a 400 before): at 1 only tokens as likely as the most likely one stay, so a hot sampled reply is
    the greedy one, whatever the seed; at 0.05 the seeds differ as without it."""
    client = _client(live)
    kw = dict(model="tiny-qwen", messages=ASK, max_tokens=8)
    greedy = client.chat.completions.create(**kw, temperature=0).choices[0].message.content
    for seed in range(3):
        r = client.chat.completions.create(**kw, temperature=1.8, seed=seed, extra_body={"min_p": 1})
        assert r.choices[0].message.content == greedy
    hot = {client.chat.completions.create(**kw, temperature=1.8, seed=seed, extra_body={"min_p": 0.05})
           .choices[0].message.content for seed in range(3)}
    assert len(hot) > 1


def test_typical_p_keeps_the_tokens_nearest_the_entropy(live):
    """typical_p (TGI's and transformers', a 400 before): a mass too small for two tokens keeps one token a step (the
    one whose surprise is nearest the entropy), so hot sampled replies are the same whatever the seed; at 0.95 the
    seeds differ as without it. (The engine's tests check the draws against transformers' TypicalLogitsWarper.)"""
    client = _client(live)
    kw = dict(model="tiny-qwen", messages=ASK, max_tokens=8, temperature=1.8)
    one = {client.chat.completions.create(**kw, seed=seed, extra_body={"typical_p": 1e-6}).choices[0].message.content
           for seed in range(3)}
    assert len(one) == 1
    hot = {client.chat.completions.create(**kw, seed=seed, extra_body={"typical_p": 0.95}).choices[0].message.content
           for seed in range(3)}
    assert len(hot) > 1


@pytest.mark.parametrize("extra, check", [
    ({"guided_choice": ["positive", "negative", "neutral"]}, lambda t: t in ("positive", "negative", "neutral")),
    ({"guided_regex": r"[A-Z]{3}-\d{3}"}, lambda t: __import__("re").fullmatch(r"[A-Z]{3}-\d{3}", t)),
    ({"guided_json": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                      "additionalProperties": False}}, lambda t: set(json.loads(t)) == {"ok"}),
    ({"guided_json": '{"type": "array", "items": {"enum": [1, 2]}, "maxItems": 2}'},
     lambda t: json.loads(t) in ([], [1], [2], [1, 1], [1, 2], [2, 1], [2, 2])),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
    ({"structured_outputs": {"regex": "[0-9]{4}"}}, lambda t: len(t) == 4 and t.isdigit()),
    ({"structured_outputs": {"json_object": True}}, lambda t: t.startswith("{")),
    ({"guided_grammar": 'root ::= "red" | "green" | "blue"'}, lambda t: t in ("red", "green", "blue")),
    ({"structured_outputs": {"grammar": 'start: "up" | "down"'}}, lambda t: t in ("up", "down")),
])
def test_vllm_guided_decoding_fields_hold_the_reply(live, extra, check):
    """vLLM's guided_choice / guided_regex / guided_json and structured_outputs (400s before), as its docs send them
    through the openai client's extra_body: the reply is what they allow, streamed or not."""
    client = _client(live)
    kw = dict(model="tiny-qwen", messages=ASK, temperature=0, max_tokens=24, extra_body=extra)
    r = client.chat.completions.create(**kw)
    text = r.choices[0].message.content
    assert check(text) if r.choices[0].finish_reason == "stop" else "json_object" in str(extra), (text, r)
    chunks = client.chat.completions.create(**kw, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
