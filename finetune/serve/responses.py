"""POST /v1/responses: OpenAI's Responses API (the openai client's `responses.create`, the AI SDK's `openai(model)`,
LangChain's `use_responses_api=True`, the Agents SDK's default model), served as a chat completion underneath.

A request becomes the chat route's request (``to_chat``): `input` (a string, or items: messages of role
user/system/developer/assistant with text or input_text/output_text parts, function_call and function_call_output
items) becomes the messages, `instructions` a system message before them, function tools the chat route's tools
(Qwen's ReAct prompt), `tool_choice` its tool_choice, `text.format` its response_format, `max_output_tokens` its
max_tokens, `top_logprobs` (or include "message.output_text.logprobs") its logprobs; the sampling fields and vLLM's
extensions that both APIs share pass through. So a greedy request answers what the chat route (and `model.chat`)
answers, and an error names the Responses field (`input[2].role`, `max_output_tokens`, `text.format`).

Nothing is stored: `store` is accepted (true is OpenAI's default) and changes nothing; `previous_response_id`,
`conversation` and stored `prompt`s, which need a stored response, are a 400 saying to send the conversation in
`input`, as are background runs, reasoning settings (Qwen v1 does not reason) and images, files or audio in the
input. A streamed reply with function tools is generated whole first (a ReAct reply is a call or an answer only once
complete), then sent as one delta: the call's arguments, or the answer's text, as the chat route does.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from .protocol import APIError, ChatCompletionRequest, Number, clipped, field_path
from .runs import ClientGone, Run, watched
from .tool_calls import finish_with_call, tool_message

# The chat route's fields this route sets from its own (a body's own value of one is not a Responses field: ignored)
SET_HERE = ("messages", "tools", "tool_choice", "functions", "function_call", "response_format", "max_tokens",
            "max_completion_tokens", "n", "stream", "stream_options", "logprobs", "top_logprobs",
            "parallel_tool_calls")
LOGPROBS_INCLUDE = "message.output_text.logprobs"


class ResponsesRequest(BaseModel):
    """The body of POST /v1/responses (other fields: the chat route's sampling fields and extensions, or ignored)."""

    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: Annotated[int | None, Number] = Field(default=None, ge=1)
    stream: StrictBool | None = False
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    text: Any = None
    top_logprobs: Annotated[int | None, Number] = Field(default=None, ge=0, le=20)
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    truncation: str | None = None
    # what needs a stored response, or what Qwen v1 does not do: refused (``_refused``)
    previous_response_id: Any = None
    conversation: Any = None
    prompt: Any = None
    background: StrictBool | None = None
    reasoning: Any = None


def _refused(body: ResponsesRequest) -> None:
    for name in ("previous_response_id", "conversation", "prompt"):
        if getattr(body, name) is not None:
            raise APIError(400, f"{name} is not supported: this server stores no responses, conversations or prompts "
                           "(send the whole conversation in input)", name)
    if body.background:
        raise APIError(400, "background responses are not supported: send the request without background, or "
                       "stream it", "background")
    if body.reasoning not in (None, {}) and not (isinstance(body.reasoning, dict)
                                                 and all(v is None for v in body.reasoning.values())):
        raise APIError(400, "reasoning is not supported: this model does not reason before it answers", "reasoning")
    if body.truncation not in (None, "disabled"):
        raise APIError(400, "only truncation \"disabled\" is supported (a history over the model's window loses its "
                       "oldest turns as model.chat's does)", "truncation")


def _text(content, where: str) -> str | list:
    """A message item's content as the chat route's: a string, or its text parts."""
    if isinstance(content, str) or content is None:
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of input_text parts", where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text")})
        elif kind in ("input_image", "input_file", "input_audio"):
            raise APIError(400, f"{where}[{j}] is {kind}: this model reads text only", f"{where}[{j}].type")
        else:
            raise APIError(400, f"{where}[{j}] must be an input_text part ({{\"type\": \"input_text\", \"text\": "
                           f"...}})", f"{where}[{j}]")
    return parts


def _messages(body: ResponsesRequest) -> tuple[list[dict], list[str]]:
    """(the chat route's messages, the Responses field each came from)."""
    messages, origins = [], []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
        origins.append("instructions")
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    for i, item in enumerate(items):
        where = "input" if isinstance(body.input, str) else f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where} must be an object: a message, a function_call or a function_call_output",
                           where)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" not in last:
                last["tool_calls"] = [call]  # (the thought before it, as the model wrote them together)
                origins[-1] = where
                continue
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else _text(output, f"{where}.output")})
        else:
            raise APIError(400, f"{where} is of type {clipped(json.dumps(kind))}: this server takes messages, "
                           "function_call and function_call_output items", f"{where}.type")
        origins.append(where)
    return messages, origins


