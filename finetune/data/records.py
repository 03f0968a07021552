"""Chat records: read JSON / JSONL / Parquet files and `datasets` dirs, validate every record, normalise to one form.

The normalised form, which everything after this module works on:

    {"id": str | None, "system": str, "messages": [{"role": "user" | "assistant", "content": str}, ...]}
    (+ "react": True for a tool / function-call conversation: its turns are in Qwen's ReAct layout)

`messages` alternate user/assistant, start with a user turn and contain at least one trained assistant turn;
the system prompt lives only in `system` (the default one when the record has none). An assistant message may
carry `"weight": 0` (OpenAI's fine-tuning format: context, not trained) and, in tool conversations,
`segments` (a tool conversation's, or a plain record's own). Normalising a normalised record returns an equal
record, so downstream code can accept raw and normalised records alike.

Accepted forms: `conversations` (Qwen's and ShareGPT's from/value turns), `messages` (OpenAI's role/content,
content as a string or a list of text parts; LLaMA-Factory v1's {"type", "value"} parts and `loss_weight`),
`conversation` (lmsys-chat-1m's role/content turns, Firefly's {"human", "assistant"} pairs), TRL's prompt-completion
records (two strings, or two lists of messages whose prompt's assistant turns are context), tool / function-call
conversations (react.py), and the Alpaca form LLaMA-Factory uses (`instruction`, optional `input`, `output`,
optional `system` and `history` of [query, reply] pairs, optional `tools`: the user turn is the instruction, a
newline and the input when there is one), with the column layouts of other public datasets read by the same rule
(Dolly's, Open-Orca's, firefly-train-1.1M's: `_COLUMNS`). Records of data made for other training (preference
pairs, KTO labels, images) are refused saying what they are.

Reading streams: JSONL line by line, a JSON array element by element (`raw_decode` over the text, so the
whole corpus never exists as one big Python list), a Parquet file (the hub's data files) in batches of rows, one
record a row, its null fields absent (`_without_nulls`), so each record is validated as it is read and an
error can name its record and line (a Parquet record has none). Messages count records, turns and lines from 1
("record 3" is the third record, or row, of the file); `DataError.index` is the 0-based position.

Files must be UTF-8 (a UTF-8 BOM is allowed): UTF-16/32 files are refused naming the encoding found, and
invalid UTF-8 bytes, JSON nested too deeply, integers too long to convert, duplicated keys and lone
surrogates (a broken "\\ud800" escape) are errors of the record that holds them, never silent repairs.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .. import react  # tool / function-call conversations: the ReAct layout the server uses
from ..errors import json_reason, lone_surrogate, quoted
from ..tokenization import DEFAULT_SYSTEM  # one definition, shared with chat()

# Accepted role names -> the normalised role. ShareGPT writes human/gpt (its Vicuna dumps also "chatgpt" for the
# same replies); the others are Qwen's / OpenAI's (OpenAI's newer clients send the system message as "developer") and
# Gemini's / Gemma's "model" for the assistant.
ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
    "developer": "system",
}
# Roles of ShareGPT dumps whose turns are another chatbot's replies: an assistant's, but not ones to learn without a
# word (Bing's cite web searches this model does not make): refused, saying how to keep them
OTHER_BOTS = {"bing": "Bing Chat", "bard": "Bard"}
JSONL_SUFFIXES = (".jsonl", ".ndjson")
QUOTED = 40  # the most characters of a record's value that an error message quotes


class DataError(ValueError):
    """An unreadable data file or an invalid record.

    `reason` is a short category (used to count skips), `detail` the specific cause; `str(err)` names the
    file (after the command-line flag that gave it, when `flag` is set: "--data d.json: no such file"), the
    record, the line (when known) and the cause. `index` is the record's 0-based position; the message counts
    from 1, like lines ("record 3, line 3" is the third record, on the third line).
    """

    def __init__(self, reason: str, detail: str = "", *, path: str | None = None,
                 index: int | None = None, line: int | None = None, flag: str | None = None):
        self.reason, self.detail, self.path, self.index, self.line = reason, detail, path, index, line
        self.flag = flag
        super().__init__(self._message())

    def __reduce__(self):  # keep the fields across processes (datasets workers)
        return (_rebuild_error, (self.reason, self.detail, self.path, self.index, self.line, self.flag))

    def to_json(self) -> str:
        return json.dumps({"reason": self.reason, "detail": self.detail, "path": self.path,
                           "index": self.index, "line": self.line, "flag": self.flag}, ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str) -> "DataError":
        return _rebuild_error(**json.loads(s))

    def _message(self) -> str:
        where = record_place_text(self.path, self.index, self.line, self.flag)
        cause = self.reason + (f": {self.detail}" if self.detail else "")
        return (where + ": " if where else "") + cause

    def located(self, path: str | None, index: int | None, line: int | None) -> "DataError":
        """The same error with its place in a file filled in."""
        return DataError(self.reason, self.detail, path=path, index=index, line=line, flag=self.flag)

    def given_by(self, flag: str | None) -> "DataError":
        """The same error naming the command-line flag that gave its file (unchanged without one)."""
        if not flag or self.flag:
            return self
        return type(self)(self.reason, self.detail, path=self.path, index=self.index, line=self.line, flag=flag)


def record_place_text(path, index: int | None, line: int | None, flag: str | None = None) -> str:
    """A record's place as the data errors name it ("--data d.jsonl, record 3, line 3"; "" when nothing is known);
    ``index`` 0-based, said from 1."""
    where = []
    if path is not None:
        where.append(f"{flag} {path}" if flag else str(path))
    if index is not None:
        where.append(f"record {index + 1}")
    if line is not None:
        where.append(f"line {line}")
    return ", ".join(where)


def _rebuild_error(reason, detail, path, index, line, flag=None):
    return DataError(reason, detail, path=path, index=index, line=line, flag=flag)


# -- checks on decoded values -----------------------------------------------------------------------------

def _check_text(text: str, what: str) -> None:
    """Refuse a lone surrogate (``errors.lone_surrogate``)."""
    if (why := lone_surrogate(text)) is not None:
        raise DataError("lone surrogate", f"{what} {why}")


def _one_of(obj: dict, k1: str, k2: str, what: str, same=lambda a, b: a == b):
    """The value of whichever of two synonymous keys is set (None counts as unset); both set and different is
    an error, so neither side is dropped silently."""
    a, b = obj.get(k1), obj.get(k2)
    if a is None:
        return b
    if b is not None and not same(a, b):
        raise DataError(f"both '{k1}' and '{k2}'",
                        f"{what} has '{k1}' {quoted(a, QUOTED)} and '{k2}' {quoted(b, QUOTED)}; keep one")
    return a


def _role_name(role):
    """A raw turn's role as normalised where ROLES knows it (any case), else as given."""
    return ROLES.get(role.lower(), role) if isinstance(role, str) else role


def _raw_role(turn: dict):
    """A raw turn's role, unchecked: 'from', else 'role' (as _one_of reads them, without its agreement check)."""
    return turn.get("from") if turn.get("from") is not None else turn.get("role")


def _same_role(a, b) -> bool:
    return _role_name(a) == _role_name(b)


