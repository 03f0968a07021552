"""POST /v1/responses: OpenAI's Responses API (`client.responses.create`, the Agents SDK, the AI SDK's openai(model),
LangChain's use_responses_api), answered by the chat route's engine path.

The request is read into a chat completions request (`ResponsesRequest.chat_request`) that Server.start runs as the
chat route runs it: the same prompt (make_context, Qwen's ReAct layout with tools), sampling defaults (the model dir's
generation config; temperature 0 is greedy) and rows, so a response answers what the same chat request answers.
- `input`: a string (one user message) or a list of items: messages (roles user, assistant, system, developer = system;
  content a string or text parts), `function_call` items (an assistant message's tool calls: after an assistant
  message they join it, its text their thought) and `function_call_output` items (their tool results).
  `instructions` and the system/developer messages that open `input` are the one system message Qwen's prompt has
  (joined by a blank line); a later one is a 400, as on the chat route. A last assistant message is continued, as
  on the chat route.
- tools (function tools), tool_choice, text.format (JSON held token by token), max_output_tokens, temperature, top_p,
  top_logprobs with include ["message.output_text.logprobs"], and vLLM's sampling fields (top_k, seed, stop,
  repetition_penalty, ...) act as the chat route's tools, tool_choice, response_format, max_completion_tokens, ...
- A reply that calls a tool is a `function_call` item (after a message item holding its thought, when the model wrote
  one), status "completed"; one cut by max_output_tokens is status "incomplete" (reason max_output_tokens).
- Stored responses (response_store.py, in this process's memory): a finished response is kept unless the request
  says `store: false` (OpenAI's default is to store), for GET /v1/responses/{id}, GET .../input_items, DELETE, and
  a later request's `previous_response_id`, which continues it: that response's input items (those of the
  responses it continued first) and its output come before the new `input`, as OpenAI chains them; its
  `instructions` and tools are not carried over (OpenAI's rule: send them again). A stream whose client left is
  not stored. `background: true` answers at once with the response "in_progress" (stored, so GET polls it) and
  makes it without the connection; POST .../cancel stops it ("cancelled", with what it had written). A background
  response cannot be streamed here (a 400: poll GET). `conversation` (OpenAI's Conversations API) and stored
  prompts (`prompt`) are 400s.
  `truncation` "auto" is a 400 too (the history is cut only as model.chat cuts it, past the model's
  max_window_size). `metadata`, `user` and OpenAI's other bookkeeping fields are accepted and not acted on; other
  unknown fields follow protocol.py's policy.
- Errors are the chat route's, naming the Responses field (`_Names`: "messages[2].content" is "input[1].content").

A stream is OpenAI's server-sent events (`event: <type>`, data with its type and sequence_number): response.created,
response.in_progress, then each output item's events, then response.completed (response.incomplete when
max_output_tokens cut the reply). A text reply's deltas go out as they come. With tools a reply can only be told
apart (a call or an answer) once it is complete, so it is generated whole and its items' events go out then, as the
chat route sends such a reply as one delta. An error after the stream started (the engine failed, the server stops,
a "required" call the model did not write) is an `error` event, then response.failed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
import uuid
from typing import Annotated, Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, StrictBool

from ..errors import lone_surrogate, quoted
from .protocol import (ECHO_CHARS, MAX_BODY_BYTES, APIError, ChatCompletionRequest, Number, SamplingRequest,
                       validated)
from .response_store import ResponseStore
from .runs import LEFT_OUT_HEADER, ClientGone, Run, request_usage, watched
from .tool_calls import tool_message

LOGPROBS = "message.output_text.logprobs"
# the client's ResponseIncludable: all but LOGPROBS ask for items this server never makes (tool results of built-in
# tools, images, reasoning), so they change nothing
INCLUDABLE = {"file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
              "message.input_image.image_url", "computer_call_output.output.image_url",
              "code_interpreter_call.outputs", "reasoning.encrypted_content", LOGPROBS}
# Chat Completions fields a client may send here by mistake -> the Responses field that does it (ignored, a
# max_tokens would not bound the reply)
CHAT_ONLY = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
             "response_format": "text.format", "functions": "tools", "function_call": "tool_choice",
             "logprobs": f"include [\"{LOGPROBS}\"] (with top_logprobs)", "n": None}
# the SamplingRequest fields that go to the chat request as they are (not these: the Responses API names them
# otherwise, or they concern the chat route's stream)
NOT_SHARED = {"stream", "stream_options", "max_tokens", "n", "response_format"}
# where the items of a continued response are named in errors (they were checked when that response was made)
EARLIER = "previous_response_id"


class ResponsesRequest(SamplingRequest):
    """The body of POST /v1/responses (the shared sampling fields, vLLM's among them, as on the chat route)."""

    input: Any  # a string or a list of items (``chat_request``)
    instructions: str | None = None
    max_output_tokens: Annotated[int | None, Number] = Field(default=None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None  # (a ReAct reply holds one call at most, which both allow)
    text: Any = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}, "verbosity": ...}
    top_logprobs: Annotated[int | None, Number] = Field(default=None, ge=0, le=20)
    include: list[Any] | None = None
    store: StrictBool | None = None
    metadata: Any = None
    user: Any = None
    truncation: Any = None
    previous_response_id: Any = None
    conversation: Any = None
    background: StrictBool | None = None
    reasoning: Any = None
    prompt: Any = None

    def check(self) -> None:
        """Refuse what this server cannot do (a 400 naming the field); the shared fields are the chat request's."""
        extra = self.model_extra or {}
        for name, instead in CHAT_ONLY.items():
            value = getattr(self, name) if name in type(self).model_fields else extra.get(name)
            if value is None or value is False or (name == "n" and value == 1 and not isinstance(value, bool)):
                continue  # (asking for nothing)
            raise APIError(400, f"{name} is a Chat Completions field: the Responses API takes {instead}" if instead
                           else "n is not supported by the Responses API: a response is one reply", name)
        if self.prompt_logprobs is not None:
            raise APIError(400, "prompt_logprobs is not served on the Responses API (a response has no place for "
                           "them): POST /v1/chat/completions returns them for the same messages", "prompt_logprobs")
        if self.conversation is not None:
            raise APIError(400, "conversation (OpenAI's Conversations API) is not supported: continue a stored "
                           "response with previous_response_id, or send the whole conversation in input",
                           "conversation")
        if self.prompt is not None:
            raise APIError(400, "prompt (a prompt template kept by OpenAI) is not supported: send the instructions "
                           "and input themselves", "prompt")
        if self.background and self.store is False:  # (OpenAI's rule: it is fetched later)
            raise APIError(400, "background: true needs store (a background response is fetched later with GET "
                           "/v1/responses/{id})", "background")
        if self.background and self.stream:
            raise APIError(400, "background: true with stream: true is not supported: poll GET /v1/responses/{id} "
                           "for the background response, or stream it without background", "background")
        if self.reasoning is not None and not (isinstance(self.reasoning, dict)
                                               and all(v is None for v in self.reasoning.values())):
            raise APIError(400, "reasoning is not supported: Qwen v1 chat models have no reasoning effort or summary",
                           "reasoning")
        if self.truncation not in (None, "disabled"):
            raise APIError(400, "truncation must be \"disabled\" (input over the model's length is a 400; older "
                           "history is left out only where model.chat leaves it out, past max_window_size)",
                           "truncation")
        for i, name in enumerate(self.include or ()):
            if not isinstance(name, str) or name not in INCLUDABLE:
                raise APIError(400, f"include[{i}] {quoted(name, ECHO_CHARS, length=True)} is not supported (this "
                               f"server's output has only {LOGPROBS!r} to include)", f"include[{i}]")

    def wants_logprobs(self) -> bool:
        return LOGPROBS in (self.include or ())

    def kept_by(self, store: ResponseStore) -> bool:
        """Whether its response is stored once finished."""
        return self.store is not False and store.capacity > 0

    def earlier(self, store: ResponseStore) -> tuple[list[dict], int]:
        """The conversation ``previous_response_id`` continues (none: []) and its JSON bytes, or the 400 OpenAI
        answers when it is not stored."""
        if self.previous_response_id is None:
            return [], 0
        if not isinstance(self.previous_response_id, str) or not self.previous_response_id:
            raise APIError(400, "previous_response_id must be the id of a stored response (a non-empty string)",
                           "previous_response_id")
        stored = store.get(self.previous_response_id)
        if self.previous_response_id in store.running:
            raise APIError(400, f"Previous response with id {quoted(self.previous_response_id, ECHO_CHARS)} is still "
                           "in progress (background): continue it once GET /v1/responses/{id} says it is done",
                           "previous_response_id")
        if stored is None:
            why = ("this server stores no responses (--max-stored-responses 0)" if store.capacity == 0 else
                   "it was not stored (store: false), was deleted, was dropped to make room (this server keeps the "
                   f"{store.capacity:,} most recently used), or the server restarted since")
            shown = quoted(self.previous_response_id, ECHO_CHARS, length=True)
            raise APIError(400, f"Previous response with id {shown} not found: {why}", "previous_response_id",
                           "previous_response_not_found")
        return stored.conversation(), stored.size

    def chat_request(self, earlier: list[dict] = ()) -> tuple[ChatCompletionRequest, "_Names"]:
        """The chat completions request that answers this one after the items ``earlier`` (a continued response's
        conversation), and how its fields are named here."""
        self.check()
        messages, places = self._messages(list(earlier))
        extra = {k: v for k, v in (self.model_extra or {}).items() if k not in CHAT_ONLY}
        fields = {**extra, **{name: getattr(self, name) for name in SamplingRequest.model_fields
                              if name not in NOT_SHARED},
                  "messages": messages, "tools": self._tools(), "tool_choice": self._tool_choice(),
                  "parallel_tool_calls": self.parallel_tool_calls, "max_completion_tokens": self.max_output_tokens,
                  "response_format": self._format(), "logprobs": self.wants_logprobs() or None,
                  "top_logprobs": self.top_logprobs if self.wants_logprobs() else None}
        # (a 400 for an extra field the chat request types, e.g. continue_final_message)
        return validated(ChatCompletionRequest, fields), _Names(places)

    def _messages(self, earlier: list[dict]) -> tuple[list[dict], list[dict]]:
        """``earlier``, ``input`` (and ``instructions``) as chat messages, and where each message's parts are given
        here: for message k, {its field's path in the chat message ("" for the message, ".tool_calls[0]"): its path
        here} (EARLIER for the items of ``earlier``)."""
        one = isinstance(self.input, str)  # (one user message)
        items = [{"role": "user", "content": self.input}] if one else self.input
        if not isinstance(items, list) or not items:
            raise APIError(400, "input must be a string or a non-empty list of items", "input")
        items = earlier + items
        system, system_at = [], None  # the system message's texts, and where the first was given
        if self.instructions is not None:
            system.append(_text(self.instructions, "instructions"))
            system_at = "instructions"
        messages: list[dict] = []
        places: list[dict] = []
        for i, item in enumerate(items):
            mine = i - len(earlier)
            where = EARLIER if mine < 0 else "input" if one else f"input[{mine}]"
            if not isinstance(item, dict):
                raise APIError(400, f"{where} must be an object (a message, function_call or function_call_output)",
                               where)
            kind = item.get("type", "message")
            if kind == "message":
                role = item.get("role")
                if role not in ("user", "assistant", "system", "developer"):
                    shown = quoted(role, ECHO_CHARS, length=True)
                    raise APIError(400, f"{where}.role {shown} is not supported: user, assistant, system or developer "
                                   "(a tool's result is a function_call_output item)", f"{where}.role")
                content = _content(item.get("content"), f"{where}.content", role == "assistant")
                if role in ("system", "developer") and not messages:  # (opening the conversation)
                    system.append(content)
                    system_at = system_at or where
                    continue
                messages.append({"role": "system" if role == "developer" else role, "content": content})
                places.append({"": where})
            elif kind == "function_call":
                call = {"id": _string(item, "call_id", where), "type": "function",
                        "function": {"name": _string(item, "name", where),
                                     "arguments": _string(item, "arguments", where, empty=True)}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":  # (its text is the call's thought)
                    last.setdefault("tool_calls", []).append(call)
                    places[-1][f".tool_calls[{len(last['tool_calls']) - 1}].function"] = where
                    places[-1][f".tool_calls[{len(last['tool_calls']) - 1}]"] = where
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                    places.append({"": where, ".tool_calls[0].function": where, ".tool_calls[0]": where})
            elif kind == "function_call_output":
                messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                                 "content": _content(item.get("output"), f"{where}.output")})
                places.append({"": where, ".content": f"{where}.output", ".tool_call_id": f"{where}.call_id",
                               ".role": where})
            else:
                shown = quoted(kind, ECHO_CHARS, length=True)
                why = " (to continue a stored response, give its id as previous_response_id)" if (
                    kind == "item_reference") else ""
                raise APIError(400, f"{where}.type {shown} is not supported: input items are messages, function_call "
                               f"and function_call_output{why}", f"{where}.type")
        if system:
            messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
            places.insert(0, {"": system_at})
        return messages, places

    def input_items(self) -> list[dict]:
        """This request's ``input`` as a stored response keeps it (and input_items lists it): each item with an id
        and a status, a message's string content as one text part (run after ``chat_request`` checked them)."""
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        out = []
        for item in items:
            kind = item.get("type", "message")
            item = {**item, "type": kind, "status": item.get("status") or "completed"}
            if kind == "message":
                part = "output_text" if item["role"] == "assistant" else "input_text"
                if isinstance(item["content"], str):
                    item["content"] = [{"type": part, "text": item["content"]}]
                if part == "output_text":
                    item["content"] = [dict(c, annotations=c.get("annotations") or []) for c in item["content"]]
            item.setdefault("id", _id({"message": "msg_", "function_call": "fc_"}.get(kind, "fco_")))
            out.append(item)
        return out

    def _tools(self) -> list[dict] | None:
        """Function tools in the chat request's form (the definitions are checked there)."""
        if self.tools is None:
            return None
        out = []
        for i, tool in enumerate(self.tools):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                if not isinstance(tool, dict):
                    raise APIError(400, f"tools[{i}] must be a function tool object", f"tools[{i}]")
                raise APIError(400, f"tools[{i}].type {quoted(kind, ECHO_CHARS, length=True)} is not supported: only "
                               "function tools (the model calls them through Qwen's ReAct prompt; built-in tools "
                               "such as web_search and file_search run on OpenAI's servers)", f"tools[{i}].type")
            out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters",
                                                                             "strict") if k in tool}})
        return out

    def _tool_choice(self):
        """tool_choice in the chat request's form."""
        choice = self.tool_choice
        if choice is None or choice in ("auto", "none", "required"):
            return choice
        if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}
        shown = choice if isinstance(choice, str) else json.dumps(choice, ensure_ascii=False)
        raise APIError(400, f"tool_choice {quoted(shown, ECHO_CHARS, length=True)} is not supported: 'auto' (the model "
                       "decides), 'none', 'required' or {\"type\": \"function\", \"name\": ...}", "tool_choice")

    def text_format(self) -> dict | None:
        """``text.format`` (None: plain text), or a 400 naming the part at fault."""
        if self.text is None:
            return None
        if not isinstance(self.text, dict):
            raise APIError(400, "text must be an object ({\"format\": {\"type\": ...}})", "text")
        if self.text.get("verbosity") not in (None, "medium"):  # (as the chat route's verbosity: OpenAI's default)
            raise APIError(400, "text.verbosity is not supported (only null or \"medium\")", "text.verbosity")
        fmt = self.text.get("format")
        if fmt is None:
            return None
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise APIError(400, "text.format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": "
                           "\"json_schema\", \"name\": ..., \"schema\": {...}}", "text.format")
        if kind == "json_schema" and not isinstance(fmt.get("schema"), (dict, bool)):
            raise APIError(400, "text.format.schema must be the JSON schema the reply is held to (an object)",
                           "text.format.schema")
        return fmt

    def _format(self) -> dict | None:
        """``text.format`` as the chat request's response_format."""
        fmt = self.text_format()
        if fmt is None or fmt["type"] != "json_schema":
            return fmt
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "description", "schema", "strict")
                                                       if k in fmt}}


