"""The FastAPI app: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (completions.py), GET /health,
the chat page at /.

Prompts are built as `model.chat` builds them (`make_context`: the system message, the history pairs, the
last user message; every text encoded as plain text, so no message can forge a control token), sampling
defaults are the model dir's generation config as `model.chat` uses it, and the reply is stripped as
chat() strips it: a greedy request answers exactly `model.chat(..., do_sample=False)`'s answer. A request
ending with an assistant message gets that message's continuation, unstripped (the official text completion).
Functions / tools go through Qwen's ReAct prompt (finetune/react.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import sys
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import react
from ..errors import quoted
from ..inference.engine import vocabulary_problem
from ..inference.sampling import GREEDY_BELOW, FieldProblem
from .metrics import ServeMetrics
from .models import peft_adapter_name
from . import completions, responses, tokenizing
from .protocol import (ECHO_CHARS, MAX_BODY_BYTES, APIError, ChatCompletionRequest, CompletionRequest,
                       SamplingRequest, clipped, field_path)
from .response_store import ResponseStore
from .runs import LEFT_OUT_HEADER, ClientGone, Run, StreamEnded, merged, request_usage, sse, watched
from .textstream import TextStream
from .tool_calls import finish_with_call, forced_call, tool_message
from .worker import Closed, EngineWorker


# after the open turn's "\nThought:": the official final-answer thought, up to the answer (its space is the
# answer's first token, as in the trained text)
FINAL_ANSWER_OPEN = react.FINAL_THOUGHT[len("Thought:"):].rstrip()

logger = logging.getLogger("uvicorn.error")  # (uvicorn's: configured to print INFO lines, as its own)


class Server:
    """What the routes share: the tokenizer, the engine worker, the served names, the limits."""

    def __init__(self, model, tokenizer, *, base_name: str, adapter_names=(), max_batch: int = 32,
                 max_model_len: int | None = None, max_queue: int | None = None, api_key: str | None = None,
                 engine=None, cors_origins=(), prefill_chunk: int = 0, max_stored_responses: int = 1000):
        from ..inference import Engine
        from ..modeling.chat import _generation_config  # the config chat() runs with, eos included

        self.tokenizer = tokenizer
        self.cors_origins = list(cors_origins)  # web pages on these origins may call the API from a browser
        self.base_name = base_name
        self.adapter_names = list(adapter_names)
        self.api_key = api_key
        self.gc, self.window, _ = _generation_config(model, tokenizer, None, {})
        self.engine = engine if engine is not None else Engine(model, tokenizer, max_batch=max_batch,
                                                               max_len=max_model_len, prefill_chunk=prefill_chunk)
        self.max_model_len = int(max_model_len or getattr(self.engine, "max_len", None)
                                 or model.config.seq_length)
        self.max_batch = max_batch
        self.max_queue = 4 * max_batch if max_queue is None else max_queue
        labels = {None: base_name, **{peft_adapter_name(n): n for n in self.adapter_names}}
        self.metrics = ServeMetrics(labels, lambda: self.engine.occupancy(), lambda: self.worker.in_flight,
                                    lambda: self.worker.steps)
        self.worker = EngineWorker(self.engine, capacity=max_batch + self.max_queue, metrics=self.metrics)
        self.created = int(time.time())
        self.responses = ResponseStore(max_stored_responses)  # (POST /v1/responses' store, previous_response_id)

    def default_sampling(self) -> list:
        """The sampling of requests that set none (the model's generation config) and of greedy ones (temperature
        0, the config's repetition penalty kept): what warm_up captures the decode steps of (other sampling's
        steps are captured when a request first needs them)."""
        from ..inference import SamplingParams
        from ..inference.sampling import GREEDY_BELOW

        # a greedy config's temperature (often 0) is not a sampling one: requests that sample give their own
        sampled = {} if (self.gc.temperature or 0) >= GREEDY_BELOW else {"temperature": 1.0}
        return [SamplingParams.from_generation_config(self.gc, do_sample=True, **sampled),
                SamplingParams.from_generation_config(self.gc, do_sample=False)]

    # -- request -> engine input ------------------------------------------------------------------------

    def adapter_for(self, model: str) -> str | None:
        if model == self.base_name:
            return None
        if model in self.adapter_names:
            return peft_adapter_name(model)  # (as load_served_model loaded it)
        names = ", ".join([self.base_name, *self.adapter_names])
        raise APIError(404, f"The model {quoted(model, ECHO_CHARS, length=True)} does not exist (served: {names})",
                       "model", "model_not_found")

    def turns(self, body: ChatCompletionRequest) -> tuple[react.Turns, list[dict]]:
        """(the messages' turns, function dicts): the ReAct layout with functions, plain chat without. A call that
        tool_choice forces is started for the model (`Turns.reply_start`)."""
        try:
            functions = react.functions_from(body.functions, body.tools)  # (each definition checked there)
            choice = body.call_choice()
            forced = forced_call(choice, functions, "functions" if body.functions else "tools")
            if functions and choice.mode != "none":
                turns = react.build_turns(body.messages, functions)
                if choice.mode in ("required", "function"):
                    if turns.continues_assistant:
                        what = "'required'" if choice.mode == "required" else "naming a function"
                        raise APIError(400, f"{choice.field} {what} starts the reply with a call, but the last "
                                       "message is an assistant message, which is continued as written: drop it "
                                       "or the tool choice", choice.field)
                    turns.reply_start = react.call_start(forced, after_result=turns.query is None)
                    turns.forced_call = forced
                return turns, functions
            turns = react.build_turns(body.messages, [])
            if turns.query is None and not turns.continues_assistant:
                # a tool result with tool_choice "none", or with no tools in the request: the open ReAct turn went
                # on after "Thought:" with no instruction and no "Observation:" stop, and the client got the ReAct
                # text ("I now know the final answer.\nFinal Answer: ...", or an invented call and observation) as
                # its answer. Laid out as with the tools where the request has them, the turn is closed with the
                # official final-answer thought: the model writes the answer
                if functions:
                    turns = react.build_turns(body.messages, functions)
                user, segments = turns.pairs[-1]
                turns.pairs[-1] = (user, segments + [(FINAL_ANSWER_OPEN, False)])
            return turns, []
        except react.ReactError as e:
            raise APIError(400, f"{e.field}: {e}" if e.field else str(e), e.field) from None

    def prompt(self, body: ChatCompletionRequest) -> tuple[list[int], list[dict]]:
        """(prompt ids, function dicts): make_context over the messages' turns (ReAct with functions)."""
        turns, functions = self.turns(body)
        return self.prompt_ids(turns), functions

    def prompt_ids(self, turns: react.Turns, stats: dict | None = None) -> list[int]:
        return react.prompt_ids(self.tokenizer, turns, self.window, stats)

    def params(self, body: SamplingRequest, prompt_len: int, left_out: int = 0, source: str = "messages",
               default_max: int | None = None):
        """The request's SamplingParams; ``left_out``: the oldest history pairs its prompt left out (the limit's
        errors say so, since the messages' own length is more than the count they give). ``source``: the field
        the prompt came from (the limit's errors name it); ``default_max``: the reply's length where the request
        gives none (default: the generation config's max_new_tokens), capped by what the length limit leaves."""
        from ..inference import SamplingParams

        limit = self.max_model_len
        after = (f" after the oldest {left_out} user/assistant pair{'s' if left_out > 1 else ''} left out to fit the "
                 f"model's max_window_size {self.window}, as model.chat does" if left_out else "")
        noun = "the messages" if source == "messages" else f"the {source}"
        has = "have" if source == "messages" else "has"
        counted = f"{prompt_len} in {noun}{after}"
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but {noun} {has} "
                           f"{prompt_len} tokens{after} (no room for a reply). Shorten {noun}.", source,
                           "context_length_exceeded")
        wanted = body.max_new_tokens()
        if wanted is not None and prompt_len + wanted > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{prompt_len + wanted} tokens ({counted}, {wanted} in the "
                           f"completion). Reduce the length of {noun} or {body.max_tokens_field()}.",
                           body.max_tokens_field(),
                           "context_length_exceeded")
        if wanted is None and body.min_tokens and prompt_len + body.min_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"at least {prompt_len + body.min_tokens} tokens ({counted}, "
                           f"min_tokens {body.min_tokens}). Reduce the length of {noun} or min_tokens.",
                           "min_tokens", "context_length_exceeded")
        # (without max_tokens the default length grows to min_tokens: capped to it, a reply ended with "length"
        # before the minimum the client asked for)
        default = default_max or self.gc.max_new_tokens or 512
        over: dict = {"max_new_tokens": wanted if wanted is not None
                      else max(min(default, limit - prompt_len), body.min_tokens or 0)}
        if body.temperature is not None:
            # below 0.01 is greedy, as in the official server: scores divided by a tiny temperature overflow
            # fp32 (1e-40: inf, then NaN), and a seeded row's draw raises, failing the step for every row
            if body.temperature < GREEDY_BELOW:
                over["do_sample"] = False
            else:
                over.update(do_sample=True, temperature=body.temperature)
        if body.top_p == 0:  # the nucleus of the most likely token alone: greedy (OpenAI takes 0; the engine's
            over["do_sample"] = False  # top-p is in (0, 1])
        elif body.top_p is not None:
            over["top_p"] = body.top_p
        if body.top_k is not None:
            over["top_k"] = max(body.top_k, 0)  # (-1: off, as vLLM reads it)
        for name in ("min_p", "typical_p"):
            if getattr(body, name) is not None:
                over[name] = getattr(body, name)
        if body.repetition_penalty is not None:
            over["repetition_penalty"] = body.repetition_penalty
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) is not None:
                over[name] = getattr(body, name)
        if body.logprob_count() is not None:
            over["logprobs"] = body.logprob_count()
        if body.prompt_logprobs is not None:
            over["prompt_logprobs"] = body.prompt_logprobs
        bias = body.token_bias()
        if bias:
            self.check_vocabulary("logit_bias", bias)
            over["logit_bias"] = bias
        stop_ids = tuple(dict.fromkeys(body.stop_token_ids or ()))
        self.check_vocabulary("stop_token_ids", stop_ids)
        if body.allowed_token_ids is not None:  # (checked against the vocabulary below: prepare_token_rules)
            over["allowed_token_ids"] = body.allowed_token_ids
        if body.bad_words:
            over["bad_words"] = body.bad_words
        if body.seed is not None:
            over["seed"] = body.seed
        if body.min_tokens:
            over["min_new_tokens"] = body.min_tokens  # (<= max_new_tokens: checked in body.check, or grown above)
        constraint = body.constraint()
        if constraint is not None:
            over[constraint.kind] = constraint.value
        if body.ignore_eos:  # (vLLM's: the model's eos ends the reply no more than <|im_end|> does)
            over["ignore_eos"] = True
        else:
            stop_ids = tuple(dict.fromkeys((*self.gc.eos_token_id, *stop_ids)))
        over["stop_token_ids"] = stop_ids
        params = SamplingParams.from_generation_config(self.gc, **over)
        if body.allowed_token_ids is not None or body.bad_words:
            try:  # (the ids checked and the words tokenized here, off the event loop; submit finds them tokenized)
                self.engine.prepare_token_rules(params)
            except FieldProblem as e:
                raise APIError(400, str(e), e.field) from None
        return params

    def truncation(self, body: SamplingRequest) -> int | None:
        """How many of a prompt's last tokens the request keeps (vLLM's truncate_prompt_tokens; -1: the model's
        maximum context length), or None: all of them. More than that length is a 400 naming the field (vLLM's)."""
        keep = body.truncate_prompt_tokens
        if keep is None:
            return None
        if keep > self.max_model_len:
            raise APIError(400, f"truncate_prompt_tokens ({keep}) is more than the model's maximum context length "
                           f"({self.max_model_len})", "truncate_prompt_tokens")
        return self.max_model_len if keep == -1 else keep

    # -- running a request -------------------------------------------------------------------------------

    def prepare(self, body: ChatCompletionRequest):
        """Check the request and build its prompt -> (prompt ids, params, adapter, stop strings, function dicts,
        the turns, history pairs left out). Runs in a worker thread (see `start`)."""
        try:
            body.check()
            adapter = self.adapter_for(body.model)
            turns, functions = self.turns(body)
            body.check_continuation(turns.continues_assistant)
            if body.logprobs and functions:  # (their tokens are the ReAct text, not the message's)
                raise APIError(400, "logprobs cannot be combined with tools or functions (unless tool_choice is "
                               "\"none\"): the reply's tokens are its ReAct text, not the message", "logprobs")
            constraint = body.constraint()
            if constraint is not None:
                constrained_reply_problem(constraint.field, functions, turns.continues_assistant)
            keep = self.truncation(body)
            stats: dict = {}
            ids = self.prompt_ids(turns, stats)
            if keep is not None:  # (the ChatML prompt's last tokens, as vLLM cuts the chat template's output)
                ids = ids[-keep:]
        except RecursionError:  # JSON nested as deep as the parser allows, then written out again (repr, dumps)
            raise APIError(400, "the request body nests JSON too deeply") from None
        left_out = stats["history_left_out"]
        params = self.params(body, len(ids), left_out)
        if constraint is not None:
            try:  # (compiled here, off the event loop that submits it)
                self.engine.prepare_constraint(params)
            except ValueError as e:
                why = clipped(str(e).removeprefix(f"{constraint.kind}: "))
                raise APIError(400, f"{constraint.param}: {why}", constraint.param) from None
        stop = react.stop_words(body.stop_list(), functions)
        return ids, params, adapter, stop, functions, turns, left_out

    def check_vocabulary(self, field: str, ids) -> None:
        """A 400 naming ``field`` for its first token id outside the model's vocabulary (the engine's submit would
        refuse it with no field named)."""
        if ids and (why := vocabulary_problem(field, ids, self.engine.vocab)) is not None:
            raise APIError(400, why, field)

    def submit_rows(self, prompts: list[tuple], n: int, adapter, make_run) -> list[Run]:
        """Submit n rows for each (prompt ids, params) of ``prompts`` (choice j > 0 of a seeded prompt with seed + j,
        so that the choices differ and repeat) -> their Runs, from ``make_run(k)`` (k: the prompt's index) with the
        request and its queue set. More rows than the server holds is a 400 naming n, a full queue a 429 that frees
        the rows taken before it, a stopping server a 503."""
        rows = n * len(prompts)
        if rows > self.worker.capacity:
            asks = f"n={n} asks for {n} replies" if len(prompts) == 1 else f"{len(prompts)} prompts x n={n} ask for " \
                f"{rows} replies"
            raise APIError(400, f"{asks} at once, each a row of the batch: more than this server holds "
                           f"({self.worker.capacity}: --max-batch {self.max_batch} + --max-queue {self.max_queue})",
                           "n" if len(prompts) == 1 else "prompt")
        runs: list[Run] = []
        try:
            for k, (ids, params) in enumerate(prompts):
                for j in range(n):
                    each = params if j == 0 or params.seed is None else dataclasses.replace(
                        params, seed=(params.seed + j) % 2**64)
                    try:
                        started = self.worker.submit(ids, each, adapter)
                    except ValueError as e:  # the engine's own checks (the server's should make this unreachable)
                        raise APIError(400, str(e)) from None
                    except Closed:  # (a request that arrived while the server stops)
                        raise APIError(503, "the server is shutting down", None, "server_shutting_down") from None
                    if started is None:
                        raise APIError(429, f"The server is busy: {self.worker.capacity} requests are in flight "
                                       f"(--max-batch {self.max_batch} + --max-queue {self.max_queue})"
                                       + (f", and this one asks for {n} (n)" if len(prompts) == 1 and n > 1 else
                                          f", and this one asks for {rows} ({len(prompts)} prompts x n={n})"
                                          if rows > 1 else "")
                                       + ". Retry later.", None, "queue_full")
                    run = make_run(k)
                    run.req, run.queue = started
                    runs.append(run)
        except APIError:
            for run in runs:  # (the choices started before one could not: their rows are freed)
                run.req.cancel()
            raise
        return runs

    async def start(self, body: ChatCompletionRequest):
        # tokenizing a big body takes seconds: off the event loop, or every other client's stream (and /health)
        # would stall meanwhile (tiktoken releases the GIL while it encodes)
        ids, params, adapter, stop, functions, turns, left_out = await run_in_threadpool(self.prepare, body)
        # a reply continuing the client's assistant message is sent as generated (its leading space joins it
        # to that text), as the official text completion returns it; other replies are stripped as chat()'s
        strip = not turns.continues_assistant
        after_result = turns.query is None and not turns.continues_assistant
        if left_out:  # as model.chat leaves them out; said in the log and the response's LEFT_OUT_HEADER
            logger.info("a request's %d oldest user/assistant pairs left out of its prompt: over max_window_size %d",
                        left_out, self.window)
        kept = body.stop_list() if body.include_stop_str_in_output else ()

        def run(_):
            text = TextStream(self.tokenizer, stop, strip=strip, min_ids=params.min_new_tokens, kept=kept)
            return Run(self.tokenizer, None, None, text, len(ids), left_out, after_result, turns.reply_start,
                       turns.forced_call)

        runs = self.submit_rows([(ids, params)], body.n or 1, adapter, run)
        return runs, functions


