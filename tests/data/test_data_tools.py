"""Tool / function-call conversations in the training data: the ReAct layout the server uses, labels on the
assistant's Thought/Action/Action Input/Final Answer and not on the observations."""

from __future__ import annotations

import json

import pytest

from finetune import react
from finetune.data import IGNORE, DataError, encode_conversation, load_records, normalize_record
from finetune.modeling import make_context

WEATHER = {"name": "get_weather", "description": "Weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
OPENAI = {
    "tools": [{"type": "function", "function": WEATHER}],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "I need the weather.",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny and 21C"},
        {"role": "assistant", "content": "It is sunny."},
    ],
}
# the same conversation in the official openai_api.py form (function_call + function role, from/value)
OFFICIAL = {
    "functions": [WEATHER],
    "conversations": [
        {"from": "user", "value": "Weather in Paris?"},
        {"from": "assistant", "value": "I need the weather.",
         "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
        {"from": "function", "value": "sunny and 21C"},
        {"from": "assistant", "value": "It is sunny."},
    ],
}
REPLY = ('Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
         'Observation: sunny and 21C\nThought: I now know the final answer.\nFinal Answer: It is sunny.')


def _runs(tok, enc):
    """(trained, text) runs of an encoded record."""
    runs: list = []
    for i, lab in zip(enc["input_ids"], enc["labels"]):
        t = lab != IGNORE
        if not runs or runs[-1][0] != t:
            runs.append((t, []))
        runs[-1][1].append(i)
    return [(t, tok.decode(ids)) for t, ids in runs]


def test_openai_tool_calls_render_in_the_react_layout(data_small_tokenizer):
    rec = normalize_record(OPENAI)
    user, assistant = rec["messages"]
    assert user["content"] == react.react_instruction([WEATHER]) + "\n\nQuestion: Weather in Paris?"
    assert "get_weather: Call this tool to interact with the get_weather API." in user["content"]
    assert assistant["content"] == REPLY
    assert normalize_record(rec) == rec  # normalising is idempotent, segments kept


# OpenAI's fine-tuning example for tool calls: the conversation ends with the assistant's call, no result
OPEN_CALL = {"tools": OPENAI["tools"], "messages": OPENAI["messages"][:2]}


def test_a_conversation_ending_with_a_call_trains_the_call_up_to_the_stop(data_small_tokenizer):
    """The model learns to make the call and to end it where the server stops generating ("Observation:"); the
    official form (function_call, no function turn) renders the same; a request ending so stays a 400 (the server's
    build_turns refuses it, as the official does)."""
    tok = data_small_tokenizer
    rec = normalize_record(OPEN_CALL)
    assert rec["messages"][1]["content"] == REPLY.split(" sunny")[0]
    runs = _runs(tok, encode_conversation(tok, OPEN_CALL))
    assert [text for t, text in runs if t] == ['Thought: I need the weather.\nAction: get_weather\nAction Input: '
                                               '{"city": "Paris"}\nObservation:<|im_end|>']
    official = {"functions": [WEATHER], "conversations": OFFICIAL["conversations"][:2]}
    assert normalize_record(official) == rec
    # after an answered call too (the second call's Thought follows the first's observation)
    rome = {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    second = {"role": "assistant", "content": "And Rome.", "tool_calls": [rome]}
    again = {**OPENAI, "messages": [*OPENAI["messages"][:3], second]}
    trained = [text for t, text in _runs(tok, encode_conversation(tok, again)) if t]
    assert trained[-1] == ' And Rome.\nAction: get_weather\nAction Input: {"city": "Rome"}\nObservation:<|im_end|>'
    with pytest.raises(react.ReactError, match="has no tool message answering it"):
        react.build_turns(OPEN_CALL["messages"], [WEATHER])  # (the server's path)
    with pytest.raises(react.ReactError, match="the last function call has no function result"):
        react.build_turns(react.canonical_messages(OPEN_CALL["messages"], open_call=True), [WEATHER])


def test_official_function_role_equals_openai_form(data_small_tokenizer):
    assert normalize_record(OFFICIAL) == normalize_record(OPENAI)
    assert encode_conversation(data_small_tokenizer, OFFICIAL) == encode_conversation(data_small_tokenizer, OPENAI)


def test_labels_on_the_assistants_text_not_on_observations(data_small_tokenizer):
    tok = data_small_tokenizer
    runs = _runs(tok, encode_conversation(tok, OPENAI))
    trained = [text for t, text in runs if t]
    assert trained == ['Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
                       'Observation:', " I now know the final answer.\nFinal Answer: It is sunny.<|im_end|>"]
    untrained = "".join(text for t, text in runs if not t)
    assert " sunny and 21C\nThought:" in untrained


def test_prompt_ids_equal_what_the_server_builds(data_small_tokenizer):
    """Training ids of a tool conversation = make_context over the server's turns + the reply."""
    tok = data_small_tokenizer
    enc = encode_conversation(tok, OPENAI)
    turns = react.build_turns(OPENAI["messages"][:1], react.functions_from(tools=OPENAI["tools"]))
    _, prompt = make_context(tok, turns.query, history=turns.history(), system=turns.system)
    assert enc["input_ids"][:len(prompt)] == prompt
    assert enc["input_ids"][len(prompt):] == tok.encode(REPLY) + [tok.im_end_id] + tok.encode("\n")


def test_qwen_plugin_form_functions_train_in_the_prompt_the_server_builds(data_small_tokenizer):
    """Functions in Qwen's own plugin form (name_for_model, name_for_human, description_for_model, `parameters` a list
    of parameter objects), as the official function-calling examples define them, were refused ("parameters: must
    be a JSON Schema object"); they render as the server (and the official openai_api.py) writes them."""
    tok = data_small_tokenizer
    plugin = {"name_for_human": "Weather", "name_for_model": "get_weather", "description_for_model": "Weather of a "
              "city.", "parameters": [{"name": "city", "description": "the city", "required": True,
                                       "schema": {"type": "string"}}]}
    record = {**OFFICIAL, "functions": [plugin]}
    rec = normalize_record(record)
    assert rec["messages"][0]["content"].endswith('Parameters: [{"name": "city", "description": "the city", '
                                                  '"required": true, "schema": {"type": "string"}}]\n\nUse the '
                                                  'following format:' + react.react_instruction([plugin]).split(
                                                      "Use the following format:")[1] + "\n\nQuestion: Weather in "
                                                  "Paris?")
    turns = react.build_turns(OFFICIAL["conversations"][:1], react.functions_from([plugin]))
    _, prompt = make_context(tok, turns.query, history=turns.history(), system=turns.system)
    enc = encode_conversation(tok, record)
    assert enc["input_ids"][:len(prompt)] == prompt
    assert enc["input_ids"][len(prompt):] == tok.encode(REPLY) + [tok.im_end_id] + tok.encode("\n")


def test_two_calls_in_one_assistant_message_and_train_on_prompt(data_small_tokenizer):
    rec = {"tools": OPENAI["tools"], "messages": [
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": "Both cities.", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "b", "content": "rain"},  # answered out of order: matched by id
        {"role": "tool", "tool_call_id": "a", "content": "sun"},
        {"role": "assistant", "content": "Sun in Paris, rain in Rome."}]}
    reply = normalize_record(rec)["messages"][1]["content"]
    assert reply == ('Thought: Both cities.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: sun\n'
                     'Thought: \nAction: get_weather\nAction Input: {"city": "Rome"}\nObservation: rain\n'
                     'Thought: I now know the final answer.\nFinal Answer: Sun in Paris, rain in Rome.')
    tok = data_small_tokenizer
    untrained = "".join(t for ok, t in _runs(tok, encode_conversation(tok, rec)) if not ok)
    assert " sun\nThought:" in untrained and " rain\nThought:" in untrained
    full = encode_conversation(tok, rec, train_on_prompt=True)
    assert " sun" in "".join(t for ok, t in _runs(tok, full) if ok)


def test_a_call_without_arguments_renders_as_the_server_prompts_it(data_small_tokenizer):
    """Empty arguments: "Action Input:" then "\nObservation:", no space between (the official parse_messages
    strips the turn's first message); the labels cover the same bytes."""
    rec = {"functions": [WEATHER], "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Ask.", "function_call": {"name": "get_weather", "arguments": ""}},
        {"role": "function", "content": "sun"}, {"role": "assistant", "content": "Sunny."}]}
    reply = normalize_record(rec)["messages"][1]["content"]
    assert reply == ("Thought: Ask.\nAction: get_weather\nAction Input:\nObservation: sun\n"
                     "Thought: I now know the final answer.\nFinal Answer: Sunny.")
    turns = react.build_turns(rec["messages"][:3], [WEATHER])
    assert reply.startswith(react.Turns.text(turns.pairs[-1][1])[:-len("\nThought:")])
    tok = data_small_tokenizer
    trained = [t for ok, t in _runs(tok, encode_conversation(tok, rec)) if ok]
    assert trained[0] == "Thought: Ask.\nAction: get_weather\nAction Input:\nObservation:"



