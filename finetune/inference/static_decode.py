"""Batch-1 static-cache decoding (the first fast path of chat(); the Engine in engine.py supersedes it for chat): a static KV cache and one CUDA graph replay per new token.

`generate()` pays the host cost of every kernel of every layer for each new token (tens of kernels per layer,
40 layers): for a 14B model decoding one token at a time that host time, not the GPU, sets the speed. Here the
KV cache is preallocated for the whole answer, so every decoding step has the same shapes and the same
addresses, and the step (embedding, all blocks, final norm, lm_head) is captured once as a CUDA graph and
replayed per token. Sampling (repetition penalty, temperature, top-k, top-p, as transformers applies them)
runs eagerly on the logits the graph leaves in a static buffer.

The blocks themselves run unchanged (the same modules, LoRA adapters included): the cache object below only
writes each step's keys/values at their positions and hands back the whole buffer, and the attention mask
hides the positions not written yet. It covers prompts plus answers up to the model's `seq_length`, where
dynamic NTK and logN scaling are both inactive (alpha 1, scale 1), so the function computed is exactly the
model's; longer generations, batches, beams and other generation options go through `generate()`.
"""

from __future__ import annotations

from typing import Iterator

import torch
from transformers import GenerationConfig

from ..modeling.model import AttentionSpec, QWenLMHeadModel
from ..settings import settings


# GenerationConfig fields this decoder implements (anything else set away from its default -> generate()).
_SUPPORTED = {
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
    "eos_token_id", "pad_token_id", "bos_token_id", "chat_format", "max_window_size", "transformers_version",
    "use_cache", "return_dict_in_generate", "output_scores", "output_logits", "cache_implementation",
}