# -- a chat completion's reply -----------------------------------------------------------------------------


def constrained_reply_problem(field: str, functions: list, continues: bool) -> None:
    """A constraint (``field``: response_format's JSON, vLLM's guided_* / structured_outputs) where the reply cannot
    be held to it: a 400 naming the field."""
    if functions:  # (a ReAct reply is Thought/Action text; held to JSON it could call nothing)
        raise APIError(400, f"{field} cannot be combined with tools or functions (unless tool_choice is \"none\"): "
                       "the reply is either a call or the constrained text. For a reply in a schema beside tools, "
                       "give the schema as a tool's parameters", field)
    if continues:
        raise APIError(400, f"{field} cannot continue a last assistant message (the constrained text starts with the "
                       f"reply): drop that message or {field}", field)


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def _body_problem(request: Request, err: dict) -> str:
    """Why the body as a whole is no request: empty, not sent as JSON, or JSON that is no object."""
    content_type = request.headers.get("content-type", "")
    if err.get("type") == "missing":
        return "the request body is empty: send a JSON object with 'Content-Type: application/json'"
    media = content_type.split(";")[0].strip().lower()
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        got = f"got {quoted(content_type, ECHO_CHARS, length=True)}" if content_type else "none was given"
        return f"the request body must be JSON sent with 'Content-Type: application/json' ({got})"
    return f"the request body must be a JSON object, got {react.json_type(err.get('input'))}"


