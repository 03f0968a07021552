"""The precision policy of a training run, decided once (the project's precision policy; ARCHITECTURE.md).

bf16 where the hardware has it, fp16 only when asked, fp32 on CPU. For LoRA and Q-LoRA the frozen weights are
loaded in the compute dtype and the adapters are fp32 master weights; the trainer runs the forward under
autocast itself, so neither accelerate nor DeepSpeed casts the adapters. Full fine-tuning (and LoRA under
ZeRO-3 in bf16) keeps fp32 master weights through transformers' own mixed precision instead. fp16 keeps
transformers' loss scaling.

`decide` is a pure function of the arguments and the plan; `apply` is the one place that writes the decision
into transformers' (and DeepSpeed's) fields of the training arguments; run_info.json records it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Precision:
    compute_dtype: torch.dtype  # frozen weights and matmuls
    load_dtype: torch.dtype  # the model's weights as loaded (fp32 master weights for full fine-tuning)
    trainer_autocast: bool  # the trainer wraps each forward in bf16 autocast (fp32 adapters on a bf16 base)
    hf_bf16: bool  # transformers' / DeepSpeed's own bf16 mixed precision
    hf_fp16: bool  # transformers' fp16 mixed precision with loss scaling
    deepspeed_autocast: bool  # DeepSpeed's torch_autocast runs the forward (it switches an outer autocast off)

    def record(self) -> dict:
        return {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
                for k, v in dataclasses.asdict(self).items()}


def decide(args, plan) -> Precision:
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
    # Full fine-tuning keeps fp32 master weights through transformers' own mixed precision (autocast, or
    # DeepSpeed's bf16 with fp32 optimizer copies). So does LoRA under ZeRO-3: deepspeed.zero.Init would
    # otherwise store the frozen weights in fp32; the adapters' fp32 copies live in its optimizer.
    hf_bf16 = dtype == torch.bfloat16 and (plan.mode == "full" or plan.zero_stage == 3)
    own_autocast = dtype == torch.bfloat16 and not hf_bf16
    return Precision(
        compute_dtype=dtype,
        load_dtype=torch.float32 if plan.mode == "full" else dtype,
        trainer_autocast=own_autocast,  # (under DeepSpeed its engine switches this off and runs its own)
        hf_bf16=hf_bf16,
        hf_fp16=bool(args.fp16),
        deepspeed_autocast=own_autocast and bool(args.deepspeed),
    )


def apply(args, precision: Precision) -> None:
    """Write the decision into the training arguments (transformers' mixed precision and, with DeepSpeed, the
    config it builds its engine from: that was filled from the command line's --bf16/--fp16 at parse time)."""
    args.bf16 = precision.hf_bf16
    args.fp16 = precision.hf_fp16
    args.mixed_precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    if args.deepspeed:
        _configure_deepspeed(args, precision)


def _configure_deepspeed(args, precision: Precision) -> None:
    """DeepSpeed switches off an autocast region entered outside its engine, so where the adapters are fp32 on
    a bf16 base (LoRA/Q-LoRA below ZeRO-3) its own `torch_autocast` runs the forward, with adapter gradients
    reduced in fp32 (no lower-precision modules)."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from .checks import deepspeed_config

    cfg = copy.deepcopy(deepspeed_config(args.deepspeed))
    if precision.deepspeed_autocast:
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    args.deepspeed = cfg
    args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(cfg)
    args.hf_deepspeed_config.trainer_config_process(args)
    args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)
