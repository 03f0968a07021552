"""The request bodies of POST /v1/chat/completions and POST /v1/completions, their checks, and OpenAI's error object.

Fields the server does not implement are refused with a 400 naming them when they ask for something
other than their default (a silently ignored `audio` or `ignore_eos` would be a wrong answer), vLLM's
and newer OpenAI fields that change the answer included (`NEUTRAL`); other unknown fields (bookkeeping such
as `user`, `metadata`, `store`; front ends' own keys) are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, NamedTuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, StrictBool, ValidationError
from pydantic_core import PydanticCustomError

from ..errors import lone_surrogate, quoted
from ..inference.sampling import MAX_BAD_WORDS


class APIError(Exception):
    """An OpenAI error object with its HTTP status; `param` names the request field at fault."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# 413 above this: a prompt that fits any context is far smaller, and a body is parsed (and copied) whole
MAX_BODY_BYTES = 16 * 2**20

# How much of a client's value an error message quotes: a 5 MB model name or field name made a 5 MB 404 or 400.
ECHO_CHARS = 200


def clipped(text: str) -> str:
    """A client's text as an error message shows it: whole up to ECHO_CHARS characters, else its start and its
    length."""
    if len(text) <= ECHO_CHARS:
        return text
    return f"{text[:ECHO_CHARS]}... ({len(text):,} characters)"


def _json_number(value):
    """Numbers must be JSON numbers: pydantic's lax mode reads "0.5" as 0.5 and true as 1 (OpenAI refuses both)."""
    if isinstance(value, (str, bool)):
        raise PydanticCustomError("number_type", "Input should be a number, not {kind}",
                                  {"kind": "a string" if isinstance(value, str) else "a boolean"})
    return value


Number = BeforeValidator(_json_number)
# The most stop strings a request may give. OpenAI takes 4, but clients of local servers send more (Continue sends
# its templates' stop lists, often more than 4, to any host but OpenAI's and a few others; vLLM and the official
# server take any number): refused, every request of theirs failed. Bounded: each is looked for after every token.
MAX_STOP = 64
# The most choices a request may ask for (OpenAI's limit); each is a row of the batch, and the server's capacity
# (--max-batch + --max-queue) bounds them further
MAX_CHOICES = 128
# The most tokens a request's logit_bias may name: each is added to its row's logits every step
MAX_BIASED = 1024
# The most stop_token_ids a request may give (a set looked up for every token)
MAX_STOP_IDS = 1024
# seeds seed a torch.Generator, which takes 64 bits: a bigger one failed the engine step, and with it every
# request in the batch
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


# Fields other servers take (vLLM's extra_body, newer OpenAI models') that would change the answer, which this
# server does not implement -> the values that ask for nothing (absent and null too). Ignored, a client asking
# for beam search, its own chat template or a reasoning effort would get an answer made without it and no word why.
# (vLLM's allowed_token_ids, bad_words, truncate_prompt_tokens and prompt_logprobs are served: SamplingRequest's
# fields.)
NEUTRAL: dict[str, tuple] = {
    "best_of": (1,), "use_beam_search": (False,), "echo": (False,), "logits_processors": (),
    "chat_template": (), "documents": (),
    "structural_tag": (), "reasoning_effort": (), "verbosity": ("medium",),  # (OpenAI's default)
}


def _is_neutral(value, neutral: tuple) -> bool:
    """value is null or one of `neutral`, type included (true is no 1, 1.0 is 1)."""
    return value is None or any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False
    # vLLM's extension (with include_usage): every chunk carries the usage so far, and a chunk goes out for every decode step that
    # produced tokens, also when they add no visible text yet (a held-back partial character or stop-string
    # prefix, or tokens that decode to nothing): clients can time and count tokens, not text
    continuous_usage_stats: StrictBool = False