def _text(value: str, where: str) -> str:
    if (why := lone_surrogate(value)) is not None:  # (the chat route refuses it in a message too)
        raise APIError(400, f"{where}: {why}", where)
    return value


def _content(value, where: str, assistant: bool = False) -> str:
    """A message's content or a tool result's output: a string, or a list of text parts (input_text, output_text; an
    assistant's refusal parts are what it said, as on the chat route)."""
    if isinstance(value, str):
        return _text(value, where)
    if not isinstance(value, list):
        raise APIError(400, f"{where} must be a string or a list of text parts", where)
    texts = []
    for k, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif assistant and kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise APIError(400, f"{where}[{k}]: {kind} parts are not supported: this model reads text only",
                           f"{where}[{k}]")
        else:
            raise APIError(400, f"{where}[{k}]: only text parts ({{\"type\": \"input_text\", \"text\": ...}}) are "
                           "supported", f"{where}[{k}]")
    return _text("".join(texts), where)


def _string(item: dict, key: str, where: str, empty: bool = False) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not (empty or value):
        raise APIError(400, f"{where}.{key} must be a{'' if empty else ' non-empty'} string", f"{where}.{key}")
    return value


# the chat request's fields that have other names here (most specific first); in its error messages, those names
# and the words that say chat messages
FIELDS = [(re.compile(r"tools\[(\d+)\]\.function(?=$|[.\[])"), r"tools[\1]"),
          (re.compile(r"response_format\.json_schema\.schema(?=$|[.\[])"), "text.format.schema"),
          (re.compile(r"response_format(\.json_schema)?(?=$|[.\[])"), "text.format"),
          (re.compile(r"max_completion_tokens(?=$|[.\[])"), "max_output_tokens"),
          (re.compile(r"top_logprobs(?=$|[.\[])"), "top_logprobs"),
          (re.compile(r"logprobs(?=$|[.\[])"), "include"),
          (re.compile(r"messages(?=$)"), "input")]
