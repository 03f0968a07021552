"""The record shapes of popular public SFT datasets, as their files hold them: read as the conversation they are,
or refused in one line saying what the data is and how to make it usable."""

import json
import subprocess
import sys

import pytest

from finetune.data import DEFAULT_SYSTEM, DataError, load_records, normalize_record
from finetune.data.encoding import encode_conversation
from finetune.tokenization import SMALL_VOCAB, QWenTokenizer


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def refused(record) -> DataError:
    with pytest.raises(DataError) as e:
        normalize_record(record)
    return e.value


def exchange(user, reply, system=DEFAULT_SYSTEM, rid=None):
    return {"id": rid, "system": system,
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


# -- per-turn weights (OpenHermes-2.5, SlimOrca) ----------------------------------------------------------------

# OpenHermes-2.5's columns, as its JSON holds them (SlimOrca's records are its `conversations` alone)
HERMES = {"custom_instruction": None, "topic": None, "model_name": None, "model": None, "skip_prompt_formatting": False,
          "category": "orca", "views": None, "language": None, "id": None, "title": None, "idx": None, "hash": None,
          "avatarUrl": None, "system_prompt": None, "source": "airoboros2.2"}


def test_sharegpt_exports_that_weigh_every_turn_train_as_without_weights(tmp_path):
    """OpenHermes-2.5 / SlimOrca write a weight on every turn: null on the system turn, 0.0 on human turns, 1.0 on gpt
    turns. `qwen-ft train` stopped at the first record ("turn 2 (user) has a 'weight'; only assistant turns take
    one"); the prompts' 0 is what training does anyway, so the record trains as it would without weights."""
    turns = [{"from": "system", "value": "You are an AI assistant.", "weight": None},
             {"from": "human", "value": "What is 2+2?", "weight": 0.0},
             {"from": "gpt", "value": "4", "weight": 1.0},
             {"from": "human", "value": "And 3+3?", "weight": 0.0},
             {"from": "gpt", "value": "6", "weight": 1.0}]
    path = write_jsonl(tmp_path / "hermes.jsonl", [{"conversations": turns, **HERMES}])
    (rec,) = load_records(path)
    plain = normalize_record({"conversations": [{k: v for k, v in t.items() if k != "weight"} for t in turns]})
    assert rec == plain and rec["system"] == "You are an AI assistant."
    tok = QWenTokenizer(str(SMALL_VOCAB))
    for train_on_prompt in (False, True):  # (the flag trains every prompt turn, whatever the prompts' 0)
        assert encode_conversation(tok, rec, train_on_prompt=train_on_prompt) == \
            encode_conversation(tok, plain, train_on_prompt=train_on_prompt)
    # an assistant turn's 0.0 is context, as OpenAI's 0 (and normalised as 0)
    turns[2]["weight"] = 0.0
    assert normalize_record({"conversations": turns})["messages"][1] == {"role": "assistant", "content": "4",
                                                                         "weight": 0}


@pytest.mark.parametrize("turn, weight, detail", [
    (1, 1.0, "turn 2 (user) has weight 1, but a prompt turn is not trained on its own: --train_on_prompt trains every "
             "prompt turn; give it weight 0 or none"),
    (0, 1, "turn 1 (system) has weight 1, but a prompt turn"),
    (2, True, "turn 3 (assistant) has weight True; it must be 0 (not trained) or 1 (trained)"),  # (a boolean: none)
    (1, 0.5, "turn 2 (user) has weight 0.5; it must be 0"),
    (1, "0", "turn 2 (user) has weight '0'; it must be 0"),
])
def test_a_weight_that_cannot_be_honoured_is_refused(turn, weight, detail):
    turns = [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    turns[turn]["weight"] = weight
    e = refused({"conversations": turns})
    assert e.reason == "invalid weight" and detail in str(e), str(e)


def test_weights_on_a_tool_conversations_prompts_are_read_as_on_others():
    """A ShareGPT tool conversation weighed as OpenHermes' are: the prompts' and the observation's 0.0 and the calls'
    1.0 are accepted; an assistant turn's 0.0 stays refused there (every assistant turn of one is trained)."""
    tools = json.dumps([{"name": "get_weather", "description": "Weather of a city.",
                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])
    turns = [{"from": "system", "value": "Be brief.", "weight": None},
             {"from": "human", "value": "Weather in Paris?", "weight": 0.0},
             {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}),
              "weight": 1.0},
             {"from": "observation", "value": "sunny", "weight": 0.0},
             {"from": "gpt", "value": "It is sunny.", "weight": 1.0}]
    rec = normalize_record({"tools": tools, "conversations": turns})
    assert rec == normalize_record({"tools": tools, "conversations": [{k: v for k, v in t.items() if k != "weight"}
                                                                      for t in turns]})
    turns[4]["weight"] = 0.0
    assert "not supported in tool / function-call conversations" in str(refused({"tools": tools,
                                                                                 "conversations": turns}))


# -- LLaMA-Factory's v1 data: content parts of {"type", "value"}, per-message loss_weight ------------------------

def v1(role, *parts, loss_weight=None):
    """A message as LLaMA-Factory v1's converters write it: parts given as (type, value)."""
    m = {"role": role, "content": [{"type": t, "value": v} for t, v in parts]}
    return m if loss_weight is None else {**m, "loss_weight": loss_weight}


def test_llama_factory_v1_messages_read_as_the_conversation_they_are(tmp_path):
    """v1's data (its data/v1_sft_demo.jsonl, its converters' output) writes each message's content as parts whose
    "value" is the text, and a loss_weight on every message (0.0 on prompts, 1.0 on the assistant's): refused as
    "only text content parts ({"type": "text", "text": ...})". A text part's value is its text (several parts joined
    as v1 joins them, with nothing between), an assistant's loss_weight 0.0 is context as "weight": 0, and messages
    without one (v1's multimodal demo writes none) are trained as v1 trains them."""
    demo = {"messages": [v1("user", ("text", "hi"), loss_weight=0.0),
                         v1("assistant", ("text", "Hello! I am "), ("text", "Qwen."), loss_weight=1.0)]}
    (rec,) = load_records(write_jsonl(tmp_path / "v1_sft.jsonl", [demo]))
    assert rec == exchange("hi", "Hello! I am Qwen.")
    tok = QWenTokenizer(str(SMALL_VOCAB))
    assert encode_conversation(tok, demo) == encode_conversation(tok, rec)
    turns = [v1("system", ("text", "Be brief.")), v1("user", ("text", "q1")), v1("assistant", ("text", "a1")),
             v1("user", ("text", "q2"), loss_weight=0.0), v1("assistant", ("text", "a2"))]
    turns[2]["loss_weight"] = 0.0
    assert normalize_record({"messages": turns}) == {
        "id": None, "system": "Be brief.", "messages": [
            {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "weight": 0},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}


def test_llama_factory_v1_tool_calls_read_as_its_sharegpt_form():
    """v1's ShareGPT converter writes a function_call turn as an assistant message of tool_call parts (JSON text of
    {"name", "arguments"}, which its renderer makes the message's tool_calls) and an observation as a tool message:
    the same conversation as the ShareGPT form it came from."""
    tools = json.dumps([{"name": "get_weather", "description": "Weather of a city.",
                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    sharegpt = {"tools": tools, "conversations": [
        {"from": "human", "value": "Weather in Paris?"}, {"from": "function_call", "value": call},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}]}
    converted = {"tools": tools, "messages": [
        v1("user", ("text", "Weather in Paris?"), loss_weight=0.0),
        v1("assistant", ("tool_call", call), loss_weight=1.0),
        v1("tool", ("text", "sunny"), loss_weight=0.0), v1("assistant", ("text", "It is sunny."), loss_weight=1.0)]}
    assert normalize_record(converted) == normalize_record(sharegpt)


@pytest.mark.parametrize("message, reason, detail", [
    (v1("user", ("image_url", "data/1.jpg"), ("text", "Who?")), "multimodal data",
     "turn 1, content part 1 is media (LLaMA-Factory v1's 'image_url' part); this model reads text only"),
    (v1("user", ("text", 3)), "invalid value", "turn 1, content part 1 is {'type': 'text', 'value': 3}; of "
     "LLaMA-Factory v1's parts, text parts ({\"type\": \"text\", \"value\": \"...\"}) and an assistant's tool_call "
     "parts"),
    (v1("user", ("tool_call", "{}")), "invalid value", "turn 1, content part 1 is {'type': 'tool_call'"),
    ({"role": "user", "content": [{"type": "text", "text": "a", "value": "b"}]}, "invalid value",
     "turn 1, content part 1 has both 'text' (OpenAI's part) and 'value' (LLaMA-Factory v1's); keep one"),
    (v1("user", ("text", "q"), loss_weight=0.5), "invalid weight", "turn 1 (user) has loss_weight 0.5; it must be 0"),
    (v1("user", ("text", "q"), loss_weight=1.0), "invalid weight", "turn 1 (user) has loss_weight 1, but a prompt "
     "turn is not trained on its own: --train_on_prompt trains every prompt turn; give it loss_weight 0 or none"),
    ({**v1("user", ("text", "q")), "weight": 0, "loss_weight": 1}, "both 'weight' and 'loss_weight'", "turn 1 has"),
])
def test_llama_factory_v1_parts_and_weights_it_cannot_honour_are_refused(message, reason, detail):
    e = refused({"messages": [message, v1("assistant", ("text", "a"))]})
    assert e.reason == reason and detail in str(e), str(e)
    e = refused({"messages": [v1("user", ("text", "q")), v1("assistant", ("reasoning", "hm"), ("text", "a"))]})
    assert "turn 2, content part 1 is a reasoning part" in str(e), str(e)
    call = v1("assistant", ("tool_call", "get_weather(city='Paris')"))
    assert "turn 2, content part 1: a tool_call part's value is not JSON" in str(
        refused({"messages": [v1("user", ("text", "q")), call]}))


def test_the_server_keeps_refusing_v1_parts():
    """OpenAI's API has no {"type": "text", "value": ...} part: a request holding one stays a 400, as before."""
    from finetune import react

    with pytest.raises(react.ReactError, match="only text content parts") as e:
        react.build_turns([v1("user", ("text", "q"))], [])
    assert e.value.field == "messages[0].content[0]"


# -- other layouts of one exchange, and `conversation` --------------------------------------------------------------

DOLLY_CONTEXT = "Virgin Australia commenced services on 31 August 2000 as Virgin Blue."


@pytest.mark.parametrize("record, expected", [
    # databricks-dolly-15k: the context follows the instruction, as Alpaca's input does
    ({"instruction": "When did Virgin Australia start operating?", "context": DOLLY_CONTEXT,
      "response": "On 31 August 2000.", "category": "closed_qa"},
     exchange("When did Virgin Australia start operating?\n" + DOLLY_CONTEXT, "On 31 August 2000.")),
    ({"instruction": "Which is a species of fish? Tope or Rope", "context": "", "response": "Tope",
      "category": "classification"}, exchange("Which is a species of fish? Tope or Rope", "Tope")),
    # Open-Orca: system_prompt is the system prompt ("" the default one, as an empty 'system' column)
    ({"id": "flan.564327", "system_prompt": "You are an AI assistant.", "question": "Capital of France?",
      "response": "Paris."}, exchange("Capital of France?", "Paris.", "You are an AI assistant.", "flan.564327")),
    ({"id": "niv.242684", "system_prompt": "", "question": "Translate: hi", "response": "salut"},
     exchange("Translate: hi", "salut", rid="niv.242684")),
    # firefly-train-1.1M
    ({"instruction": "Say hi.", "input": "", "output": "hi", "context": "", "response": ""},  # (a merged export)
     exchange("Say hi.", "hi")),
    ({"kind": "ClassicalChinese", "input": "翻译成现代文：石中央又生一树", "target": "在石头中央又长出一棵树"},
     exchange("翻译成现代文：石中央又生一树", "在石头中央又长出一棵树")),
])
def test_column_layouts_of_public_datasets_read_as_alpaca(record, expected):
    """Dolly's, Open-Orca's and firefly-train-1.1M's columns were refused ("'output' is missing or empty", "the record
    has neither 'conversations' nor 'messages'"); each maps to one exchange as its training code and LLaMA-Factory's
    registry map it, by the Alpaca rule."""
    assert normalize_record(record) == expected


@pytest.mark.parametrize("record, reason, detail", [
    ({"instruction": "q", "context": "c", "response": ""}, "invalid Dolly record", "'response' is missing or empty"),
    ({"question": "q", "response": 3}, "invalid Open-Orca record", "'response' must be a string, got a number"),
    ({"instruction": "q", "output": "a", "response": "b"}, "invalid alpaca record",
     "it has 'instruction', 'output', 'response': the columns of more than one layout"),
    ({"instruction": "q", "input": "i", "context": "c", "response": "a"}, "invalid Dolly record",
     "it has 'instruction', 'input', 'context', 'response'"),
    ({"question": "q", "response": "a", "system": "s", "system_prompt": "t"}, "both 'system' and 'system_prompt'",
     "the record has 'system' 's' and 'system_prompt' 't'; keep one"),
    ({"question": "q", "response": "a", "messages": [{"role": "user", "content": "q"}]},
     "both 'messages' and Open-Orca fields", "the record has 'messages' and 'question', 'response', which do not "
                                             "repeat its first exchange; keep one form"),
])
def test_column_layouts_name_their_own_columns_in_errors(record, reason, detail):
    e = refused(record)
    assert e.reason == reason and detail in str(e), str(e)


def test_turns_under_conversation_lmsys_and_firefly(tmp_path):
    """lmsys-chat-1m's turns (role / content, beside its own columns) and Firefly's {"human", "assistant"} pairs are
    under `conversation`: "the record has neither 'conversations' nor 'messages'"."""
    lmsys = {"conversation_id": "33f01939a744455c869cb234afca47f1", "model": "wizardlm-13b",
             "conversation": [{"content": "How can identity protection help?", "role": "user"},
                              {"content": "It monitors your accounts.", "role": "assistant"}],
             "turn": 1, "language": "English", "redacted": False,
             "openai_moderation": [{"categories": {"harassment": False}, "category_scores": {"harassment": 0.001},
                                    "flagged": False}] * 2}
    firefly = {"conversation_id": 1, "category": "Brainstorming", "dataset": "moss",
               "conversation": [{"human": "如何保障安全？", "assistant": "遵守规定。"},
                                {"human": "还有吗？", "assistant": "定期检查。"}]}
    recs = load_records(write_jsonl(tmp_path / "d.jsonl", [lmsys, firefly]))
    assert recs[0] == exchange("How can identity protection help?", "It monitors your accounts.")
    assert recs[1]["messages"] == [
        {"role": "user", "content": "如何保障安全？"}, {"role": "assistant", "content": "遵守规定。"},
        {"role": "user", "content": "还有吗？"}, {"role": "assistant", "content": "定期检查。"}]
    for record, detail in (
            ({**firefly, "messages": lmsys["conversation"]}, "both 'conversation' and 'messages': the record has both"),
            ({"conversation": [{"human": "q"}]}, "invalid conversation: 'conversation' item 1 must be a {\"human\": "
                                                 "..., \"assistant\": ...} pair of strings (Firefly's form)"),
            ({"conversation": "Human: hi"}, "no conversations: 'conversation' must be a non-empty list")):
        assert detail in str(refused(record)), str(refused(record))


@pytest.mark.parametrize("role", ["chatgpt", "model", "ChatGPT"])
def test_assistant_roles_of_real_dumps(role):
    """ShareGPT's Vicuna dumps name some ChatGPT replies "chatgpt", Gemini's data names the assistant "model": both
    were "unknown role"."""
    assert normalize_record({"conversations": [{"from": "human", "value": "q"}, {"from": role, "value": "a"}]}) == \
        exchange("q", "a")


# -- TRL's prompt-completion data -----------------------------------------------------------------------------------

def trained_text(tok, record):
    out = encode_conversation(tok, record)
    return tok.decode([t for t, label in zip(out["input_ids"], out["labels"]) if label != -100])


def test_trl_standard_prompt_completion_is_one_exchange(tmp_path):
    """TRL's standard prompt-completion records (two strings) were refused ("a prompt and its reply? Rename 'prompt'
    to 'instruction' ..."). The prompt is the user turn and the completion the reply, in a Qwen chat (TRL joins them
    as raw text); the record's other fields carry over as in the Alpaca form."""
    record = {"id": 3, "system": "Be brief.", "prompt": "The sky is", "completion": " blue."}
    (rec,) = load_records(write_jsonl(tmp_path / "trl.jsonl", [record]))
    assert rec == exchange("The sky is", " blue.", "Be brief.", "3")
    assert normalize_record(rec) == rec
    assert trained_text(QWenTokenizer(str(SMALL_VOCAB)), record) == " blue.<|im_end|>"


SKY = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color is the sky?"},
       {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And at night?"}]
NIGHT = [{"role": "assistant", "content": "Black."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
CALL = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
    "name": "get_weather", "arguments": "{}"}}]}


def test_trl_conversational_prompt_completion_trains_the_completion_alone():
    """TRL's conversational form: the prompt's messages, then the completion's. TRL trains the completion alone, so an
    assistant turn of the prompt (an earlier exchange of the chat) is context, as OpenAI's weight 0 is; the same
    turns as `messages` train both replies."""
    record = {"prompt": SKY, "completion": NIGHT}
    rec = normalize_record(record)
    assert rec == {"id": None, "system": "Be brief.", "messages": [
        {"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "Blue.", "weight": 0},
        {"role": "user", "content": "And at night?"}, {"role": "assistant", "content": "Black."}]}
    tok = QWenTokenizer(str(SMALL_VOCAB))
    as_messages = encode_conversation(tok, {"messages": SKY + NIGHT})
    assert encode_conversation(tok, record)["input_ids"] == as_messages["input_ids"]
    assert trained_text(tok, record) == "Black.<|im_end|>"
    assert trained_text(tok, {"messages": SKY + NIGHT}) == "Blue.<|im_end|>Black.<|im_end|>"
    # a `messages` column that repeats the turns is left unread: the prompt's reply stays untrained
    assert normalize_record({**record, "messages": SKY + NIGHT}) == rec
    # a completion of tool calls and results reads as the same turns under `messages` do (the ReAct layout)
    tool_turns = [SKY[1], CALL, {"role": "tool", "content": "sunny"}, NIGHT[0]]
    assert normalize_record({"tools": TOOLS, "prompt": tool_turns[:1], "completion": tool_turns[1:]}) == \
        normalize_record({"tools": TOOLS, "messages": tool_turns})
    # preference data in TRL's form (a prompt, chosen and rejected) stays refused as such
    for pair in ({"prompt": SKY, "chosen": NIGHT, "rejected": [{"role": "assistant", "content": "Red."}]},
                 {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}):
        for extra in ({}, {"completion": pair["chosen"]}):
            assert refused({**pair, **extra}).reason == "preference data"


PC = "invalid prompt-completion record: "


@pytest.mark.parametrize("record, said", [
    ({"prompt": "q", "completion": NIGHT}, PC + "'prompt' is a string and 'completion' an array: give both as "
     "strings (TRL's standard form) or both as arrays of messages (its conversational form)"),
    ({"prompt": SKY, "completion": "Black."}, PC + "'prompt' is an array and 'completion' a string: give both as"),
    ({"prompt": "", "completion": "a"}, PC + "'prompt' is missing or empty"),
    ({"completion": "a"}, PC + "'prompt' is missing or empty"),
    ({"prompt": SKY, "completion": []}, PC + "'completion' is missing or empty"),
    ({"prompt": "q", "completion": " \n"}, PC + "'completion' is blank"),
    ({"prompt": 3, "completion": "a"}, PC + "'prompt' must be a string or an array of messages, got a number"),
    ({"prompt": SKY, "completion": [{"role": "tool", "content": "sunny"}]},
     PC + "'completion' holds no assistant turn: it is the reply to train"),
    ({"prompt": SKY, "completion": NIGHT + [{"role": "user", "content": "Thanks."}]}, PC + "'completion' item 2 is "
     "a user turn: TRL trains all of the completion, but a user turn is never trained here; put it in 'prompt'"),
    ({"prompt": ["What color is the sky?"], "completion": NIGHT},
     PC + "'prompt' item 1 is a string, not a message (an object with 'role' and 'content')"),
    ({"prompt": SKY[:2] + [{**SKY[2], "weight": 1}, SKY[3]], "completion": NIGHT}, PC + "'prompt' item 3 has weight "
     "1, but the prompt is not trained (TRL's completion_only_loss): move the turn to 'completion'"),
    ({"prompt": "q", "completion": "a", "instruction": "q", "output": "a"}, PC + "it has 'prompt' / 'completion' and "
     "'instruction', 'output': the fields of more than one layout; keep one (the other would be ignored)"),
    ({"prompt": "q", "completion": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                                         "content": "b"}]},
     "both 'prompt' / 'completion' and 'messages': the record has 'messages' and 'prompt' / 'completion', which do "
     "not hold the same turns; keep one form (the other would be ignored)"),
    ({"tools": TOOLS, "prompt": [SKY[1], CALL, {"role": "tool", "content": "sunny"}], "completion": NIGHT},
     PC + "'prompt' item 2 is the assistant's, in a tool / function-call conversation, where every assistant turn is "
     "trained (TRL trains the completion alone): give the turns as 'messages' to train them all, or leave the record "
     "out (--skip_invalid)"),
])
def test_trl_prompt_completion_records_that_cannot_train_as_meant_are_refused(record, said):
    assert str(refused(record)).startswith(said), str(refused(record))


# -- data made for other training, and other chatbots' turns: refused, saying what they are ----------------------

LF_DPO = {"conversations": [{"from": "human", "value": "Hi! Help me name a game."}],
          "chosen": {"from": "gpt", "value": "Sure: Angela's Quest."}, "rejected": {"from": "gpt", "value": "No."}}
PREFERENCE = "make the chosen reply the last assistant turn (the Alpaca form's 'output') and drop the rejected one"


@pytest.mark.parametrize("record", [
    LF_DPO,  # LLaMA-Factory's ShareGPT DPO demo: a one-turn prompt was "no assistant turn"
    {**LF_DPO, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                 {"from": "human", "value": "Name a game."}]},  # (was trained, chosen left out)
    {"instruction": "Name a game.", "input": "", "chosen": "Angela's Quest.", "rejected": "No."},  # Alpaca DPO
    {"system": "", "question": "Name a game.", "chosen": "Angela's Quest.", "rejected": "No."},  # orca_dpo_pairs
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},  # hh-rlhf
])
def test_preference_data_is_refused_saying_so(record):
    e = refused(record)
    assert e.reason == "preference data" and "'chosen' and 'rejected' replies (DPO / reward-model data)" in str(e)
    assert PREFERENCE in str(e)