def test_null_arguments_are_no_arguments():
    """`"arguments": null` was written out as "Action Input: null"."""
    def rec(args):
        return {**OFFICIAL, "conversations": [OFFICIAL["conversations"][0], {**OFFICIAL["conversations"][1],
                "function_call": {"name": "get_weather", "arguments": args}}, *OFFICIAL["conversations"][2:]]}
    assert normalize_record(rec(None)) == normalize_record(rec(""))
    assert "Action Input:\nObservation:" in normalize_record(rec(None))["messages"][1]["content"]

# the same call in LLaMA-Factory's ShareGPT form: the call as JSON text in a "function_call" turn, the result in
# an "observation" turn, the tools as JSON text of plain function dicts
LLAMA_FACTORY = {
    "tools": json.dumps([WEATHER]),
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "sunny and 21C"},
        {"from": "gpt", "value": "It is sunny."},
    ],
}


def test_llama_factory_sharegpt_tool_form_renders_as_the_openai_form(data_small_tokenizer):
    """A function_call turn is the assistant's call with no thought of its own (the official layout writes
    "Thought: " before the action, as for an OpenAI call with empty content)."""
    no_thought = json.loads(json.dumps(OPENAI))
    no_thought["messages"][1]["content"] = ""
    assert normalize_record(LLAMA_FACTORY) == normalize_record(no_thought)
    assert encode_conversation(data_small_tokenizer, LLAMA_FACTORY) == encode_conversation(data_small_tokenizer,
                                                                                           no_thought)


