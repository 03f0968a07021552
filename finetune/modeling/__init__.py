"""The Qwen v1 model as a transformers PreTrainedModel, with chat() / chat_stream()."""

from .chat import make_context
from .configuration import QWenConfig
from .model import QWenLMHeadModel, QWenModel, QWenPreTrainedModel


def register() -> None:
    """Register model_type "qwen" with the Auto classes (idempotent), so official dirs load without remote code."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from finetune.tokenization import QWenTokenizer

    AutoConfig.register("qwen", QWenConfig, exist_ok=True)
    AutoModel.register(QWenConfig, QWenModel, exist_ok=True)
    AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel, exist_ok=True)
    AutoTokenizer.register(QWenConfig, tokenizer_class=QWenTokenizer, exist_ok=True)


register()

__all__ = ["QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenPreTrainedModel", "make_context", "register"]
