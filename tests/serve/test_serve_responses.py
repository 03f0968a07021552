"""POST /v1/responses (OpenAI's Responses API) through the official `openai` client on the tiny demo model: a greedy
response answers what the chat route answers for the same messages, instructions are the system message, streamed
events come in OpenAI's order and join to the same text, max_output_tokens ends it incomplete, a function tool's
call goes out as a function_call item and its output comes back in, text.format holds the reply to a schema, and
every refusal is a 400 naming the Responses field."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _helpers import demo_server  # noqa: E402

Q = "Tell me more."
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with demo_server(tmp_path_factory, "serve_responses", "--max-batch", "4", "--max-model-len", "512") as bg:
        yield bg


def _client(live):
    return openai.OpenAI(base_url=live.api_url, api_key="none", timeout=60, max_retries=0)


def _chat(live, messages, **kw):
    return _client(live).chat.completions.create(model="tiny-qwen", messages=messages, temperature=0, **kw)


def test_a_greedy_response_answers_as_the_chat_route(live):
    client = _client(live)
    r = client.responses.create(model="tiny-qwen", input=Q, temperature=0, max_output_tokens=12)
    chat = _chat(live, [{"role": "user", "content": Q}], max_tokens=12)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny-qwen"
    assert r.output_text == chat.choices[0].message.content
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    # instructions are the system message; message items with parts read as their text
    r = client.responses.create(model="tiny-qwen", instructions="Answer in one word.", temperature=0,
                                max_output_tokens=12, input=[{"type": "message", "role": "user",
                                                              "content": [{"type": "input_text", "text": Q}]}])
    chat = _chat(live, [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": Q}],
                 max_tokens=12)
    assert r.output_text == chat.choices[0].message.content and r.instructions == "Answer in one word."


def test_max_output_tokens_ends_the_response_incomplete(live):
    r = _client(live).responses.create(model="tiny-qwen", input=Q, temperature=0, max_output_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete"


def test_a_stream_s_events_come_in_order_and_join_to_the_response_s_text(live):
    client = _client(live)
    whole = client.responses.create(model="tiny-qwen", input=Q, temperature=0, max_output_tokens=16)
    events = list(client.responses.create(model="tiny-qwen", input=Q, temperature=0, max_output_tokens=16,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert set(kinds[4:-4]) <= {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_a_function_tool_call_goes_out_and_its_output_comes_back_in(live):
    """tool_choice naming the function makes the reply a call of it (the random model writes no sensible
    arguments); the call and its output sent back as items make the ReAct turn the chat route makes of them."""
    client = _client(live)
    r = client.responses.create(model="tiny-qwen", input="Weather in Paris?", tools=[WEATHER], temperature=0,
                                tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=24)
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_"), r.output
    assert r.tools[0].name == "get_weather"
    events = list(client.responses.create(model="tiny-qwen", input="Weather in Paris?", tools=[WEATHER],
                                          temperature=0, tool_choice={"type": "function", "name": "get_weather"},
                                          max_output_tokens=24, stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == calls[0].arguments
    # the round trip: the call and its output as items, answered as the chat route answers the same turns
    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": '{"temp": 21}'}]
    r = client.responses.create(model="tiny-qwen", input=items, tools=[WEATHER], temperature=0, max_output_tokens=16)
    chat = _chat(live, [{"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"id": "call_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}],
                 tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
                 max_tokens=16)
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    message = chat.choices[0].message
    if message.tool_calls:
        assert [i.name for i in r.output if i.type == "function_call"] == [message.tool_calls[0].function.name]
    else:
        assert r.output_text == message.content


def test_a_json_schema_format_holds_the_reply_to_it(live):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"a": {"enum": ["yes", "no"]}}, "required": ["a"],
              "additionalProperties": False}
    r = _client(live).responses.create(model="tiny-qwen", input=Q, temperature=0, max_output_tokens=40,
                                       text={"format": {"type": "json_schema", "name": "yn", "schema": schema}})
    assert r.status == "completed" and json.loads(r.output_text)["a"] in ("yes", "no")
    assert r.text.format.type == "json_schema"


def test_logprobs_come_with_the_text(live):
    r = _client(live).responses.create(model="tiny-qwen", input=Q, temperature=0, max_output_tokens=6,
                                       top_logprobs=2, include=["message.output_text.logprobs"])
    part = r.output[0].content[0]
    assert len(part.logprobs) == r.usage.output_tokens and all(len(p.top_logprobs) == 2 for p in part.logprobs)


@pytest.mark.parametrize("kw, field", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"truncation": "auto"}, "truncation"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 100000}, "max_output_tokens"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]}, "input[1]"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"text": {"format": {"type": "xml"}}}, "text.format"),
    ({"temperature": "hot"}, "temperature"),
])
def test_a_bad_request_is_a_400_naming_the_responses_field(live, kw, field):
    kw = {"model": "tiny-qwen", "input": Q, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        _client(live).responses.create(**kw)
    err = e.value.body
    assert err["type"] == "invalid_request_error" and "\n" not in err["message"], err
    assert err["param"] is not None and err["param"].startswith(field), err
    assert "messages[" not in err["message"] and "max_tokens" not in err["message"], err


def test_an_unknown_model_is_a_404_and_store_is_accepted(live):
    with pytest.raises(openai.NotFoundError):
        _client(live).responses.create(model="gpt-5", input=Q)
    r = _client(live).responses.create(model="tiny-qwen", input=Q, store=True, metadata={"k": "v"},
                                       max_output_tokens=2)
    assert r.metadata == {"k": "v"}


def test_an_engine_failure_mid_stream_is_an_error_event_and_a_failed_step_a_500(live, monkeypatch):
    """A step that raises after a stream began ends it with an `error` event (code engine_error) and no completed
    event; a response not streamed gets the 500; the next request is answered."""
    engine = live.server.engine
    real, calls = engine.step, []

    def failing():
        calls.append(1)
        if len(calls) == 10:  # (the stream has sent text by then)
            raise RuntimeError("injected failure")
        return real()

    monkeypatch.setattr(engine, "step", failing)
    client = _client(live)
    events = list(client.responses.create(model="tiny-qwen", input=Q, max_output_tokens=200, stream=True,
                                          extra_body={"min_tokens": 200, "ignore_eos": True}))
    kinds = [e.type for e in events]
    assert kinds[-1] == "error" and events[-1].code == "engine_error" and "injected failure" in events[-1].message
    assert "response.completed" not in kinds and "response.output_text.delta" in kinds
    calls.clear()
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model="tiny-qwen", input=Q, max_output_tokens=200,
                                extra_body={"min_tokens": 200, "ignore_eos": True})
    monkeypatch.undo()
    assert client.responses.create(model="tiny-qwen", input=Q, max_output_tokens=2).status in ("completed",
                                                                                               "incomplete")