def test_a_tool_turn_answering_a_function_call_turn_is_its_result():
    """ShareGPT files mix the forms: a `tool` turn after a `function_call` turn was refused as answering no tool
    call (only OpenAI tool_calls registered one); it is that call's result, as an `observation` turn is."""
    mixed = json.loads(json.dumps(LLAMA_FACTORY))
    mixed["conversations"][2]["from"] = "tool"
    assert normalize_record(mixed) == normalize_record(LLAMA_FACTORY)
    # a second result of one call is still refused, and a tool turn after an answered call too
    twice = json.loads(json.dumps(mixed))
    twice["conversations"][3:3] = [{"from": "tool", "value": "again"}]
    with pytest.raises(DataError, match=r"conversations\[3\]"):
        normalize_record(twice)


def test_alpaca_record_keeps_its_tools():
    """LLaMA-Factory's Alpaca form has a `tools` column: it was dropped, and the record trained as plain chat."""
    alpaca = {"instruction": "Weather in Paris?", "output": "It is sunny.", "tools": LLAMA_FACTORY["tools"]}
    chat = {"tools": LLAMA_FACTORY["tools"], "conversations": [
        {"from": "human", "value": "Weather in Paris?"}, {"from": "gpt", "value": "It is sunny."}]}
    rec = normalize_record(alpaca)
    assert rec == normalize_record(chat)
    assert rec["messages"][0]["content"].startswith(react.react_instruction([WEATHER]))


