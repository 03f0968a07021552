"""ChatML prompts and `chat()` / `chat_stream()`, with the official Qwen semantics.

`make_context` builds the prompt token for token as the official `qwen_generation_utils.make_context`: the
system block, then as many past turns as fit in `max_window_size` (newest first), then the query and the
assistant header. Every piece of text is encoded as plain text (a literal "<|im_end|>" in user text stays
ordinary BPE tokens); control tokens enter only by id.

`chat` and `chat_stream` are methods of `QWenLMHeadModel` (bound in model.py). On a PEFT-wrapped model,
`peft_model.chat(...)` reaches them through PEFT's attribute forwarding; LoRA layers are injected into the
wrapped model's own modules, so `self.generate` runs with the adapters active.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Iterator

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

DEFAULT_SYSTEM = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# The official generation_config.json of the Qwen v1 chat models (eos/pad are the vocabulary's <|endoftext|>).
OFFICIAL_GENERATION_DEFAULTS = dict(
    chat_format="chatml",
    max_window_size=6144,
    max_new_tokens=512,
    do_sample=True,
    top_k=0,
    top_p=0.8,
    repetition_penalty=1.1,
)


def make_context(tokenizer, query, history=None, system="", max_window_size=6144, chat_format="chatml"):
    """(raw_text, context_tokens) exactly as the official make_context builds them."""
    if history is None:
        history = []
    if chat_format == "raw":
        return query, list(tokenizer.encode(query))
    if chat_format != "chatml":
        raise NotImplementedError(f"Unknown chat format {chat_format!r}")

    im_start_tokens = [tokenizer.im_start_id]
    im_end_tokens = [tokenizer.im_end_id]
    nl_tokens = tokenizer.encode("\n")

    def _tokenize_str(role, content):
        return f"{role}\n{content}", tokenizer.encode(role) + nl_tokens + tokenizer.encode(content)

    system_text, system_tokens_part = _tokenize_str("system", system)
    system_tokens = im_start_tokens + system_tokens_part + im_end_tokens

    raw_text = ""
    context_tokens: list[int] = []
    for turn_query, turn_response in reversed(history):
        query_text, query_tokens_part = _tokenize_str("user", turn_query)
        query_tokens = im_start_tokens + query_tokens_part + im_end_tokens
        response_text, response_tokens_part = _tokenize_str("assistant", turn_response)
        response_tokens = im_start_tokens + response_tokens_part + im_end_tokens

        next_context_tokens = nl_tokens + query_tokens + nl_tokens + response_tokens
        prev_chat = f"\n{IM_START}{query_text}{IM_END}\n{IM_START}{response_text}{IM_END}"

        if len(system_tokens) + len(next_context_tokens) + len(context_tokens) < max_window_size:
            context_tokens = next_context_tokens + context_tokens
            raw_text = prev_chat + raw_text
        else:
            break

    context_tokens = system_tokens + context_tokens
    raw_text = f"{IM_START}{system_text}{IM_END}" + raw_text
    context_tokens += (
        nl_tokens
        + im_start_tokens
        + _tokenize_str("user", query)[1]
        + im_end_tokens
        + nl_tokens
        + im_start_tokens
        + tokenizer.encode("assistant")
        + nl_tokens
    )
    raw_text += f"\n{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n"
    return raw_text, context_tokens


# The fast decoder chat()/chat_stream() use when one is registered (finetune.inference registers its engine;
# the model itself imports nothing from inference/): fn(model, tokenizer, input_ids [1, T], gc) -> an iterator
# of the new token ids, or None when it does not handle this call (then generate() runs).
_fast_decoder = None


def register_decoder(fn) -> None:
    """Set (or, with None, clear) the fast decoder that chat()/chat_stream() try before generate()."""
    global _fast_decoder
    _fast_decoder = fn


def _fast_tokens(model, tokenizer, input_ids, gc):
    return None if _fast_decoder is None else _fast_decoder(model, tokenizer, input_ids, gc)


def stop_token_ids(tokenizer) -> list[int]:
    return [tokenizer.im_end_id, tokenizer.im_start_id]


def _generation_config(model, tokenizer, generation_config, kwargs) -> tuple[GenerationConfig, int, str]:
    """The config generate() runs with: the given one, else the model dir's generation_config.json (else the
    official defaults), updated with the call's kwargs; eos always includes <|im_end|> and <|im_start|>."""
    if generation_config is None:
        generation_config = getattr(model, "generation_config", None)
        loaded = generation_config is not None and getattr(generation_config, "chat_format", None) is not None
        if not loaded:
            generation_config = GenerationConfig(
                **OFFICIAL_GENERATION_DEFAULTS, eos_token_id=tokenizer.eod_id, pad_token_id=tokenizer.eod_id
            )
    gc = copy.deepcopy(generation_config)
    max_window_size = kwargs.pop("max_window_size", None) or getattr(gc, "max_window_size", None) or 6144
    chat_format = getattr(gc, "chat_format", None) or "chatml"
    if chat_format != "chatml":
        raise ValueError(f"chat() needs chat_format 'chatml', the generation config says {chat_format!r}")
    gc.update(**kwargs)
    eos = gc.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    gc.eos_token_id = list(dict.fromkeys(stop_token_ids(tokenizer) + eos))
    if gc.pad_token_id is None:
        gc.pad_token_id = tokenizer.eod_id
    return gc, max_window_size, chat_format


