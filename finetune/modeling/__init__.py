"""The Qwen v1 model as a transformers PreTrainedModel, with chat() / chat_stream().

The package itself imports only the configuration (light): transformers' Auto classes learn of the model
through finetune/registry.py, whose hooks can run while transformers is still importing its model code.
"""

from ..lazy import lazy_attributes
from .configuration import QWenConfig

__getattr__ = lazy_attributes(__name__, {"QWenLMHeadModel": ".model", "QWenModel": ".model",
                                         "QWenPreTrainedModel": ".model", "make_context": ".chat",
                                         "decode_tokens": ".chat", "get_stop_words_ids": ".chat",
                                         "StopWordsLogitsProcessor": ".chat"})

__all__ = ["QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenPreTrainedModel", "make_context", "decode_tokens",
           "get_stop_words_ids", "StopWordsLogitsProcessor"]
