"""qwen-finetune: LoRA / Q-LoRA fine-tuning for Qwen chat models."""

from .tokenization import QWenTokenizer, load_tokenizer

__all__ = ["QWenTokenizer", "load_tokenizer"]
__version__ = "0.1.0"