def _tools(body: ResponsesRequest) -> list | None:
    if body.tools is None:
        return None
    tools = []
    for i, tool in enumerate(body.tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise APIError(400, f"tools[{i}] is {clipped(json.dumps(kind))}: only function tools are supported",
                           f"tools[{i}].type")
        tools.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}})
    return tools


def _tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(text):
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(text, dict) or not isinstance(fmt, (dict, type(None))):
        raise APIError(400, "text must be an object with a format object", "text.format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    return fmt  # (json_object, or a type the chat route refuses naming it)


def to_chat(body: ResponsesRequest) -> tuple[ChatCompletionRequest, list[str]]:
    """The chat route's request for ``body`` and the Responses field of each of its messages."""
    _refused(body)
    messages, origins = _messages(body)
    chat = {k: v for k, v in (body.model_extra or {}).items() if k not in SET_HERE}
    chat.update(model=body.model, messages=messages, tools=_tools(body), tool_choice=_tool_choice(body.tool_choice),
                response_format=_response_format(body.text), max_tokens=body.max_output_tokens,
                parallel_tool_calls=body.parallel_tool_calls)
    if body.top_logprobs is not None or LOGPROBS_INCLUDE in (body.include or ()):
        chat.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
    chat = {k: v for k, v in chat.items() if v is not None}
    try:
        return ChatCompletionRequest.model_validate(chat), origins
    except ValidationError as e:  # (a passed-through sampling field, or an item's text of the wrong type)
        err = e.errors()[0]
        where = field_path(err.get("loc", ()))
        raise _in_responses_terms(APIError(400, f"{where}: {err.get('msg', 'invalid value')}", where), origins) \
            from None


_RENAMES = [(re.compile(r"^max_tokens\b"), "max_output_tokens"), (re.compile(r"^response_format(\.json_schema)?"),
                                                                   "text.format"),
            (re.compile(r"^tools\[(\d+)\]\.function"), r"tools[\1]"), (re.compile(r"^tool_choice\.function"),
                                                                       "tool_choice")]


def _renamed(param: str | None, origins: list[str]) -> str | None:
    """A chat-route field name as the Responses request names it."""
    if param is None:
        return None
    m = re.match(r"^messages\[(\d+)\]", param)
    if m is not None:
        k = int(m.group(1))
        return (origins[k] if k < len(origins) else "input") + param[m.end():]
    if param == "messages":
        return "input"
    for pattern, name in _RENAMES:
        param = pattern.sub(name, param)
    return param


def _in_responses_terms(e: APIError, origins: list[str]) -> APIError:
    param = _renamed(e.param, origins)
    message = e.message
    if e.param and param != e.param:
        message = message.replace(e.param, param)
    message = re.sub(r"\bmessages\[(\d+)\]", lambda m: _renamed(m.group(0), origins), message)
    return APIError(e.status, message, param, e.code)


class _Reply:
    """One response's ids, settings echoed back, and its output items as they are made."""

    def __init__(self, body: ResponsesRequest, run: Run):
        self.body, self.run = body, run
        self.id, self.created = "resp_" + uuid.uuid4().hex, int(time.time())
        self.item_id = "msg_" + uuid.uuid4().hex

    def usage(self) -> dict:
        run = self.run
        return {"input_tokens": run.prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": run.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": run.prompt_tokens + run.completion_tokens}

    def response(self, output: list, status: str) -> dict:
        b = self.body
        done = status in ("completed", "incomplete")
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "completed_at": int(time.time()) if done else None, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "model": b.model,
                "output": output, "parallel_tool_calls": b.parallel_tool_calls is not False,
                "temperature": (b.model_extra or {}).get("temperature"), "top_p": (b.model_extra or {}).get("top_p"),
                "tool_choice": b.tool_choice if b.tool_choice is not None else "auto", "tools": b.tools or [],
                "text": b.text if b.text is not None else {"format": {"type": "text"}},
                "truncation": b.truncation or "disabled", "metadata": b.metadata or {}, "store": False,
                "background": False, "usage": self.usage() if done else None}

    def logprobs(self) -> list:
        return self.run.logprobs(0) if self.body_logprobs else []

    @property
    def body_logprobs(self) -> bool:
        return self.run.req.params.logprobs is not None

    def message(self, text: str, status: str) -> dict:
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant",
                "content": [] if status == "in_progress" else [self.part(text)]}

    def part(self, text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [],
                "logprobs": self.logprobs() if self.body_logprobs else []}

    def call_item(self, call: dict, status: str, arguments: str | None = None) -> dict:
        return {"type": "function_call", "id": "fc_" + self.item_id[4:], "call_id": call["id"],
                "name": call["function"]["name"],
                "arguments": call["function"]["arguments"] if arguments is None else arguments, "status": status}