@pytest.mark.parametrize("record, where", [
    ({"tools": "[{oops", "conversations": LLAMA_FACTORY["conversations"]}, "tools: a string that is not JSON"),
    ({"tools": LLAMA_FACTORY["tools"], "conversations": [
        {"from": "human", "value": "q"},
        {"from": "function_call", "value": json.dumps([{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}])},
        {"from": "observation", "value": "r"}, {"from": "gpt", "value": "x"}]}, "conversations[1].value: holds 2 calls"),
    ({"tools": LLAMA_FACTORY["tools"], "conversations": [
        {"from": "human", "value": "q"}, {"from": "function_call", "value": "get_weather(Paris)"},
        {"from": "observation", "value": "r"}, {"from": "gpt", "value": "x"}]}, "conversations[1].value: must be JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]}, "messages[1].role"),
    # two calls left without results: ReAct writes a call's result before the next call
    ({**OPENAI, "messages": [OPENAI["messages"][0], {**OPENAI["messages"][1], "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]}]},
     "messages[1]: ends with 2 tool calls without results"),
    ({"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "t",
                         "function_call": {"name": "f", "arguments": "{}"}}, {"from": "function", "value": "r"}]},
     "conversations[2]"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}],
      "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "tools[0].function.name"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "function", "content": "r"}]}, "messages[1].role"),
    # definitions the server refuses (400) trained a prompt it never builds: "Action: f\nAction: g" cannot be
    # parsed back, a description 5 or parameters "nope" rendered as such
    ({**OPENAI, "tools": [{"type": "function", "function": {**WEATHER, "name": "get\nweather"}}]},
     "tools[0].function.name: must be one line of printable characters"),
    ({**OPENAI, "tools": [{"type": "function", "function": {**WEATHER, "description": 5}}]},
     "tools[0].function.description: must be a string, got a number"),
    ({**OFFICIAL, "functions": [{**WEATHER, "parameters": "nope"}]},
     "functions[0].parameters: must be a JSON Schema object or a list of parameters, got a string"),
    # each was trained as it was: a call in broken JSON, a call of an undefined function (or with no definitions:
    # the server only prompts in this layout with them), an empty question or answer (refused in plain records)
    ({**OPENAI, "messages": [OPENAI["messages"][0], {**OPENAI["messages"][1], "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": "}}]},
        *OPENAI["messages"][2:]]}, "messages[1].tool_calls[0].function.arguments: not JSON"),
    ({"tools": LLAMA_FACTORY["tools"], "conversations": [
        LLAMA_FACTORY["conversations"][0], {"from": "function_call", "value": json.dumps(
            {"name": "get_weather", "arguments": "city=Paris"})}, *LLAMA_FACTORY["conversations"][2:]]},
     "conversations[1].value.arguments: not JSON"),
    ({"messages": OPENAI["messages"]},
     "messages[1].tool_calls[0].function.name: calls 'get_weather', but the record defines no functions"),
    # arguments that are JSON but not an object were trained as "Action Input: [1, 2]"
    *[({**OPENAI, "messages": [OPENAI["messages"][0], {**OPENAI["messages"][1], "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
        *OPENAI["messages"][2:]]},
      f"messages[1].tool_calls[0].function.arguments: must be a JSON object of the function's parameters, got {got}")
      for args, got in (("[1, 2]", "an array"), ('"Paris"', "a string"), (5, "a number"))],
    ({**OFFICIAL, "conversations": [OFFICIAL["conversations"][0], {**OFFICIAL["conversations"][1], "function_call": {
        "name": "get_wether", "arguments": "{}"}}, *OFFICIAL["conversations"][2:]]},
     "conversations[1].function_call.name: calls 'get_wether', which the record does not define (defined: "
     "get_weather)"),
    ({**OPENAI, "messages": [{"role": "user", "content": " "}, *OPENAI["messages"][1:]]},
     "messages[0].content: a user message must not be empty"),
    ({**OPENAI, "messages": [*OPENAI["messages"][:3], {"role": "assistant", "content": None}]},
     "messages[3].content: an assistant message without a call must not be empty"),
])
def test_invalid_tool_conversations_name_the_turn(record, where):
    with pytest.raises(DataError) as e:
        normalize_record(record)
    assert e.value.reason == "invalid tool conversation"
    assert where in str(e.value)


DEEP, LONG = "[" * 100_000, "9" * 5_000  # json.loads raises RecursionError / ValueError, not JSONDecodeError


@pytest.mark.parametrize("record, where", [
    ({"tools": DEEP, "conversations": LLAMA_FACTORY["conversations"]}, "tools: a string that is not JSON (nested"),
    ({"tools": f'[{{"name": "get_weather", "n": {LONG}}}]', "conversations": LLAMA_FACTORY["conversations"]},
     "tools: a string that is not JSON (a number too long to read"),
    ({"tools": LLAMA_FACTORY["tools"], "conversations": [
        LLAMA_FACTORY["conversations"][0], {"from": "function_call", "value": DEEP},
        *LLAMA_FACTORY["conversations"][2:]]}, "conversations[1].value: must be JSON text"),
    ({**OPENAI, "messages": [OPENAI["messages"][0], {**OPENAI["messages"][1], "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": f'{{"n": {LONG}}}'}}]},
        *OPENAI["messages"][2:]]}, "messages[1].tool_calls[0].function.arguments: not JSON (a number too long"),
    # Python's json reads NaN / Infinity, a tool's JSON parser does not: the call was trained as it was
    *[({**OPENAI, "messages": [OPENAI["messages"][0], {**OPENAI["messages"][1], "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
        *OPENAI["messages"][2:]]},
      f"messages[1].tool_calls[0].function.arguments: not JSON ({name} is not a JSON value")
      for args, name in (('{"days": NaN}', "NaN"), ({"days": float("-inf")}, "-Infinity"))],
    # a key twice in JSON text: json.loads kept the last value without a word (the file's own keys are checked)
    ({**OPENAI, "messages": [OPENAI["messages"][0], {**OPENAI["messages"][1], "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                      "arguments": '{"city": "Paris", "city": "Rome"}'}}]},
        *OPENAI["messages"][2:]]},
     "messages[1].tool_calls[0].function.arguments: not JSON (key 'city' appears twice in one object"),
    # NaN in a function's parameters was written into the ReAct prompt as NaN
    ({**OPENAI, "tools": [{"type": "function", "function": {**WEATHER, "parameters": {"maximum": float("nan")}}}]},
     "tools[0].function.parameters: holds NaN or Infinity"),
])
def test_json_text_that_json_cannot_read_is_a_data_error(tmp_path, record, where):
    """JSON text inside a record (tools, a function_call turn, arguments) nested too deeply or holding an
    integer too long to convert was a RecursionError / ValueError traceback out of the data reader."""
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        load_records(p)
    assert e.value.reason == "invalid tool conversation" and "record 1, line 1" in str(e.value)
    assert where in str(e.value)


@pytest.mark.parametrize("key, value, got", [("functions", 0, "a number"), ("functions", {}, "an object"),
                                             ("tools", {}, "an object"), ("tools", False, "a boolean"),
                                             ("functions", "get_weather", "a string")])
def test_functions_or_tools_of_the_wrong_type_are_an_error_even_when_empty(key, value, got):
    """`functions: {}` or `0` counted as no functions: the record trained as plain chat without a word."""
    with pytest.raises(DataError) as e:
        normalize_record({key: value, "messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                                      "content": "a"}]})
    assert e.value.reason == "invalid tool conversation" and f"{key}: must be a list, got {got}" in str(e.value)


@pytest.mark.parametrize("empty", [None, [], ""])
def test_null_empty_list_or_empty_string_is_no_functions(empty):
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert normalize_record({**plain, "tools": empty, "functions": empty}) == normalize_record(plain)


@pytest.mark.parametrize("record, reason", [
    # react reads one of each pair: the other was dropped without a word
    ({**OPENAI, "conversations": OFFICIAL["conversations"]}, "both 'conversations' and 'messages'"),
    ({**OPENAI, "messages": [{"role": "user", "from": "assistant", "content": "q"}, *OPENAI["messages"][1:]]},
     "both 'from' and 'role'"),
    ({**OPENAI, "messages": [{"role": "user", "content": "q", "value": "other q"}, *OPENAI["messages"][1:]]},
     "both 'value' and 'content'"),
])
def test_tool_records_refuse_what_plain_records_refuse(record, reason):
    with pytest.raises(DataError) as e:
        normalize_record(record)
    assert e.value.reason == reason


def test_tool_record_with_a_null_conversations_column_reads_its_messages():
    """A `datasets` dir that mixes the forms has both columns, one null in each row."""
    assert normalize_record({"conversations": None, **OPENAI}) == normalize_record(OPENAI)


def test_load_records_reads_tool_conversations(tmp_path):
    p = tmp_path / "tools.jsonl"
    p.write_text(json.dumps(OPENAI) + "\n" + json.dumps(OFFICIAL) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]}) + "\n")
    with pytest.raises(DataError) as e:
        load_records(p)
    assert "record 3" in str(e.value) and "line 3" in str(e.value) and "messages[1].role" in str(e.value)
    recs = load_records(p, skip_invalid=True)
    assert len(recs) == 2 and recs[0]["messages"][1]["content"] == REPLY


def test_segments_must_join_to_the_content():
    rec = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "ab", "segments": [["a", True], ["c", False]]}]}
    with pytest.raises(DataError, match="turn 2"):
        normalize_record(rec)


