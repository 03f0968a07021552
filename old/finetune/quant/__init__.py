"""The project's own exact GPTQ layer: format helpers, GPTQLinear, RTN quantizer, loading, PEFT LoRA.

LoRA for GPTQLinear is registered with PEFT when PEFT is imported (``peft_lora.register_peft``, through
finetune/registry.py). Triton is imported only when a CUDA tensor is dequantized.
"""

from .linear import GPTQLinear, GPTQMatmul
from .packing import dequantize, dequantize_t, pack_cols, pack_rows, unpack_cols, unpack_rows
from .rtn import QWEN_QUANTIZED_SUFFIXES, quantize_model_dir, quantize_state_dict, quantize_weight


def register_peft(config=None) -> None:
    """Register GPTQLinear -> GPTQLoraLinear with PEFT (idempotent; done when PEFT is imported)."""
    from .peft_lora import register_peft as _register

    _register(config)


def load_gptq_model(model_dir, config=None, dtype=None, device=None, **kwargs):
    """See ``finetune.quant.loading.load_gptq_model``."""
    from .loading import load_gptq_model as _load

    return _load(model_dir, config=config, dtype=dtype, device=device, **kwargs)


__all__ = [
    "GPTQLinear",
    "GPTQMatmul",
    "QWEN_QUANTIZED_SUFFIXES",
    "dequantize",
    "dequantize_t",
    "load_gptq_model",
    "pack_cols",
    "pack_rows",
    "quantize_model_dir",
    "quantize_state_dict",
    "quantize_weight",
    "register_peft",
    "unpack_cols",
    "unpack_rows",
]
