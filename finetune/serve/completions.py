"""POST /v1/completions: OpenAI's legacy completions API, as vLLM serves it (its benchmark client's default, lm-eval's
`local-completions`, LlamaIndex's OpenAILike unless is_chat_model).

The prompt is the model's whole input, continued as written: no chat layout is added and the text comes back
unstripped. A prompt string is tokenized as the official Qwen tokenizer tokenizes by default: the text of a control
token (`<|im_start|>`, `<|im_end|>`) becomes that token, so a client can send a ChatML prompt it laid out itself
(here there are no messages whose text could forge a turn: the client writes the whole layout). Token-id prompts
are taken as given. The reply ends as a chat reply does (`<|im_end|>`, `<|im_start|>`, the model's eos, stop
strings, stop ids, max_tokens, 16 by default as in OpenAI's API).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import unicodedata
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .protocol import APIError, CompletionRequest, clipped
from .runs import ClientGone, Run, StreamEnded, merged, request_usage, sse, token_entry, watched
from .textstream import TextStream

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this API (and vLLM's)


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A prompt string's ids as the official tokenizer gives them by default: NFC, then BPE with the special tokens'
    text parsed as those tokens."""
    return tokenizer.encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")


def prepare(server, body: CompletionRequest):
    """Check the request and tokenize its prompts -> (adapter, [(ids, params, the prompt's text)]). Runs in a worker
    thread (a long prompt takes a while to tokenize)."""
    body.check()
    adapter = server.adapter_for(body.model)
    prompts = body.prompts()
    keep = server.truncation(body)
    several = prompts is body.prompt
    out = []
    for i, p in enumerate(prompts):
        where = f"prompt[{i}]" if several else "prompt"
        if isinstance(p, str):
            ids, text = prompt_ids(server.tokenizer, p), p
        else:
            server.check_vocabulary(where, p)
            ids, text = list(p), None
        if keep is not None and len(ids) > keep:  # (vLLM's truncate_prompt_tokens; echo gives the tokens kept)
            ids, text = ids[-keep:], None
        params = server.params(body, len(ids), source=where, default_max=DEFAULT_MAX_TOKENS)
        if body.echo and body.logprobs is not None:  # (the prompt's tokens scored at its prefill; with vLLM's
            # prompt_logprobs beside, its count of alternatives too: each report takes its own)
            params = dataclasses.replace(params, prompt_logprobs=max(body.logprobs, params.prompt_logprobs or 0))
        out.append((ids, params, text))
    constraint = body.constraint()
    if constraint is not None:
        try:  # (compiled here, off the event loop; every prompt's params hold the same constraint)
            server.engine.prepare_constraint(out[0][1])
        except ValueError as e:
            why = clipped(str(e).removeprefix(f"{constraint.kind}: "))
            raise APIError(400, f"{constraint.param}: {why}", constraint.param) from None
    return adapter, out


class Choice:
    """One choice of a completion: its Run, the text echoed before it, and the legacy logprobs' place so far."""

    def __init__(self, run: Run, echo: str, as_ids: bool = False, echo_scored: bool = False):
        self.run, self.echo, self.as_ids = run, echo, as_ids  # (as_ids: tokens named "token_id:N")
        self.scored = 0  # tokens whose log-probabilities went out
        self.offset = len(echo)  # the text offset of the next token (text_offset)
        # the prompt's tokens' log-probabilities go out first (echo with logprobs: Request.prompt_logprobs)
        self.prompt_scores = echo_scored

    def logprobs(self, end: int) -> dict:
        """The legacy logprobs object of the tokens since the last call, up to ``end``: each token's text, its
        log-probability, the most likely tokens' (the chosen one's always among them, as OpenAI gives it) and its
        offset in the choice's text; with echo, the prompt's tokens first (the first one's log-probability and
        alternatives null: nothing comes before it)."""
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        tok, req = self.run.tokenizer, self.run.req

        def add(token: int, scores, offset: int) -> int:
            entry = token_entry(tok, token, scores[0] if scores else 0.0, self.as_ids)
            tops = None
            if scores:  # (a prompt token's may hold more: prompt_logprobs asked for more)
                tops = dict(_text_and_logprob(token_entry(tok, i, v, self.as_ids))
                            for i, v in scores[1][:req.params.logprobs])
                tops.setdefault(entry["token"], entry["logprob"])
            out["tokens"].append(entry["token"])
            out["token_logprobs"].append(entry["logprob"] if scores else None)
            out["top_logprobs"].append(tops)
            out["text_offset"].append(offset)
            return offset + len(entry["token"])

        if self.prompt_scores:
            self.prompt_scores = False
            offset = 0
            for t, scores in zip(req.prompt_ids, [None, *(req.prompt_logprobs or [])]):
                offset = add(t, scores, offset)
        for t, scores in zip(req.output_ids[self.scored:end], req.logprobs[self.scored:end]):
            self.offset = add(t, scores, self.offset)
        self.scored = max(self.scored, end)
        return out


