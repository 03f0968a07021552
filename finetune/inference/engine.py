"""The decode engine: continuous batching over a static KV cache, one CUDA graph per batch bucket.

    engine = Engine(model, tokenizer, max_batch=32)
    req = engine.submit(prompt_ids, SamplingParams(max_new_tokens=64), adapter=None)
    while engine.has_work():
        engine.step()
    req.output_ids, req.finish_reason

Layout. The KV cache is [layers, slots, heads, capacity, head_dim] (keys and values), grown on demand (slots
to the next batch bucket, capacity to the next multiple of 256) up to ``max_batch`` x ``max_len``, and on CUDA only
as far as the device's free memory holds: requests that do not fit wait in the queue for rows to finish
(``_plan_join``). Active rows sit in slots 0..n-1: a row that leaves is replaced by the row in the last slot (its KV
copied), so a decode step always covers a prefix of the slots. Every row has its own length and positions.

A step: cancelled rows leave; waiting requests join (prefilled together, right-padded, with causal SDPA as
training and generate() compute it: on CUDA through the decode step's fused kernels, ``prefill_blocks``, else the
model's blocks; each one's first token is picked from the prefill logits; with ``prefill_chunk`` set, beside running
rows a prompt longer than that goes in that many positions a step, between their decode steps, and joins after its
last chunk);
then
one decode step for every active row: the last token of each row goes in at its own position, keys/values are
written at (row, position), attention reads each row's own cached keys (on CUDA's fused step; elsewhere, and
with FINETUNE_DECODE_ATTENTION=0, the keys up to the step's length bucket with a mask hiding each row's positions
beyond its own length). On CUDA that decode step is a CUDA graph captured per (batch bucket 1, 2, 4, ...,
max_batch; graph length: over own keys decode_kernels.covering_length, the longest with the same key split, since
only the attention's grid depends on it; else the length bucket, a multiple of 256) and replayed; elsewhere it runs
eagerly on exactly the active rows.

Host time. The token choice runs on the device after the decode step (logit bias, allowed_token_ids and bad words
as -inf, repetition penalty, presence and frequency penalties from the row's own token counts, stop tokens held
back until min_new_tokens, then argmax, or for sampled rows sampling.pick_one with a seeded row's generator, and for
the rows without a seed sampling.sample_rows: the same processors, drawn in one batch) and writes each row's next
input token, position and counters into the step's static inputs; with every row greedy (and without a logit bias,
allowed_token_ids, bad words, output penalties, log-probabilities to report or a constraint) it is part of the
step's CUDA graph. The host only reads the picked
tokens (one small copy), and it
reads step t's tokens after step t+1 is enqueued, so its bookkeeping runs while the device computes. A row
that finished at step t is in step t+1 too: its extra token is discarded, and its cache write (one position
past its last token, inside its reserved length) is never read. Rows leave and join only with no step in
flight (the step() that sees a finished, cancelled or waiting row first reads the step in flight); only then
does the host write the step's inputs. Prefill picks its row's first token on the host (sampling.py). A row held
to a constraint (``SamplingParams.json_schema`` / ``regex`` / ``choice`` / ``grammar``, constraints.py) picks after
the forward's graph among the tokens its matcher allows, computed on the host while the forward runs from the token
read before it: while such a row runs, every step's tokens are read before the next step is enqueued (one sync a
step for the whole batch). So does a row with a bad word of several tokens: whether its last token is banned
depends on the output's last tokens (``_Bans``; a one-token word and allowed_token_ids are a mask made at its join).

Qwen v1 semantics: the dynamic-NTK alpha of a row is fixed at its prefill from its prompt length (its rotary
base then stays for all its decoding steps), logN scales the queries at positions beyond seq_length, stop on
<|im_end|>/<|im_start|> (unless ``ignore_eos``) and the request's stop ids (stop tokens are not part of the
output), and at the token whose text completes one of its stop strings (stop_strings.py; that token is the
output's last), sampling as transformers applies it (sampling.py). Adapters: per row, unmerged (row_adapters.py).

Thread safety: ``submit`` and ``Request.cancel`` may be called from any thread; ``step`` runs one at a time
(a lock) and is meant to be driven by one loop.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence

import torch

from ..graph_capture import capture
from ..modeling.attention import inference_sdpa
from ..modeling.model import AttentionSpec, logn_scale, ntk_alpha, qwen_lm
from ..modeling.sampling_ranges import integral
from ..quant.linear import prepare_decode_weights
from .constraints import Constraints
from .fused_decode import additive_mask, decode_blocks, fused_kernels, prefill_blocks, use_own_keys
from .row_adapters import RowAdapters
from .sampling import (FieldProblem, RowSampling, SamplingParams, apply_penalties, bad_word_ids, output_penalties,
                       pick_one, pick_tokens, sample_rows)
from .stop_strings import StopStrings

LENGTH_BUCKET = 256
# One prompt of up to PREFILL_GRAPH_LENGTHS[-1] tokens joining alone (an empty batch or beside running rows) is
# prefilled by a CUDA graph, the prompt right-padded to the first of these lengths that holds it (``_prefill_graphed``):
# an eager prefill of a short prompt is bound by host time (a 24-token prompt: 30 ms on an H100 for 8 ms of GPU time,
# 73 ms with an adapter's hooks for 11 ms; benchmarks/NOTES.md steps 91-93). At 500 tokens the host still adds ~8 ms
# to ~32 ms of GPU time, ~28 ms with an adapter (step 95): 512 serves the server's common prompt of a few hundred
# tokens. The dequantized weights a graph's pool holds are those of any length, and the graphs share one pool.
PREFILL_GRAPH_LENGTHS = (32, 64, 128, 256, 512)
PREFILL_TOKENS = 8192  # prompts joining together are prefilled in one forward of at most this many positions
# warm_up's KV cache: max_batch rows of max_len positions, or of as many as this share of the device's free memory
# holds. A cache that grows later drops every captured graph (they hold its buffers): in a serving trace after a
# warm-up at 16-token prompts, the first requests grew it and the graphs were all captured again (NOTES step 62).
WARM_CACHE_SHARE = 0.5
# Memory kept free beside the KV cache when requests join (``_plan_join``): a prefill group's activations, at most
# PREFILL_TOKENS positions (or one longer prompt) of about 10 hidden-size and 4 MLP-width values each (the residual,
# the norm, q/k/v, the attention's output, w1/w2 and SwiGLU's; the largest live at once), and a margin for the
# decode step's graph pool, its logits and the allocator's rounding
ACTIVATION_HIDDEN, ACTIVATION_MLP = 10, 4
MEMORY_MARGIN = 1 << 30
_IDS = itertools.count()
KEPT_WORDS = 64


# Prompt positions whose logits one step of a prompt's scoring makes (``prompt_logprobs``): 256 x 152k fp32 = 155 MB
SCORE_CHUNK = 256


def vocabulary_problem(field: str, ids, vocab: int) -> str | None:
    """"<field>: token id N is outside the model's vocabulary [0, vocab)" for the first of ``ids`` that is, or None
    (an id past it was never matched, or failed the step)."""
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    return None if bad is None else f"{field}: token id {bad} is outside the model's vocabulary [0, {vocab})"


def default_max_len(max_position_embeddings, seq_length: int) -> int:
    """An engine's positions a row when not given: max(max_position_embeddings, 4 x seq_length) (dynamic NTK
    stretches Qwen v1's window past seq_length)."""
    return max(int(max_position_embeddings or 0), 4 * int(seq_length))


class Request:
    """One prompt being decoded. ``output_ids`` grows as the engine steps; ``finished`` / ``finish_reason``
    ("stop", "length" or "cancelled") are set when it ends."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None):
        self.id = next(_IDS)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.adapter = adapter
        self.output_ids: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_string: str | None = None  # the one of params.stop that ended it, if one did
        # with params.logprobs: for each output token, (its log-probability, [(id, log-probability)] of the
        # params.logprobs most likely tokens, most likely first)
        self.logprobs: list[tuple[float, list]] | None = [] if params.logprobs is not None else None
        # with params.prompt_logprobs, once prefilled: the same for each prompt token after the first, given the
        # tokens before it, and the token's rank (1: the most likely; vLLM's prompt_logprobs report it)
        self.prompt_logprobs: list[tuple[float, list, int]] | None = None
        self._cancel = threading.Event()
        self._cancel_reason = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the engine to drop this request; it leaves the batch at the next step with finish_reason ``reason``:
        "cancelled", or "stop" where the caller ended it on a stop it found itself (the server's stop strings)."""
        if reason not in ("cancelled", "stop"):
            raise ValueError(f"Request.cancel: reason must be 'cancelled' or 'stop', got {reason!r}")
        if self.finished:  # (nothing to drop: it read as cancelled beside its own finish reason)
            return
        if not self._cancel.is_set():  # the first reason given is the one reported
            self._cancel_reason = reason
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __repr__(self) -> str:
        state = f"finished={self.finish_reason}" if self.finished else "running"
        return f"Request(id={self.id}, prompt={len(self.prompt_ids)} tokens, output={len(self.output_ids)}, {state})"


class _Row:
    __slots__ = ("req", "length", "alpha", "generator", "adapter_index", "stops", "last", "picked", "stop_text",
                 "matcher", "counts", "bias", "bans")

    def __init__(self, req, alpha, generator, adapter_index, stops, stop_text=None, matcher=None, counts=None,
                 bias=None, bans=None):
        self.req = req
        self.bans = bans  # a _Bans: the request's allowed_token_ids and bad_words
        self.stop_text = stop_text  # a StopStrings over the row's text when the request has stop strings
        self.matcher = matcher  # an llguidance matcher over the row's output when it is constrained (constraints.py)
        self.counts = counts  # [V] fp32 on the device: each token's count in the output (presence/frequency penalty)
        self.bias = bias  # (token ids, biases) on the device: the request's logit_bias
        self.length = 0  # tokens in the cache, counting the step in flight (its write is enqueued)
        self.alpha = alpha
        self.generator = generator
        self.adapter_index = adapter_index
        self.stops = stops
        self.last = None  # the last picked token the host has read (the next decode input when none is in flight)
        self.picked = 0  # tokens picked for the row, counting the step in flight (= len(output_ids) when none is)


class _Bans:
    """What a row may not pick (vLLM's allowed_token_ids and bad_words), made once at its join: ``mask`` [V] fp32 on
    the device (0, or -inf for a token outside allowed_token_ids or a one-token bad word; None without either), and
    the longer bad words as their last token's ban after the others (``after``: the token before the last -> [(the
    tokens before the last, the last)]), looked for in the output on the host at each pick. ``end``: the token the row
    picks where these leave it none (``_AfterGraph.banned``): a stop that ends it (<|im_end|> where that is one; with
    ignore_eos and no stop ids there is none, and <|im_end|> is output)."""

    __slots__ = ("mask", "after", "end")

    def __init__(self, mask, after: dict, end: int):
        self.mask, self.after, self.end = mask, after, end

    def banned_now(self, output: list[int]) -> list[int]:
        """The last tokens of the longer bad words whose other tokens end ``output``."""
        if not output or not self.after:
            return []
        return [last for prefix, last in self.after.get(output[-1], ())
                if len(output) >= len(prefix) and tuple(output[-len(prefix):]) == prefix]