def _said(turns) -> list | None:
    """What raw turns say, to compare two copies of one conversation: per turn (role as normalised, text, its other
    keys); None for what is not a list of turn objects."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return None
    out = []
    for t in turns:
        text = t.get("value") if t.get("value") is not None else t.get("content")
        out.append((_role_name(_raw_role(t)), text,
                    {k: v for k, v in t.items() if k not in ("from", "role", "value", "content")}))
    return out


# -- one record ---------------------------------------------------------------------------------------


def _turn_fields(turn: Any, n: int) -> tuple[str, Any]:
    if not isinstance(turn, dict):
        raise DataError("invalid turn", f"turn {n} is {react.json_type(turn)}, not an object")
    role = _one_of(turn, "from", "role", f"turn {n}", _same_role)
    if role is None:
        raise DataError("invalid turn", f"turn {n} has no 'from' (or 'role') field")
    content = _one_of(turn, "value", "content", f"turn {n}")
    if content is None and "value" not in turn and "content" not in turn:
        raise DataError("invalid turn", f"turn {n} has no 'value' (or 'content') field")
    return role, content


_ALPACA = ("instruction", "input", "output", "history")


@dataclass(frozen=True)
class _Columns:
    """A single-turn column layout of public instruction data: the user turn is `prompt`, then a newline and
    `extra` when it is there (Alpaca's rule, which LLaMA-Factory applies to each of these); the reply is `reply`."""

    name: str  # as messages name it ("invalid Dolly record")
    prompt: str
    extra: str | None
    reply: str
    system: str = "system"
    history: bool = False  # Alpaca's [query, reply] pairs before the prompt


# Each mapped as the dataset's own training code and LLaMA-Factory's registry of it map it.
_COLUMNS = (
    _Columns("alpaca", "instruction", "input", "output", history=True),  # LLaMA-Factory's Alpaca form, BELLE's files
    _Columns("Dolly", "instruction", "context", "response"),  # databricks-dolly-15k (+ category)
    _Columns("Open-Orca", "question", None, "response", system="system_prompt"),  # OpenOrca (+ id)
    _Columns("Firefly", "input", None, "target"),  # firefly-train-1.1M (+ kind)
)
_COLUMN_KEYS = ("instruction", "input", "output", "history", "context", "question", "response", "target")
_COLUMN_KEY_SET = frozenset(_COLUMN_KEYS)


def _columns_of(record: dict) -> tuple[_Columns | None, list[str]]:
    """The column layout a record is in (None: none) and the column keys it sets. The reply's key tells the layout
    (Dolly's and Open-Orca's 'response' by the prompt beside it); without one, a record with Alpaca's keys is an
    Alpaca record that lacks its 'output'."""
    keys = [k for k in _COLUMN_KEYS if record.get(k) is not None]
    if not keys:
        return None, keys
    if "output" in keys:
        return _COLUMNS[0], keys
    if "response" in keys and "question" in keys:
        return _COLUMNS[2], keys
    if "response" in keys and "instruction" in keys:
        return _COLUMNS[1], keys
    if "target" in keys and "input" in keys:
        return _COLUMNS[3], keys
    if any(k in keys for k in _ALPACA):
        return _COLUMNS[0], keys
    return None, keys


def _from_columns(record: dict, form: _Columns, keys: list[str]) -> dict:
    """A record in a column layout -> the `conversations` form, fields checked by name."""
    invalid = f"invalid {form.name} record"
    own = {form.prompt, form.extra, form.reply} | ({"history"} if form.history else set())
    if any(k not in own and record[k] != "" for k in keys):  # (an empty column of a merged export is none)
        given = [k for k in keys if record[k] != ""]
        raise DataError(invalid, f"it has {', '.join(repr(k) for k in given)}: the columns of more than one layout "
                        "(prompt and reply columns); keep one (the other would be ignored)")

    def text(key, required):
        v = record.get(key)
        if v is None or v == "":
            if required:
                raise DataError(invalid, f"'{key}' is missing or empty")
            return ""
        if not isinstance(v, str):
            raise DataError(invalid, f"'{key}' must be a string, got {react.json_type(v)}")
        if required and not v.strip():
            raise DataError(invalid, f"'{key}' is blank")
        return v

    prompt, reply = text(form.prompt, True), text(form.reply, True)
    extra = text(form.extra, False) if form.extra else ""
    turns = []
    history = record.get("history") if form.history else None
    if history is not None:
        if not isinstance(history, list):
            raise DataError(invalid, f"'history' must be a list of [query, reply] pairs, got "
                            f"{react.json_type(history)}")
        for i, pair in enumerate(history, 1):
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                    or not all(isinstance(x, str) and x.strip() for x in pair)):
                raise DataError(invalid, f"'history' item {i} must be a [query, reply] pair of "
                                f"non-empty strings, got {quoted(pair, QUOTED)}")
            turns += [{"from": "user", "value": pair[0]}, {"from": "assistant", "value": pair[1]}]
    turns += [{"from": "user", "value": prompt + ("\n" + extra if extra else "")},
              {"from": "assistant", "value": reply}]
    out = {"conversations": turns}
    # LLaMA-Factory's Alpaca columns include `tools`: the record is then rendered in the ReAct layout
    for key in ("id", "system", "tools", "functions", "react"):
        if record.get(key) is not None:
            out[key] = record[key]
    if form.system != "system":  # Open-Orca's system_prompt ("" as an empty 'system': the default prompt)
        system = _one_of(record, "system", form.system, "the record")
        if system is not None:
            out["system"] = system
    return out


def _columns_repeat_turns(record: dict, form: _Columns, keys: list[str], turns) -> bool:
    """Whether a record's columns repeat the exchange its turns open with (Magpie's `instruction` / `response`
    beside its `conversations`): then the turns say all, and the columns may be left unread."""
    if form.system != "system" and record.get(form.system) not in (None, ""):
        return False
    try:
        columns = [(role, text) for role, text, _ in _said(_from_columns(record, form, keys)["conversations"])]
    except DataError:
        return False
    said = _said(turns)
    if said and said[0][0] == "system":
        said = said[1:]
    return said is not None and [(role, text) for role, text, _ in said[:len(columns)]] == columns


def _from_conversation(record: dict) -> dict:
    """A record whose turns are in `conversation` (lmsys-chat-1m's role/content turns, Firefly's list of
    {"human", "assistant"} pairs) -> the `conversations` form."""
    if chat := [k for k in ("conversations", "messages") if record.get(k) is not None]:
        raise DataError(f"both 'conversation' and '{chat[0]}'", "the record has both; keep one (the other would be "
                        "ignored)")
    turns = record["conversation"]
    if not isinstance(turns, list) or not turns:
        raise DataError("no conversations", f"'conversation' must be a non-empty list, got {quoted(turns, QUOTED)}")
    pairs = [t for t in turns if isinstance(t, dict) and ("human" in t or "assistant" in t)
             and not any(k in t for k in ("from", "role", "value", "content"))]
    if pairs:  # Firefly's form: each item one exchange
        out = []
        for i, pair in enumerate(turns, 1):
            if (not isinstance(pair, dict) or set(pair) != {"human", "assistant"}
                    or not all(isinstance(pair[k], str) for k in pair)):
                raise DataError("invalid conversation", f"'conversation' item {i} must be a {{\"human\": ..., "
                                f"\"assistant\": ...}} pair of strings (Firefly's form), got {quoted(pair, QUOTED)}")
            out += [{"from": "user", "value": pair["human"]}, {"from": "assistant", "value": pair["assistant"]}]
        turns = out
    return {**{k: v for k, v in record.items() if k != "conversation"}, "conversations": turns}


_PROMPT_COMPLETION = ("prompt", "completion")


def _from_prompt_completion(record: dict, turns_key: str | None) -> dict:
    """TRL's prompt-completion record -> the `messages` form; its other keys (id, system, tools, ...) kept.

    The standard form's two strings become a user turn and the assistant's reply: TRL trains the completion as raw
    text after the prompt's, a chat fine-tune as the reply of a Qwen chat, which is the point of one. The
    conversational form's two lists of role / content messages are its turns in order, the prompt's assistant turns
    as context (weight 0): TRL trains the completion alone. Turns are counted over the prompt, then the completion, in
    the errors of the turns' own reading."""
    invalid = "invalid prompt-completion record"
    for key in _PROMPT_COMPLETION:
        v = record.get(key)
        if v is None or v == "" or v == []:
            raise DataError(invalid, f"'{key}' is missing or empty")
        if not isinstance(v, (str, list)):
            raise DataError(invalid, f"'{key}' must be a string or an array of messages, got {react.json_type(v)}")
        if isinstance(v, str) and not v.strip():
            raise DataError(invalid, f"'{key}' is blank")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) != isinstance(completion, str):
        raise DataError(invalid, f"'prompt' is {react.json_type(prompt)} and 'completion' {react.json_type(completion)}"
                        ": give both as strings (TRL's standard form) or both as arrays of messages (its "
                        "conversational form)")
    if columns := [k for k in _COLUMN_KEYS if record.get(k) not in (None, "")]:
        raise DataError(invalid, f"it has 'prompt' / 'completion' and {', '.join(repr(k) for k in columns)}: the "
                        "fields of more than one layout; keep one (the other would be ignored)")
    if isinstance(prompt, str):
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    else:
        for key, items in (("prompt", prompt), ("completion", completion)):
            for i, item in enumerate(items, 1):
                if not isinstance(item, dict):
                    raise DataError(invalid, f"'{key}' item {i} is {react.json_type(item)}, not a message (an object "
                                    "with 'role' and 'content')")
        prompt_roles, completion_roles = ([_role_name(_raw_role(t)) for t in items] for items in (prompt, completion))
        # (function_call: LLaMA-Factory's role for the assistant's calls, trained as its replies are)
        if not any(r in ("assistant", "function_call") for r in completion_roles):
            raise DataError(invalid, "'completion' holds no assistant turn: it is the reply to train")
        if "user" in completion_roles:
            raise DataError(invalid, f"'completion' item {completion_roles.index('user') + 1} is a user turn: TRL "
                            "trains all of the completion, but a user turn is never trained here; put it in 'prompt'")
        turns = prompt + completion
    rest = {k: v for k, v in record.items() if k not in _PROMPT_COMPLETION}
    # `messages` / `conversations` that repeat the turns (a dataset with both columns) leave nothing unread
    for key in ("conversations", "messages"):
        if rest.get(key) is not None and _said(rest.pop(key)) != _said(turns):
            name = turns_key or key
            raise DataError(f"both 'prompt' / 'completion' and '{name}'", f"the record has '{name}' and 'prompt' / "
                            "'completion', which do not hold the same turns; keep one form (the other would be "
                            "ignored)")
    if isinstance(prompt, list):
        replies = [i for i, r in enumerate(prompt_roles) if r in ("assistant", "function_call")]
        if replies and react.is_tool_record({**rest, "messages": turns}):
            raise DataError(invalid, f"'prompt' item {replies[0] + 1} is the assistant's, in a tool / function-call "
                            "conversation, where every assistant turn is trained (TRL trains the completion alone): "
                            "give the turns as 'messages' to train them all, or leave the record out (--skip_invalid)")
        for i in replies:
            key, w = _weight_of(prompt[i], i + 1)
            if w is None:
                turns[i] = {**prompt[i], "weight": 0}
            elif w == 1 and not isinstance(w, bool):  # (another weight is the turns' reading's to judge)
                raise DataError(invalid, f"'prompt' item {i + 1} has {key} {quoted(w, QUOTED)}, but the prompt is "
                                "not trained (TRL's completion_only_loss): move the turn to 'completion'")
    return {**rest, "messages": turns}