# -- the official stop words ----------------------------------------------------------------------------------
# The official Qwen code takes `stop_words_ids` (token id sequences) in chat(), chat_stream() and generate(), and
# in generation_config.stop_words_ids for generate(). A row whose ids (prompt included) end with one of them gets
# eos as its next token: the stop word stays in the output, and chat()'s decoding, which cuts at <|im_start|> /
# <|im_end|> only and otherwise drops the last token (the eos), keeps its text in the reply.


def check_stop_words(stop_words_ids) -> list[list[int]]:
    """``stop_words_ids`` as a list of token id lists (None: none); anything else is a ValueError saying what."""
    if stop_words_ids is None:
        return []
    if not isinstance(stop_words_ids, (list, tuple)):
        raise ValueError(f"stop_words_ids must be a list of token id lists, got {type(stop_words_ids).__name__}")
    out = []
    for i, w in enumerate(stop_words_ids):
        if (not isinstance(w, (list, tuple)) or not w
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in w)):
            raise ValueError(f"stop_words_ids[{i}] must be a non-empty list of token ids, got {w!r}")
        out.append([int(t) for t in w])
    return out


def ends_with_stop_word(ids: list[int], stop_words: list[list[int]]) -> bool:
    return any(len(w) <= len(ids) and ids[-len(w):] == w for w in stop_words)


class StopWordsLogitsProcessor(LogitsProcessor):
    """The official generate()'s stop words: a row whose ids end with one of them has its eos logit(s) set to
    2**15, so its next token is eos. (Stop words that are the eos itself are left to generate's own stop.)"""

    def __init__(self, stop_words_ids, eos_token_id):
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos = eos
        self.stop_words = [w for w in check_stop_words(stop_words_ids) if not (len(w) == 1 and w[0] in eos)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.stop_words or not self.eos:
            return scores
        longest = max(len(w) for w in self.stop_words)
        for i, row in enumerate(input_ids[:, -longest:].tolist()):
            if ends_with_stop_word(row, self.stop_words):
                scores[i, self.eos] = float(2**15)
        return scores


def with_stop_words(model, generation_config, logits_processor, stop_words_ids):
    """generate()'s logits processors with the official stop words added: ``stop_words_ids`` when given, else the
    generation config's ``stop_words_ids``, else the model's (as the official generate() looks them up)."""
    if stop_words_ids is None and generation_config is not None:
        stop_words_ids = getattr(generation_config, "stop_words_ids", None)
    if stop_words_ids is None:
        stop_words_ids = getattr(getattr(model, "generation_config", None), "stop_words_ids", None)
    stop_words = check_stop_words(stop_words_ids)
    if not stop_words:
        return logits_processor
    gc = generation_config if generation_config is not None else model.generation_config
    processors = LogitsProcessorList(logits_processor or [])
    processors.append(StopWordsLogitsProcessor(stop_words, gc.eos_token_id))
    return processors


def _until_stop_word(tokens: Iterator[int], context: list[int], stop_words: list[list[int]]) -> Iterator[int]:
    """A token stream that does not apply the stop words itself (the engine's), ended after the token that
    completes one; a prompt that already ends with one gives nothing (its first token would be eos)."""
    if not stop_words:
        yield from tokens
        return
    longest = max(len(w) for w in stop_words)
    ids = list(context[-longest:])
    if ends_with_stop_word(ids, stop_words):
        return
    for t in tokens:
        yield t
        ids = ids[-(longest - 1):] + [t] if longest > 1 else [t]
        if ends_with_stop_word(ids, stop_words):
            return


def _budget(gc, context_len: int) -> int | None:
    """The new tokens generation may make (max_new_tokens, else what max_length leaves)."""
    if gc.max_new_tokens is not None:
        return gc.max_new_tokens
    return None if gc.max_length is None else gc.max_length - context_len


def _cut_response(tokenizer, new_tokens: list[int], stops: set[int], budget: int | None) -> str:
    """chat()'s reply, as the official decode_tokens gives it: cut before the first stop token; a reply that
    used the whole budget without one loses its last token (the official loop over the new tokens leaves its
    index on the last one when nothing breaks it, and decodes the tokens before it)."""
    for i, t in enumerate(new_tokens):
        if t in stops:
            new_tokens = new_tokens[:i]
            break
    else:
        if budget is not None and len(new_tokens) >= budget:
            new_tokens = new_tokens[:-1]
    return tokenizer.decode(new_tokens).strip()  # the project's decode never raises on partial UTF-8


def _prompt(model, tokenizer, query, history, system, generation_config, kwargs):
    """The generation config (model dir defaults, updated by kwargs) and the make_context prompt ids."""
    gc, max_window_size, chat_format = _generation_config(model, tokenizer, generation_config, kwargs)
    _, context_tokens = make_context(tokenizer, query, history=history, system=system,
                                     max_window_size=max_window_size, chat_format=chat_format)
    return gc, torch.tensor([context_tokens], device=model.device)


def chat(
    self,
    tokenizer,
    query: str,
    history: list | None = None,
    system: str = DEFAULT_SYSTEM,
    generation_config: GenerationConfig | None = None,
    stream: bool = False,
    stop_words_ids: list[list[int]] | None = None,
    **kwargs,
) -> tuple[str, list]:
    """One chat turn: (response, history + [(query, response)]). kwargs update the generation config
    (e.g. do_sample=False, max_new_tokens=64) or set max_window_size. ``stop_words_ids``: token id sequences that
    end the reply after them (kept in it), as in the official code."""
    if stream:
        raise ValueError("chat(stream=True) is not supported; use chat_stream(...), which yields the growing response")
    stop_words = check_stop_words(stop_words_ids)
    history = [] if history is None else copy.deepcopy(history)
    gc, input_ids = _prompt(self, tokenizer, query, history, system, generation_config, kwargs)
    fast = _fast_tokens(self, tokenizer, input_ids, gc)  # CUDA: the inference engine (CUDA graphs)
    if fast is not None:
        try:
            new_tokens = list(_until_stop_word(fast, input_ids[0].tolist(), stop_words))
        finally:  # a stop word ends the reply before the engine does: free its row now
            if hasattr(fast, "close"):
                fast.close()
    else:
        outputs = self.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gc,
                                stop_words_ids=stop_words)
        new_tokens = outputs[0, input_ids.shape[1]:].tolist()
    response = _cut_response(tokenizer, new_tokens, set(gc.eos_token_id), _budget(gc, input_ids.shape[1]))
    history.append((query, response))
    return response, history