class _Chunked:
    """A prompt longer than the engine's prefill_chunk joining running rows: prefilled that many positions a step
    into cache row ``slot`` (the one after the active rows: it moves when rows join or leave; it holds ``done``
    positions so far), where the decode steps' graphs may write a padding row's key at position 0: ``first`` holds that
    position's keys and values [layers, heads, D] from the first chunk, and each later chunk puts them back before
    it reads them (``Engine._prefill_chunk``)."""

    __slots__ = ("row", "slot", "done", "first")

    def __init__(self, row, slot):
        self.row, self.slot, self.done, self.first = row, slot, 0, None


class _Step:
    """A decode step enqueued on the device whose tokens the host has not read yet: the rows it covered (slots
    0..n-1 at launch), the host buffer its picked tokens are being copied into, the event that marks the copy
    done (None off CUDA), and its logits (valid until the next step is enqueued)."""

    __slots__ = ("rows", "tokens", "event", "logits", "logprobs")

    def __init__(self, rows, tokens, event, logits, logprobs=None):
        self.rows, self.tokens, self.event, self.logits = rows, tokens, event, logits
        self.logprobs = logprobs  # (rows that asked: [(index, k)], chosen [m], top values [m, k], top ids) on the host


class _KV:
    """The cache object the blocks call: ``update(k, v, layer)`` writes this forward's keys/values and returns
    what attention reads. Prefill: rows ``slot``.. (one per prompt), positions 0..T-1, attention over the new keys only.
    Chunk: row ``slot``, positions ``start``.., attention over the row's keys up to them.
    Decode: rows 0..b-1, one token each at ``pos`` [b], attention over positions < ``kv_len``."""

    def __init__(self, k, v):
        self.k, self.v = k, v
        self.mode = None
        self.slot = 0
        self.start = 0
        self.rows = None
        self.pos = None
        self.kv_len = 0

    def update(self, k, v, layer_idx):
        K, V = self.k[layer_idx], self.v[layer_idx]
        if self.mode == "prefill":
            n, T = k.shape[0], k.shape[2]
            K[self.slot:self.slot + n, :, :T] = k
            V[self.slot:self.slot + n, :, :T] = v
            return k, v
        if self.mode == "chunk":
            s, end = self.start, self.start + k.shape[2]
            K[self.slot, :, s:end] = k[0]
            V[self.slot, :, s:end] = v[0]
            return K[self.slot:self.slot + 1, :, :end], V[self.slot:self.slot + 1, :, :end]
        b = k.shape[0]
        K[self.rows[:b], :, self.pos] = k[:, :, 0]
        V[self.rows[:b], :, self.pos] = v[:, :, 0]
        return K[:b, :, : self.kv_len], V[:b, :, : self.kv_len]


def _greedy_flags(params: SamplingParams) -> tuple[bool, bool]:
    """(penalised, holds its stops back): what a row's sampling asks of the device-side greedy pick."""
    return params.repetition_penalty != 1.0, params.min_new_tokens > 0


def graph_pick(params: SamplingParams) -> tuple[bool] | None:
    """The kind of decode graph a row of this sampling steps in: None when sampled (the forward's graph, the pick
    after it), else (penalised,): the greedy pick inside the graph, with the repetition penalty only when some row
    needs it. Stops held back by min_new_tokens are always in a greedy graph (one masked fill over the logits; a
    kind of its own was captured mid-serving when a request first asked for it: 185 ms, NOTES steps 67-71). A row
    held to a constraint (a JSON schema, a regex, choices, a grammar) picks after the graph too (its allowed tokens
    come from the host each step), as does one with a presence or frequency penalty (its output's token counts live
    beside the row, not in the graph), a logit bias, allowed_token_ids or bad_words (its masks live beside the row;
    a longer bad word's ban comes from the host each step) or log-probabilities to report."""
    after = (params.do_sample or params.constraint() is not None or _counts_output(params) or bool(params.logit_bias)
             or _barred(params) or params.logprobs is not None)
    return None if after else _greedy_flags(params)[:1]


def _counts_output(params: SamplingParams) -> bool:
    return params.presence_penalty != 0 or params.frequency_penalty != 0


def _barred(params: SamplingParams) -> bool:
    return params.allowed_token_ids is not None or bool(params.bad_words)


class _AfterGraph:
    """The rows of a pick whose choice needs more than the greedy graph's, by what they need, with what that needs on
    the device (their index tensors, the penalties' weights): made once when the batch's rows change
    (``Engine._upload``, for every decode step until the next change), and for the rows whose first token a prefill
    picks (``Engine._emit``). ``constrained``: (index, matcher); ``counted``, ``biased``, ``barred`` (with a _Bans),
    ``banning`` (with longer bad words, whose bans the host finds each pick): (index, row); ``scored``: (index, k)."""

    __slots__ = ("constrained", "counted", "biased", "scored", "barred", "banning", "constrained_idx", "counted_idx",
                 "scored_idx", "barred_idx", "masked_idx", "masks", "ends", "presence", "frequency", "device")

    def __init__(self, rows: list, device):
        self.device = device
        self.constrained = [(i, r.matcher) for i, r in enumerate(rows) if r.matcher is not None]
        self.counted = [(i, r) for i, r in enumerate(rows) if r.counts is not None]
        self.biased = [(i, r) for i, r in enumerate(rows) if r.bias is not None]
        self.scored = [(i, r.req.params.logprobs) for i, r in enumerate(rows) if r.req.params.logprobs is not None]
        self.barred = [(i, r) for i, r in enumerate(rows) if r.bans is not None]
        self.banning = [(i, r) for i, r in self.barred if r.bans.after]
        masked = [(i, r) for i, r in self.barred if r.bans.mask is not None]

        def indices(pairs):
            return torch.tensor([i for i, _ in pairs]).to(device, non_blocking=True) if pairs else None

        self.constrained_idx, self.counted_idx, self.scored_idx, self.barred_idx, self.masked_idx = map(
            indices, (self.constrained, self.counted, self.scored, self.barred, masked))
        self.masks = torch.stack([r.bans.mask for _, r in masked]) if masked else None
        self.ends = None
        if self.barred:
            self.ends = torch.tensor([[r.bans.end] for _, r in self.barred]).to(device, non_blocking=True)
        self.presence = self.frequency = None
        if self.counted:
            weights = torch.tensor([[r.req.params.presence_penalty for _, r in self.counted],
                                    [r.req.params.frequency_penalty for _, r in self.counted]], dtype=torch.float32)
            self.presence, self.frequency = weights.to(device, non_blocking=True)[:, :, None].unbind(0)

    def __bool__(self) -> bool:
        return bool(self.constrained or self.counted or self.biased or self.scored or self.barred)

    def biased_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with the rows' logit bias added, and their masks (allowed_token_ids, one-token bad words): a copy
        where any row has either."""
        if not (self.biased or self.masks is not None):
            return logits
        scores = logits.clone()
        for i, row in self.biased:
            ids, values = row.bias
            scores[i].index_add_(0, ids, values)
        if self.masks is not None:
            scores.index_add_(0, self.masked_idx, self.masks)
        return scores

    def banned(self, scores: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``scores`` (every other rule applied) with the longer bad words' last tokens banned in the rows whose output
        ends with their other tokens (read on the host: ``Engine.step`` reads such rows' tokens before the next pick),
        then, in a row these bans (with its other rules) leave no token, only its ``end`` token (a stop: the row ends
        there, rather than the argmax or a draw over nothing picking any token). The model's ``logits`` are never
        written."""
        if not self.barred:
            return scores
        scores = scores.clone() if scores is logits else scores
        hits = [(i, t) for i, row in self.banning for t in row.bans.banned_now(row.req.output_ids)]
        if hits:
            rows, tokens = torch.tensor(hits).to(self.device, non_blocking=True).unbind(1)
            scores[rows, tokens] = -float("inf")
        rows = self.barred_idx
        barred = scores.index_select(0, rows)
        left = barred.gather(1, self.ends)
        scores[rows[:, None], self.ends] = torch.where(barred.isneginf().all(-1, keepdim=True), 0.0, left)
        return scores

    def output_penalised(self, scores: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``scores`` with the presence and frequency penalties of the rows ``counted`` applied from their output's
        token counts; the model's ``logits`` are never written."""
        if not self.counted:
            return scores
        counts = torch.stack([r.counts for _, r in self.counted])
        scores = scores.clone() if scores is logits else scores
        scores[self.counted_idx] = output_penalties(scores.index_select(0, self.counted_idx), counts, self.presence,
                                                    self.frequency)
        return scores

    def count(self, tokens: torch.Tensor, one: torch.Tensor) -> None:
        """The picked ``tokens`` [rows] counted into the ``counted`` rows' output counts (on the device)."""
        for i, row in self.counted:
            row.counts.index_add_(0, tokens[i:i + 1], one)

    def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> tuple | None:
        """The log-probabilities of the rows ``scored`` from their raw ``logits``: each one's picked token's [m] and
        its k most likely tokens' (values and ids, [m, max k], most likely first); None without such rows."""
        if not self.scored:
            return None
        return token_logprobs(logits.index_select(0, self.scored_idx), tokens.index_select(0, self.scored_idx),
                              max(k for _, k in self.scored))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int, ranks: bool = False) -> tuple:
    """From raw ``logits`` [m, V]: the log-probability of each row's token ``tokens`` [m] (fp32 log_softmax), and
    its k most likely tokens' (values and ids, [m, k], most likely first); with ``ranks``, also each token's rank
    [m] (1 + the tokens more likely than it)."""
    lp = torch.log_softmax(logits.float(), -1)
    top = lp.topk(k, dim=-1)
    chosen = lp.gather(1, tokens[:, None])[:, 0]
    if ranks:
        return chosen, top.values, top.indices, (lp > chosen[:, None]).sum(-1) + 1
    return chosen, top.values, top.indices


def _logprob_entries(lp) -> dict:
    """Row index -> (log-probability, [(id, log-probability)] of its k most likely) from ``_logprobs`` on the host
    ((scored, chosen, values, ids)), or {}."""
    if lp is None:
        return {}
    scored, chosen, values, ids = lp
    chosen, values, ids = chosen.tolist(), values.tolist(), ids.tolist()
    return {i: (chosen[j], list(zip(ids[j][:k], values[j][:k]))) for j, (i, k) in enumerate(scored)}


