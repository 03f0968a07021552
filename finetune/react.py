"""Qwen's ReAct layout for function calling, shared by the server and the training data.

Qwen v1 chat models call functions through ReAct prompting, as the official `openai_api.py` does it (facts
reproduced here: the tool description and instruction texts, where the instruction goes, how assistant
calls and function results are written into the turns, how a reply is parsed back):

- The instruction (`REACT_INSTRUCTION`, listing each function as `TOOL_DESC`) is put in front of one user
  message as ``{instruction}\\n\\nQuestion: {text}``: the last user message of the history when the
  conversation has history pairs, else the query.
- An assistant message that calls a function becomes ``Thought: {content}\\nAction: {name}\\nAction Input:
  {arguments}``; the function's result is appended as ``\\nObservation: {result}``; a later assistant
  message is appended to the same assistant turn after "\\n"; a plain assistant message (functions given)
  becomes ``Thought: I now know the final answer.\\nFinal Answer: {content}``.
- A turn's first assistant message and each whole history reply lose leading newlines and trailing
  whitespace (as the official strips them: no space after an empty "Action Input:" or "Final Answer:").
- When the conversation ends with a function result, the open assistant turn gets ``\\nThought:`` and the
  model continues it (a text completion, not a new turn); one ending with an assistant message is continued
  too.
- A reply is a call when it has ``\\nAction:`` followed by ``\\nAction Input:``; generation stops at
  "Observation:".

Accepted message forms: OpenAI's (`tool_calls` on assistant messages, `tool` role messages answering them,
matched by `tool_call_id` or else in order) and the official format's (`function_call` on assistant
messages, `function` role messages). Tool definitions: OpenAI `tools` ([{"type": "function", "function":
{...}}]) or the legacy `functions` list; both end up as function dicts with `name`, `description`,
`parameters` (and the official `name_for_model` / `name_for_human` / `description_for_model`).

For training, an assistant turn is a list of (text, trained) segments: the model's own Thought/Action/
Action Input/Final Answer text and the "\\nObservation:" that ends a call are trained; the observation text
and the "\\nThought:" the server writes after it are not. A training conversation may end with one call and no
result (OpenAI's fine-tuning examples do): its turn ends after that "\\nObservation:" (and its <|im_end|>, trained
as every reply's is, though the server stops generating at "Observation:"). Imports nothing heavy (used by data
workers; `prompt_ids` imports make_context when called).
"""

from __future__ import annotations

import json
import sys
from collections import deque
from dataclasses import dataclass, field

from .errors import json_reason, lone_surrogate, quoted

DEFAULT_SYSTEM = "You are a helpful assistant."

TOOL_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API."
    " What is the {name_for_human} API useful for? {description_for_model} Parameters: {parameters}"
)

REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""

# Generation stops here: the model would otherwise invent the observation.
OBSERVATION_STOP = "Observation:"
FINAL_THOUGHT = "Thought: I now know the final answer.\nFinal Answer: "
QUOTED = 60  # the most characters of a record's or request's value that an error message quotes