WORDS = [(re.compile(r"\bmax_completion_tokens\b"), "max_output_tokens"),
         (re.compile(r"\bresponse_format\b"), "text.format"),
         (re.compile(r"\btool_call_id\b"), "call_id")]
PHRASES = [(re.compile(r"\bthe messages have\b"), "the input has"),
           (re.compile(r"\bthe messages\b"), "the input"),
           (re.compile(r"\btool message\b"), "function_call_output item"),
           (re.compile(r"\btool call\b"), "function_call")]


class _Names:
    """The chat request's field names as this request gives them, for its errors: "messages[k]..." by where message
    k came from (``places``), other fields by FIELDS."""

    def __init__(self, places: list[dict]):
        self.places = places

    def param(self, param: str | None) -> str | None:
        if param is None:
            return None
        m = re.match(r"messages\[(\d+)\]", param)
        if m and int(m[1]) < len(self.places):
            rest, table = param[m.end():], self.places[int(m[1])]
            key = max((k for k in table if rest.startswith(k) and rest[len(k):][:1] in ("", ".", "[")), key=len)
            if table[key] in (EARLIER, "input"):  # (a continued response's item, a string input: no parts)
                return table[key]
            return table[key] + rest[len(key):]
        for pattern, name in FIELDS:
            if (new := pattern.match(param)) is not None:
                return new.expand(name) + param[new.end():]
        return param

    def error(self, e: APIError) -> APIError:
        param, message = self.param(e.param), e.message
        for pattern, words in PHRASES:
            message = pattern.sub(words, message)
        if e.param:  # (the field at fault renamed whole, before the names in it are)
            message = message.replace(e.param, "\0")
        for pattern, word in WORDS:
            message = pattern.sub(word, message)
        return APIError(e.status, message.replace("\0", param or ""), param, e.code)