def test_preference_data_with_its_own_conversation_trains_on_it():
    """ultrafeedback_binarized's rows hold the chosen conversation as `messages` too (its SFT column): that is a
    conversation ending with the reply, read as one; LLaMA-Factory's v1 pairs name the preference columns otherwise."""
    chosen = [{"content": "hi", "role": "user"}, {"content": "hello", "role": "assistant"}]
    rec = {"prompt": "hi", "prompt_id": "8a", "chosen": chosen, "messages": chosen, "score_chosen": 8.0,
           "rejected": [{"content": "hi", "role": "user"}, {"content": "go away", "role": "assistant"}],
           "score_rejected": 2.0}
    assert normalize_record(rec) == exchange("hi", "hello")
    e = refused({"chosen_messages": chosen, "rejected_messages": chosen})
    assert e.reason == "preference data" and "'chosen_messages' and 'rejected_messages'" in str(e)


@pytest.mark.parametrize("label", [True, False])
def test_kto_data_is_refused(label):
    """LLaMA-Factory's KTO demo (`messages` and a true / false `label`) trained every reply, those labelled false (not
    to be learnt) too."""
    record = {"messages": [{"content": "Summarise.", "role": "user"},
                           {"content": "Ooh ooh ah ah!", "role": "assistant"}], "label": label}
    e = refused(record)
    assert str(e) == (f"KTO data: the record has 'label' {str(label).lower()}, marking its reply desirable or not for "
                      "KTO; training here learns every reply it is given: keep the records labelled true, without "
                      "'label'")
    assert e.reason == "KTO data" and refused({"prompt": "q", "completion": "a", "label": label}).reason == "KTO data"
    assert normalize_record({**record, "label": "summarization"})["messages"][1]["content"] == "Ooh ooh ah ah!"


