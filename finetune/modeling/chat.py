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

import numpy as np

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .sampling_ranges import OFF_VALUES, config_problems, whole

DEFAULT_SYSTEM = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
_SENTINEL = object()  # chat()'s `stream` default: the official chat() refuses any value passed for it

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


def _check_history(history):
    """history is a list of (query, reply) string pairs, as chat() returns it. Other shapes were read quietly
    wrong: OpenAI-style messages ({"role", "content"}) became the turns "role" and "content", a string "ok" the
    turns "o" and "k"; a triple or None failed with Python's words, naming no argument."""
    # (a sequence: a generator, set or zip was used up here, or failed in Python's words in copy or reversed())
    if isinstance(history, (str, bytes, dict)) or not isinstance(history, (list, tuple)):
        raise ValueError(f"make_context: history must be a list of (query, reply) pairs, got {type(history).__name__}")
    for i, turn in enumerate(history):
        if isinstance(turn, dict) and "role" in turn:
            raise ValueError(f"make_context: history[{i}] is a message {{'role': ...}}; history is a list of "
                             "(query, reply) pairs of strings, as chat() returns it, not OpenAI-style messages")
        if not isinstance(turn, (list, tuple)):
            got = type(turn).__name__
        elif len(turn) != 2:
            got = f"a {len(turn)}-item {type(turn).__name__}"
        elif not all(isinstance(t, str) for t in turn):
            got = repr(turn)[:80]
        else:
            continue
        raise ValueError(f"make_context: history[{i}] must be a (query, reply) pair of strings, got {got}")
    return history


def make_context(tokenizer, query, history=None, system="", max_window_size=6144, chat_format="chatml",
                 stats: dict | None = None):
    """(raw_text, context_tokens) exactly as the official make_context builds them: the newest history turns that
    fit max_window_size, the older ones left out. ``stats``, if given, gets "history_kept": how many turns fit."""
    if history is None:
        history = []
    for name, value in (("query", query), ("system", system)):
        if not isinstance(value, str):  # (the official code fails inside the tokenizer)
            raise ValueError(f"make_context: {name} must be a string, got {type(value).__name__}")
    _check_history(history)
    if chat_format == "raw":  # (the official raw format reads no history)
        if stats is not None:
            stats["history_kept"] = 0
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
    kept = 0
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
            kept += 1
        else:
            break
    if stats is not None:
        stats["history_kept"] = kept

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


def get_stop_words_ids(chat_format, tokenizer) -> list[list[int]]:
    """The official stop words of a chat format: chatml [[<|im_end|>], [<|im_start|>]]; raw ["Human:" ids,
    [<|endoftext|>]]."""
    if chat_format == "raw":
        return [tokenizer.encode("Human:"), [tokenizer.eod_id]]
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    raise NotImplementedError(f"Unknown chat format {chat_format!r}")


def _decode_default(tokens, *, stop_words, eod_words, tokenizer, raw_text_len, verbose=False,
                    return_end_reason=False, errors="replace"):
    """The official raw-format decoding: the text after the prompt's characters, each stop word removed (and the
    text stripped after each), cut before the first eod word, stripped."""
    text = tokenizer.decode(tokens, errors=errors)[raw_text_len:]
    if verbose:
        print("\nRaw Generate: ", text)
    end_reason = f"Gen length {len(tokens)}"
    for word in stop_words:
        text = text.replace(word, "").strip()
    for word in eod_words:
        if word in text:
            end_reason = f"Gen {word!r}"
        text = text.split(word)[0]
    text = text.strip()
    if verbose:
        print("\nEnd Reason:", end_reason)
        print("\nGenerate: ", text)
    return (text, end_reason) if return_end_reason else text


def _decode_chatml(tokens, *, stop_words, eod_token_ids, tokenizer, raw_text_len, context_length, verbose=False,
                   return_end_reason=False, errors="replace"):
    """The official chatml decoding: the tokens before the first of ``eod_token_ids`` after the prompt (when none
    comes, before the last token), as text after the prompt's ``raw_text_len`` characters, stop words removed,
    stripped."""
    end_reason = f"Gen length {len(tokens)}"
    end = context_length
    for end in range(context_length, len(tokens)):
        if tokens[end] in eod_token_ids:
            end_reason = f"Gen {tokenizer.decode([tokens[end]])!r}"
            break
    text = tokenizer.decode(tokens[:end], errors=errors)[raw_text_len:]
    if verbose:
        print("\nRaw Generate w/o EOD:", tokenizer.decode(tokens, errors=errors)[raw_text_len:])
        print("\nRaw Generate:", text)
        print("\nEnd Reason:", end_reason)
    for word in stop_words:
        text = text.replace(word, "").strip()
    text = text.strip()
    if verbose:
        print("\nGenerate:", text)
    return (text, end_reason) if return_end_reason else text