class SamplingRequest(BaseModel):
    """The fields POST /v1/chat/completions and POST /v1/completions share: the model, streaming and how the reply
    is sampled and ended."""

    model_config = ConfigDict(extra="allow")  # (model_extra: checked against NEUTRAL)

    model: str
    stream: StrictBool | None = False  # null is OpenAI's default (false); a string "yes" is no boolean: 400
    stream_options: StreamOptions | None = None
    # NaN and Infinity (Python's json reads them) are no numbers here: allow_inf_nan=False
    temperature: Annotated[float | None, Number] = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    # OpenAI's range: 0 keeps only the most likely token (greedy; Server.params), as the nucleus shrinks to it
    top_p: Annotated[float | None, Number] = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    # Qwen's official server takes it too; -1 is vLLM's "off" (its clients send it), as 0 is here
    top_k: Annotated[int | None, Number] = Field(default=None, ge=-1)
    # vLLM's (transformers' MinPLogitsWarper): a sampled token at least min_p times as likely as the most likely
    min_p: Annotated[float | None, Number] = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    # text-generation-inference's and transformers' TypicalLogitsWarper (after min-p; 1: off)
    typical_p: Annotated[float | None, Number] = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    max_tokens: Annotated[int | None, Number] = Field(default=None, ge=1)
    stop: Any = None  # a string or a list of strings, checked in check() (one message naming `stop`)
    seed: Annotated[int | None, Number] = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    min_tokens: Annotated[int | None, Number] = Field(default=None, ge=0)  # vLLM's: no stop before this many
    # vLLM's: <|im_end|> and the model's eos do not end the reply (max_tokens, a stop string or stop_token_ids do);
    # benchmark clients (vllm bench serve --ignore-eos) send it for replies of a fixed length
    ignore_eos: StrictBool | None = None
    # vLLM's: token ids that end the reply besides <|im_end|> (not part of it); whether each is in the vocabulary is
    # the server's check
    stop_token_ids: list[Annotated[int, Number, Field(ge=0)]] | None = Field(default=None, max_length=MAX_STOP_IDS)
    # vLLM's: the stop string that ended the reply is kept at its end
    include_stop_str_in_output: StrictBool | None = None
    # vLLM's: only these token ids may be sampled (every other logit -inf; classification clients send the ids of
    # their labels). As in vLLM no stop is added: without <|im_end|> among them (or a stop id) the reply runs to
    # max_tokens or a stop string. Whether each is in the vocabulary (and there are no more than it holds) is the
    # engine's check (Engine.prepare_token_rules, which Server.params calls)
    allowed_token_ids: list[Annotated[int, Number, Field(ge=0)]] | None = Field(default=None, min_length=1)
    # vLLM's: words the reply never holds (each as written and after a space; a longer word's last token is banned
    # where the reply ends with its other tokens: SamplingParams.bad_words); each of at most 16 tokens
    bad_words: list[str] | None = Field(default=None, max_length=MAX_BAD_WORDS)
    # vLLM's: only the last k tokens of the prompt (on the chat route the ChatML prompt the messages make) are kept,
    # before the length limit is checked (-1: k is the model's maximum context length; Server.truncation)
    truncate_prompt_tokens: Annotated[int | None, Number] = Field(default=None, ge=-1)
    # vLLM's extension, as Qwen's docs send it (extra_body); default: the model's generation config's. Bounded:
    # seen tokens' scores are divided or multiplied by it, a 1e-40 overflows fp32 to inf, and a sampled row's draw
    # then fails the engine step for every request in the batch (past x100 either way it changes nothing more)
    repetition_penalty: Annotated[float | None, Number] = Field(default=None, ge=0.01, le=100, allow_inf_nan=False)
    n: Annotated[int | None, Number] = Field(default=None, ge=1, le=MAX_CHOICES)  # (choices, each a row)
    # OpenAI's (over the generated tokens; the generation config's repetition_penalty applies beside them)
    presence_penalty: Annotated[float | None, Number] = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: Annotated[float | None, Number] = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    # OpenAI's: {"token id": bias in [-100, 100]} added to the logits (``token_bias()``)
    logit_bias: dict | None = None
    # vLLM's: log-probabilities name each token "token_id:N" (RL and evaluation clients read the ids back)
    return_tokens_as_token_ids: StrictBool | None = None
    # vLLM's: each prompt token's log-probability given the tokens before it, its rank and the k most likely tokens'
    # (Run.prompt_logprobs: in the chat response, in each completions choice; not in streams, as vLLM)
    prompt_logprobs: Annotated[int | None, Number] = Field(default=None, ge=0, le=20)
    # text, json_object or json_schema: the reply held to the schema token by token (``constraint()``; vLLM's
    # guided_json / guided_regex / guided_choice / structured_outputs, in the extra fields, too)
    response_format: Any = None
    _constraint: Any = PrivateAttr(default=False)  # constraint()'s answer once read (False: not yet)

    def check_sampling(self) -> None:
        """Refuse what this server cannot do with the shared fields (a 400 naming the field)."""
        self.token_bias()
        constraint = self.constraint()
        if constraint is not None and self.min_tokens:
            raise APIError(400, f"min_tokens cannot be combined with {constraint.field}: it decides where the reply "
                           "ends", "min_tokens")
        if constraint is not None and self.ignore_eos:  # (a complete document allows only <|im_end|>)
            raise APIError(400, f"ignore_eos cannot be combined with {constraint.field}: the reply ends with "
                           "<|im_end|> once it is complete", "ignore_eos")
        for name, value in (self.model_extra or {}).items():
            if name in NEUTRAL and not _is_neutral(value, NEUTRAL[name]):
                allowed = ["absent", "null", *(json.dumps(n) for n in NEUTRAL[name])]
                raise APIError(400, f"{name} is not supported by this server (only {', '.join(allowed[:-1])} or "
                               f"{allowed[-1]})", name)
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
        if self.prompt_logprobs is not None and self.stream:  # (vLLM's rule: they would all precede the reply)
            raise APIError(400, "prompt_logprobs are not available when stream is true", "prompt_logprobs")
        if self.truncate_prompt_tokens == 0:  # (vLLM's rule: an empty prompt has nothing to continue)
            raise APIError(400, "truncate_prompt_tokens must be an integer >= 1 (the prompt's last tokens kept), or -1 "
                           "for the model's maximum context length", "truncate_prompt_tokens")
        for i, word in enumerate(self.bad_words or ()):
            if not word.strip():  # (tokenized with its leading whitespace stripped: nothing would be left)
                raise APIError(400, f"bad_words[{i}] is empty: give a word (text beyond whitespace)", f"bad_words[{i}]")
            if (why := lone_surrogate(word)) is not None:
                raise APIError(400, f"bad_words[{i}]: {why}", f"bad_words[{i}]")
        if self.min_tokens and self.max_new_tokens() is not None and self.min_tokens > self.max_new_tokens():
            raise APIError(400, f"min_tokens ({self.min_tokens}) is more than {self.max_tokens_field()} "
                           f"({self.max_new_tokens()})", "min_tokens")
        stops = self.stop_list() if isinstance(self.stop, (str, list, type(None))) else [None]
        if len(stops) > MAX_STOP or any(not isinstance(s, str) or not s for s in stops):
            raise APIError(400, f"stop must be a non-empty string or up to {MAX_STOP} non-empty strings", "stop")
        for i, s in enumerate(stops):
            if (why := lone_surrogate(s)) is not None:  # (a stop that no generated text could ever match)
                raise APIError(400, f"stop: {why}", "stop" if isinstance(self.stop, str) else f"stop[{i}]")

    def logprob_count(self) -> int | None:
        """How many alternatives each reply token's log-probabilities list (None: no log-probabilities)."""
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def max_tokens_field(self) -> str:
        return "max_tokens"

    def token_bias(self) -> dict[int, float] | None:
        """``logit_bias`` as token id -> bias, or a 400 naming the entry at fault (whether an id is in the model's
        vocabulary is the server's check)."""
        if not self.logit_bias:
            return None
        if len(self.logit_bias) > MAX_BIASED:
            raise APIError(400, f"logit_bias holds {len(self.logit_bias)} tokens: at most {MAX_BIASED}", "logit_bias")
        out = {}
        for key, value in self.logit_bias.items():
            if not (key.isascii() and key.isdigit()) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not -100 <= value <= 100:  # (NaN fails the range: JSON has none, Python's parser reads it)
                raise APIError(400, f"logit_bias maps token ids (\"50256\") to numbers in [-100, 100], got "
                               f"{clipped(json.dumps(key))}: {clipped(json.dumps(value))}", "logit_bias")
            out[int(key)] = float(value)
        return out

    def _response_format_schema(self) -> dict | bool | None:
        """The JSON schema ``response_format`` holds the reply to (``{"type": "object"}`` for "json_object"), or None
        for text; a 400 naming the field at fault for a form it cannot be."""
        value = self.response_format
        if value is None:
            return None
        kind = value.get("type") if isinstance(value, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "object"}
        if kind != "json_schema":
            shown = json.dumps({"type": kind}) if isinstance(kind, str) else json.dumps(value)
            raise APIError(400, f"response_format {clipped(shown)} is not supported: its type must be \"text\", "
                           "\"json_object\" or \"json_schema\"", "response_format")
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(400, "response_format.json_schema must be an object with the schema under \"schema\"",
                           "response_format.json_schema")
        # no schema: any JSON document (OpenAI's own field is optional); strict false is held to it all the same
        return spec.get("schema", True)

    def constraint(self) -> "Constraint | None":
        """What the reply is held to, from ``response_format`` or vLLM's guided_json / guided_regex / guided_choice
        / structured_outputs (one of them), or None; a 400 naming the field for a bad or a second one. (Read once: a
        large schema takes tens of ms to check.)"""
        if self._constraint is False:
            self._constraint = self._read_constraint()
        return self._constraint

    def _read_constraint(self) -> "Constraint | None":
        found: list[Constraint] = []
        schema = self._response_format_schema()
        if schema is not None:
            found.append(Constraint("json_schema", schema, "response_format", "response_format.json_schema.schema"
                                    if self.response_format.get("type") == "json_schema" else "response_format"))
        extra = self.model_extra or {}
        for name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if extra.get(name) is not None:
                found.append(Constraint(kind, _json_text(extra[name], name) if kind == "json_schema" else extra[name],
                                        name, name))
        outputs = extra.get("structured_outputs")
        if outputs is not None:
            if not isinstance(outputs, dict):
                raise APIError(400, "structured_outputs must be an object (json, regex, choice, grammar or "
                               "json_object)", "structured_outputs")
            for key, value in outputs.items():
                field = f"structured_outputs.{key}"
                if value is None or value is False or key == "disable_fallback":  # (no fallback here to disable)
                    continue
                if key == "json":
                    found.append(Constraint("json_schema", _json_text(value, field), field, field))
                elif key in ("regex", "choice", "grammar"):
                    found.append(Constraint(key, value, field, field))
                elif key == "json_object" and value is True:
                    found.append(Constraint("json_schema", {"type": "object"}, field, field))
                else:
                    raise APIError(400, f"{clipped(field)} is not supported here (json, regex, choice, grammar or "
                                   "json_object)", clipped(field))
        if len(found) > 1:
            raise APIError(400, f"{found[0].field} and {found[1].field} both constrain the reply: give one",
                           found[1].field)
        if not found:
            return None
        from ..inference.constraints import constraint_problem

        problem = constraint_problem(found[0].kind, found[0].value)
        if problem is not None:
            raise APIError(400, f"{found[0].param}: {clipped(problem)}", found[0].param)
        return found[0]