# Media columns of multimodal chat data (LLaMA-Factory's lists, LLaVA's one image): the text holds <image> tags
_MEDIA = ("images", "videos", "audios", "image", "video", "audio")
_OTHER_DATA_KEYS = frozenset(_MEDIA + ("label", "kto_tag", "chosen", "rejected", "chosen_messages",
                                       "rejected_messages"))  # (a record without any is not looked into further)


def _other_data(record: dict) -> DataError | None:
    """The error for a record of data made for another kind of training (preference, KTO, multimodal), whatever
    its form: read as chat it trains what it was not meant to (a rejected reply, a <image> tag as text).

    A preference record with a whole conversation of its own (ultrafeedback_binarized's `messages`, its chosen
    conversation) is a chat record: None."""
    if media := [k for k in _MEDIA if record.get(k) not in (None, "", [], {})]:
        return DataError("multimodal data", f"the record has {quoted(media[0], QUOTED)}, media its text refers to "
                         "(<image>-style tags); this model reads text only, and the tags would be trained as text: "
                         "leave such records out (--skip_invalid), or drop the media and their tags")
    for key in ("label", "kto_tag"):
        if isinstance(record.get(key), bool):
            return DataError("KTO data", f"the record has {key!r} {str(record[key]).lower()}, marking its reply "
                             "desirable or not for KTO; training here learns every reply it is given: keep the records "
                             f"labelled true, without {key!r}")
    for chosen, rejected in (("chosen", "rejected"), ("chosen_messages", "rejected_messages")):
        if record.get(chosen) is None or record.get(rejected) is None:
            continue
        turns = next((record[k] for k in ("conversations", "messages", "conversation") if record.get(k) is not None),
                     None)
        last = turns[-1] if isinstance(turns, list) and turns else None
        if isinstance(last, dict) and _role_name(_raw_role(last)) == "assistant":
            return None  # the record's own conversation, a reply at its end, is what it trains
        return DataError("preference data", f"the record has {chosen!r} and {rejected!r} replies (DPO / reward-model "
                         "data); training here learns the one reply a conversation ends with: make the chosen reply "
                         "the last assistant turn (the Alpaca form's 'output') and drop the rejected one")
    return None


# LLaMA-Factory's v1 data writes a message's content as {"type", "value"} parts: its renderer joins the text parts
# (no separator), makes tool_call parts (JSON text of {"name", "arguments"}) the message's OpenAI tool_calls, and reads
# image_url / video_url / audio_url parts as media and reasoning parts as the template's thinking text
_V1_MEDIA = ("image_url", "video_url", "audio_url")


def _turn_content_key(turn) -> str | None:
    """The key of a turn's content when it is a list holding a v1 part (one with a "value"), else None."""
    if not isinstance(turn, dict):
        return None
    key = "content" if turn.get("content") is not None else "value"
    parts = turn.get(key)
    if isinstance(parts, list) and any(isinstance(p, dict) and "value" in p for p in parts):
        return key
    return None


def _from_v1_parts(record: dict) -> dict:
    """A record whose turns hold LLaMA-Factory v1 content parts -> the same record with them in OpenAI's form (a text
    part's "value" is its text; tool_call parts the assistant message's `tool_calls`), which react and the plain
    reading take as they are; other v1 parts are refused naming the part. The record itself when it has none."""
    for key in ("conversations", "messages"):  # (both: two copies of one conversation are compared later)
        turns = record.get(key)
        if isinstance(turns, list) and any(_turn_content_key(t) for t in turns):
            record = {**record, key: _v1_turns(turns)}
    return record


def _v1_turns(turns: list) -> list:
    """`_from_v1_parts` of one list of turns (counted from 1 in errors)."""
    out = []
    for n, turn in enumerate(turns, 1):
        if (content_key := _turn_content_key(turn)) is None:
            out.append(turn)
            continue
        role = _role_name(_one_of(turn, "from", "role", f"turn {n}", _same_role))
        parts, calls = [], []
        for i, part in enumerate(turn[content_key], 1):
            if not isinstance(part, dict) or "value" not in part:
                parts.append(part)  # (OpenAI's parts; anything else is named by the reading of parts)
                continue
            kind, value, where = part.get("type"), part["value"], f"turn {n}, content part {i}"
            if "text" in part:
                raise DataError("invalid value", f"{where} has both 'text' (OpenAI's part) and 'value' (LLaMA-Factory "
                                "v1's); keep one")
            if kind == "text" and isinstance(value, str):
                parts.append({"type": "text", "text": value})
            elif kind == "tool_call" and role == "assistant" and isinstance(value, str):
                calls.append({"type": "function", "function": _v1_call(value, where)})
            elif kind in _V1_MEDIA:
                raise DataError("multimodal data", f"{where} is media (LLaMA-Factory v1's {kind!r} part); this model "
                                "reads text only: leave such records out (--skip_invalid), or drop the media parts")
            elif kind == "reasoning":
                raise DataError("invalid value", f"{where} is a reasoning part (LLaMA-Factory v1's thinking text, "
                                "which templates with a thinking field render); Qwen's chat format has none: drop "
                                "it, or make it a text part to train it as part of the reply")
            else:
                raise DataError("invalid value", f"{where} is {quoted(part, QUOTED)}; of LLaMA-Factory v1's parts, "
                                "text parts ({\"type\": \"text\", \"value\": \"...\"}) and an assistant's tool_call "
                                "parts (JSON text of {\"name\", \"arguments\"}) are read")
        new = {**turn, content_key: parts}
        if calls:
            if turn.get("tool_calls"):
                raise DataError("invalid value", f"turn {n} has both tool_call parts and 'tool_calls'; keep one")
            new["tool_calls"] = calls
        out.append(new)
    return out


def _v1_call(value: str, where: str) -> dict:
    """A v1 tool_call part's value: JSON text of one {"name", "arguments"} object (react checks the two)."""
    try:
        call = json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError("invalid value", f"{where}: a tool_call part's value is not JSON ({json_reason(e)})") from None
    if not isinstance(call, dict):
        raise DataError("invalid value", f"{where}: a tool_call part's value must be JSON text of {{\"name\": ..., "
                        f"\"arguments\": ...}}, got {react.json_type(call)}")
    return call


def trained_reply(message: dict) -> bool:
    """Whether a normalised assistant message is trained: weight 1 and, with `segments`, one of them trained (a
    reply whose segments are all untrained is context, as one of weight 0: its <|im_end|> is not trained either)."""
    return message.get("weight", 1) != 0 and any(t for _, t in message.get("segments", [["", True]]))


def _weight_of(turn: dict, n: int) -> tuple[str, Any]:
    """(key, value) of a turn's weight: `weight`, or LLaMA-Factory v1's `loss_weight` (its converters write 1.0 on the
    assistant's turns, 0.0 on the prompts'); both set and different is an error."""
    w = _one_of(turn, "weight", "loss_weight", f"turn {n}")
    return ("weight" if turn.get("weight") is not None else "loss_weight"), w


def _weight(turn: dict, role: str, n: int) -> int:
    """A turn's `weight` (or `loss_weight`): 1 (trained, also when absent or null) or 0 (context only), a JSON number
    equal to either (0.0 / 1.0 too; a boolean is no weight). OpenAI's fine-tuning format sets it on assistant turns;
    ShareGPT exports (OpenHermes-2.5, SlimOrca) and LLaMA-Factory's v1 data on every turn, 0 on the prompts, which are
    not trained anyway: accepted. A prompt turn (system, user; a tool's result) of weight 1 cannot be trained on its
    own: refused, naming --train_on_prompt. A weight between 0 and 1 (v1's loss_weight scales a turn's loss) is
    refused: training here has no per-turn loss scale."""
    key, w = _weight_of(turn, n)
    if w is None:
        return 1
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
        raise DataError("invalid weight", f"turn {n} ({role}) has {key} {quoted(w, QUOTED)}; it must be 0 (not "
                        "trained) or 1 (trained)")
    if role not in ("assistant", "function_call") and w == 1:
        raise DataError("invalid weight", f"turn {n} ({role}) has {key} 1, but a prompt turn is not trained on its "
                        f"own: --train_on_prompt trains every prompt turn; give it {key} 0 or none")
    return int(w)


