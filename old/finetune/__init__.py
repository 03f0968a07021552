"""qwen-finetune: LoRA / Q-LoRA fine-tuning for Qwen chat models.

Importing the package is cheap: the model code, the GPTQ layer and PEFT load when first used. The
registrations that make official Qwen dirs load through transformers' Auto classes and PEFT run when those
are imported (finetune/registry.py).
"""

from . import registry
from .lazy import lazy_attributes

registry.install()

__getattr__ = lazy_attributes(__name__, {"load_model": ".loading", "load_tokenizer": ".tokenization",
                                         "QWenTokenizer": ".tokenization"})

__all__ = ["QWenTokenizer", "load_tokenizer", "load_model"]
__version__ = "0.1.0"