@pytest.mark.parametrize("media", [{"images": ["mllm_demo_data/1.jpg"]}, {"videos": ["mllm_demo_data/1.mp4"]},
                                   {"audios": ["mllm_demo_data/1.mp3"]}, {"image": "coco/train2017/000000033471.jpg"}])
def test_multimodal_records_are_refused(media):
    """LLaMA-Factory's mllm demos and LLaVA's records were trained as text, "<image>" included, the media unseen."""
    turns = [{"from": "human", "value": "<image>\nWhat colour is the bus?"}, {"from": "gpt", "value": "Red."}]
    e = refused({"id": "000000033471", "conversations": turns, **media})
    key = next(iter(media))
    assert str(e) == (f"multimodal data: the record has '{key}', media its text refers to (<image>-style tags); this "
                      "model reads text only, and the tags would be trained as text: leave such records out "
                      "(--skip_invalid), or drop the media and their tags")
    # an empty or null media column (a `datasets` dir that mixes text and image rows has it on every row) is none
    assert normalize_record({"conversations": turns, key: [] if key.endswith("s") else None})["messages"][1] == \
        {"role": "assistant", "content": "Red."}


@pytest.mark.parametrize("role, bot", [("bing", "Bing Chat"), ("bard", "Bard")])
def test_other_chatbots_turns_are_refused_naming_the_turn(role, bot):
    e = refused({"conversations": [{"from": "human", "value": "q"}, {"from": role, "value": "a [^1^]"}]})
    assert str(e) == (f"unknown role: turn 2 has role '{role}' ({bot}'s reply, in a ShareGPT dump): to train on it as "
                      "the assistant's, make its role 'gpt'; else leave the record out (--skip_invalid)")


