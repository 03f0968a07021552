"""Sampling parameters of one request, and the next-token choice for a batch of rows.

The semantics are transformers' (and the official Qwen generation's), after OpenAI's logit_bias added to the logits
(vLLM's allowed_token_ids and bad_words as -inf beside it): repetition penalty over the prompt and the tokens
generated so far (RepetitionPenaltyLogitsProcessor), then OpenAI's presence and frequency penalties over the
generated tokens (``output_penalties``; vLLM's order), stop tokens held back until min_new_tokens, then argmax or
temperature -> top-k -> top-p -> min-p -> typical-p -> multinomial (``pick_one``). Greedy rows are picked together
in one argmax; sampling rows one by one (each may have its own seeded generator), or, for rows without a seed, all
at once with per-row parameters as tensors (``RowSampling``, ``sample_rows``: the same processors, the same
distribution; the draws come from the device's default generator in one batch). A transformers GenerationConfig maps
onto SamplingParams; options the engine does not implement (beams, no_repeat_ngram_size, ...) are named by
``unsupported_options`` so callers can refuse them in one line (or fall back to generate()).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from ..modeling.sampling_ranges import (OFF_VALUES, SAMPLING_RANGES, do_sample_problem, integral, number,
                                        out_of_range, whole, zero_temperature_problem)

# GenerationConfig fields the engine implements (anything else set away from its default is refused).
# A temperature under this decodes greedily at the user-facing doors (the server, `qwen-ft chat`), as the official
# openai_api.py does: scores divided by a tiny temperature overflow fp32 (1e-40: inf, then NaN in the softmax).
GREEDY_BELOW = 0.01
CONSTRAINTS = ("json_schema", "regex", "choice", "grammar")  # SamplingParams' fields that constrain the reply
MAX_LOGPROBS = 20  # the most alternatives a token's log-probabilities list (OpenAI's top_logprobs limit)
# vLLM's bad_words, bounded: a row's words are looked up against its last output token every step, and each one's
# tokens compared with the output's last ones
MAX_BAD_WORDS = 1024
MAX_BAD_WORD_TOKENS = 16


_SUPPORTED = {
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p",
    "repetition_penalty",
    "eos_token_id", "pad_token_id", "bos_token_id", "chat_format", "max_window_size", "transformers_version",
    "use_cache", "return_dict_in_generate", "output_scores", "output_logits", "cache_implementation",
}


def unsupported_options(gc: GenerationConfig) -> list[str]:
    """The generation options set in `gc` (away from transformers' defaults) that the engine does not implement."""
    default = GenerationConfig().to_dict()
    given = gc.to_dict()
    if given.get("max_new_tokens") is not None:  # generate() ignores max_length then (a saved config often has both)
        given.pop("max_length", None)
    return sorted(k for k, v in given.items() if k not in _SUPPORTED and k in default and default[k] != v)


@dataclass
class SamplingParams:
    """How one request is decoded. ``stop_token_ids`` are stops besides <|im_end|>/<|im_start|> (which the
    engine always stops on); stop tokens never appear in the output. ``stop``: strings that end the output at
    the token whose text completes one (that token is the output's last; the caller cuts the text, e.g. at
    ``Request.stop_string``). Neither ends the output before ``min_new_tokens`` tokens. ``json_schema`` / ``regex``
    / ``choice`` / ``grammar``: every token is picked among those that keep the output a prefix of a text the
    constraint accepts (a JSON document of the schema, a full match of the regex, one of the strings, a sentence of
    the grammar), and it ends (<|im_end|>) only once that text is complete (``{"type": "object"}``: any JSON
    object)."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # transformers' MinPLogitsWarper (after top-p): a sampled token's probability must be at least min_p times the
    # most likely one's (0: off)
    min_p: float = 0.0
    # transformers' TypicalLogitsWarper (after min-p): the tokens whose surprise is nearest the distribution's
    # entropy, up to this much probability (1: off)
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    # OpenAI's, in [-2, 2]: subtracted from the score of every token the output holds already (presence), and that
    # many times over for each time it does (frequency); the prompt does not count (as in vLLM)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # OpenAI's: token id -> a number in [-100, 100] added to its logit before anything else (-100 bans it)
    logit_bias: dict | None = None
    # each output token's log-probability under the model (its raw logits' log_softmax, as vLLM reports it) and the
    # `logprobs` most likely tokens' (0-20; None: off): Request.logprobs
    logprobs: int | None = None
    # each prompt token's log-probability given the tokens before it, and the `prompt_logprobs` most likely tokens'
    # (0-20; None: off): Request.prompt_logprobs, from a forward of the whole prompt at its prefill
    prompt_logprobs: int | None = None
    min_new_tokens: int = 0
    seed: int | None = None
    stop_token_ids: tuple = ()
    # vLLM's: <|im_end|>/<|im_start|> do not end the output (they are part of it, as any token); it ends at
    # max_new_tokens, a stop string or one of stop_token_ids (benchmark clients ask for it to get a fixed length)
    ignore_eos: bool = False
    stop: tuple = ()
    # what the reply is held to (constraints.py; at most one): a JSON schema (dict, or True: any JSON), a regular
    # expression the whole reply matches, the strings it is one of, or a grammar (Lark or GBNF); None: free text
    json_schema: dict | bool | None = None
    regex: str | None = None
    choice: tuple | None = None
    grammar: str | None = None
    # vLLM's: only these token ids may be picked (every other logit -inf, for greedy and sampled rows alike). As in
    # vLLM no stop token is added: without <|im_end|> (or a stop id) among them the output runs to max_new_tokens or a
    # stop string. Checked against the vocabulary (and bad_words, min_new_tokens) at submit: Engine.prepare_token_rules
    allowed_token_ids: tuple | None = None
    # vLLM's: words the output never holds. Each is tokenized as written (leading whitespace stripped) and after a
    # space (``bad_word_ids``); a one-token word's token is banned at every step, a longer one's last token at a
    # step where the output (not the prompt) ends with its other tokens
    bad_words: tuple = ()

    def __post_init__(self):
        if isinstance(self.choice, list):
            self.choice = tuple(self.choice)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (str, bytes, dict)) and hasattr(self.stop, "__iter__"):
            self.stop = tuple(self.stop)
        ids = self.stop_token_ids
        if not isinstance(ids, (str, bytes, dict)) and hasattr(ids, "__iter__"):
            # (numpy and torch integers as ints; "12" was read as the ids 1 and 2, 3.7 as 3)
            ids = tuple(int(t) if integral(t) else t for t in ids)
            self.stop_token_ids = ids
        ids = self.allowed_token_ids
        if (ids is not None and not isinstance(ids, (str, bytes, dict, TokenIds))
                and hasattr(ids, "__iter__")):
            self.allowed_token_ids = tuple(int(t) if integral(t) else t for t in ids)
        if isinstance(self.bad_words, str):
            self.bad_words = (self.bad_words,)
        if not isinstance(self.bad_words, (bytes, dict)) and hasattr(self.bad_words, "__iter__"):
            self.bad_words = tuple(self.bad_words)
        self.check()

    def check(self) -> None:
        """ValueError naming every field out of range (also for fields changed after construction: Engine.submit
        checks again)."""
        problems = []
        if not (isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop)):
            problems.append(f"stop must be non-empty strings, got {self.stop!r}")
        if not (isinstance(self.stop_token_ids, tuple) and all(whole(t) and t >= 0 for t in self.stop_token_ids)):
            problems.append(f"stop_token_ids must be token ids (integers >= 0), got {self.stop_token_ids!r}")
        if why := do_sample_problem(self.do_sample):
            problems.append(why)
        if self.seed is not None and not (whole(self.seed) and -(2**63) <= self.seed < 2**64):
            # (what torch.Generator takes: another value failed the engine's step, and with it the rows joining)
            problems.append(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if not whole(self.max_new_tokens) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        problems += [f"{name} {why}" for name in SAMPLING_RANGES
                     if (why := out_of_range(name, getattr(self, name))) is not None]
        if why := zero_temperature_problem(self.do_sample, self.temperature):
            problems.append(why)
        if not (whole(self.min_new_tokens) and 0 <= self.min_new_tokens):
            problems.append(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        if not (number(self.min_p) and 0 <= self.min_p <= 1):
            problems.append(f"min_p must be a number in [0, 1] (0: off), got {self.min_p!r}")
        if not (number(self.typical_p) and 0 < self.typical_p <= 1):
            problems.append(f"typical_p must be a number in (0, 1] (1: off), got {self.typical_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (number(value) and -2 <= value <= 2):
                problems.append(f"{name} must be a number in [-2, 2], got {value!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                problems.append(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
            else:
                bad = [(t, b) for t, b in self.logit_bias.items()
                       if not (whole(t) and t >= 0 and number(b) and -100 <= b <= 100)]
                if bad:
                    problems.append(f"logit_bias maps token ids (integers >= 0) to numbers in [-100, 100], got "
                                    f"{bad[0][0]!r}: {bad[0][1]!r}")
        if self.logprobs is not None and not (whole(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS):
            problems.append(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and not (whole(self.prompt_logprobs)
                                                     and 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            problems.append(f"prompt_logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got "
                            f"{self.prompt_logprobs!r}")
        given = [kind for kind in CONSTRAINTS if getattr(self, kind) is not None]
        if len(given) > 1:
            problems.append(f"{' and '.join(given)} both constrain the reply: give one")
        if self.json_schema is not None and self.json_schema is not True and not isinstance(self.json_schema, dict):
            problems.append(f"json_schema must be a JSON schema (a dict, or True for any JSON), got "
                            f"{type(self.json_schema).__name__}")
        for kind in ("regex", "grammar"):
            if getattr(self, kind) is not None and not isinstance(getattr(self, kind), str):
                problems.append(f"{kind} must be a string, got {type(getattr(self, kind)).__name__}")
        if self.choice is not None and not (isinstance(self.choice, tuple) and self.choice
                                            and all(isinstance(c, str) and c for c in self.choice)):
            problems.append(f"choice must be a non-empty list of non-empty strings, got {self.choice!r}"[:300])
        if given and self.min_new_tokens:  # (the constraint decides where the reply ends; both would mask <|im_end|>)
            problems.append(f"min_new_tokens cannot be combined with {given[0]}: it decides where the reply ends")
        if not isinstance(self.ignore_eos, bool):
            problems.append(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        elif given and self.ignore_eos:  # (a complete document allows only <|im_end|>: the row would repeat it)
            problems.append(f"ignore_eos cannot be combined with {given[0]}: it ends the reply with <|im_end|>")
        ids = self.allowed_token_ids
        if isinstance(ids, TokenIds) or ids is None:
            pass
        elif isinstance(ids, tuple) and ids and all(type(t) is int for t in ids) and min(ids) >= 0:
            # checked once: the seeded choices of a request (dataclasses.replace) and the engine's submit take it
            # as it is (a list of the whole vocabulary took 20 ms a choice to read again, on the server's event loop)
            self.allowed_token_ids = TokenIds(ids)
        else:
            problems.append(f"allowed_token_ids must be None or a non-empty list of token ids (integers >= 0), got "
                            f"{ids!r}"[:300])
        words = self.bad_words
        if not (isinstance(words, tuple) and all(isinstance(w, str) and w.strip() for w in words)):
            problems.append(f"bad_words must be words (strings with text beyond whitespace), got {words!r}"[:300])
        elif len(words) > MAX_BAD_WORDS:
            problems.append(f"bad_words holds {len(words)} words: at most {MAX_BAD_WORDS}")
        if problems:
            raise ValueError("SamplingParams: " + "; ".join(problems))

    def constraint(self) -> tuple[str, object] | None:
        """(kind, value) of what the reply is held to (json_schema, regex, choice or grammar), or None."""
        for kind in CONSTRAINTS:
            if getattr(self, kind) is not None:
                return kind, getattr(self, kind)
        return None

    @classmethod
    def from_generation_config(cls, gc, **overrides) -> "SamplingParams":
        """The parameters a transformers GenerationConfig describes (as model.chat uses it); its eos ids become
        stop ids. Options the engine does not implement (beams, no_repeat_ngram_size, ...) raise ValueError."""
        if not isinstance(gc, GenerationConfig):  # (None failed on its missing to_dict)
            raise ValueError(f"from_generation_config needs a transformers GenerationConfig, got {type(gc).__name__}")
        unsupported = unsupported_options(gc)
        if unsupported:
            raise ValueError(f"generation options not supported by the inference engine: {', '.join(unsupported)}")
        eos = gc.eos_token_id
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        values = {name: off if getattr(gc, name, None) is None else getattr(gc, name)
                  for name, off in OFF_VALUES.items()}  # (None: off, as chat()'s generate() reads it)
        values.update(max_new_tokens=gc.max_new_tokens if gc.max_new_tokens is not None else 512,
                      do_sample=bool(values["do_sample"]), stop_token_ids=eos, min_p=gc.min_p or 0.0,
                      typical_p=1.0 if gc.typical_p is None else gc.typical_p)
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ValueError(f"SamplingParams has no field(s) {', '.join(bad)}")
        values.update(overrides)
        return cls(**values)


class TokenIds(tuple):
    """Token ids (integers >= 0, not empty) that SamplingParams has checked: a copy of the params keeps them as they
    are."""

    __slots__ = ()


class FieldProblem(ValueError):
    """A value of one request field the engine cannot take; ``field`` names it ("bad_words[2]"), and the message
    starts with it (the server's 400 names it as its param)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def bad_word_ids(encode, words, vocab: int) -> list[tuple[int, ...]]:
    """The token sequences that spell ``words`` (``encode``: plain text -> ids), as vLLM finds them
    (SamplingParams.update_from_tokenizer), one rule wider: each word with its leading whitespace stripped, and with
    one space before it where that spells it with other tokens (a word inside a text, after a space) unless those are
    the space's own token and then the word's. vLLM takes the spaced form only where it has as many tokens as the
    plain one, so "the" (two tokens in some vocabularies, " the" one) and "copper" (four, " copper" three in the
    demo's) were never banned inside a text. A word of more than MAX_BAD_WORD_TOKENS tokens, or of a token past the
    model's ``vocab``: FieldProblem naming it."""
    out = []
    for i, word in enumerate(words):
        plain = tuple(encode(word.lstrip()))
        if len(plain) > MAX_BAD_WORD_TOKENS:
            raise FieldProblem(f"bad_words[{i}]", f"bad_words[{i}] is {len(plain)} tokens: at most "
                               f"{MAX_BAD_WORD_TOKENS} a word")
        spaced = tuple(encode(" " + word.lstrip()))
        separate = spaced[1:] == plain  # (the space a token of its own: the plain form's ban covers it)
        for ids in (plain,) if spaced == plain or separate or len(spaced) > MAX_BAD_WORD_TOKENS else (plain, spaced):
            if max(ids) >= vocab:  # (a tokenizer of more tokens than the model's)
                raise FieldProblem(f"bad_words[{i}]", f"bad_words[{i}]: token id {max(ids)} is outside the "
                                   f"model's vocabulary [0, {vocab})")
            out.append(ids)
    return out


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, penalties: torch.Tensor) -> torch.Tensor:
    """transformers' repetition penalty, row-wise: logits [n, V] fp32, seen [n, V] bool, penalties [n]."""
    p = penalties[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen & (p != 1.0), penalised, logits)


def output_penalties(scores: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                     frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's presence and frequency penalties, row-wise: scores [n, V] fp32, counts [n, V] (how often each token
    is in a row's output so far), presence and frequency [n, 1]."""
    return scores - frequency * counts - presence * (counts > 0)


def pick_tokens(scores: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """The next token of each row from its (already penalised and masked) fp32 scores [n, V]."""
    out = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if not p.do_sample]
    if len(greedy) == len(params):  # (one argmax, one transfer)
        return scores.argmax(-1).tolist()
    if greedy:
        idx = torch.tensor(greedy, device=scores.device)
        for i, t in zip(greedy, scores.index_select(0, idx).argmax(-1).tolist()):
            out[i] = t
    for i, p in enumerate(params):
        if p.do_sample:
            out[i] = int(pick_one(scores[i], p, generators[i]))
    return out


def pick_one(scores: torch.Tensor, params, generator=None) -> torch.Tensor:
    """The next token from fp32 scores [V]: argmax, or a sample after temperature, top-k, top-p, min-p and typical-p
    (the order and semantics of transformers' warpers; top_k 0, top_p 1, min_p 0, typical_p 1 and None are off).
    ``params``: a SamplingParams (or any object with its do_sample / temperature / top_k / top_p fields, such as a
    GenerationConfig)."""
    if not params.do_sample:
        return scores.argmax()
    temperature = params.temperature if params.temperature is not None else 1.0
    if temperature != 1.0:
        scores = scores / temperature
    top_k = params.top_k or 0
    if 0 < top_k < scores.shape[0]:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    top_p = params.top_p if params.top_p is not None else 1.0
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores)  # ascending
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - top_p
        remove[-1] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(0, order, remove), -float("inf"))
    min_p = getattr(params, "min_p", None) or 0.0
    if min_p > 0:  # (the most likely token always stays: its probability is the bar's 1 / min_p times)
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < min_p * probs.max(), -float("inf"))
    typical_p = getattr(params, "typical_p", None)
    if typical_p is not None and typical_p < 1.0:
        scores = typical(scores[None], torch.tensor([[typical_p]], device=scores.device))[0]
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[0]


