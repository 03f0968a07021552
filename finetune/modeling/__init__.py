"""The Qwen v1 model as a transformers PreTrainedModel, with chat() / chat_stream(). The Auto classes learn of it
through finetune/registry.py."""

from .chat import make_context
from .configuration import QWenConfig
from .model import QWenLMHeadModel, QWenModel, QWenPreTrainedModel


__all__ = ["QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenPreTrainedModel", "make_context"]
