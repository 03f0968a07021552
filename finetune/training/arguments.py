"""Command-line arguments: transformers' TrainingArguments plus model, data and LoRA arguments.

The official Qwen finetune.py command lines run unchanged: its flags keep their names and meanings, and the
flags transformers 5 renamed or removed are translated (`--evaluation_strategy`, `--warmup_ratio`,
`--gradient_checkpointing`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from ..command_line import flag_hint, home, is_terminal, value_hint
from ..errors import json_reason
from .checks import (DuplicateKeyError, TrainConfigError, deepspeed_config, load_json, official_deepspeed_config,
                     require_deepspeed, shipped_deepspeed)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model dir (bf16/fp16 or GPTQ Int4/Int8) or hub id", "aliases": ["-m"]})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={
        "help": "Training data: JSON, JSONL, Parquet or a datasets dir; several: a quoted glob ('data/train-*.jsonl'), "
                "a comma-separated list, or a directory of .json/.jsonl/.parquet files", "aliases": ["-d"]})
    eval_data_path: str | None = field(default=None, metadata={"help": "Held-out data for evaluation (as --data_path)"})
    model_max_length: int = field(default=8192, metadata={"help": "Longest row in tokens (turn-aware truncation)"})
    packing: bool = field(
        default=True, metadata={"help": "Pack several conversations into each row of --model_max_length tokens, "
                                        "attention kept within each (default): fewer, fuller steps, and every "
                                        "step one shape for CUDA graphs. False: one conversation a row, padded, "
                                        "as the official recipe"})
    train_on_prompt: bool = field(default=False, metadata={"help": "Also train on system/user text"})
    skip_invalid: bool = field(default=False, metadata={"help": "Count and skip invalid records instead of stopping"})
    lazy_preprocess: bool = field(
        default=False, metadata={"help": "Accepted for the official scripts; data is always encoded once and cached"})
    preprocessing_num_workers: int | None = field(default=None, metadata={
        "help": "Processes for tokenizing (default: one, or up to 8 for JSONL data of 64 MB and more; the rows are "
                "the same either way)"})


@dataclass
class LoraArguments:
    # None (unset): LoRA where --q_lora or an Int4 dir implies it, else full fine-tuning; False said on an Int4 dir
    # is refused (checks.preflight), not overridden
    use_lora: bool | None = field(default=None, metadata={"help": "Train LoRA adapters (implied by --q_lora; "
                                                                   "default: full fine-tuning of a float model)"})
    q_lora: bool | None = field(default=None, metadata={"help": "LoRA on a GPTQ Int4 base (implied by an Int4 dir)"})
    # (a help text each, so that --help shows their defaults)
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (the update is scaled by "
                                                          "alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["c_attn", "c_proj", "w1", "w2"],
        metadata={"help": "Linears that get adapters: c_attn, c_proj (attn.c_proj and mlp.c_proj), attn.c_proj, "
                          "mlp.c_proj, w1, w2, lm_head"})
    lora_weight_path: str | None = field(default=None, metadata={"help": "Start from this adapter's weights"})
    lora_bias: str = field(default="none", metadata={"help": "none, all or lora_only (as PEFT)"})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA: scale by alpha / sqrt(r)"})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Also train these in full; LoRA on a base (non-chat) model trains wte "
                                         "lm_head unless given, as the official recipe does; none: none"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    # -m -d -o as the training scripts, chat, eval and serve take them
    output_dir: str | None = field(default=None, metadata={"help": "Where the adapter (or model), its checkpoints "
                                                                   "and run_info.json go", "aliases": ["-o"]})
    cache_dir: str | None = field(default=None, metadata={"help": "Where a hub id given as -m is downloaded (the "
                                                                  "Hugging Face cache's dir; default: its own)"})
    optim: str = field(
        default="auto", metadata={"help": "auto: adamw_torch_fused on a CUDA GPU without --deepspeed (one kernel "
                                          "for the whole update), adamw_torch otherwise; or any transformers "
                                          "optimizer name"})
    deepspeed: dict | str | None = field(
        default=None, metadata={"help": "A DeepSpeed config: the path of a JSON file, or the name of one the "
                                        "package ships (zero2: ZeRO-2, zero3: ZeRO-3, zero2_offload, zero3_offload; "
                                        "ds_configs/ in the checkout), read where no file of that name is in the "
                                        "current dir; the training scripts use zero2 (zero3 for full fine-tuning) "
                                        "on several GPUs without it"})
    resume: bool = field(
        default=False, metadata={"help": "Continue an unfinished run from the last complete checkpoint in "
                                         "--output_dir (a finished run is not continued: start a new run from "
                                         "its adapter with --lora_weight_path)"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in --output_dir: the previous run's checkpoints are removed; "
                                         "files that are not this project's are never removed"})
    cuda_graphs: bool | None = field(
        default=None,
        metadata={"help": "Replay each training step as CUDA graphs (packed rows padded to --model_max_length so "
                          "every step has one shape, unpacked ones to a multiple of 128). Default (unset): on for "
                          "one GPU, alone or under DeepSpeed ZeRO-1/2, unless FINETUNE_CUDA_GRAPHS=0; off for "
                          "several processes, where graphs have not yet run on GPUs (True turns them on there "
                          "too); False: every step eager"})
    gradient_checkpointing_keep_gib: float | None = field(
        default=None,
        metadata={"help": "With --gradient_checkpointing: GPU memory (GiB) to spend keeping the MLP's w1/w2 outputs "
                          "of the last blocks instead of recomputing them in the backward pass (14B model, 2048 "
                          "tokens a micro-batch: ~150 MB and ~0.9 ms a block on an H200); 0 recomputes every "
                          "block. Default (unset): 1 plus what the compact input embedding frees for training "
                          "(the rows of tokens the data never uses), so the kept blocks spend what the table gave "
                          "back"})
    train_sampling_strategy: str = field(
        default="auto",
        metadata={"help": "Order of the training rows. auto: random with --packing; with --packing False "
                          "group_by_length, so that a batch holds chats of similar length and pads little "
                          "(transformers' LengthGroupedSampler: random groups of 50 batches, sorted within each); "
                          "or random (the official order), sequential, group_by_length, batch_rebalance as in "
                          "transformers",
                  "choices": ["auto", "random", "sequential", "group_by_length", "batch_rebalance"]})
    on_nonfinite_loss: str = field(
        default="stop", metadata={"help": "stop: end with an error naming the step; skip: do not apply that "
                                          "optimizer step, count it (log and run_info.json); not with --deepspeed"})


    def __post_init__(self):
        # unset, the run goes where the scripts put it, output/qwen-<mode> (preflight knows the mode), not into
        # transformers' ./trainer_output
        self.output_dir_unset = self.output_dir is None
        # `--deepspeed zero2`: the package's config, read by transformers below as a path
        self.deepspeed = shipped_deepspeed(self.deepspeed)
        if self.optim == "auto":
            self.optim = default_optimizer(self.use_cpu, self.deepspeed)
        check_optimizer_name(self.optim)
        for name in ("logging_steps", "save_steps", "eval_steps"):  # transformers' int(inf): an OverflowError
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise TrainConfigError(f"--{name} must be a whole number of steps, or a fraction of the run's steps "
                                       f"in (0, 1), got {value}")
        eval_strategy = str(getattr(self.eval_strategy, "value", self.eval_strategy))
        if self.eval_steps == 0 and eval_strategy == "steps":
            # transformers reads 0 as unset and evaluates every --logging_steps instead (checks.check_numbers sees
            # only that value)
            raise TrainConfigError(f"--eval_steps must be a whole number of steps, or a fraction of the run's steps "
                                   f"in (0, 1), got {self.eval_steps} (with --eval_strategy steps; leave it out to "
                                   "evaluate every --logging_steps)")
        if self.eval_steps is not None and eval_strategy in ("no", "epoch"):
            # (transformers reads --eval_steps only under --eval_strategy steps: the eval set was evaluated only at
            # the end, or every epoch, with nothing said)
            raise TrainConfigError(f"--eval_steps {self.eval_steps:g} applies only with --eval_strategy steps, and it "
                                   f"is {eval_strategy}{' (the default)' if eval_strategy == 'no' else ''}: add "
                                   "--eval_strategy steps, or leave --eval_steps out")
        for name in _DICT_FLAGS:  # transformers' json.loads error or open() of a missing file named no flag
            if hasattr(self, name):
                setattr(self, name, _dict_flag(name, getattr(self, name)))
        own_accelerator_config = self.accelerator_config is not None
        if (self.bf16 or self.bf16_full_eval) and not self.use_cpu and no_bf16_device():
            # transformers' own words ("Your setup doesn't support bf16/gpu. You need to assign use_cpu ...") named
            # neither the flag nor what the CPU does without it
            flag = "--bf16" if self.bf16 else "--bf16_full_eval"
            raise TrainConfigError(f"{flag} needs a CUDA GPU with bf16, and this machine has none: add --use_cpu True "
                                   f"to run in bf16 on the CPU (the training scripts add it there), or drop {flag} "
                                   "to run in fp32")
        super().__post_init__()
        if not own_accelerator_config and copies_to_a_gpu(self.use_cpu):
            # batches go to the GPU from pinned memory without waiting: a blocking copy synchronizes the stream,
            # so fetching each micro-batch would wait for every step already queued (accelerate's default). Not
            # on the CPU: nothing to overlap, and transformers would print a notice about unpinned memory.
            self.accelerator_config.non_blocking = True
        if self.dataloader_pin_memory and not pins_for_an_accelerator():
            # pinned memory only speeds copies to an accelerator; with none (a CPU-only machine, without
            # --use_cpu, as `qwen-ft train` runs there) torch's DataLoader would print a UserWarning about it
            # at the first step. --use_cpu turns it off the same way in transformers.
            self.dataloader_pin_memory = False


# The mapping flags transformers parses from a JSON object on the command line (accelerator_config also takes
# the path of a JSON file; --deepspeed has its own checks, checks.deepspeed_config)
_DICT_FLAGS = ("lr_scheduler_kwargs", "activation_checkpointing_kwargs", "gradient_checkpointing_kwargs",
               "accelerator_config")


def _dict_flag(name: str, value):
    """A mapping flag's value as transformers will read it (a dict, or accelerator_config's file path), or one
    line naming the flag."""
    if isinstance(value, dict):  # (from a config file)
        _accelerator_keys(name, value)
    if value is None or isinstance(value, dict) or dataclasses.is_dataclass(value):
        return value
    flag = f"--{name}" + (" (--gradient_checkpointing_kwargs)" if name == "activation_checkpointing_kwargs" else "")
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            loaded = json.loads(value)
        except json.JSONDecodeError as e:
            raise TrainConfigError(f"{flag}: invalid JSON at column {e.colno}: {json_reason(e)}") from None
        if isinstance(loaded, dict):
            _accelerator_keys(name, loaded)
            return value  # transformers parses it again (and converts its string values)
    elif isinstance(value, str) and name == "accelerator_config":
        if not Path(value).is_file():
            raise TrainConfigError(f"{flag} {value}: no such file (a JSON file, or a JSON object such as "
                                   "'{\"even_batches\": false}')")
        try:
            loaded = load_json(Path(value).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise TrainConfigError(f"{flag} {value}: not a JSON object ({' '.join(str(e).split())})") from None
        if not isinstance(loaded, dict):
            raise TrainConfigError(f"{flag} {value}: not a JSON object")
        _accelerator_keys(name, loaded, f" {value}")
        return value
    raise TrainConfigError(f"{flag}: {value!r} is not a JSON object (e.g. '{{\"min_lr\": 1e-6}}' for "
                           "--lr_scheduler_kwargs)" if name == "lr_scheduler_kwargs" else
                           f"{flag}: {value!r} is not a JSON object")


def _accelerator_keys(name: str, values: dict, where: str = "") -> None:
    # transformers builds AcceleratorConfig(**values): a TypeError for a name it does not take
    if name != "accelerator_config":
        return
    from transformers.trainer_pt_utils import AcceleratorConfig

    known = {f.name for f in dataclasses.fields(AcceleratorConfig)}
    if unknown := sorted(k for k in values if k not in known):
        raise TrainConfigError(f"--accelerator_config{where}: not accelerate's settings: {', '.join(unknown)} (its "
                               f"names: {', '.join(sorted(known))})")


def check_optimizer_name(optim) -> None:
    """--optim names one of transformers' optimizers: its own error named neither the flag nor the nearest name."""
    import difflib

    from transformers.training_args import OptimizerNames

    names = [o.value for o in OptimizerNames]
    if str(getattr(optim, "value", optim)) in names:
        return
    near = ([n for n in names if n.startswith(str(optim))] if optim else []) or difflib.get_close_matches(
        str(optim), names, n=1)
    raise TrainConfigError(f"--optim {optim!r} is not an optimizer transformers knows"
                           + (f" (did you mean {near[0]}?)" if near else "")
                           + "; auto (the default) picks adamw_torch_fused or adamw_torch; the names: "
                           + ", ".join(names))


