"""Where the server follows the official openai_api.py beyond the ReAct texts: the prompt of a continued turn,
replies that continue the client's assistant message, tiny temperatures. The engine is scripted (each request
generates the tokens of a given text), so replies with exact whitespace can be asserted."""

from __future__ import annotations


import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _helpers import scripted_server  # noqa: E402

from finetune import react  # noqa: E402

F = {"name": "search", "description": "Search the web.", "parameters": {"type": "object"}}


@pytest.fixture(scope="module")
def live():
    with scripted_server() as bg:
        yield bg


def _post(live, reply, messages, **kw):
    live.server.engine.reply = reply
    r = httpx.post(live.api_url + "/chat/completions", timeout=30,
                   json={"model": "scripted", "messages": messages, **kw})
    assert r.status_code == 200, r.text
    if not kw.get("stream"):
        return r.json()["choices"][0]
    import json

    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def test_a_continued_assistant_message_gets_the_reply_as_generated(live):
    """As the official text completion: a conversation ending with an assistant message is continued, and the
    continuation comes back unstripped (its leading space separates it from the client's text)."""
    msgs = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello"}]
    choice = _post(live, " world.\n", msgs)
    assert choice["message"]["content"] == " world.\n" and choice["finish_reason"] == "stop"
    assert _post(live, " world.\n", msgs, stream=True) == " world.\n"
    # a new turn is stripped as model.chat strips it
    assert _post(live, " Hi there. ", msgs[:1])["message"]["content"] == "Hi there."
    assert _post(live, " Hi there. ", msgs[:1], stream=True) == "Hi there."


def test_after_a_function_result_the_reply_is_parsed_as_before(live):
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "look", "function_call": {"name": "search", "arguments": "{}"}},
            {"role": "function", "content": "found"}]
    choice = _post(live, " I now know the final answer.\nFinal Answer: It is found.", msgs, functions=[F])
    assert choice["message"]["content"] == "It is found." and choice["finish_reason"] == "stop"


def test_a_call_without_a_thought_after_a_tool_result_is_a_call_as_trained(live):
    """A second call with no content (OpenAI's usual form) after a tool result is trained as " \\nAction: ..." after
    the "\\nThought:" the server writes; the server strips that reply to "Action: ..." and returned it as the answer's
    text (finish "stop"), where the official server's text completion, which does not strip it, parses the call."""
    from finetune.data import normalize_record

    tools = [{"type": "function", "function": F}]
    call = {"type": "function", "function": {"name": "search", "arguments": '{"q": 2}'}}
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [{**call, "id": "a"}]},
            {"role": "tool", "tool_call_id": "a", "content": "found"}]
    record = {"tools": tools, "messages": msgs + [{"role": "assistant", "content": None,
                                                   "tool_calls": [{**call, "id": "b"}]}]}
    segments = normalize_record(record)["messages"][1]["segments"]
    trained = "".join(t for t, on in segments[segments.index(["\nThought:", False]) + 1:] if on)
    assert trained.startswith(" \nAction: search")  # what the model learns to write here
    choice = _post(live, trained, msgs, tools=tools)
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == call["function"]
    assert _post(live, trained, msgs, tools=tools, stream=True) == ""  # (streamed: the call, no text)
    choice = _post(live, trained, msgs[:1] + [{**msgs[1], "tool_calls": None, "function_call": call["function"]},
                                              {"role": "function", "content": "found"}], functions=[F])
    assert choice["finish_reason"] == "function_call" and choice["message"]["content"] == ""
    assert choice["message"]["function_call"] == call["function"]
    # a reply that only looks so without being a call keeps its text (no newline added in front)
    answer = _post(live, " Action: \nAction Input: x", msgs, tools=tools)
    assert answer["message"]["content"] == "Action: \nAction Input: x" and answer["finish_reason"] == "stop"


def test_a_function_call_without_a_thought_has_the_empty_content_of_the_official_server(live):
    """With `functions` (the official server's API) a call's content is the thought before "Action:", an empty
    string when there is none, as openai_api.py's parse_response gives it (it was null); with OpenAI `tools` an
    empty content is null, as OpenAI sends it."""
    msgs = [{"role": "user", "content": "q"}]
    reply = 'Thought: \nAction: search\nAction Input: {"q": 1}'
    choice = _post(live, reply, msgs, functions=[F])
    assert choice["message"]["content"] == "" and choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"] == {"name": "search", "arguments": '{"q": 1}'}
    choice = _post(live, reply, msgs, tools=[{"type": "function", "function": F}])
    assert choice["message"]["content"] is None and choice["finish_reason"] == "tool_calls"
    assert _post(live, "Thought: Look.\nAction: search\nAction Input: {}", msgs,
                 functions=[F])["message"]["content"] == "Look."


