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


def attach_lora(model, lora_args, plan, verbose: bool = True):
    """Wrap the model with trainable LoRA adapters (fp32), every other weight frozen; ``verbose``: print the
    trainable parameter count (rank 0 only in a multi-process run)."""
    from peft import LoraConfig, get_peft_model

    from ..adapters import load_adapter

    model.requires_grad_(False)
    if lora_args.lora_weight_path:  # the checked path every adapter load takes (finetune/adapters.py)
        model = load_adapter(model, lora_args.lora_weight_path, is_trainable=True)
    else:
        config = LoraConfig(
            r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
            target_modules=list(lora_args.lora_target_modules), bias=lora_args.lora_bias,
            use_rslora=lora_args.use_rslora, modules_to_save=lora_args.modules_to_save, task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
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