def resolve_sampling(data_args: DataArguments, args: TrainingArguments) -> None:
    """--train_sampling_strategy auto: random for packed rows (all about one length), group_by_length for one chat
    a row (padded to the longest in the batch: chats of like length waste little)."""
    if args.train_sampling_strategy == "auto":
        args.train_sampling_strategy = "random" if data_args.packing else "group_by_length"


def copies_to_a_gpu(use_cpu: bool, cuda: bool | None = None) -> bool:
    """Whether training batches are copied to a CUDA GPU (then without waiting)."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    return cuda and not use_cpu


def no_bf16_device() -> bool:
    """Where transformers refuses --bf16 without --use_cpu: no CUDA device at all (an old GPU keeps its message,
    which says what it needs)."""
    import torch
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return not torch.cuda.is_available() and not is_torch_bf16_gpu_available() and not is_torch_xla_available()


def pins_for_an_accelerator() -> bool:
    """Whether --dataloader_pin_memory can do anything: torch's DataLoader pins for the current accelerator and
    warns where there is none."""
    import torch

    return torch.accelerator.is_available()


def default_optimizer(use_cpu: bool, deepspeed, cuda: bool | None = None) -> str:
    """--optim auto. Fused AdamW (torch's: one kernel for every parameter; it also skips a step flagged by the
    non-finite guard on the GPU, training/nonfinite.py) where a CUDA GPU trains without DeepSpeed. Under
    DeepSpeed its ZeRO optimizer steps one flat partition per group, so the plain AdamW costs the same there; a
    config with its own optimizer block replaces it anyway. On the CPU: adamw_torch, as before."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "adamw_torch_fused" if cuda and not use_cpu and not deepspeed else "adamw_torch"


