"""Stored responses (finetune/serve/response_store.py and the routes in responses.py) through the official `openai`
client: a conversation continued by previous_response_id answers what the whole history sent at once answers (a
memorised adapter's two answers, a function tool round trip), instructions are not carried over, a stored response
reads back as it was sent (streamed too), input_items pages through the conversation, store: false and delete
leave nothing to read or continue, the store keeps only its most recent responses, and a background response is
polled to its answer, cancelled, or stored failed."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from openai.types.responses import Response  # noqa: E402

from _helpers import (ASK, MEMORISE, WEATHER, health_when, memorised_and_tools_server, polled,  # noqa: E402
                      scripted_server)

from finetune.serve.response_store import ResponseStore  # noqa: E402

TOOLS = [{"type": "function", **WEATHER}]
(Q, A), (Q2, _) = MEMORISE[:2]
KEY = "test-key"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The tiny model served with adapter "a" (memorises MEMORISE) and "tools" (one function-calling exchange)."""
    with memorised_and_tools_server(tmp_path_factory.mktemp("serve_store"), "--max-batch", "2", "--api-key",
                                    KEY) as bg:
        yield bg


def _client(live):
    return openai.OpenAI(base_url=live.api_url, api_key=KEY, timeout=120, max_retries=0)


def _create(live, **kw):
    return _client(live).responses.create(**{"model": "a", "temperature": 0, **kw})


def test_a_continued_conversation_answers_what_the_whole_history_answers(live):
    """Turn two by previous_response_id: the same text and input tokens as the three messages sent at once (the
    tiny adapter's answer to a second question after a first is not its memorised one: the history changes it); the
    response names the one it continued and says it is stored; a third turn continues the chain."""
    first = _create(live, input=Q)
    assert first.output_text == A and first.store is True and first.previous_response_id is None
    second = _create(live, input=Q2, previous_response_id=first.id)
    history = [{"role": "user", "content": Q}, {"role": "assistant", "content": A}, {"role": "user", "content": Q2}]
    whole = _create(live, input=history)
    assert second.output_text == whole.output_text and second.output_text
    assert second.usage.input_tokens == whole.usage.input_tokens > first.usage.input_tokens
    assert second.previous_response_id == first.id
    third = _create(live, input=Q, previous_response_id=second.id)
    history += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": Q}]
    whole = _create(live, input=history)
    assert (third.output_text, third.usage.input_tokens) == (whole.output_text, whole.usage.input_tokens)


def test_instructions_are_not_carried_over(live):
    """OpenAI's rule: a continued response's instructions apply to it alone; a system message in its input stays."""
    first = _create(live, model="tiny-qwen", input=ASK["content"], instructions="Be brief.", max_output_tokens=6)
    follow = [{"role": "user", "content": "And tomorrow?"}]
    cont = _create(live, model="tiny-qwen", input=follow, previous_response_id=first.id, max_output_tokens=6)
    said = {"role": "assistant", "content": first.output_text}
    without = _create(live, model="tiny-qwen", input=[ASK, said, *follow], max_output_tokens=6)
    with_it = _create(live, model="tiny-qwen", input=[ASK, said, *follow], instructions="Be brief.",
                      max_output_tokens=6)
    # (without instructions Qwen's prompt holds its default system message)
    assert cont.usage.input_tokens == without.usage.input_tokens != with_it.usage.input_tokens
    assert cont.output_text == without.output_text and cont.instructions is None
    opened = _create(live, model="tiny-qwen", input=[{"role": "developer", "content": "Be brief."}, ASK],
                     max_output_tokens=6)
    cont = _create(live, model="tiny-qwen", input=follow, previous_response_id=opened.id, max_output_tokens=6)
    assert cont.usage.input_tokens == with_it.usage.input_tokens


def test_a_function_call_is_answered_by_a_function_call_output_after_previous_response_id(live):
    """The agent loop as the Agents SDK runs it with server state: the call comes out, only its output is sent
    back, and the answer equals the one for the whole exchange sent at once."""
    call_r = _create(live, model="tools", input=ASK["content"], tools=TOOLS)
    call = call_r.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    answer = _create(live, model="tools", input=[result], tools=TOOLS, previous_response_id=call_r.id)
    whole = _create(live, model="tools", tools=TOOLS,
                    input=[ASK, *(o.model_dump(exclude_none=True) for o in call_r.output), result])
    assert answer.output_text == whole.output_text == "It is sunny in Paris."
    assert answer.usage.input_tokens == whole.usage.input_tokens