class ReactError(ValueError):
    """An invalid message list or function definition; `field` names where (e.g. "messages[2].tool_calls")."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _clean(text: str) -> str:
    return text.lstrip("\n").rstrip()


# -- function definitions -----------------------------------------------------------------------------


def _given(value) -> bool:
    """Whether a record's or request's `functions` / `tools` value names any: null, [] and "" (LLaMA-Factory writes
    an empty `tools` column so) are none; anything else, 0 or {} too, is read and checked (a wrong type is an error,
    not none)."""
    return not (value is None or (isinstance(value, (list, str)) and not value))


def functions_from(functions=None, tools=None, where_functions="functions", where_tools="tools") -> list[dict]:
    """The function dicts of a legacy `functions` list or an OpenAI `tools` list (not both)."""
    functions = functions if _given(functions) else None
    tools = tools if _given(tools) else None
    if functions is not None and tools is not None:
        raise ReactError("give either 'functions' or 'tools', not both", where_tools)
    out, places = [], []  # each function and where it was given
    plain_ok = False
    if isinstance(tools, str):  # LLaMA-Factory's ShareGPT form: the tool list as JSON text of function dicts
        tools = _loads(tools, where_tools, "a string that is not JSON ({why})")
        plain_ok = True
    if tools is not None:
        if not isinstance(tools, list):
            raise ReactError(f"must be a list, got {json_type(tools)}", where_tools)
        for i, t in enumerate(tools):
            where = f"{where_tools}[{i}]"
            if plain_ok and isinstance(t, dict) and "function" not in t:
                function, place = t, where
            elif not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(
                    t.get("function"), dict):
                raise ReactError("must be {\"type\": \"function\", \"function\": {...}}", where)
            else:
                function, place = t["function"], f"{where}.function"
            out.append(_check_function(function, place))
            places.append(place)
    elif functions is not None:
        if not isinstance(functions, list):
            raise ReactError(f"must be a list, got {json_type(functions)}", where_functions)
        places = [f"{where_functions}[{i}]" for i in range(len(functions))]
        out = [_check_function(f, where) for f, where in zip(functions, places)]
    names: dict = {}
    for i, (f, where) in enumerate(zip(out, places)):  # (both went into the prompt: which did a call mean?)
        if (name := f.get("name")) in names:
            raise ReactError(f"function name {quoted(name, QUOTED)} is given twice (first at index {names[name]})",
                             f"{where}.name")
        names[name] = i
    return out


class _NotJSON(ValueError):
    """NaN, Infinity or -Infinity: Python's json reads them, JSON (and a tool's JSON parser) does not; or a key
    twice in one object, which json.loads resolves silently (the last one wins), as the data files' reader refuses."""


def _no_constant(name: str):
    raise _NotJSON(f"{name} is not a JSON value")


def _no_duplicates(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _NotJSON(f"key {quoted(key, QUOTED)} appears twice in one object (a JSON reader keeps only one of the "
                       "two values)")
    return obj


def _loads(text: str, where: str, error: str):
    """json.loads(text), or a ReactError at `where`: `error` with {why} the reason, a syntax error's or one json
    raises otherwise (RecursionError for nesting too deep, ValueError for an integer too long to convert); NaN and
    Infinity, which only Python's json reads, are refused too."""
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        why = f"{json_reason(e)} at character {e.pos + 1}"
    except _NotJSON as e:
        why = str(e)
    except RecursionError:
        why = "nested too deeply"
    except ValueError as e:  # an integer longer than int() converts (sys.get_int_max_str_digits)
        why = f"a number too long to read ({str(e).split(';')[0]})"
    raise ReactError(error.format(why=why), where)


def _check_function(f, where: str) -> dict:
    """A function definition the ReAct prompt can hold (the server's requests and the training data alike)."""
    if not isinstance(f, dict):
        raise ReactError("must be an object", where)
    name_key = "name_for_model" if "name_for_model" in f else "name"
    name = f.get(name_key)
    if not isinstance(name, str) or not name.strip():
        raise ReactError("needs a non-empty 'name'", f"{where}.name")
    _check_action_name(name, f"{where}.{name_key}")
    for key in ("description", "description_for_model", "name_for_human", "name_for_model"):
        if f.get(key) is not None and not isinstance(f[key], str):
            raise ReactError(f"must be a string, got {json_type(f[key])}", f"{where}.{key}")
        _valid_text(f.get(key) or "", f"{where}.{key}")
    # a JSON Schema object (OpenAI's form), or a list of parameter objects: Qwen's own plugin form, which the official
    # function-calling examples send ([{"name", "description", "required", "schema"}, ...]); both go into the prompt
    # as JSON, as the official openai_api.py writes any value
    params = f.get("parameters")
    if params is not None and not isinstance(params, (dict, list)):
        raise ReactError(f"must be a JSON Schema object or a list of parameters, got {json_type(params)}",
                         f"{where}.parameters")
    for k, p in enumerate(params if isinstance(params, list) else []):
        if not isinstance(p, dict):
            raise ReactError(f"a list of parameters holds parameter objects, got {json_type(p)}",
                             f"{where}.parameters[{k}]")
    try:  # written into the prompt as JSON: Python's NaN / Infinity (which its json reads in a file) would not be
        written = json.dumps(f.get("parameters"), allow_nan=False, ensure_ascii=False)
    except ValueError:
        raise ReactError("holds NaN or Infinity, which is not a JSON value", f"{where}.parameters") from None
    _valid_text(written, f"{where}.parameters")
    return f


def _check_action_name(name: str, where: str) -> None:
    """A function's name as "Action: {name}" writes it, one line of the prompt (a definition's, a past call's): valid
    Unicode, printable, no line break, which could never be parsed back and would forge the lines after it."""
    _valid_text(name, where)
    if not name.isprintable():
        raise ReactError("must be one line of printable characters", where)


def _valid_text(text: str, where: str) -> None:
    """A text written into the prompt must be valid Unicode: a lone surrogate (a broken "\\ud800" escape, which JSON
    lets through) would be encoded as U+FFFD, a prompt about text the client did not send."""
    if (why := lone_surrogate(text)) is not None:
        raise ReactError(why, where)


def json_type(value) -> str:
    """A decoded JSON value's type as JSON names it."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def listed(names: list[str], most: int = 8) -> str:
    shown = ", ".join(n if len(n) <= 60 else n[:57] + "..." for n in names[:most])
    return shown + (f", ... ({len(names)} in all)" if len(names) > most else "")


def function_names(functions: list[dict]) -> list[str]:
    return [f.get("name_for_model", f.get("name", "")) for f in functions]


def react_instruction(functions: list[dict]) -> str:
    """The ReAct instruction listing the functions (empty without functions)."""
    if not functions:
        return ""
    tools_text, names = [], []
    for f in functions:
        name = f.get("name", "")
        name_m = f.get("name_for_model", name)
        desc = f.get("description", "")
        tools_text.append(TOOL_DESC.format(
            name_for_model=name_m, name_for_human=f.get("name_for_human", name),
            description_for_model=f.get("description_for_model", desc),
            parameters=json.dumps(f.get("parameters", {}), ensure_ascii=False)))
        names.append(name_m)
    return _clean(REACT_INSTRUCTION.format(tools_text="\n\n".join(tools_text), tools_name_text=", ".join(names)))


# -- messages -----------------------------------------------------------------------------------------


@dataclass
class Message:
    """One message in the official openai_api.py form: role system/user/assistant/function."""

    role: str
    content: str
    function_call: dict | None = None  # {"name": str, "arguments": str} on assistant messages
    where: str = ""  # where the message's content is in the request / record, for errors (canonical_messages)
    call_where: str = ""  # and its function_call


def content_text(content, where: str, refusal: bool = False) -> str:
    """Message content: a string, None (empty), or OpenAI's list of text parts (``refusal``: an assistant
    message's, where OpenAI also puts {"type": "refusal", "refusal": ...} parts: what the assistant said)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, p in enumerate(content):
            kind = p.get("type") if isinstance(p, dict) else None
            key = kind if kind == "text" or (refusal and kind == "refusal") else None
            if key is None or not isinstance(p.get(key), str):
                raise ReactError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                                 f"{where}[{i}]")
            parts.append(p[key])
        return "".join(parts)
    raise ReactError(f"must be a string, got {json_type(content)}", where)