def decode_tokens(tokens, tokenizer, raw_text_len: int, context_length: int, chat_format: str,
                  verbose: bool = False, return_end_reason: bool = False, errors: str = "replace"):
    """The official ``decode_tokens``: the reply in ``tokens`` (prompt + generated, a list or a 1-D tensor) after
    the prompt (``raw_text_len`` characters of make_context's raw_text, ``context_length`` of its tokens); with
    ``return_end_reason``, (reply, "Gen '<|im_end|>'" or "Gen length N")."""
    if torch.is_tensor(tokens):
        tokens = tokens.cpu().tolist()
    if chat_format == "chatml":
        return _decode_chatml(tokens, stop_words=[], eod_token_ids=[tokenizer.im_start_id, tokenizer.im_end_id],
                              tokenizer=tokenizer, raw_text_len=raw_text_len, context_length=context_length,
                              verbose=verbose, return_end_reason=return_end_reason, errors=errors)
    if chat_format == "raw":
        return _decode_default(tokens, stop_words=["<|endoftext|>"], eod_words=["<|endoftext|>"],
                               tokenizer=tokenizer, raw_text_len=raw_text_len, verbose=verbose,
                               return_end_reason=return_end_reason, errors=errors)
    raise NotImplementedError(f"Unknown chat format {chat_format!r}")


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
    """The config generate() runs with: the given one, else the model dir's generation_config.json (one without a
    chat_format, or none: the official defaults, with what the file sets over them), updated with the call's kwargs;
    eos always includes <|im_end|> and <|im_start|>. The kwargs that are not generation config fields are left in
    ``kwargs`` (generate()'s own arguments)."""
    if generation_config is None:
        generation_config = getattr(model, "generation_config", None)
        if generation_config is None or getattr(generation_config, "chat_format", None) is None:
            # what the file sets stays (its max_window_size too, which `qwen-ft chat` and eval read from the file);
            # without a file, transformers made one from config.json (output_attentions and all; _from_model_config)
            from_file = generation_config is not None and not getattr(generation_config, "_from_model_config", False)
            given = generation_config.to_diff_dict() if from_file else {}
            given = {k: v for k, v in given.items() if k != "transformers_version" and not k.startswith("_")}
            generation_config = GenerationConfig(**{
                **OFFICIAL_GENERATION_DEFAULTS, "eos_token_id": tokenizer.eod_id, "pad_token_id": tokenizer.eod_id,
                **given})
    elif not isinstance(generation_config, GenerationConfig):  # (a dict failed inside the update below)
        raise ValueError(f"generation_config must be a transformers GenerationConfig, got "
                         f"{type(generation_config).__name__} (pass single fields as keywords: chat(..., top_p=0.9))")
    gc = copy.deepcopy(generation_config)
    max_window_size = kwargs.pop("max_window_size", None)  # (0 is a window too, as officially)
    if max_window_size is None:
        max_window_size = getattr(gc, "max_window_size", None)
    if max_window_size is None:
        max_window_size = 6144
    if not (whole(max_window_size) and max_window_size >= 0):
        raise ValueError(f"max_window_size must be a whole number of tokens >= 0, got {max_window_size!r}")
    for name, least in (("max_new_tokens", 1), ("min_new_tokens", 0)):  # ("4" failed inside generate())
        value = kwargs.get(name, getattr(gc, name, None))
        if value is not None and not (whole(value) and value >= least):
            raise ValueError(f"{name} must be a whole number of tokens{' >= 1' * least}, got {value!r}")
    chat_format = getattr(gc, "chat_format", None) or "chatml"
    if chat_format != "chatml":
        raise ValueError(f"chat() needs chat_format 'chatml', the generation config says {chat_format!r} (a base "
                         f"model's, not a chat model's; the official chat() refuses it too)")
    if kwargs.get("return_dict_in_generate"):
        raise ValueError("chat() returns the reply text; return_dict_in_generate is not supported (call generate())")
    # As the official chat() passes its kwargs to generate(): the generation config's fields update the config;
    # the rest (logits_processor, stopping_criteria, ...) stay in `kwargs` for generate(), which refuses unknown ones.
    unused = gc.update(**kwargs)
    kwargs.clear()
    kwargs.update(unused)
    # None is "off", as generate() read it under the official code's transformers 4 and as the engine reads it
    # (SamplingParams.from_generation_config): transformers 5 fills a None field from the model's own generation
    # config instead, so repetition_penalty=None ran with the model's 1.1 on the CPU and 1.0 on a GPU
    for name, off in OFF_VALUES.items():
        if getattr(gc, name, None) is None:
            setattr(gc, name, off)
    if gc.max_new_tokens is None and gc.max_length is None:
        # a generation config that sets no length (a generation_config.json without max_new_tokens): the official
        # file's 512, as the engine (CUDA) and the server read it; generate() stopped at transformers' default of 20
        gc.max_new_tokens = OFFICIAL_GENERATION_DEFAULTS["max_new_tokens"]
    if problems := config_problems(gc):  # (the same words on the CPU's generate() as on the engine)
        raise ValueError("; ".join(problems))
    kwargs.pop("return_dict_in_generate", None)
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
    """``stop_words_ids`` as a list of token id lists (None: none); anything else is a ValueError saying what, where
    the official code raises one too or fails (a list of lists of ids >= 0, numpy integers included)."""
    if stop_words_ids is None:
        return []
    if not isinstance(stop_words_ids, list):
        raise ValueError(f"stop_words_ids must be a list of token id lists, got {type(stop_words_ids).__name__}")
    out = []
    for i, w in enumerate(stop_words_ids):
        if (not isinstance(w, list) or not w
                or not all(isinstance(t, (int, np.integer)) and t >= 0 for t in w)):
            raise ValueError(f"stop_words_ids[{i}] must be a non-empty list of token ids, got {w!r}")
        out.append([int(t) for t in w])
    return out


