"""The Qwen v1 model (Qwen-7B/14B/72B and their chat models), readable top to bottom.

Parameter names are the official ones (transformer.wte, transformer.h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.w1, mlp.w2, mlp.c_proj}, transformer.ln_f, lm_head), so official checkpoints and official LoRA adapters load
unchanged. Differences from the official remote code, all deliberate:

- attention is torch SDPA, always causal (the official SDPA path was not, until Dec 2023), with a padding mask for
  left-padded batched generation; packed rows (position ids restarting inside a row) never attend across sequences
  (a block-diagonal mask on CPU, FlexAttention with a document block mask on CUDA);
- rotary positions come from `position_ids` (transformers computes them from the attention mask, so left padding
  does not shift them); the KV cache is a transformers `Cache`;
- dynamic NTK and logN scaling (inference only, as the official code) use each row's unpadded prefill length; the
  per-row alpha is stored on the cache object and reused for every cached decoding step;
- with `labels`, the loss is computed from hidden states in chunks, so the fp32 [tokens x vocab] logits never exist.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation.stopping_criteria import MaxLengthCriteria
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..errors import ModelLoadError
from ..model_dir import gptq_of
from .attention import AttentionSpec, _flex_attention, build_attention, document_ids, inference_sdpa
from .chat import with_stop_words
from .configuration import QWenConfig
from .kernels import fused, rms_norm, rotary_qk, swiglu
from .loss import chunked_causal_lm_loss

logger = logging.getLogger(__name__)

# transformers 5.2x renamed the outputs' `past_key_values` field to `cache`; use whichever this version has.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"



# ---------------------------------------------------------------------------------------------------------------
# Long-context helpers (inference only), exactly as the official modeling_qwen.py computes them
# ---------------------------------------------------------------------------------------------------------------
def ntk_alpha(length: int, seq_length: int) -> int:
    """alpha = max(2^ceil(log2(L / seq_length) + 1) - 1, 1): 1 up to seq_length, 3 up to 2x, 7 up to 4x, ..."""
    if length <= 0:
        return 1
    return max(2 ** math.ceil(math.log2(length / seq_length) + 1) - 1, 1)


def context_window(prompt_length: int, seq_length: int, use_dynamic_ntk: bool) -> int:
    """How far a sequence whose prefill is `prompt_length` tokens may run inside what the model covers: seq_length,
    and with dynamic NTK the 2^k * seq_length that the prefill's alpha (fixed at prefill, as the official code)
    scales the rotary base for (alpha 3: 2x, alpha 7: 4x, ...). config.max_position_embeddings plays no part: the
    official Qwen v1 code never reads it as a limit (Qwen-14B: 8192 beside seq_length 2048)."""
    if not use_dynamic_ntk:
        return seq_length
    return seq_length * (ntk_alpha(prompt_length, seq_length) + 1) // 2


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Query scale log(p) / log(seq_length) for 1-based positions p > seq_length, 1 elsewhere (fp32)."""
    p = positions.to(torch.float32)
    return torch.where(p > seq_length, torch.log(p) / math.log(seq_length), torch.ones_like(p))


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Normalises in fp32, casts back to the input dtype, then scales (the official order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused(rms_norm, x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE on the first `dim` channels of each head. Holds no state (inv_freq is computed per call,
    which keeps meta-device construction and loading trivial and lets every row have its own NTK base)."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.base = float(base)

    def inv_freq(self, alpha: torch.Tensor, device) -> torch.Tensor:
        """Inverse frequencies [..., dim/2] for NTK alphas [...] (alpha 1 = the plain base)."""
        d = self.dim
        exponent = torch.arange(0, d, 2, device=device, dtype=torch.float64) / d  # [d/2]
        base = self.base * alpha.to(device=device, dtype=torch.float64) ** (d / (d - 2))
        return (1.0 / (base[..., None] ** exponent)).float()

    def forward(self, position_ids: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, dim] in fp32 for position ids [B, T] and alphas [B, 1] (per row) or [B, T] (per token)."""
        inv = self.inv_freq(alpha, position_ids.device)  # [B, 1 or T, d/2]
        freqs = position_ids.float()[:, :, None] * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.projection_size = config.kv_channels * config.num_attention_heads
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        self.dropout = config.attn_dropout_prob
        self.c_attn = nn.Linear(config.hidden_size, 3 * self.projection_size, bias=True)
        self.c_proj = nn.Linear(self.projection_size, config.hidden_size, bias=not config.no_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: "AttentionSpec",
        query_scale: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q, k, v = (t.view(shape) for t in self.c_attn(x).split(self.projection_size, dim=-1))
        cos, sin = rope
        q, k = fused(rotary_qk, q, k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D] views, token-major
        if query_scale is not None:  # logN (inference beyond seq_length)
            q = (q.float() * query_scale[:, None, :, None]).type_as(q)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)

        dropout = self.dropout if self.training else 0.0
        if attn.block_mask is not None:  # CUDA packed rows: FlexAttention, no L x L mask
            y = _flex_attention()(q, k, v, block_mask=attn.block_mask, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn.mask, is_causal=attn.is_causal, dropout_p=dropout, scale=self.scale
            )
        y = y.transpose(1, 2).reshape(B, T, self.projection_size)
        return self.c_proj(y)


class QWenMLP(nn.Module):
    """c_proj(w1(x) * silu(w2(x))): w2 is the gate; both are intermediate_size // 2 wide."""

    def __init__(self, config: QWenConfig):
        super().__init__()
        ff = config.intermediate_size // 2
        bias = not config.no_bias
        self.w1 = nn.Linear(config.hidden_size, ff, bias=bias)
        self.w2 = nn.Linear(config.hidden_size, ff, bias=bias)
        self.c_proj = nn.Linear(ff, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.w1(x), self.w2(x))

    def down(self, up: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """What follows w1 and w2 (a block that keeps their outputs under checkpointing starts here)."""
        return self.c_proj(fused(swiglu, up, gate))


class QWenBlock(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(.)).

    Gradient checkpointing (``model.gradient_checkpointing_enable()`` sets ``gradient_checkpointing`` and
    ``_gradient_checkpointing_func`` here) checkpoints the two residual halves separately, keeping the
    hidden state between them (one [tokens x hidden] tensor per block). Each half's recomputation then ends
    early, with non-reentrant checkpointing, at the last tensor that backward needs: the output projection
    (attn.c_proj, mlp.c_proj) of a frozen Int4 base saves nothing, so its matmul is not redone (on the 14B
    shape that is 30% of the block's weights). A block with ``keep_mlp_projections`` set (the trainer's
    ``--gradient_checkpointing_keep_gib``) computes ln_2, w1 and w2 outside the checkpoint, so their outputs are
    kept for the backward instead of recomputed: the same arithmetic, more memory, two fewer matmuls."""

    gradient_checkpointing = False
    keep_mlp_projections = False

    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def _attention_half(self, x, rope, attn, query_scale, cache):
        return x + self.attn(self.ln_1(x), rope, attn, query_scale, cache)

    def _mlp_half(self, x):
        return x + self.mlp(self.ln_2(x))

    def _mlp_tail(self, x, up, gate):
        return x + self.mlp.down(up, gate)

    def forward(self, x, rope=None, attn=None, query_scale=None, cache=None, use_cache=False):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # no cache here: a checkpointed half would write it a second time when recomputed
            x = self._gradient_checkpointing_func(self._attention_half, x, rope, attn, query_scale, None)
            if self.keep_mlp_projections:
                h = self.ln_2(x)
                return self._gradient_checkpointing_func(self._mlp_tail, x, self.mlp.w1(h), self.mlp.w2(h))
            return self._gradient_checkpointing_func(self._mlp_half, x)
        return self._mlp_half(self._attention_half(x, rope, attn, query_scale, cache))


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    config: QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = False
    _supports_cache_class = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    @property
    def is_gradient_checkpointing(self) -> bool:
        # PEFT reads this name whenever it wraps a model; transformers 5.2x deprecated it with a FutureWarning that
        # every adapter load and training run printed. The same answer as is_activation_checkpointing, silently.
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        rot_dim = int(config.kv_channels * config.rotary_pct)
        self.rotary_emb = RotaryEmbedding(rot_dim, base=config.rotary_emb_base)
        self.h = nn.ModuleList([QWenBlock(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def use_flex_attention(self) -> bool:
        """FlexAttention for packed rows on CUDA (it has no attention dropout)."""
        return self.wte.weight.device.type == "cuda" and not (self.training and self.config.attn_dropout_prob > 0)

    def _ntk_alphas(self, attention_mask, cache, doc_ids, B, q_len, past, device) -> torch.Tensor:
        """NTK alphas, [B, 1] per row or [B, T] per token for packed rows: 1 in training or without use_dynamic_ntk;
        else from each row's unpadded prefill length (each packed sequence's own length), fixed at prefill and kept
        on the cache for the decoding steps."""
        ones = torch.ones(B, 1, device=device, dtype=torch.float32)
        if self.training or not self.config.use_dynamic_ntk:
            return ones
        S = self.config.seq_length
        if doc_ids is not None:  # packed rows: every sequence its own length
            real = attention_mask.bool() if attention_mask is not None else torch.ones_like(doc_ids, dtype=torch.bool)
            alpha = torch.ones(B, q_len, device=device, dtype=torch.float32)
            for b in range(B):
                docs, counts = torch.unique(doc_ids[b][real[b]], return_counts=True)
                for doc, n in zip(docs.tolist(), counts.tolist()):
                    alpha[b, doc_ids[b] == doc] = float(ntk_alpha(n, S))
            return alpha
        stored = getattr(cache, "_qwen_ntk_alpha", None) if cache is not None else None
        if past > 0 and stored is not None and stored.shape[0] == B:
            return stored.to(device)[:, None]
        if attention_mask is not None:
            lengths = attention_mask.long().sum(-1).tolist()
        else:
            lengths = [past + q_len] * B
        alpha = torch.tensor([ntk_alpha(n, S) for n in lengths], device=device, dtype=torch.float32)
        if cache is not None:
            cache._qwen_ntk_alpha = alpha
        return alpha[:, None]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        attention_spec: AttentionSpec | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """`attention_spec`: a prebuilt attention description for a training forward (the CUDA-graphed step
        builds it outside the graph); the masks are then not derived from attention_mask / position_ids."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if output_attentions if output_attentions is not None else self.config.output_attentions:
            raise ValueError("output_attentions is not supported: attention runs through PyTorch's SDPA, which does "
                             "not return the weights (the official model refuses it with flash-attn too)")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError("the KV cache must be a transformers Cache (e.g. DynamicCache), not a tuple")
        if use_cache is None:  # training forwards keep no cache unless asked
            use_cache = self.config.use_cache and not self.training
        if self.training and torch.is_grad_enabled() and any(b.gradient_checkpointing for b in self.h):
            use_cache = False  # a checkpointed block would write the cache twice
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None

        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        device = x.device
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("attention_mask must be 2-D [batch, past + new tokens] (1 = token, 0 = padding)")
            if attention_mask.shape[1] != past + T:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} tokens, expected past ({past}) + new ({T})"
                )

        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=device)[None].expand(B, T)
        elif position_ids.shape[0] != B:
            position_ids = position_ids.expand(B, -1)

        if attention_spec is not None:
            doc_ids, attn = None, attention_spec  # doc_ids only matter for inference NTK alphas
        else:
            # Packed rows (positions restarting inside a row): attention must stay inside each sequence.
            doc_ids = document_ids(position_ids, attention_mask) if past == 0 else None
            attn = build_attention(attention_mask, doc_ids, T, past, device, self.use_flex_attention())

        alpha = self._ntk_alphas(attention_mask, cache, doc_ids, B, T, past, device)
        cos, sin = self.rotary_emb(position_ids, alpha)
        query_scale = None
        if self.config.use_logn_attn and not self.training:
            pos1 = position_ids + 1  # positions counted from 1, as the official logn_list
            if bool((pos1 > self.config.seq_length).any()):
                query_scale = logn_scale(pos1, self.config.seq_length)

        x = self.drop(x)
        hidden_states: tuple | None = () if output_hidden_states else None
        with inference_sdpa(device):
            for block in self.h:
                if hidden_states is not None:  # each block's input, as the official all_hidden_states
                    hidden_states += (x,)
                x = block(x, rope=(cos, sin), attn=attn, query_scale=query_scale, cache=cache, use_cache=use_cache)
        x = self.ln_f(x)
        if hidden_states is not None:  # then the final normed output: num_hidden_layers + 1 entries
            hidden_states += (x,)
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=hidden_states, **{_CACHE_FIELD: cache})


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    _tied_weights_keys: dict = {}
    # The Trainer passes num_items_in_batch (the global count of trained tokens, over labels[..., 1:]).
    accepts_loss_kwargs = True

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.loss_type = "ForCausalLM"  # shifted-label loss: the Trainer counts num_items over labels[..., 1:]
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loading, except for GPTQ Int4 dirs: those go to the project's GPTQ loader (transformers'
        own GPTQ integration would intercept `quantization_config` and demand optimum)."""
        config = kwargs.get("config")
        if not isinstance(config, QWenConfig) and pretrained_model_name_or_path is not None:
            import os

            if os.path.isfile(os.path.join(str(pretrained_model_name_or_path), "config.json")):
                config = QWenConfig.from_pretrained(pretrained_model_name_or_path)
        try:
            gptq = config is not None and gptq_of(config) is not None
        except ModelLoadError:  # another quantization method: transformers' own loading says what it needs
            gptq = False
        if gptq:
            from finetune.quant.loading import load_gptq_model

            kwargs.pop("config", None)
            return load_gptq_model(pretrained_model_name_or_path, config=config, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = True,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        return_logits: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """With `labels` the loss is computed from hidden states in chunks (fp32 log-softmax per chunk, each chunk
        checkpointed): the sum over trained tokens divided by `num_items_in_batch` when given (the Trainer passes the
        global count), else the mean over trained tokens. Logits are then returned only when asked
        (`return_logits=True`) or in eval mode."""
        out = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=kwargs.get("output_hidden_states"),
            output_attentions=kwargs.get("output_attentions"),
        )
        hidden = out.last_hidden_state

        loss = None
        if labels is not None:
            loss = chunked_causal_lm_loss(self.lm_head, hidden, labels, num_items_in_batch)
            want_logits = return_logits if return_logits is not None else not self.training
        else:
            want_logits = True if return_logits is None else return_logits

        logits = None
        if want_logits:
            if isinstance(logits_to_keep, int):
                h = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
            else:
                h = hidden[:, logits_to_keep]
            logits = self.lm_head(h)

        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})
        return result if return_dict is not False else result.to_tuple()

    def _get_stopping_criteria(self, generation_config, stopping_criteria, *args, **kwargs):
        """transformers' criteria, with its length check measured against this model's window: transformers'
        MaxLengthCriteria reminds against config.max_position_embeddings, which is not a Qwen v1 limit; the
        window is seq_length, widened by dynamic NTK for a long prompt (context_window). Stopping is unchanged."""
        criteria = super()._get_stopping_criteria(generation_config, stopping_criteria, *args, **kwargs)
        for i, c in enumerate(criteria):
            if type(c) is MaxLengthCriteria:
                criteria[i] = _WindowLengthCriteria(self, c.max_length)
        return criteria

    def generate(self, inputs=None, generation_config=None, logits_processor=None, stop_words_ids=None, **kwargs):
        """transformers' generate(), also taking the official Qwen code's ``stop_words_ids`` (else the generation
        config's): a row that ends with one of those token sequences gets eos next (chat.StopWordsLogitsProcessor)."""
        logits_processor = with_stop_words(self, generation_config, logits_processor, stop_words_ids)
        gc = generation_config if generation_config is not None else self.generation_config
        impl = kwargs.get("cache_implementation", getattr(gc, "cache_implementation", None))
        if impl in _STATIC_CACHES:  # (it failed in the first forward on the 4-D mask transformers builds for one)
            raise ValueError(f"cache_implementation={impl!r} is not supported: this model decodes with transformers' "
                             f"dynamic cache (leave cache_implementation unset); finetune.inference.Engine is the "
                             f"static-cache decoder")
        return super().generate(inputs, generation_config, logits_processor, **kwargs)

    # chat() / chat_stream(): see chat.py
    from .chat import chat, chat_stream  # noqa: E402  (methods defined in chat.py, bound here)


# transformers' static cache layouts: its generate() then hands the model a 4-D mask and a cache of fixed length.
# ("hybrid" is not among them: transformers reads it as the default dynamic cache.)
try:
    from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS as _ALL_STATIC
except ImportError:
    _ALL_STATIC = ("static", "offloaded_static", "sliding_window", "hybrid_chunked", "offloaded_hybrid",
                   "offloaded_hybrid_chunked")
_STATIC_CACHES = frozenset(_ALL_STATIC) - {"hybrid"}


class _WindowLengthCriteria(MaxLengthCriteria):
    """MaxLengthCriteria (stops at max_length, as before) whose warning is the model's own: said once per model
    and window when the sequence runs past context_window() of its prompt and past max_position_embeddings. The
    prompt length is the width of the first ids seen (one new token past the prefill; with left padding, the
    longest row's); the window follows from it once, not at every token."""

    def __init__(self, model, max_length: int):
        super().__init__(max_length=max_length, max_position_embeddings=None)
        self.model = model
        self.prompt_length: int | None = None
        self.window: int | None = None

    def __call__(self, input_ids, scores, **kwargs):
        cur_len = input_ids.shape[1]
        cfg = self.model.config
        if self.prompt_length is None:
            self.prompt_length = cur_len - 1
            self.window = context_window(self.prompt_length, cfg.seq_length, cfg.use_dynamic_ntk)
        window = self.window
        # said only where transformers said its reminder (past max_position_embeddings too: Qwen-14B's 8192), so a
        # generation the official code runs quietly stays quiet
        if cur_len > max(window, cfg.max_position_embeddings or 0) and cur_len < self.max_length:
            said = self.model.__dict__.setdefault("_window_warned", set())
            if window not in said:
                said.add(window)
                ntk = ("; dynamic NTK, fixed from the prompt's length, widens it only for a prompt past seq_length"
                       if cfg.use_dynamic_ntk else "; use_dynamic_ntk is off")
                logger.warning(
                    "generation ran past the model's context window: a %d-token prompt plus up to %d new tokens "
                    "reaches %d positions, the window is %d (seq_length %d in config.json%s); the tokens past %d are "
                    "decoded beyond what the model covers. Pass max_new_tokens=%d or fewer to stay inside it.",
                    self.prompt_length, self.max_length - self.prompt_length, self.max_length, window,
                    cfg.seq_length, ntk, window, max(window - self.prompt_length, 0))
        return super().__call__(input_ids, scores, **kwargs)


def qwen_lm(model) -> QWenLMHeadModel | None:
    """The QWenLMHeadModel that `model` is or wraps: itself, the model a PEFT wrapper holds (`get_base_model`), or
    the one inside a module wrapper (DeepSpeed's engine, DDP: `.module`), through any chain of these; else None."""
    for _ in range(8):  # wrappers do not nest deeper than a few
        if isinstance(model, QWenLMHeadModel):
            return model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return None
    return None


__all__ = ["QWenPreTrainedModel", "QWenModel", "QWenLMHeadModel", "ntk_alpha", "context_window", "qwen_lm"]
