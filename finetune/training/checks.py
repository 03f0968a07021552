"""Everything that can be checked before a model or data set is loaded, with one clear message each."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hub import ModelNotFoundError, resolve_model_dir
from ..tokenization import VOCAB_FILE
from .memory import check_fits

FINISHED_MARKER = "training_finished.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class TrainConfigError(ValueError):
    """A training run that cannot start as configured."""


@dataclass
class TrainPlan:
    model_dir: Path
    mode: str  # "qlora", "lora" or "full"
    quantized: bool
    device: str  # where the model is loaded: "cuda:<local rank>" or "cpu"
    zero_stage: int | None  # DeepSpeed ZeRO stage, None without DeepSpeed
    resume_from: str | None  # checkpoint dir to continue from


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest checkpoint-N in output_dir that was written to the end (its trainer_state.json exists).

    Checkpoints are written to a staging dir and renamed into place, so a killed save never appears under
    this name; the trainer_state.json check also covers checkpoints written by other tools.
    """
    d = Path(output_dir)
    if not d.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    for _, p in sorted(found, reverse=True):
        if (p / "trainer_state.json").is_file():
            return str(p)
    return None


def deepspeed_config(ds) -> dict | None:
    """The --deepspeed value (a path or a dict) as a dict, or a clear error."""
    if not ds:
        return None
    if isinstance(ds, dict):
        return ds
    p = Path(ds)
    if not p.is_file():
        raise TrainConfigError(f"--deepspeed {ds}: no such file (the project's configs are in ds_configs/)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise TrainConfigError(f"--deepspeed {ds}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}")