class _TokenQueue:
    """A generate() streamer handing the new token ids to the consuming thread."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.skip_prompt = True

    def put(self, value):
        if self.skip_prompt:  # the first put is the prompt
            self.skip_prompt = False
            return
        self.q.put(value.reshape(-1).tolist())

    def end(self):
        self.q.put(None)


def chat_stream(
    self,
    tokenizer,
    query: str,
    history: list | None = None,
    system: str = DEFAULT_SYSTEM,
    generation_config: GenerationConfig | None = None,
    stop_words_ids: list[list[int]] | None = None,
    **kwargs,
) -> Iterator[str]:
    """Yields the growing response text (each item the whole response so far), stopping as chat() does, as the
    official chat_stream yields it: not stripped, special tokens and an incomplete last character left out, and
    with every token generated (chat() drops the last one of a reply cut by max_new_tokens)."""
    stop_words = check_stop_words(stop_words_ids)
    history = [] if history is None else copy.deepcopy(history)
    gc, input_ids = _prompt(self, tokenizer, query, history, system, generation_config, kwargs)
    fast = _fast_tokens(self, tokenizer, input_ids, gc)
    if fast is not None:
        try:
            tokens = _until_stop_word(fast, input_ids[0].tolist(), stop_words)
            yield from _stream_text(tokenizer, ([t] for t in tokens), set(gc.eos_token_id))
        finally:  # a consumer that stops early frees the engine's row now, not whenever the generator is collected
            if hasattr(fast, "close"):
                fast.close()
        return
    streamer = _TokenQueue()
    errors: list[BaseException] = []
    # A consumer that stops early (the chat CLI's Ctrl-C, a closed generator) must stop generate() too: else
    # the abandoned reply runs on to max_new_tokens beside the next one.
    abandoned = threading.Event()

    def run():
        try:
            self.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gc,
                          streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopWhenSet(abandoned)]),
                          stop_words_ids=stop_words)
        except BaseException as e:  # surfaced in the consuming thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield from _stream_text(tokenizer, iter(streamer.q.get, None), set(gc.eos_token_id))
    finally:
        abandoned.set()  # (a no-op when generate() has ended on its own)
        thread.join()
    if errors:
        raise errors[0]


class _StopWhenSet(StoppingCriteria):
    """Ends generate() at its next step once ``event`` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _stream_text(tokenizer, chunks, stops: set) -> Iterator[str]:
    """The growing response text from chunks of new token ids, up to the first stop token, decoded as the
    official chat_stream decodes it: special tokens skipped, not stripped, an incomplete UTF-8 character left out
    (errors="ignore") until its bytes are complete. A text is yielded when it has changed."""
    tokens: list[int] = []
    last = ""
    for item in chunks:
        stopped = False
        for t in item:
            if t in stops:
                stopped = True
                break
            tokens.append(t)
        text = tokenizer.decode(tokens, skip_special_tokens=True, errors="ignore")
        if text != last:
            last = text
            yield text
        if stopped:
            break


__all__ = ["make_context", "chat", "chat_stream", "stop_token_ids", "register_decoder", "DEFAULT_SYSTEM",
           "StopWordsLogitsProcessor", "with_stop_words", "check_stop_words"]