def _react_role(turn):
    """A tool conversation's turn with a role of ROLES (any case) written as its normalised role, under the key react
    reads it from; other turns as they are (react names what it does not take)."""
    if not isinstance(turn, dict):
        return turn
    key = "role" if turn.get("role") is not None else "from"
    role = turn.get(key)
    if isinstance(role, str) and role.lower() in ROLES:
        return {**turn, key: ROLES[role.lower()]}
    return turn


def normalize_record(record: Any) -> dict:
    """Validate one record in any accepted form and return its normalised form; raise DataError if invalid.

    The error carries no file position; `iter_records` adds it.
    """
    if not isinstance(record, dict):
        raise DataError("record is not an object", f"got {react.json_type(record)}")
    turns_key = None
    if record.get("conversation") is not None:  # lmsys-chat-1m's turns, Firefly's pairs
        record, turns_key = _from_conversation(record), "conversation"
    if not _OTHER_DATA_KEYS.isdisjoint(record) and (err := _other_data(record)) is not None:
        raise err
    # TRL's prompt-completion data, told by its completion: a `prompt` beside `messages` (ultrachat_200k's) is a copy
    # of the first user turn, left unread
    if record.get("completion") is not None:
        record = _from_prompt_completion(record, turns_key)
    form, columns = _columns_of(record) if not _COLUMN_KEY_SET.isdisjoint(record) else (None, [])
    if form is not None:
        chat = [k for k in ("conversations", "messages") if record.get(k) is not None]
        if not chat:
            record = _from_columns(record, form, columns)
        elif not _columns_repeat_turns(record, form, columns, record[chat[0]]):
            fields = "Alpaca fields" if form.name == "alpaca" else f"{form.name} fields"
            key = turns_key or chat[0]
            raise DataError(f"both '{key}' and {fields}", f"the record has '{key}' and "
                            f"{', '.join(repr(k) for k in columns)}, which do not repeat its first exchange; keep one "
                            "form (the other would be ignored)")
    record = _from_v1_parts(record)
    if record.get("system") == "":
        # an empty 'system' column of an export (LLaMA-Factory's Alpaca / ShareGPT files have one on every row) is
        # the default prompt, as LLaMA-Factory reads it; a system turn of empty text stays an empty prompt
        record = {k: v for k, v in record.items() if k != "system"}
    # Both forms in one record would leave one of them unread. (None counts as absent: a `datasets` dir that
    # mixes the forms has both columns, one of them null in each row.) Checked before a tool record is
    # rendered, which reads one of the two.
    if record.get("conversations") is not None and record.get("messages") is not None:
        said = _said(record["conversations"])
        if said is None or said != _said(record["messages"]):  # (two copies of one conversation lose nothing)
            raise DataError("both 'conversations' and 'messages'",
                            "the record has both; keep one (the other would be ignored)")
        record = {k: v for k, v in record.items() if k != "messages"}
    # "react": true marks turns in the ReAct layout (a normalised tool conversation's: eval ends its replies at
    # "Observation:", where the server stops them); segments alone do not say it, a plain record may carry its own
    layout = record.get("react")
    if layout is not None and not isinstance(layout, bool):
        raise DataError("invalid react", f"'react' must be true (the turns are in Qwen's ReAct layout, as a rendered "
                        f"tool conversation's) or false, got {quoted(layout, QUOTED)}")
    if react.is_tool_record(record):  # rendered into user/assistant turns whose assistants carry `segments`
        if layout is False:
            raise DataError("invalid react", "'react' is false, but a tool / function-call conversation is rendered "
                            "in the ReAct layout (drop 'react')")
        turns = react.record_turns(record)
        for n, turn in enumerate(turns if isinstance(turns, list) else [], 1):
            if not isinstance(turn, dict):
                continue  # (react names it)
            # react reads one key of each synonymous pair: two that disagree are refused as in other records
            raw_role = _one_of(turn, "from", "role", f"turn {n}", _same_role)
            _one_of(turn, "value", "content", f"turn {n}")
            role = ROLES.get(raw_role.lower(), raw_role.lower()) if isinstance(raw_role, str) else str(raw_role)
            if _weight(turn, role, n) == 0 and role in ("assistant", "function_call"):
                key, w = _weight_of(turn, n)
                raise DataError("invalid weight", f"turn {n}: {key!r} {quoted(w, QUOTED)} is not supported in tool / "
                                "function-call conversations (every assistant turn of one is trained)")
        if isinstance(turns, list):  # the assistant's other names, as plain records take them (react: the server's)
            record = {**record, "conversations" if record.get("conversations") is not None else "messages":
                      [_react_role(t) for t in turns]}
        try:
            record = react.render_tool_record(record)
        except react.ReactError as e:
            raise DataError("invalid tool conversation", f"{e.field}: {e}" if e.field else str(e)) from None
    key = "conversations" if record.get("conversations") is not None else "messages"
    turns = record.get(key)
    if turns is None:
        if nulls := [k for k in ("conversations", "messages") if k in record]:  # there, but null: said so
            raise DataError("no conversations", f"{' and '.join(repr(k) for k in nulls)} "
                            f"{'is' if len(nulls) == 1 else 'are'} null; give the turns as a non-empty list")
        if isinstance(record.get("text"), str):  # c4 / wiki dumps, and chats already rendered into one string
            raise DataError("plain text", "the record's text is one 'text' string (pretraining data, or a chat already "
                            "rendered into text); training here reads conversations, the assistant's replies marked: "
                            "give the turns as 'messages' (role / content), or a prompt and its reply as the Alpaca "
                            "form's 'instruction' / 'output'")
        keys = ", ".join(quoted(k, QUOTED) for k in list(record)[:8]) + (", ..." if len(record) > 8 else "")
        # a prompt and a reply under names no accepted layout uses (question / answer, prompt / response): which is
        # which is plain, but not how the dataset meant them to be laid out
        prompt = next((k for k in ("prompt", "question", "query", "instruction", "input")
                       if isinstance(record.get(k), str)), None)
        reply = next((k for k in ("response", "answer", "output", "target")
                      if isinstance(record.get(k), str)), None)
        hint = (f"; a prompt and its reply? Rename {prompt!r} to 'instruction' and {reply!r} to 'output' (the Alpaca "
                "form)" if prompt and reply else "")
        # the keys it has point at the cause: {"data": [...]} around the records, a column named otherwise
        raise DataError("no conversations", "the record has neither 'conversations' nor 'messages' (nor the Alpaca "
                        f"'instruction' / 'output'); its keys: {keys or 'none'}{hint}")
    if not isinstance(turns, list) or not turns:
        raise DataError("no conversations", f"'{key}' must be a non-empty list")

    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError("invalid system", f"top-level 'system' must be a string, got {react.json_type(system)}")
    if system is not None:
        _check_text(system, "the top-level 'system'")

    messages = []
    for n, turn in enumerate(turns, 1):
        raw_role, content = _turn_fields(turn, n)
        role = ROLES.get(raw_role.lower()) if isinstance(raw_role, str) else None
        if role is None and isinstance(raw_role, str) and (bot := OTHER_BOTS.get(raw_role.lower())):
            raise DataError("unknown role", f"turn {n} has role {quoted(raw_role, QUOTED)} ({bot}'s reply, in a "
                            "ShareGPT dump): to train on it as the assistant's, make its role 'gpt'; else leave the "
                            "record out (--skip_invalid)")
        if role is None:
            raise DataError("unknown role", f"turn {n} has role {quoted(raw_role, QUOTED)} "
                            f"(accepted: {', '.join(ROLES)})")
        if isinstance(content, list):  # OpenAI's content parts: text parts joined, as the server reads them
            try:
                content = react.content_text(content, f"turn {n} ({role})")
            except react.ReactError as e:
                raise DataError("invalid value", f"{e.field}: {e}") from None
        if not isinstance(content, str):
            raise DataError("invalid value", f"turn {n} ({role}): the value is {react.json_type(content)}, "
                            "not a string")
        markdown = turn.get("markdown")
        if isinstance(markdown, str) and markdown != content:
            # ShareGPT dumps keep a reply twice: 'value' as the page's HTML, 'markdown' its text
            raise DataError("both 'value' and 'markdown'", f"turn {n} has 'value' {quoted(content, QUOTED)} and "
                            f"'markdown' {quoted(markdown, QUOTED)} (a ShareGPT dump: HTML and its Markdown); keep the "
                            "text to train on as 'value' and drop 'markdown'")
        weight = _weight(turn, role, n)
        _check_text(content, f"turn {n} ({role})")
        if role == "system":
            if n != 1:
                raise DataError("system turn not first", f"turn {n} is a system turn; only the first turn may be")
            if system is not None:
                raise DataError("two system prompts", "the record has both a top-level 'system' and a "
                                "system turn")
            system = content  # an empty system prompt is legitimate (make_context allows it)
            continue
        if not content.strip():
            raise DataError("empty value", f"turn {n} ({role}) is empty")
        if messages and messages[-1]["role"] == role:
            raise DataError("consecutive turns of the same role", f"turns {n - 1} and {n} are both {role}")
        if not messages and role == "assistant":
            raise DataError("starts with an assistant turn", f"turn {n} is the first turn after the "
                            "system prompt and is an assistant turn; a conversation starts with the user")
        messages.append({"role": role, "content": content})
        if weight == 0 and role == "assistant":  # (a prompt's 0 is what training does anyway; --train_on_prompt
            messages[-1]["weight"] = 0           # trains every prompt turn, as without weights)
        if role != "assistant" and turn.get("segments") is not None:  # (read nowhere: it was ignored silently)
            raise DataError("invalid segments", f"turn {n} ({role}): 'segments' marks the trained text of an "
                            "assistant turn; a user turn has none")
        if role == "assistant" and turn.get("segments") is not None:  # labels per segment (render_tool_record)
            try:
                messages[-1]["segments"] = react.check_segments(turn["segments"], content, f"turn {n}")
            except react.ReactError as e:
                raise DataError("invalid segments", f"{e.field}: {e}") from None

    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant turn", "nothing to train on or score")
    if not any(m["role"] == "assistant" and trained_reply(m) for m in messages):
        raise DataError("no trained assistant turn", "every assistant turn has weight 0 or no trained segment: "
                        "nothing to train on or score")
    rid = record.get("id")
    if isinstance(rid, str):
        _check_text(rid, "the id")
    elif rid is not None:
        try:
            rid = str(rid)
        except ValueError as e:  # an int longer than Python converts (sys.get_int_max_str_digits)
            raise DataError("invalid id", f"an id too long to convert ({str(e).split(';')[0]})") from None
    out = {"id": rid, "system": DEFAULT_SYSTEM if system is None else system, "messages": messages}
    if record.get("react"):
        out["react"] = True
    return out


