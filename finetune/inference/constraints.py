"""Replies held to a JSON schema, a regular expression, a list of choices or a grammar: which tokens each such row may
take next.

llguidance (the structured-output engine vLLM and SGLang use; Rust, no dependencies) compiles the constraint into a
grammar over the tokenizer's byte-level tokens and, for each row, computes the tokens that keep the reply a prefix of
some text the grammar accepts (one row of a JSON schema: 0.045 ms a step on the host at the median, 1.7 ms at most,
for Qwen's 152k tokens; benchmarks/json_mask_cost.py). A hand-written one would be a parser walked over every token
of the vocabulary each step: the field has a correct, fast library.

The kinds (a SamplingParams sets at most one; ``SamplingParams.constraint()``):
- ``json_schema``: a JSON schema (a dict; ``{}`` or ``True``: any JSON document; ``{"type": "object"}``: any object,
  OpenAI's "json_object" mode). The layout is json.dumps' separators (", " and ": ") with no other whitespace, so a
  model cannot spend its tokens on spaces or newlines (a schema's "x-guidance" options, llguidance's, may say
  otherwise).
- ``regex``: the whole reply matches the regular expression (Rust's regex syntax, as llguidance reads it).
- ``choice``: the reply is one of the strings, exactly.
- ``grammar``: the reply is a sentence of a context-free grammar in Lark's syntax (llguidance's dialect) or GBNF
  (llama.cpp's, converted to Lark by llguidance), as vLLM's guidance backend reads its guided_grammar.
In every kind <|im_end|> is allowed only where the text is complete (so a reply ending with finish "stop" is one the
constraint accepts; one cut by max_new_tokens ends with "length"), and no special token anywhere.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import torch

KINDS = ("json_schema", "regex", "choice", "grammar")
# json.dumps' separators and no other whitespace (llguidance's default allows any run of it between tokens, which a
# random model filled to max_new_tokens with newlines); a schema's own "x-guidance" options override these
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# constraints whose compiled matcher an engine keeps (least recently used dropped): a large schema took 80-120 ms to
# compile (2,000 anyOf branches, 3,000 properties), and distinct ones from clients must not grow memory without bound
KEPT = 64
INSTALL = "pip install llguidance (or the project's serve extra: pip install -e \".[serve]\")"


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ImportError(f"a constrained reply (JSON schema, regex, choice, grammar) needs the llguidance package: "
                          f"{INSTALL}") from None
    return llguidance


def _grammar(kind: str, value) -> str:
    """The llguidance grammar of one constraint, or ValueError saying what is wrong with it (one line)."""
    llg = _llguidance()
    try:
        if kind == "json_schema":
            if value is not True and not isinstance(value, dict):
                raise ValueError(f"a JSON schema must be an object, got {type(value).__name__}")
            # (True, JSON Schema's "anything", takes no options: {} says the same)
            grammar = llg.LLMatcher.grammar_from_json_schema({} if value is True else value, defaults=LAYOUT)
        elif kind == "regex":
            if not isinstance(value, str):
                raise ValueError(f"a regex must be a string, got {type(value).__name__}")
            grammar = llg.LLMatcher.grammar_from_regex(value)
        elif kind == "choice":
            if not (isinstance(value, (list, tuple)) and value and all(isinstance(c, str) and c for c in value)):
                raise ValueError(f"choices must be a non-empty list of non-empty strings, got {value!r}"[:300])
            # each one a Lark string literal (JSON's escapes), the reply exactly one of them
            grammar = llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
        elif kind == "grammar":
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"a grammar must be a non-empty string (Lark or GBNF), got {value!r}"[:300])
            grammar = llg.grammar_from("grammar", value)  # (GBNF converted to Lark; Lark as it is)
        else:
            raise ValueError(f"unknown constraint kind {kind!r} (one of {', '.join(KINDS)})")
    except TypeError as e:  # (a schema that is not JSON-serialisable)
        raise ValueError(" ".join(str(e).split())) from None
    except ValueError as e:
        raise ValueError(" ".join(str(e).split())) from None
    problem = llg.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(" ".join(problem.split()))
    return grammar


def constraint_problem(kind: str, value) -> str | None:
    """What is wrong with a constraint (one line), or None: checked without a tokenizer, for the server's 400."""
    try:
        _grammar(kind, value)
    except ValueError as e:
        return str(e)
    return None


class Constraints:
    """An engine's constraints: its tokenizer as llguidance reads it (built on first use, ~0.5 s for Qwen's
    vocabulary), each constraint compiled once into a matcher at its start (the last KEPT kept), and a copy of it for
    each constrained row (~0.01 ms)."""

    def __init__(self, encoding, vocab: int, end_id: int):
        self._encoding, self._vocab, self._end_id = encoding, vocab, end_id
        self._tokenizer = None
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()  # (submit runs on any thread)

    def check(self, kind: str, value):
        """The compiled matcher of a constraint at its start (ValueError "<kind>: what is wrong"), cached by its
        kind and JSON text. The compile drops the GIL; the engine's step only copies the result (``matcher``)."""
        key = json.dumps([kind, value], sort_keys=True, default=repr)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
            try:
                grammar = _grammar(kind, value)
            except ValueError as e:
                raise ValueError(f"{kind}: {e}") from None
            if self._tokenizer is None:
                from llguidance.tiktoken import lltokenizer_from_encoding

                self._tokenizer = lltokenizer_from_encoding(self._encoding, n_vocab=self._vocab,
                                                            eos_token=self._end_id)
            compiled = _llguidance().LLMatcher(self._tokenizer, grammar, log_level=0)
            if compiled.is_error():  # (validated above without the tokenizer; this one reads its tokens)
                raise ValueError(f"{kind}: {' '.join(compiled.get_error().split())}")
            self._compiled[key] = compiled
            if len(self._compiled) > KEPT:
                self._compiled.popitem(last=False)
            return compiled

    def matcher(self, kind: str, value):
        """A fresh llguidance matcher for one row's reply."""
        return self.check(kind, value).deep_copy()

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


__all__ = ["Constraints", "KINDS", "constraint_problem"]