# Names transformers 5 renamed, as the official scripts (and configs written for them) spell them: translated
# here, so they run as they are without transformers' deprecation warnings; only where the installed
# transformers has the new name (activation_checkpointing came after 5.17, the oldest version supported).
_RENAMED = {old: new for old, new in {
    "evaluation_strategy": "eval_strategy",
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}.items() if new in {f.name for f in dataclasses.fields(transformers.TrainingArguments)}}
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# Path flags whose leading ~ is the home dir: the shell expands it only in a word of its own, not in
# --output_dir=~/x or a config file's value (which made a dir named "~" in the working dir).
PATH_FLAGS = ("model_name_or_path", "data_path", "eval_data_path", "output_dir", "lora_weight_path", "deepspeed",
              "resume_from_checkpoint", "logging_dir", "cache_dir")


def _expand_home(argv: list[str]) -> list[str]:
    def is_path_flag(flag: str) -> bool:
        return flag in ("-m", "-d", "-o") or flag.startswith("--") and flag[2:].replace("-", "_") in PATH_FLAGS

    out = []
    for i, a in enumerate(argv):
        name, eq, val = a.partition("=")
        if eq and is_path_flag(name):
            a = f"{name}={home(val)}"
        elif i and is_path_flag(argv[i - 1]):
            a = home(a)  # a quoted "~/x"
        out.append(a)
    return out