def _masked(scores: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``scores`` with -inf where ``allowed`` [len(rows), V] is False in ``rows``; the model's ``logits`` (a graph's
    output, read again by the caller) are never written."""
    scores = scores.clone() if scores is logits else scores
    scores[rows] = scores.index_select(0, rows).masked_fill(~allowed, -float("inf"))
    return scores


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _adapter_names(model) -> tuple:
    """The adapters PEFT has loaded into ``model`` (its peft_config's names; () for a plain model)."""
    return tuple(sorted(getattr(model, "peft_config", None) or {}))


class Engine:
    """Continuous-batching decoder for a QWenLMHeadModel (or a PeftModel over it, several adapters allowed)."""

    def __init__(self, model, tokenizer, max_batch: int = 32, max_len: int | None = None,
                 use_graphs: bool | None = None, prefill_chunk: int = 0):
        lm = qwen_lm(model)
        if lm is None:
            raise TypeError(f"Engine needs a QWenLMHeadModel or a PeftModel over one, got {type(model).__name__}")
        if lm.training:  # dropout would be on, and NTK/logN are inference-only in Qwen v1
            raise ValueError("Engine needs the model in eval mode: call model.eval() first")
        if not integral(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if max_len is not None and not integral(max_len):  # (2.9 was taken as 2)
            raise ValueError(f"max_len must be an integer (positions a row), got {max_len!r}")
        if use_graphs is not None and not isinstance(use_graphs, bool):  # ("no" was taken as True)
            raise ValueError(f"use_graphs must be True, False or None (None: on CUDA), got {use_graphs!r}")
        if not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be an integer >= 0 (0: prompts prefilled whole), got "
                             f"{prefill_chunk!r}")
        # Only submodules are held, never the model object itself: chat() keeps engines in a WeakKeyDictionary
        # keyed by the model, which a strong reference from the engine would keep alive forever.
        self.tr = lm.transformer
        self._model = weakref.ref(model)  # (to see adapters loaded or deleted later: _sync_adapters)
        self.config = cfg = lm.config
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        # With prefill_chunk > 0, a prompt longer than it that joins running rows is prefilled prefill_chunk positions
        # a step, between their decode steps (``_prefill_chunk``), so that no running stream waits for the whole
        # prompt's forward; shorter requests behind it join meanwhile, a second long one waits for it. Into an empty
        # batch a prompt is always prefilled whole. Off by default: on an H100 every chunk's forward pays the prefill's
        # fixed cost again, so streams of long prompts lost throughput and first-token time (NOTES step 96).
        self.prefill_chunk = prefill_chunk
        default_len = default_max_len(getattr(cfg, "max_position_embeddings", 0), cfg.seq_length)
        self.max_len = int(max_len) if max_len is not None else default_len
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len!r}")
        if self.max_len > default_len:  # (positions no rotary scaling of the model covers; serve refuses the same)
            raise ValueError(f"max_len {self.max_len} is more than the model holds (at most {default_len}: "
                             "max(max_position_embeddings, 4 x seq_length) of its config)")
        self.device = self.tr.wte.weight.device
        self.dtype = self.tr.wte.weight.dtype
        self.vocab = lm.lm_head.out_features
        if use_graphs and self.device.type != "cuda":  # (it failed at the first step, after the prefill)
            raise ValueError(f"use_graphs=True needs a CUDA model; this one is on {self.device.type}")
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self._bind_adapters(model)
        self._base_stops = {tokenizer.im_end_id, tokenizer.im_start_id}
        self._lock = threading.Lock()  # pending queue
        self._step_lock = threading.Lock()
        self._pending: deque[Request] = deque()
        self._rows: list[_Row] = []
        self._chunked: _Chunked | None = None  # a long prompt being prefilled a chunk a step beside the rows
        self._cache: _KV | None = None
        self._slots = 0
        self._capacity = 0
        self._seen = None  # [slots, V] bool: tokens of each row's prompt and output (repetition penalty)
        self._graphs: dict = {}
        self._pool = None
        self._static = None
        self._key_pos = None
        self._row_ids = None  # arange(slots) on the device
        self._sel_key = None  # the adapter selection of the last decode step, and its tensor
        self._sel = None
        self._stopmask = None  # [slots, V] bool: each row's stop tokens (held back until min_new_tokens)
        self._inflight: _Step | None = None  # the device-picked step whose tokens are not read yet
        self._gone: list[_Row] = []  # rows finished while a step was in flight (removed once none is)
        self._synced = False  # the device's step inputs (token, position, counters) match the host's rows
        self._flags = (False, False)  # (any row penalised, any row holding its stops) of the uploaded rows
        self._lora = False  # any uploaded row uses an adapter (else the step runs no adapter at all)
        self._seeded: list = []  # the uploaded rows that sample with a seed: (slot, params, generator)
        self._unseeded = None  # and those without: (their slots on the device, their RowSampling)
        self._after_graph = _AfterGraph([], self.device)  # the uploaded rows whose pick runs after the graph
        self._host_tokens = None  # two pinned host buffers for the picked tokens (a step in flight uses one)
        self._events = None
        self._flip = 0
        self._decode_weights = False  # the Int4 kernels' repacked weights made (``_spare_bytes``)
        self._constraint_state: Constraints | None = None  # made for the first constrained request
        # bad_words -> their token sequences (bad_word_ids), the last KEPT_WORDS kept: the server tokenizes them off
        # its event loop first (prepare_token_rules), and submit, on the loop, finds them here for each of n choices
        self._words: OrderedDict[tuple, list] = OrderedDict()
        self._one = torch.ones(1, device=self.device)  # (a picked token's count, added on the device)

    def _bind_adapters(self, model) -> None:
        """What the engine reads of the model's adapters: each row's LoRA (RowAdapters), lm_head (PEFT wraps it for
        an adapter with its own copy), whether the fused kernels apply; and the adapter names it read them at."""
        self.lm_head = qwen_lm(model).lm_head
        self.adapters = RowAdapters(model)
        self._kernels = fused_kernels(self.tr, self.device, self.dtype)  # None: the model's own blocks decode
        self._adapter_names = _adapter_names(model)

    def _sync_adapters(self) -> None:
        """Read the model's adapters again where PEFT loaded or deleted one since (``load_adapter``, a model wrapped
        by ``PeftModel.from_pretrained`` after chat() made its engine): a request for a new adapter was refused as
        unknown, and one for a deleted adapter decoded as the base. Only on an engine with no request left."""
        model = self._model()
        if model is None or _adapter_names(model) == self._adapter_names:
            return
        if not self.has_work():
            while self._rows or self._inflight is not None:  # finished rows the next step() would drop
                self.step()
        with self._step_lock:
            if self.has_work() or self._rows or self._inflight is not None:
                raise ValueError("the model's adapters changed (an adapter loaded or deleted) while this engine has "
                                 "requests; submit again when they are done")
            self._bind_adapters(model)
            # the graphs and the step's adapter selection were made for the adapters read before
            self._drop_graphs()
            self._static = self._sel_key = self._sel = None
            self._synced = False

    def _drop_graphs(self) -> None:
        """Forget the captured graphs, and their memory pool with them: the next captures take a fresh one
        (capturing into a pool whose graphs are all gone trips an internal assert of PyTorch's caching allocator,
        seen on the H200 when the cache grew mid-serving)."""
        self._graphs.clear()
        self._pool = None

    # -- public API ---------------------------------------------------------------------------------------------
    def submit(self, prompt_ids, params: SamplingParams | None = None, adapter: str | None = None) -> Request:
        """Queue one prompt; it joins the running batch at the next step. Thread-safe."""
        req = self._checked(prompt_ids, params, adapter)
        with self._lock:
            self._pending.append(req)
        return req

    def _checked(self, prompt_ids, params: SamplingParams | None, adapter: str | None) -> Request:
        """A request, every value checked now: anything the step would fail on fails every row joining with it."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.check()  # (again: a field may have changed since it was made)
        self._sync_adapters()
        self.adapters.index(adapter)  # unknown adapter -> ValueError now, not at the step
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        if isinstance(prompt_ids, (str, bytes)) or not hasattr(prompt_ids, "__iter__"):
            raise ValueError(f"prompt_ids must be a list of token ids, got {type(prompt_ids).__name__}")
        ids = list(prompt_ids)
        wrong = [t for t in ids if not integral(t)]
        if wrong:  # (1.9 was read as 1, "12" as 12, a nested list failed inside int())
            raise ValueError(f"prompt_ids must be integer token ids, got {wrong[0]!r}")
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("prompt_ids is empty: a request needs at least one prompt token")
        for field, given in (("prompt_ids", ids), ("stop_token_ids", params.stop_token_ids),
                             ("logit_bias", params.logit_bias or {})):
            if (why := vocabulary_problem(field, given, self.vocab)) is not None:
                raise ValueError(why)
        if len(ids) + params.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"engine's max_len {self.max_len}")
        self.prepare_constraint(params)  # (a bad schema or regex: ValueError naming what is wrong)
        self.prepare_token_rules(params)
        return Request(ids, params, adapter)

    def bad_word_ids(self, words: tuple) -> list[tuple[int, ...]]:
        """``words``' token sequences as vLLM bans them (sampling.bad_word_ids), cached; FieldProblem naming a word
        of too many tokens (or one outside the model's vocabulary)."""
        with self._lock:
            if words in self._words:
                self._words.move_to_end(words)
                return self._words[words]
        found = bad_word_ids(self.tokenizer.encode, words, self.vocab)
        with self._lock:
            self._words[words] = found
            if len(self._words) > KEPT_WORDS:
                self._words.popitem(last=False)
        return found

    def prepare_token_rules(self, params: SamplingParams) -> None:
        """Check ``params``' allowed_token_ids and bad_words for this engine (FieldProblem, a ValueError, naming the
        field): the ids in the vocabulary, no more of them than it holds, the words tokenized (``bad_word_ids``: a
        caller on an event loop calls this on a worker thread first, and submit then finds them tokenized), and
        some token left to pick: not every allowed token a one-token bad word, nor, before min_new_tokens, a stop."""
        allowed = params.allowed_token_ids
        if allowed is not None:
            if len(allowed) > self.vocab:
                raise FieldProblem("allowed_token_ids", f"allowed_token_ids holds {len(allowed)} ids: more than the "
                                   f"model's vocabulary ({self.vocab})")
            if max(allowed) >= self.vocab:
                raise FieldProblem("allowed_token_ids", vocabulary_problem("allowed_token_ids", allowed, self.vocab))
        words = self.bad_word_ids(params.bad_words) if params.bad_words else []
        if allowed is None:
            return
        # (each test stops at the first token that passes: a list of the whole vocabulary is read at every submit)
        singles = {w[0] for w in words if len(w) == 1}
        if all(t in singles for t in allowed):
            raise FieldProblem("allowed_token_ids", "allowed_token_ids: every one of its tokens is a bad word "
                               "(bad_words): no token is left to pick")
        stops = self._stops(params)
        if params.min_new_tokens and all(t in singles or t in stops for t in allowed):
            raise FieldProblem("allowed_token_ids", "allowed_token_ids: every token it leaves ends the reply (a stop "
                               "token), which the reply's minimum length (min_tokens) holds back: no token is left "
                               "to pick")

    def _stops(self, params: SamplingParams) -> set:
        """The tokens that end a row of ``params`` (not part of its output)."""
        return (set() if params.ignore_eos else self._base_stops) | set(params.stop_token_ids)

    def prepare_constraint(self, params: SamplingParams) -> None:
        """Compile what ``params`` holds the reply to (json_schema, regex, choice, grammar) for this engine's
        tokenizer now (ValueError "<kind>: ..." naming what is wrong). ``submit`` does it too; a caller on an event
        loop (the server) calls this on a worker thread first, since a large schema compiles for up to ~0.1 s and
        submit then finds it compiled."""
        constraint = params.constraint()
        if constraint is not None:
            self._constraints().check(*constraint)

    def _constraints(self) -> Constraints:
        if self._constraint_state is None:
            self._constraint_state = Constraints(self.tokenizer.tokenizer, self.vocab, self.tokenizer.im_end_id)
        return self._constraint_state

    def has_work(self) -> bool:
        with self._lock:
            if self._pending:
                return True
        if self._chunked is not None:
            return True
        # (a step may still be in flight for rows that all finished: the next step() reads and drops it)
        return any(not r.req.finished for r in self._rows)

    def occupancy(self) -> tuple[int, int]:
        """(rows in the running batch, finished ones not yet dropped and a long prompt being prefilled in chunks
        included; requests waiting to join it)."""
        with self._lock:
            waiting = len(self._pending)
        return len(self._rows) + (self._chunked is not None), waiting

    @torch.no_grad()
    def step(self) -> list[Request]:
        """Cancelled rows leave, waiting requests join (prefill; a long prompt beside running rows one chunk a
        step), then one decode step for every active row. Returns the requests that got a token or finished in this
        step.

        Pipelined: the next decode step is enqueued before the tokens of the one in flight are read, so a
        token arrives from the step() after the one that enqueued it; a row finishes, leaves or is cancelled
        within one extra step."""
        with self._step_lock:
            touched: dict[int, Request] = {}
            # a cancelled request still waiting leaves at once: it holds no row, and a full batch would otherwise
            # keep it (and its place in a server's queue) until some running row ended
            self._drop_cancelled_waiting(touched)
            # a constrained row, or one with a longer bad word, needs its last token read before its next pick (not
            # one step late)
            if self._inflight is not None and (self._must_change() or self._after_graph.constrained
                                               or self._after_graph.banning):
                self._read(self._take_inflight(), touched)
            if self._inflight is None:
                if self._gone:
                    gone, self._gone = self._gone, []
                    self._remove(gone)
                self._drop_cancelled(touched)
                self._admit(touched)
            if self._chunked is not None:  # (its last chunk joins the batch: _must_change read the step in flight)
                self._prefill_chunk(touched)
            if self._rows:
                previous = self._take_inflight()
                self._inflight = self._launch()
                if previous is not None:
                    self._read(previous, touched)
            return list(touched.values())

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 adapter: str | None = None, progress: bool = False) -> list[list[int]]:
        """Output ids of every prompt (in input order): all submitted, stepped until done. ``params``: one for
        every prompt, or a list with one each."""
        each = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(each) != len(prompts):
            raise ValueError(f"params: {len(each)} given for {len(prompts)} prompts")
        # every prompt checked before any is queued: a bad one left those before it in the queue for a later call
        reqs = []
        for i, (p, q) in enumerate(zip(prompts, each)):
            try:
                reqs.append(self._checked(p, q, adapter))
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        with self._lock:
            self._pending.extend(reqs)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(reqs), desc="generating", unit="reply")
        try:
            while not all(r.finished for r in reqs):
                done = sum(r.finished for r in self.step())
                if bar is not None and done:
                    bar.update(done)
        finally:
            if bar is not None:
                bar.close()
        return [r.output_ids for r in reqs]

    def warm_up(self, expect: Sequence[SamplingParams] = (SamplingParams(),)) -> float:
        """Do the engine's first-use work now, before requests wait for it; returns the seconds it took.

        On a fresh CUDA process the first prefill and decode steps compile kernels (Triton, NVRTC), start cuBLAS
        and capture graphs: ~10 s that the first requests of a server waited for (NOTES step 58). This runs a
        short greedy prompt through every batch bucket (each bucket's graph, and the tensor-core kernels of each
        row count), one sampled and penalised row (the device-side sampling), and a row through each adapter (the
        LoRA kernels), and captures one prompt's prefill at each of PREFILL_GRAPH_LENGTHS. On CUDA it first sizes
        the KV cache for max_batch rows of max_len positions, or of as many as WARM_CACHE_SHARE of the free device
        memory holds (``warm_length``), so that requests up to that length never grow it (a growth drops the graphs);
        then, where the steps read their rows' own keys, it captures
        the decode step of every batch bucket at every graph length the cache holds (``_graph_length``: a few
        a bucket) for the sampling of ``expect`` (what the requests to come will use: greedy by default; the
        server's and chat's generation-config defaults), with and without adapters, so that no such request
        waits for a capture (~0.1 s each; a step of other sampling is captured when first met). The engine must
        be idle; it is idle again afterwards, its graphs kept until the cache grows (the compiled kernels stay
        for the process)."""
        if self.has_work():
            raise RuntimeError("warm_up needs an idle engine (requests are waiting or running)")
        self._sync_adapters()
        start = time.perf_counter()
        if self.use_graphs:
            self._ensure(self.max_batch, self.warm_length())
        ids = ((self.tokenizer.encode("Warming up the decoder.") * 4)[:16] or [0])[: max(1, self.max_len - 2)]
        new = min(2, self.max_len - len(ids))
        greedy = SamplingParams(max_new_tokens=new)
        buckets = sorted({self._bucket(n) for n in range(1, self.max_batch + 1)}, reverse=True)
        # the rows run on the base, or on the adapter that must run alone (it trained the base's biases)
        lead = self.adapters.base_changed[0] if self.adapters.base_changed else None
        # the largest bucket first: the cache grows to it once (a growth drops the graphs captured before it)
        for b in buckets:
            self.generate([ids] * b, greedy, adapter=lead)
        self.generate([ids], SamplingParams(max_new_tokens=new, do_sample=True, top_p=0.8, repetition_penalty=1.1,
                                            seed=0), adapter=lead)
        for name in self.adapters.names:
            if not [n for n in self.adapters.base_changed if n != name]:
                self.generate([ids], greedy, adapter=name)
        # (no base rows beside an adapter that must run alone: its steps always run the adapters)
        loras = (True,) if lead is not None else (False, True) if self.adapters.names else (False,)
        if self.use_graphs and self._kernels is not None:
            # one prompt's prefill at every graph length the cache holds (its short prompt made the first): a prompt
            # joining alone then neither waits for a capture nor takes the capture's memory beside running rows
            for length, lora in itertools.product(PREFILL_GRAPH_LENGTHS, loras):
                if length <= self._capacity and ("prefill", length, lora) not in self._graphs:
                    self._graphs["prefill", length, lora] = self._capture_prefill(length, lora)
        if self.use_graphs and self._own_keys():
            picks = {graph_pick(p) for p in expect}
            for b in buckets:
                for length in self._graph_lengths(b):
                    for pick, lora in itertools.product(sorted(picks, key=repr), loras):
                        key = self._graph_key(b, length, pick, lora, True)
                        if key not in self._graphs:
                            self._graphs[key] = self._capture(b, length, pick, True, lora)
        return time.perf_counter() - start

    def _graph_lengths(self, b: int) -> list[int]:
        """Every graph length of own-keys steps of b rows that the cache holds, shortest first."""
        lengths = [self._graph_length(b, 1, True)]
        while lengths[-1] < self._capacity:
            lengths.append(self._graph_length(b, lengths[-1] + 1, True))
        return lengths

    def warm_length(self) -> int:
        """The positions a row gets from warm_up's cache: max_len, or fewer (a multiple of LENGTH_BUCKET, at least
        one) where max_batch rows of it would take more than WARM_CACHE_SHARE of the device's free memory."""
        if self.device.type != "cuda":
            return self.max_len
        self._prepare_weights()
        free = torch.cuda.mem_get_info(self.device)[0]
        fits = int(WARM_CACHE_SHARE * free) // (self._bucket(self.max_batch) * self._position_bytes())
        return max(LENGTH_BUCKET, min(self.max_len, fits // LENGTH_BUCKET * LENGTH_BUCKET))

    # -- rows -------------------------------------------------------------------------------------------------
    def _must_change(self) -> bool:
        """Whether the batch changes before the next decode step (a row finished or was cancelled, or a waiting
        request has room to join): then the step in flight is read first."""
        if self._gone or any(r.req.cancelled for r in self._rows):
            return True
        chunked = self._chunked
        if chunked is not None and len(chunked.row.req.prompt_ids) - chunked.done <= self.prefill_chunk:
            return True  # its last chunk: the row joins
        waiting = self._waiting()
        return bool(waiting) and self._plan_join(waiting)[0] > 0

    def _waiting(self) -> list[Request]:
        """The queue's first requests, as many as the batch has room for beside the rows and a long prompt being
        prefilled in chunks (``_plan_join`` decides how many join)."""
        with self._lock:
            room = self.max_batch - len(self._rows) - (self._chunked is not None)
            return list(itertools.islice(self._pending, room))

    def _take_inflight(self) -> _Step | None:
        step, self._inflight = self._inflight, None
        return step

    def _finish(self, row: _Row, reason: str, touched) -> None:
        row.req.finished = True
        row.req.finish_reason = reason
        touched[row.req.id] = row.req

    def _remove(self, gone: list[_Row]) -> None:
        """Drop rows and keep the active ones in slots 0..n-1 (moving the last rows into the holes)."""
        gone_ids = {id(r) for r in gone}
        slots = list(self._rows)
        keep = [r for r in slots if id(r) not in gone_ids]
        new: list[_Row | None] = [r if id(r) not in gone_ids else None for r in slots]
        n = len(keep)
        movers = [(i, r) for i, r in enumerate(new) if r is not None and i >= n]
        holes = [i for i in range(n) if new[i] is None]
        for hole, (src, row) in zip(holes, movers):
            L = row.length
            self._cache.k[:, hole, :, :L] = self._cache.k[:, src, :, :L]
            self._cache.v[:, hole, :, :L] = self._cache.v[:, src, :, :L]
            self._seen[hole] = self._seen[src]
            new[hole], new[src] = row, None
        self._rows = [r for r in new[:n]]
        self._synced = False

    def _drop_cancelled_waiting(self, touched) -> None:
        with self._lock:
            waiting = [r for r in self._pending if r.cancelled]
            for r in waiting:
                self._pending.remove(r)
        for r in waiting:
            r.finished, r.finish_reason = True, r._cancel_reason
            touched[r.id] = r

    def _drop_cancelled(self, touched) -> None:
        self._drop_cancelled_waiting(touched)
        gone = [row for row in self._rows if row.req.cancelled]
        for row in gone:
            self._finish(row, row.req._cancel_reason, touched)
        if gone:
            self._remove(gone)

    def _admit(self, touched) -> None:
        take, layout = self._plan_join(self._waiting())
        if not take:
            return
        with self._lock:  # (only step() takes from the queue: its head is still the planned one's, cancelled or not)
            joining = [self._pending.popleft() for _ in range(take)]
        # beside running rows a long prompt is the last to join (``_plan_join``) and is prefilled a chunk a step
        chunked = None
        if self._rows and self._chunked is None and self._chunks(joining[-1]):
            chunked = joining.pop()
        # LoRA weights changed since the graphs were captured (looked at only when no row or chunked prompt runs)
        if not self._rows and self._chunked is None and self.adapters.refresh():
            self._drop_graphs()
        # grow the cache once for everything joining now (a growth copies the whole cache)
        self._make_cache(*layout)
        if self._chunked is not None:  # the joining rows take the slots after the rows: a chunked prompt moves past
            self._move_chunked(len(self._rows) + len(joining))
        # prompts joining together are prefilled together (right-padded to the longest of a group): a server's
        # burst of requests costs one forward per group instead of one per prompt. Shortest first, so that a group
        # holds prompts of like lengths: 64 prompts of 50-1,000 tokens pad to 39.9k positions instead of 54.8k.
        group: list[Request] = []
        for req in sorted(joining, key=lambda r: len(r.prompt_ids)):
            longest = max([len(r.prompt_ids) for r in group] + [len(req.prompt_ids)])
            if group and (len(group) + 1) * longest > PREFILL_TOKENS:
                self._prefill(group, touched)
                group = []
            group.append(req)
        if group:
            self._prefill(group, touched)
        if chunked is not None:  # into the slot after the rows (those just joined included)
            self._chunked = _Chunked(self._new_row(chunked), len(self._rows))

    # -- memory -------------------------------------------------------------------------------------------------
    def _full_bucket(self, n: int) -> int:
        """The batch bucket of n rows: the next power of two, at most max_batch (n itself without graphs)."""
        b = 1
        while b < n:
            b *= 2
        return min(b, self.max_batch) if self.use_graphs else n

    def _bucket(self, n: int) -> int:
        """The rows a step of n rows computes (its graph's): ``_full_bucket``, or the cache's slots where memory
        held the cache to fewer than a full bucket (``_plan_join``)."""
        b = self._full_bucket(n)
        return min(b, self._slots) if self._cache is not None and self._slots >= n else b

    def _capacity_for(self, length: int) -> int:
        return min(_round_up(length, LENGTH_BUCKET), _round_up(self.max_len, 8))

    def _position_bytes(self) -> int:
        """Device bytes of one row's keys and values at one position, every layer."""
        cfg = self.config
        return 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.kv_channels * self.dtype.itemsize

    def _cache_bytes(self, slots: int, capacity: int) -> int:
        """Device bytes of a cache of ``slots`` rows of ``capacity`` positions: keys and values, and the two
        [slots, V] bool masks beside them."""
        return slots * (capacity * self._position_bytes() + 2 * self.vocab)

    def _spare_bytes(self, prefill: int) -> int | None:
        """Device memory a new cache may take now, beyond the one held: the device's free memory, less the
        activations of a prefill of ``prefill`` positions (measured on the 14B: 134-178 KB a position,
        benchmarks/prefill_memory.py; counted as 212 KB), the adapters' copies still to come and a margin. The Int4
        layers' decode copies and the adapters' stacks are made first. None off CUDA (no limit: the host's memory
        is the process's own business)."""
        if self.device.type != "cuda":
            return None
        later = self._prepare_weights()
        cfg = self.config
        # (not the allocator's reserved but unused memory: after the weights' repack it held 2.7 GiB in pieces that a
        # 68 MiB block did not fit, NOTES step 89)
        free = torch.cuda.mem_get_info(self.device)[0]
        width = ACTIVATION_HIDDEN * cfg.hidden_size + ACTIVATION_MLP * (cfg.intermediate_size // 2)
        return free - prefill * width * self.dtype.itemsize - later - MEMORY_MARGIN

    def _prepare_weights(self) -> int:
        """The copies that the first decode steps would make, made before free memory is counted: the Int4 layers'
        (``quant.linear.prepare_decode_weights``) and the adapters' stacks (``RowAdapters.prepare``; a server's
        first adapter request made them after the cache had taken the memory). Returns the bytes of the adapters'
        copies still to come."""
        if not self._decode_weights:
            prepare_decode_weights(self.tr, self.dtype)
            self._decode_weights = True
        return self.adapters.prepare(self.dtype)

    def _plan_join(self, waiting: list) -> tuple[int, tuple]:
        """(how many of ``waiting``, in queue order, join now; the cache layout (slots, capacity, fresh) for them
        and the active rows). As many as have room whose cache fits the device's memory (``_spare_bytes``): the
        cache grows to a full batch bucket where that fits, else to exactly the rows it needs (their steps then
        compute that many rows), and the others wait for rows to finish. With no active row the cache may be
        made anew (``fresh``: the held one freed first, e.g. fewer slots of more positions for a long prompt);
        the queue's first request then joins even if nothing fits (it fails on its own, with the device's out-of-
        memory error, if it does not fit alone). The queue is not reordered: a long request is not passed by
        shorter ones behind it. Beside running rows a prompt over ``prefill_chunk`` tokens (where set) joins last of
        its group and is prefilled in chunks (``_prefill_chunk``), its slot held meanwhile: the requests behind it
        join as usual up to the next such prompt, which waits for it to join."""
        chunked = self._chunked
        n = len(self._rows) + (chunked is not None)  # the slots held: the rows', and a chunked prompt's
        if n:  # beside running rows the first long prompt is the last to join now (it is prefilled in chunks); while
            # one is, the next one waits for it to join
            long_at = next((i for i, r in enumerate(waiting) if self._chunks(r)), len(waiting))
            waiting = waiting[:long_at + (chunked is None)]
        if not waiting:
            return 0, ()
        held_needs = [r.length + r.req.params.max_new_tokens - len(r.req.output_ids) for r in self._rows]
        if chunked is not None:
            held_needs.append(len(chunked.row.req.prompt_ids) + chunked.row.req.params.max_new_tokens)
        # the positions the cache must hold with the first k waiting requests joined: needs[k - 1]
        needs = list(itertools.accumulate((len(r.prompt_ids) + r.params.max_new_tokens for r in waiting), max,
                                          initial=max(held_needs, default=0)))[1:]
        have = (self._slots, self._capacity) if self._cache is not None else (0, 0)
        # (the positions of the largest prefill forward: a group's, or one long prompt's, or beside running rows
        # one chunk's)
        forward = [min(len(r.prompt_ids), self.prefill_chunk) if n and self._chunks(r) else len(r.prompt_ids)
                   for r in waiting]
        spare = self._spare_bytes(max(min(PREFILL_TOKENS, sum(forward)), max(forward)))
        held = self._cache_bytes(*have)
        for k in range(len(waiting), 0, -1):
            capacity = self._capacity_for(needs[k - 1])
            for slots in dict.fromkeys((self._full_bucket(n + k), n + k)):  # a full bucket first
                grown = (max(have[0], slots), max(have[1], capacity))
                if grown == have or spare is None or self._cache_bytes(*grown) <= spare:
                    return k, grown + (False,)
                # with no active row the held cache is freed before a new one is made
                if not n and self._cache is not None and self._cache_bytes(slots, capacity) <= spare + held:
                    return k, (slots, capacity, True)
        if n:
            return 0, ()
        return 1, (self._full_bucket(1), self._capacity_for(needs[0]), self._cache is not None)

    def _ensure(self, rows: int, length: int) -> None:
        """The cache covers ``rows`` slots (a batch bucket) and ``length`` positions (a multiple of 256)."""
        self._make_cache(max(self._slots, self._full_bucket(rows)), max(self._capacity, self._capacity_for(length)))

    def _make_cache(self, slots: int, capacity: int, fresh: bool = False) -> None:
        """The cache at ``slots`` x ``capacity``: grown (the active rows' keys and values copied), or with no
        active row and ``fresh``, made anew at exactly that layout after the held one is freed."""
        if fresh:
            assert not self._rows and self._chunked is None
            self._cache = self._seen = self._stopmask = self._static = None
            self._drop_graphs()
            self._slots = self._capacity = 0
        if slots == self._slots and capacity == self._capacity:
            return
        cfg = self.config
        shape = (cfg.num_hidden_layers, slots, cfg.num_attention_heads, capacity, cfg.kv_channels)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        seen = torch.zeros(slots, self.vocab, dtype=torch.bool, device=self.device)
        assert self._inflight is None  # (the cache grows only when rows join: no step is in flight then)
        if self._cache is not None:
            n = len(self._rows)
            k[:, :n, :, : self._capacity] = self._cache.k[:, :n]
            v[:, :n, :, : self._capacity] = self._cache.v[:, :n]
            seen[:n] = self._seen[:n]
            if self._chunked is not None:  # a long prompt's keys so far, in the slot it holds
                p = self._chunked.slot
                k[:, p, :, : self._capacity] = self._cache.k[:, p]
                v[:, p, :, : self._capacity] = self._cache.v[:, p]
        self._cache = _KV(k, v)
        self._seen = seen
        self._slots, self._capacity = slots, capacity
        self._key_pos = torch.arange(capacity, device=self.device)
        self._row_ids = torch.arange(slots, device=self.device)
        self._drop_graphs()  # captured against the old buffers
        self._static = None
        self._stopmask = torch.zeros(slots, self.vocab, dtype=torch.bool, device=self.device)
        self._synced = False

    # -- forwards -----------------------------------------------------------------------------------------------
    def _select(self, indices: list[int | None], width: int) -> torch.Tensor:
        sel = torch.zeros(max(len(self.adapters.names), 1), width, dtype=torch.float32)
        for i, a in enumerate(indices):
            if a is not None:
                sel[a, i] = 1.0
        return sel.to(self.device)

    def _blocks(self, x, rope, attn, query_scale, last=None):
        """fp32 logits [b, V] at each row's last position: ``last`` [b] its index (None: the final one)."""
        for block in self.tr.h:
            x = block(x, rope=rope, attn=attn, query_scale=query_scale, cache=self._cache)
        x = x[:, -1:] if last is None else x[torch.arange(x.shape[0], device=x.device), last][:, None]
        return self.lm_head(self.tr.ln_f(x))[:, -1].float()

    def _prefill(self, reqs: list[Request], touched) -> None:
        """Prefill the prompts of ``reqs`` in one forward into the next free slots and pick each one's first token.
        The prompts are right-padded to the longest: causal attention keeps every real position to its own row's
        earlier tokens, and the cache positions written from padding lie at or past the row's length, where each
        decode step writes before it reads. NTK alpha comes from each row's own length, as in Qwen v1."""
        lengths = [len(r.prompt_ids) for r in reqs]
        T, n = max(lengths), len(reqs)
        slot0 = len(self._rows)
        rows = [self._new_row(req) for req in reqs]
        indices = [r.adapter_index for r in rows]
        select = None if all(a is None for a in indices) else self._select(indices, n)
        graph_length = self._prefill_graph_length(n, T, rows, slot0, select is not None)
        if graph_length is not None:
            logits, ids = self._prefill_graphed(graph_length, reqs[0].prompt_ids, select, slot0)
            self._joined(rows, lengths, ids, touched, logits)
            return
        ids = torch.tensor([r.prompt_ids + [0] * (T - len(r.prompt_ids)) for r in reqs], dtype=torch.long,
                           device=self.device)
        last = torch.tensor(lengths, device=self.device) - 1
        self._joined(rows, lengths, ids, touched, self._prefill_forward(ids, rows, select, slot0, last))

    def _prefill_forward(self, ids, rows: list[_Row], select, slot: int, last, start: int = 0) -> torch.Tensor:
        """fp32 logits [n, V] at each prompt's ``last`` [n] index of an eager prefill of ``ids`` [n, T] (``rows``'
        prompts, right-padded) into cache rows slot..slot+n-1, at positions start..start+T-1: ``start`` > 0 is a later
        chunk of one prompt, attending over its keys so far. Each row's NTK alpha is its whole prompt's, logN applies
        past seq_length; through the decode step's fused kernels, else the model's blocks."""
        cfg = self.config
        n, T = ids.shape
        pos = torch.arange(start, start + T, device=self.device)[None].expand(n, T)
        cos, sin = self.tr.rotary_emb(pos, torch.tensor([[r.alpha] for r in rows], device=self.device))
        query_scale = None
        if cfg.use_logn_attn and start + T > cfg.seq_length:
            query_scale = logn_scale(pos + 1, cfg.seq_length)
        with self.adapters.applied(select), inference_sdpa(self.device):
            if self._kernels is not None:
                with self._kernel_device():
                    return prefill_blocks(self._kernels, self.tr, self.lm_head, self._cache.k, self._cache.v,
                                          self.tr.wte(ids), cos, sin, query_scale, slot, last, start)
            self._cache.mode, self._cache.slot, self._cache.start = ("chunk" if start else "prefill"), slot, start
            if start:  # each position sees the row's keys up to its own
                attn = AttentionSpec(mask=(torch.arange(start + T, device=self.device) <= pos[0, :, None])[None, None])
            else:
                attn = AttentionSpec(is_causal=T > 1)
            return self._blocks(self.tr.wte(ids), (cos, sin), attn, query_scale, last=last)

    def _chunks(self, req: Request) -> bool:
        """Whether ``req``, joining running rows, is prefilled in chunks (``prefill_chunk``)."""
        return 0 < self.prefill_chunk < len(req.prompt_ids)

    def _new_row(self, req: Request) -> _Row:
        """The row of a request about to be prefilled: its generator (seeded), NTK alpha from its prompt's length,
        adapter, stop ids and stop strings."""
        cfg = self.config
        generator = None
        if req.params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(req.params.seed)
        alpha = float(ntk_alpha(len(req.prompt_ids), cfg.seq_length)) if cfg.use_dynamic_ntk else 1.0
        stop_text = StopStrings(self.tokenizer, req.params.stop) if req.params.stop else None
        constraint = req.params.constraint()
        counts = torch.zeros(self.vocab, device=self.device) if _counts_output(req.params) else None
        bias = None
        if req.params.logit_bias:
            ids, values = zip(*req.params.logit_bias.items())
            bias = (torch.tensor(ids, device=self.device),
                    torch.tensor(values, dtype=torch.float32, device=self.device))
        stops = self._stops(req.params)
        return _Row(req, alpha, generator, self.adapters.index(req.adapter), stops, stop_text,
                    None if constraint is None else self._constraints().matcher(*constraint), counts, bias,
                    self._bans(req.params, stops))

    def _bans(self, params: SamplingParams, stops: set) -> _Bans | None:
        """A row's _Bans from its allowed_token_ids and bad_words (None without either)."""
        if not _barred(params):
            return None
        words = self.bad_word_ids(params.bad_words) if params.bad_words else []
        singles = [w[0] for w in words if len(w) == 1]
        mask = None
        if params.allowed_token_ids is not None or singles:
            if params.allowed_token_ids is None:
                mask = torch.zeros(self.vocab, device=self.device)
            else:
                mask = torch.full((self.vocab,), -float("inf"), device=self.device)
                mask[torch.tensor(params.allowed_token_ids, device=self.device)] = 0
            if singles:
                mask[torch.tensor(singles, device=self.device)] = -float("inf")
        after: dict[int, list] = {}
        for w in words:
            if len(w) > 1:
                after.setdefault(w[-2], []).append((w[:-1], w[-1]))
        end = self.tokenizer.im_end_id
        return _Bans(mask, after, end if end in stops or not stops else min(stops))

    def _prefill_chunk(self, touched) -> None:
        """The next ``prefill_chunk`` positions of the prompt being prefilled in chunks (``_Chunked``), into its slot;
        it may run while a decode step is in flight (it writes and reads only its own slot, after that step on the
        stream). The last chunk (no step in flight then: ``_must_change``) picks the first token, and the row joins
        the batch in the slot after the rows, its keys and values moved there if rows left meanwhile. Cancelled
        meanwhile, the request finishes and its slot is free again."""
        chunked = self._chunked
        row, slot, start = chunked.row, chunked.slot, chunked.done
        req = row.req
        if req.cancelled:
            req.finished, req.finish_reason = True, req._cancel_reason
            touched[req.id] = req
            self._chunked = None
            return
        L = len(req.prompt_ids)
        end = min(L, start + self.prefill_chunk)
        k, v = self._cache.k, self._cache.v
        if start:  # position 0 as the first chunk wrote it (a decode graph's padding row may have written there)
            k[:, slot, :, 0], v[:, slot, :, 0] = chunked.first
        logits = self._forward_chunk(row, slot, start, end)
        if not start:
            chunked.first = k[:, slot, :, 0].clone(), v[:, slot, :, 0].clone()
        chunked.done = end
        if end < L:
            return
        assert self._inflight is None
        self._move_chunked(len(self._rows))
        self._chunked = None
        self._joined([row], [L], torch.tensor([req.prompt_ids], device=self.device), touched, logits)

    def _move_chunked(self, slot: int) -> None:
        """The chunked prompt's keys and values so far moved to cache row ``slot`` (rows joined past it, or left
        before it). No step in flight: rows change only then."""
        chunked = self._chunked
        if chunked.slot != slot:
            old, done = chunked.slot, chunked.done
            for cache in (self._cache.k, self._cache.v):
                cache[:, slot, :, :done] = cache[:, old, :, :done]
            chunked.slot = slot

    def _forward_chunk(self, row: _Row, slot: int, start: int, end: int) -> torch.Tensor:
        """fp32 logits [1, V] at position end - 1 of the forward of positions start..end-1 of ``row``'s prompt into
        cache row ``slot`` (``_prefill_forward``): the arithmetic of the whole prompt's prefill a position, summed
        over other shapes."""
        ids = torch.tensor([row.req.prompt_ids[start:end]], dtype=torch.long, device=self.device)
        select = None if row.adapter_index is None else self._select([row.adapter_index], 1)
        return self._prefill_forward(ids, [row], select, slot, torch.tensor([end - start - 1], device=self.device),
                                     start)

    def _joined(self, rows: list[_Row], lengths: list[int], ids: torch.Tensor, touched, logits) -> None:
        """The rows just prefilled join the batch (in the next slots): each prompt's tokens (``ids`` [n, >= its
        length] on the device) marked seen, and their first tokens picked from ``logits`` [n, V]."""
        slot0 = len(self._rows)
        for i, (row, L) in enumerate(zip(rows, lengths)):
            row.length = L
            self._seen[slot0 + i].zero_()
            self._seen[slot0 + i, ids[i, :L]] = True
        for row in rows:
            if row.req.params.prompt_logprobs is not None:
                row.req.prompt_logprobs = self._score_prompt(row)
        self._rows.extend(rows)
        self._synced = False
        self._emit(rows, logits, touched)

    @torch.no_grad()
    def _score_prompt(self, row: _Row) -> list[tuple[float, list, int]]:
        """Each prompt token's log-probability given the tokens before it, its ``prompt_logprobs`` most likely
        alternatives' and its rank (one entry for each token after the first), from the raw logits of an eager
        forward of the whole prompt through the model's blocks, with the row's adapter, NTK alpha and logN; it writes
        no cache. The logits are made SCORE_CHUNK positions at a time (152k fp32 logits a position)."""
        cfg, req = self.config, row.req
        ids = torch.tensor([req.prompt_ids], device=self.device)
        T, k = ids.shape[1], req.params.prompt_logprobs
        pos = torch.arange(T, device=self.device)[None]
        rope = self.tr.rotary_emb(pos, torch.tensor([[row.alpha]], device=self.device))
        query_scale = logn_scale(pos + 1, cfg.seq_length) if cfg.use_logn_attn and T > cfg.seq_length else None
        select = None if row.adapter_index is None else self._select([row.adapter_index], 1)
        out: list[tuple[float, list, int]] = []
        with self.adapters.applied(select), inference_sdpa(self.device):
            x = self.tr.wte(ids)
            for block in self.tr.h:
                x = block(x, rope=rope, attn=AttentionSpec(is_causal=T > 1), query_scale=query_scale)
            h, targets = self.tr.ln_f(x)[0, :-1], ids[0, 1:]
            for a in range(0, T - 1, SCORE_CHUNK):
                chosen, values, ids, ranks = token_logprobs(self.lm_head(h[a:a + SCORE_CHUNK]),
                                                            targets[a:a + SCORE_CHUNK], k, ranks=True)
                out += [(c, list(zip(i, v)), r) for c, i, v, r in zip(chosen.tolist(), ids.tolist(), values.tolist(),
                                                                      ranks.tolist())]
        return out

    def _prefill_graph_length(self, n: int, T: int, rows: list[_Row], slot: int, lora: bool) -> int | None:
        """The graph length a prefill is replayed at (``_prefill_graphed``), or None where it runs eagerly: graphs
        off, not the fused kernels, several prompts, a prompt past PREFILL_GRAPH_LENGTHS or the cache, an NTK alpha
        other than 1 (graphs hold alpha 1's rotary) or logN (past seq_length), or a join beside running rows (or a
        prompt being prefilled in chunks) whose graph is not held. A graph is captured into an empty batch or by
        warm_up, never beside running rows: a
        capture holds the activations of two prefills (its eager runs', its pool's) where the join plan counted
        one, and a full cache may not have them."""
        cfg = self.config
        if not (self.use_graphs and self._kernels is not None and n == 1 and rows[0].alpha == 1.0
                and (T <= cfg.seq_length or not cfg.use_logn_attn)):
            return None
        length = next((g for g in PREFILL_GRAPH_LENGTHS if g >= T), None)
        busy = slot > 0 or self._chunked is not None  # (a prompt being prefilled in chunks holds activations too)
        if length is None or length > self._capacity or (busy and ("prefill", length, lora) not in self._graphs):
            return None
        return length

    def _prefill_graphed(self, length: int, prompt: list[int], select, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 logits [1, V], the padded prompt [1, length] on the device) of one prompt's prefill into cache row
        ``slot`` (a free one), replayed from the graph of its padded ``length`` (captured here into an empty batch,
        unless warm_up did; the graphs are dropped with the cache). The padding's keys and values land past the prompt,
        where each decode step writes before it reads, as in a group's eager prefill."""
        key = ("prefill", length, select is not None)
        entry = self._graphs.get(key)
        if entry is None:  # (the batch is empty: _prefill_graph_length)
            entry = self._graphs[key] = self._capture_prefill(length, select is not None)
        graph, out, ids, sel, _ = entry
        # the prompt, padded, its last index and its cache row after it: one copy into the graph's input
        ids.copy_(torch.tensor(prompt + [0] * (length - len(prompt)) + [len(prompt) - 1, slot], dtype=torch.long))
        if sel is not None:
            sel.copy_(select)
        graph.replay()
        return out, ids[None, :length]

    def _capture_prefill(self, length: int, lora: bool) -> tuple:
        """(graph, its logits [1, V], its input ids [length + 2]: the padded prompt, its last index and its cache row,
        the adapter selection [adapters, 1] or None, the rotary tables it reads) of a one-prompt prefill of
        ``length`` positions. A capture happens only while the batch is empty (warm_up's, or a prompt joining an
        empty batch): the eager runs before it write cache row 0, which the ids' zeros name. The entry keeps every
        tensor made outside the capture that the graph reads: a graph holds only their addresses, and the rotary
        tables, freed with this call's frame, were overwritten by the next allocations (the second replay's keys
        were wrong from layer 0 on, session 43)."""
        ids = torch.zeros(length + 2, dtype=torch.long, device=self.device)
        sel = None
        if lora:
            sel = torch.zeros(max(len(self.adapters.names), 1), 1, dtype=torch.float32, device=self.device)
        pos = torch.arange(length, device=self.device)[None]
        cos, sin = self.tr.rotary_emb(pos, torch.ones(1, 1, device=self.device))

        def forward():
            with self.adapters.applied(sel), inference_sdpa(self.device), self._kernel_device():
                return prefill_blocks(self._kernels, self.tr, self.lm_head, self._cache.k, self._cache.v,
                                      self.tr.wte(ids[None, :length]), cos, sin, None, ids[length + 1:],
                                      ids[length:length + 1])

        graph, out = self._graph_of(forward)
        return graph, out, ids, sel, (cos, sin)

    def _graph_of(self, forward, warm=None, runs: int = 2):
        """(a CUDA graph of ``forward()``, its output): ``warm()`` (default ``forward``) run ``runs`` times on a side
        stream first (the first calls compile kernels and may synchronise), then ``forward`` captured into the
        engine's pool."""
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(runs):
                (warm or forward)()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with capture(graph, self._pool):
            out = forward()
        return graph, out

    def _kernel_device(self):
        """The engine's device made current for the fused kernels: Triton launches on the current CUDA device (on
        the CPU, where only the interpreter tests run them, nothing to do)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _decode_forward(self, tok, pos, alpha, sel, kv_len, own_keys=False):
        """fp32 logits [b, V] of one decode step (tensors on the device; b rows in slots 0..b-1); ``own_keys``: the
        fused step's attention over each row's own keys (``_own_keys``)."""
        cfg = self.config
        b = tok.shape[0]
        cache = self._cache
        cache.mode, cache.rows, cache.pos, cache.kv_len = "decode", self._row_ids[:b], pos, kv_len
        cos, sin = self.tr.rotary_emb(pos[:, None], alpha[:, None])
        query_scale = logn_scale(pos[:, None] + 1, cfg.seq_length) if cfg.use_logn_attn else None
        if self._kernels is not None:
            kv_len = self._fused_kv_len(kv_len)
            # (own keys need no mask: the kernel reads each row's positions; building one was a step's 3 kernels)
            mask = None if own_keys else additive_mask(self._key_pos, pos, kv_len, self.dtype)
            with self.adapters.applied(sel), self._kernel_device():
                x = self.tr.wte(tok[:, None])  # within: an adapter's own wte (modules_to_save) reaches its rows
                return decode_blocks(self._kernels, self.tr, self.lm_head, cache.k, cache.v, x, pos, cos, sin,
                                     query_scale, kv_len, mask, self.adapters)
        mask = (self._key_pos[None, :kv_len] <= pos[:, None])[:, None, None, :]
        with self.adapters.applied(sel):
            return self._blocks(self.tr.wte(tok[:, None]), (cos, sin), AttentionSpec(mask=mask), query_scale)

    # -- the decode step: inputs and pick on the device, one step ahead of the host ---------------------------
    def _state(self) -> dict:
        """The decode step's static inputs on the device, ``slots`` wide: token, position, tokens picked,
        min_new_tokens and active (1 for a row, 0 for a padding slot) as the rows of one long tensor, alpha
        and repetition penalty as the rows of one float tensor, and the adapter selection."""
        if self._static is None:
            ints = torch.zeros(5, self._slots, dtype=torch.long, device=self.device)
            flts = torch.ones(2, self._slots, dtype=torch.float32, device=self.device)
            sel = torch.zeros(max(len(self.adapters.names), 1), self._slots, dtype=torch.float32, device=self.device)
            self._static = dict(ints=ints, flts=flts, tok=ints[0], pos=ints[1], alpha=flts[0], penalty=flts[1],
                                sel=sel)
        return self._static

    def _upload(self, b: int) -> None:
        """Write the host's rows 0..n-1 (padding up to b) into the static inputs. Done when the rows changed
        (no step in flight then), never per step: the device advances tokens, positions and counters itself."""
        s = self._state()
        rows = self._rows
        n = len(rows)
        pad = [0] * (b - n)
        for r in rows:
            r.picked = len(r.req.output_ids)
        ints = torch.tensor([[r.last for r in rows] + pad, [r.length for r in rows] + pad,
                             [r.picked for r in rows] + pad, [r.req.params.min_new_tokens for r in rows] + pad,
                             [1] * n + pad], dtype=torch.long)
        ones = [1.0] * (b - n)
        flts = torch.tensor([[r.alpha for r in rows] + ones,
                             [r.req.params.repetition_penalty for r in rows] + ones], dtype=torch.float32)
        s["ints"][:, :b].copy_(ints, non_blocking=True)
        s["flts"][:, :b].copy_(flts, non_blocking=True)
        self._stopmask[:b].zero_()
        which = [(i, t) for i, r in enumerate(rows) if r.req.params.min_new_tokens > 0
                 for t in r.stops if t < self.vocab]
        if which:
            rows_idx, stop_idx = torch.tensor(which).to(self.device, non_blocking=True).unbind(1)
            self._stopmask[rows_idx, stop_idx] = True
        key = (b, tuple(r.adapter_index for r in rows))
        if key != self._sel_key:
            self._sel_key, self._sel = key, self._select([r.adapter_index for r in rows] + [None] * (b - n), b)
        s["sel"][:, :b].copy_(self._sel)
        self._lora = any(r.adapter_index is not None for r in rows)
        flags = [_greedy_flags(r.req.params) for r in rows]
        self._flags = (any(f[0] for f in flags), any(f[1] for f in flags))
        # seeded rows draw from their own generators one by one; the others in one batch (RowSampling)
        self._seeded = [(i, r.req.params, r.generator) for i, r in enumerate(rows)
                        if r.req.params.do_sample and r.generator is not None]
        unseeded = [i for i, r in enumerate(rows) if r.req.params.do_sample and r.generator is None]
        self._unseeded = None
        if unseeded:
            self._unseeded = (torch.tensor(unseeded).to(self.device, non_blocking=True),
                              RowSampling([rows[i].req.params for i in unseeded], self.vocab, self.device))
        self._after_graph = _AfterGraph(rows, self.device)  # (the rows change only between uploads)
        self._synced = True

    def _pick_next(self, logits, b, penalised, held, ints, seen, sampled=False, after=None) -> tuple | None:
        """On the device, the next token of rows 0..b-1 from their logits [b, V], as ``_emit`` picks it
        (with ``after`` (an ``_AfterGraph``): the rows' logit bias and masks, then the repetition penalty, the
        presence and frequency penalties (their counts then advanced), stop tokens masked while fewer than
        min_new_tokens are out, the tokens a constraint allows (``_allowed``, computed now: after the forward's graph
        was enqueued), the bad words' bans that depend on the output (``_AfterGraph.banned``), then argmax; with
        ``sampled``, the seeded rows through sampling.pick_one with their generators and the unseeded ones through
        sampling.sample_rows), written as the next step's inputs into ``ints`` (the token;
        position and tokens picked advanced by one for the active rows) and into ``seen``. Returns the rows'
        log-probabilities to report (``_AfterGraph.logprobs``), on the device. Nothing here reads a value back to
        the host."""
        tok, pos, picked, min_new, active = ints[:, :b].unbind(0)
        scores = logits if after is None else after.biased_logits(logits)
        if penalised:
            scores = apply_penalties(scores, seen[:b], self._state()["penalty"][:b])
        if after is not None:
            scores = after.output_penalised(scores, logits)
        if held:
            scores = scores.masked_fill((picked < min_new)[:, None] & self._stopmask[:b], -float("inf"))
        allowed = None if after is None else self._allowed(after)
        if allowed is not None:
            scores = _masked(scores, logits, *allowed)
        if after is not None:
            scores = after.banned(scores, logits)
        nxt = scores.argmax(-1)
        if sampled:
            for i, params, generator in self._seeded:
                nxt[i] = pick_one(scores[i], params, generator)
            if self._unseeded is not None:
                rows, rs = self._unseeded
                nxt.index_copy_(0, rows, sample_rows(scores.index_select(0, rows), rs))
        if after is not None:
            after.count(nxt, self._one)
        tok.copy_(nxt)
        seen[:b].scatter_(1, nxt[:, None], True)
        pos.add_(active)
        picked.add_(active)
        return None if after is None else after.logprobs(logits, nxt)

    def _launch(self) -> _Step:
        """Enqueue one decode step and its device-side pick for every active row; nothing here waits for the
        device. The picked tokens are copied into a pinned host buffer that ``_read`` reads. With every row
        greedy the pick is part of the step's CUDA graph; with sampled rows (per-row generators and sampling
        parameters, which a graph would freeze) it runs as eager device ops after the forward's graph."""
        rows = list(self._rows)
        n = len(rows)
        b = self._bucket(n)
        if not self._synced:
            self._upload(b)
        s = self._state()
        penalised, any_min_new = self._flags
        held = any_min_new and any(r.picked < r.req.params.min_new_tokens for r in rows)
        need = max(r.length for r in rows) + 1
        after = self._after_graph
        sampled = bool(self._seeded or after) or self._unseeded is not None
        lp = None
        if self.use_graphs:
            own = self._own_keys()
            kv_len = self._graph_length(b, need, own)
            pick = None if sampled else (penalised,)
            key = self._graph_key(b, kv_len, pick, self._lora, own)
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._graphs[key] = self._capture(b, kv_len, pick, own, self._lora)
            graph, out = entry
            graph.replay()
            if sampled:  # (the constrained rows' masks are computed on the host while the forward runs)
                lp = self._pick_next(out, b, penalised, held, s["ints"], self._seen, sampled, after)
            logits = out[:n]
        else:  # eager steps meet a new key length each time: no cuDNN attention (a graph is captured once a key,
            # where cuDNN's masked one-query attention is the faster: b1_512 244 tok/s against 222, NOTES step 60)
            sel = s["sel"][:, :n] if self._lora else None
            with inference_sdpa(self.device):
                logits = self._decode_forward(s["tok"][:n], s["pos"][:n], s["alpha"][:n], sel, need,
                                              self._own_keys())
            lp = self._pick_next(logits, n, penalised, held, s["ints"], self._seen, sampled, after)
        for r in rows:
            r.length += 1
            r.picked += 1
        if lp is not None:  # (to the host with the tokens: pinned, complete at the step's event)
            lp = (after.scored, *(t.to("cpu", non_blocking=self.device.type == "cuda") for t in lp))
        if self.device.type != "cuda":
            return _Step(rows, s["tok"][:n].clone(), None, logits, lp)
        if self._host_tokens is None:
            self._host_tokens = [torch.zeros(self.max_batch, dtype=torch.long).pin_memory() for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
        self._flip ^= 1  # the other buffer: the step before may still be unread
        buf, event = self._host_tokens[self._flip], self._events[self._flip]
        buf[:n].copy_(s["tok"][:n], non_blocking=True)
        event.record()
        return _Step(rows, buf[:n], event, logits, lp)

    def _read(self, step: _Step, touched) -> None:
        """The host side of a device-picked step: wait for its tokens, append them, finish rows on a stop
        token, max_new_tokens or a cancel (a row that finished before this step gets nothing from it)."""
        if step.event is not None:
            step.event.synchronize()
        scores = _logprob_entries(step.logprobs)
        for i, (r, t) in enumerate(zip(step.rows, step.tokens.tolist())):
            req = r.req
            if req.finished:
                continue
            touched[req.id] = req
            if req.cancelled:
                self._finish(r, req._cancel_reason, touched)
                self._gone.append(r)
            elif t in r.stops:
                self._finish(r, "stop", touched)
                self._gone.append(r)
            else:
                self._append(r, t, scores.get(i))
                if self._ends(r, t) or len(req.output_ids) >= req.params.max_new_tokens:
                    self._finish(r, "stop" if req.stop_string is not None else "length", touched)
                    self._gone.append(r)

    @staticmethod
    def _append(row: _Row, token: int, logprob=None) -> None:
        """A picked token into the row's output (its log-probabilities ``logprob`` too, and its schema's matcher).
        (A decode step counted it for the output penalties on the device; the prefill's first token is counted in
        ``_emit``.)"""
        row.req.output_ids.append(token)
        row.last = token
        if row.req.logprobs is not None:
            row.req.logprobs.append(logprob)
        if row.matcher is not None:
            row.matcher.consume_token(token)  # (the mask allowed it; a failure leaves only <|im_end|>: _allowed)

    def _allowed(self, after: _AfterGraph) -> tuple | None:
        """(row indices, [rows, V] bool: the tokens each may take next) of the constrained rows of ``after``, or
        None."""
        if not after.constrained:
            return None
        return after.constrained_idx, self._constraints().allowed([m for _, m in after.constrained], self.device)

    # -- CUDA graphs --------------------------------------------------------------------------------------------
    def _own_keys(self) -> bool:
        """Whether the fused steps' attention reads each row's own keys (fused_decode.use_own_keys; the step's graph
        key holds the answer)."""
        return self._kernels is not None and use_own_keys()

    def _graph_length(self, b: int, need: int, own_keys: bool) -> int:
        """The key length of the graph of a step of b rows whose longest needs ``need`` keys (the graph replays for
        every step up to it), at most the cache's capacity. Own keys: decode_kernels.covering_length, since only the
        attention's grid depends on it (one row of the 14B: graphs at 1,536, 3,072, 4,096 and 8,192 keys); SDPA reads
        every row up to it: the next multiple of LENGTH_BUCKET."""
        if own_keys:
            length = self._kernels.covering_length(b, self.config.num_attention_heads, need)
        else:
            length = _round_up(need, LENGTH_BUCKET)
        return min(length, self._capacity)

    @staticmethod
    def _graph_key(b, kv_len, pick, lora: bool, own_keys: bool) -> tuple:
        return (b, kv_len) + (pick or ()) + (("lora",) if lora else ()) + (("own_keys",) if own_keys else ())

    def _fused_kv_len(self, kv_len) -> int:
        """The keys the fused step attends over: up to a multiple of 16 (masked beyond each row's position), since
        SDPA's memory-efficient kernel pads a mask of another width in every layer."""
        return min(_round_up(kv_len, 16), self._capacity)

    def _capture(self, b, kv_len, pick, own_keys, lora):
        """The graph of one decode step of b rows (with ``pick`` = (penalised,): and its device-side greedy pick,
        stops held where a row asks, which advances the static inputs; ``lora``: with the rows' adapters) ->
        (graph, its logits [b, V])."""
        s = self._state()
        args = (s["tok"][:b], s["pos"][:b], s["alpha"][:b], s["sel"][:, :b] if lora else None, kv_len, own_keys)
        # Warm-up on a side stream (first calls tune Triton kernels and may synchronise); the writes it makes
        # into the cache are at the rows' current positions, which the real step then writes again (or, in
        # warm_up's captures, at stale positions of empty slots). The pick warms up on copies of the inputs it
        # advances. Once a graph of the same step at another length exists, its kernels have run: one pass.
        kind = self._graph_key(b, kv_len, pick, lora, own_keys)[2:]
        kin = any(k[0] == b and k[2:] == kind for k in self._graphs)

        def warm():
            logits = self._decode_forward(*args)
            if pick is not None:
                self._pick_next(logits, b, *pick, True, s["ints"].clone(), self._seen[:b].clone())

        def forward():
            out = self._decode_forward(*args)
            if pick is not None:
                self._pick_next(out, b, *pick, True, s["ints"], self._seen)
            return out

        return self._graph_of(forward, warm, 1 if kin else 2)

    # -- sampling -----------------------------------------------------------------------------------------------
    def _emit(self, rows: list[_Row], logits: torch.Tensor, touched) -> None:
        """Pick the first token of rows just prefilled from their logits [n, V] on the host (sampling.py), append
        it or finish the row. (Decode steps pick on the device: ``_pick_next``.)"""
        idx = torch.tensor([self._rows.index(r) for r in rows], device=self.device)
        after = _AfterGraph(rows, self.device)  # (the output counts are all 0 here: nothing is out yet)
        scores = after.biased_logits(logits)
        penalties = [r.req.params.repetition_penalty for r in rows]
        if any(p != 1.0 for p in penalties):  # (the common greedy/chat case without a penalty skips this)
            scores = apply_penalties(scores, self._seen.index_select(0, idx),
                                     torch.tensor(penalties, device=self.device))
        held_rows = [i for i, r in enumerate(rows) if len(r.req.output_ids) < r.req.params.min_new_tokens]
        if held_rows:  # stop tokens masked until min_new_tokens are out, one indexing op per stop set
            scores = scores.clone() if scores is logits else scores
            by_stops: dict[tuple, list[int]] = {}
            for i in held_rows:
                by_stops.setdefault(tuple(sorted(t for t in rows[i].stops if t < self.vocab)), []).append(i)
            for stops, which in by_stops.items():
                if stops:
                    scores[torch.tensor(which, device=self.device)[:, None],
                           torch.tensor(stops, device=self.device)[None, :]] = -float("inf")
        allowed = self._allowed(after)
        if allowed is not None:
            scores = _masked(scores, logits, *allowed)
        scores = after.banned(scores, logits)
        tokens = pick_tokens(scores, [r.req.params for r in rows], [r.generator for r in rows])
        on_device = torch.tensor(tokens, device=self.device)
        lp = after.logprobs(logits, on_device)
        entries = _logprob_entries(None if lp is None else (after.scored, *(t.cpu() for t in lp)))
        self._seen[idx, on_device] = True
        gone = []
        for i, (r, t) in enumerate(zip(rows, tokens)):
            req = r.req
            touched[req.id] = req
            if t in r.stops:
                self._finish(r, "stop", touched)
                gone.append(r)
                continue
            self._append(r, t, entries.get(i))
            if r.counts is not None:  # (the output penalties start from the first token: nothing to apply before it)
                r.counts[t] += 1
            if self._ends(r, t) or len(req.output_ids) >= req.params.max_new_tokens:
                self._finish(r, "stop" if req.stop_string is not None else "length", touched)
                gone.append(r)
        if gone:
            self._remove(gone)

    @staticmethod
    def _ends(row: _Row, token: int) -> bool:
        """Whether ``token`` completes one of the row's stop strings (noted in its request's stop_string); before
        min_new_tokens none ends it, as no stop token does."""
        if row.stop_text is None:
            return False
        hit = row.stop_text.add(token)
        if hit is None or len(row.req.output_ids) < row.req.params.min_new_tokens:
            return False
        row.req.stop_string = hit
        return True


__all__ = ["Engine", "Request", "SamplingParams"]