def ends_with_stop_word(ids: list[int], stop_words: list[list[int]]) -> bool:
    return any(len(w) <= len(ids) and ids[-len(w):] == w for w in stop_words)


class StopWordsLogitsProcessor(LogitsProcessor):
    """The official generate()'s stop words: a row whose ids end with one of them has its eos logit(s) set to
    2**15, so its next token is eos. (Stop words that are the eos itself are left to generate's own stop.)
    ``stop_words_ids`` must be a non-empty list of non-empty lists of ids, else a ValueError, as officially."""

    def __init__(self, stop_words_ids, eos_token_id):
        if not isinstance(stop_words_ids, list) or not stop_words_ids:
            raise ValueError(f"`stop_words_ids` has to be a non-empty list, but is {stop_words_ids}.")
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
    """generate()'s logits processors with the official stop words added: ``stop_words_ids`` when given (not None),
    else the ``stop_words_ids`` of the generation config generate() runs with (the one passed, else the model's),
    as the official generate() looks them up."""
    gc = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    if stop_words_ids is None:
        stop_words_ids = getattr(gc, "stop_words_ids", None)
    if stop_words_ids is None:
        return logits_processor
    processors = LogitsProcessorList(logits_processor or [])
    processors.append(StopWordsLogitsProcessor(stop_words_ids, gc.eos_token_id))
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


def _cut_response(tokenizer, new_tokens: list[int], stops: set[int], unstopped_drops_last: bool) -> str:
    """chat()'s reply, as the official decode_tokens gives it: cut before the first stop token; a reply with none
    loses its last token (the official loop over the new tokens leaves its index on the last one when nothing breaks
    it, and decodes the tokens before it). ``unstopped_drops_last``: whether that applies (generate()'s tokens end
    with the eos or at the budget; the engine's leave the stop token out, so only a used-up budget counts)."""
    for i, t in enumerate(new_tokens):
        if t in stops:
            new_tokens = new_tokens[:i]
            break
    else:
        if unstopped_drops_last:
            new_tokens = new_tokens[:-1]
    return tokenizer.decode(new_tokens).strip()  # the project's decode never raises on partial UTF-8


def _prompt(model, tokenizer, query, history, system, generation_config, kwargs):
    """The generation config (model dir defaults, updated by kwargs) and the make_context prompt ids."""
    gc, max_window_size, chat_format = _generation_config(model, tokenizer, generation_config, kwargs)
    _, context_tokens = make_context(tokenizer, query, history=history, system=system,
                                     max_window_size=max_window_size, chat_format=chat_format)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and context_tokens and max(context_tokens) >= vocab:  # (an IndexError in the embedding)
        raise ValueError(f"the prompt holds token id {max(context_tokens)}, past the model's vocab_size {vocab}: the "
                         "tokenizer is another model's (load_tokenizer(the model's dir) gives its own)")
    return gc, torch.tensor([context_tokens], device=model.device)