def _warmup_ratio(v) -> str:
    # transformers 5 reads a warmup_steps value below 1 as a ratio of the total steps.
    try:
        ratio = float(v)
    except (TypeError, ValueError):
        raise TrainConfigError(f"--warmup_ratio: {v!r} is not a number") from None
    if not 0 <= ratio < 1:
        raise TrainConfigError(f"--warmup_ratio must be in [0, 1) (it is a fraction of the steps), got {v}")
    return str(v)


BOTH_WARMUPS = ("both given: give one (transformers 4 let --warmup_steps win, whatever the order; as one flag of "
                "transformers 5 the last would win)")


def _underscored(flag: str) -> str:
    """--warmup-ratio as --warmup_ratio: the parser takes either spelling of its flags, so these names too."""
    return "--" + flag[2:].replace("-", "_") if flag.startswith("--") else flag


def _translate_legacy(argv: list[str]) -> list[str]:
    names = {_underscored(a.partition("=")[0]) for a in argv}
    if {"--warmup_ratio", "--warmup_steps"} <= names:
        raise TrainConfigError(f"--warmup_ratio and --warmup_steps {BOTH_WARMUPS}")
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        name, eq, val = a.partition("=")
        key = _underscored(name)
        if key.startswith("--") and key[2:] in _RENAMED:
            out.append("--" + _RENAMED[key[2:]] + (eq + val if eq else ""))
        elif key == "--warmup_ratio":
            v = val if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if not eq:
                i += 1
            out += ["--warmup_steps", _warmup_ratio(v)]
        else:
            out.append(a)
        i += 1
    return out


