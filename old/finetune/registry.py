"""Makes the project's classes known to transformers and PEFT, at the moment those are first used.

After `import finetune`, `AutoConfig` / `AutoModelForCausalLM` / `AutoTokenizer` load an official Qwen v1 dir
without remote code, and PEFT attaches LoRA to the project's GPTQ layer (also inside
`AutoPeftModelForCausalLM` / `PeftModel.from_pretrained`). Doing that at import time would load transformers'
model code and PEFT for every command, `qwen-ft --help` and `import finetune.data` included (seconds). So each
registration is a post-import hook (wrapt's): it runs when the module it patches is imported, or at once if
it already is.
"""

from __future__ import annotations

import wrapt

_installed = False


def _auto_config(module) -> None:
    from .modeling.configuration import QWenConfig

    module.AutoConfig.register("qwen", QWenConfig, exist_ok=True)


def _auto_models(module) -> None:
    from .modeling.configuration import QWenConfig
    from .modeling.model import QWenLMHeadModel, QWenModel

    module.AutoModel.register(QWenConfig, QWenModel, exist_ok=True)
    module.AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel, exist_ok=True)


def _auto_tokenizer(module) -> None:
    from .modeling.configuration import QWenConfig
    from .tokenization import QWenTokenizer

    module.AutoTokenizer.register(QWenConfig, tokenizer_class=QWenTokenizer, exist_ok=True)


def _peft(module) -> None:
    # LoRA on the GPTQ layer: the module registers itself when its import completes (this hook can fire while
    # that module is importing peft). Then PEFT's own loading routes take the project's adapter checks.
    import importlib

    importlib.import_module("finetune.quant.peft_lora")
    from .peft_hooks import install

    install()


def _fast_decoder(module) -> None:
    # chat() of a loaded model reaches the decode engine through modeling.chat.register_decoder; the engine's
    # package registers itself on import (the model imports nothing from it). Hooked on the model's module:
    # by then it is complete, which the engine's imports need.
    import importlib

    importlib.import_module("finetune.inference")


HOOKS = {
    "finetune.modeling.model": _fast_decoder,
    "transformers.models.auto.configuration_auto": _auto_config,
    "transformers.models.auto.modeling_auto": _auto_models,
    "transformers.models.auto.tokenization_auto": _auto_tokenizer,
    "peft": _peft,
}


def install() -> None:
    """Install the hooks (idempotent; `import finetune` does it)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name, hook in HOOKS.items():
        wrapt.register_post_import_hook(hook, name)
