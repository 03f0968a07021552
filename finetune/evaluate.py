"""`qwen-ft eval`: held-out loss / perplexity and generation quality, base and base+adapter side by side.

    qwen-ft eval -m MODEL [--adapter DIR] --data FILE [--max-new-tokens N] [--batch-size B]
                 [--max-samples N] [--output report.json]

Loss: every record is encoded exactly as for training (``finetune.data.encode_conversation``, the same
labels: assistant replies and their <|im_end|>), batched by ``ChatCollator``; loss = (sum of the token
cross-entropies over all trained tokens) / (their count), perplexity = exp(loss).

Generation: the prompt is the conversation up to its last assistant turn, built by ``make_context`` (the
system prompt, earlier turns as history, the last user turn as the query; the oldest pairs over the generation
config's max_window_size left out, as chat leaves them out, counted and said in a note), generated greedily
(repetition_penalty 1.0 unless asked), cut at <|im_end|>/<|im_start|>/<|endoftext|>, and compared with that
last assistant turn: exact match and ROUGE-L F1 (see ``finetune/metrics.py``). Tool / function-call records
(the ReAct layout, ``finetune/react.py``) are asked what ``qwen-ft serve`` asks: a last turn with tool results
is continued after its last one (the prompt ends "Observation: {result}\\nThought:", as the server's after a
tool result) and compared with the trained text after it (a tool result is no text the model could write); a
reply to a tool record ends at "Observation:", the server's stop with functions. By default the replies come
from the inference engine (``finetune.inference.Engine``: continuous batching of ``--gen-batch-size`` rows,
each row at its own positions, no padding; a progress bar); ``--generator generate`` uses transformers'
``generate()`` in LEFT-padded batches instead. Each column also reports ``generated_tokens`` (new token ids,
stops excluded, counted from the ids and not from the decoded text), ``generation_seconds`` (generation alone,
the loss excluded) and ``tokens_per_s`` (their ratio).

With ``--adapter`` the model is loaded once; the base numbers come from the model with its adapter switched
off: PEFT's ``disable_adapter()`` for the loss, rows without an adapter in the engine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import react
from .command_line import OneLineParser, Once, expand_home, is_terminal, repeated, unwritable_place
from .data.records import read_as_data, trained_reply
from .generation_limits import max_new_tokens_limit, prompt_window, too_many_new_tokens
from .hub import reference
from .metrics import exact_match, rouge_l


# -- data -----------------------------------------------------------------------------------------------


def load_eval_records(path, max_samples: int | None = None, flag: str | None = None,
                      skip_invalid: bool = False) -> list[dict]:
    """Validated, normalised records ({"id", "system", "messages"}), the first ``max_samples``; `flag` (the
    command-line flag that gave `path`) is named in the errors; ``skip_invalid``: as load_records (counted)."""
    from .data import load_records, normalize_record

    records = [normalize_record(r) for r in load_records(path, skip_invalid, flag=flag)]
    return records[:max_samples] if max_samples else records


def _is_data_file(output: str, data: str) -> bool:
    """Whether `output` is one of the files `data` names (a glob or a list names several)."""
    from .data import DataError
    from .data.records import data_sources

    try:
        sources = data_sources(data)
    except DataError:
        sources = [data]  # (the reading reports it)
    return any(Path(output).resolve() == Path(f).resolve() for f in sources)


def _last_assistant(messages: list[dict]) -> int:
    # the last trained reply: a "weight": 0 turn, or one with no trained segment, is context the data says not to
    # learn, so no reference (the loss skips it too; a normalised record has at least one trained reply)
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant" and trained_reply(m))


def split_last_turn(message: dict, react_layout: bool = False) -> tuple[str, str]:
    """(the text the prompt continues, the reference) of a record's last assistant turn.

    A turn with untrained text before trained text (a tool record's ReAct segments: the observations and the
    "\\nThought:" after each; or a plain record's own segments) is cut after its last untrained segment that trained
    text follows: the model continues from there, as the server prompts it after a tool result (or continues a
    client's assistant message), and the reference is the text that follows, stripped as replies are (its leading
    space follows "Thought:"). Any other turn: ("", its whole text). In the ReAct layout (``react_layout``: a tool
    record, "react" in its normalised form) the reference ends where a reply ends (``cut_reply`` at "Observation:",
    the server's stop with functions): a training conversation may end with a call and no result, whose turn ends
    with the "\\nObservation:" the server stops at. A plain record's reply has no such stop: its own segments only
    mark what is trained, and "Observation:" in its text is text (it was cut there, as in a tool record)."""
    segments = message.get("segments") or []
    stop = react.OBSERVATION_STOP if react_layout else None
    # the cut is the last untrained segment that trained text follows: an untrained tail after the last trained
    # text (a record's own segments; a ReAct turn never ends with a tool result) is nothing the model continues
    # into, and cutting there put the whole reply into the prompt and left an empty reference
    last_trained = max((i for i, (_, trained) in enumerate(segments) if trained), default=0)
    cut = max((i for i, (_, trained) in enumerate(segments[:last_trained]) if not trained), default=None)
    if cut is None:
        return "", cut_reply(message["content"], stop)
    reference = "".join(t for t, _ in segments[cut + 1:])
    return "".join(t for t, _ in segments[:cut + 1]), cut_reply(reference, stop) if stop else reference.strip()


def reply_stop(record: dict) -> str | None:
    """Where a reply to ``record`` ends besides the stop tokens: "Observation:" when its turns are in the ReAct
    layout (a tool record, "react" in its normalised form; the server stops there with functions, a reply that calls
    a tool ends there), else None (a plain record's own `segments` too)."""
    return react.OBSERVATION_STOP if record.get("react") else None


def cut_reply(reply: str, stop: str | None) -> str:
    """``reply`` up to ``stop``, stripped again to be scored against the reference (which ends before the line break
    in front of the stop; the server leaves that whitespace in the reply, as the official one)."""
    return reply.split(stop, 1)[0].strip() if stop else reply


def generation_prompt(tokenizer, record: dict, max_window_size: int = 6144,
                      stats: dict | None = None) -> tuple[list[int], str]:
    """(context tokens, reference reply): the conversation up to its last assistant turn, via make_context; a
    last turn with tool results is continued after the last one, as the server prompts it (``split_last_turn``).
    Earlier user/assistant pairs over ``max_window_size`` are left out, oldest first, as chat and the server leave
    them out; ``stats``, if given, gets "history_left_out": how many."""
    from .data import normalize_record
    from .modeling import make_context

    # any accepted form, always normalised (idempotent): a raw record that has "messages" and "system" already (an
    # OpenAI tool record with a top-level system prompt) was taken as normalised, its tool turns read as plain ones
    record = normalize_record(record)
    msgs = record["messages"]
    last = _last_assistant(msgs)
    continued, reference = split_last_turn(msgs[last], bool(record.get("react")))
    # normalised records alternate user/assistant starting with the user, so msgs[last - 1] is the query
    query = msgs[last - 1]["content"]
    history = [(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(0, last - 1, 2)]
    if continued:  # the open turn: the server's prompt builder, its text encoded as text after the header
        pairs = [(u, [(a, True)]) for u, a in history] + [(query, [(continued, False)])]
        return react.prompt_ids(tokenizer, react.Turns(record["system"], pairs), max_window_size, stats), reference
    made: dict = {}
    _, tokens = make_context(tokenizer, query, history=history, system=record["system"],
                             max_window_size=max_window_size, stats=made)
    if stats is not None:
        stats["history_left_out"] = len(history) - made["history_kept"]
    return tokens, reference


# -- loss -----------------------------------------------------------------------------------------------


def _device(model) -> torch.device:
    return next(model.parameters()).device


def encode_for_loss(tokenizer, records, max_len: int | None = None) -> list:
    """Each record encoded as training encodes it (ids, labels masked, cut to max_len): ``eval_loss``'s input, made
    once for the base and the adapter columns."""
    from .data import encode_conversation_info

    return [encode_conversation_info(tokenizer, r, max_len=max_len) for r in records]


@torch.no_grad()
def eval_loss(model, tokenizer, records, batch_size: int = 8, max_len: int | None = None,
              encoded: list | None = None) -> dict:
    """{"loss", "perplexity", "tokens", "records"} with the training masks (sum over trained tokens / count);
    also "left_out" (records with no scored token within max_len: the prompt fills it), "first_left_out" (the
    first one's 0-based index, or None) and "truncated" (records cut to max_len). ``encoded``: the records'
    ``encode_for_loss`` at this max_len, where the caller made it already."""
    from .data import ChatCollator

    collate = ChatCollator(pad_id=tokenizer.eod_id)
    if encoded is None:
        encoded = encode_for_loss(tokenizer, records, max_len)
    kept = [i for i, e in enumerate(encoded) if any(l != -100 for l in e.labels[1:])]
    rows = [encoded[i].as_dict() for i in kept]
    left_out = sorted(set(range(len(records))) - set(kept))
    device = _device(model)
    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # less padding
    for s in range(0, len(order), batch_size):
        batch = collate([rows[i] for i in order[s:s + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    num_items_in_batch=1, return_logits=False, use_cache=False)  # loss = the sum
        total += float(out.loss)
        count += int((batch["labels"][:, 1:] != -100).sum())
    loss = total / count if count else float("nan")
    # no scored token: no loss and no perplexity (NaN, null in the JSON report; it read inf)
    perplexity = float("nan") if not count else math.exp(loss) if loss < 700 else float("inf")
    return {"loss": loss, "perplexity": perplexity,
            "tokens": count, "records": len(rows), "left_out": len(left_out),
            "first_left_out": left_out[0] if left_out else None, "truncated": sum(encoded[i].truncated for i in kept),
            "longest": max((len(r["input_ids"]) for r in rows), default=0)}


def loss_coverage_note(metrics: dict, n_records: int, max_len: int | None, source: str, setting: str) -> str | None:
    """One line saying which records the loss left out or truncated (None when it scored them all whole): a
    held-out loss over fewer or shorter conversations than the file holds is not silently the file's loss."""
    left, cut = metrics.get("left_out", 0), metrics.get("truncated", 0)
    if not left and not cut:
        return None
    parts = []
    if left:
        from .data.dataset import record_place
        from .data.records import data_sources, record_place_text

        # (the file of a list or a glob, and the record's number in it, as the data errors name records)
        first = record_place_text(*record_place(source, data_sources(source), metrics["first_left_out"]))
        parts.append(f"leaves out {left} of {n_records} record{'s' * (n_records > 1)} (no reply token within max_len "
                     f"{max_len}: the prompt fills it; the first: {first})")
    if cut:
        parts.append(f"scores {cut} record{'s' * (cut > 1)} truncated to max_len {max_len}")
    return f"note: the loss {' and '.join(parts)}; {setting} sets max_len"


def history_cut_note(cut: list[int], window: int, source: str) -> str | None:
    """One line when the generation prompts of some records (``cut``: each record's count of earlier user/assistant
    pairs its prompt left out) are over the prompt window, or None: their replies were asked without those turns,
    which the loss and the reference still have, so their scores are not the whole conversation's."""
    cut_records = [i for i, n in enumerate(cut) if n]
    if not cut_records:
        return None
    from .data.dataset import record_place
    from .data.records import data_sources, record_place_text

    n = len(cut_records)
    first = record_place_text(*record_place(source, data_sources(source), cut_records[0]))
    return (f"note: the generation prompts of {n} of {len(cut)} record{'s' * (len(cut) > 1)} leave out their oldest "
            f"turns ({sum(cut)} user/assistant pair{'s' * (sum(cut) > 1)}; the first: {first}), over max_window_size "
            f"{window} of the model's generation config, as chat and the server leave them out: those replies answer "
            "without them")


def past_seq_length_note(metrics: dict, seq_length: int | None) -> str | None:
    """One line when the loss scored positions past the model's seq_length (a --max-len over it let long records
    in): as training warns of such conversations, since the model was not trained on those positions."""
    longest = metrics.get("longest", 0)
    if not isinstance(seq_length, int) or longest <= seq_length:
        return None
    return (f"note: the loss scores positions past the model's seq_length {seq_length} (the longest scored record is "
            f"{longest} tokens), which it was not trained on; --max-len {seq_length} truncates them")


# -- generation -----------------------------------------------------------------------------------------


def _stop_ids(tokenizer) -> list[int]:
    return [tokenizer.im_end_id, tokenizer.im_start_id]


@torch.no_grad()
def _stop_string_criteria(tokenizer, stops: list[str | None]):
    """generate()'s stopping criterion for rows with a stop string: a row ends at the token whose text completes
    it, as the engine's rows do (inference/stop_strings.py); rows without one are left to eos and the budget."""
    from transformers import StoppingCriteria

    from .inference.stop_strings import StopStrings

    class StopAtString(StoppingCriteria):
        def __init__(self):
            self.watch = [StopStrings(tokenizer, [s]) if s else None for s in stops]
            self.done = [False] * len(stops)

        def __call__(self, input_ids, scores, **kwargs):
            for i, t in enumerate(input_ids[:, -1].tolist()):  # (called once a new token is appended)
                if self.watch[i] is not None and not self.done[i]:
                    self.done[i] = self.watch[i].add(t) is not None
            return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    return StopAtString()


def generate_batch_ids(model, tokenizer, contexts: list[list[int]], max_new_tokens: int = 128,
                       repetition_penalty: float = 1.0, stops: list[str | None] | None = None) -> list[list[int]]:
    """Greedy new token ids for several prompts at once, LEFT-padded (pad = <|endoftext|>, attention_mask 0),
    each cut before its first stop token; ``stops``: a stop string for each prompt (or None) where its row ends
    (the tokens that complete it are its last)."""
    from transformers import GenerationConfig, StoppingCriteriaList

    device = _device(model)
    L = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), L), tokenizer.eod_id, dtype=torch.long)
    mask = torch.zeros((len(contexts), L), dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, L - len(c):] = torch.tensor(c, dtype=torch.long)
        mask[i, L - len(c):] = 1
    gc = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=_stop_ids(tokenizer),
                          pad_token_id=tokenizer.eod_id, repetition_penalty=repetition_penalty)
    criteria = StoppingCriteriaList([_stop_string_criteria(tokenizer, stops)] if stops and any(stops) else [])
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gc,
                         stopping_criteria=criteria)
    stop_ids = set(_stop_ids(tokenizer)) | {tokenizer.eod_id}
    rows = []
    for row in out[:, L:].tolist():  # (a row that ended early, at a stop or its stop string, is padded after it)
        cut = next((k for k, t in enumerate(row) if t in stop_ids), len(row))
        rows.append(row[:cut])
    return rows


def _texts(tokenizer, rows: list[list[int]]) -> list[str]:
    return [tokenizer.decode(r).strip() for r in rows]


def generate_batch(model, tokenizer, contexts: list[list[int]], max_new_tokens: int = 128,
                   repetition_penalty: float = 1.0) -> list[str]:
    """Greedy replies (text) for several prompts at once through generate(), LEFT-padded."""
    return _texts(tokenizer, generate_batch_ids(model, tokenizer, contexts, max_new_tokens, repetition_penalty))


def generate_reply_ids(model, tokenizer, contexts, batch_size: int = 8, max_new_tokens: int = 128,
                       repetition_penalty: float = 1.0, stops: list[str | None] | None = None) -> list[list[int]]:
    """New token ids of every context through generate(), in batches of similar lengths (input order kept);
    ``stops`` as in ``generate_batch_ids``."""
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    rows: list[list[int]] = [[] for _ in contexts]
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        for i, r in zip(idx, generate_batch_ids(model, tokenizer, [contexts[i] for i in idx], max_new_tokens,
                                                repetition_penalty, [stops[i] for i in idx] if stops else None)):
            rows[i] = r
    return rows


def generate_replies(model, tokenizer, contexts, batch_size: int = 8, max_new_tokens: int = 128,
                     repetition_penalty: float = 1.0) -> list[str]:
    return _texts(tokenizer, generate_reply_ids(model, tokenizer, contexts, batch_size, max_new_tokens,
                                                repetition_penalty))


def engine_reply_ids(model, tokenizer, contexts, batch_size: int = 32, max_new_tokens: int = 128,
                     repetition_penalty: float = 1.0, adapter: str | None = None,
                     progress: bool = False, stops: list[str | None] | None = None) -> list[list[int]]:
    """Greedy new token ids through the inference engine (``adapter`` None = the base model, adapters off);
    the stop token is not included. ``stops``: a stop string for each context (or None), where its row ends
    (the tokens that complete it are its last; the text is cut at it by ``cut_reply``)."""
    from .inference import Engine, SamplingParams

    if not contexts:
        return []
    engine = Engine(model, tokenizer, max_batch=batch_size,
                    max_len=max(len(c) for c in contexts) + max_new_tokens)
    base = dict(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                stop_token_ids=(tokenizer.eod_id,))
    params = [SamplingParams(**base, stop=(stop,) if stop else ()) for stop in (stops or [None] * len(contexts))]
    return engine.generate(contexts, params, adapter=adapter, progress=progress)


def engine_replies(model, tokenizer, contexts, batch_size: int = 32, max_new_tokens: int = 128,
                   repetition_penalty: float = 1.0, adapter: str | None = None, progress: bool = False,
                   stops: list[str | None] | None = None) -> list[str]:
    """Greedy replies (text) through the inference engine, each cut at its stop string."""
    rows = engine_reply_ids(model, tokenizer, contexts, batch_size, max_new_tokens, repetition_penalty, adapter,
                            progress, stops)
    return [cut_reply(r, stop) for r, stop in zip(_texts(tokenizer, rows), stops or [None] * len(rows))]


def score_replies(replies: list[str], references: list[str]) -> dict:
    n = len(references)
    em = [exact_match(p, r) for p, r in zip(replies, references)]
    rl = [rouge_l(p, r) for p, r in zip(replies, references)]
    return {"exact_match": sum(em) / n if n else float("nan"), "rouge_l": sum(rl) / n if n else float("nan"),
            "generated": n, "per_sample": {"exact_match": em, "rouge_l": rl}}


# -- the whole evaluation -----------------------------------------------------------------------------------


def check_base_column(config, adapter) -> None:
    """Refuse an adapter whose base the model no longer holds beside it (AdapterError): one with trained base-layer
    biases, which PEFT loads into the base itself, so that its ``disable_adapter()`` (and the engine's rows without
    the adapter) would report the base plus those biases as "base"."""
    from .adapters import AdapterError, changes_base

    if changes_base(config):
        raise AdapterError(f"adapter {adapter} trained base-layer biases (bias {config.bias!r} in its "
                           f"adapter_config.json), which PEFT loads into the base model itself: eval's base column "
                           f"would not be the base model; merge the adapter (qwen-ft merge) and evaluate the merged "
                           f"model and the base, each with -m")


def evaluate_model(model, tokenizer, records, batch_size: int = 8, max_new_tokens: int = 128,
                   max_len: int | None = None, generate: bool = True, repetition_penalty: float = 1.0,
                   max_window_size: int = 6144, generator: str = "engine", gen_batch_size: int = 32,
                   progress: bool = False, prompts: list[tuple[list[int], str]] | None = None) -> dict:
    """One report: {"base": {...}, "adapter": {...} (when model is a PeftModel), "samples": [...]}.
    ``generator``: "engine" (the inference engine, ``gen_batch_size`` rows at once) or "generate"
    (transformers' generate() in left-padded batches of ``batch_size``). ``prompts``: each record's
    ``generation_prompt``, where the caller built them already (``main``, for its length check); else they are
    built here with ``max_window_size``."""
    if generator not in ("engine", "generate"):
        raise ValueError(f"generator must be 'engine' or 'generate', got {generator!r}")
    from peft import PeftModel

    from .data import normalize_record

    records = [normalize_record(r) for r in records]  # any accepted form (idempotent on normalised ones)
    model.eval()
    if not generate:
        prompts = []
    elif prompts is None:
        prompts = [generation_prompt(tokenizer, r, max_window_size) for r in records]
    stops = [reply_stop(r) for r in records] if generate else []
    peft = isinstance(model, PeftModel)
    if peft:
        check_base_column(model.peft_config[model.active_adapter], model.active_adapter)
    variants = [("base", model.disable_adapter), ("adapter", nullcontext)] if peft else [("base", nullcontext)]
    report: dict = {}
    replies_by: dict[str, list[str]] = {}
    contexts = [p[0] for p in prompts]
    encoded = encode_for_loss(tokenizer, records, max_len)  # once for both columns
    for name, ctx in variants:
        t0 = time.time()
        gen_s = 0.0
        with ctx():
            metrics = eval_loss(model, tokenizer, records, batch_size=batch_size, max_len=max_len, encoded=encoded)
            if generate and generator == "generate":
                t = time.perf_counter()
                rows = generate_reply_ids(model, tokenizer, contexts, batch_size, max_new_tokens, repetition_penalty,
                                          stops)
                gen_s = time.perf_counter() - t
        if generate and generator == "engine":  # the engine switches adapters per row itself
            adapter = model.active_adapter if peft and name == "adapter" else None
            t = time.perf_counter()
            rows = engine_reply_ids(model, tokenizer, contexts, gen_batch_size, max_new_tokens, repetition_penalty,
                                    adapter=adapter, progress=progress, stops=stops)
            gen_s = time.perf_counter() - t
        if generate:
            replies = [cut_reply(r, stop) for r, stop in zip(_texts(tokenizer, rows), stops)]
            scores = score_replies(replies, [p[1] for p in prompts])
            replies_by[name] = replies
            per = scores.pop("per_sample")
            metrics.update(scores)
            # counted from the generated token ids (stops excluded), not from the text: tokens that decode to
            # nothing visible (a random model's, ids past the tokenizer's vocabulary) are generated all the same
            # (rows with a stop string end at it, on either generator)
            tokens = sum(len(r) for r in rows)
            metrics.update(generated_tokens=tokens, generation_seconds=gen_s,
                           tokens_per_s=tokens / gen_s if gen_s > 0 else 0.0)
            metrics["_per"] = per
        metrics["seconds"] = round(time.time() - t0, 3)
        report[name] = metrics
    if generate:
        samples = []
        for i, (rec, (_, ref)) in enumerate(zip(records, prompts)):
            last = _last_assistant(rec["messages"])
            s = {"id": rec.get("id"), "query": rec["messages"][last - 1]["content"], "reference": ref}
            # what the prompt continues (a tool record's tool results included); a tool record's replies end at stop
            continued = split_last_turn(rec["messages"][last], bool(rec.get("react")))[0]
            if continued:
                s["continues"] = continued
            if stops[i]:
                s["stop"] = stops[i]
            for name in replies_by:
                s[name] = replies_by[name][i]
                s[f"{name}_exact_match"] = report[name]["_per"]["exact_match"][i]
                s[f"{name}_rouge_l"] = report[name]["_per"]["rouge_l"][i]
            samples.append(s)
        report["samples"] = samples
    for name, _ in variants:
        report[name].pop("_per", None)
    return report


def format_table(report: dict) -> str:
    # the metric columns: "base" always, "adapter" when an adapter was evaluated; alone (e.g. a merged model, no
    # adapter) the one model's column is headed "model": it is not a base of anything here
    cols = [c for c in ("base", "adapter") if isinstance(report.get(c), dict)]
    heads = cols if len(cols) > 1 else ["model"]
    rows = [("loss", "loss", "{:.4f}"), ("perplexity", "perplexity", "{:.3f}"),
            ("exact_match", "exact match", "{:.3f}"), ("rouge_l", "ROUGE-L F1", "{:.3f}"),
            ("tokens", "trained tokens", "{}"), ("generated", "replies", "{}"),
            ("generated_tokens", "new tokens", "{}"), ("tokens_per_s", "new tokens/s", "{:.1f}")]
    lines = [f"{'metric':<16}" + "".join(f"{c:>12}" for c in heads)]
    for key, label, fmt in rows:
        if not any(key in report[c] for c in cols):
            continue
        lines.append(f"{label:<16}" + "".join(f"{fmt.format(report[c][key]) if key in report[c] else '-':>12}"
                                             for c in cols))
    return "\n".join(lines)


def unwritable(path: Path) -> str | None:
    """Why a report file cannot be written at ``path`` (its missing parent dirs are made), or None."""
    if path.is_dir():
        return "is a directory; give a file name for the JSON report"
    return unwritable_place(path.parent)


def json_safe(value):
    """``value`` with every float that is not finite made None: JSON has no NaN or Infinity (``json.dumps`` writes
    them as bare words that strict parsers, jq and JavaScript's JSON.parse refuse). A loss over no scored token is
    NaN, and a perplexity past float range inf: null in the report."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def is_eval_report(path: Path) -> bool:
    """Whether ``path`` holds a JSON report this command wrote (``model``, ``settings`` and ``base`` keys)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"model", "settings", "base"} <= data.keys()