def _config_values(path: str, parser: HfArgumentParser) -> dict:
    """The trainer flags in a YAML or JSON file, as a dict, with legacy names translated; one clear error for a
    file that cannot be read or holds names that are not flags."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise TrainConfigError(f"config file {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8-sig")  # (a BOM, as Windows editors write, is fine)
    except UnicodeDecodeError as e:
        raise TrainConfigError(f"config file {path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise TrainConfigError(f"config file {path}: holds no flags (it is empty)")
    if p.suffix == ".json":
        try:
            values = load_json(text)
        except json.JSONDecodeError as e:
            raise TrainConfigError(f"config file {path}: invalid JSON at line {e.lineno} column {e.colno}: "
                                   f"{json_reason(e)}") \
                from None
        except DuplicateKeyError as e:  # json keeps the last silently
            raise TrainConfigError(f"config file {path}: {e}") from None
    else:
        try:
            values = yaml.load(text, Loader=_UniqueKeyLoader)
        except DuplicateKeyError as e:  # PyYAML keeps the last silently
            raise TrainConfigError(f"config file {path}: {e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
            raise TrainConfigError(f"config file {path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if values is None:  # (it was "--model_name_or_path is required": the flags the user meant to give are not there)
        raise TrainConfigError(f"config file {path}: holds no flags (it is empty, or all comments)")
    if not isinstance(values, dict):
        # (a JSON array of chat records given for data: `qwen-ft train data.json` read it as flags)
        data = isinstance(values, list) and values and all(isinstance(v, dict) for v in values)
        raise TrainConfigError(f"config file {path}: must map flag names to values, got a {type(values).__name__}"
                               + (f" of records (chat data goes with -d: -d {path})" if data else ""))
    known = {a.dest for a in parser._actions}
    for k in list(values):  # max-steps, as the command line takes --max-steps for --max_steps
        if isinstance(k, str) and "-" in k and k not in known and (dest := k.replace("-", "_")) in known:
            if dest in values:
                raise TrainConfigError(f"config file {path}: {k} and {dest} are the same flag; give it once")
            values[dest] = values.pop(k)
    values = {_RENAMED.get(k, k): (home(v) if k in PATH_FLAGS else v) for k, v in values.items()}
    for key in ("data_path", "eval_data_path"):  # a YAML list of files: the comma-separated list it stands for
        items = values.get(key)
        if not isinstance(items, list):
            continue
        if not items:
            raise TrainConfigError(f"config file {path}: {key}: an empty list")
        for v in items:
            if not isinstance(v, str) or not v.strip():
                raise TrainConfigError(f"config file {path}: {key}: {v!r} is not a path")
            if "," in v:  # (joined, it would read as two)
                raise TrainConfigError(f"config file {path}: {key}: {v!r} holds a comma; name that file alone")
        values[key] = ",".join(home(v.strip()) for v in items)
    if "warmup_ratio" in values:
        if "warmup_steps" in values:
            raise TrainConfigError(f"config file {path}: warmup_ratio and warmup_steps {BOTH_WARMUPS}")
        values["warmup_steps"] = float(_warmup_ratio(values.pop("warmup_ratio")))
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        record = {"conversations", "messages", "instruction"} & set(unknown)  # (one chat record given for data)
        foreign = [f"{k}: {FOREIGN_FLAGS[f'--{k}']}" for k in unknown if f"--{k}" in FOREIGN_FLAGS]
        raise TrainConfigError(f"config file {path}: not trainer flags: {', '.join(map(str, unknown))} "
                               + (f"(a chat record: data goes with -d: -d {path})" if record else
                                  f"({'; '.join(foreign)})" if foreign else
                                  "(names as on the command line, without the leading --)"))
    # a value of the wrong type named with its file (argparse would name only the flag, after its usage text)
    # (a switch that defaults to True also has a --no_X action of the same dest, without X's type: not that one)
    actions = {a.dest: a for a in parser._actions if not isinstance(a, argparse._StoreFalseAction)}
    containers = _container_fields()
    for key, value in list(values.items()):
        if actions[key].nargs in ("+", "*"):
            if isinstance(value, str):  # `lora_target_modules: c_attn` is the one name, not its letters
                values[key] = value = [value]
            if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
                raise TrainConfigError(f"config file {path}: {key}: {value!r} is not a list of names")
            continue
        convert = actions[key].type
        choices = actions[key].choices
        names = None if choices is None else [str(getattr(c, "value", c)) for c in choices]  # (enums by value)
        if value is False and names is not None and "no" in names:
            # YAML reads a bare no (or off) as false: `save_strategy: no` is the command line's --save_strategy no
            values[key] = value = "no"
        if names is not None and not (value is None and actions[key].default is None) and (
                not isinstance(value, str) or value not in names):
            # (transformers' "None is not a valid SaveStrategy" named neither the key nor the file)
            raise TrainConfigError(f"config file {path}: {key}: {value!r} is not one of {', '.join(names)}")
        if key in containers and isinstance(value, (bool, int, float)):  # (deepspeed: 5 was a TypeError)
            raise TrainConfigError(f"config file {path}: {key}: {value!r} is not "
                                   + ("a path or a mapping" if key in PATH_FLAGS or key in _DICT_FLAGS
                                      else "a name or a list of names"))
        if convert is string_to_bool and not isinstance(value, (bool, str)):
            # YAML's 1 and 0 read as the command line reads them; 2 or null is no switch value (`resume: 2` was kept
            # as 2, `packing: null` as None)
            if value in (0, 1) and not isinstance(value, float):
                values[key] = bool(value)
            elif not (value is None and actions[key].default is None):
                raise TrainConfigError(f"config file {path}: {key}: {value!r} is not true or false")
            continue
        if convert is str and isinstance(value, (bool, int, float)):
            if key == "resume_from_checkpoint" and isinstance(value, bool):
                values[key] = str(value).lower()  # `resume_from_checkpoint: true` as --resume_from_checkpoint true
            elif isinstance(value, bool):
                raise TrainConfigError(f"config file {path}: {key}: {value!r} is not "
                                       + ("a path" if key in PATH_FLAGS else "a name or a text"))
            else:
                values[key] = str(value)  # `output_dir: 2024` is the dir --output_dir 2024 names
            continue
        if callable(convert) and isinstance(value, str) and actions[key].nargs in (None, "?"):
            try:
                convert(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                raise TrainConfigError(f"config file {path}: {key}: {value!r} is not a valid value "
                                       f"({' '.join(str(e).split()) or type(e).__name__})") from None
        elif convert in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
            raise TrainConfigError(f"config file {path}: {key}: {value!r} is not a number")
        elif convert is int and isinstance(value, float):
            raise TrainConfigError(f"config file {path}: {key}: {value!r} is not a whole number")
        elif isinstance(value, (list, dict)) and key not in containers:  # (a path given as a list: a TypeError later)
            raise TrainConfigError(f"config file {path}: {key}: {value!r} is not a single value")
    return values


def _yaml_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """yaml.safe_load's loader, refusing a key given twice in one mapping (DuplicateKeyError, naming its line)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise DuplicateKeyError(f"{key!r} is given twice (again at line {key_node.start_mark.line + 1})")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


