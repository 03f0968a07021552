"""tool_choice "required" and a named function (and the legacy function_call {"name": ...}) through the official
`openai` client: the reply is started for the model with the start of a call in the ReAct layout it was trained on
(react.call_start), the model writes the rest, and the whole is parsed as a call. The engine is scripted (each
request generates the tokens of a given text and keeps its prompt), so the prompt and the arguments can be asserted."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _helpers import scripted_server  # noqa: E402

from finetune import react  # noqa: E402

WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TIME = {"name": "get_time", "description": "The time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, TIME)]
ASK = [{"role": "user", "content": "Weather and time in Paris?"}]
# a conversation whose last message is a tool's result: the reply continues the open turn after "\nThought:"
AFTER_RESULT = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
ARGS = "{\"city\": \"Paris\"}"


@pytest.fixture(scope="module")
def live():
    with scripted_server() as bg:
        yield bg


def _client(live):
    return openai.OpenAI(base_url=live.api_url, api_key="none", timeout=30, max_retries=0)


def _ask(live, reply: str, messages=ASK, stream: bool = False, **kw):
    """The request's choice (non-streamed), or (its deltas, the finishing chunk's reason) (streamed); the prompt the
    engine received is live.server.engine.prompt_ids."""
    live.server.engine.reply = reply
    r = _client(live).chat.completions.create(model="scripted", messages=messages, stream=stream, **kw)
    if not stream:
        return r.choices[0]
    chunks = list(r)
    return [c.choices[0].delta for c in chunks[:-1]], chunks[-1].choices[0].finish_reason


def _prompt_text(live, messages, **kw) -> str:
    """The prompt of the same request with tool_choice "auto", as text."""
    from finetune.serve.protocol import ChatCompletionRequest

    ids, _ = live.server.prompt(ChatCompletionRequest(model="scripted", messages=messages, **kw))
    return live.server.tokenizer.decode(ids)


@pytest.mark.parametrize("messages, start", [
    (ASK, "Thought: \nAction: get_time\nAction Input:"),
    # after a tool result the open turn ends "\nThought:": a call without a thought goes on " \nAction: ..."
    (AFTER_RESULT, " \nAction: get_time\nAction Input:"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_a_named_function_is_called_with_what_the_model_writes_after_the_start(live, messages, start, stream):
    tok = live.server.tokenizer
    auto = _prompt_text(live, messages, tools=TOOLS)
    choice = {"type": "function", "function": {"name": "get_time"}}
    got = _ask(live, " " + ARGS, messages, stream, tools=TOOLS, tool_choice=choice)
    assert tok.decode(live.server.engine.prompt_ids) == auto + start  # the prompt as with "auto", and the start
    assert start == react.call_start("get_time", after_result=messages is AFTER_RESULT)
    if stream:  # the call as one delta, as with "auto"
        deltas, finish = got
        calls = [tc for d in deltas for tc in (d.tool_calls or [])]
        assert [(tc.function.name, tc.function.arguments) for tc in calls] == [("get_time", ARGS)]
        assert not "".join(d.content or "" for d in deltas) and finish == "tool_calls"
    else:
        (call,) = got.message.tool_calls
        assert (call.function.name, call.function.arguments) == ("get_time", ARGS)
        assert got.message.content is None and got.finish_reason == "tool_calls"


@pytest.mark.parametrize("tool_choice, written", [
    ({"type": "function", "function": {"name": "get_time"}}, " " + ARGS),
    ("required", " get_time\nAction Input: " + ARGS),
])
@pytest.mark.parametrize("messages", [ASK, AFTER_RESULT])
def test_the_prompt_and_the_models_text_are_the_tokens_of_the_trained_call(live, messages, tool_choice, written):
    """The forced prompt is, token for token, the start of the training conversation that ends with the call (the
    data pipeline's encoding of it), and what follows there is what the model writes: the start ends where the
    tokenizer splits the trained text."""
    from finetune.data import encode_conversation

    tok = live.server.tokenizer
    _ask(live, written, messages, tools=TOOLS, tool_choice=tool_choice)
    prompt = live.server.engine.prompt_ids
    call = {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": ARGS}}
    record = {"tools": TOOLS, "messages": messages + [{"role": "assistant", "content": None, "tool_calls": [call]}]}
    trained = encode_conversation(tok, record)["input_ids"]
    assert trained[:len(prompt)] == prompt
    rest = tok.encode(written + "\nObservation:")
    assert trained[len(prompt):len(prompt) + len(rest)] == rest


@pytest.mark.parametrize("stream", [False, True])
def test_the_legacy_function_call_naming_a_function_answers_with_its_function_call(live, stream):
    got = _ask(live, " " + ARGS, stream=stream, functions=[WEATHER, TIME], function_call={"name": "get_weather"})
    assert live.server.tokenizer.decode(live.server.engine.prompt_ids).endswith(
        "<|im_start|>assistant\nThought: \nAction: get_weather\nAction Input:")
    if stream:
        deltas, finish = got
        calls = [d.function_call for d in deltas if d.function_call]
        assert [(c.name, c.arguments) for c in calls] == [("get_weather", ARGS)] and finish == "function_call"
    else:
        assert (got.message.function_call.name, got.message.function_call.arguments) == ("get_weather", ARGS)
        assert got.message.content == "" and got.finish_reason == "function_call"


@pytest.mark.parametrize("messages", [ASK, AFTER_RESULT])
@pytest.mark.parametrize("stream", [False, True])
def test_required_starts_the_reply_at_action_and_the_model_names_the_function(live, messages, stream):
    auto = _prompt_text(live, messages, tools=TOOLS)
    got = _ask(live, " get_time\nAction Input: " + ARGS, messages, stream, tools=TOOLS, tool_choice="required")
    start = " \nAction:" if messages is AFTER_RESULT else "Thought: \nAction:"
    assert live.server.tokenizer.decode(live.server.engine.prompt_ids) == auto + start
    calls = ([tc for d in got[0] for tc in (d.tool_calls or [])] if stream else got.message.tool_calls)
    assert [(tc.function.name, tc.function.arguments) for tc in calls] == [("get_time", ARGS)]
    assert (got[1] if stream else got.finish_reason) == "tool_calls"


def test_required_with_one_tool_calls_that_tool(live):
    """"required" with one function can only call it: the start names it, as a named tool choice does."""
    got = _ask(live, " " + ARGS, tools=TOOLS[:1], tool_choice="required")
    assert live.server.tokenizer.decode(live.server.engine.prompt_ids).endswith(
        "assistant\nThought: \nAction: get_weather\nAction Input:")
    assert got.message.tool_calls[0].function.name == "get_weather" and got.finish_reason == "tool_calls"
    assert got.message.tool_calls[0].function.arguments == ARGS


@pytest.mark.parametrize("reply, said", [
    (" get_news\nAction Input: {}", "calls 'get_news', which is not among the request's functions (given: "
                                    "get_weather, get_time)"),
    (" get_time", "holds no call"),  # (no "Action Input:": no call)
])
def test_a_required_reply_that_calls_no_given_function_is_a_500_saying_so(live, reply, said):
    with pytest.raises(openai.InternalServerError) as e:
        _ask(live, reply, tools=TOOLS, tool_choice="required")
    err = e.value.body
    assert err["code"] == "invalid_tool_call" and said in err["message"], err
    assert repr(reply.strip()) in err["message"], err  # what the model wrote
    # streamed: the status line is sent already, so the error comes as the stream's last event (as an engine failure)
    with pytest.raises(openai.APIError, match="invalid_tool_call|not among|no call"):
        _ask(live, reply, stream=True, tools=TOOLS, tool_choice="required")
    r = httpx.post(live.api_url + "/chat/completions", timeout=30, json={
        "model": "scripted", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "stream": True})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[-2])["error"]["code"] == "invalid_tool_call" and events[-1] == "[DONE]", events


def test_a_required_reply_cut_by_max_tokens_before_its_call_is_its_text(live):
    """max_tokens cut the reply in the function's name: finish "length", the text written after the start."""
    reply = " get_time\nAction Input: " + ARGS
    got = _ask(live, reply, tools=TOOLS, tool_choice="required", max_tokens=2)
    assert got.finish_reason == "length" and not got.message.tool_calls
    tok = live.server.tokenizer
    assert got.message.content == "Action: " + tok.decode(tok.encode(reply)[:2]).strip()


def test_tool_choice_none_keeps_the_tools_out_and_returns_no_call(live):
    got = _ask(live, "Thought: x\nAction: get_weather\nAction Input: {}", tools=TOOLS, tool_choice="none")
    assert got.finish_reason == "stop" and not got.message.tool_calls
    assert got.message.content == "Thought: x\nAction: get_weather\nAction Input: {}"
    assert _prompt_text(live, ASK, tools=TOOLS, tool_choice="none") == _prompt_text(live, ASK)


@pytest.mark.parametrize("kw, param, said", [
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_news"}}), "tool_choice",
     "names the function 'get_news', which is not among the request's tools (given: get_weather, get_time)"),
    (dict(tool_choice="required"), "tool_choice", "'required', but the request gives no tools"),
    (dict(tool_choice={"type": "function", "function": {"name": "get_time"}}), "tool_choice", "gives no tools"),
    (dict(functions=[WEATHER], function_call={"name": "get_time"}), "function_call", "request's functions"),
    (dict(functions=[WEATHER], function_call="required"), "function_call", "is not supported"),
    (dict(tools=TOOLS, tool_choice={"type": "function"}), "tool_choice", "is not supported"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": ""}}), "tool_choice", "not supported"),
    (dict(tools=TOOLS, tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": []}}),
     "tool_choice", "is not supported"),
    (dict(functions=[WEATHER], tool_choice="none", function_call={"name": "get_weather"}), "function_call",
     "give one of them"),
    (dict(tools=TOOLS, tool_choice="required", messages=ASK + [{"role": "assistant", "content": "Let me see"}]),
     "tool_choice", "the last message is an assistant message"),
])
def test_a_tool_choice_that_cannot_be_answered_is_400_naming_it(live, kw, param, said):
    kw = {"messages": ASK, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        _client(live).chat.completions.create(model="scripted", **kw)
    err = e.value.body
    assert err["param"] == param and said in err["message"], err