class ChatCompletionRequest(SamplingRequest):
    """The body of POST /v1/chat/completions."""

    messages: list[Any] = Field(min_length=1)
    max_completion_tokens: Annotated[int | None, Number] = Field(default=None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    # a ReAct reply holds one call at most, which both values allow
    parallel_tool_calls: StrictBool | None = None
    # vLLM's: whether the last (assistant) message is continued, or a new turn starts after the messages. Here a
    # last assistant message is always continued (the official server's text completion) and any other gets a
    # new turn: a value saying otherwise is a 400 (checked in Server.prepare, against the messages' turns)
    continue_final_message: StrictBool | None = None
    add_generation_prompt: StrictBool | None = None
    # each reply token's log-probability under the model's raw logits (vLLM's default), with top_logprobs (0-20)
    # alternatives
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int | None, Number] = Field(default=None, ge=0, le=20)
    # output this server cannot produce (OpenAI answers 400 for a model without it; ignored, a client asking for
    # audio or a web search got a text answer with neither and no word why)
    modalities: Any = None
    audio: Any = None
    web_search_options: Any = None

    def check(self) -> None:
        """Refuse what this server cannot do (a 400 naming the field)."""
        if self.top_logprobs is not None and not self.logprobs:  # (OpenAI's rule)
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if self.modalities not in (None, ["text"]):
            raise APIError(400, "only modalities [\"text\"] is supported: this model answers with text only",
                           "modalities")
        for name in ("audio", "web_search_options"):
            if getattr(self, name) is not None:
                raise APIError(400, f"{name} is not supported: this model answers with text only, no audio or "
                               "web search", name)
        self.check_sampling()
        self.call_choice()

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def check_continuation(self, continues: bool) -> None:
        """continue_final_message / add_generation_prompt against what the prompt does (`continues`: it ends in
        the client's own assistant message, continued)."""
        if self.continue_final_message is not None and self.continue_final_message != continues:
            raise APIError(400, "continue_final_message: true needs the last message to be an assistant message"
                           if self.continue_final_message else "a last assistant message is always continued "
                           "here (the official text completion): drop continue_final_message: false or that message",
                           "continue_final_message")
        if self.add_generation_prompt is not None and self.add_generation_prompt == continues:
            raise APIError(400, "a last assistant message is always continued here, with no new turn: drop "
                           "add_generation_prompt: true or that message" if continues else "add_generation_prompt:"
                           " false needs the last message to be an assistant message (it is continued)",
                           "add_generation_prompt")

    def call_choice(self) -> CallChoice:
        """What the reply may or must call: `tool_choice`, or the legacy `function_call` (both: the same choice).
        Whether a named function is among the request's tools is checked where they are read (Server.turns)."""
        choices = [_call_choice(name, value) for name, value in (("tool_choice", self.tool_choice),
                                                                 ("function_call", self.function_call))
                   if value is not None]
        if len(choices) == 2 and choices[0][:2] != choices[1][:2]:
            raise APIError(400, "tool_choice and function_call ask for different things: give one of them",
                           "function_call")
        return choices[0] if choices else CallChoice("auto")