# -- the response --------------------------------------------------------------------------------------------------


def _json_bytes(items: list[dict]) -> int:
    return len(json.dumps(items, ensure_ascii=False).encode("utf-8", "surrogatepass"))


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def _usage(run: Run) -> dict:
    u = request_usage([run])
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["total_tokens"]}


class _Reply:
    """One request's response object as it stands (``body``: what it echoes; ``run``: its row)."""

    def __init__(self, body: ResponsesRequest, chat: ChatCompletionRequest, run: Run, functions: list, gc,
                 store: ResponseStore, context: list[dict], size: int):
        self.body, self.chat, self.run, self.functions = body, chat, run, functions
        self.gc = gc  # the generation config: the sampling a request that sets none gets
        self.id, self.created = _id("resp_"), int(time.time())
        self.output: list[dict] = []
        # context: the items this response answers, earlier ones first (size: their JSON bytes)
        self.store, self.context, self.size = store, context, size
        self.kept = body.kept_by(store)
        self.cancelled = False  # (a background response's cancel)

    def finish(self, status: str, error: dict | None = None) -> dict:
        """The response object at its end, stored unless the request said not to."""
        obj = self.object(status, error)
        if self.kept:
            self.store.put(obj, self.context, self.size + _json_bytes(self.output))
        return obj

    def status(self) -> str:
        return "incomplete" if self.run.finish_reason == "length" else "completed"

    def items(self, text: str) -> list[dict]:
        """The output items of the reply ``text``: a message, or (with tools) a call after its thought's message."""
        run, status = self.run, self.status()
        if self.functions:  # (a "required" reply that calls no given function: a 500, as on the chat route)
            message, _ = tool_message(text, self.functions, self.chat, run, run.finish_reason)
            calls = message.get("tool_calls") or []
            items = [self.message(message["content"] or "", status)] if message["content"] or not calls else []
            return items + [{"type": "function_call", "id": _id("fc_"), "call_id": c["id"],
                             "name": c["function"]["name"], "arguments": c["function"]["arguments"], "status": status}
                            for c in calls]
        return [self.message(text, status, self.logprobs(0))]

    def logprobs(self, start: int) -> list[dict]:
        """The reply's tokens' log-probabilities from token ``start`` (none unless include asks for them)."""
        if not self.body.wants_logprobs():
            return []
        return self.run.logprobs(start, as_ids=bool(self.chat.return_tokens_as_token_ids))

    @staticmethod
    def message(text: str, status: str, logprobs: list | None = None, item_id: str | None = None) -> dict:
        return {"type": "message", "id": item_id or _id("msg_"), "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]}

    def object(self, status: str, error: dict | None = None) -> dict:
        body, gc = self.body, self.gc
        done = status in ("completed", "incomplete", "cancelled")  # (what it generated is counted)
        tools = [{"type": "function", "name": t.get("name"), "description": t.get("description"),
                  "parameters": t.get("parameters"), "strict": t.get("strict")} for t in body.tools or ()]
        choice = body.tool_choice if body.tool_choice is not None else "auto"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": body.model,
            "output": self.output, "parallel_tool_calls": body.parallel_tool_calls is not False,
            # what the reply was sampled with (the request's, else the generation config's)
            "temperature": body.temperature if body.temperature is not None else gc.temperature if gc.do_sample
            else 0.0,
            "top_p": body.top_p if body.top_p is not None else gc.top_p,
            "tool_choice": choice, "tools": tools, "top_logprobs": body.top_logprobs or 0,
            "text": {"format": body.text_format() or {"type": "text"}, "verbosity": "medium"},
            "truncation": "disabled", "usage": _usage(self.run) if done else None,
            "metadata": body.metadata if isinstance(body.metadata, dict) else {},
            "user": body.user if isinstance(body.user, str) else None, "background": bool(body.background),
            "previous_response_id": body.previous_response_id, "reasoning": None, "service_tier": "default",
            "store": self.kept,
        }