def test_the_continued_turns_prompt_is_the_official_text_completion_prompt(live):
    """The official text completion strips every user text of the prompt (an empty question under the
    instruction ends "Question:") and each history reply (no space after an empty "Action Input:")."""
    tok = live.server.tokenizer
    msgs = [{"role": "user", "content": ""},
            {"role": "assistant", "content": "", "function_call": {"name": "search", "arguments": ""}},
            {"role": "function", "content": "found"}]
    from finetune.serve.protocol import ChatCompletionRequest

    ids, _ = live.server.prompt(ChatCompletionRequest(model="scripted", messages=msgs, functions=[F]))
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                + react.react_instruction([F]) + "\n\nQuestion:<|im_end|>\n<|im_start|>assistant\n"
                "Thought: \nAction: search\nAction Input:\nObservation: found\nThought:")
    assert tok.decode(ids) == expected


def test_a_continued_turn_keeps_the_whole_history_as_the_official_text_completion(live, monkeypatch):
    """The official server continues a turn (after a function result, or the client's assistant message) with
    text_complete_last_message, which writes every history pair into the prompt: max_window_size leaves pairs out
    only of a prompt for a new user message (model.chat's make_context). The server left them out of both."""
    from finetune.serve.protocol import ChatCompletionRequest

    monkeypatch.setattr(live.server, "window", 60)
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"Question number {i} about the owl?"},
                    {"role": "assistant", "content": f"Answer number {i}: the owl is silver."}]
    call = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "look", "function_call": {"name": "search", "arguments": "{}"}},
            {"role": "function", "content": "found"}]
    tok = live.server.tokenizer
    for messages, functions, last in ((history + call, [F], "Thought: look\nAction: search\nAction Input: {}\n"
                                       "Observation: found\nThought:"),
                                      (history + call[:1] + [{"role": "assistant", "content": "The owl"}], None,
                                       "The owl")):
        body = ChatCompletionRequest(model="scripted", messages=messages, functions=functions)
        stats: dict = {}
        ids = live.server.prompt_ids(live.server.turns(body)[0], stats)
        expected = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>" + "".join(
            f"\n<|im_start|>user\n{history[i]['content']}<|im_end|>\n<|im_start|>assistant\n"
            f"{react.FINAL_THOUGHT if functions else ''}{history[i + 1]['content']}<|im_end|>"
            for i in range(0, len(history), 2))
        question = f"{react.react_instruction([F])}\n\nQuestion: q" if functions else "q"
        expected += f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{last}"
        assert tok.decode(ids) == expected and stats["history_left_out"] == 0
    # a new user message after the same history: the oldest pairs are left out, as model.chat leaves them out
    stats = {}
    live.server.prompt_ids(live.server.turns(ChatCompletionRequest(model="scripted", messages=history + call[:1]))[0],
                           stats)
    assert stats["history_left_out"] > 0


def test_eval_prompts_a_tool_record_as_the_server_prompts_the_request_ending_with_its_last_tool_result(live):
    """`qwen-ft eval` asks an adapter what the server asks it after a tool result: the same prompt ids, through
    the server's whole request path (the request's tools, its turns, its prompt)."""
    from finetune.evaluate import generation_prompt
    from finetune.serve.protocol import ChatCompletionRequest

    tools = [{"type": "function", "function": F}]
    msgs = [{"role": "user", "content": "Find it."},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "search", "arguments": "{\"q\": \"it\"}"}}]},
            {"role": "tool", "tool_call_id": "a", "content": "here"},
            {"role": "assistant", "content": "Again.", "tool_calls": [
                {"id": "b", "type": "function", "function": {"name": "search", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "b", "content": " there\n"}]
    ids, _ = live.server.prompt(ChatCompletionRequest(model="scripted", messages=msgs, tools=tools))
    record = {"tools": tools, "messages": msgs + [{"role": "assistant", "content": "It is there."}]}
    tokens, reference = generation_prompt(live.server.tokenizer, record, live.server.window)
    assert tokens == ids
    assert reference == "I now know the final answer.\nFinal Answer: It is there."


@pytest.mark.parametrize("temperature, greedy", [(0, True), (1e-40, True), (0.009, True), (0.01, False)])
def test_a_temperature_below_001_is_greedy_as_in_the_official_server(live, temperature, greedy):
    from finetune.serve.protocol import ChatCompletionRequest

    body = ChatCompletionRequest(model="scripted", messages=[{"role": "user", "content": "hi"}],
                                 temperature=temperature, seed=1)
    params = live.server.params(body, 10)
    assert params.do_sample is (not greedy)


def test_tool_choice_none_after_a_tool_result_gets_a_final_answer(live):
    """The open ReAct turn went on after "Thought:" without the instruction and without the "Observation:" stop,
    and the client got "I now know the final answer.\nFinal Answer: ..." (or an invented call) as its content.
    The turn is now laid out as with the tools and ends in the official final-answer thought."""
    from finetune.serve.protocol import ChatCompletionRequest

    tools = [{"type": "function", "function": F}]
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "look", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "search", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "found"}]
    ids, functions = live.server.prompt(ChatCompletionRequest(model="scripted", messages=msgs, tools=tools,
                                                              tool_choice="none"))
    auto, _ = live.server.prompt(ChatCompletionRequest(model="scripted", messages=msgs, tools=tools))
    tok = live.server.tokenizer
    assert functions == [] and tok.decode(auto).endswith("\nObservation: found\nThought:")
    assert tok.decode(ids) == tok.decode(auto) + " I now know the final answer.\nFinal Answer:"
    choice = _post(live, " It is found.", msgs, tools=tools, tool_choice="none")
    assert choice["message"] == {"role": "assistant", "content": "It is found."} and choice["finish_reason"] == "stop"
    # a conversation ending with a user message stays plain chat (no ReAct prompt)
    plain, _ = live.server.prompt(ChatCompletionRequest(model="scripted", messages=msgs[:1], tools=tools,
                                                        tool_choice="none"))
    assert "Action" not in tok.decode(plain)


