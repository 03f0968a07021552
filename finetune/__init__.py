"""qwen-finetune: LoRA / Q-LoRA fine-tuning for Qwen chat models."""

from . import modeling  # registers model_type "qwen" (config, model, tokenizer) with the transformers Auto classes
from . import quant  # registers LoRA for the GPTQ layer with PEFT, so saved adapters reload on Int4 bases
from .peft_hooks import install as _install_peft_hooks
from .loading import load_model
from .tokenization import QWenTokenizer, load_tokenizer

_install_peft_hooks()  # PEFT's own load/save/merge routes take the project's adapter checks

__all__ = ["QWenTokenizer", "load_tokenizer", "load_model"]
__version__ = "0.1.0"