async def respond(server, body: ResponsesRequest, http: Request, response: Response):
    """The response to POST /v1/responses: a response object, or its stream of events."""
    earlier, size = body.earlier(server.responses)
    chat, names = body.chat_request(earlier)
    if body.background and server.responses.capacity == 0:
        raise APIError(400, "background: true needs a server that stores responses (it runs with "
                       "--max-stored-responses 0)", "background")
    # the input as stored, and its size: for a response that is kept or continues one (a client that sends the whole
    # conversation each time with store: false pays for neither)
    wanted = body.kept_by(server.responses) or body.previous_response_id is not None
    items = body.input_items() if wanted else []
    size += _json_bytes(items)
    # a continued conversation grows with every turn: held to what one request body may send
    if body.previous_response_id is not None and size > MAX_BODY_BYTES:
        raise APIError(400, f"the conversation continued by previous_response_id would be {size:,} bytes of JSON, "
                       f"over the {MAX_BODY_BYTES:,} a request body may hold: start a new conversation, or send "
                       "the part of it that matters in input", "previous_response_id")
    try:
        runs, functions = await server.start(chat)
    except APIError as e:
        raise names.error(e) from None
    reply = _Reply(body, chat, runs[0], functions, server.gc, server.responses, earlier + items, size)
    left_out = {LEFT_OUT_HEADER: str(reply.run.left_out)} if reply.run.left_out else {}
    if body.background:
        response.headers.update(left_out)
        return _start_background(reply)
    if body.stream:
        return StreamingResponse(_events(reply, http), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **left_out})
    try:
        async with watched(runs, http):
            text = await reply.run.complete()
    except ClientGone:
        return JSONResponse({}, status_code=499)
    response.headers.update(left_out)
    reply.output = reply.items(text)
    return reply.finish(reply.status())