class _StaticKV:
    """Per-layer key/value buffers [B, H, S, D]; `update` writes the current positions and returns the buffers."""

    def __init__(self, layers: int, batch: int, heads: int, length: int, head_dim: int, dtype, device):
        self.k = torch.zeros(layers, batch, heads, length, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.positions: torch.Tensor | None = None  # [T] positions written by the current forward

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        self.k[layer_idx].index_copy_(2, self.positions, k.to(self.k.dtype))
        self.v[layer_idx].index_copy_(2, self.positions, v.to(self.v.dtype))
        return self.k[layer_idx], self.v[layer_idx]


def unsupported_options(gc: GenerationConfig) -> list[str]:
    """The generation options set in `gc` that the static decoder does not implement."""
    default = GenerationConfig().to_dict()
    given = gc.to_dict()
    return sorted(k for k, v in given.items() if k not in _SUPPORTED and k in default and default[k] != v)


def can_decode_static(model, input_ids: torch.Tensor, gc: GenerationConfig) -> bool:
    """Whether chat() can use the static decoder: CUDA, one row, the whole answer within seq_length, only the
    supported generation options, and not switched off (FINETUNE_STATIC_DECODE=0)."""
    if not settings().static_decode or not input_ids.is_cuda or input_ids.shape[0] != 1:
        return False
    lm = _qwen_lm(model)
    if lm is None or gc.max_new_tokens is None:
        return False
    if input_ids.shape[1] + gc.max_new_tokens > lm.config.seq_length:
        return False
    return not unsupported_options(gc)


def _qwen_lm(model):
    """The QWenLMHeadModel inside `model` (itself, or the model a PEFT wrapper holds), else None."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return m if isinstance(m, QWenLMHeadModel) else None


class StaticDecoder:
    """Decodes one row: prefill eagerly, then one CUDA graph replay per token (eager replays off CUDA or with
    `use_graph=False`, e.g. for tests)."""

    def __init__(self, model, max_len: int, use_graph: bool | None = None):
        lm = _qwen_lm(model)
        if lm is None:
            raise TypeError("StaticDecoder needs a QWenLMHeadModel (or a PEFT model wrapping one)")
        cfg = lm.config
        if max_len > cfg.seq_length:
            raise ValueError(f"max_len {max_len} > seq_length {cfg.seq_length}: NTK/logN scaling would apply; "
                             "use generate()")
        self.lm = lm
        self.tr = lm.transformer
        device = self.tr.wte.weight.device
        dtype = self.tr.wte.weight.dtype
        self.max_len = max_len
        self.device = device
        self.cache = _StaticKV(cfg.num_hidden_layers, 1, cfg.num_attention_heads, max_len, cfg.kv_channels,
                               dtype, device)
        self._key_pos = torch.arange(max_len, device=device)
        self._ones = torch.ones(1, 1, device=device)
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self._token = torch.zeros(1, 1, dtype=torch.long, device=device)  # the graph's input ...
        self._start = torch.zeros((), dtype=torch.long, device=device)   # ... and its position
        self._graph = None
        self._logits = None

    @torch.no_grad()
    def _forward(self, tokens: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """fp32 logits [1, V] of the last of `tokens` [1, T], which sit at positions start .. start+T-1."""
        T = tokens.shape[1]
        pos = start + self._key_pos[:T]
        self.cache.positions = pos
        x = self.tr.wte(tokens)
        cos, sin = self.tr.rotary_emb(pos[None], self._ones)
        attn = AttentionSpec(mask=(self._key_pos[None, :] <= pos[:, None])[None, None])
        for block in self.tr.h:
            x = block(x, rope=(cos, sin), attn=attn, cache=self.cache)
        x = self.tr.ln_f(x[:, -1:])
        return self.lm.lm_head(x)[:, -1].float()

    def _capture(self) -> None:
        # Warm-up runs on a side stream (first calls tune/compile kernels and sync; none of that may happen
        # while capturing); they write position 0 of the cache, which the prefill then overwrites.
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(self._token, self._start)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._forward(self._token, self._start)

    def _step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        if not self.use_graph:
            return self._forward(token.view(1, 1), torch.tensor(position, device=self.device))
        self._token.copy_(token.view(1, 1))
        self._start.fill_(position)
        self._graph.replay()
        return self._logits

    @torch.no_grad()
    def tokens(self, input_ids: torch.Tensor, gc: GenerationConfig,
               generator: torch.Generator | None = None) -> Iterator[int]:
        """Yields the new token ids one by one (the stop token included, as generate() returns it)."""
        if input_ids.shape[0] != 1:
            raise ValueError("StaticDecoder decodes one row")
        prompt_len = input_ids.shape[1]
        max_new = gc.max_new_tokens
        if prompt_len + max_new > self.max_len:
            raise ValueError(f"prompt {prompt_len} + max_new_tokens {max_new} > max_len {self.max_len}")
        if self.use_graph and self._graph is None:
            self._capture()
        eos = gc.eos_token_id
        stops = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        min_new = gc.min_new_tokens or 0
        vocab = self.lm.lm_head.out_features
        held_back = [s for s in stops if s < vocab]  # masked until min_new_tokens are out
        penalty = gc.repetition_penalty or 1.0
        seen = None
        if penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            seen[input_ids[0].clamp(max=vocab - 1)] = True
        logits = self._forward(input_ids.to(self.device), torch.zeros((), dtype=torch.long, device=self.device))
        for i in range(max_new):
            scores = logits[0].clone()
            if seen is not None:  # transformers' RepetitionPenaltyLogitsProcessor
                scores = torch.where(seen, torch.where(scores > 0, scores / penalty, scores * penalty), scores)
            if i < min_new and held_back:
                scores[held_back] = -float("inf")
            token = _pick(scores, gc, generator)
            if seen is not None:
                seen[token] = True
            t = int(token)
            yield t
            if t in stops and i >= min_new:
                return
            if i + 1 < max_new:
                logits = self._step(token, prompt_len + i)


def _pick(scores: torch.Tensor, gc: GenerationConfig, generator) -> torch.Tensor:
    """The next token from fp32 scores [V]: argmax, or a sample after temperature, top-k and top-p (the order
    and semantics of transformers' warpers; top_k 0 and top_p 1 are off)."""
    if not gc.do_sample:
        return scores.argmax()
    temperature = gc.temperature if gc.temperature is not None else 1.0
    if temperature != 1.0:
        scores = scores / temperature
    top_k = gc.top_k or 0
    if 0 < top_k < scores.shape[0]:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    top_p = gc.top_p if gc.top_p is not None else 1.0
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores)  # ascending
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - top_p
        remove[-1] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(0, order, remove), -float("inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[0]


def decode_tokens(model, input_ids: torch.Tensor, gc: GenerationConfig, use_graph: bool | None = None,
                  generator: torch.Generator | None = None) -> Iterator[int]:
    """New token ids for one prompt row through a StaticDecoder sized for prompt + max_new_tokens."""
    decoder = StaticDecoder(model, input_ids.shape[1] + gc.max_new_tokens, use_graph=use_graph)
    yield from decoder.tokens(input_ids, gc, generator)


__all__ = ["StaticDecoder", "decode_tokens", "can_decode_static", "unsupported_options"]