_UniqueKeyLoader = _yaml_loader()


def _container_fields() -> set[str]:
    """The flags whose value may be a list or a mapping in a config file (report_to, deepspeed, ...)."""
    import typing

    out = set()
    for cls in (ModelArguments, DataArguments, LoraArguments, TrainingArguments):
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # an annotation this Python cannot resolve: leave that class's values to argparse
            out.update(f.name for f in dataclasses.fields(cls))
            continue
        for name, hint in hints.items():
            kinds = typing.get_args(hint) or (hint,)
            if any(k in (list, dict) or typing.get_origin(k) in (list, dict) for k in kinds):
                out.add(name)
    return out


# --help's head: the prog as the user types it (argparse took the file's name, "cli.py" or "train.py"), and the
# config file argparse does not know about (argv[0] is read before argparse sees it) instead of a 100-line list
# of every flag, which the options below give with their help
TRAIN_USAGE = "qwen-ft train [CONFIG] [-m MODEL] [-d DATA] [-o OUTPUT] [--FLAG VALUE ...]"
TRAIN_DESCRIPTION = ("Fine-tune a Qwen v1 model: LoRA (--use_lora), Q-LoRA (an Int4 model dir) or full. CONFIG, "
                     "first if given: a YAML or JSON file of the flags below (names without --); flags after it "
                     "override its values. Without -o the run goes to output/qwen-<mode>. The official Qwen "
                     "finetune.py command lines run as they are: --evaluation_strategy is --eval_strategy, "
                     "--warmup_ratio R is --warmup_steps R (below 1: a fraction of the steps), and --deepspeed "
                     "finetune/ds_config_zero2.json (zero3) names ds_configs/zero2.json (zero3.json).")