def test_segments_in_a_plain_record_train_only_their_marked_text(data_small_tokenizer):
    """`segments` is part of the documented record form (README, Data): on a plain assistant message only the text
    marked true is trained; on a user turn it is refused (it was ignored silently)."""
    tok = data_small_tokenizer
    reply = [["Let me check.", False], [" It is 42.", True]]  # (the README's example)
    rec = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "Let me check. It is 42.", "segments": reply}]}
    enc = encode_conversation(tok, rec)
    trained = tok.decode([t for t in enc["labels"] if t != IGNORE])
    assert trained.startswith(" It is 42.<|im_end|>") and "check" not in trained
    whole = encode_conversation(tok, {"messages": [m for m in rec["messages"]][:1] +
                                      [{"role": "assistant", "content": "Let me check. It is 42."}]})
    assert enc["input_ids"] == whole["input_ids"]
    assert sum(t != IGNORE for t in enc["labels"]) < sum(t != IGNORE for t in whole["labels"])
    user = {"messages": [{"role": "user", "content": "q", "segments": [["q", True]]}, rec["messages"][1]]}
    with pytest.raises(DataError, match=r"turn 1 \(user\): 'segments' marks the trained text of an assistant turn"):
        normalize_record(user)


def test_a_tool_record_is_marked_react_and_a_plain_record_with_segments_is_not(data_small_tokenizer):
    """A normalised tool record carries "react": true (its turns are in the ReAct layout: eval ends its replies at
    "Observation:"); a plain record's own segments looked the same, and eval cut its replies there too. The mark
    survives normalising again (a normalised record is a record), an Alpaca record's too; it is a boolean, and
    false on a tool conversation contradicts it."""
    tok = data_small_tokenizer
    rec = normalize_record(OPENAI)
    assert rec["react"] is True and normalize_record(rec) == rec
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Observation: x",
                                                              "segments": [["Observation: x", True]]}]}
    assert "react" not in normalize_record(plain) and "react" not in normalize_record({**plain, "react": False})
    marked = normalize_record({**plain, "react": True})  # (pre-rendered ReAct text, as a normalised record)
    assert marked["react"] is True and normalize_record(marked) == marked
    assert encode_conversation(tok, marked) == encode_conversation(tok, plain)  # the mark trains nothing
    alpaca = normalize_record({"instruction": "q", "output": "a", "react": True})
    assert alpaca["react"] is True
    for bad, reason in (({**plain, "react": "yes"}, "'react' must be true"),
                        ({**OPENAI, "react": False}, "'react' is false, but a tool / function-call conversation"),
                        ({"instruction": "q", "output": "a", "react": 1}, "'react' must be true")):
        with pytest.raises(DataError, match=reason):
            normalize_record(bad)