class DuplicateKey(ValueError):
    """A JSON object in the request body that names a key twice."""


def _one_of_each(pairs: list[tuple]) -> dict:
    """The JSON reader's object hook: Python's json keeps a repeated key's last value without a word, so a body
    like {"max_tokens": 4, "max_tokens": 400} would run with one of two values the client sent."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise DuplicateKey(f"the request body names the key {quoted(key, ECHO_CHARS, length=True)} twice in one "
                           "object: send each key once")
    return obj


class StrictJSONRequest(Request):
    """FastAPI reads the body through ``Request.json()``: this one refuses repeated keys (``_one_of_each``)."""

    async def json(self):
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), object_pairs_hook=_one_of_each)
        return self._json


class StrictJSONRoute(APIRoute):
    """The app's routes, handed a StrictJSONRequest."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request):
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


def _unparsable(cause: Exception) -> str:
    """FastAPI's 400 "There was an error parsing the body", with what was wrong."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8 ({cause.reason} at byte {cause.start})"
    if isinstance(cause, DuplicateKey):
        return str(cause)
    if isinstance(cause, RecursionError):  # (from ~980 levels: the reader's recursion and the server's frames)
        return "the request body nests too deeply: arrays and objects more than a few hundred levels deep (a chat " \
               "request needs a few)"
    if type(cause) is ValueError:  # json's int() past Python's digit limit (its words advise a Python setting)
        return (f"the request body holds a number of more than {sys.get_int_max_str_digits()} digits (no field "
                "takes one)")
    return f"the request body is not valid JSON: {cause}"


class BodyLimit:
    """A request body over `limit` bytes gets a 413 before anything parses it: a declared Content-Length at once,
    a chunked body as soon as it passes the limit; a compressed one (Content-Encoding) gets a 415. The body read
    here is handed on to the app as one message."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send, 0)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending: no one to answer
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(scope, receive, send, size, message.get("more_body", False))
                return
            if not message.get("more_body", False):
                break
        encoding = headers.get(b"content-encoding", b"").strip().lower()
        if size and encoding not in (b"", b"identity"):
            # the body is not decoded here: a gzip one read as "the request body is not valid UTF-8 (invalid
            # start byte at byte 1)"
            name = encoding.decode("latin-1")
            err = APIError(415, f"Content-Encoding {quoted(name, ECHO_CHARS, length=True)} is not supported: send "
                           "the request body uncompressed")
            await _send_json(send, 415, err)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # then the connection's own messages (the disconnect watchers wait for)
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, read: int, more: bool = True) -> None:
        """Answer 413, after the rest of the body (``_drop_body``)."""
        if await _drop_body(scope, receive, read, more, 4 * self.limit) is None:
            return
        err = APIError(413, f"the request body is over {self.limit} bytes", None, "request_too_large")
        await _send_json(send, 413, err, close=True)


