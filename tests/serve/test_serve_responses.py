"""POST /v1/responses (OpenAI's Responses API) through the official `openai` client, on the tiny model with a memorised
adapter and a function-calling one: a response answers what the chat route answers for the same messages (greedy:
the memorised answer), instructions are the system message, streamed events come in OpenAI's order and join to the
text, max_output_tokens ends a response "incomplete", a function tool round trip, JSON held to text.format's schema,
log-probabilities, errors naming the Responses field, an error after a stream started, and a disconnect freeing the
row. The shapes are checked against the client's own types (`Response`, the stream's events)."""

from __future__ import annotations

import json
import socket

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from openai.types.responses import Response  # noqa: E402

from _helpers import (ASK, MEMORISE, TOOL_RECORD, WEATHER, health_when, memorised_and_tools_server,  # noqa: E402
                      scripted_server)

CHAT_TOOLS = TOOL_RECORD["tools"]
TOOLS = [{"type": "function", **WEATHER}]  # (the Responses API's form: the function's fields beside the type)
YES_NO = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "count": {"type": "integer",
          "minimum": 0, "maximum": 9}}, "required": ["answer", "count"], "additionalProperties": False}
Q, A = MEMORISE[0]
KEY = "test-key"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The tiny model served with two adapters: "a" memorises MEMORISE, "tools" one function-calling exchange."""
    root = tmp_path_factory.mktemp("serve_responses")
    with memorised_and_tools_server(root, "--max-batch", "2", "--max-queue", "2", "--api-key", KEY) as bg:
        yield bg


def _client(live, key=KEY):
    return openai.OpenAI(base_url=live.api_url, api_key=key, timeout=120, max_retries=0)


def _chat(live, messages, **kw):
    return _client(live).chat.completions.create(messages=messages, temperature=0, **kw)


def _raw(live, body: dict) -> httpx.Response:
    return httpx.post(live.api_url + "/responses", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def _events(live, **kw) -> list:
    return list(_client(live).responses.create(stream=True, **kw))


def _bad(live, **kw) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        _client(live).responses.create(**{"model": "a", "input": Q, "max_output_tokens": 4, **kw})
    err = e.value.body
    assert err["type"] == "invalid_request_error" and "\n" not in err["message"], err
    return err


def test_a_string_input_answers_the_memorised_answer_as_the_chat_route_does(live):
    """The response object parses as the client's Response (every field it requires), its text is the greedy chat
    reply to the same message (the adapter's memorised answer), and its usage is the chat route's."""
    for q, memorised in MEMORISE[:2]:
        chat = _chat(live, [{"role": "user", "content": q}], model="a")
        r = _client(live).responses.create(model="a", input=q, temperature=0)
        assert r.output_text == chat.choices[0].message.content == memorised
        assert (r.object, r.status, r.incomplete_details, r.error, r.model) == ("response", "completed", None, None,
                                                                                 "a")
        assert r.id.startswith("resp_") and r.completed_at is not None
        (item,) = r.output
        assert (item.type, item.role, item.status, item.id[:4]) == ("message", "assistant", "completed", "msg_")
        assert [(c.type, c.annotations, c.logprobs) for c in item.content] == [("output_text", [], [])]
        assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (
            chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens)
        assert r.usage.input_tokens_details.cached_tokens == 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    raw = _raw(live, {"model": "a", "input": Q, "temperature": 0})
    assert raw.status_code == 200, raw.text
    strict = Response.model_validate(raw.json())  # (the client's parse does not check; pydantic's does)
    assert strict.output_text == A and strict.temperature == 0 and strict.tool_choice == "auto"
    assert strict.text.format.type == "text" and strict.parallel_tool_calls is True and strict.tools == []


def test_message_items_and_text_parts_are_the_same_messages(live):
    """Items with and without type "message", content as input_text parts, and a history whose assistant message
    the client sends back as the output item it got (output_text parts, its id and status): the chat route's
    answer to the same messages; a last assistant message is continued as there."""
    q2 = MEMORISE[1][0]
    history = [{"role": "user", "content": Q}, {"role": "assistant", "content": A}, {"role": "user", "content": q2}]
    chat = _chat(live, history, model="a").choices[0].message.content
    first = _client(live).responses.create(model="a", input=Q, temperature=0)
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": Q}]},
             first.output[0].model_dump(exclude_none=True),
             {"role": "user", "content": [{"type": "input_text", "text": q2[:5]}, {"type": "input_text",
                                                                                 "text": q2[5:]}]}]
    r = _client(live).responses.create(model="a", input=items, temperature=0)
    assert r.output_text == chat and r.usage.input_tokens == _chat(live, history, model="a").usage.prompt_tokens
    # a last assistant message is continued, as on the chat route (the continuation unstripped)
    start = [{"role": "user", "content": Q}, {"role": "assistant", "content": "Blue"}]
    continued = _client(live).responses.create(model="a", input=start, temperature=0).output_text
    assert continued == _chat(live, start, model="a").choices[0].message.content and "Falcon" in continued


def test_instructions_are_the_system_message_of_the_chat_route(live):
    """instructions equal a system message on the chat route; a developer (or system) message opening the input is
    the same; both are joined into the one system message Qwen's prompt has."""
    kw = dict(model="tiny-qwen", max_output_tokens=12, temperature=0)
    chat = _chat(live, [{"role": "system", "content": "Be brief."}, ASK], model="tiny-qwen", max_tokens=12)
    plain = _chat(live, [ASK], model="tiny-qwen", max_tokens=12).choices[0].message.content
    r = _client(live).responses.create(input=ASK["content"], instructions="Be brief.", **kw)
    assert r.output_text == chat.choices[0].message.content != plain
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.instructions == "Be brief."
    for role in ("developer", "system"):
        r = _client(live).responses.create(input=[{"role": role, "content": "Be brief."}, ASK], **kw)
        assert r.output_text == chat.choices[0].message.content
    both = _chat(live, [{"role": "system", "content": "Be brief.\n\nBe kind."}, ASK], model="tiny-qwen",
                 max_tokens=12).choices[0].message.content
    r = _client(live).responses.create(input=[{"role": "developer", "content": "Be kind."}, ASK],
                                       instructions="Be brief.", **kw)
    assert r.output_text == both


def test_a_stream_comes_in_openais_order_and_joins_to_the_response(live):
    events = _events(live, model="a", input=Q, temperature=0)
    kinds = [e.type for e in events]
    n = kinds.count("response.output_text.delta")
    assert n > 1 and kinds == ["response.created", "response.in_progress", "response.output_item.added",
                               "response.content_part.added", *["response.output_text.delta"] * n,
                               "response.output_text.done", "response.content_part.done",
                               "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    item_id = events[2].item.id
    assert events[2].item.status == "in_progress" and events[2].output_index == 0
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert all(e.item_id == item_id and (e.output_index, e.content_index) == (0, 0) and e.logprobs == []
               for e in deltas)
    text = "".join(e.delta for e in deltas)
    assert text == events[-4].text == events[-3].part.text == events[-2].item.content[0].text == A
    done = events[-1].response
    assert done.status == "completed" and done.output_text == A and done.output[0].id == item_id
    whole = _client(live).responses.create(model="a", input=Q, temperature=0)
    assert (done.usage.input_tokens, done.usage.output_tokens) == (whole.usage.input_tokens,
                                                                  whole.usage.output_tokens)
    # the client's stream helper, which builds the response from the events
    with _client(live).responses.stream(model="a", input=Q, temperature=0) as helper:
        assert "".join(e.delta for e in helper if e.type == "response.output_text.delta") == A
        assert helper.get_final_response().output_text == A


@pytest.mark.parametrize("stream", [False, True])
def test_max_output_tokens_ends_the_response_incomplete(live, stream):
    kw = dict(model="a", input=Q, temperature=0, max_output_tokens=2)
    if stream:
        events = _events(live, **kw)
        assert events[-1].type == "response.incomplete" and events[-2].item.status == "incomplete"
        r = events[-1].response
    else:
        r = _client(live).responses.create(**kw)
    assert (r.status, r.incomplete_details.reason, r.usage.output_tokens) == ("incomplete", "max_output_tokens", 2)
    assert r.output[0].status == "incomplete" and A.startswith(r.output_text) and r.output_text != A
    assert r.max_output_tokens == 2 and r.completed_at is None


def test_a_function_tool_round_trip(live):
    """A function_call item comes out (after a message holding the call's thought), as the chat route's tool call;
    the output items sent back with a function_call_output get the chat route's answer after the tool's result.
    Streamed, the call's items come whole, as the chat route sends it in one delta."""
    client = _client(live)
    chat = _chat(live, [ASK], model="tools", tools=CHAT_TOOLS).choices[0].message
    r = client.responses.create(model="tools", input=ASK["content"], tools=TOOLS, temperature=0)
    thought, call = r.output
    assert r.status == "completed" and thought.type == "message" and call.type == "function_call"
    assert r.output_text == thought.content[0].text == chat.content == "I should ask the weather API."
    assert (call.name, json.loads(call.arguments), call.status) == ("get_weather", {"city": "Paris"}, "completed")
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert (call.name, call.arguments) == (chat.tool_calls[0].function.name, chat.tool_calls[0].function.arguments)
    assert [t.name for t in r.tools] == ["get_weather"]

    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    items = [ASK, *(o.model_dump(exclude_none=True) for o in r.output), result]
    answer = client.responses.create(model="tools", input=items, tools=TOOLS, temperature=0)
    history = [ASK, {"role": "assistant", "content": chat.content, "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
               {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21 C"}]
    chat_answer = _chat(live, history, model="tools", tools=CHAT_TOOLS)
    assert answer.output_text == chat_answer.choices[0].message.content == "It is sunny in Paris."
    assert [o.type for o in answer.output] == ["message"]
    assert answer.usage.input_tokens == chat_answer.usage.prompt_tokens
    # the call alone (no thought sent back) is the chat route's call with no content; the output as text parts
    bare = [ASK, call.model_dump(exclude_none=True), dict(result, output=[{"type": "input_text", "text": "sunny, "},
                                                                         {"type": "input_text", "text": "21 C"}])]
    chat_bare = _chat(live, [ASK, dict(history[1], content=None), history[2]], model="tools", tools=CHAT_TOOLS)
    assert client.responses.create(model="tools", input=bare, tools=TOOLS, temperature=0).output_text == \
        chat_bare.choices[0].message.content

    events = _events(live, model="tools", input=ASK["content"], tools=TOOLS, temperature=0)
    assert [e.type for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    added, delta, done = events[8], events[9], events[10]
    assert (added.output_index, added.item.type, added.item.arguments, added.item.status) == (
        1, "function_call", "", "in_progress")
    assert delta.delta == done.arguments == call.arguments and delta.item_id == done.item_id == added.item.id
    assert events[-1].response.output[1].name == "get_weather"


def test_tool_choice_forms_act_as_the_chat_routes(live):
    """"none" keeps the tools out of the prompt (the plain answer), a named function is a call of it; the request's
    choice is echoed in the response."""
    plain = _client(live).responses.create(model="a", input=Q, temperature=0)
    none = _client(live).responses.create(model="a", input=Q, tools=TOOLS, tool_choice="none", temperature=0)
    assert none.output_text == plain.output_text == A and none.tool_choice == "none"
    named = _client(live).responses.create(model="tools", input=ASK["content"], tools=TOOLS, temperature=0,
                                           tool_choice={"type": "function", "name": "get_weather"})
    assert [o.type for o in named.output] == ["function_call"] and named.output[0].name == "get_weather"
    assert named.tool_choice.name == "get_weather"


def test_a_json_schema_text_format_holds_the_reply_to_the_schema(live):
    fmt = {"type": "json_schema", "name": "YesNo", "schema": YES_NO, "strict": True}
    r = _client(live).responses.create(model="tiny-qwen", input=ASK["content"], temperature=0, max_output_tokens=40,
                                       text={"format": fmt})
    value = json.loads(r.output_text)
    assert r.status == "completed" and set(value) == {"answer", "count"} and value["answer"] in ("yes", "no")
    assert r.text.format.type == "json_schema" and r.text.format.schema_ == YES_NO
    chat = _chat(live, [ASK], model="tiny-qwen", max_tokens=40, response_format={
        "type": "json_schema", "json_schema": {"name": "YesNo", "schema": YES_NO, "strict": True}})
    assert chat.choices[0].message.content == r.output_text
    events = _events(live, model="tiny-qwen", input=ASK["content"], temperature=0, max_output_tokens=40,
                     text={"format": fmt})
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    # the client's parse (a pydantic model as the schema, strict)
    from typing import Literal

    from pydantic import BaseModel

    class Answer(BaseModel):
        answer: Literal["yes", "no"]

    parsed = _client(live).responses.parse(model="tiny-qwen", input=ASK["content"], temperature=0,
                                           max_output_tokens=40, text_format=Answer)
    assert parsed.status == "completed" and parsed.output_parsed.answer in ("yes", "no")
    # json_object: any object (sampled, as a greedy reply of the random model may not close in 40 tokens)
    for seed in range(2):
        r = _client(live).responses.create(model="tiny-qwen", input=ASK["content"], temperature=1.0,
                                           max_output_tokens=40, text={"format": {"type": "json_object"}},
                                           extra_body={"seed": seed})
        assert r.status == "incomplete" or isinstance(json.loads(r.output_text), dict), r.output_text


def test_logprobs_come_with_include_as_the_chat_routes(live):
    """include ["message.output_text.logprobs"] with top_logprobs: each reply token's entry, as the chat route's
    logprobs; streamed, each delta carries its tokens' entries."""
    chat = _chat(live, [{"role": "user", "content": Q}], model="a", logprobs=True, top_logprobs=2)
    want = [(t.token, t.logprob, [x.token for x in t.top_logprobs]) for t in chat.choices[0].logprobs.content]
    kw = dict(model="a", input=Q, temperature=0, top_logprobs=2, include=["message.output_text.logprobs"])
    r = _client(live).responses.create(**kw)
    got = r.output[0].content[0].logprobs
    assert [(t.token, t.logprob, [x.token for x in t.top_logprobs]) for t in got] == want
    assert len(got) == r.usage.output_tokens and r.top_logprobs == 2
    events = _events(live, **kw)
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [(t.token, t.logprob) for t in streamed] == [(t, lp) for t, lp, _ in want[:len(streamed)]]
    assert len(streamed) >= len(want) - 1  # (the <|im_end|> token's entry comes with the done event: no text)
    assert [t.token for t in events[-1].response.output[0].content[0].logprobs] == [t for t, _, _ in want]


def test_bookkeeping_fields_are_accepted_and_echoed(live):
    """metadata, user, truncation "disabled", parallel tool calls, an include of items this server never makes, and
    the client's stream options change nothing (store: test_serve_responses_store.py)."""
    r = _client(live).responses.create(model="a", input=Q, temperature=0, store=True, metadata={"k": "v"}, user="u1",
                                       truncation="disabled", parallel_tool_calls=False, service_tier="auto",
                                       include=["reasoning.encrypted_content"], reasoning=None, max_tool_calls=3,
                                       prompt_cache_key="x", safety_identifier="s")
    assert r.output_text == A and r.metadata == {"k": "v"} and r.user == "u1" and r.parallel_tool_calls is False
    events = _events(live, model="a", input=Q, temperature=0, stream_options={"include_obfuscation": False})
    assert events[-1].response.output_text == A


@pytest.mark.parametrize("kw, param, said", [
    (dict(previous_response_id="resp_1"), "previous_response_id", "Previous response with id 'resp_1' not found"),
    (dict(previous_response_id=""), "previous_response_id", "non-empty string"),
    (dict(conversation="conv_1"), "conversation", "Conversations API"),
    (dict(background=True, store=False), "background", "needs store"),
    (dict(background=True, stream=True), "background", "poll GET"),
    (dict(reasoning={"effort": "high"}), "reasoning", "reasoning"),
    (dict(prompt={"id": "pmpt_1"}), "prompt", "prompt template"),
    (dict(truncation="auto"), "truncation", "disabled"),
    (dict(include=["message.output_text.everything"]), "include[0]", "not supported"),
    (dict(input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}, {
        "type": "input_image", "image_url": "https://x/y.png"}]}]), "input[0].content[1]", "input_image"),
    (dict(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]), "input[0].content[0]",
     "input_file"),
    (dict(input=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]), "input[0].content[0]",
     "input_audio"),
    (dict(input=[{"type": "item_reference", "id": "msg_1"}]), "input[0].type", "previous_response_id"),
    (dict(input=[{"role": "tool", "content": "x"}]), "input[0].role", "function_call_output"),
    (dict(input=[]), "input", "non-empty"),
    (dict(input=[{"role": "user", "content": "Hi"}, {"role": "system", "content": "late"}]), "input[1].role",
     "system"),
    (dict(input=[ASK, {"type": "function_call", "call_id": "c1", "arguments": "{}"}]), "input[1].name", "string"),
    (dict(input=[ASK, {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                 {"type": "function_call_output", "call_id": "c2", "output": "x"}], tools=TOOLS),
     "input[2].call_id", "call_id 'c2'"),
    (dict(input=[ASK, {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"}],
          tools=TOOLS), "input", "function_call 'c1' has no function_call_output"),
    (dict(tools=[{"type": "web_search"}]), "tools[0].type", "web_search"),
    (dict(tools=[{"type": "file_search", "vector_store_ids": []}]), "tools[0].type", "file_search"),
    (dict(tools=[{"type": "function", "name": "", "parameters": {}}]), "tools[0].name", "name"),
    (dict(tools=[{"type": "function", "name": "f", "parameters": "x"}]), "tools[0].parameters", "JSON Schema"),
    (dict(tools=TOOLS, tool_choice={"type": "allowed_tools", "mode": "auto", "tools": []}), "tool_choice",
     "not supported"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "name": "nope"}), "tool_choice", "not among"),
    (dict(tool_choice="required"), "tool_choice", "no tools"),
    (dict(text={"format": {"type": "xml"}}), "text.format", "json_schema"),
    (dict(text={"format": {"type": "json_schema", "name": "x"}}), "text.format.schema", "schema"),
    (dict(text={"format": {"type": "json_schema", "name": "x", "schema": {"not": {}}}}), "text.format.schema",
     "not"),
    (dict(text={"format": {"type": "json_object"}}, tools=TOOLS), "text.format", "tools"),
    (dict(text={"verbosity": "low"}), "text.verbosity", "medium"),
    (dict(include=["message.output_text.logprobs"], tools=TOOLS), "include", "tools"),
    (dict(temperature=3), "temperature", "less than or equal to 2"),
    (dict(top_p=1.5), "top_p", "less than or equal to 1"),
    (dict(max_output_tokens=0), "max_output_tokens", "greater than or equal to 1"),
    (dict(max_output_tokens=5000), "max_output_tokens", "maximum context length is 1024"),
    (dict(top_logprobs=21), "top_logprobs", "20"),
    (dict(extra_body={"max_tokens": 5}), "max_tokens", "max_output_tokens"),
    (dict(extra_body={"messages": [ASK]}), "messages", "input"),
    (dict(extra_body={"response_format": {"type": "json_object"}}), "response_format", "text.format"),
    (dict(extra_body={"best_of": 2}), "best_of", "not supported"),
    (dict(extra_body={"prompt_logprobs": 1}), "prompt_logprobs", "chat/completions"),
])
def test_each_refusal_is_a_400_naming_the_responses_field(live, kw, param, said):
    err = _bad(live, **kw)
    assert err["param"] == param and said in err["message"], err
    assert "messages[" not in err["message"] and "max_completion_tokens" not in err["message"], err


def test_a_prompt_over_the_length_is_a_400_with_the_counts_and_an_unknown_model_a_404(live):
    err = _bad(live, input="word " * 2000)
    assert err["param"] == "input" and err["code"] == "context_length_exceeded", err
    assert "maximum context length is 1024 tokens, but the input has" in err["message"], err
    with pytest.raises(openai.NotFoundError) as e:
        _client(live).responses.create(model="nope", input=Q)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_vllm_sampling_fields_act_as_on_the_chat_route(live):
    """vLLM's extra fields (here a stop string) reach the engine as the chat route's."""
    chat = _chat(live, [{"role": "user", "content": Q}], model="a", extra_body={"stop": ["Fal"]})
    r = _client(live).responses.create(model="a", input=Q, temperature=0, extra_body={"stop": ["Fal"]})
    assert r.output_text == chat.choices[0].message.content and r.output_text.startswith("Blue")


def _send(live, stream: bool) -> socket.socket:
    """A long request (900 tokens) on a socket of its own: closing it is the client leaving."""
    body = json.dumps({"model": "tiny-qwen", "input": Q, "max_output_tokens": 900, "min_tokens": 900,
                       "temperature": 1.0, "stream": stream}).encode()
    s = socket.create_connection((live.host, live.port), timeout=30)
    s.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
              + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return s


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_frees_its_row(live, stream):
    """The row is cancelled, and the response left unfinished is not stored (streamed: its id, from the first event,
    is a 404)."""
    before = health_when(live, lambda h: h["in_flight"] == 0)["finished"]
    stored = len(live.server.responses)
    with _send(live, stream) as s:
        health_when(live, lambda h: h["running"] == 1)
        if stream:
            seen = b""
            while b'"id": "resp_' not in seen:  # (response.created)
                seen += s.recv(65536)
            rid = seen.split(b'"id": "')[1].split(b'"')[0].decode()
    after = health_when(live, lambda h: h["in_flight"] == 0)["finished"]
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1, (before, after)
    assert after.get("length", 0) == before.get("length", 0), (before, after)
    assert len(live.server.responses) == stored
    if stream:
        with pytest.raises(openai.NotFoundError):
            _client(live).responses.retrieve(rid)


def test_a_full_server_is_a_429_and_a_missing_key_a_401(live):
    """The chat route's statuses: more requests in flight than --max-batch + --max-queue (2 + 2) is a 429, a request
    without the key a 401 (before its body is read)."""
    health_when(live, lambda h: h["in_flight"] == 0)
    held = [_send(live, stream=k % 2 == 0) for k in range(4)]
    try:
        assert health_when(live, lambda h: h["in_flight"] == 4)["in_flight"] == 4
        with pytest.raises(openai.RateLimitError) as e:
            _client(live).responses.create(model="a", input=Q)
        assert e.value.body["code"] == "queue_full" and e.value.response.headers["retry-after"] == "1"
    finally:
        for s in held:
            s.close()
    assert health_when(live, lambda h: h["in_flight"] == 0)["in_flight"] == 0
    with pytest.raises(openai.AuthenticationError) as e:
        _client(live, key="wrong").responses.create(model="a", input=Q)
    assert e.value.body["code"] == "invalid_api_key"


# -- a scripted engine: what the model writes is given -----------------------------------------------------------


@pytest.fixture(scope="module")
def scripted():
    with scripted_server() as bg:
        yield bg


def test_an_error_after_the_stream_started_is_an_error_event_then_response_failed(scripted):
    """tool_choice "required" and a reply that calls none of the tools: the chat route's 500 invalid_tool_call;
    streamed, once the status line went out, an `error` event and response.failed."""
    scripted.server.engine.reply = " nope\nAction Input: {}"  # (after the start, "Thought: \nAction:")
    client = openai.OpenAI(base_url=scripted.api_url, api_key="none", timeout=30, max_retries=0)
    kw = dict(model="scripted", input="Weather?", tools=TOOLS + [dict(TOOLS[0], name="get_time")],
              tool_choice="required")
    with pytest.raises(openai.InternalServerError) as e:
        client.responses.create(**kw)
    assert e.value.body["code"] == "invalid_tool_call" and "'nope'" in e.value.body["message"]
    events = list(client.responses.create(stream=True, **kw))
    assert [e.type for e in events] == ["response.created", "response.in_progress", "error", "response.failed"]
    assert events[2].code == "invalid_tool_call" and "'nope'" in events[2].message
    failed = events[3].response
    assert failed.status == "failed" and failed.error.code == "server_error" and failed.output == []


def test_a_forced_call_is_started_for_the_model_as_on_the_chat_route(scripted):
    """A named tool_choice starts the reply with the call (react.call_start): the prompt is the chat route's, the
    model writes the arguments."""
    from finetune.serve.protocol import ChatCompletionRequest

    scripted.server.engine.reply = ' {"city": "Paris"}'
    client = openai.OpenAI(base_url=scripted.api_url, api_key="none", timeout=30, max_retries=0)
    r = client.responses.create(model="scripted", input="Weather?", tools=TOOLS,
                                tool_choice={"type": "function", "name": "get_weather"})
    (call,) = r.output
    assert (call.type, call.name, call.arguments) == ("function_call", "get_weather", '{"city": "Paris"}')
    forced = {"type": "function", "function": {"name": "get_weather"}}
    chat = ChatCompletionRequest(model="scripted", messages=[{"role": "user", "content": "Weather?"}],
                                 tools=CHAT_TOOLS, tool_choice=forced)
    turns, _ = scripted.server.turns(chat)
    assert scripted.server.engine.prompt_ids == scripted.server.prompt_ids(turns)
