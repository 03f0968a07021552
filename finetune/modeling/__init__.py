"""The Qwen v1 model as a transformers PreTrainedModel, with chat() / chat_stream().

The package itself imports only the configuration (light): transformers' Auto classes learn of the model
through finetune/registry.py, whose hooks can run while transformers is still importing its model code.
"""

from .configuration import QWenConfig

_LAZY = {"QWenLMHeadModel": ".model", "QWenModel": ".model", "QWenPreTrainedModel": ".model", "make_context": ".chat"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenPreTrainedModel", "make_context"]
