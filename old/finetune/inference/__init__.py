"""Inference: the decode engine (continuous batching, static KV cache, CUDA graphs, adapters unmerged) that chat,
eval and the server share.

    from finetune.inference import Engine, SamplingParams, Request

Importing this package registers the engine as the fast decoder of QWenLMHeadModel.chat()/chat_stream()
(the model imports nothing from here).
"""

from ..modeling.chat import register_decoder
from .chat_decoder import chat_tokens
from .engine import Engine, Request
from .sampling import SamplingParams

register_decoder(chat_tokens)

__all__ = ["Engine", "Request", "SamplingParams"]
