"""QWenConfig: the Qwen v1 configuration, with the official field names and defaults.

Official `config.json` files (Qwen-7B/14B/72B-Chat, their Int4 variants) load into this class as they are;
their `auto_map` entry (pointing at remote code) is kept but never used: once `finetune` is imported,
model_type "qwen" resolves to the classes registered here.
"""

from __future__ import annotations

from transformers import PreTrainedConfig


class QWenConfig(PreTrainedConfig):
    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_range: float = 0.02
    max_position_embeddings: int = 8192
    scale_attn_weights: bool = True
    use_cache: bool = True
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    kv_channels: int = 128
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    use_flash_attn: bool | str = "auto"
    intermediate_size: int = 22016
    no_bias: bool = True
    tie_word_embeddings: bool = False
    use_cache_quantization: bool = False
    use_cache_kernel: bool = False
    softmax_in_fp32: bool = False
    seq_length: int = 2048
    onnx_safe: bool | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.tie_word_embeddings:
            raise ValueError("Qwen v1 has an untied lm_head; tie_word_embeddings=True is not supported")
        if not 0 < self.rotary_pct <= 1:
            raise ValueError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    # Read by transformers' generic code (e.g. DynamicCache(config=...), mask helpers).
    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads


__all__ = ["QWenConfig"]