def test_sharegpt_markdown_beside_differing_html_is_refused():
    """A processed ShareGPT dump keeps each reply as the page's HTML in `value` and as `markdown`: the HTML was
    trained without a word."""
    html = {"from": "gpt", "value": "<div><p>Hello <b>there</b></p></div>", "markdown": "Hello **there**",
            "opencc_converted_markdown": None}
    e = refused({"conversations": [{"from": "human", "value": "Hi", "markdown": None}, html], "lang": "en"})
    assert str(e) == ("both 'value' and 'markdown': turn 2 has 'value' '<div><p>Hello <b>there</b></p></div>' and "
                      "'markdown' 'Hello **there**' (a ShareGPT dump: HTML and its Markdown); keep the text to train "
                      "on as 'value' and drop 'markdown'")
    same = {**html, "value": "Hello **there**"}
    assert normalize_record({"conversations": [{"from": "human", "value": "Hi"}, same]}) == \
        exchange("Hi", "Hello **there**")


def test_plain_text_records_and_unknown_prompt_reply_columns_say_what_to_do():
    e = refused({"text": "Anarchism is a political philosophy ...", "url": "https://example.com"})  # c4, wiki dumps
    assert e.reason == "plain text" and "(pretraining data, or a chat already rendered into text)" in str(e)
    assert str(refused({"prompt": "q", "answer": "a"})).endswith(
        "its keys: 'prompt', 'answer'; a prompt and its reply? Rename 'prompt' to 'instruction' and 'answer' "
        "to 'output' (the Alpaca form)")


