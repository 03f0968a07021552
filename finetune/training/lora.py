"""LoRA adapters (PEFT) on a loaded model: fp32 master weights, every other weight frozen."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def check_target_modules(model, targets, modules_to_save=None) -> None:
    """Every --lora_target_modules name must match (PEFT's rule: the module name, or its dotted suffix) at least
    one Linear of ``model`` (a meta-device build is enough), and every --modules_to_save name some module; else
    ValueError naming it and listing the valid names."""
    import torch.nn as nn

    modules = [(n, m) for n, m in model.named_modules() if n]

    def matches(name, target):
        return name == target or name.endswith("." + target)

    linears = [n for n, m in modules if isinstance(m, nn.Linear)]
    valid = sorted({n.split(".")[-1] for n in linears} | {".".join(n.split(".")[-2:]) for n in linears
                                                           if n.count(".") and n.split(".")[-1] == "c_proj"})
    for t in targets or []:
        if any(matches(n, t) for n in linears):
            continue
        others = sorted({type(m).__name__ for n, m in modules if matches(n, t)})
        what = f"names a {'/'.join(others)}, not a Linear" if others else "matches no module"
        raise ValueError(f"--lora_target_modules {t!r} {what} of {type(model).__name__}; valid names: "
                         f"{', '.join(valid)}")
    for t in modules_to_save or []:
        if not any(matches(n, t) for n, _ in modules):
            raise ValueError(f"--modules_to_save {t!r} matches no module of {type(model).__name__}; e.g. wte (the "
                             f"embedding) and lm_head")


# The LoRA flags and the keys of PEFT's LoraConfig they set. An adapter given with --lora_weight_path trains with its
# own values of these keys (checks.adapter_flags_not_applied compares them with the flags)
LORA_CONFIG_KEYS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                    "lora_target_modules": "target_modules", "lora_bias": "bias", "use_rslora": "use_rslora",
                    "modules_to_save": "modules_to_save"}


def attach_lora(model, lora_args, plan, verbose: bool = True):
    """Wrap the model with trainable LoRA adapters (fp32), every other weight frozen; ``verbose``: print the
    trainable parameter count (rank 0 only in a multi-process run)."""
    from peft import LoraConfig, get_peft_model

    from ..adapters import load_adapter

    model.requires_grad_(False)
    if lora_args.lora_weight_path:  # the checked path every adapter load takes (finetune/adapters.py)
        model = load_adapter(model, lora_args.lora_weight_path, is_trainable=True)
    else:
        values = {key: getattr(lora_args, flag) for flag, key in LORA_CONFIG_KEYS.items()}
        values["target_modules"] = list(values["target_modules"])
        model = get_peft_model(model, LoraConfig(**values, task_type="CAUSAL_LM"))
    n_train = 0
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 master weights; autocast gives the matmuls the compute dtype
            n_train += p.numel()
    if n_train == 0:
        raise ValueError(f"no module matched --lora_target_modules {lora_args.lora_target_modules}")
    if verbose:
        model.print_trainable_parameters()
    return model