def test_a_stored_response_reads_back_as_sent_and_delete_removes_it(live):
    """retrieve gives the object the create answered (the client's strict type parses it), streamed responses are
    stored at their end (a streamed continuation too, answering as the same request not streamed); store: false is
    neither readable nor continuable; delete answers OpenAI's deleted object and leaves a 404; cancel is a 400
    (nothing runs in the background); an unknown id is a 404."""
    client = _client(live)
    r = _create(live, input=Q, metadata={"k": "v"})
    got = client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump()
    raw = httpx.get(f"{live.api_url}/responses/{r.id}", headers={"Authorization": f"Bearer {KEY}"})
    assert Response.model_validate(raw.json()).output_text == A
    events = list(client.responses.create(model="a", input=Q2, temperature=0, stream=True, previous_response_id=r.id))
    done = events[-1].response
    assert done.status == "completed" and client.responses.retrieve(done.id).model_dump() == done.model_dump()
    assert events[0].response.previous_response_id == done.previous_response_id == r.id
    assert done.output_text == _create(live, input=Q2, previous_response_id=r.id).output_text

    unstored = _create(live, input=Q, store=False)
    assert unstored.store is False and unstored.output_text == A
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(unstored.id)
    assert unstored.id in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        _create(live, input=Q2, previous_response_id=unstored.id)
    assert (e.value.body["code"], e.value.body["param"]) == ("previous_response_not_found", "previous_response_id")
    assert "store: false" in e.value.body["message"]

    with pytest.raises(openai.BadRequestError) as e:
        client.responses.cancel(r.id)
    assert "background" in e.value.body["message"]
    deleted = httpx.delete(f"{live.api_url}/responses/{r.id}", headers={"Authorization": f"Bearer {KEY}"})
    assert deleted.status_code == 200 and deleted.json() == {"id": r.id, "object": "response", "deleted": True}
    for call in (lambda: client.responses.retrieve(r.id), lambda: client.responses.delete(r.id),
                 lambda: client.responses.input_items.list(r.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError):
        _create(live, input=Q2, previous_response_id=r.id)
    # without the key, as every /v1 route
    assert httpx.get(f"{live.api_url}/responses/{done.id}").status_code == 401


def test_input_items_page_through_the_conversation(live):
    """A continued response's items: the first turn's input and output, then its own input, newest first by
    default, with OpenAI's paging (limit, after, before, has_more, first_id, last_id); string input and string
    contents come back as text parts, each item with an id; bad paging is a 400 naming the parameter."""
    client = _client(live)
    first = _create(live, input=Q)
    second = _create(live, input=[{"role": "user", "content": Q2}], previous_response_id=first.id)
    page = client.responses.input_items.list(second.id, order="asc")
    kinds = [(i.type, i.role, i.content[0].type, i.content[0].text) for i in page.data]
    assert kinds == [("message", "user", "input_text", Q), ("message", "assistant", "output_text", A),
                     ("message", "user", "input_text", Q2)]
    assert page.data[1].id == first.output[0].id and len({i.id for i in page.data}) == 3
    assert all(i.id.startswith("msg_") and i.status == "completed" for i in page.data)
    newest = client.responses.input_items.list(second.id)
    assert [i.id for i in newest.data] == [i.id for i in reversed(page.data)] and newest.has_more is False
    one = client.responses.input_items.list(second.id, limit=1, order="asc")
    assert [i.id for i in one.data] == [page.data[0].id] and one.has_more is True
    assert (one.first_id, one.last_id) == (page.data[0].id, page.data[0].id)
    rest = client.responses.input_items.list(second.id, limit=5, order="asc", after=one.last_id)
    assert [i.id for i in rest.data] == [i.id for i in page.data[1:]] and rest.has_more is False
    assert [i.id for i in client.responses.input_items.list(second.id, order="asc")] == [i.id for i in page.data]
    before = client.responses.input_items.list(second.id, order="asc", extra_query={"before": page.data[2].id})
    assert [i.id for i in before.data] == [i.id for i in page.data[:2]]
    for query, param in [("limit=0", "limit"), ("limit=x", "limit"), ("order=up", "order"), ("after=msg_x", "after"),
                         ("before=msg_x", "before"), ("include=everything", "include")]:
        bad = httpx.get(f"{live.api_url}/responses/{second.id}/input_items?{query}",
                        headers={"Authorization": f"Bearer {KEY}"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, (query, bad.text)


def test_an_error_in_a_continued_conversation_names_previous_response_id(live):
    """A continued response's items were checked when it was made, but a request can still make them wrong, e.g.
    a function call of it answered by nothing: the 400 names previous_response_id or the new input, not messages."""
    call_r = _create(live, model="tools", input=ASK["content"], tools=TOOLS)
    with pytest.raises(openai.BadRequestError) as e:
        _create(live, model="tools", input=ASK["content"], tools=TOOLS, previous_response_id=call_r.id)
    err = e.value.body
    assert err["param"] == "input" and "messages" not in err["message"], err
    assert "no function_call_output" in err["message"], err


def test_a_background_response_is_polled_to_the_answer_it_gives_in_the_foreground(live):
    """background: true answers at once, in progress and stored; GET polls it to the text and usage the same
    request gives without it; then it reads and continues as any stored response. The request's connection is not
    needed for it to finish."""
    client = _client(live)
    r = _create(live, input=Q, background=True)
    assert (r.status, r.background, r.output, r.usage) == ("in_progress", True, [], None)
    done = polled(lambda: client.responses.retrieve(r.id), lambda x: x.status != "in_progress")
    plain = _create(live, input=Q)
    assert (done.status, done.output_text, done.usage.input_tokens, done.usage.output_tokens) == (
        "completed", A, plain.usage.input_tokens, plain.usage.output_tokens)
    assert done.background is True and done.id == r.id
    assert [i.content[0].text for i in client.responses.input_items.list(r.id).data] == [Q]
    assert _create(live, input=Q2, previous_response_id=r.id).status in ("completed", "incomplete")


def test_cancel_stops_a_background_response_and_frees_its_row(live):
    """A long background response: continuing it while it runs is a 400; cancel answers it "cancelled" (with what it
    had written) and frees the row; a second cancel is a 400 naming its status; delete stops one that runs."""
    client = _client(live)
    long = dict(model="tiny-qwen", input=Q, max_output_tokens=900, temperature=1.0, background=True,
                extra_body={"min_tokens": 900})
    health_when(live, lambda h: h["in_flight"] == 0)
    r = client.responses.create(**long)
    health_when(live, lambda h: h["running"] == 1)
    with pytest.raises(openai.BadRequestError) as e:
        _create(live, input=Q2, previous_response_id=r.id)
    assert "still in progress" in e.value.body["message"] and e.value.body["param"] == "previous_response_id"
    cancelled = client.responses.cancel(r.id)
    assert cancelled.status == "cancelled" and cancelled.id == r.id and cancelled.usage.output_tokens < 900
    assert client.responses.retrieve(r.id).status == "cancelled"
    assert health_when(live, lambda h: h["in_flight"] == 0)["in_flight"] == 0
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.cancel(r.id)
    assert "this one is cancelled" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # (a response made in the foreground)
        client.responses.cancel(_create(live, input=Q).id)
    assert "this one is completed" in e.value.body["message"]
    other = client.responses.create(**long)
    health_when(live, lambda h: h["running"] == 1)
    assert httpx.delete(f"{live.api_url}/responses/{other.id}", headers={"Authorization": f"Bearer {KEY}"}
                        ).json()["deleted"] is True
    assert health_when(live, lambda h: h["in_flight"] == 0)["in_flight"] == 0
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(other.id)


# -- the store's bounds, on a scripted engine ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scripted():
    with scripted_server() as bg:
        bg.server.engine.reply = "ok"
        yield bg


def test_the_store_keeps_the_most_recent_responses(scripted):
    """With room for two, a third response drops the one least recently stored or read; continuing a response
    reads it; a dropped response's turn lives on in the context of the one that continued it; capacity 0 stores
    nothing."""
    client = openai.OpenAI(base_url=scripted.api_url, api_key="none", timeout=30, max_retries=0)
    scripted.server.responses = ResponseStore(2)
    try:
        one = client.responses.create(model="scripted", input="1")
        two = client.responses.create(model="scripted", input="2")
        assert client.responses.retrieve(one.id).id == one.id  # (read: two is the oldest now)
        three = client.responses.create(model="scripted", input="3")
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(two.id)
        assert client.responses.retrieve(one.id).id == one.id  # (three is the oldest now)
        four = client.responses.create(model="scripted", input="4", previous_response_id=three.id)  # (reads three)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(one.id)
        five = client.responses.create(model="scripted", input="5", previous_response_id=four.id)
        with pytest.raises(openai.NotFoundError):  # (dropped: four and five are the two kept)
            client.responses.retrieve(three.id)
        items = client.responses.input_items.list(five.id, order="asc")
        assert [i.content[0].text for i in items.data] == ["3", "ok", "4", "ok", "5"]  # three's turn lives on

        scripted.server.responses = ResponseStore(0)
        r = client.responses.create(model="scripted", input="1")
        assert r.store is False
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="scripted", input="1", background=True)
        assert e.value.body["param"] == "background" and "--max-stored-responses 0" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="scripted", input="2", previous_response_id=r.id)
        assert "--max-stored-responses 0" in e.value.body["message"]
    finally:
        scripted.server.responses = ResponseStore(1000)


def test_a_continued_conversation_is_held_to_a_request_body_s_size(scripted, monkeypatch):
    """Each turn adds to what previous_response_id carries: past the body limit it is a 400 naming that field, before
    any row runs (the limit lowered here to less than a third turn needs)."""
    import finetune.serve.responses as R

    client = openai.OpenAI(base_url=scripted.api_url, api_key="none", timeout=30, max_retries=0)
    last = client.responses.create(model="scripted", input="x" * 300)
    last = client.responses.create(model="scripted", input="y" * 300, previous_response_id=last.id)
    monkeypatch.setattr(R, "MAX_BODY_BYTES", scripted.server.responses.get(last.id).size + 300)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="scripted", input="z" * 300, previous_response_id=last.id)
    assert e.value.body["param"] == "previous_response_id" and "start a new conversation" in e.value.body["message"]
    assert client.responses.create(model="scripted", input="z" * 300).output_text == "ok"  # (a new one is fine)


