"""A request's choices in the engine, as the routes of both completion APIs read them: each choice a ``Run``
(text deltas as its tokens arrive, its log-probabilities, how it finished), the client's disconnect watched for
all of them, the usage they add up to, and server-sent events."""

from __future__ import annotations

import asyncio
import json
import math
from contextlib import asynccontextmanager

from fastapi import Request

from .protocol import APIError
from .textstream import TextStream


# a response's header: how many of the oldest user/assistant pairs the prompt left out (over the model's
# max_window_size, as model.chat leaves them out); absent when none was
LEFT_OUT_HEADER = "X-History-Pairs-Left-Out"


class ClientGone(Exception):
    pass


class StreamEnded(Exception):
    """A stream ended early (``merged``): its client left, or an error went out in it."""


class Run:
    """One request in the engine: yields text deltas as tokens arrive, then records how it finished."""

    def __init__(self, tokenizer, req, queue, text: TextStream, prompt_tokens: int, left_out: int = 0,
                 after_result: bool = False, reply_start: str = "", forced_call: str | None = None):
        self.tokenizer, self.req, self.queue, self.text = tokenizer, req, queue, text
        self.prompt_tokens = prompt_tokens
        self.left_out = left_out  # the oldest history pairs the prompt left out (max_window_size)
        self.after_result = after_result  # the reply continues the open ReAct turn after a tool result
        self.reply_start = reply_start  # the start of the reply, in the prompt (a call tool_choice forces)
        self.forced_call = forced_call  # the function that start calls (None: the model names it)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.gone = False  # the client disconnected

    async def deltas(self, every_step: bool = False):
        """Text deltas until the request finishes (or hits a stop string); ClientGone once the client left (the
        caller watches for that, ``watched``, for all of a request's choices).
        ``every_step``: also an empty delta for a step whose tokens add no text yet (one per step with tokens)."""
        seen = 0
        try:
            while True:
                p = await self.queue.get()
                if self.gone:
                    raise ClientGone
                if p.error:  # the engine failed (500) or the server is stopping (503)
                    raise p.error
                new = self.req.output_ids[seen:p.n_tokens]
                seen = p.n_tokens
                self.completion_tokens = seen
                delta = self.text.feed(new)
                if self.text.stopped or p.finished:
                    delta += self.text.finish()
                    self.finish_reason = "stop" if self.text.stopped else (
                        "length" if p.finish_reason == "length" else "stop")
                    if delta or (every_step and new):
                        yield delta
                    return
                if delta or (every_step and new):
                    yield delta
        finally:
            if self.text.stopped:  # free the row, counted as a stop (/health's finished)
                self.req.cancel("stop")
            elif self.finish_reason is None:  # client gone, or an error
                self.req.cancel()

    def logprobs(self, start: int, end: int | None = None, as_ids: bool = False) -> list[dict]:
        """OpenAI's logprobs "content" entries of the reply's tokens start..end (default completion_tokens): every
        generated token, those of a stop string cut from the text, or of whitespace stripped from it, too
        (``as_ids``: each token named "token_id:N", ``token_entry``)."""
        tok = self.tokenizer
        end = self.completion_tokens if end is None else end
        return [dict(token_entry(tok, t, lp, as_ids), top_logprobs=[token_entry(tok, i, v, as_ids) for i, v in top])
                for t, (lp, top) in zip(self.req.output_ids[start:end], self.req.logprobs[start:end])]

    def prompt_logprobs(self, as_ids: bool = False) -> list[dict | None]:
        """vLLM's prompt_logprobs of the row's prompt (its params.prompt_logprobs set): None for the first token,
        then for each one {"<id>": {"logprob", "rank", "decoded_token"}} of the token itself, then of the k most
        likely tokens (rank 1 first) where they are others (``as_ids``: tokens named "token_id:N")."""
        tok, req = self.tokenizer, self.req

        def entry(token: int, logprob: float, rank: int) -> dict:
            named = token_entry(tok, token, logprob, as_ids)
            return {"logprob": named["logprob"], "rank": rank, "decoded_token": named["token"]}

        out: list[dict | None] = [None]
        for token, (logprob, top, rank) in zip(req.prompt_ids[1:], req.prompt_logprobs or ()):
            scores = {str(token): entry(token, logprob, rank)}
            for r, (i, v) in enumerate(top[:req.params.prompt_logprobs], 1):
                scores.setdefault(str(i), entry(i, v, r))
            out.append(scores)
        return out

    async def complete(self) -> str:
        async for _ in self.deltas():
            pass
        return self.text.final_text