def _call(call, where: str) -> dict:
    """{"name", "arguments"} of a function_call / a tool call's "function" (arguments as a string)."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"].strip():
        raise ReactError("needs a 'name' string", where)
    _check_action_name(call["name"], f"{where}.name")
    args = call.get("arguments")
    if args is None:  # null: no arguments (json.dumps would write "null" into "Action Input:")
        args = ""
    elif not isinstance(args, str):  # (NaN / Infinity in it: _check_training_messages names the value)
        args = json.dumps(args, ensure_ascii=False)
    _valid_text(args, f"{where}.arguments")
    return {"name": call["name"], "arguments": args}


# ShareGPT's human/gpt; OpenAI's "developer" is its newer clients' name for the system message
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "observation": "function", "developer": "system"}


def _either(m: dict, key: str, synonym: str):
    """m[key], else m[synonym]: a null counts as absent, as the data reader counts it (a `datasets` dir that mixes
    role/content and from/value turns has all four keys, two of them null in each turn)."""
    v = m.get(key)
    return m.get(synonym) if v is None else v


def canonical_messages(messages, where: str = "messages", open_call: bool = False) -> list[Message]:
    """OpenAI or official-format message dicts (role/content or from/value) -> Messages in the official
    form: OpenAI tool calls become one assistant message per call, each followed by its `tool` result.
    ``open_call`` (training data): the last message may be an assistant's one tool call without its result, as
    OpenAI's fine-tuning examples end (the model learns to make the call); a request has none (as the official)."""
    if not isinstance(messages, list) or not messages:
        raise ReactError("must be a non-empty list", where)
    out: list[Message] = []
    results: dict[int, Message] = {}  # index in out of an answered call -> its result, which follows it
    pending = _PendingCalls()
    legacy_call = False  # the message before is a function_call (not OpenAI tool_calls) awaiting its result
    for i, m in enumerate(messages):
        w = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise ReactError("must be an object", w)
        role = _either(m, "role", "from")
        if not isinstance(role, str):
            raise ReactError("needs a 'role'", f"{w}.role")
        role = ROLE_ALIASES.get(role.lower(), role.lower())
        # calls on another known role were read nowhere (dropped unseen); an unknown role, perhaps the assistant's
        # under another name, is said as such below
        if role in ("system", "user", "tool", "function", "function_call"):
            if m.get("tool_calls"):
                raise ReactError("only assistant messages carry tool_calls", f"{w}.tool_calls")
            if m.get("function_call") is not None:
                raise ReactError("only assistant messages carry a function_call", f"{w}.function_call")
        raw_content = _either(m, "content", "value")
        if raw_content is None and role in ("system", "user", "tool", "function"):  # (answered an empty prompt)
            raise ReactError(f"a {role} message needs its 'content'", f"{w}.content")
        if role == "assistant" and raw_content is None and isinstance(m.get("refusal"), str):
            # OpenAI's refusal: the assistant's answer, sent back in the history with content null (it was dropped,
            # and the model saw an empty reply)
            raw_content, key = m["refusal"], "refusal"
        else:
            key = "content"
        content = content_text(raw_content, f"{w}.{key}", refusal=role == "assistant")
        if (why := lone_surrogate(content)) is not None:  # (a request answered about text it did not send)
            raise ReactError(why, f"{w}.{key}")
        if role == "tool" and legacy_call:
            role = "function"  # a `tool` turn answering a function_call turn (ShareGPT files mix the two forms)
        legacy_call = False
        if role == "tool":
            if not pending:
                raise ReactError("a tool message must answer a tool call of the assistant message before it",
                                 f"{w}.role")
            call_id = m.get("tool_call_id")
            at = pending.take(call_id)
            if at is None:
                raise ReactError(f"tool_call_id {quoted(call_id, QUOTED)} matches no open tool call",
                                 f"{w}.tool_call_id")
            # the result goes right after its call (a later call waits until this one is answered)
            results[at] = Message("function", content, where=f"{w}.content")
            continue
        if pending:
            raise ReactError(f"tool call {quoted(pending.first_id(), QUOTED)} has no tool message answering it",
                             f"{w}.role")
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise ReactError("must be a list", f"{w}.tool_calls")
            for j, c in enumerate(calls):
                cw = f"{w}.tool_calls[{j}]"
                if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
                    raise ReactError("needs a 'function' object", cw)
                out.append(Message("assistant", content if j == 0 else "", _call(c["function"], f"{cw}.function"),
                                   f"{w}.content", f"{cw}.function"))
                pending.add(c.get("id"), len(out) - 1)
            continue
        if role == "function_call":  # LLaMA-Factory's ShareGPT form: the assistant's call as JSON text
            key = f"{w}.{'content' if m.get('content') is not None else 'value'}"  # (the one it was sent under)
            out.append(Message("assistant", "", _json_call(raw_content, key), key, key))
            legacy_call = True
            continue
        if role not in ("system", "user", "assistant", "function"):
            raise ReactError(f"unknown role {quoted(role, QUOTED)} (accepted: system or developer, user, assistant, "
                             "tool, function)", f"{w}.role")
        fc = m.get("function_call")
        out.append(Message(role, content, _call(fc, f"{w}.function_call") if fc is not None else None,
                           f"{w}.content", f"{w}.function_call"))
        legacy_call = fc is not None
    if pending and not (open_call and pending.open_count() == 1):
        if open_call:  # (ReAct writes a call's result before the next call: two open ones have no layout)
            raise ReactError(f"ends with {pending.open_count()} tool calls without results; a conversation may end "
                             "with one call (the model learns to make it), not several",
                             f"{where}[{len(messages) - 1}]")
        raise ReactError(f"tool call {quoted(pending.first_id(), QUOTED)} has no tool message answering it", where)
    if not results:
        return out
    return [x for j, msg in enumerate(out) for x in ((msg, results[j]) if j in results else (msg,))]