# The most prompts one POST /v1/completions may give (each is n rows; the server's capacity bounds them further)
MAX_PROMPTS = 1024


class CompletionRequest(SamplingRequest):
    """The body of POST /v1/completions (OpenAI's legacy completions, as vLLM serves them): the prompt is the
    model's whole input, continued as written."""

    # a string, a list of strings, a list of token ids or a list of such lists (``prompts()``)
    prompt: Any
    suffix: str | None = None  # (no fill-in-the-middle in Qwen v1: only null or "")
    echo: StrictBool | None = None  # the prompt's text before the completion's (with logprobs, its tokens' too)
    # each completion token's log-probability and the `logprobs` most likely tokens' (0-20; OpenAI's limit is 5,
    # vLLM's 20); with echo, the prompt's tokens' first (lm-eval's log-likelihoods)
    logprobs: Annotated[int | None, Number] = Field(default=None, ge=0, le=20)

    def check(self) -> None:
        """Refuse what this server cannot do (a 400 naming the field)."""
        if self.suffix:
            raise APIError(400, "suffix is not supported: Qwen v1 has no fill-in-the-middle", "suffix")
        self.check_sampling()

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list:
        """The prompts: each a string or a list of token ids (whether each id is in the vocabulary is the server's
        check), or a 400 naming ``prompt``."""
        p = self.prompt
        if isinstance(p, str):
            found = [p]
        elif isinstance(p, list) and p and all(whole_id(t) for t in p):
            found = [p]
        elif isinstance(p, list) and p and all(isinstance(x, str) or (isinstance(x, list) and x and
                                                                      all(whole_id(t) for t in x)) for x in p):
            found = p
        else:
            raise APIError(400, "prompt must be a string, a list of strings, a list of token ids (integers >= 0) or a "
                           "list of such lists, none of them empty", "prompt")
        if len(found) > MAX_PROMPTS:
            raise APIError(400, f"prompt holds {len(found)} prompts: at most {MAX_PROMPTS}", "prompt")
        for i, x in enumerate(found):
            where = "prompt" if found is not p else f"prompt[{i}]"
            if isinstance(x, str) and not x:
                raise APIError(400, f"{where} is empty: give the text the model continues", where)
            if isinstance(x, str) and (why := lone_surrogate(x)) is not None:
                raise APIError(400, f"{where}: {why}", where)
        return found