# -- files ----------------------------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")
_BOM = b"\xef\xbb\xbf"

# What json.detect_encoding finds -> how the message names it and how iconv calls it.
_NOT_UTF8 = {
    "utf-16": ("UTF-16 (with a byte order mark)", "UTF-16"),
    "utf-16-le": ("UTF-16 little-endian (no byte order mark)", "UTF-16LE"),
    "utf-16-be": ("UTF-16 big-endian (no byte order mark)", "UTF-16BE"),
    "utf-32": ("UTF-32 (with a byte order mark)", "UTF-32"),
    "utf-32-le": ("UTF-32 little-endian (no byte order mark)", "UTF-32LE"),
    "utf-32-be": ("UTF-32 big-endian (no byte order mark)", "UTF-32BE"),
}


# Binary formats data arrives in (a `datasets` dir's Arrow shard, compressed JSONL), by their first bytes -> what the
# message calls them and how to get JSONL. Read as UTF-8 they were "invalid UTF-8 bytes at byte offset 212", which
# named no cause. (Parquet, by its own first bytes, is read: file_form.)
_TO_JSONL = ("python -c \"import datasets; datasets.Dataset.from_{}('FILE').to_json('FILE.jsonl', "
             "force_ascii=False)\"")
_BINARY = (
    (b"ARROW1", "an Arrow (Feather) file", "convert it to JSONL: python -c \"import pandas; pandas.read_feather("
     "'FILE').to_json('FILE.jsonl', orient='records', lines=True, force_ascii=False)\""),
    (b"\xff\xff\xff\xff", "an Arrow stream (a `datasets` save_to_disk shard?)",
     "pass the dir that holds it and its dataset_info.json, or convert it to JSONL: " + _TO_JSONL.format("file")),
    (b"\x1f\x8b", "gzip-compressed", "decompress it first: `gunzip -k FILE`"),
    (b"BZh", "bzip2-compressed", "decompress it first: `bunzip2 -k FILE`"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first: `unxz -k FILE`"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first: `unzstd FILE`"),
    (b"PK\x03\x04", "a zip archive", "unzip it and pass the JSON / JSONL file (or the dir of them)"),
)


def _check_encoding(path: str, head: bytes) -> None:
    """Refuse a binary file (_BINARY) and a UTF-16/32 file by name: read as UTF-8 they would fail in confusing ways
    (or, as JSONL, split characters at 0x0A bytes). json.detect_encoding applies RFC 4627's rule to the first four
    bytes."""
    for magic, name, how in _BINARY:
        if head.startswith(magic):
            raise DataError("not a JSON / JSONL file", f"the file is {name}; {how}", path=path)
    found = json.detect_encoding(head[:4])
    if found in _NOT_UTF8:
        name, iconv = _NOT_UTF8[found]
        raise DataError("not UTF-8", f"the file is {name}; data files must be UTF-8: convert it, e.g. "
                        f"`iconv -f {iconv} -t UTF-8 FILE > FILE.utf8`", path=path)


class _Decoder:
    """json decoding in which every way the json module can fail on a record becomes a DataError cause, and
    duplicated keys (which json.loads resolves silently, last one wins) are found."""

    def __init__(self):
        self.duplicates: list[str] = []
        dups = self.duplicates

        def pairs_to_dict(pairs: list, dict=dict, len=len) -> dict:  # called per object: kept lean
            obj = dict(pairs)
            if len(obj) != len(pairs):
                seen: set = set()
                dups.extend(k for k, _ in pairs if k in seen or seen.add(k))
            return obj

        # strict=False: a tab or line break typed inside a string is that character, as the official finetune.py
        # (json.load(strict=False)) reads it
        self.raw_decode = json.JSONDecoder(object_pairs_hook=pairs_to_dict, strict=False).raw_decode

    def decode(self, text: str, pos: int = 0) -> tuple[Any, int]:
        """(object, end) of the JSON value at text[pos]; raises json.JSONDecodeError, or DataError for a value
        too deep or a number too long to read."""
        self.duplicates.clear()
        try:
            return self.raw_decode(text, pos)
        except json.JSONDecodeError:
            raise
        except RecursionError:
            raise DataError("invalid JSON", "nested too deeply (more levels of arrays/objects than Python's "
                            "json reader allows)") from None
        except ValueError as e:  # a number longer than int() converts (sys.get_int_max_str_digits)
            raise DataError("invalid JSON", f"a number too long to read ({str(e).split(';')[0]})") from None

    def duplicate_error(self) -> DataError | None:
        if not self.duplicates:
            return None
        return DataError("duplicate key", f"key {quoted(self.duplicates[0], QUOTED)} appears twice in one object "
                         "(a JSON reader keeps only one of the two values)")


_bad_utf8 = threading.local()


def _note_bad_utf8(e: UnicodeDecodeError) -> tuple[str, int]:
    _bad_utf8.spans.append((e.start, e.end))
    return "\ufffd", e.end


codecs.register_error("finetune.data.note_bad_utf8", _note_bad_utf8)


def _decode_utf8(data: bytes, offset: int = 0) -> tuple[str, list[int], list[str]]:
    """Text of UTF-8 bytes with each invalid byte sequence replaced by U+FFFD; also the character positions
    of the replacements and, for each, a description naming the bytes and their offset in the file (`offset`:
    where `data` starts in it)."""
    _bad_utf8.spans = []
    text = data.decode("utf-8", "finetune.data.note_bad_utf8")
    spans, _bad_utf8.spans = _bad_utf8.spans, []
    chars, where, n, prev = [], [], 0, 0
    for start, end in spans:  # the bytes between two bad spans are valid UTF-8
        n += len(data[prev:start].decode("utf-8"))
        chars.append(n)
        where.append(f"invalid UTF-8 bytes {data[start:end]!r} at byte offset {offset + start}")
        n, prev = n + 1, end
    return text, chars, where


def _json_error(path: str, e: json.JSONDecodeError, index: int | None = None) -> DataError:
    return DataError("invalid JSON", f"{json_reason(e)} at line {e.lineno} column {e.colno}",
                     path=path, index=index, line=e.lineno)


def _iter_json_array(path: str, text: str, start: int, bad: list[int] = (), bad_where: list[str] = ()
                     ) -> Iterator[tuple[int, int | None, Any, DataError | None]]:
    """(index, line, object, error) for each element of the JSON array that starts at text[start] == '['.

    `bad`: character positions of invalid UTF-8 (see `_decode_utf8`); an element holding one is an error.
    An element that cannot be parsed raises: its end is unknown, so reading cannot go on.
    """
    from bisect import bisect_left

    decoder = _Decoder()

    def syntax_error(e: json.JSONDecodeError, index: int | None) -> DataError:
        k = bisect_left(bad, e.pos)
        if k < len(bad) and bad[k] == e.pos:  # the parser stopped at an invalid byte: say that
            return DataError("not UTF-8", f"{bad_where[k]} (line {e.lineno})", path=path, index=index,
                             line=e.lineno)
        return _json_error(path, e, index)

    pos = _WS.match(text, start + 1).end()
    line, counted = 1, 0  # line number of `pos`, maintained incrementally
    if text.startswith("]", pos):
        pos = _WS.match(text, pos + 1).end()
        if pos != len(text):
            raise syntax_error(json.JSONDecodeError("Extra data", text, pos), None)
        return
    index = 0
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, end = decoder.decode(text, pos)
        except json.JSONDecodeError as e:
            raise syntax_error(e, index) from None
        except DataError as e:
            raise e.located(path, index, line) from None
        k = bisect_left(bad, pos)
        if k < len(bad) and bad[k] < end:
            at = bad[k]
            yield index, line, None, DataError(
                "not UTF-8", f"{bad_where[k]} (line {line + text.count(chr(10), pos, at)})",
                path=path, index=index, line=line)
        else:
            err = decoder.duplicate_error()
            yield index, line, (obj if err is None else None), err and err.located(path, index, line)
        index += 1
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
            continue
        if text.startswith("]", pos):
            pos = _WS.match(text, pos + 1).end()
            if pos != len(text):
                raise syntax_error(json.JSONDecodeError("Extra data after the array", text, pos), None)
            return
        raise syntax_error(json.JSONDecodeError("Expecting ',' or ']'", text, pos), index)