class _PendingCalls:
    """The tool calls awaiting their `tool` messages, in order, matched in constant time (a request with
    thousands of calls was quadratic: lists rebuilt and indices shifted for every result)."""

    def __init__(self):
        self._calls: list[list] = []  # [tool_call_id, index in out, still open]
        self._head = 0  # no open call before this
        self._by_id: dict = {}  # id key -> positions in _calls of the open calls with that id, in order
        self._named = 0  # open calls that have an id

    @staticmethod
    def _key(call_id):
        try:
            hash(call_id)
            return call_id
        except TypeError:  # an id that is JSON array or object (compared by its JSON text)
            return ("json", json.dumps(call_id, sort_keys=True, default=repr))

    def add(self, call_id, at: int) -> None:
        self._calls.append([call_id, at, True])
        if call_id is not None:
            self._by_id.setdefault(self._key(call_id), deque()).append(len(self._calls) - 1)
            self._named += 1

    def __bool__(self) -> bool:
        self._skip()
        return self._head < len(self._calls)

    def _skip(self) -> None:
        while self._head < len(self._calls) and not self._calls[self._head][2]:
            self._head += 1

    def open_count(self) -> int:
        return sum(1 for c in self._calls[self._head:] if c[2])

    def first_id(self):
        self._skip()
        return self._calls[self._head][0]

    def take(self, call_id) -> int | None:
        """Close the call a result with `call_id` answers (the first open one with that id; without an id, or
        with an id while no open call has one, the first open one) -> its index in out, or None for no match."""
        positions = self._by_id.get(self._key(call_id)) if call_id is not None else None
        if positions:
            k = positions[0]
        elif call_id is not None and self._named:
            return None
        else:
            self._skip()
            k = self._head
        entry = self._calls[k]
        entry[2] = False
        if entry[0] is not None:
            self._by_id[self._key(entry[0])].popleft()  # (k is the first open call with its id)
            self._named -= 1
        return entry[1]