async def _drop_body(scope, receive, read: int, more: bool, cap: int) -> bool | None:
    """Read and drop the rest of a request body before an error answer, up to ``cap`` bytes in all: closing a
    connection with unread bytes makes the kernel reset it, and a client still sending then loses the answer too.
    -> whether some is left unread (the answer must close the connection), None when the client left meanwhile.
    Nothing is read from a client that sent "Expect: 100-continue" and no body yet: it sends its body only after
    the server's "100 Continue", which uvicorn writes at the app's first read, so the error comes first and the
    connection closes (a client over the size limit or without the key uploaded up to 64 MiB for nothing)."""
    if read == 0 and any(name == b"expect" and value.strip().lower() == b"100-continue"
                         for name, value in scope["headers"]):
        return True
    while more and read <= cap:
        message = await receive()
        if message["type"] != "http.request":  # the client left while sending: no one to answer
            return None
        read += len(message.get("body", b""))
        more = message.get("more_body", False)
    return more


async def _send_json(send, status: int, err: APIError, close: bool = False, headers: list | None = None) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *(headers or [])]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": body})


def key_problem(api_key: str | None, header: bytes) -> str | None:
    """Why an Authorization header value does not carry `api_key` ("missing" / "incorrect"), or None when it does
    (or no key is set)."""
    if api_key is None:
        return None
    # header values arrive as bytes (Latin-1 text to Starlette): compared with the key's UTF-8 bytes, so a
    # non-ASCII key matches the bytes a client sends for it
    scheme, _, key = header.partition(b" ")
    if scheme.lower() == b"bearer" and secrets.compare_digest(key.strip(), api_key.encode()):
        return None
    return "missing" if not header or (scheme.lower() == b"bearer" and not key.strip()) else "incorrect"


