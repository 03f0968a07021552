"""The served model: one base and its LoRA adapters, loaded into one PeftModel (adapters stay unmerged, so
every request picks its adapter, or the base, by the OpenAI `model` field)."""

from __future__ import annotations

from pathlib import Path


def base_name(model_dir) -> str:
    """The base model's name in /v1/models: its dir name (the last part of a hub id). Of the absolute path, not
    resolved (a symlinked dir keeps its own name): `-m .` in the model dir served the base as "" (and `-m ..` as
    ".."), which no client names."""
    import os

    return Path(os.path.abspath(os.path.expanduser(str(model_dir)))).name


# PyTorch refuses a "." in a module name, and PEFT makes each adapter's name one (lora_A[NAME]): an adapter served
# as "qwen-v1.5" (a NAME the --adapter check allows) failed the load with a KeyError traceback. It is loaded under
# its name with each "." as U+2024 (one dot leader: no served name holds one, and messages naming it read the same)
PEFT_DOT = "\u2024"


def peft_adapter_name(name: str) -> str:
    """The name the adapter served as `name` has in the PeftModel (and the engine)."""
    return name.replace(".", PEFT_DOT)


def unserved_options(model_dir) -> str | None:
    """Why the model dir's generation_config.json cannot be served, or None: options the decode engine does not
    implement (beams, n-gram blocking, ...), which every request would otherwise fail on. A missing or broken
    file is the loader's to report."""
    import json

    from transformers import GenerationConfig

    from ..inference.sampling import unsupported_options

    path = Path(model_dir) / "generation_config.json"
    try:
        gc = GenerationConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except Exception:  # noqa: BLE001  (the load checks the file and says what is wrong with it)
        return None
    if unsupported := unsupported_options(gc):
        given = ", ".join(f"{k}={getattr(gc, k)!r}" for k in unsupported)
        return (f"{path}: {given}: the server's decode engine does not implement "
                f"{'this option' if len(unsupported) == 1 else 'these options'}; remove "
                f"{'it' if len(unsupported) == 1 else 'them'} from the file to serve this model")
    return None


def load_served_model(model_dir, adapters: list[tuple[str, str]], dtype=None, device=None):
    """(model, tokenizer): the base from `model_dir`, with each (name, dir) adapter loaded under its name. The dirs
    are local (serve/cli.py build_server resolves hub ids once, for its checks before the load)."""
    from ..adapters import load_adapter
    from ..loading import load_model
    from ..tokenization import load_tokenizer

    model = load_model(model_dir, dtype=dtype, device=device)
    tokenizer = load_tokenizer(model_dir)
    for name, adapter_dir in adapters:  # the first wraps the model, the others are added to it: the same checks
        model = load_adapter(model, adapter_dir, adapter_name=peft_adapter_name(name))
    if adapters:
        for p in model.parameters():
            p.requires_grad_(False)
    model.eval()
    return model, tokenizer