def _json_call(value, where: str) -> dict:
    """A `function_call` turn's value: JSON text of {"name", "arguments"} (or a list holding one such call)."""
    call = value
    if isinstance(value, str):
        call = _loads(value, where, 'must be JSON text of {{"name": ..., "arguments": ...}} ({why})')
    if isinstance(call, list):
        if len(call) != 1:
            raise ReactError(f"holds {len(call)} calls; one function_call turn takes one call (parallel calls: "
                             "an assistant message with OpenAI 'tool_calls' and a 'tool' message each)", where)
        call = call[0]
    return _call(call, where)


def has_function_calls(messages: list[Message]) -> bool:
    return any(m.role == "function" or m.function_call for m in messages)


# -- the turns -----------------------------------------------------------------------------------------


@dataclass
class Turns:
    """A conversation laid out for ChatML: `system`, user/assistant `pairs`, then either a new user `query`
    or (`query` None) a last pair whose assistant text the model continues (after a function result); either way
    the reply may be started with `reply_start`, which the model continues.

    Assistant texts are lists of (text, trained) segments; `text(segments)` joins them. `continues_assistant`:
    the open last turn is the client's own assistant message (a prefix the reply continues), not the
    "\\nThought:" written after a function result."""

    system: str
    pairs: list[tuple[str, list[tuple[str, bool]]]] = field(default_factory=list)
    query: str | None = None
    continues_assistant: bool = False
    # the text the reply is started with for the model (`call_start`: a call the request forces), part of the prompt
    reply_start: str = ""
    forced_call: str | None = None  # the function that start calls (None: the model names one)

    @staticmethod
    def text(segments) -> str:
        return "".join(t for t, _ in segments)

    def history(self) -> list[tuple[str, str]]:
        """(user, assistant) pairs as model.chat's history takes them."""
        return [(u, self.text(a)) for u, a in self.pairs]


def _assistant_segments(m: Message, functions: list[dict], after_observation: bool) -> list[tuple[str, bool]]:
    """One assistant message as trained/untrained segments (joined: the official layout's text)."""
    content = _clean(m.content)
    if m.function_call is None:
        text = FINAL_THOUGHT + content if functions else content
    else:
        if not content.startswith("Thought:"):
            content = f"Thought: {content}"
        text = f"{content}\nAction: {m.function_call['name']}\nAction Input: {m.function_call['arguments']}"
    if not after_observation:  # the official strips a turn's first message (empty arguments or answer leave
        return [(_clean(text), True)]  # no trailing space); later ones are appended as they are
    if text.startswith("Thought:"):  # the server writes "\nThought:" after an observation; the model goes on
        return [("\nThought:", False), (text[len("Thought:"):], True)]
    return [("\n", False), (text, True)]