def test_tool_turns_with_null_synonyms_read_the_other_key():
    """A null `content` beside a `value` (or a null `role` beside a `from`) counts as absent, as in plain records: the
    tool path read the null, dropping the assistant's thought without a word (and missed a null-role function turn)."""
    call = {**OPENAI["messages"][1], "content": None, "value": "I need the weather."}
    assert normalize_record({**OPENAI, "messages": [OPENAI["messages"][0], call, *OPENAI["messages"][2:]]}) == \
        normalize_record(OPENAI)
    msgs = [{"role": m.get("role"), "from": None, "content": None, "value": m.get("content"),
             **{k: v for k, v in m.items() if k not in ("role", "content")}} for m in OPENAI["messages"]]
    assert normalize_record({**OPENAI, "messages": msgs}) == normalize_record(OPENAI)
    turns = [{"from": t["from"], "role": None, "value": t["value"], "content": None,
              **{k: v for k, v in t.items() if k not in ("from", "value")}} for t in OFFICIAL["conversations"]]
    assert normalize_record({**OFFICIAL, "conversations": turns}) == normalize_record(OFFICIAL)
    assert react.is_tool_record({"conversations": turns})
    assert react.is_tool_record({"conversations": turns[:1] + turns[2:]})  # by its function turn alone


@pytest.mark.parametrize("role", ["chatgpt", "model", "ChatGPT", "MODEL"])
def test_tool_conversations_take_the_assistant_roles_plain_records_take(role):
    """A tool conversation whose replies are "chatgpt" or "model" turns (as plain records take them) was refused as
    an "unknown role"; the server's requests keep OpenAI's roles (its messages are not data files)."""
    turns = json.loads(json.dumps(LLAMA_FACTORY))
    turns["conversations"][3]["from"] = role
    assert normalize_record(turns) == normalize_record(LLAMA_FACTORY)
    messages = json.loads(json.dumps(OPENAI))
    messages["messages"][3]["role"] = role
    assert normalize_record(messages) == normalize_record(OPENAI)
    with pytest.raises(react.ReactError, match=f"unknown role '{role.lower()}'"):  # (the server's path)
        react.build_turns(messages["messages"], [WEATHER])