def test_a_tool_result_in_a_request_without_tools_gets_a_final_answer(live):
    """A client that leaves `tools` out of the request carrying the tool's result (the conversation's tools are
    done) got the ReAct text back ("I now know the final answer.\nFinal Answer: ..."), as tool_choice "none"
    did: the open turn is closed with the official final-answer thought, and the answer comes back alone."""
    from finetune.serve.protocol import ChatCompletionRequest

    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "search", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "found"}]
    ids, functions = live.server.prompt(ChatCompletionRequest(model="scripted", messages=msgs))
    tok = live.server.tokenizer
    assert functions == []
    assert tok.decode(ids).endswith("\nObservation: found\nThought: I now know the final answer.\nFinal Answer:")
    choice = _post(live, " It is found.", msgs)
    assert choice["message"] == {"role": "assistant", "content": "It is found."} and choice["finish_reason"] == "stop"
    assert _post(live, " It is found.", msgs, stream=True) == "It is found."


def test_a_tool_call_cut_by_max_tokens_finishes_with_length(live):
    """A call whose arguments max_tokens cut short was reported as finish_reason "tool_calls" with broken JSON
    for the client to run; OpenAI reports a reply the token limit ended with "length"."""
    import json

    tools = [{"type": "function", "function": F}]
    msgs = [{"role": "user", "content": "Find it."}]
    call = 'Thought: I should search.\nAction: search\nAction Input: {"q": "the thing we look for"}'
    whole = _post(live, call, msgs, tools=tools)
    assert whole["finish_reason"] == "tool_calls"
    assert json.loads(whole["message"]["tool_calls"][0]["function"]["arguments"]) == {"q": "the thing we look for"}
    cut = len(live.server.tokenizer.encode(call)) - 4
    assert _post(live, call, msgs, tools=tools, max_tokens=cut)["finish_reason"] == "length"
    live.server.engine.reply = call
    r = httpx.post(live.api_url + "/chat/completions", timeout=30,
                   json={"model": "scripted", "messages": msgs, "tools": tools, "max_tokens": cut, "stream": True})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]


@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_holds_back_stop_strings_as_it_holds_stop_tokens(live, stream):
    """The server cut the reply at a stop string among its first min_tokens tokens: the engine holds stop tokens
    and its own stop strings back until min_tokens (as vLLM holds stop strings), and so does the text stream."""
    reply = " one two three two four"
    tok = live.server.tokenizer
    ids = tok.encode(reply)
    first = next(n for n in range(1, len(ids) + 1) if "two" in tok.decode(ids[:n]))  # completes the first "two"
    msgs = [{"role": "user", "content": "count"}]

    def text(choice):
        return choice if stream else choice["message"]["content"]

    # (the space before the stop string stays, as the official server strips the reply before it cuts it)
    assert text(_post(live, reply, msgs, stop=["two"], stream=stream)) == "one "
    assert text(_post(live, reply, msgs, stop=["two"], min_tokens=first, stream=stream)) == "one "
    assert text(_post(live, reply, msgs, stop=["two"], min_tokens=first + 1, stream=stream)) == "one two three "
    assert text(_post(live, reply, msgs, stop=["two"], min_tokens=len(ids), stream=stream)) == reply.strip()