def build_turns(messages, functions: list[dict] | None = None, default_system: str = DEFAULT_SYSTEM,
                where: str = "messages", open_call: bool = False) -> Turns:
    """Messages (any accepted form) + function dicts -> Turns, as the official parse_messages lays them out.
    ``open_call`` (training data): a last assistant message that calls a function without its result ends its turn
    with "\nObservation:", trained (where the server stops the call's generation).

    Raises ReactError naming the message when the order is not user, assistant (+ function results), ...
    """
    functions = functions or []
    msgs = messages if messages and isinstance(messages[0], Message) else canonical_messages(messages, where)
    system = default_system
    start = 0
    if msgs and msgs[0].role == "system":
        system = _clean(msgs[0].content)
        start = 1
    if not any(m.role == "user" for m in msgs):
        raise ReactError("expecting at least one user message", where)
    instruction = react_instruction(functions)

    # user texts and assistant segment lists, in order
    rows: list[list] = []  # [role, text or segments]
    for i in range(start, len(msgs)):
        m, w = msgs[i], f"{where}[{i}]"
        if m.role == "system":
            raise ReactError("only the first message may be a system message", f"{w}.role")
        if m.role == "user":
            if rows and rows[-1][0] == "user":
                raise ReactError("two user messages in a row (expecting an assistant message between them)",
                                 f"{w}.role")
            rows.append(["user", _clean(m.content)])
        elif m.role == "assistant":
            if not rows:
                raise ReactError("expecting a user message before the first assistant message", f"{w}.role")
            if rows[-1][0] == "user":
                rows.append(["assistant", _assistant_segments(m, functions, False)])
            else:  # continues the assistant turn after a function result
                rows[-1][1] += _assistant_segments(m, functions, True)
        elif m.role == "function":
            if not rows or rows[-1][0] != "assistant" or msgs[i - 1].function_call is None:
                raise ReactError("a function result must follow the assistant message that called it",
                                 f"{w}.role")
            rows[-1][1] += [("\nObservation:", True), (f" {_clean(m.content)}", False)]

    query = None
    if rows[-1][0] == "user":
        query = rows.pop()[1]
    elif msgs[-1].role == "function":
        rows[-1][1].append(("\nThought:", False))  # the model continues the open turn
    elif msgs[-1].function_call is not None:
        if not open_call:
            raise ReactError("the last function call has no function result after it", f"{where}[{len(msgs) - 1}]")
        rows[-1][1].append(("\nObservation:", True))
    pairs = []
    for k in range(0, len(rows), 2):  # the official strips each history reply again, as a whole
        pairs.append((rows[k][1], _strip_segments(rows[k + 1][1])))
    if instruction:
        if pairs:  # as the official parse_messages: the last history pair's user message
            u, a = pairs[-1]
            pairs[-1] = (f"{instruction}\n\nQuestion: {u}", a)
        else:
            query = f"{instruction}\n\nQuestion: {query}"
    return Turns(system, pairs, query, continues_assistant=query is None and msgs[-1].role == "assistant")


def prompt_ids(tokenizer, turns: Turns, max_window_size: int = 6144, stats: dict | None = None) -> list[int]:
    """The prompt ids of `turns` as the server builds them: make_context (every text encoded as plain text, so
    no message can forge a control token; the oldest user/assistant pairs left out where the history is over
    max_window_size, as model.chat leaves them out); an open last turn (query None) is continued as the official
    text completion continues it, with the whole history (that path of the official openai_api.py,
    text_complete_last_message, leaves nothing out). ``stats``, if given, gets "history_left_out": how many pairs
    were left out."""
    from .modeling import make_context

    made: dict = {}
    if turns.query is not None:
        history = turns.history()
        _, ids = make_context(tokenizer, turns.query, history=history, system=turns.system,
                              max_window_size=max_window_size, stats=made)
        if turns.reply_start:  # (a reply is encoded on its own after "assistant\n", as make_context and training do)
            ids = ids + tokenizer.encode(turns.reply_start)
    else:
        # the last assistant turn is open (after a function result, or the client's own assistant message):
        # the model continues it. The official text completion strips every user text here, so an empty
        # question under the ReAct instruction ends "Question:" (make_context's query path keeps "Question: ")
        history = [(u.lstrip("\n").rstrip(), a) for u, a in turns.history()]
        user, assistant = history.pop()
        _, ids = make_context(tokenizer, user, history=history, system=turns.system,
                              max_window_size=sys.maxsize, stats=made)
        ids = ids + tokenizer.encode(assistant + turns.reply_start)  # (one text, as the turn was trained)
    if stats is not None:
        stats["history_left_out"] = len(history) - made["history_kept"]
    return ids


