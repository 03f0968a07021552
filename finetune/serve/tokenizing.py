"""POST /tokenize and POST /detokenize, as vLLM serves them: the token ids a request's prompt becomes, and the text
of token ids. Clients count a prompt's tokens against the server's limit with them before they send it.

/tokenize takes either ``messages`` (tokenized as the chat route lays them out: the same ChatML prompt, with the
ReAct layout where ``tools`` / ``functions`` are given, and the oldest history left out where the chat route leaves
it out) or ``prompt`` (tokenized as /v1/completions reads it: control tokens' text is the control token), so the
count is what that route would prefill. Like the API routes, they need the key where --api-key is set.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.concurrency import run_in_threadpool

from . import completions
from .protocol import APIError, ChatCompletionRequest, validated
from .runs import token_entry


class TokenizeRequest(BaseModel):
    """The body of POST /tokenize: vLLM's TokenizeCompletionRequest (``prompt``) or TokenizeChatRequest
    (``messages``)."""

    model_config = ConfigDict(extra="allow")  # (other servers' fields that change nothing here are ignored)

    model: str | None = None  # (vLLM's is optional: the base)
    prompt: str | None = None
    messages: list[Any] | None = Field(default=None, min_length=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    add_generation_prompt: StrictBool | None = None
    continue_final_message: StrictBool | None = None
    add_special_tokens: StrictBool | None = None  # (Qwen's tokenizer adds none either way)
    return_token_strs: StrictBool | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[StrictInt]  # (JSON integers: not "12", true or 1.0)


# the fields that go with messages (the chat request's), not with a prompt
WITH_MESSAGES = ("tools", "functions", "tool_choice", "function_call", "add_generation_prompt",
                 "continue_final_message")


def _chat_body(body: TokenizeRequest) -> ChatCompletionRequest:
    """The chat route's request for ``body``'s messages and tools (its fields are the same types, checked already)."""
    given = {f: getattr(body, f) for f in ("messages", *WITH_MESSAGES) if getattr(body, f) is not None}
    return validated(ChatCompletionRequest, {"model": body.model or "", **given})  # (a 400 not expected: same types)


def tokenize(server, body: TokenizeRequest) -> dict:
    """The ids (and where asked their text) of the prompt ``body`` gives. Runs in a worker thread."""
    if body.model is not None:
        server.adapter_for(body.model)  # (a 404 for a name not served, as on the API routes)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give either prompt (a text, tokenized as /v1/completions reads it) or messages (as "
                       "/v1/chat/completions lays them out)", "messages" if body.messages is not None else "prompt")
    if body.prompt is not None:
        for name in WITH_MESSAGES:
            if getattr(body, name) is not None:
                raise APIError(400, f"{name} goes with messages, not with prompt", name)
        ids = completions.prompt_ids(server.tokenizer, body.prompt)
    else:
        chat = _chat_body(body)
        try:
            turns, _ = server.turns(chat)
            chat.check_continuation(turns.continues_assistant)
            ids = server.prompt_ids(turns)
        except RecursionError:
            raise APIError(400, "the request body nests JSON too deeply") from None
    strs = [token_entry(server.tokenizer, t, 0.0)["token"] for t in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": server.max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(server, body: DetokenizeRequest) -> dict:
    """The text of ``body.tokens`` (control tokens written as their text, as the tokenizer decodes them)."""
    if body.model is not None:
        server.adapter_for(body.model)
    server.check_vocabulary("tokens", body.tokens)
    return {"prompt": server.tokenizer.decode(body.tokens)}


def add_routes(app, server) -> None:
    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest):
        return await run_in_threadpool(tokenize, server, body)  # (a long prompt takes a while to tokenize)

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest):
        return await run_in_threadpool(detokenize, server, body)