def chat(
    self,
    tokenizer,
    query: str,
    history: list | None = None,
    system: str = DEFAULT_SYSTEM,
    stream=_SENTINEL,
    stop_words_ids: list[list[int]] | None = None,
    generation_config: GenerationConfig | None = None,
    *,
    append_history: bool = True,
    **kwargs,
) -> tuple[str, list]:
    """One chat turn: (response, history + [(query, response)]), the official signature. kwargs update the
    generation config (e.g. do_sample=False, max_new_tokens=64) or set max_window_size; the others go to generate()
    (logits_processor, stopping_criteria, ...). ``stop_words_ids``: token id sequences that end the reply after them
    (kept in it), as in the official code. ``stream`` is refused whatever its value, as officially.
    ``append_history=False`` (the earlier official chat()'s argument, which its openai_api.py passed) returns the
    history given, without the new turn; the caller's history is never changed either way."""
    if stream is not _SENTINEL:
        raise ValueError("chat() takes no `stream` argument (the official chat() refuses it too); use "
                         "chat_stream(...), which yields the growing response")
    if not isinstance(append_history, bool):  # (a generate() argument before: "model_kwargs are not used")
        raise ValueError(f"append_history must be True or False, got {append_history!r}")
    stop_words = check_stop_words(stop_words_ids)
    history = [] if history is None else copy.deepcopy(_check_history(history))
    gc, input_ids = _prompt(self, tokenizer, query, history, system, generation_config, kwargs)
    # CUDA: the inference engine (CUDA graphs), unless generate()'s own arguments were passed
    fast = None if kwargs else _fast_tokens(self, tokenizer, input_ids, gc)
    if fast is not None:
        try:
            new_tokens = list(_until_stop_word(fast, input_ids[0].tolist(), stop_words))
        finally:  # a stop word ends the reply before the engine does: free its row now
            if hasattr(fast, "close"):
                fast.close()
        budget = _budget(gc, input_ids.shape[1])
        drop_last = budget is not None and len(new_tokens) >= budget
    else:
        kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
        outputs = self.generate(input_ids, generation_config=gc,
                                stop_words_ids=stop_words + get_stop_words_ids("chatml", tokenizer), **kwargs)
        new_tokens = outputs[0, input_ids.shape[1]:].tolist()
        drop_last = True
    response = _cut_response(tokenizer, new_tokens, set(gc.eos_token_id), drop_last)
    # a new list, whatever sequence of pairs make_context took (a tuple's append failed after the reply was generated)
    return response, ([*history, (query, response)] if append_history else list(history))


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
    stop_words_ids: list[list[int]] | None = None,
    logits_processor: LogitsProcessorList | None = None,
    generation_config: GenerationConfig | None = None,
    **kwargs,
) -> Iterator[str]:
    """Returns a generator of the growing response text (each item the whole response so far), as the official
    chat_stream: one item per generated token (the stop token's included, repeating the text), not stripped, special
    tokens and an incomplete last character left out, and with every token generated (chat() drops the last one of a
    reply cut by max_new_tokens). Bad arguments raise here, at the call, as officially; ``logits_processor`` and the
    kwargs that are not generation config fields go to generate()."""
    stop_words = check_stop_words(stop_words_ids)
    if "streamer" in kwargs:
        raise ValueError("chat_stream() streams by itself; it takes no `streamer`")
    history = [] if history is None else copy.deepcopy(_check_history(history))
    gc, input_ids = _prompt(self, tokenizer, query, history, system, generation_config, kwargs)
    if logits_processor is not None:
        kwargs["logits_processor"] = logits_processor
    fast = None if kwargs else _fast_tokens(self, tokenizer, input_ids, gc)
    if fast is not None:
        return _fast_stream(fast, tokenizer, input_ids, gc, stop_words)
    return _generate_stream(self, tokenizer, input_ids, gc, stop_words + get_stop_words_ids("chatml", tokenizer),
                            kwargs)


def _fast_stream(fast, tokenizer, input_ids, gc, stop_words) -> Iterator[str]:
    try:
        tokens = _until_stop_word(fast, input_ids[0].tolist(), stop_words)
        yield from _stream_text(tokenizer, ([t] for t in tokens), set(gc.eos_token_id))
    finally:  # a consumer that stops early frees the engine's row now, not whenever the generator is collected
        if hasattr(fast, "close"):
            fast.close()


def _generate_stream(model, tokenizer, input_ids, gc, stop_words, kwargs) -> Iterator[str]:
    streamer = _TokenQueue()
    errors: list[BaseException] = []
    # A consumer that stops early (the chat CLI's Ctrl-C, a closed generator) must stop generate() too: else
    # the abandoned reply runs on to max_new_tokens beside the next one.
    abandoned = threading.Event()
    stopping = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
    stopping.append(_StopWhenSet(abandoned))
    kwargs.setdefault("attention_mask", torch.ones_like(input_ids))

    def run():
        try:
            model.generate(input_ids, generation_config=gc, streamer=streamer, stopping_criteria=stopping,
                           stop_words_ids=stop_words, **kwargs)
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
    (errors="ignore") until its bytes are complete. One text per token, as officially (the stop token's too)."""
    tokens: list[int] = []
    for item in chunks:
        for t in item:
            tokens.append(t)
            yield tokenizer.decode(tokens, skip_special_tokens=True, errors="ignore")
            if t in stops:
                return


__all__ = ["make_context", "get_stop_words_ids", "decode_tokens", "chat", "chat_stream", "stop_token_ids",
           "register_decoder", "DEFAULT_SYSTEM", "StopWordsLogitsProcessor", "with_stop_words", "check_stop_words"]