def _strip_segments(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Segments whose joined text is `_clean`ed: no leading newlines (an empty first message's "\\n" joiner
    goes), no trailing whitespace (an empty last result's " " goes)."""
    out = list(segments)
    while out and not out[-1][0].rstrip():
        out.pop()
    if out:
        out[-1] = (out[-1][0].rstrip(), out[-1][1])
    while out and not out[0][0].lstrip("\n"):
        out.pop(0)
    if out:
        out[0] = (out[0][0].lstrip("\n"), out[0][1])
    return out


# -- replies ---------------------------------------------------------------------------------------------


def parse_reply(text: str, after_result: bool = False) -> tuple[str, dict | None]:
    """A generated ReAct reply -> (content, call or None), as the official parse_response.

    A call: content is the Thought text before "\\nAction:", call {"name", "arguments"}. Otherwise the
    content is what follows the last "\\nFinal Answer: " (the whole text when there is none).
    ``after_result``: the text continues the open turn after a tool result's "\\nThought:", stripped of its leading
    whitespace as the server strips replies. A call there without a thought (trained as " \\nAction: ...", the
    layout of an assistant message with a call and no content) then starts with "Action:"; the official server,
    whose text completion does not strip the continuation, finds its "\\nAction:" and parses the call."""
    found = "\n" + text if after_result and text.startswith("Action:") else text  # (searched for the call only)
    i = found.find("\nAction:")
    j = found.find("\nAction Input:")
    k = found.find("\nObservation:")
    if 0 <= i < j:
        if k < 0:  # generation stopped at "Observation:", which is cut off: the arguments run to the end
            k = len(found)  # (the official appends it to the text, which then shows in a reply that is no call)
        name = found[i + len("\nAction:"):j].strip()
        args = found[j + len("\nAction Input:"):k].strip()
        if name:
            thought = found[:i]
            t = thought.find("Thought: ")
            if t >= 0:
                thought = thought[t + len("Thought: "):]
            return thought.strip(), {"name": name, "arguments": args}
    z = text.rfind("\nFinal Answer: ")
    if z >= 0:
        text = text[z + len("\nFinal Answer: "):]
    return text, None


def call_start(name: str | None, after_result: bool) -> str:
    """The start of a reply that must call a function: `name`, or (None) one the model names. It is the layout
    trained for a call without a thought (an assistant message with a call and no content): a new turn's reply is
    "Thought: \\nAction: {name}\\nAction Input: {arguments}", after a tool result the open turn's "\\nThought:"
    goes on with " \\nAction: {name}\\nAction Input: {arguments}". The start ends before the space that begins
    the name or the arguments, where the tokenizer splits the trained text too, so the model writes the tokens it
    learnt to write there (all but a call with no arguments, trained as "Action Input:\\nObservation:", whose ":\\n"
    is one token)."""
    start = " \nAction:" if after_result else "Thought: \nAction:"
    return start if name is None else f"{start} {name}\nAction Input:"


def stop_words(stop: list[str] | None, functions: list[dict] | None) -> list[str]:
    """The request's stop strings, each also without leading newlines (as the official server adds them),
    plus "Observation:" when functions are given."""
    words = list(stop or [])
    for s in list(words):
        t = s.lstrip("\n")
        if t and t not in words:
            words.append(t)
    if functions and OBSERVATION_STOP not in words:
        words.append(OBSERVATION_STOP)
    return words


# -- training records ------------------------------------------------------------------------------------

_CALL_ROLES = {"function", "tool", "observation", "function_call"}


def is_tool_record(record: dict) -> bool:
    """A training record with functions, function calls or their results (rendered in the ReAct layout)."""
    if _given(record.get("functions")) or _given(record.get("tools")):
        return True
    turns = record_turns(record)
    if not isinstance(turns, list):
        return False
    return any(isinstance(t, dict) and (str(_either(t, "role", "from")).lower() in _CALL_ROLES
                                        or t.get("function_call") or t.get("tool_calls")) for t in turns)


def record_turns(record: dict):
    """A record's `conversations`, else its `messages` (a null counts as absent: a `datasets` dir that mixes the
    forms has both columns, one of them null in each row)."""
    turns = record.get("conversations")
    return record.get("messages") if turns is None else turns


def render_tool_record(record: dict) -> dict:
    """A tool/function-call training record -> the data pipeline's normalised form, each assistant message
    carrying `segments` ([text, trained] pairs: labels on the model's own text, none on observations), and
    "react": True (the turns are in this layout: a reply ends at "Observation:"; a plain record's own segments
    look alike).

    Raises ReactError (field names the turn) for a conversation the layout cannot hold."""
    key = "conversations" if record.get("conversations") is not None else "messages"
    turns = record.get(key)
    functions = functions_from(record.get("functions"), record.get("tools"))
    msgs = canonical_messages(turns, key, open_call=True)
    top_system = record.get("system")
    if top_system is not None:
        if msgs[0].role == "system":
            raise ReactError("the record has both a top-level 'system' and a system turn", f"{key}[0]")
        if not isinstance(top_system, str):
            raise ReactError("must be a string", "system")
    t = build_turns(msgs, functions, DEFAULT_SYSTEM if top_system is None else top_system, where=key, open_call=True)
    if msgs[-1].role == "function":
        raise ReactError("ends with a function result: the assistant's reply after it is missing",
                         f"{key}[{len(turns) - 1}]")
    _check_training_messages(msgs, functions)
    messages = []
    for user, segments in t.pairs:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": Turns.text(segments),
                         "segments": [[s, trained] for s, trained in segments if s]})
    if t.query is not None:
        messages.append({"role": "user", "content": t.query})
    rid = record.get("id")
    return {"id": None if rid is None else str(rid), "system": t.system, "messages": messages, "react": True}



