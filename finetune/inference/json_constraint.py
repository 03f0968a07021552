"""Replies held to a JSON schema: which tokens each constrained row may take next.

llguidance (the structured-output engine vLLM and SGLang use; Rust, no dependencies) compiles a JSON schema into a
grammar over the tokenizer's byte-level tokens and, for each row, computes the tokens that keep the reply a prefix of
some document the schema accepts (one row: 0.045 ms a step on the host at the median, 1.7 ms at most, for Qwen's
152k tokens; benchmarks/json_mask_cost.py). A hand-written one would be a JSON-schema parser walked over every token
of the vocabulary each step: the field has a correct, fast library.

What the grammar allows: <|im_end|> only where the document is complete (so a reply ends with finish "stop" only
as valid JSON; one cut by max_new_tokens ends with "length"), no special token anywhere, and json.dumps' separators
(", " and ": ") with no other whitespace, so a model cannot spend its tokens on spaces or newlines (a schema's
"x-guidance" options, llguidance's, may say otherwise). ``{}`` (or
``True``) accepts any JSON document, ``{"type": "object"}`` any object (OpenAI's "json_object" mode).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import torch

# json.dumps' separators and no other whitespace (llguidance's default allows any run of it between tokens, which a
# random model filled to max_new_tokens with newlines); a schema's own "x-guidance" options override these
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# schemas whose compiled matcher an engine keeps (least recently used dropped): a large one took 80-120 ms to compile
# (2,000 anyOf branches, 3,000 properties), and distinct schemas from clients must not grow memory without bound
KEPT_SCHEMAS = 64
INSTALL = "pip install llguidance (or the project's serve extra: pip install -e \".[serve]\")"


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ImportError(f"a JSON schema reply needs the llguidance package: {INSTALL}") from None
    return llguidance


def _grammar(schema) -> str:
    """The llguidance grammar of ``schema`` (a dict or True), or ValueError saying what is wrong with it (one
    line)."""
    if schema is not True and not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    llg = _llguidance()
    try:  # (True, JSON Schema's "anything", takes no options: {} says the same)
        grammar = llg.LLMatcher.grammar_from_json_schema({} if schema is True else schema, defaults=LAYOUT)
    except (ValueError, TypeError) as e:  # (not JSON-serialisable)
        raise ValueError(" ".join(str(e).split())) from None
    problem = llg.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(" ".join(problem.split()))
    return grammar


def schema_problem(schema) -> str | None:
    """What is wrong with ``schema`` (one line), or None: checked without a tokenizer, for the server's 400."""
    try:
        _grammar(schema)
    except ValueError as e:
        return str(e)
    return None


class JsonConstraints:
    """An engine's constraints: its tokenizer as llguidance reads it (built on first use, ~0.5 s for Qwen's
    vocabulary), each schema compiled once into a matcher at its start (the last KEPT_SCHEMAS kept), and a copy of
    it for each constrained row (~0.01 ms)."""

    def __init__(self, encoding, vocab: int, end_id: int):
        self._encoding, self._vocab, self._end_id = encoding, vocab, end_id
        self._tokenizer = None
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()  # (submit runs on any thread)

    def check(self, schema):
        """The compiled matcher of ``schema`` at its start (ValueError "json_schema: what is wrong"), cached by the
        schema's JSON text. The compile drops the GIL; the engine's step only copies the result (``matcher``)."""
        key = json.dumps(schema, sort_keys=True, default=repr)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
            try:
                grammar = _grammar(schema)
            except ValueError as e:
                raise ValueError(f"json_schema: {e}") from None
            if self._tokenizer is None:
                from llguidance.tiktoken import lltokenizer_from_encoding

                self._tokenizer = lltokenizer_from_encoding(self._encoding, n_vocab=self._vocab,
                                                            eos_token=self._end_id)
            compiled = _llguidance().LLMatcher(self._tokenizer, grammar, log_level=0)
            if compiled.is_error():  # (validated above without the tokenizer; this one reads its tokens)
                raise ValueError(f"json_schema: {' '.join(compiled.get_error().split())}")
            self._compiled[key] = compiled
            if len(self._compiled) > KEPT_SCHEMAS:
                self._compiled.popitem(last=False)
            return compiled

    def matcher(self, schema):
        """A fresh llguidance matcher for one row's reply."""
        return self.check(schema).deep_copy()

    def allowed(self, matchers: list, device) -> torch.Tensor:
        """[len(matchers), vocab] bool on ``device``: the tokens each matcher accepts next. A matcher that failed
        (it cannot: the masks keep every row inside its grammar, but llguidance has resource limits) allows only
        <|im_end|>, so its row ends."""
        words = (self._vocab + 31) // 32
        bits = torch.empty(len(matchers), words, dtype=torch.int32, pin_memory=device.type == "cuda")
        for i, m in enumerate(matchers):
            if m.is_error():
                bits[i].zero_()
                bits[i, self._end_id // 32] = 1 << (self._end_id % 32) if self._end_id % 32 < 31 else -(2**31)
            else:
                row = bits[i]
                m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        bits = bits.to(device, non_blocking=True)
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        return ((bits[:, :, None] >> shifts) & 1).bool().view(len(matchers), -1)[:, : self._vocab]


__all__ = ["JsonConstraints", "schema_problem"]