def preflight(model_args, data_args, lora_args, args) -> TrainPlan:
    # -- model dir -------------------------------------------------------------------------------------------
    if not model_args.model_name_or_path:
        raise TrainConfigError("--model_name_or_path is required (a Qwen model dir, e.g. /models/Qwen-14B-Chat-Int4)")
    try:
        model_dir = resolve_model_dir(model_args.model_name_or_path)
    except ModelNotFoundError as e:
        raise TrainConfigError(f"--model_name_or_path: {e}") from None
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise TrainConfigError(f"{model_dir} has no config.json: is it a model directory?")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("model_type") != "qwen":
        raise TrainConfigError(
            f"{cfg_file}: model_type is {cfg.get('model_type')!r}; this trainer supports Qwen v1 ('qwen') models")
    if not (model_dir / VOCAB_FILE).is_file():
        raise TrainConfigError(f"{model_dir} has no {VOCAB_FILE}: copy it from the original model dir")
    qcfg = cfg.get("quantization_config") or {}
    quantized = qcfg.get("quant_method") == "gptq"

    # -- data ------------------------------------------------------------------------------------------------
    if not data_args.data_path:
        raise TrainConfigError("--data_path is required (chat data as JSON, JSONL or a datasets dir)")
    for flag, path in (("--data_path", data_args.data_path), ("--eval_data_path", data_args.eval_data_path)):
        if path and not Path(path).exists():
            raise TrainConfigError(f"{flag} {path}: no such file or directory")
    if data_args.model_max_length < 16:
        raise TrainConfigError(f"--model_max_length {data_args.model_max_length} is too small for any chat turn")

    # -- mode ------------------------------------------------------------------------------------------------
    if lora_args.q_lora and not quantized:
        raise TrainConfigError(
            f"--q_lora needs a GPTQ Int4 model dir, and {model_dir} is not quantized (no quantization_config). "
            "Pass the Int4 release (e.g. Qwen-14B-Chat-Int4), or drop --q_lora to train LoRA on this model")
    if quantized:
        mode = "qlora"
    elif lora_args.use_lora:
        mode = "lora"
    else:
        mode = "full"
    if lora_args.lora_r <= 0:
        raise TrainConfigError(f"--lora_r must be positive, got {lora_args.lora_r}")
    if lora_args.lora_bias not in ("none", "all", "lora_only"):
        raise TrainConfigError(f"--lora_bias must be none, all or lora_only, got {lora_args.lora_bias!r}")
    if lora_args.lora_weight_path and not Path(lora_args.lora_weight_path).is_dir():
        raise TrainConfigError(f"--lora_weight_path {lora_args.lora_weight_path}: no such adapter dir")
    if mode == "full" and (lora_args.modules_to_save or lora_args.lora_weight_path):
        raise TrainConfigError("--modules_to_save and --lora_weight_path apply to LoRA; add --use_lora")
    if args.bf16 and args.fp16:
        raise TrainConfigError("--bf16 and --fp16 exclude each other")
    if args.fp16 and (args.use_cpu or not torch.cuda.is_available()):
        raise TrainConfigError("--fp16 needs a CUDA GPU; on the CPU training runs in fp32: drop --fp16 (the official "
                               "Q-LoRA script passes it for auto-gptq; here Q-LoRA trains in bf16 on a GPU)")

    # -- DeepSpeed -------------------------------------------------------------------------------------------
    ds = deepspeed_config(args.deepspeed)
    zero_stage = None
    if ds is not None:
        zero_stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
        if mode == "qlora" and zero_stage == 3:
            raise TrainConfigError(
                "Q-LoRA cannot run under ZeRO-3: the packed Int4 weights are integer buffers that ZeRO-3 cannot "
                "partition, and each GPU holds the whole Int4 model anyway. Use --deepspeed ds_configs/zero2.json")
        if "scheduler" in ds:
            raise TrainConfigError(
                f"--deepspeed {args.deepspeed} has a 'scheduler' block, which would replace the schedule that "
                "--lr_scheduler_type asks for; remove it (the configs in ds_configs/ have none)")
        if "optimizer" in ds and not str(args.optim).lower().startswith(("adamw", "optimizernames.adamw")):
            raise TrainConfigError(
                f"--deepspeed {args.deepspeed} brings its own optimizer ({ds['optimizer'].get('type')}), so "
                f"--optim {args.optim} would not run; use a config without an optimizer block (ds_configs/zero2.json)")

    # -- output dir and resume -------------------------------------------------------------------------------
    out = Path(args.output_dir)
    resume_from = None
    if args.resume_from_checkpoint not in (None, "", "False", "false"):
        if args.resume_from_checkpoint in ("True", "true", "auto", "last"):
            resume_from = last_complete_checkpoint(out)
            if resume_from is None:
                raise TrainConfigError(f"--resume_from_checkpoint: no complete checkpoint in {out}")
        else:
            resume_from = args.resume_from_checkpoint
            if not (Path(resume_from) / "trainer_state.json").is_file():
                raise TrainConfigError(f"--resume_from_checkpoint {resume_from}: not a complete checkpoint "
                                       "(no trainer_state.json)")
    elif args.resume:
        resume_from = last_complete_checkpoint(out)
        if resume_from is None and (out / FINISHED_MARKER).is_file():
            raise TrainConfigError(f"--resume: the run in {out} has finished; nothing to continue")
    elif out.is_dir() and not args.overwrite_output_dir:
        if (out / FINISHED_MARKER).is_file():
            raise TrainConfigError(
                f"{out} holds a finished run; choose another --output_dir or pass --overwrite_output_dir")
        if last_complete_checkpoint(out):
            raise TrainConfigError(
                f"{out} holds checkpoints of an unfinished run; pass --resume to continue it "
                "or --overwrite_output_dir to start over")

    if torch.cuda.is_available() and not args.use_cpu:
        device = f"cuda:{max(args.local_process_index, 0)}"
    else:
        device = "cpu"
    check_fits(model_dir, mode, lora_args, data_args, args, device, ds)  # the estimate, before any loading
    return TrainPlan(model_dir=model_dir, mode=mode, quantized=quantized, device=device,
                     zero_stage=zero_stage, resume_from=resume_from)