def whole_id(value) -> bool:
    """A token id as JSON gives it: an integer >= 0 (not true, not 3.0)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Constraint(NamedTuple):
    """What a request holds its reply to: ``kind`` json_schema, regex or choice (SamplingParams' field), its
    ``value``, the request ``field`` that said so, and the ``param`` a 400 about the value names."""

    kind: str
    value: Any
    field: str
    param: str


def _json_text(value, field: str):
    """A JSON schema given as an object or as its JSON text (vLLM takes both); a 400 naming ``field`` for text that is
    no JSON."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"{field}: not a JSON schema ({clipped(str(e))})", field) from None


class CallChoice(NamedTuple):
    """A request's tool_choice: `mode` "auto" (the model decides), "none" (no call), "required" (some call) or
    "function" (a call of `name`); `field`: the request field that said so."""

    mode: str
    name: str | None = None
    field: str = "tool_choice"


def _call_choice(field: str, value) -> CallChoice:
    """tool_choice: "auto", "none", "required" or {"type": "function", "function": {"name": ...}}; the legacy
    function_call: "auto", "none" or {"name": ...} (OpenAI's two forms)."""
    if value in ("auto", "none") or (field == "tool_choice" and value == "required"):
        return CallChoice(value, None, field)
    named = value.get("function") if field == "tool_choice" and isinstance(value, dict) else value
    if (isinstance(value, dict) and isinstance(named, dict) and isinstance(named.get("name"), str)
            and named["name"].strip() and (field == "function_call" or value.get("type") == "function")):
        return CallChoice("function", named["name"], field)
    # (an object quoted as the JSON the client sent, not as Python writes a dict)
    shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    forms = ("'auto' (the model decides), 'none', 'required' or {\"type\": \"function\", \"function\": {\"name\": "
             "...}}" if field == "tool_choice" else "'auto' (the model decides), 'none' or {\"name\": ...}")
    raise APIError(400, f"{field} {quoted(shown, ECHO_CHARS, length=True)} is not supported: {forms}", field)


def validated(model: type[BaseModel], fields: dict):
    """``model`` read from ``fields`` that a route built from its own request (the chat request a Responses or
    tokenize request amounts to): a field the model refuses is a 400 naming it, as the body's own validation is."""
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        err = e.errors()[0]
        where = field_path(err.get("loc", ()))
        raise APIError(400, f"{where}: {err.get('msg', 'invalid value')}", where or None) from None


def field_path(loc) -> str:
    """pydantic's error location ('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return clipped(out)