def _is_jsonl(path: str) -> bool:
    """JSONL unless the file's first non-blank character opens a JSON array. Refuses a UTF-16/32 file, and a file
    not named .json / .jsonl / .ndjson whose text does not start as JSON does (plain text, CSV)."""
    with open(path, "rb") as f:
        raw = f.read(4096)
        _check_encoding(path, raw)
        if Path(path).suffix.lower() in JSONL_SUFFIXES:
            return True
        head = raw.removeprefix(_BOM).lstrip(b" \t\r\n")
        while not head:
            chunk = f.read(1 << 16)
            if not chunk:
                return False  # empty: read as a (failing) JSON document
            head = chunk.lstrip(b" \t\r\n")
    if Path(path).suffix.lower() not in DATA_SUFFIXES and not head.startswith((b"[", b"{")):
        _not_json(path, head)
    return not head.startswith(b"[")


def _not_json(path: str, head: bytes) -> None:
    """Refuse a file of text that is not JSON (its line-by-line reading said only "invalid JSON" for each line)."""
    first = head.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        sep = ", sep='\\t'" if suffix == ".tsv" else ""
        raise DataError("not a JSON / JSONL file", f"the file is {suffix[1:].upper()}; convert it to JSONL: python -c "
                        f"\"import datasets; datasets.Dataset.from_csv('FILE'{sep}).to_json('FILE.jsonl', "
                        "force_ascii=False)\" (its columns become each record's keys)", path=path)
    raise DataError("not a JSON / JSONL file", f"its text does not start as JSON (the first line starts "
                    f"{quoted(first, QUOTED)}): plain text, as pretraining data is? Data files hold chat records, a "
                    "JSON array of them or one JSON object a line", path=path)


def _iter_jsonl(path: str, start: int = 0, end: int | None = None, line0: int = 0, index0: int = 0):
    """(index, line, raw record, parse error) for the lines of a JSONL file in bytes [start, end)."""
    hint = "" if Path(path).suffix.lower() in JSONL_SUFFIXES else \
        " (the file is not a JSON array, so it is read as one object per line)"
    decoder = _Decoder()
    index, lineno = index0, line0
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        for line in f:
            if end is not None and pos >= end:
                break
            line_start = pos
            pos += len(line)
            lineno += 1
            if lineno == 1 and line.startswith(_BOM):
                line = line[3:]  # a BOM, which some editors write
                line_start += 3
            if not line.strip():
                continue  # blank lines hold no record
            err = None
            try:
                text = line.rstrip(b"\r\n").decode("utf-8")  # columns of an error: of this line, not the next
                obj, stop = decoder.decode(text, _WS.match(text).end())
                if _WS.match(text, stop).end() != len(text):
                    raise json.JSONDecodeError("Extra data", text, stop)
                err = decoder.duplicate_error()
            except UnicodeDecodeError as e:
                err = DataError("not UTF-8", f"invalid UTF-8 bytes {e.object[e.start:e.end]!r} at byte offset "
                                f"{line_start + e.start} (column {e.start + 1} of the line)")
            except json.JSONDecodeError as e:
                # a JSON array saved as .jsonl fails on its "[" line: say so rather than only "Expecting value"
                opens_array = index == 0 and not hint and text.lstrip().startswith("[")
                # an invisible U+FEFF where a line starts: files that each begin with a BOM, joined with cat
                bom = text.startswith("\ufeff", e.pos)
                # records separated by a carriage return alone (old Mac line ends) read as one line with extra data
                cr_only = e.msg == "Extra data" and "\r" in text
                # a "{" alone on its line (pretty-printed records, `jq .`'s output) was only "Expecting property
                # name enclosed in double quotes at line 1 column 2"
                pretty = text.strip() == "{"
                err = DataError("invalid JSON", f"{json_reason(e)} at line {lineno} column {e.colno}" + hint + (
                    " (the file opens a JSON array, which a .jsonl file is not read as: name it .json)"
                    if opens_array else "") + (" (a byte order mark, U+FEFF, which only the file's first line may "
                                               "start with: files joined with cat?)" if bom else "") + (
                    " (its lines end in a carriage return alone, as old Mac files do: convert them, e.g. "
                    "`tr '\\r' '\\n' < FILE > FILE.jsonl`)" if cr_only else "") + (
                    " (the line holds only '{': a record spread over several lines, as pretty-printed JSON is? Each "
                    "record must be on one line: `jq -c . FILE > FILE.jsonl`)" if pretty else ""))
            except DataError as e:
                err = e
            if err is None:
                yield index, lineno, obj, None
            else:
                yield index, lineno, None, err.located(path, index, lineno)
            index += 1


# -- Parquet (the hub's data files) --------------------------------------------------------------------------

PARQUET_SUFFIX = ".parquet"
PARQUET_MAGIC = b"PAR1"
PARQUET_BATCH_ROWS = 1024  # rows made Python records at a time (pyarrow holds a row group's data, never the file's)


def file_form(path: str) -> str:
    """How a data file is read: "parquet" (by its first bytes, whatever its name), "jsonl" or "json" (`_is_jsonl`).
    A .parquet file that is no Parquet is refused: read as JSONL it was "invalid JSON" on every line."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if Path(path).suffix.lower() == PARQUET_SUFFIX:
        why = ("the file is empty" if not head else "it is a Git LFS pointer: the hub's file was not downloaded "
               "(`git lfs pull`)" if head.startswith(b"version https://git-lfs") else
               f"it does not start with Parquet's magic bytes {PARQUET_MAGIC.decode()}")
        raise DataError("not a Parquet file", why, path=path)
    return "jsonl" if _is_jsonl(path) else "json"


def _parquet_file(path: str):
    """pyarrow's ParquetFile of ``path``; a file pyarrow cannot read (a damaged or cut footer) is a DataError
    naming it and pyarrow's reason. Duplicate column names are refused as JSON's duplicate keys are: pyarrow keeps
    the last one's value, silently."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as e:  # (a damaged column name: UnicodeDecodeError)
        raise DataError("unreadable Parquet file", " ".join(str(e).split()), path=path) from None
    fields = [("", list(pf.schema_arrow))]
    while fields:
        where, level = fields.pop()
        names = [f.name for f in level]
        if dup := next((n for n in names if names.count(n) > 1), None):
            raise DataError("duplicate key", f"column {where + dup!r} appears twice (a reader keeps only one of "
                            "the two values)", path=path)
        for f in level:
            t = f.type
            while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
                t = t.value_type
            if pa.types.is_struct(t):
                fields.append((f"{where}{f.name}.", list(t)))
    return pf


def parquet_shards(path: str, n: int) -> tuple[list[tuple[int, int, int] | None], int]:
    """A Parquet file split at row-group boundaries into at most n ranges of about equal rows, (first row group,
    end, records before) each; [None] (the whole file) when it does not split; and its number of records."""
    meta = _parquet_file(path).metadata
    rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    total, shards, first, before, seen = sum(rows), [], 0, 0, 0
    for i, r in enumerate(rows[:-1]):
        seen += r
        if len(shards) < n - 1 and seen * n >= total * (len(shards) + 1):
            shards.append((first, i + 1, before))
            first, before = i + 1, seen
    return ([*shards, (first, len(rows), before)] if shards else [None]), total


def _iter_parquet(path: str, first: int = 0, end: int | None = None, index0: int = 0):
    """(index, None, raw record, error) for the rows of a Parquet file (row groups [first, end)), one record a row,
    read in batches of PARQUET_BATCH_ROWS rows."""
    import pyarrow as pa

    pf = _parquet_file(path)
    groups = None if first == 0 and end is None else list(range(first, pf.num_row_groups if end is None else end))
    batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups)
    index = index0
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError, ValueError) as e:  # a damaged page or column chunk
            raise DataError("unreadable Parquet file", f"{' '.join(str(e).split())} (in the rows from record "
                            f"{index + 1} on)", path=path) from None
        if batch is None:
            return
        for row in _parquet_rows(batch):
            if isinstance(row, DataError):
                yield index, None, None, row.located(path, index, None)
            else:
                record, err = _parquet_record(row)
                yield index, None, record, err and err.located(path, index, None)
            index += 1