# Keyed besides /v1/*: vLLM leaves its tokenizer routes and metrics open, but the first spend the server's CPU on
# any text sent and the metrics name the models served
KEYED = ("/tokenize", "/detokenize", "/metrics")


class KeyFirst:
    """The API key of /v1/* (and KEYED) checked before the body is read: a client without the key got a 400 for a
    body that is not JSON and a 413 for one over the limit, and had the server parse up to MAX_BODY_BYTES of JSON,
    before its 401. The body is read and dropped first (``_drop_body``), as for a 413.
    OPTIONS is left to the CORS middleware outside (a browser's preflight carries no key) or the router's 405."""

    def __init__(self, app, server: Server, limit: int):
        self.app, self.server, self.limit = app, server, limit

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or self.server.api_key is None or scope["method"] == "OPTIONS"
                or not (scope["path"] == "/v1" or scope["path"].startswith("/v1/") or scope["path"] in KEYED)):
            await self.app(scope, receive, send)
            return
        header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")  # the first
        what = key_problem(self.server.api_key, header)
        if what is None:
            await self.app(scope, receive, send)
            return
        more = await _drop_body(scope, receive, 0, True, 4 * self.limit)
        if more is None:
            return
        err = APIError(401, f"{what} API key: send the header 'Authorization: Bearer <key>' with the key given to "
                       "--api-key", None, "invalid_api_key")
        await _send_json(send, 401, err, close=more, headers=[(b"www-authenticate", b"Bearer")])