async def _events(reply: _Reply, http: Request):
    """The response's server-sent events, in OpenAI's order (the module's docstring)."""
    numbers = itertools.count()
    run = reply.run

    def event(kind: str, **fields) -> str:
        data = json.dumps({"type": kind, **fields, "sequence_number": next(numbers)}, ensure_ascii=False)
        return f"event: {kind}\ndata: {data}\n\n"

    def started(item: dict, index: int):
        """output_item.added (and a message's content_part.added): the item with nothing in it yet."""
        empty = {"content": []} if item["type"] == "message" else {"arguments": ""}
        yield event("response.output_item.added", output_index=index, item=dict(item, status="in_progress", **empty))
        if item["type"] == "message":
            yield event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                        part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})

    def delta(item_id: str, index: int, text: str, logprobs: list) -> str:
        return event("response.output_text.delta", item_id=item_id, output_index=index, content_index=0, delta=text,
                     logprobs=logprobs)

    def finished(item: dict, index: int):
        """The done events of an item whose deltas went out."""
        at = dict(item_id=item["id"], output_index=index)
        if item["type"] == "message":
            part = item["content"][0]
            yield event("response.output_text.done", **at, content_index=0, text=part["text"],
                        logprobs=part["logprobs"])
            yield event("response.content_part.done", **at, content_index=0, part=part)
        else:
            yield event("response.function_call_arguments.done", **at, arguments=item["arguments"])
        yield event("response.output_item.done", output_index=index, item=item)

    def whole(item: dict, index: int):
        """An item made whole (a reply with tools): its text or arguments as one delta."""
        yield from started(item, index)
        if item["type"] == "message" and item["content"][0]["text"]:
            yield delta(item["id"], index, item["content"][0]["text"], item["content"][0]["logprobs"])
        elif item["type"] == "function_call":
            yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                        delta=item["arguments"])
        yield from finished(item, index)

    yield event("response.created", response=reply.object("in_progress"))
    yield event("response.in_progress", response=reply.object("in_progress"))
    try:
        async with watched([run], http):
            if reply.functions:
                text = await run.complete()
                for item in reply.items(text):
                    for e in whole(item, len(reply.output)):
                        yield e
                    reply.output.append(item)
            else:
                item_id = _id("msg_")
                for e in started(reply.message("", "in_progress", item_id=item_id), 0):
                    yield e
                scored = 0  # the tokens whose log-probabilities went out (with the delta of their text)
                async for text in run.deltas():
                    logprobs, scored = reply.logprobs(scored), run.completion_tokens
                    yield delta(item_id, 0, text, logprobs)
                item = reply.message(run.text.final_text, reply.status(), reply.logprobs(0), item_id)
                for e in finished(item, 0):
                    yield e
                reply.output.append(item)
    except ClientGone:
        return
    except APIError as e:  # (the status line went out: the error goes in the stream, as OpenAI sends it)
        yield event("error", code=e.code, message=e.message, param=e.param)
        yield event("response.failed", response=reply.finish("failed", {"code": "server_error",
                                                                        "message": e.message}))
        return
    yield event(f"response.{reply.status()}", response=reply.finish(reply.status()))