def _parquet_rows(batch) -> list:
    """A record batch's rows as dicts (maps as dicts, as JSON objects), or a DataError for a row pyarrow cannot
    give: invalid UTF-8 in a string, a map holding a key twice (named by column)."""
    try:
        return batch.to_pylist(maps_as_pydicts="strict")
    except (UnicodeDecodeError, KeyError):
        pass
    rows = []
    for i in range(batch.num_rows):
        row = {}
        for name, column in zip(batch.schema.names, batch.columns):
            try:
                row[name] = column.slice(i, 1).to_pylist(maps_as_pydicts="strict")[0]
            except UnicodeDecodeError as e:
                row = DataError("not UTF-8", f"column {name!r} holds invalid UTF-8 bytes {e.object[e.start:e.end]!r}")
                break
            except KeyError:
                row = DataError("duplicate key", f"column {name!r} holds a map with a key twice (a JSON reader "
                                "keeps only one of the two values)")
                break
        rows.append(row)
    return rows


def _parquet_record(row: dict) -> tuple[dict | None, DataError | None]:
    """A Parquet row as the record a JSON reading of it gives, or the error of a value JSON has no form for (bytes,
    a timestamp, a decimal), named by column; a record of another kind of data (an image column's bytes) is
    refused saying that instead."""
    bad: list = []
    record = _without_nulls(row, "", bad)
    if not bad:
        return record, None
    if (err := _other_data(record)) is not None:
        return None, err
    where, kind = bad[0]
    column = where.split(".")[0].split("[")[0]
    at = f" (at {where})" if where != column else ""
    return None, DataError("not JSON data", f"column {column!r} holds {kind}{at}, which no JSON record holds (a "
                           "chat record is text): drop the column, or convert it to text")


def _without_nulls(value, where: str, bad: list):
    """A Parquet value with the null fields of its objects left out; list items stay as they are. Parquet has no
    absent field: a file of records with different fields (the hub's, written with the union of their columns)
    holds null for each field a record lacks, and a null `system`, `tools`, or a message's `name` or `tool_calls`
    read as given changes what the record says. Values JSON has no form for are kept and noted in ``bad`` (their
    place, what they are)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):  # (a map's key)
                bad.append((where, f"a map key that is not text ({k!r})"))
            if v is not None:
                out[k] = _without_nulls(v, f"{where}.{k}" if where else k, bad)
        return out
    if isinstance(value, list):
        return [_without_nulls(v, f"{where}[{i}]", bad) for i, v in enumerate(value)]
    if not (value is None or isinstance(value, (str, int, float))):  # (bool is an int)
        bad.append((where, _kind_of(value)))
    return value


def _kind_of(value) -> str:
    """What a value pyarrow gives is, as a message says it."""
    import datetime
    import decimal

    kinds = ((bytes, "binary data (bytes)"), (datetime.datetime, "a timestamp"), (datetime.date, "a date"),
             (datetime.time, "a time of day"), (datetime.timedelta, "a duration"),
             (decimal.Decimal, "a decimal number"))
    return next((name for t, name in kinds if isinstance(value, t)), f"a value of type {type(value).__name__}")


def jsonl_shards(path: str, n: int) -> list[tuple[int, int | None, int, int]]:
    """Split a JSONL file at line starts into n byte ranges: (start, end, lines before, records before)."""
    return jsonl_shards_counted(path, n)[0]


def jsonl_shards_counted(path: str, n: int) -> tuple[list[tuple[int, int | None, int, int]], int]:
    """`jsonl_shards` and the number of records (non-blank lines) of the file, from the same pass."""
    size = os.path.getsize(path)
    cuts = [size * k // n for k in range(1, n)]
    shards, start, line0, index0 = [], 0, 0, 0
    lines = records = 0
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            if cuts and pos >= cuts[0] and pos > start:
                shards.append((start, pos, line0, index0))
                start, line0, index0 = pos, lines, records
                while cuts and cuts[0] <= pos:
                    cuts.pop(0)
            pos += len(line)
            lines += 1
            records += bool(line.strip())
    shards.append((start, None, line0, index0))
    return shards, records


GLOB_CHARS = re.compile(r"[*?\[]")
DATA_SUFFIXES = (".json",) + JSONL_SUFFIXES + (PARQUET_SUFFIX,)  # the files a plain directory given as data contributes


COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
# data in a format a directory's reading leaves out (Arrow files): refused, as one named alone is (beside a .jsonl
# file they were left out without a word)
OTHER_FORMAT_SUFFIXES = {".arrow": "Arrow", ".feather": "Arrow"}


def _is_datasets_dir(p: Path) -> bool:
    """A `datasets` save_to_disk dir: a DatasetDict's dataset_dict.json, or a Dataset's dataset_info.json beside
    its state.json (a LLaMA-Factory data folder has a dataset_info.json of its own, its registry of files)."""
    return (p / "dataset_dict.json").exists() or ((p / "dataset_info.json").exists() and (p / "state.json").exists())


def _dir_files(d: str) -> list[str]:
    """The .json / .jsonl / .ndjson / .parquet files directly in a plain directory, sorted by name. Refused where the
    directory holds data this reading would leave out without a word: compressed data files, subdirectories of
    data files, or LLaMA-Factory's dataset_info.json registry (which names files, and is no data itself)."""
    root = Path(d)
    if (root / "dataset_info.json").is_file():
        raise DataError("not a data file", "the directory holds dataset_info.json but no state.json: a LLaMA-Factory "
                        "data folder (its dataset_info.json lists datasets; it is no training data), not a "
                        "`datasets` save_to_disk dir. Name the data files: a file, a quoted glob ('DIR/*.jsonl') "
                        "or a comma-separated list", path=d)
    # a broken symbolic link is kept (its reading names it), not left out of the data without a word
    files, left_out = [], []
    for f in sorted(root.iterdir()):
        if (f.is_file() or f.is_symlink() and not f.exists()) and f.suffix.lower() in DATA_SUFFIXES:
            files.append(str(f))
        elif f.name.startswith("."):  # (hidden: an editor's or Jupyter's copies)
            continue
        elif f.is_file() and f.suffix.lower() in COMPRESSED_SUFFIXES and Path(f.stem).suffix.lower() in DATA_SUFFIXES:
            left_out.append(f"{f.name} (compressed: decompress it first)")
        elif f.is_file() and f.suffix.lower() in OTHER_FORMAT_SUFFIXES:
            left_out.append(f"{f.name} ({OTHER_FORMAT_SUFFIXES[f.suffix.lower()]}: convert it to JSONL first)")
        elif f.is_dir() and not _is_datasets_dir(f) and any(x.suffix.lower() in DATA_SUFFIXES
                                                             for x in f.rglob("*") if x.is_file()):
            left_out.append(f"{f.name}/ (a subdirectory: a directory's own files are read, not its subdirectories')")
    if left_out:
        raise DataError("data left out", f"the directory holds data files it would not read: {', '.join(left_out[:3])}"
                        + (f" and {len(left_out) - 3} more" if len(left_out) > 3 else "") + "; name the files to "
                        "train on instead (a quoted glob such as 'DIR/**/*.jsonl', or a comma-separated list)",
                        path=d)
    if not files:
        raise DataError("not a data file", "a directory that is not a `datasets` save_to_disk dir and holds no "
                        f"{' / '.join(DATA_SUFFIXES)} files", path=d)
    return files


def spec_parts(spec: str, exists=os.path.exists) -> list[str]:
    """The entries of a data flag's value as data_sources reads them: the whole value where it names an existing
    path (a file whose name holds a comma), else its comma-separated entries, stripped (an empty one stays "")."""
    return [spec] if exists(spec) or "," not in spec else [s.strip() for s in spec.split(",")]


def data_sources(spec: str | os.PathLike) -> list[str]:
    """The data files (and `datasets` dirs) that a data flag names, in the order their records are read.

    `spec` is one file or `datasets` dir; a plain directory (its .json / .jsonl / .ndjson / .parquet files, sorted
    by name); a glob pattern, quoted so the shell leaves it ("data/train-*.jsonl", ** for subdirs; the matches
    sorted by name); or a comma-separated list of any of these (in the order given). An existing path is
    always taken as it is, so a file whose name holds a comma or a * still reads. A pattern that matches
    nothing, a missing file, a file named twice and a directory that may not be read are errors naming them.
    """
    try:
        return _data_sources(os.fspath(spec))
    except OSError as e:  # a directory without read (or search) permission was a PermissionError traceback
        where = os.fspath(spec) if not e.filename else e.filename if os.path.isdir(e.filename) else \
            os.path.dirname(e.filename)  # (the listing's own dir, or the dir whose entry could not be looked at)
        raise DataError("unreadable directory", e.strerror or str(e), path=where) from None