def test_a_background_response_that_fails_is_stored_failed(scripted):
    """tool_choice "required" and a reply that calls none of the tools: in the foreground a 500; in the background
    the response ends "failed" with the error, as a stream's response.failed."""
    scripted.server.engine.reply = " nope\nAction Input: {}"
    client = openai.OpenAI(base_url=scripted.api_url, api_key="none", timeout=30, max_retries=0)
    r = client.responses.create(model="scripted", input="Weather?", tools=TOOLS + [dict(TOOLS[0], name="get_time")],
                                tool_choice="required", background=True)
    failed = polled(lambda: client.responses.retrieve(r.id), lambda x: x.status != "in_progress", limit=30)
    assert failed.status == "failed" and failed.error.code == "server_error" and "'nope'" in failed.error.message
    scripted.server.engine.reply = "ok"


def test_the_store_alone():
    """Most recent by count and by bytes (the least recently stored or read goes first; the newest is kept even
    alone over the bytes); delete gives its bytes back."""
    store = ResponseStore(2)
    for i in range(3):
        assert store.put({"id": f"r{i}", "output": [{"id": f"o{i}"}]}, [{"id": f"i{i}"}], 10)
    assert store.get("r0") is None and len(store) == 2 and store.bytes == 20
    assert store.get("r1").conversation() == [{"id": "i1"}, {"id": "o1"}]
    assert store.delete("r1") and not store.delete("r1") and len(store) == 1 and store.bytes == 10
    by_bytes = ResponseStore(10, max_bytes=100)
    for i, size in enumerate([40, 40, 10]):
        by_bytes.put({"id": f"r{i}", "output": []}, [], size)
    by_bytes.get("r0")  # (read: r1 is now the least recent)
    by_bytes.put({"id": "r3", "output": []}, [], 30)
    assert [by_bytes.get(f"r{i}") is not None for i in range(4)] == [True, False, True, True] and by_bytes.bytes == 80
    by_bytes.put({"id": "big", "output": []}, [], 500)
    assert len(by_bytes) == 1 and by_bytes.get("big").size == 500
    assert not ResponseStore(0).put({"id": "r", "output": []}, [], 1)
    with pytest.raises(ValueError, match="0 or more"):
        ResponseStore(-1)