# -- background responses ------------------------------------------------------------------------------------------


def _start_background(reply: _Reply) -> dict:
    """A background response's first answer ("in_progress", stored at once for GET to poll); its row runs on in a
    task that stores the response at its end."""
    store = reply.store
    first = reply.object("in_progress")
    store.put(first, reply.context, reply.size)
    task = asyncio.ensure_future(_make_in_background(reply))
    store.running[reply.id] = (task, reply)
    task.add_done_callback(lambda _: store.running.pop(reply.id, None))
    return first


async def _make_in_background(reply: _Reply) -> None:
    try:
        text = await reply.run.complete()
    except APIError as e:  # (the engine failed, or the server is stopping)
        reply.finish("failed", {"code": "server_error", "message": e.message})
        return
    except asyncio.CancelledError:  # (the server stops: nothing more is stored)
        reply.run.req.cancel()
        raise
    if reply.cancelled:
        reply.output = [reply.message(text, "incomplete")] if text else []
        reply.finish("cancelled")
        return
    try:  # (a "required" call the model did not write: a failure, as in a stream)
        reply.output = reply.items(text)
    except APIError as e:
        reply.finish("failed", {"code": "server_error", "message": e.message})
        return
    reply.finish(reply.status())


async def cancel_background(store: ResponseStore, response_id: str) -> dict:
    """POST /v1/responses/{id}/cancel of a background response being made: its row stopped, the response stored
    "cancelled" (with the text written so far) and answered; a finished one is a 400."""
    running = store.running.get(response_id)
    if running is None:
        stored = store.get(response_id)
        status = stored.response["status"] if stored is not None else None
        raise APIError(400, "Only a background response in progress can be cancelled"
                       + (f": this one is {status}" if status else ""), None)
    task, reply = running
    reply.cancelled = True
    reply.run.req.cancel()
    await asyncio.shield(task)
    return store.get(response_id).response


