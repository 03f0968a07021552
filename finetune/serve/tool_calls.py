"""A ReAct reply as OpenAI's tool calls: the call a tool choice forces, the assistant message (or call) a reply
makes, and its finish reason. Shared by the chat route (app.py) and the Responses route (responses.py)."""

from __future__ import annotations

import logging
import uuid

from .. import react
from ..errors import quoted
from .protocol import ECHO_CHARS, APIError, CallChoice, ChatCompletionRequest
from .runs import Run

logger = logging.getLogger("uvicorn.error")


def forced_call(choice: CallChoice, functions: list[dict], given: str) -> str | None:
    """The name of the function a "required" or named tool choice makes the reply call (None: the model names one
    of several); a 400 naming the choice's field when the request's functions (given in `given`) cannot answer it."""
    if choice.mode not in ("required", "function"):
        return None
    names = react.function_names(functions)
    what = f"{choice.mode!r}" if choice.mode == "required" else f"names the function {quoted(choice.name, 80)}"
    if not names:
        raise APIError(400, f"{choice.field} {what}, but the request gives no {given} to call", choice.field)
    if choice.mode == "function" and choice.name not in names:
        raise APIError(400, f"{choice.field} {what}, which is not among the request's {given} (given: "
                       f"{react.listed(names)})", choice.field)
    # "required" with one function is a call of that one
    return choice.name if choice.mode == "function" else names[0] if len(names) == 1 else None


def tool_message(text: str, functions: list[dict], body: ChatCompletionRequest, run: Run,
                  finish: str | None = None) -> tuple[dict, str | None]:
    """The assistant message of a ReAct reply: a tool/function call or the final answer (``run.after_result``: the
    reply continues the open turn after a tool result, see react.parse_reply). ``run.reply_start``: the start of a
    call that tool_choice forced (in the prompt), joined to the text here; ``run.forced_call`` the function it calls.
    A "required" reply that calls no function of the request is a 500 (the model did not write what was asked for),
    unless max_tokens (``finish`` "length") cut it before its call was whole: then its text is the answer, as any
    reply cut short."""
    content, call = react.parse_reply(run.reply_start + text, run.after_result)
    if run.reply_start:
        forced = run.forced_call
        names = {n.strip(): n for n in react.function_names(functions)}  # (the parser strips the name it reads)
        if forced is not None:  # (the start holds the whole "Action: {name}\nAction Input:": always a call)
            call["name"] = forced
        elif call is not None and call["name"] in names:
            call["name"] = names[call["name"]]
        elif call is None and finish == "length":
            return {"role": "assistant", "content": f"Action: {text}"}, None
        else:
            did = (f"calls {quoted(call['name'], 80)}, which is not among the request's functions (given: "
                   f"{react.listed(list(names.values()))})" if call is not None else "holds no call")
            logger.warning("a tool_choice 'required' reply %s", did)
            raise APIError(500, f"tool_choice 'required': the model's reply {did}; it wrote "
                           f"{quoted(text, ECHO_CHARS, length=True)} after 'Action:'", None, "invalid_tool_call")
    if call is None:
        return {"role": "assistant", "content": content}, None
    if body.functions:  # the legacy API answers in its own form, the thought as the official server gives it ("" too)
        return {"role": "assistant", "content": content, "function_call": call}, "function_call"
    tool_call = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": call}
    return {"role": "assistant", "content": content or None, "tool_calls": [tool_call]}, "tool_calls"


def finish_with_call(finish: str | None, call_reason: str | None) -> str | None:
    """A reply that calls a tool finishes with "tool_calls" (or "function_call"), unless max_tokens cut it: then
    with "length", as OpenAI reports it, since the call's arguments may be cut short (a client would run them)."""
    return "length" if finish == "length" else call_reason or finish