class BugAsError:
    """A bug (an exception no handler took) answered as an OpenAI error object from inside the CORS middleware.
    Starlette's last-resort handler sits outside every middleware: a browser on an allowed origin got that 500
    without Access-Control-Allow-Origin, and showed a network error instead of it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:  # (a stream already answering: Starlette's handler logs it and ends the connection)
                raise
            logging.getLogger("uvicorn.error").exception("internal error on %s %s", scope["method"], scope["path"])
            await _send_json(send, 500, APIError(500, f"internal error: {type(exc).__name__}"))


def _cors_middleware():
    """Starlette's CORS middleware, its refused preflight answered as an OpenAI error object (it was the plain text
    "Disallowed CORS origin", the one non-JSON error the API gave)."""
    from fastapi.middleware.cors import CORSMiddleware

    class CORS(CORSMiddleware):
        def preflight_response(self, request_headers):
            response = super().preflight_response(request_headers)
            if response.status_code != 400:
                return response
            what = response.body.decode().removeprefix("Disallowed CORS ")  # (origin, method, headers, ...)
            origin = clipped(request_headers.get("origin", ""))
            err = APIError(400, f"CORS preflight from {origin!r} refused: {what} not allowed (allowed origins: "
                           f"{', '.join(self.allow_origins)}; --cors-origin adds one)")
            headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
            return JSONResponse(err.body(), status_code=400, headers=headers)

    return CORS


# Every route create_app serves (HEAD too on the GET ones; a trailing slash is served as without it), as a 404
# names them
SERVED = ("POST /v1/chat/completions, POST /v1/completions, POST /v1/responses, GET /v1/responses/{response_id}, "
          "DELETE /v1/responses/{response_id}, GET /v1/responses/{response_id}/input_items, "
          "POST /v1/responses/{response_id}/cancel, GET /v1/models, "
          "GET /v1/models/{model}, POST /tokenize, POST /detokenize, GET /health (the server's state), GET /metrics "
          "(Prometheus') and GET / (the chat page)")


def create_app(server: Server, max_body: int = MAX_BODY_BYTES) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        server.worker.start()
        yield
        responses.stop_background(server.responses)
        server.worker.stop()

    # no slash redirects: GET /health/ was a 307 to /health, an empty answer to curl without -L (the two routes a
    # client may call with a slash are served with it below; any other path is the 404 naming the routes)
    app = FastAPI(title="qwen-ft serve", lifespan=lifespan, docs_url=None, redoc_url=None, redirect_slashes=False)
    app.router.route_class = StrictJSONRoute  # (before the routes are added below)
    app.state.server = server
    app.add_middleware(BugAsError)  # (innermost: inside the CORS middleware below)
    app.add_middleware(BodyLimit, limit=max_body)
    app.add_middleware(KeyFirst, server=server, limit=max_body)  # (outside BodyLimit: before the body)
    if server.cors_origins:  # outermost: a browser's preflight (OPTIONS, no key) is answered before auth
        # a page reads only the response headers listed here (LEFT_OUT_HEADER was hidden from it)
        app.add_middleware(_cors_middleware(), allow_origins=server.cors_origins,
                           allow_methods=["GET", "POST", "HEAD", "DELETE"], allow_headers=["*"],
                           expose_headers=["Retry-After", LEFT_OUT_HEADER], max_age=600)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 429:  # clients that retry (the openai client does, twice) wait this long first
            headers = {"Retry-After": "1"}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0]
        where = field_path(err.get("loc", ()))
        msg = err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":  # loc: ("body", the character offset)
            detail = (err.get("ctx") or {}).get("error") or msg
            at = err.get("loc", ())[-1:]
            if at and isinstance(at[0], int):
                detail += f" at character {at[0] + 1}"
            return JSONResponse(APIError(400, f"the request body is not valid JSON: {detail}").body(), 400)
        if not where and err.get("type") == "string_unicode" and isinstance(err.get("input"), str):
            # a top-level key with a lone surrogate ("\\ud800" in the JSON), no valid text to match a field by:
            # named as the JSON wrote it (it was "the request body must be a JSON object, got a string")
            key = clipped(json.dumps(err["input"])[1:-1])
            msg = f"{key}: a field name must be valid Unicode text (this one holds a lone surrogate)"
            return JSONResponse(APIError(400, msg, key).body(), 400)
        if err.get("type") == "int_parsing_size":  # pydantic says "input string" of a number such as 1e30 too
            msg = "Input should be an integer; this number is too large for one"
        if not where:  # the body as a whole: pydantic's words ("Field required") would name nothing
            msg = _body_problem(request, err)
        return JSONResponse(APIError(400, f"{where}: {msg}" if where else msg, where or None).body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 400 and isinstance(exc.__cause__, Exception):  # FastAPI could not parse the body
            message = _unparsable(exc.__cause__)
        elif exc.status_code == 404:  # no such route: OpenAI's words, and what is served
            route = f"{request.method} {request.url.path}"
            message = f"Invalid URL ({clipped(route)}): this server serves {SERVED}"
        # (the headers keep a 405's Allow)
        return JSONResponse(APIError(exc.status_code, message).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        # a bug in a middleware (BugAsError answers the app's), still an OpenAI error object (uvicorn logs it)
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}").body(), status_code=500)

    # HEAD too on the GET routes (monitors probe with it; FastAPI answers 405 otherwise)
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        running, waiting = server.engine.occupancy()
        body = {"status": "ok", "in_flight": server.worker.in_flight, "running": running, "waiting": waiting,
                "steps": server.worker.steps, "finished": dict(server.worker.finished)}
        failure = server.worker.failure
        if failure is not None:  # the last engine step failed (and, while steps keep failing, each retry)
            return JSONResponse({**body, "status": "engine_error", "error": failure}, status_code=503)
        return body

    # Prometheus' scrape (metrics.py); with --api-key it needs the key, as the API does (the scraper's
    # `authorization` setting sends it)
    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics():
        text, content_type = server.metrics.exposition()
        return Response(text, media_type=content_type)

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def page():
        return resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    def card(name):
        return {"id": name, "object": "model", "created": server.created, "owned_by": "qwen-finetune",
                "root": server.base_name, "parent": None if name == server.base_name else server.base_name}

    # (also with a trailing slash: the model route below would take "/v1/models/" as the model "")
    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    @app.api_route("/v1/models/", methods=["GET", "HEAD"])
    async def models():
        return {"object": "list", "data": [card(n) for n in (server.base_name, *server.adapter_names)]}

    # the openai client's models.retrieve(name); a name may hold "/" (the adapter names allow it)
    @app.api_route("/v1/models/{name:path}", methods=["GET", "HEAD"])
    async def model(name: str):
        server.adapter_for(name)  # 404 model_not_found, naming what is served, for another name
        return card(name)

    # vLLM's token counting (tokenizing.py): what a prompt costs against --max-model-len before it is sent
    tokenizing.add_routes(app, server)

    # a trailing slash is served, not redirected: a 307 reached curl without -L as an empty answer
    @app.post("/v1/chat/completions")
    @app.post("/v1/chat/completions/")
    async def chat_completions(body: ChatCompletionRequest, http: Request, response: Response):
        runs, functions = await server.start(body)
        cid, created = _completion_id(), int(time.time())
        left_out = {LEFT_OUT_HEADER: str(runs[0].left_out)} if runs[0].left_out else {}
        if body.stream:
            return StreamingResponse(_stream(runs, functions, body, http, cid, created),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache", **left_out})
        try:
            async with watched(runs, http):
                texts = await asyncio.gather(*(run.complete() for run in runs))
        except ClientGone:
            return JSONResponse({}, status_code=499)
        response.headers.update(left_out)
        choices = []
        for i, (run, text) in enumerate(zip(runs, texts)):
            finish = run.finish_reason
            if functions:
                message, call_reason = tool_message(text, functions, body, run, finish)
                finish = finish_with_call(finish, call_reason)
            else:
                message = {"role": "assistant", "content": text}
            logprobs = ({"content": run.logprobs(0, as_ids=bool(body.return_tokens_as_token_ids)), "refusal": None}
                        if body.logprobs else None)
            choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": logprobs})
        out = {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
               "choices": choices, "usage": request_usage(runs)}
        if body.prompt_logprobs is not None:  # (vLLM's: the prompt all choices share, scored once in each row)
            out["prompt_logprobs"] = runs[0].prompt_logprobs(as_ids=bool(body.return_tokens_as_token_ids))
        return out

    # OpenAI's legacy completions (completions.py): the prompt continued as written
    @app.post("/v1/completions")
    @app.post("/v1/completions/")
    async def text_completions(body: CompletionRequest, http: Request):
        return await completions.respond(server, body, http)

    # OpenAI's Responses API (responses.py): a chat completion underneath, in the Responses shapes
    @app.post("/v1/responses")
    @app.post("/v1/responses/")
    async def responses_route(body: responses.ResponsesRequest, http: Request, response: Response):
        return await responses.respond(server, body, http, response)

    responses.add_routes(app, server)  # the stored responses

    return app


async def _stream(runs: list[Run], functions, body: ChatCompletionRequest, http: Request, cid: str, created: int):
    """Server-sent chunks in OpenAI's format, ending with `data: [DONE]`: each choice's role chunk, then its deltas
    and its finishing chunk as they come (the choices of n > 1 interleaved, each chunk naming its index), then the
    usage chunk where asked.

    With functions/tools a reply can only be told apart (call or answer) once it is complete, so it is
    generated whole and sent as one delta (a tool call, or the answer's text) before the finishing chunk."""
    options = body.stream_options
    include_usage = bool(options and options.include_usage)
    continuous = include_usage and options.continuous_usage_stats  # (as vLLM: only with include_usage)
    scored = [0] * len(runs)  # each choice's tokens whose log-probabilities went out (with the chunk of their text)

    def chunk(i: int, delta: dict, finish=None, tokens: int = 0, usage: dict | None = None) -> dict:
        """Choice i's chunk; ``tokens``: its tokens when the delta was made (their log-probabilities go with it),
        ``usage``: the request's then (continuous_usage_stats)."""
        logprobs = None
        if body.logprobs and tokens > scored[i]:
            logprobs = {"content": runs[i].logprobs(scored[i], tokens, bool(body.return_tokens_as_token_ids)),
                        "refusal": None}
            scored[i] = tokens
        c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
             "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}
        if continuous:
            c["usage"] = usage or request_usage(runs)
        elif include_usage:
            c["usage"] = None
        return c

    async def choice(i: int, run: Run):
        """One choice's chunks: its deltas (with functions, its whole message as one), then its finishing chunk."""

        def made(delta, finish=None):
            return chunk(i, delta, finish, run.completion_tokens, request_usage(runs) if continuous else None)

        if functions:
            text = await run.complete()
            message, call_reason = tool_message(text, functions, body, run, run.finish_reason)
            if call_reason == "tool_calls":
                calls = [dict(c, index=k) for k, c in enumerate(message["tool_calls"])]
                delta = {"content": message["content"], "tool_calls": calls}
            elif call_reason == "function_call":
                delta = {"content": message["content"], "function_call": message["function_call"]}
            else:
                delta = {"content": message["content"]}
            if delta.get("content") or len(delta) > 1:
                yield made(delta)
            finish = finish_with_call(run.finish_reason, call_reason)
        else:
            async for delta in run.deltas(every_step=continuous):
                yield made({"content": delta})
            finish = run.finish_reason
        yield made({}, finish)

    for i in range(len(runs)):
        yield sse(chunk(i, {"role": "assistant", "content": ""}))
    try:
        async for event in merged(runs, http, [choice(i, run) for i, run in enumerate(runs)]):
            yield event
    except StreamEnded:
        return
    if include_usage:
        yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [], "usage": request_usage(runs)})
    yield sse("[DONE]")