def build_parser() -> "_Parser":
    """The trainer's parser: transformers' flags for the four argument classes, as this project reads them."""
    parser = _Parser((ModelArguments, DataArguments, LoraArguments, TrainingArguments), prog="qwen-ft train",
                     usage=TRAIN_USAGE, description=TRAIN_DESCRIPTION, allow_abbrev=False)
    for action in parser._actions:
        if action.dest in ("cuda_graphs", "use_lora", "q_lora"):  # unset by default (None); a bare flag is True
            action.nargs, action.const = "?", True
        if action.nargs in ("+", "*") and type(action) is argparse._StoreAction:
            action.__class__ = _ListFlagOnce  # a list flag takes its names once (see there)
        if action.dest in ONE_PATH_FLAGS and type(action) is argparse._StoreAction:
            action.__class__ = _PathFlagOnce
        if action.dest == "disable_tqdm":  # (transformers' help: "Defaults to True if log_level is warning or lower")
            # unset unless given (SUPPRESS: no "(default: None)" either), so that the default can follow stderr below
            action.help, action.default = ("Hide the progress bars (training's, tokenizing's, packing's) (default: "
                                           "shown where stderr is a terminal, hidden where it is a file or a pipe)",
                                           argparse.SUPPRESS)
        if isinstance(action, argparse._StoreFalseAction):
            # HfArgumentParser's --no_X for a switch that defaults to True copied X's help with "(default: False)"
            # after it ("--no_packing ... (default: False)"); the switch's own default is what applies
            action.help, action.default = f"The same as --{action.dest} False", argparse.SUPPRESS
    return parser


def parse_args(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, LoraArguments, TrainingArguments) from argv.

    argv may start with a YAML or JSON file of flags (`qwen-ft train cfg.yaml`); flags after it override its
    values (the training scripts pass their launch flags and -m/-d/-o that way)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES):
        # as defaults: what follows on the command line wins, and string values are converted as flags are
        parser.set_defaults(**_config_values(argv[0], parser))
        argv = argv[1:]
    argv = _expand_home(_translate_legacy(argv))
    # TrainingArguments reads the --deepspeed file, and needs DeepSpeed, as it is built: check both first, for one
    # line naming the problem
    known = parser.parse_known_args(argv)[0]
    ds = known.deepspeed
    if (own := official_deepspeed_config(ds)) is not None:
        # an official Qwen command line's finetune/ds_config_zero2.json: the project's config of the same ZeRO
        # settings (the last --deepspeed wins, over a CONFIG's too); said once for a multi-process launch
        if os.environ.get("RANK", "0") == "0":
            print(f"note: --deepspeed {ds} is the official Qwen scripts' config, not here: using {own}, its ZeRO "
                  "settings without the optimizer and scheduler blocks that would replace --optim and "
                  "--lr_scheduler_type", file=sys.stderr, flush=True)
        ds = str(own)
        argv = [*argv, "--deepspeed", ds]
    deepspeed_config(ds)
    require_deepspeed(ds)
    *parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        raise TrainConfigError(_not_flags(rest, parser))
    if known.disable_tqdm is None and not is_terminal(sys.stderr):
        # progress bars (the trainer's, tokenizing's, packing's) on a terminal only: in a log file or a pipe each
        # redraw was a line of its own; --disable_tqdm False (or a config file's disable_tqdm) still shows them
        parsed[-1].disable_tqdm = True
    return tuple(parsed)


class _Parser(HfArgumentParser):
    """argparse's errors (a bad value, an ambiguous abbreviation) as one line, not its 100-line usage text."""

    def error(self, message):
        raise TrainConfigError(" ".join(message.split()))

    def parse_known_args(self, args=None, namespace=None):
        self.lists_given = {}  # _ListFlagOnce, _PathFlagOnce: the flags this parse has met, with their values
        parsed, rest = super().parse_known_args(args, namespace)
        if not hasattr(parsed, "disable_tqdm"):  # (its default is SUPPRESS, for --help: None, unset, is meant)
            parsed.disable_tqdm = None
        return parsed, rest