def _status(finish: str | None) -> str:
    return "incomplete" if finish == "length" else "completed"


async def respond(server, body: ResponsesRequest, http: Request):
    """The response to POST /v1/responses: a response object, or its stream of events."""
    chat, origins = None, []
    try:
        chat, origins = to_chat(body)
        runs, functions = await server.start(chat)
    except APIError as e:
        raise _in_responses_terms(e, origins) from None
    reply = _Reply(body, runs[0])
    if body.stream:
        return StreamingResponse(_stream(reply, chat, functions, http), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        async with watched(runs, http):
            text = await reply.run.complete()
    except ClientGone:
        return JSONResponse({}, status_code=499)
    output, finish = _output(reply, chat, functions, text)
    return reply.response(output, _status(finish))


def _output(reply: _Reply, chat: ChatCompletionRequest, functions, text: str) -> tuple[list, str | None]:
    """(a finished reply's output items, its finish reason): the call (its thought, where it wrote one, as a
    message before it), or the answer's message."""
    finish = reply.run.finish_reason
    if functions:
        message, call_reason = tool_message(text, functions, chat, reply.run, finish)
        finish = finish_with_call(finish, call_reason)
        if call_reason is not None:
            thought = [reply.message(message["content"], "completed")] if message.get("content") else []
            return thought + [reply.call_item(message["tool_calls"][0], "completed")], finish
        text = message["content"]
    return [reply.message(text, _status(finish))], finish


def _event(kind: str, n: int, **fields) -> str:
    return f"event: {kind}\ndata: " + json.dumps({"type": kind, "sequence_number": n, **fields},
                                                 ensure_ascii=False) + "\n\n"


async def _stream(reply: _Reply, chat: ChatCompletionRequest, functions, http: Request):
    """Server-sent events in OpenAI's order: response.created and .in_progress, the output items with their parts
    and text deltas as they come, then response.completed (or .incomplete at max_output_tokens); an error after the
    stream began is an `error` event that ends it."""
    seq = iter(range(1 << 62))
    yield _event("response.created", next(seq), response=reply.response([], "in_progress"))
    yield _event("response.in_progress", next(seq), response=reply.response([], "in_progress"))
    at = {"item_id": reply.item_id, "output_index": 0, "content_index": 0}
    try:
        async with watched([reply.run], http):
            if functions:  # (a call or an answer only once whole: sent as one delta)
                output, finish = _output(reply, chat, functions, await reply.run.complete())
            else:
                yield _event("response.output_item.added", next(seq), output_index=0,
                             item=reply.message("", "in_progress"))
                yield _event("response.content_part.added", next(seq), **at, part=reply.part("") | {"logprobs": []})
                sent = 0
                async for delta in reply.run.deltas():
                    scored = reply.run.logprobs(sent) if reply.body_logprobs else []
                    sent = reply.run.completion_tokens
                    yield _event("response.output_text.delta", next(seq), **at, delta=delta, logprobs=scored)
                output, finish = [reply.message(reply.run.text.final_text, _status(reply.run.finish_reason))], \
                    reply.run.finish_reason
    except ClientGone:
        return
    except APIError as e:
        yield _event("error", next(seq), code=e.code, message=e.message, param=e.param)
        return
    for index, item in enumerate(output):
        if functions or index > 0:  # (the items not streamed above)
            if item["type"] == "function_call":
                yield _event("response.output_item.added", next(seq), output_index=index,
                             item=dict(item, arguments="", status="in_progress"))
                where = {"item_id": item["id"], "output_index": index}
                yield _event("response.function_call_arguments.delta", next(seq), **where, delta=item["arguments"])
                yield _event("response.function_call_arguments.done", next(seq), **where, arguments=item["arguments"])
                yield _event("response.output_item.done", next(seq), output_index=index, item=item)
                continue
            yield _event("response.output_item.added", next(seq), output_index=index,
                         item=dict(item, content=[], status="in_progress"))
            yield _event("response.content_part.added", next(seq), **at, part=dict(item["content"][0], text=""))
            yield _event("response.output_text.delta", next(seq), **at, delta=item["content"][0]["text"],
                         logprobs=item["content"][0]["logprobs"])
        part = item["content"][0]
        yield _event("response.output_text.done", next(seq), **at, text=part["text"], logprobs=part["logprobs"])
        yield _event("response.content_part.done", next(seq), **at, part=part)
        yield _event("response.output_item.done", next(seq), output_index=index, item=item)
    status = _status(finish)
    yield _event(f"response.{status}", next(seq), response=reply.response(output, status))