def _data_sources(spec: str) -> list[str]:
    import glob

    if os.path.exists(spec):
        return _dir_files(spec) if os.path.isdir(spec) and not _is_datasets_dir(Path(spec)) else [spec]
    parts = spec_parts(spec)
    if "" in parts:
        raise DataError("invalid list of files", "an empty entry in the comma-separated list", path=spec)
    out: list[str] = []
    for part in parts:
        part = os.path.expanduser(part)
        if os.path.exists(part):
            found = [part]
        elif GLOB_CHARS.search(part):
            found = sorted(glob.glob(part, recursive=True))
            if not found:
                raise DataError("no match", "the pattern matches no file", path=part)
        else:
            raise DataError("no such file", path=part)
        for f in found:
            out += _dir_files(f) if os.path.isdir(f) and not _is_datasets_dir(Path(f)) else [f]
    seen: dict[str, str] = {}
    for f in out:
        real = os.path.realpath(f)
        if real in seen:
            raise DataError("file given twice", f"{f} is named more than once (its records would be read twice)",
                            path=spec)
        seen[real] = f
    return out


def data_dirs(spec: str | os.PathLike) -> list[tuple[Path, str | None, bool]]:
    """Where a data flag reads files by listing a directory, as (directory, the name pattern in it or None for
    every data file there, whether it reaches below it too: a ** pattern). Files written there later would join the
    data. Explicitly named files and `datasets` dirs are not listings (nothing new joins them)."""
    spec = os.fspath(spec)
    parts = [part for part in spec_parts(spec) if part]
    out = []
    for part in parts:
        part = os.path.expanduser(part)
        if os.path.isdir(part) and not _is_datasets_dir(Path(part)):
            out.append((Path(part), None, False))
        elif not os.path.exists(part) and GLOB_CHARS.search(part):
            head, name = os.path.split(part)
            base = head.split("**")[0] if "**" in head else head
            fixed = Path(base or ".")
            while GLOB_CHARS.search(str(fixed)):  # (a pattern in a directory name: its fixed parent)
                fixed = fixed.parent
            out.append((fixed, name, "**" in part or fixed != Path(head or ".")))
    return out


def read_as_data(path: str | os.PathLike, spec: str | os.PathLike) -> bool:
    """Whether a file written at ``path`` would be read by the data flag ``spec`` from then on: a data file in a
    directory it lists, or one its pattern matches (``data_dirs``). Training's --output_dir and eval's --output
    are checked with it; a spec that does not read (DataError) joins nothing here: its reading says why."""
    import fnmatch

    p = Path(path)
    p = p.parent.resolve() / p.name  # (the listing reads a link by its own name, wherever it points)
    try:
        dirs = data_dirs(spec)
    except DataError:
        return False
    for directory, pattern, deep in dirs:
        directory = directory.resolve()
        if directory != p.parent and not (deep and directory in p.parents):
            continue
        if fnmatch.fnmatch(p.name, pattern) if pattern else p.suffix.lower() in DATA_SUFFIXES:
            return True
    return False


def check_data_file(path: str) -> None:
    """DataError naming ``path`` unless it is a regular file (a symbolic link to one included) that may hold data."""
    p = Path(path)
    if p.exists() and not p.is_file():  # `-d <(zcat data.jsonl.gz)` names a pipe: it is there, "no such file" was not
        raise DataError("not a data file", "not a regular file (a pipe, socket or device): the data is read more "
                        "than once, so write it to a file first", path=path)
    if not p.is_file():
        raise DataError("no such file", f"a broken symbolic link to {os.readlink(p)}" if p.is_symlink() else "",
                        path=path)
    try:  # (a file without read permission was a PermissionError traceback from the first reader)
        open(p, "rb").close()
    except OSError as e:
        raise DataError("unreadable file", e.strerror or str(e), path=path) from None
    if p.name.lower() == "dataset_info.json":  # read a line at a time it was hundreds of "invalid JSON" records
        raise DataError("not a data file", "dataset_info.json describes data, it holds none: LLaMA-Factory's registry "
                        "of its data files (name those files) or a `datasets` save_to_disk dir's (name the dir)",
                        path=path)


def _iter_raw(path: str) -> Iterator[tuple[int, int | None, Any, DataError | None]]:
    """(index, line, raw record, parse error) for each record of a file or `datasets` dir."""
    p = Path(path)
    if p.is_dir():
        if not _is_datasets_dir(p):
            raise DataError("not a data file", "a directory that is not a `datasets` save_to_disk dir",
                            path=path)
        import datasets  # only needed for dataset dirs

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # datasets' own errors for a damaged dir vary (FileNotFoundError, ValueError, ...)
            raise DataError("unreadable datasets dir", f"datasets.load_from_disk failed: {type(e).__name__}: "
                            f"{' '.join(str(e).split())}", path=path) from None
        if isinstance(ds, datasets.DatasetDict):
            # its 'train' split was read whatever else it held: a held-out eval on it scored the training records
            if len(ds) != 1:
                names = list(ds)
                raise DataError("not a data file", f"a DatasetDict with {len(names)} splits ({', '.join(names)}): "
                                f"name the split to read by its dir, e.g. {Path(path) / (names or ['train'])[0]}",
                                path=path)
            ds = next(iter(ds.values()))
        for i, row in enumerate(ds):
            yield i, None, row, None
        return
    check_data_file(path)
    form = file_form(path)
    if form == "parquet":
        yield from _iter_parquet(path)
        return
    if form == "jsonl":
        yield from _iter_jsonl(path)
        return
    data = p.read_bytes()
    bom = len(_BOM) if data.startswith(_BOM) else 0
    text, bad, bad_where = _decode_utf8(data[bom:], bom)
    del data
    start = _WS.match(text).end()
    if start == len(text):
        raise DataError("empty file", "no records", path=path)
    if not text.startswith("[", start):  # _is_jsonl read it as an array: only a bad byte can get here
        raise DataError("not UTF-8", bad_where[0] if bad else "the file does not start with '['", path=path)
    yield from _iter_json_array(path, text, start, bad, bad_where)


def iter_records(path: str | os.PathLike, skip_invalid: bool = False,
                 shard: tuple | None = None) -> Iterator[tuple[dict | None, DataError | None]]:
    """Stream (normalised record, None) per valid record, and (None, error) per invalid one when skipping.

    File-level problems (missing file, a broken JSON array) always raise: there is no record to skip.
    `path` may name several files (`data_sources`): their records follow each other, each error naming its
    own file and its index there. `shard` restricts one file to part of it: a JSONL file to one byte range
    (`jsonl_shards`), a Parquet file to a range of row groups (`parquet_shards`).
    """
    if shard is not None:
        read = _iter_parquet if file_form(str(path)) == "parquet" else _iter_jsonl
        yield from _iter_file(str(path), skip_invalid, read(str(path), *shard))
        return
    for source in data_sources(path):
        yield from _iter_file(source, skip_invalid, _iter_raw(source))


def _iter_file(path: str, skip_invalid: bool, raw_iter) -> Iterator[tuple[dict | None, DataError | None]]:
    for index, line, raw, err in raw_iter:
        if err is None:
            try:
                yield normalize_record(raw), None
                continue
            except DataError as e:
                err = e.located(path, index, line)
        if not skip_invalid:
            raise err
        yield None, err


# -- whole files ---------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What `load_records` read: counts, and every skipped record's error."""

    path: str
    read: int = 0
    used: int = 0
    errors: list[DataError] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.errors)

    def reasons(self) -> Counter:
        return Counter(e.reason for e in self.errors)

    def format(self, max_examples: int = 5) -> str:
        out = [f"{self.path}: {self.read} records read, {self.used} used, {self.skipped} skipped"]
        for reason, n in self.reasons().most_common():
            out.append(f"  skipped {n}: {reason}")
        for e in self.errors[:max_examples]:
            out.append(f"  e.g. {e}")
        return "\n".join(out)


class RecordList(list):
    """A list of normalised records that also carries the `LoadReport` of the read (`.report`)."""

    report: LoadReport


def load_records(path: str | os.PathLike, skip_invalid: bool = False, *, flag: str | None = None) -> RecordList:
    """Read and validate a JSON array, JSONL or Parquet file or `datasets` dir (or several: `data_sources`); return
    the normalised records.

    Invalid records raise DataError, or with `skip_invalid` are counted in `result.report` (and the count
    is printed to stderr). A file with no usable record is always an error. `flag` is the command-line flag
    that gave `path`, named in the errors ("--data d.json: no such file").
    """
    try:
        return _load_records(path, skip_invalid)
    except DataError as e:
        raise e.given_by(flag) from None


def _load_records(path, skip_invalid: bool) -> RecordList:
    report = LoadReport(str(path))
    records = RecordList()
    for rec, err in iter_records(path, skip_invalid):
        report.read += 1
        if err is not None:
            report.errors.append(err)
        else:
            records.append(rec)
    report.used = len(records)
    records.report = report
    if report.skipped:
        print(report.format(), file=sys.stderr)
    if not records:
        raise DataError("no usable records",
                        f"{report.read} read, {report.skipped} invalid" if report.read
                        else "the file holds no records" if len(data_sources(path)) == 1
                        else "the files hold no records",
                        path=str(path))
    return records
