"""qwen-finetune: LoRA / Q-LoRA fine-tuning for Qwen chat models.

Importing the package is cheap: the model code, the GPTQ layer and PEFT load when first used. The
registrations that make official Qwen dirs load through transformers' Auto classes and PEFT run when those
are imported (finetune/registry.py).
"""

from . import registry

registry.install()

_LAZY = {"load_model": ".loading", "load_tokenizer": ".tokenization", "QWenTokenizer": ".tokenization"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["QWenTokenizer", "load_tokenizer", "load_model"]
__version__ = "0.1.0"