def typical(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """transformers' TypicalLogitsWarper, row-wise: scores [m, V] fp32, mass [m, 1] (a row at 1 or more is kept
    whole). Tokens sorted by how far their surprise is from the entropy are kept until their probability reaches the
    row's mass (the one that crosses it too; at least one)."""
    normalized = scores.log_softmax(-1)
    p = normalized.exp()
    entropy = -(normalized * p).nansum(-1, keepdim=True)  # (nansum: a -inf score's 0 * -inf)
    shifted, order = torch.sort((-normalized - entropy).abs(), dim=-1)
    cumulative = scores.gather(-1, order).softmax(-1).cumsum(-1)
    last = (cumulative < mass).sum(-1, keepdim=True).clamp_(max=scores.shape[-1] - 1)
    remove = (shifted > shifted.gather(-1, last)) & (mass < 1)
    remove[:, 0] = False
    return scores.masked_fill(remove.scatter(-1, order, remove), -float("inf"))


class RowSampling:
    """The sampling parameters of m rows as tensors on ``device`` (built once when the rows change): per-row
    temperature, top-k (0 or >= vocab: off), top-p (1: off), min-p (0: off) and typical-p (1: off)."""

    def __init__(self, params: list[SamplingParams], vocab: int, device):
        ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        self.kmax = max(ks)  # 0: no row uses top-k
        self.any_top_p = any(p.top_p < 1.0 for p in params)
        self.any_min_p = any(p.min_p > 0 for p in params)
        self.any_typical = any(p.typical_p < 1 for p in params)
        host = torch.tensor([[p.temperature for p in params],
                             [k - 1 if k else 0 for k in ks],
                             [1.0 if k else 0.0 for k in ks],
                             # top-p keeps the tokens whose ascending cumulative probability exceeds 1 - top_p;
                             # -1 keeps them all (the row without top-p)
                             [1 - p.top_p if p.top_p < 1.0 else -1.0 for p in params],
                             [p.min_p for p in params],
                             [p.typical_p for p in params]], dtype=torch.float64)
        dev = host.to(device, non_blocking=True)
        self.temperature = dev[0].float()[:, None]
        self.kth = dev[1].long()[:, None]
        self.k_on = dev[2].bool()[:, None]
        self.top_p_cut = dev[3].float()[:, None]
        self.min_p = dev[4].float()[:, None]
        self.typical_p = dev[5].float()[:, None]


def sample_rows(scores: torch.Tensor, rs: RowSampling, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One sampled token per row [m] from fp32 scores [m, V] (already penalised and masked): each row's
    temperature -> top-k -> top-p -> min-p -> typical-p -> a draw from the softmax, as ``pick_one`` computes it for
    that row. The
    draw is multinomial's: argmax of probs / q with q ~ Exp(1) (``noise``, default from the default
    generator); nothing is read back to the host."""
    scores = scores / rs.temperature
    if rs.kmax:
        kth = torch.topk(scores, rs.kmax, dim=-1).values.gather(1, rs.kth)
        kth = kth.masked_fill(~rs.k_on, -float("inf"))
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if rs.any_top_p:
        sorted_scores, order = torch.sort(scores, dim=-1)  # ascending
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= rs.top_p_cut
        remove[:, -1] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    if rs.any_min_p:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < rs.min_p * probs.amax(-1, keepdim=True), -float("inf"))
    if rs.any_typical:
        scores = typical(scores, rs.typical_p)
    probs = scores.softmax(-1)
    q = noise if noise is not None else torch.empty_like(probs).exponential_(1)
    return (probs / q).argmax(-1)


__all__ = ["SamplingParams", "FieldProblem", "RowSampling", "apply_penalties", "bad_word_ids", "output_penalties",
           "pick_tokens", "pick_one", "sample_rows", "typical", "unsupported_options"]