def _check_training_messages(msgs: list[Message], functions: list[dict]) -> None:
    """What the model would learn wrong from a tool conversation that the layout itself can hold: an empty
    question or answer (plain records refuse those too), arguments that are not JSON, a call of a function the
    record does not define (the server prompts with the definitions, so the call would be learnt without them)."""
    names = function_names(functions)
    for m in msgs:
        if m.role == "user" and not m.content.strip():
            raise ReactError("a user message must not be empty", m.where)
        if m.role != "assistant":
            continue
        call = m.function_call
        if call is None:
            if not m.content.strip():
                raise ReactError("an assistant message without a call must not be empty", m.where)
            continue
        if not names:
            raise ReactError(f"calls {quoted(call['name'], QUOTED)}, but the record defines no functions: list them "
                             "in 'tools' (or 'functions'), as the server's prompt does", f"{m.call_where}.name")
        if call["name"] not in names:
            raise ReactError(f"calls {quoted(call['name'], QUOTED)}, which the record does not define (defined: "
                             f"{listed(names)})", f"{m.call_where}.name")
        if call["arguments"].strip():
            args = _loads(call["arguments"], f"{m.call_where}.arguments",
                          "not JSON ({why}): the model would learn to write calls no tool can read")
            if not isinstance(args, dict):  # a function's parameters are an object (OpenAI's arguments too)
                raise ReactError(f"must be a JSON object of the function's parameters, got {json_type(args)}",
                                 f"{m.call_where}.arguments")


def check_segments(segments, content: str, where: str) -> list[list]:
    """A normalised assistant message's `segments`: [text, trained] pairs whose texts join to `content`."""
    if not isinstance(segments, list) or not all(
            isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], bool)
            for x in segments):
        raise ReactError("must be a list of [text, trained] pairs", where)
    if "".join(x[0] for x in segments) != content:
        raise ReactError("the segments' texts do not join to the message content", where)
    return [[x[0], x[1]] for x in segments]


__all__ = [
    "FINAL_THOUGHT", "Message", "OBSERVATION_STOP", "REACT_INSTRUCTION", "ReactError", "TOOL_DESC", "Turns",
    "build_turns", "call_start", "canonical_messages", "check_segments", "function_names", "functions_from",
    "has_function_calls", "is_tool_record", "json_type", "listed", "parse_reply", "prompt_ids", "react_instruction",
    "record_turns", "render_tool_record", "stop_words",
]