@pytest.mark.parametrize("name, text, said", [
    ("wiki_demo.txt", "Anarchism is a political philosophy.\nIt rejects hierarchy.\n",
     "not a JSON / JSONL file: its text does not start as JSON (the first line starts 'Anarchism is a political "
     "philosophy.'): plain text, as pretraining data is? Data files hold chat records"),
    ("dataset_info.json", json.dumps({"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}, indent=2),
     "not a data file: dataset_info.json describes data, it holds none: LLaMA-Factory's registry of its data files "
     "(name those files) or a `datasets` save_to_disk dir's (name the dir)"),
])
def test_files_that_hold_no_records_are_refused_as_files(tmp_path, name, text, said):
    """A plain-text file failed on each line ("invalid JSON: Expecting value at line 1 column 1"), LLaMA-Factory's
    dataset_info.json on its '{' line as a pretty-printed record."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as e:
        load_records(path)
    assert str(e.value).startswith(f"{path}: {said}"), str(e.value)


def test_a_csv_file_is_refused_with_a_command_that_makes_jsonl_of_it(tmp_path):
    path = tmp_path / "alpaca.csv"
    path.write_text('instruction,input,output\nTranslate to English.,Bonjour,Hello\n"Say hi, please.",,hi\n')
    with pytest.raises(DataError) as e:
        load_records(path)
    assert str(e.value).startswith(f"{path}: not a JSON / JSONL file: the file is CSV; convert it to JSONL: python -c")
    code = str(e.value).split('python -c "', 1)[1].split('" (', 1)[0].replace("FILE", str(path))
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert [r["messages"][0]["content"] for r in load_records(f"{path}.jsonl")] == ["Translate to English.\nBonjour",
                                                                                    "Say hi, please."]


def test_columns_and_turns_that_repeat_each_other_read_as_the_turns():
    """Magpie's records carry their first exchange twice, as `instruction` / `response` and in `conversations`, and
    Magpie-Pro-300K-Filtered-H4 its turns as `conversations` and as `messages`: both were refused ("keep one form"),
    though reading the turns leaves nothing out. Copies that differ stay refused."""
    conv = [{"from": "human", "value": "Write a poem."}, {"from": "gpt", "value": "Roses are red."},
            {"from": "human", "value": "Another."}, {"from": "gpt", "value": "Violets are blue."}]
    magpie = {"uuid": "u1", "model": "meta-llama/Meta-Llama-3-70B-Instruct", "gen_input_configs": {"temperature": 1.0},
              "instruction": "Write a poem.", "response": "Roses are red.", "conversations": conv,
              "instruction_2": "Another.", "response_2": "Violets are blue.", "task_category": "Creative writing"}
    expected = normalize_record({"conversations": conv})
    assert normalize_record(magpie) == expected
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in conv]
    assert normalize_record({"uuid": "u1", "conversations": conv, "messages": messages}) == expected
    e = refused({**magpie, "response": "Tulips."})
    assert str(e) == ("both 'conversations' and Dolly fields: the record has 'conversations' and 'instruction', "
                      "'response', which do not repeat its first exchange; keep one form (the other would be ignored)")
    e = refused({"conversations": conv, "messages": messages[:2]})
    assert e.reason == "both 'conversations' and 'messages'"