def _text_and_logprob(entry: dict) -> tuple[str, float]:
    return entry["token"], entry["logprob"]


async def start(server, body: CompletionRequest) -> tuple[list[Choice], int]:
    """The request's choices in the engine (prompt-major: choice k * n + j is prompt k's j-th), and its prompts'
    token count."""
    adapter, prompts = await run_in_threadpool(prepare, server, body)
    kept = body.stop_list() if body.include_stop_str_in_output else ()
    stop = body.stop_list()

    def run(k: int) -> Run:
        ids, params, _ = prompts[k]
        text = TextStream(server.tokenizer, stop, strip=False, min_ids=params.min_new_tokens, kept=kept)
        return Run(server.tokenizer, None, None, text, len(ids))

    n = body.n or 1
    runs = server.submit_rows([(ids, params) for ids, params, _ in prompts], n, adapter, run)
    echoes = []
    for ids, _, text in prompts:
        echo = "" if not body.echo else text if text is not None else server.tokenizer.decode(ids)
        echoes += [echo] * n
    as_ids, echo_scored = bool(body.return_tokens_as_token_ids), bool(body.echo) and body.logprobs is not None
    return ([Choice(r, e, as_ids, echo_scored) for r, e in zip(runs, echoes)],
            sum(len(ids) for ids, _, _ in prompts))


async def respond(server, body: CompletionRequest, http: Request):
    """The response to POST /v1/completions: a text_completion object, or its stream of chunks."""
    choices, prompt_tokens = await start(server, body)
    cid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
    runs = [c.run for c in choices]
    if body.stream:
        return StreamingResponse(_stream(choices, prompt_tokens, body, http, cid, created),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        async with watched(runs, http):
            texts = await asyncio.gather(*(run.complete() for run in runs))
    except ClientGone:
        return JSONResponse({}, status_code=499)
    out = [{"index": i, "text": c.echo + text, "finish_reason": c.run.finish_reason,
            "logprobs": c.logprobs(c.run.completion_tokens) if body.logprobs is not None else None}
           for i, (c, text) in enumerate(zip(choices, texts))]
    if body.prompt_logprobs is not None:  # (vLLM's, in each choice)
        for entry, c in zip(out, choices):
            entry["prompt_logprobs"] = c.run.prompt_logprobs(c.as_ids)
    return {"id": cid, "object": "text_completion", "created": created, "model": body.model, "choices": out,
            "usage": request_usage(runs, prompt_tokens)}


async def _stream(choices: list[Choice], prompt_tokens: int, body: CompletionRequest, http: Request, cid: str,
                  created: int):
    """Server-sent text_completion chunks, ending with `data: [DONE]`: each choice's text as it comes (the echoed
    prompt first), its log-probabilities with the chunk that carries their tokens' text, its finishing chunk; the
    choices interleaved, each chunk naming its index; then the usage chunk where asked."""
    options = body.stream_options
    include_usage = bool(options and options.include_usage)
    continuous = include_usage and options.continuous_usage_stats
    runs = [c.run for c in choices]

    def chunk(i: int, text: str, finish=None, tokens: int | None = None) -> dict:
        c = choices[i]
        logprobs = c.logprobs(tokens) if body.logprobs is not None and tokens is not None else None
        out = {"id": cid, "object": "text_completion", "created": created, "model": body.model,
               "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        if continuous:
            out["usage"] = request_usage(runs, prompt_tokens)
        elif include_usage:
            out["usage"] = None
        return out

    async def one(i: int):
        """Choice i's chunks: the echoed prompt (with logprobs, once the prompt is scored: with its first tokens),
        its text as it comes, its finishing chunk."""
        c = choices[i]
        echo = c.echo and c.prompt_scores
        if c.echo and not echo:
            yield chunk(i, c.echo)
        async for delta in c.run.deltas(every_step=continuous):
            if echo:
                delta, echo = c.echo + delta, False
            yield chunk(i, delta, tokens=c.run.completion_tokens)
        yield chunk(i, c.echo if echo else "", c.run.finish_reason, tokens=c.run.completion_tokens)

    try:
        async for event in merged(runs, http, [one(i) for i in range(len(choices))]):
            yield event
    except StreamEnded:
        return
    if include_usage:
        yield sse({"id": cid, "object": "text_completion", "created": created, "model": body.model, "choices": [],
                   "usage": request_usage(runs, prompt_tokens)})
    yield sse("[DONE]")