def stop_background(store: ResponseStore) -> None:
    """The server stops: background responses still being made are cancelled (their rows freed)."""
    for task, _ in list(store.running.values()):
        task.cancel()


# -- stored responses ----------------------------------------------------------------------------------------------


def _stored(server, response_id: str):
    stored = server.responses.get(response_id)
    if stored is None:
        raise APIError(404, f"No response found with id {quoted(response_id, ECHO_CHARS, length=True)} (this server "
                       f"keeps the {server.responses.capacity:,} most recently used responses in its memory, those "
                       "not sent with store: false)", None, "not_found")
    return stored


def _query_int(http: Request, name: str, default: int, low: int, high: int) -> int:
    raw = http.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        shown = quoted(raw, ECHO_CHARS, length=True)
        raise APIError(400, f"{name} must be an integer from {low} to {high}, got {shown}", name)
    return value


def input_items(server, response_id: str, http: Request) -> dict:
    """GET /v1/responses/{id}/input_items: the items the response answered (those of the responses it continued,
    with their outputs, first), OpenAI's list page (limit, order, after, before)."""
    items = _stored(server, response_id).context
    limit = _query_int(http, "limit", 20, 1, 100)
    order = http.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, f"order must be \"asc\" or \"desc\", got {quoted(order, ECHO_CHARS, length=True)}", "order")
    for name in http.query_params.getlist("include") + http.query_params.getlist("include[]"):
        if name not in INCLUDABLE:
            raise APIError(400, f"include {quoted(name, ECHO_CHARS, length=True)} is not supported", "include")
    ordered = items if order == "asc" else items[::-1]
    for cursor in ("before", "after"):  # (the items before one, then of those the ones after another)
        given = http.query_params.get(cursor)
        if given is None:
            continue
        at = next((i for i, item in enumerate(ordered) if item.get("id") == given), None)
        if at is None:
            raise APIError(400, f"{cursor} {quoted(given, ECHO_CHARS, length=True)} is not the id of an input item "
                           "of this response", cursor)
        ordered = ordered[:at] if cursor == "before" else ordered[at + 1:]
    page = ordered[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit}


def add_routes(app, server) -> None:
    """GET, DELETE and cancel of a stored response, and its input items (POST /v1/responses is the app's)."""

    @app.api_route("/v1/responses/{response_id}", methods=["GET", "HEAD"])
    async def retrieve(response_id: str, http: Request):
        stored = _stored(server, response_id)
        if http.query_params.get("stream") not in (None, "false"):
            raise APIError(400, "stream is not supported here when retrieving a response: GET it again until its "
                           "status is no longer in_progress", "stream")
        return stored.response

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str):
        if response_id in server.responses.running:  # (a background response being made is stopped first)
            await cancel_background(server.responses, response_id)
        _stored(server, response_id)
        server.responses.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel(response_id: str):
        if response_id not in server.responses.running:
            _stored(server, response_id)  # (404 for an id not kept)
        return await cancel_background(server.responses, response_id)

    @app.api_route("/v1/responses/{response_id}/input_items", methods=["GET", "HEAD"])
    async def list_input_items(response_id: str, http: Request):
        return input_items(server, response_id, http)
