"""Command-line arguments: transformers' TrainingArguments plus model, data and LoRA arguments.

The official Qwen finetune.py command lines run unchanged: its flags keep their names and meanings, and the
flags transformers 5 renamed or removed are translated (`--evaluation_strategy`, `--warmup_ratio`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import transformers
from transformers import HfArgumentParser

from ..settings import settings


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model dir (bf16/fp16 or GPTQ Int4/Int8) or hub id"})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "Training data: JSON, JSONL or a datasets dir"})
    eval_data_path: str | None = field(default=None, metadata={"help": "Held-out data for evaluation"})
    model_max_length: int = field(default=8192, metadata={"help": "Longest row in tokens (turn-aware truncation)"})
    packing: bool = field(default=False, metadata={"help": "Pack several conversations into each row"})
    train_on_prompt: bool = field(default=False, metadata={"help": "Also train on system/user text"})
    skip_invalid: bool = field(default=False, metadata={"help": "Count and skip invalid records instead of stopping"})
    lazy_preprocess: bool = field(
        default=False, metadata={"help": "Accepted for the official scripts; data is always encoded once and cached"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenizing"})


@dataclass
class LoraArguments:
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (implied by --q_lora)"})
    q_lora: bool = field(default=False, metadata={"help": "LoRA on a GPTQ Int4 base (implied by an Int4 dir)"})
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "w1", "w2"])
    lora_weight_path: str = field(default="", metadata={"help": "Start from this adapter's weights"})
    lora_bias: str = field(default="none", metadata={"help": "none, all or lora_only (as PEFT)"})
    use_rslora: bool = False
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Also train these in full, e.g. wte lm_head for a base (non-chat) model"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None, metadata={"help": "Accepted for the official scripts"})
    optim: str = field(default="adamw_torch")
    resume: bool = field(
        default=False, metadata={"help": "Continue an unfinished run from the last complete checkpoint in "
                                         "--output_dir (a finished run is not continued: start a new run from "
                                         "its adapter with --lora_weight_path)"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in --output_dir: the previous run's checkpoints are removed; "
                                         "files that are not this project's are never removed"})
    cuda_graphs: bool = field(
        default=settings().cuda_graphs,
        metadata={"help": "One GPU, --packing: replay each training step as CUDA graphs (rows padded to "
                          "--model_max_length so every step has one shape); False runs every step eagerly "
                          "(default: FINETUNE_CUDA_GRAPHS, on)"})
    on_nonfinite_loss: str = field(
        default="stop", metadata={"help": "stop: end with an error naming the step; skip: do not apply that "
                                          "optimizer step, count it (log and run_info.json); not with --deepspeed"})


# Flags transformers 5 no longer has, as the official scripts spell them.
def _translate_legacy(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        name, eq, val = a.partition("=")
        if name == "--evaluation_strategy":
            out.append("--eval_strategy" + (eq + val if eq else ""))
        elif name == "--warmup_ratio":
            # transformers 5 reads a warmup_steps value below 1 as a ratio of the total steps.
            v = val if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if not eq:
                i += 1
            if float(v) >= 1:
                raise SystemExit("error: --warmup_ratio must be below 1 (it is a fraction of the steps)")
            out += ["--warmup_steps", v]
        else:
            out.append(a)
        i += 1
    return out


def parse_args(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, LoraArguments, TrainingArguments) from argv or a YAML/JSON file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0], allow_extra_keys=False)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0], allow_extra_keys=False)
    return parser.parse_args_into_dataclasses(args=_translate_legacy(argv))
