"""LoRA adapters (PEFT) on a loaded model: fp32 master weights, every other weight frozen."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def attach_lora(model, lora_args, plan):
    """Wrap the model with trainable LoRA adapters (fp32), every other weight frozen."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model.requires_grad_(False)
    if lora_args.lora_weight_path:
        model = PeftModel.from_pretrained(model, lora_args.lora_weight_path, is_trainable=True)
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