def overwrites_input(output: Path, inputs) -> Path | None:
    """The input dir (adapter or model) of which ``output`` is an existing file other than an earlier report, or
    None: ``--output ADAPTER/adapter_config.json`` replaced the adapter's config with the report."""
    output = Path(output)
    if not output.is_file():
        return None
    target = output.resolve()
    for d in inputs:
        if d is not None and Path(d).is_dir() and Path(d).resolve() in target.parents and not is_eval_report(output):
            return Path(d)
    return None


def trained_data_note(args, model_dir) -> str | None:
    """A warning when --data is (a file of) the data the evaluated run trained on (the adapter's run_args.json, or
    a fully fine-tuned model dir's): the report called that loss and those replies held-out. None otherwise."""
    from .data.dataset import files_in_both, named_in_both
    from .run_record import training_data

    trained = training_data(Path(args.adapter or model_dir))
    both = files_in_both(trained, args.data) if trained else []
    if not both:
        return None
    whose = "the adapter's" if args.adapter else f"{model_dir}'s"
    named = "" if both == [(trained, trained)] else f"{trained}, "  # (the path once where the run named just it)
    return (f"--data {args.data}: {named_in_both(both)} {whose} training data ({named}in its run_args.json): its "
            "loss and replies are not held-out figures")


# The generation flags' values when not given (they parse as None, so that a run that generates nothing can say they do
# nothing: generation_flags fills these in)
GENERATION_DEFAULTS = {"max_new_tokens": 128, "gen_batch_size": 32, "generator": "engine", "repetition_penalty": 1.0}


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="qwen-ft eval", description=__doc__.split("\n\n")[0], examples=(
        "  qwen-ft eval -a output/my-adapter -d data/heldout.json -o report.json   (base and base+adapter)\n"
        "  qwen-ft eval -m output/merged -d data/heldout.json --no-generate        (one model: loss only)"))
    p.add_argument("-m", "--model", action=Once, help="model dir or hub id (default: the base the adapter records)")
    p.add_argument("-a", "--adapter", action=Once,
                   help="LoRA / Q-LoRA adapter dir (or a run's checkpoint-N, or a hub id); base and base+adapter "
                   "are reported")
    p.add_argument("-d", "--data", required=True, action=Once,
                   help="held-out chat data (JSON / JSONL / Parquet, any accepted form; several: a quoted glob, a "
                        "comma-separated list or a directory of .json/.jsonl/.parquet files)")
    gen = GENERATION_DEFAULTS
    p.add_argument("--max-new-tokens", type=int, default=None, action=Once,
                   help=f"tokens a reply may take (default: {gen['max_new_tokens']})")
    p.add_argument("--batch-size", type=int, default=8, action=Once,
                   help="rows per loss batch (and per generate() batch; default 8)")
    p.add_argument("--gen-batch-size", type=int, default=None, action=Once,
                   help=f"rows the inference engine decodes at once (continuous batching; default: "
                        f"{gen['gen_batch_size']})")
    p.add_argument("--generator", choices=("engine", "generate"), default=None, action=Once,
                   help=f"engine: the inference engine; generate: transformers' generate(), left-padded (default: "
                        f"{gen['generator']})")
    p.add_argument("--max-samples", type=int, default=None, action=Once,
                   help="only the first N records of --data, for the loss and the generated replies alike "
                        "(default: all)")
    p.add_argument("--max-len", type=int, default=None, action=Once,
                   help="truncate conversations for the loss as training does (default: the model's seq_length)")
    p.add_argument("--repetition-penalty", type=float, default=None, action=Once,
                   help=f"of the generated replies (default: {gen['repetition_penalty']}: none)")
    p.add_argument("--no-generate", action="store_true", help="loss and perplexity only")
    p.add_argument("-o", "--output", action=Once, help="write the JSON report here (a file)")
    p.add_argument("--device", default=None, action=Once, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, action=Once,
                   help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    return p


def preload_problem(args, model_dir) -> str | None:
    """What the model's inputs say against the flags, found before it loads (one line), or None: an --output that
    is a file of the adapter or model dir (the report replaced it), and a --max-new-tokens the model cannot hold
    (the engine then tried to allocate its cache for it)."""
    from .run_record import run_dir

    # (the run dir above a checkpoint-N adapter is an input too: an --output there replaced its run_info.json)
    inputs = [args.adapter, model_dir, run_dir(args.adapter) if args.adapter else None]
    if args.output and (inside := overwrites_input(Path(args.output), inputs)):
        return (f"--output {args.output} is a file of {inside}, an input of this evaluation, and no earlier report: "
                f"the report would replace it; give another file name")
    return too_many_new_tokens(args.max_new_tokens, max_new_tokens_limit(model_dir), model_dir)


def nothing_to_score(tokenizer, records, args, model_dir) -> str | None:
    """With --no-generate, why the run would report nothing (every record's prompt fills max_len, so no reply
    token is scored: the loss was NaN over 0 tokens), or None."""
    from .data import encode_conversation_info
    from .errors import ModelLoadError
    from .model_dir import read_config

    max_len = args.max_len
    if max_len is None and Path(model_dir).is_dir():
        try:
            max_len = read_config(model_dir).get("seq_length")
        except ModelLoadError:
            return None
    if not isinstance(max_len, int):
        return None
    for r in records:
        if any(label != -100 for label in encode_conversation_info(tokenizer, r, max_len=max_len).labels[1:]):
            return None
    setting = "--max-len" if args.max_len else "--max-len (default: the model's seq_length)"
    return (f"--data {args.data}: no record has a reply token within max_len {max_len} (each prompt fills it), so "
            f"--no-generate has nothing to score; {setting} sets max_len")


def too_long_to_generate(prompts, args, model_dir) -> str | None:
    """The first record whose generation prompt (``prompts``: the records' ``generation_prompt``, in order) leaves no
    room for --max-new-tokens within what the model holds (max(max_position_embeddings, 4 x seq_length), as chat and
    the server refuse it), as one line naming its file, record and line, or None. Found before the model loads: the
    engine sized its cache for the longest prompt and prefilled it whole (a 400k-token held-out record ran out of
    memory after the loss was computed)."""
    from .data import DataError
    from .data.dataset import record_place
    from .data.records import data_sources

    limit = max_new_tokens_limit(model_dir)
    if not limit:
        return None
    for i, (ids, _) in enumerate(prompts):
        n = len(ids)
        if n + args.max_new_tokens > limit:
            path, index, line = record_place(args.data, data_sources(args.data), i)
            return str(DataError("prompt too long", f"its generation prompt is {n} tokens; with --max-new-tokens "
                                 f"{args.max_new_tokens} that is more than {model_dir} holds (at most {limit}: "
                                 "max(max_position_embeddings, 4 x seq_length) of its config.json); shorten or "
                                 "remove the record, or pass --no-generate for the loss alone",
                                 path=path, index=index, line=line, flag="--data"))
    return None


def generation_flags(args) -> str | None:
    """A generation flag the run would not apply (accepted and ignored before), or None; then the defaults of the
    ones not given are filled in."""
    given = [k for k in GENERATION_DEFAULTS if getattr(args, k) is not None]
    flag = {k: "--" + k.replace("_", "-") for k in GENERATION_DEFAULTS}
    if args.no_generate and given:
        return (f"{', '.join(flag[k] for k in given)}: {'applies' if len(given) == 1 else 'apply'} to the generated "
                "replies, which --no-generate skips; drop --no-generate or the flag")
    if args.generator == "generate" and args.gen_batch_size is not None:
        return "--gen-batch-size applies to --generator engine; generate() takes --batch-size rows a batch"
    for k, v in GENERATION_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return None


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    expand_home(args, "model", "adapter", "output")
    if problem := repeated(args):
        return _error(problem)
    for flag, value in (("-m/--model", args.model), ("-a/--adapter", args.adapter), ("--data", args.data),
                        ("--output", args.output), ("--device", args.device), ("--dtype", args.dtype)):
        if value is not None and not value.strip():  # an unset shell variable: was "." or, for --output, no report
            return _error(f"{flag} is empty")
    if not args.model and not args.adapter:
        return _error("pass -m MODEL (and/or --adapter DIR)")
    if problem := generation_flags(args):
        return _error(problem)
    from .loading import placement_problem

    if problem := placement_problem(args.device, args.dtype):  # (load_model refused them after the data was read)
        return _error(problem)
    for flag, value in (("--batch-size", args.batch_size), ("--gen-batch-size", args.gen_batch_size),
                        ("--max-new-tokens", args.max_new_tokens), ("--max-samples", args.max_samples)):
        if value is not None and value < 1:
            return _error(f"{flag} must be >= 1, got {value}")
    rp = args.repetition_penalty
    if not rp > 0 or rp == float("inf"):  # (NaN fails the comparison) the engine refused it after the model loaded
        return _error(f"--repetition-penalty must be a finite number > 0, got {rp}")
    if args.output and (problem := unwritable(Path(args.output))):  # found now, not after the evaluation
        return _error(f"--output {args.output}: {problem}")
    if args.output and _is_data_file(args.output, args.data):
        return _error(f"--output {args.output} is the --data file: the report would replace the held-out data; give "
                      f"another file name")
    if args.output and read_as_data(args.output, args.data):
        return _error(f"--output {args.output} is where --data {args.data} reads its data: the report would be read "
                      f"as a data file by the next run with it; give a file name elsewhere")
    from .data.encoding import MIN_MAX_LEN  # as training's --model_max_length

    if args.max_len is not None and args.max_len < MIN_MAX_LEN:
        print(f"error: --max-len {args.max_len} is too small for any chat turn (at least {MIN_MAX_LEN})",
              file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar, as chat and merge (the engine's stays)
    from .adapters import (AdapterError, check_base, float_adapter_on_int4, lora_config, resolve_base,
                           trained_on)
    from .data import DataError
    from .hub import resolve_model_dir
    from .loading import ModelLoadError, load_model
    from .tokenization import load_tokenizer

    try:
        records = load_eval_records(args.data, args.max_samples, flag="--data")  # bad data stops before the model loads
        if args.adapter:
            args.adapter = str(resolve_model_dir(args.adapter, "adapter directory"))  # a hub id too, as chat takes
            check_base_column(lora_config(args.adapter), args.adapter)
        # a hub id resolved now (as the adapter's base is), so that the checks below read its config before loading
        model_dir = resolve_base(args.adapter, args.model) if args.adapter else resolve_model_dir(args.model)
        # a base the adapter was not trained on loads as asked (warned on the console); the report says so too
        other_base = check_base(args.adapter, model_dir, explicit=True) if args.adapter and args.model else None
        if problem := preload_problem(args, model_dir):
            return _error(problem)
        # the model's own vocabulary, as chat and merge read it (the adapter's was preferred unchecked)
        tokenizer = load_tokenizer(model_dir, adapter=args.adapter)
        if args.no_generate and (problem := nothing_to_score(tokenizer, records, args, model_dir)):
            return _error(problem)
        prompts = None
        if not args.no_generate:
            # each record's prompt built once, before the model loads, at the window of the generation config the
            # model loads with: the length check reads the ids that generation then uses
            window = prompt_window(model_dir)
            prompts, cut = [], []  # cut: each record's earlier pairs its prompt leaves out (over the window)
            for r in records:
                stats: dict = {}
                prompts.append(generation_prompt(tokenizer, r, window, stats=stats))
                cut.append(stats["history_left_out"])
            if problem := too_long_to_generate(prompts, args, model_dir):
                return _error(problem)
        if trained := trained_data_note(args, model_dir):  # (said once every check has passed: an error stays one line)
            print(f"warning: {trained}", file=sys.stderr)
        model = load_model(model_dir, adapter=args.adapter, dtype=args.dtype, device=args.device)
    except (AdapterError, ModelLoadError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seq_length = getattr(model.config, "seq_length", None)
    max_len = args.max_len or seq_length
    report = evaluate_model(model, tokenizer, records, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, max_len=max_len, generate=not args.no_generate,
                            repetition_penalty=args.repetition_penalty, prompts=prompts,
                            generator=args.generator, gen_batch_size=args.gen_batch_size,
                            progress=is_terminal(sys.stderr))  # (bars on a terminal only: a log's line each redraw)
    first = next(model.parameters())  # (its dtype and device: what ran)
    # "adapter" is the adapter's metrics (absent without one); its dir is "adapter_dir"
    report = {"model": reference(model_dir), "adapter_dir": args.adapter and reference(args.adapter),
              "data": reference(args.data), "records": len(records),
              "settings": {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                           "max_len": max_len, "greedy": True, "repetition_penalty": args.repetition_penalty,
                           "generator": args.generator,
                           # what ran (an fp16 and an fp32 run's reports looked alike)
                           "dtype": str(first.dtype).removeprefix("torch."), "device": str(first.device),
                           **({"gen_batch_size": args.gen_batch_size} if args.generator == "engine"
                              else {"padding": "left"})}, **report}
    if prompts is not None:  # records whose generation prompt left earlier turns out (said in a note too)
        report["history_cut"] = sum(1 for n in cut if n)
    report["warnings"] = [w for w in (other_base, trained) if w]
    if not report["warnings"]:
        del report["warnings"]
    if args.adapter and getattr(model.config, "quantization_config", None) and trained_on(args.adapter) == "float":
        # (load_model warned on the console; merge's report carries it too)
        report.setdefault("warnings", []).append(float_adapter_on_int4(args.adapter, model_dir))
    note = loss_coverage_note(report["base"], len(records), max_len, args.data,
                              "--max-len" if args.max_len else "--max-len (default: the model's seq_length)")
    if note:
        print(note, file=sys.stderr)
    if note := past_seq_length_note(report["base"], seq_length):
        print(note, file=sys.stderr)
    if prompts is not None and (note := history_cut_note(cut, window, args.data)):
        print(note, file=sys.stderr)
    if args.output:  # written before the table is printed: `| head -3` ended the command before it was written
        replaced = Path(args.output).is_file()  # (/dev/null was "replaced", a pipe too)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(json_safe(report), indent=2, ensure_ascii=False, allow_nan=False)
                                     + "\n")
    print(format_table(report))
    if args.output:
        print(f"report: {args.output}" + (" (replaced the file that was there)" if replaced else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