async def _watch(runs: list[Run], http: Request) -> None:
    """Cancel a request's choices the moment its client disconnects. Polling between tokens never saw it: tokens
    keep coming, and a non-streamed reply writes nothing until its last one, so a client that left still held its
    rows to max_tokens. (One watcher a request: its choices' own would wait for the same disconnect.)"""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    for run in runs:
        run.gone = True
        run.req.cancel()  # the engine drops the row at its next step, and reports it (finish reason cancelled)


@asynccontextmanager
async def watched(runs: list[Run], http: Request):
    """A request's choices, watched for the client's disconnect while the block runs; any choice not done when the
    block ends (an error in another, the client gone) is cancelled."""
    watcher = asyncio.ensure_future(_watch(runs, http))
    try:
        yield
    finally:
        watcher.cancel()
        for run in runs:
            if not run.req.finished:
                run.req.cancel()


def token_entry(tokenizer, token: int, logprob: float, as_id: bool = False) -> dict:
    """{"token", "logprob", "bytes"} of one token: its text (an incomplete UTF-8 character as U+FFFD, the bytes say
    which; ``as_id``: "token_id:N" instead, vLLM's return_tokens_as_token_ids) and bytes; an id past the
    tokenizer's (the model's padded vocabulary) has none. A log-probability too small for a float is -9999.0, as
    vLLM writes it (JSON has no -Infinity)."""
    try:
        raw = tokenizer.convert_ids_to_tokens(token)
    except (ValueError, KeyError, IndexError):
        raw = b""
    raw = raw.encode() if isinstance(raw, str) else bytes(raw)
    text = f"token_id:{token}" if as_id else raw.decode("utf-8", errors="replace")
    return {"token": text, "logprob": logprob if math.isfinite(logprob) else -9999.0, "bytes": list(raw)}


def request_usage(runs: list[Run], prompt_tokens: int | None = None) -> dict:
    """A request's usage: its prompt once (``prompt_tokens``: its prompts', where it gave several), the completion
    tokens of all its choices."""
    prompt = runs[0].prompt_tokens if prompt_tokens is None else prompt_tokens
    completion = sum(run.completion_tokens for run in runs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj) -> str:
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)) + "\n\n"


async def merged(runs: list[Run], http: Request, choices: list):
    """The server-sent events of a request's choices as they come, interleaved: ``choices`` are async generators
    of chunks (one a choice), watched for the client's disconnect (``watched``). StreamEnded once the client left, or
    after an APIError in a choice went out as its error event and `[DONE]` (the status line is sent already)."""
    events: asyncio.Queue = asyncio.Queue()

    async def pump(choice) -> None:
        try:
            async for chunk in choice:
                events.put_nowait(chunk)
            events.put_nowait(None)
        except (ClientGone, APIError) as e:
            events.put_nowait(e)

    async with watched(runs, http):
        tasks = [asyncio.ensure_future(pump(c)) for c in choices]
        try:
            left = len(tasks)
            while left:
                event = await events.get()
                if event is None:
                    left -= 1
                elif isinstance(event, ClientGone):
                    raise StreamEnded
                elif isinstance(event, APIError):
                    yield sse(event.body())
                    yield sse("[DONE]")
                    raise StreamEnded
                else:
                    yield sse(event)
        finally:
            for task in tasks:
                task.cancel()