class _ListFlagOnce(argparse._StoreAction):
    """A flag that takes a list (--lora_target_modules c_attn w1), refused when given a second time: argparse kept
    the last list, so `--lora_target_modules c_attn --lora_target_modules w1` trained adapters on w1 alone."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(parser, "lists_given", {})
        if self.dest in given:
            flag = self.option_strings[0]
            parser.error(f"{flag} is given twice ({' '.join(map(str, given[self.dest]))}, then "
                         f"{' '.join(map(str, values))}): give all its names after one {flag}, e.g. {flag} "
                         f"{' '.join(map(str, [*given[self.dest], *values]))}")
        given[self.dest] = values
        super().__call__(parser, namespace, values, option_string)


# Where the last of two different values would be lost unsaid: `-d a.json -d b.json` trained on b.json alone, and
# `-o a -o b` wrote to b (other flags given twice keep argparse's rule, the last wins: scripts override their recipe)
ONE_PATH_FLAGS = ("model_name_or_path", "data_path", "eval_data_path", "output_dir", "lora_weight_path")


class _PathFlagOnce(argparse._StoreAction):
    """A path flag given twice with different values is refused (the same value twice is one path)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(parser, "lists_given", {})
        # (an empty value is refused as such, later: an unset shell variable)
        if self.dest in given and not _same_paths(given[self.dest], values) and given[self.dest].strip() \
                and values.strip():
            flag = next(o for o in self.option_strings if o.startswith("--"))
            hint = (": several data files are one comma-separated list, a quoted glob or a directory"
                    if self.dest.endswith("data_path") else ": pass it once")
            parser.error(f"{flag} is given twice ({given[self.dest]}, then {values}){hint}")
        given[self.dest] = values
        super().__call__(parser, namespace, values, option_string)


def _same_paths(a: str, b: str) -> bool:
    """Two values of a path flag that name the same paths as written (`a`, `./a`, `a/`; each of a comma-separated
    list), the links and the files themselves not looked at."""
    def norm(value: str) -> list[str]:
        return [os.path.normpath(p.strip()) for p in value.split(",")]

    return norm(a) == norm(b)


# Set by scripts/_launch.sh to the script as it was run: its flags other than its own reach the trainer.
SCRIPT_ENV = "QWEN_FT_SCRIPT"


def _help_hint() -> str:
    """Where the trainer's flags are listed, named for the command the user ran: `qwen-ft train` (the
    console script, or python -m finetune.cli), `python -m finetune.train`, or a training script (which
    passes the flags it does not take itself on to the trainer)."""
    script = os.environ.get(SCRIPT_ENV)
    if script:
        return (f"the trainer's flags, which {script} passes on: qwen-ft train --help (the script's own: "
                f"bash {script} --help)")
    argv0 = Path(sys.argv[0] if sys.argv else "")
    if argv0.parts[-2:] == ("finetune", "train.py"):
        return "python -m finetune.train --help lists them"
    return "qwen-ft train --help lists them"


# Flags of the official Qwen family's fine-tuning scripts that mean nothing here, with why (the nearest name of
# this trainer's would be a wrong guess)
FOREIGN_FLAGS = {
    "--fix_vit": "Qwen-VL's finetune.py flag, which freezes the vision tower; the models trained here are Qwen text "
                 "models, with none: drop it",
}


def _not_flags(rest: list[str], parser) -> str:
    """What the parser left over, as one line: each unknown flag with the nearest known one, or the values no
    flag took (a path with spaces, unquoted)."""
    # a single-dash word is a flag too (-O for -o, -lora_r): it was "value without a flag: '-O' (the flag before
    # takes one value ...)", with no flag before it; a negative number stays a value
    unknown = [r.partition("=")[0] for r in rest if r.startswith("--") or (len(r) > 1 and r[0] == "-"
                                                                            and not _is_number(r))]
    if unknown:
        parts = []
        for flag in unknown:  # (the nearest flag, another name's, or the command whose flag it is: --query)
            if (why := FOREIGN_FLAGS.get("--" + flag.lstrip("-").replace("-", "_"))) is not None:
                parts.append(f"{flag} ({why})")
                continue
            parts.append(flag + flag_hint(flag, parser))
        return f"unknown flag{'s' * (len(parts) > 1)}: {', '.join(parts)}; {_help_hint()}"
    # (`qwen-ft train data.jsonl` was told "the flag before takes one value": there was none, and data goes with -d)
    # (a data file that exists: the pieces of an unquoted path with spaces are not files)
    data = all(r.lower().endswith((".json", ".jsonl", ".ndjson")) and Path(r).is_file() for r in rest)
    # (`qwen-ft train /models/x`: a model dir goes with -m)
    where = value_hint(rest[0], parser) if len(rest) == 1 and Path(home(rest[0])).is_dir() else ""
    why = (f"chat data goes with -d: -d {rest[0]}" if data else where[2:-1] if where.startswith(" (a") else
           "the flag before takes one value; quote a path that has spaces")
    return f"value{'s' * (len(rest) > 1)} without a flag: {' '.join(map(repr, rest))} ({why})"


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True
