"""The fast decoder behind chat()/chat_stream() (registered with finetune.modeling.chat by finetune.inference).

On CUDA, one prompt row with generation options the engine implements goes through an Engine held per model in a
WeakKeyDictionary (nothing is stored on the model; the engine and its CUDA graphs go when the model goes).
Everything else (CPU, batches, beams, ``FINETUNE_STATIC_DECODE=0``, a model in training mode) returns None, and
chat() runs generate(). The adapter is the one PEFT has active (none inside ``disable_adapter()``).
"""

from __future__ import annotations

import weakref
from typing import Iterator

from ..settings import settings
from ..modeling.model import qwen_lm
from .engine import Engine
from .row_adapters import lora_layers
from .sampling import SamplingParams, unsupported_options

_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def engine_for(model, tokenizer) -> Engine:
    """The chat engine of ``model`` (created on first use, one row, reused while the model lives)."""
    engine = _ENGINES.get(model)
    stops = {tokenizer.im_end_id, tokenizer.im_start_id}
    if engine is None or engine._base_stops != stops:
        engine = Engine(model, tokenizer, max_batch=1)
        _ENGINES[model] = engine
    return engine


def active_adapter(model):
    """(handled, adapter): the one active LoRA adapter of the model's LoRA layers, None when adapters are
    disabled or there are none; handled False when several adapters are active at once (generate() then).
    Read from the layers, as PEFT's forward does: ``peft_model.chat()`` reaches chat() with the wrapped model."""
    layers = lora_layers(model) if hasattr(model, "peft_config") else []
    if not layers or any(layer.disable_adapters for layer in layers):
        return True, None
    active = {tuple(layer.active_adapters) for layer in layers}
    if len(active) != 1 or len(next(iter(active))) != 1:
        return False, None
    return True, next(iter(active))[0]


def _device_ok(input_ids) -> bool:
    """CUDA only: on the CPU generate() computes the same thing and the engine would add nothing."""
    return input_ids.is_cuda


def engine_takes(model) -> bool:
    """Whether chat() hands this model's turns to the engine at all (each call's own checks aside): the fast
    decoder on (``FINETUNE_STATIC_DECODE``), a Qwen model in eval mode."""
    return settings().static_decode and qwen_lm(model) is not None and not model.training


def chat_tokens(model, tokenizer, input_ids, gc) -> Iterator[int] | None:
    """The new token ids of chat()'s one prompt row through the model's engine, or None (then generate())."""
    if not engine_takes(model) or not _device_ok(input_ids) or input_ids.shape[0] != 1 or unsupported_options(gc):
        return None
    handled, adapter = active_adapter(model)
    if not handled:
        return None
    engine = engine_for(model, tokenizer)
    params = SamplingParams.from_generation_config(gc)
    if input_ids.shape[1] + params.max_new_tokens > engine.max_len:
        return None
    req = engine.submit(input_ids[0].tolist(), params, adapter=adapter)
    return _stream(engine, req)


def _stream(engine, req) -> Iterator[int]:
    sent = 0
    try:
        while not req.finished:
            engine.step()
            while sent < len(req.output_ids):
                yield req.output_ids[sent]
                sent += 1
        while sent < len(req.output_ids):
            yield req.output_ids[sent]
            sent += 1
    finally:
        if not req.finished:  # the consumer stopped early: free the row
            req.cancel()
            while engine.has_work():
                engine.step()


__all__ = ["chat_tokens", "engine_for", "engine_takes", "active_adapter"]
