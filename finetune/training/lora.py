"""Compute dtype and LoRA adapters (PEFT) on a loaded model."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def resolve_compute_dtype(args, plan) -> torch.dtype:
    """bf16 where the hardware has it, fp16 only when asked, fp32 on CPU (DESIGN.md: precision).

    For LoRA and Q-LoRA the frozen weights are loaded in the compute dtype and the adapters are fp32 master
    weights; the trainer runs the forward under autocast itself, so neither accelerate nor DeepSpeed casts the
    adapters. For that, `args.bf16` is consumed here. fp16 keeps transformers' loss scaling (args.fp16 stays).
    """
    on_gpu = plan.device.startswith("cuda")
    if args.fp16:
        if on_gpu and torch.cuda.is_bf16_supported() and plan.mode == "qlora":
            logger.warning("training Q-LoRA in fp16 as asked; this GPU has bf16, which is safer (--bf16)")
        dtype = torch.float16
    elif args.bf16 or (on_gpu and torch.cuda.is_bf16_supported()):
        dtype = torch.bfloat16
    else:
        if on_gpu:
            logger.warning("this GPU has no bf16: training in fp32 (pass --fp16 for half precision)")
        dtype = torch.float32
    if plan.mode == "full" or (plan.zero_stage == 3 and dtype == torch.bfloat16):
        # Full fine-tuning keeps fp32 master weights through transformers' own mixed precision (autocast, or
        # DeepSpeed's bf16 with fp32 optimizer copies). So does LoRA under ZeRO-3: deepspeed.zero.Init would
        # otherwise store the frozen weights in fp32; the adapters' fp32 copies live in its optimizer.
        args.bf16 = dtype == torch.bfloat16
    else:
        args.bf16 = False
    args.mixed_precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    if args.deepspeed:
        _configure_deepspeed(args, plan, dtype)
    return dtype


def _configure_deepspeed(args, plan, dtype) -> None:
    """Rebuild transformers' DeepSpeed config for the precision decided here (it was filled from the command
    line's --bf16/--fp16 when the arguments were parsed).

    DeepSpeed switches off an autocast region entered outside its engine, so where the adapters are fp32 on a
    bf16 base (LoRA/Q-LoRA below ZeRO-3) its own `torch_autocast` runs the forward, with adapter gradients
    reduced in fp32 (no lower-precision modules)."""
    import copy

    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from .checks import deepspeed_config

    cfg = copy.deepcopy(deepspeed_config(args.deepspeed))
    if dtype == torch.bfloat16 and not args.bf16:
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    args.deepspeed = cfg
    args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(cfg)
    args.hf_deepspeed_config.trainer_config_process(args)
    args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)


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


def attach_lora(model, lora_args, plan):
    """Wrap the model with trainable LoRA adapters (fp32), every other weight frozen."""
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
    model.print_trainable_parameters()
    return model
