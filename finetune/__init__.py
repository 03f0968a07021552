"""qwen-finetune: LoRA / Q-LoRA fine-tuning for Qwen chat models."""

from .tokenization import QWenTokenizer, load_tokenizer
from . import modeling  # registers model_type "qwen" with the transformers Auto classes
from .loading import load_model

__all__ = ["QWenTokenizer", "load_tokenizer", "load_model"]
__version__ = "0.1.0"
