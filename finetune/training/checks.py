"""Everything that can be checked before a model or data set is loaded, with one clear message each."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import CHECKPOINT_DIR, checkpoints
from ..errors import ModelLoadError, json_reason
from ..hub import ModelNotFoundError, dirs_beside, resolve_model_dir
from ..model_dir import chat_format, chat_generation_config, describe
from ..tokenization import VOCAB_FILE
from .memory import fit_problem

logger = logging.getLogger(__name__)

FINISHED_MARKER = "training_finished.json"  # written last: the run in this dir is finished
RUN_ARGS = "run_args.json"  # written when a run takes the dir: the dir holds a run of this project
LOCK_FILE = ".qwen-ft.lock"  # flock'ed by the running process (rank 0) for the whole run
DEMO_MARKER = ".qwen-ft-demo"  # written by the scripts' demo: the only dirs the demo may replace
STAGING = ".staging"  # checkpoints are written here and renamed into place once complete (trainer.py)
CHECKPOINT_RUN = "qwen_run.json"  # in each checkpoint: the run that wrote it (model dir, mode, LoRA shape)
_CHECKSUM_LIMIT = 4 << 30  # bytes: checkpoint files this large are not read whole before a resume
# Every file an exact resume reads, by what it holds; any one name of a group is enough (DeepSpeed keeps the
# optimizer and scheduler in its own global_step*/ dir, named by `latest`; several processes write one RNG
# file each).
_RESUME_NEEDS = {
    "trainer_state.json": ("trainer_state.json",),
    "the weights (adapter_model.safetensors or model.safetensors)": (
        "adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json",
        "pytorch_model.bin", "latest"),
    "optimizer.pt": ("optimizer.pt", "latest"),
    "scheduler.pt": ("scheduler.pt", "latest"),
    "rng_state.pth": ("rng_state.pth", "rng_state_0.pth"),
}


class TrainConfigError(ValueError):
    """A training run that cannot start as configured."""


class DuplicateKeyError(ValueError):
    """A JSON object or YAML mapping gives one key twice (json and PyYAML keep the last, silently)."""


def load_json(text: str):
    """json.loads, refusing a key given twice in one object (DuplicateKeyError, naming it)."""
    def pairs(items):
        seen = {}
        for key, value in items:
            if key in seen:
                raise DuplicateKeyError(f"{key!r} is given twice")
            seen[key] = value
        return seen

    return json.loads(text, object_pairs_hook=pairs)


@dataclass
class TrainPlan:
    model_dir: Path
    mode: str  # "qlora", "lora" or "full"
    quantized: bool
    device: str  # where the model is loaded: "cuda:<local rank>" or "cpu"
    zero_stage: int | None  # DeepSpeed ZeRO stage, None without DeepSpeed
    resume_from: str | None  # checkpoint dir to continue from
    identity: dict = field(default_factory=dict)  # what a checkpoint must match to be resumed (run_identity)
    seq_length: int | None = None  # the model's trained context (config.json)
    # a base model's generation config in ChatML, saved with what it trains (model_dir.chat_generation_config)
    chat_generation: dict | None = None


def run_identity(model_dir, mode: str, lora_args, data_args=None, args=None) -> dict:
    """What a run's checkpoints record and a resume must match: the model, the mode and the adapters' shape; with
    the data and training arguments also what else a resume would silently change or ignore: the adapters'
    scaling and dropout, the rows (--model_max_length, --packing, --train_on_prompt; the data's content is added
    once it is read, DATA_KEY), the batches and the data order (transformers skips the batches already trained
    by count), and the optimizer's settings (the optimizer state a resume loads keeps the old ones). Not
    --max_steps or --num_train_epochs: continuing past the old end is what a resume from a checkpoint is for."""
    lora = mode != "full"
    identity = {"model_dir": str(Path(model_dir).resolve()), "mode": mode,
                "lora_r": lora_args.lora_r if lora else None,
                "lora_target_modules": sorted(lora_args.lora_target_modules) if lora else None}
    if lora:
        identity.update(lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
                        use_rslora=lora_args.use_rslora, lora_bias=lora_args.lora_bias,
                        modules_to_save=sorted(lora_args.modules_to_save or []))
    if data_args is not None:
        identity.update(model_max_length=data_args.model_max_length, packing=data_args.packing,
                        train_on_prompt=data_args.train_on_prompt)
    if args is not None:
        sampling = str(getattr(args.train_sampling_strategy, "value", args.train_sampling_strategy))
        if sampling == "auto" and data_args is not None:  # as arguments.resolve_sampling resolves it
            sampling = "random" if data_args.packing else "group_by_length"
        identity.update(
            per_device_train_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps, processes=args.world_size,
            seed=args.seed, data_seed=args.data_seed,
            train_sampling_strategy=sampling,
            optim=str(getattr(args.optim, "value", args.optim)), learning_rate=args.learning_rate,
            weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
            adam_epsilon=args.adam_epsilon,
            # the schedule: a resume restores the old scheduler's state, so another one ran spliced onto it
            lr_scheduler_type=str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            warmup_steps=args.warmup_steps, lr_scheduler_kwargs=dict(args.lr_scheduler_kwargs or {}))
    return identity


DATA_KEY = "data"  # identity: a hash of the training data's content (train.py adds it once the data is read)
# How a difference is named: the flag, or what it is.
_IDENTITY_NAMES = {"model_dir": "model", "mode": "mode", "processes": "processes",
                   DATA_KEY: "the training data (its content)"}
# Differences a new run from the checkpoint's adapter (--lora_weight_path) cannot take: another model, or the
# adapter's own config, which --lora_weight_path keeps.
_STRUCTURAL = ("model_dir", "mode", "lora_r", "lora_target_modules", "lora_alpha", "lora_dropout", "use_rslora",
               "lora_bias", "modules_to_save")


def checkpoint_step(ckpt: str | os.PathLike) -> int:
    """The optimizer step a checkpoint was saved at (its trainer_state.json's global_step; ``checkpoint_problem``
    has found it readable)."""
    return json.loads((Path(ckpt) / "trainer_state.json").read_text())["global_step"]


# a checkpoint that --save_only_model wrote (every file of _TRAINING_STATE missing): its "Restore the file" would send
# the user after files never written
_TRAINING_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
WEIGHTS_ONLY_NOTE = ("the weights alone (as --save_only_model saves them: no optimizer, scheduler or RNG state), "
                     "which cannot resume a run; a new run can start from them")


def start_from(ckpt: Path) -> str:
    """The flags that start a new run from a checkpoint's weights: its adapter, or a full fine-tune's model."""
    adapter = any((ckpt / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin"))
    flag = "--lora_weight_path" if adapter else "--model_name_or_path"
    return f"{flag} {shlex.quote(str(ckpt))} --output_dir NEW_DIR"


def checkpoint_problem(ckpt: str | os.PathLike, identity: dict | None = None) -> str | None:
    """Why `ckpt` cannot be resumed exactly (a missing, truncated or corrupt file, or another run's checkpoint
    when `identity` is given), or None. Reads headers and checksums only, no tensors."""
    ckpt = Path(ckpt)
    if ckpt.is_file():
        return "a file, not a checkpoint dir (checkpoint-N, holding trainer_state.json)"
    if not ckpt.is_dir():
        return "no such checkpoint dir"
    names = set(os.listdir(ckpt))
    if found := checkpoints(ckpt):  # a run dir (it was "incomplete: trainer_state.json is missing")
        return (f"a run dir, not one of its checkpoints; its newest is {found[0]} (--resume_from_checkpoint "
                f"{found[0]}, or --resume True with --output_dir {ckpt} to continue that run in place)")
    missing = [what for what, options in _RESUME_NEEDS.items() if not names.intersection(options) and not (
        what == "optimizer.pt" and any(n.endswith("-optimizer.pt") for n in names))]
    if set(missing) == _TRAINING_STATE:
        return WEIGHTS_ONLY_NOTE
    if missing:
        return f"incomplete: {missing[0]} is missing"
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            return "trainer_state.json: corrupt (no global_step)"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"trainer_state.json: corrupt or truncated ({e})"
    if problem := _trainer_state_problem(state, ckpt.name):
        return f"trainer_state.json: {problem}"
    for name in sorted(names):
        f = ckpt / name
        if name.endswith(".safetensors"):
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(f), "pt"):
                    pass
            except (SafetensorError, OSError) as e:  # truncated, bad header
                return f"{name}: corrupt or truncated ({e})"
        elif name.endswith((".pt", ".pth", ".bin")):  # torch.save's zip format
            try:
                with zipfile.ZipFile(f) as z:  # a truncated file has lost its central directory
                    # the checksums of every entry: seconds for LoRA's optimizer state; skipped for full
                    # fine-tuning's (tens of GB), where damage inside the file shows only when torch.load reads it
                    bad = z.testzip() if f.stat().st_size < _CHECKSUM_LIMIT else None
            except (zipfile.BadZipFile, OSError) as e:
                return f"{name}: corrupt or truncated ({e})"
            if bad is not None:
                return f"{name}: corrupt ({bad} fails its checksum)"
        elif name.startswith("dropout_seed") and name.endswith(".json"):
            from .graphs import is_seed_file, read_seed  # torch: only when a checkpoint is resumed

            if is_seed_file(name):
                try:
                    read_seed(f)
                except ValueError as e:
                    return f"{name}: {e}"
        elif name in ("adapter_config.json", CHECKPOINT_RUN):
            try:
                record = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return f"{name}: corrupt or truncated ({e})"
            if not isinstance(record, dict):  # (a list was read as recording nothing: never compared)
                return f"{name}: corrupt (a JSON {type(record).__name__}, not an object)"
    if identity:
        return identity_mismatch(ckpt, identity)
    return None


def _trainer_state_problem(state: dict, name: str) -> str | None:
    """What in a checkpoint's trainer_state.json the Trainer's resume could not use (TrainerState(**state): a
    TypeError for a key it does not know; a TypeError or a wrong step count later for a value of the wrong type)."""
    import dataclasses

    from transformers import TrainerState

    known = {f.name for f in dataclasses.fields(TrainerState)}
    if unknown := sorted(k for k in state if k not in known):
        return f"corrupt (fields the Trainer does not know: {', '.join(map(str, unknown))})"
    step = state["global_step"]
    if isinstance(step, bool) or step < 0:
        return f"corrupt (global_step {step!r})"
    if (m := CHECKPOINT_DIR.match(name)) and int(m.group(1)) != step:
        return f"global_step {step}, but the dir is {name}: edited or copied from another checkpoint"
    number = (int, float)
    for key, kinds in (("epoch", number), ("max_steps", int), ("num_train_epochs", number),
                       ("log_history", list), ("stateful_callbacks", dict), ("best_model_checkpoint", str),
                       ("train_batch_size", int), ("logging_steps", number), ("save_steps", number),
                       ("eval_steps", number)):
        value = state.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            return f"corrupt ({key} {json.dumps(value)[:40]})"
    if not all(isinstance(entry, dict) for entry in state.get("log_history") or []):
        return "corrupt (log_history holds entries that are not objects)"
    return None


def identity_mismatch(ckpt: Path, identity: dict) -> str | None:
    recorded = None
    if (ckpt / CHECKPOINT_RUN).is_file():
        recorded = json.loads((ckpt / CHECKPOINT_RUN).read_text())
    elif (ckpt / "adapter_config.json").is_file():  # written before checkpoints recorded their run
        cfg = json.loads((ckpt / "adapter_config.json").read_text())
        targets = cfg.get("target_modules")
        recorded = {"lora_r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
                    "lora_target_modules": sorted(targets) if isinstance(targets, list) else targets}
    if not recorded:
        return None
    # (keys one side lacks are not compared: checkpoints written before a key was recorded)
    differ = [k for k in identity if k in recorded and recorded[k] != identity[k]]
    if not differ:
        return None
    diffs = "; ".join(f"{_IDENTITY_NAMES.get(k, '--' + k)} {_show(recorded[k])} there, {_show(identity[k])} now"
                      for k in differ if k != DATA_KEY)
    if DATA_KEY in differ:
        diffs += ("; " if diffs else "") + "the training data's content differs"
    seed = ("" if identity.get("mode") == "full" or any(k in _STRUCTURAL for k in differ)
            else f"; its adapter can start a new run with these settings ({start_from(ckpt)})")
    return (f"written by a different run ({diffs}): a resume continues that run as it was (its model, adapters, "
            f"rows, batches, data order and optimizer){seed}")


def _show(v) -> str:
    return (" ".join(map(str, v)) or "none") if isinstance(v, list) else str(v)


def last_complete_checkpoint(output_dir: str | os.PathLike, identity: dict | None = None) -> str | None:
    """The highest checkpoint-N in output_dir that an exact resume can use, or None.

    Checkpoints are written to a staging dir and renamed into place, so a killed save never appears under
    this name; the file checks also cover checkpoints damaged or pruned afterwards, or written by other tools.
    """
    for p in checkpoints(output_dir):
        if checkpoint_problem(p, identity) is None:
            return str(p)
    return None


def is_project_run(output_dir: str | os.PathLike) -> bool:
    """Whether output_dir holds a run of this project (or the demo's output), as opposed to other files."""
    d = Path(output_dir)
    if (d / FINISHED_MARKER).is_file() or (d / DEMO_MARKER).is_file():
        return True
    try:
        record = json.loads((d / RUN_ARGS).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "model_dir" in record and "mode" in record


# The names a run writes at the top of its output dir (a foreign file under one of them would be replaced).
RUN_OUTPUTS = ("README.md", "run_info.json", RUN_ARGS, FINISHED_MARKER, "trainer_state.json", "train.log",
               "loss_curve.png", "adapter_config.json", "adapter_model.safetensors", "config.json",
               "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "qwen.tiktoken", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def foreign_files(output_dir: str | os.PathLike) -> list[str]:
    """What output_dir holds besides the run lock (for a dir that is not a run of this project)."""
    d = Path(output_dir)
    return sorted(p.name for p in d.iterdir() if p.name != LOCK_FILE) if d.is_dir() else []


# The DeepSpeed configs the package ships (ds_configs/ in a checkout links here): `--deepspeed zero2` names one
# from any dir, also where the package is installed from a wheel, without the checkout's ds_configs/
DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"


def shipped_deepspeed_names() -> list[str]:
    return sorted(p.stem for p in DS_CONFIGS.glob("*.json"))


def shipped_deepspeed(ds):
    """--deepspeed's value as the path to read: a file that exists as given is that file; otherwise a bare name of
    a config the package ships (zero2 or zero2.json, zero2_offload, zero3, zero3_offload) is that config; anything
    else is returned as given (deepspeed_config says what is wrong with it)."""
    if not isinstance(ds, str) or not ds or Path(ds).exists() or "/" in ds or os.sep in ds:
        return ds
    shipped = DS_CONFIGS / (ds if ds.endswith(".json") else f"{ds}.json")
    return str(shipped) if shipped.is_file() else ds


# The --deepspeed files of the official Qwen scripts (finetune/ds_config_zero2.json, finetune/ds_config_zero3.json,
# read from the Qwen repo's root) -> the project's config of the same ZeRO settings, without the optimizer and
# scheduler blocks that would replace the --optim and --lr_scheduler_type asked for
OFFICIAL_DEEPSPEED_NAMES = {"ds_config_zero2.json": "zero2.json", "ds_config_zero3.json": "zero3.json"}


def official_deepspeed_config(ds) -> Path | None:
    """The project's config for a --deepspeed path named as the official scripts name theirs, where no such file
    exists (an official command line run here as it is); None for anything else (a file that exists is read as
    given: the official file itself is refused, naming its scheduler block)."""
    if not isinstance(ds, (str, os.PathLike)) or Path(ds).exists():
        return None
    own = OFFICIAL_DEEPSPEED_NAMES.get(Path(ds).name)
    return DS_CONFIGS / own if own and (DS_CONFIGS / own).is_file() else None


def deepspeed_config(ds) -> dict | None:
    """The --deepspeed value (a path, a shipped config's name or a dict) as a dict, or a clear error."""
    if not ds:
        return None
    where = "--deepspeed (inline)" if isinstance(ds, dict) else f"--deepspeed {ds}"
    if not isinstance(ds, (dict, str, os.PathLike)):
        raise TrainConfigError(f"--deepspeed: {ds!r} is not the path of a config file or a mapping")
    if isinstance(ds, dict):
        cfg = ds
    else:
        p = Path(shipped_deepspeed(ds))
        if p.is_dir():
            raise TrainConfigError(f"{where}: a directory, not a config file (e.g. ds_configs/zero2.json, or by name "
                                   "from anywhere: --deepspeed zero2)")
        if not p.is_file():
            # (a relative path is read from the current dir, which is not always the checkout; installed from a
            # wheel there is no ds_configs/ at all, but the names work anywhere)
            raise TrainConfigError(f"{where}: no such file (the path is read from {os.getcwd()}; the package's own "
                                   f"configs go by name: --deepspeed {', '.join(shipped_deepspeed_names())})")
        try:
            text = p.read_text(encoding="utf-8")
            if text.startswith("\ufeff"):  # transformers' json.load refuses it, after the checks here
                raise TrainConfigError(f"{where}: starts with a UTF-8 BOM, which transformers' reader of the file "
                                       "refuses; save it as UTF-8 without a BOM")
            cfg = load_json(text)
        except json.JSONDecodeError as e:
            raise TrainConfigError(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: "
                                   f"{json_reason(e)}") from None
        except UnicodeDecodeError as e:
            raise TrainConfigError(f"{where}: not UTF-8 text (byte {e.start})") from None
        except DuplicateKeyError as e:
            raise TrainConfigError(f"{where}: {e}") from None
    # the shape transformers' and accelerate's readers assume (else an AttributeError deep inside them)
    if not isinstance(cfg, dict):
        raise TrainConfigError(f"{where}: must be a JSON object, got {type(cfg).__name__}")
    for key in ("zero_optimization", "optimizer", "scheduler", "fp16", "bf16"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise TrainConfigError(f"{where}: '{key}' must be an object, got {cfg[key]!r}")
    if "params" in cfg.get("optimizer", {}) and not isinstance(cfg["optimizer"]["params"], dict):
        raise TrainConfigError(f"{where}: 'optimizer.params' must be an object, got {cfg['optimizer']['params']!r}")
    if "zero_optimization" not in cfg:  # transformers: "Please specify the ZeRO optimization config ...", no file
        raise TrainConfigError(f"{where}: no 'zero_optimization' section: add one with its stage, e.g. "
                               "\"zero_optimization\": {\"stage\": 2} (as the project's --deepspeed zero2 has)")
    stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise TrainConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return cfg


def require_deepspeed(ds) -> None:
    """--deepspeed without DeepSpeed installed (the optional extra): one line now, where transformers raised
    PackageNotFoundError from TrainingArguments (a traceback, under torchrun one per rank)."""
    if ds and not _importable("deepspeed"):
        where = "--deepspeed (inline)" if isinstance(ds, dict) else f"--deepspeed {ds}"
        raise TrainConfigError(f"{where}: DeepSpeed is not installed: pip install -e \".[deepspeed]\" in the "
                               "checkout (or pip install deepspeed)")


def _ds_value(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _conflicts(cfg: dict, pairs) -> list[str]:
    # as transformers compares them (HfTrainerDeepSpeedConfig.fill_match): "auto" and absent values take the flag's
    return [f"{key} is {json.dumps(_ds_value(cfg, key))} there, {flag} {value} here" for key, value, flag in pairs
            if _ds_value(cfg, key) not in (None, "auto") and _ds_value(cfg, key) != value]


def deepspeed_conflicts(cfg: dict, args) -> list[str]:
    """Values a DeepSpeed config sets that differ from the command line's (transformers' ValueError once the
    model had loaded). The precision fields are checked against the precision decided: precision_conflicts."""
    world = max(args.world_size, 1)
    return _conflicts(cfg, [
        ("train_micro_batch_size_per_gpu", args.per_device_train_batch_size, "--per_device_train_batch_size"),
        ("gradient_accumulation_steps", args.gradient_accumulation_steps, "--gradient_accumulation_steps"),
        ("train_batch_size", world * args.per_device_train_batch_size * args.gradient_accumulation_steps,
         f"--per_device_train_batch_size x --gradient_accumulation_steps x {world} process(es) ="),
        ("gradient_clipping", args.max_grad_norm, "--max_grad_norm"),
        ("optimizer.params.lr", args.learning_rate, "--learning_rate"),
        ("optimizer.params.betas", [args.adam_beta1, args.adam_beta2], "--adam_beta1, --adam_beta2"),
        ("optimizer.params.eps", args.adam_epsilon, "--adam_epsilon"),
        ("optimizer.params.weight_decay", args.weight_decay, "--weight_decay"),
    ])


def precision_conflicts(cfg: dict, precision) -> list[str]:
    """fp16.enabled / bf16.enabled set in a DeepSpeed config against what the precision policy gives DeepSpeed
    (training/precision.py: LoRA's fp32 adapters on a bf16 base run under autocast, DeepSpeed's own bf16 off)."""
    dtype = str(precision.compute_dtype).removeprefix("torch.")
    out = []
    for key, value in (("fp16.enabled", precision.hf_fp16), ("bf16.enabled", precision.hf_bf16)):
        if _ds_value(cfg, key) not in (None, "auto") and _ds_value(cfg, key) != value:
            out.append(f"{key} is {json.dumps(_ds_value(cfg, key))} there, and this run turns DeepSpeed's "
                       f"{key.split('.')[0]} {'on' if value else 'off'} (it computes in {dtype}; --bf16 / --fp16 "
                       "decide)")
    return out


def conflicts_error(where: str, conflicts: list[str]) -> TrainConfigError:
    return TrainConfigError(f"{where} sets values the command line decides: {'; '.join(conflicts)}; set them to "
                            "\"auto\" (as in ds_configs/) or pass the flags to match")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def check_numbers(lora_args, args) -> None:
    """Numeric flags out of range, one line each, before anything loads (else a division by zero, or PEFT's,
    numpy's or the optimizer's traceback, minutes later)."""
    import math

    for flag, value in (("--per_device_train_batch_size", args.per_device_train_batch_size),
                        ("--per_device_eval_batch_size", args.per_device_eval_batch_size),
                        ("--gradient_accumulation_steps", args.gradient_accumulation_steps)):
        if value < 1:
            raise TrainConfigError(f"{flag} must be at least 1, got {value}")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise TrainConfigError(f"--learning_rate must be a finite number > 0 (0 trains nothing), got "
                               f"{args.learning_rate}")
    for flag, value in (("--weight_decay", args.weight_decay),
                        ("--max_grad_norm", args.max_grad_norm),
                        ("--gradient_checkpointing_keep_gib", args.gradient_checkpointing_keep_gib)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise TrainConfigError(f"{flag} must be a finite number >= 0, got {value}")
    if not (math.isfinite(lora_args.lora_alpha) and lora_args.lora_alpha > 0):
        raise TrainConfigError(f"--lora_alpha must be positive (the adapter is scaled by lora_alpha / lora_r), got "
                               f"{lora_args.lora_alpha}")
    if not 0 <= lora_args.lora_dropout < 1:
        raise TrainConfigError(f"--lora_dropout must be in [0, 1), got {lora_args.lora_dropout}")
    for flag, value in (("--seed", args.seed), ("--data_seed", args.data_seed)):
        if value is not None and not 0 <= value < 2 ** 32:
            raise TrainConfigError(f"{flag} must be in [0, 2**32), got {value}")
    if args.data_seed is not None and args.train_sampling_strategy == "group_by_length":  # (two runs: same bytes)
        raise TrainConfigError("--data_seed does nothing with group_by_length sampling (--packing False's default): "
                               "transformers' LengthGroupedSampler draws its order from --seed; drop --data_seed, or "
                               "pass --train_sampling_strategy random")
    if args.max_steps == 0:  # transformers would read it as unset and train --num_train_epochs instead
        raise TrainConfigError("--max_steps 0 trains nothing; leave it out (or -1) to train --num_train_epochs "
                               f"({args.num_train_epochs:g})")
    if args.max_steps < -1:  # transformers reads any value below 1 as unset: a typo would train every epoch
        raise TrainConfigError(f"--max_steps must be a positive number of steps, or -1 (the default) to train "
                               f"--num_train_epochs, got {args.max_steps}")
    # Adam's settings: torch refuses betas outside [0, 1) only when the optimizer is built (after the model has
    # loaded), and an epsilon of 0 divides 0 by 0 for LoRA's A matrices in the first step (B starts at zero)
    for flag, value in (("--adam_beta1", args.adam_beta1), ("--adam_beta2", args.adam_beta2)):
        if not 0 <= value < 1:
            raise TrainConfigError(f"{flag} must be in [0, 1), got {value}")
    if not (math.isfinite(args.adam_epsilon) and args.adam_epsilon > 0):
        raise TrainConfigError(f"--adam_epsilon must be a finite number > 0 (it keeps Adam's update from dividing "
                               f"by zero), got {args.adam_epsilon}")
    if not (math.isfinite(args.warmup_steps) and args.warmup_steps >= 0):  # (transformers refuses only < 0)
        raise TrainConfigError(f"--warmup_steps must be a finite number >= 0 (below 1: a fraction of the steps), "
                               f"got {args.warmup_steps}")
    # Intervals, under the strategy that reads them: transformers refuses only 0 for --logging_steps; a negative
    # --save_steps saved nothing, NaN never logged or saved, a negative --logging_steps logged every step
    for flag, strategy, value in (("--logging_steps", args.logging_strategy, args.logging_steps),
                                  ("--save_steps", args.save_strategy, args.save_steps),
                                  ("--eval_steps", args.eval_strategy, args.eval_steps)):
        if str(getattr(strategy, "value", strategy)) == "steps" and value is not None and not (
                math.isfinite(value) and value > 0):
            raise TrainConfigError(f"{flag} must be a whole number of steps, or a fraction of the run's steps in "
                                   f"(0, 1), got {value} (with --{flag[2:].replace('_steps', '_strategy')} steps)")
    for flag, value, least in (("--save_total_limit", args.save_total_limit, 1),
                               ("--eval_accumulation_steps", args.eval_accumulation_steps, 1),
                               ("--dataloader_num_workers", args.dataloader_num_workers, 0)):
        # (transformers reads a --save_total_limit below 1 as no limit: every checkpoint kept)
        if value is not None and value < least:
            raise TrainConfigError(f"{flag} must be at least {least}"
                                   + (" (leave it out to keep every checkpoint)" if flag == "--save_total_limit"
                                      else "") + f", got {value}")
    if not (math.isfinite(args.label_smoothing_factor) and 0 <= args.label_smoothing_factor < 1):
        raise TrainConfigError(f"--label_smoothing_factor must be in [0, 1), got {args.label_smoothing_factor}")
    if args.neftune_noise_alpha is not None and not (math.isfinite(args.neftune_noise_alpha)
                                                     and args.neftune_noise_alpha >= 0):
        raise TrainConfigError(f"--neftune_noise_alpha must be a finite number >= 0, got {args.neftune_noise_alpha}")
    if args.max_steps <= 0 and not (math.isfinite(args.num_train_epochs) and args.num_train_epochs > 0):
        raise TrainConfigError(f"nothing to train: --num_train_epochs {args.num_train_epochs} and no --max_steps; "
                               "give a positive number of epochs or steps")


def check_scheduler(args) -> None:
    """--lr_scheduler_type with --lr_scheduler_kwargs, built once on a stand-in optimizer: a name the schedule does
    not take (a TypeError) or a missing one (cosine_with_min_lr's min_lr) came from the Trainer after loading."""
    from transformers.optimization import get_scheduler

    kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    kwargs = args.lr_scheduler_kwargs or {}
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    try:
        get_scheduler(kind, optimizer, num_warmup_steps=0, num_training_steps=10,
                      scheduler_specific_kwargs=dict(kwargs))
    except (TypeError, ValueError) as e:
        given = f" with --lr_scheduler_kwargs {json.dumps(kwargs)}" if kwargs else ""
        why = " ".join(str(e).split())
        if missing := re.findall(r"missing \d+ required (?:positional|keyword-only) arguments?: (.*)", why):
            names = re.findall(r"'(\w+)'", missing[0])  # (a Python signature's words: say which flag gives them)
            pairs = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in kwargs.items()] + [f'"{n}": N' for n in names]
            why = f"needs {', '.join(names)}: give {'it' if len(names) == 1 else 'them'} in --lr_scheduler_kwargs, " \
                  f"e.g. '{{{', '.join(pairs)}}}'"
        raise TrainConfigError(f"--lr_scheduler_type {kind}{given}: {why}") from None


def _available_integrations() -> list[str]:
    from transformers.integrations.integration_utils import get_available_reporting_integrations

    return get_available_reporting_integrations()


def check_report_to(args) -> None:
    """--report_to names transformers knows, installed, and for W&B online a login: each would otherwise be a
    traceback from the Trainer after the model has loaded (or a W&B UsageError when training begins)."""
    import difflib

    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    asked = [str(r) for r in (args.report_to or []) if r != "none"]
    for name in asked:
        if name not in INTEGRATION_TO_CALLBACK:
            near = difflib.get_close_matches(name, list(INTEGRATION_TO_CALLBACK), n=1)
            raise TrainConfigError(f"--report_to {name}: not a reporting integration"
                                   + (f" (did you mean {near[0]}?)" if near else "")
                                   + f"; one of {', '.join(INTEGRATION_TO_CALLBACK)}, or none")
    available = set(_available_integrations())
    missing = [n for n in asked if n not in available]
    if missing:
        hint = " or pip install -e \".[wandb]\"" if missing == ["wandb"] else ""
        raise TrainConfigError(f"--report_to {' '.join(missing)}: not installed (pip install {' '.join(missing)}"
                               f"{hint}), or drop it from --report_to")
    if "wandb" in asked and args.process_index == 0:  # only the main process logs to W&B
        import sys

        import wandb

        # (the environment first: wandb.setup() keeps the settings of its first call in this process)
        mode = os.environ.get("WANDB_MODE") or wandb.setup().settings.mode
        if mode not in ("online", "shared"):  # offline, disabled: no account needed
            return
        try:
            # a prompt only where the callback would have prompted (a terminal), now instead of after loading
            logged_in = wandb.login(verify=False, prompt=sys.stdin.isatty())
        except wandb.errors.Error as e:
            raise TrainConfigError(f"--report_to wandb: {' '.join(str(e).split())}") from None
        if not logged_in:
            raise TrainConfigError("--report_to wandb: no W&B API key: run `wandb login` (or set WANDB_API_KEY) "
                                   "first, or WANDB_MODE=offline to keep the run's logs locally")


def check_empty_paths(data_args, lora_args, args) -> None:
    """A path flag given as "" (a quoted, unset shell variable) was read as not given: the run went on without the
    eval set, the adapter to continue, the checkpoint to resume from or DeepSpeed, saying nothing."""
    for flag, value in (("--eval_data_path", data_args.eval_data_path),
                        ("--lora_weight_path", lora_args.lora_weight_path),
                        ("--resume_from_checkpoint", args.resume_from_checkpoint),
                        ("--deepspeed", args.deepspeed)):
        if isinstance(value, str) and not value.strip():
            raise TrainConfigError(f"{flag} is empty (an unset shell variable?): give a path, or leave the flag out")


# What an evaluation here reports (no compute_metrics: the eval set's loss, and the Trainer's timings)
EVAL_METRICS = ("loss", "runtime", "samples_per_second", "steps_per_second")


def check_trainer_options(args) -> None:
    """Options the Trainer acts on only after the data and the model have loaded, each a traceback there (on every
    rank): an optimizer whose package is missing, Liger's kernels, a best-model metric no evaluation computes, a Hub
    push from a machine that cannot reach the Hub."""
    from transformers import Trainer

    optim = str(getattr(args.optim, "value", args.optim))
    try:
        Trainer.get_optimizer_cls_and_kwargs(args)
    except (ImportError, ValueError) as e:
        text = " ".join(str(e).split())
        # (a ValueError that is not about a package, such as GaLore's need of the model, is the Trainer's to check)
        if isinstance(e, ImportError) or "install" in text.lower() or "import" in text.lower():
            raise TrainConfigError(f"--optim {optim}: {text}") from None
    if getattr(args, "use_liger_kernel", False):
        raise TrainConfigError("--use_liger_kernel: Liger's kernels patch transformers' own model classes, and Qwen v1 "
                               "trains through this project's model (its own fused loss and kernels); drop the flag")
    save = str(getattr(args.save_strategy, "value", args.save_strategy))
    metric = args.metric_for_best_model
    if save == "best" and not metric:
        raise TrainConfigError("--save_strategy best needs --metric_for_best_model (loss: the eval set's loss)")
    if metric:
        name = metric[len("eval_"):] if metric.startswith("eval_") else metric
        if name not in EVAL_METRICS:
            raise TrainConfigError(f"--metric_for_best_model {metric}: not a metric this run's evaluation computes; "
                                   f"it computes {', '.join(EVAL_METRICS)} (loss: the eval set's loss)")
    if args.load_best_model_at_end and str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no":
        # (transformers takes it with --eval_strategy no and --save_strategy no alike: nothing to pick from)
        raise TrainConfigError("--load_best_model_at_end needs evaluations to pick the best checkpoint from: "
                               "--eval_data_path, --eval_strategy steps or epoch and --save_strategy the same")
    if args.push_to_hub and args.process_index == 0:
        from huggingface_hub import HfApi

        try:  # (the Trainer creates the repo when it is built, after loading)
            HfApi().whoami(token=args.hub_token)
        except Exception as e:
            text = " ".join(str(e).split()) or type(e).__name__
            raise TrainConfigError(f"--push_to_hub: the Hub cannot be reached or no token is set ({text[:300]}); "
                                   "drop --push_to_hub, or log in (hf auth login) on a machine that reaches it") \
                from None


def _resumes_without_saved_modules(args) -> bool:
    """Whether the run resumes a checkpoint that records no --modules_to_save (a base model's LoRA run written
    before a base model got wte and lm_head by default): that run goes on as it was."""
    explicit = args.resume_from_checkpoint
    if explicit and explicit not in _TRUE:
        ckpt = Path(explicit)
    elif args.resume or explicit in _TRUE:  # the one _resumable continues: the newest usable, past damaged ones
        found = checkpoints(args.output_dir) if args.output_dir else []
        ckpt = next((p for p in found if checkpoint_problem(p) is None), None)
    else:
        return False
    try:
        recorded = json.loads((ckpt / CHECKPOINT_RUN).read_text())
    except (TypeError, OSError, ValueError):
        return False
    return isinstance(recorded, dict) and recorded.get("modules_to_save") == []


def lora_flags_given(lora_args) -> list[str]:
    """'--flag VALUE' for each LoRA setting given another value than its default."""
    from .lora import LORA_CONFIG_KEYS

    defaults = _flag_defaults(lora_args)
    return [f"--{flag} {_show(list(mine) if isinstance(mine, (list, tuple)) else mine)}"
            for flag in LORA_CONFIG_KEYS if flag != "modules_to_save"
            if _setting(mine := getattr(lora_args, flag)) != _setting(defaults[flag])]


def _flag_defaults(dataclass_args) -> dict:
    """Each field's default, from the dataclass's fields (arguments imports this module)."""
    import dataclasses

    return {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(dataclass_args)}


def _setting(v):
    """A LoRA setting as compared: lists as sets (PEFT saves target_modules unordered), no list as none."""
    return frozenset(v) if isinstance(v, (list, tuple, set)) else (None if v in (None, []) else v)


def graph_loss_changes(args) -> str | None:
    """The flags that change the training loss in transformers' eager step, which a replayed step would leave out
    (label smoothing is applied by the Trainer after the forward; NEFTune hooks the embedding at train() time)."""
    given = [f"--{name} {getattr(args, name)}" for name in ("label_smoothing_factor", "neftune_noise_alpha")
             if getattr(args, name, None)]
    return " and ".join(given) or None


def check_checkpointing_options(args) -> None:
    """The checkpointing flags that only apply with --gradient_checkpointing, and its kwargs, which the model's
    own checkpointing (non-reentrant, what the graphs and the kept blocks are built for) would override."""
    on = bool(getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing)
    if args.gradient_checkpointing_keep_gib is not None and not on:
        raise TrainConfigError(f"--gradient_checkpointing_keep_gib {args.gradient_checkpointing_keep_gib} applies "
                               "only with --gradient_checkpointing True (the training scripts' default)")
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(args, "gradient_checkpointing_kwargs",
                                                                               None)
    if kwargs:
        other = {k: v for k, v in dict(kwargs).items() if not (k == "use_reentrant" and v is False)}
        if other:
            raise TrainConfigError(f"--gradient_checkpointing_kwargs {json.dumps(other)}: checkpointing here is "
                                   "non-reentrant and takes no options (use_reentrant false is what runs)")


def preflight(model_args, data_args, lora_args, args) -> TrainPlan:
    check_empty_paths(data_args, lora_args, args)
    # -- model dir -------------------------------------------------------------------------------------------
    if not model_args.model_name_or_path:
        raise TrainConfigError("--model_name_or_path is required (a Qwen model dir, e.g. /models/Qwen-14B-Chat-Int4)")
    try:
        model_dir = resolve_model_dir(model_args.model_name_or_path, cache_dir=args.cache_dir)
    except ModelNotFoundError as e:
        raise TrainConfigError(f"--model_name_or_path: {e}") from None
    try:
        info = describe(model_dir)
    except ModelLoadError as e:
        raise TrainConfigError(str(e)) from None
    cfg = info.config
    if not (model_dir / VOCAB_FILE).is_file():
        raise TrainConfigError(f"{model_dir} has no {VOCAB_FILE}: copy it from the original model dir")
    seq_length = cfg.get("seq_length") or cfg.get("max_position_embeddings")
    quantized = info.quantized

    # -- data ------------------------------------------------------------------------------------------------
    if not data_args.data_path:
        raise TrainConfigError("--data_path is required (chat data as JSON, JSONL, Parquet or a datasets dir)")
    from ..data.records import DataError, data_sources

    for flag, path in (("--data_path", data_args.data_path), ("--eval_data_path", data_args.eval_data_path)):
        if path:  # one file or dataset dir, a plain dir of them, a glob or a comma-separated list (data_sources)
            try:
                data_sources(path)
            except DataError as e:
                raise TrainConfigError(str(e.given_by(flag))) from None
    eval_strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
    if eval_strategy != "no" and not data_args.eval_data_path:
        raise TrainConfigError(f"--eval_strategy {eval_strategy} needs an eval set: add --eval_data_path")
    if data_args.preprocessing_num_workers is not None and data_args.preprocessing_num_workers < 1:
        raise TrainConfigError(f"--preprocessing_num_workers must be at least 1 (leave it out to choose by the "
                               f"data's size), got {data_args.preprocessing_num_workers}")
    from ..data.encoding import MIN_MAX_LEN

    if data_args.model_max_length < MIN_MAX_LEN:
        raise TrainConfigError(f"--model_max_length {data_args.model_max_length} is too small for any chat turn")

    # -- mode ------------------------------------------------------------------------------------------------
    if lora_args.q_lora and not quantized:
        raise TrainConfigError(
            f"--q_lora needs a GPTQ Int4 model dir, and {model_dir} is not quantized (no quantization_config). "
            "Pass the Int4 release (e.g. Qwen-14B-Chat-Int4), or drop --q_lora to train LoRA on this model")
    if quantized and False in (lora_args.use_lora, lora_args.q_lora):
        # (unset, an Int4 dir means Q-LoRA; said False, it asked for full fine-tuning, and Q-LoRA trained silently)
        flag = "--use_lora False" if lora_args.use_lora is False else "--q_lora False"
        raise TrainConfigError(
            f"{flag}: {model_dir} is a GPTQ-quantized model, which full fine-tuning cannot train (its weights are "
            "integers); it trains as Q-LoRA: drop the flag, or pass the float model")
    if quantized:
        mode = "qlora"
    elif lora_args.use_lora:
        mode = "lora"
    else:
        mode = "full"
    if not getattr(args, "output_dir_unset", False) and not str(args.output_dir).strip():
        # (Path("") is the working dir)
        raise TrainConfigError("--output_dir is empty: give the dir the run writes to (left out: output/qwen-<mode>)")
    if getattr(args, "output_dir_unset", False):
        args.output_dir = os.path.join("output", f"qwen-{mode}")
        if args.process_index == 0:
            print(f"no --output_dir: the run goes to {args.output_dir} (as the training scripts' default)", flush=True)
    chat_generation = chat_generation_config(model_dir)
    if lora_args.modules_to_save == ["none"]:  # (the way to say none where a base model would get wte lm_head)
        lora_args.modules_to_save = []
    if (chat_generation is not None and mode == "lora" and lora_args.modules_to_save is None
            and not lora_args.lora_weight_path and not _resumes_without_saved_modules(args)):
        # as the official finetune.py's LoRA on a base model: the rows of the ChatML tokens are untrained there. (Not
        # from an adapter, whose own config decides, nor on resuming a run that trained none, as before this default;
        # lm_head given LoRA keeps it.)
        lora_args.modules_to_save = [m for m in ("wte", "lm_head") if m not in lora_args.lora_target_modules]
        if args.process_index == 0:
            print(f"{model_dir} is a base model (chat_format {chat_format(model_dir)!r}): LoRA also trains "
                  f"{' and '.join(lora_args.modules_to_save)} in full, as the official recipe does "
                  f"(--modules_to_save none: not)", flush=True)
    if mode != "full" and not lora_args.lora_target_modules:
        raise TrainConfigError("--lora_target_modules is empty: name the Linears that get adapters (c_attn, c_proj, "
                               "w1, w2 by default)")
    if lora_args.lora_r <= 0:
        raise TrainConfigError(f"--lora_r must be positive, got {lora_args.lora_r}")
    check_numbers(lora_args, args)
    check_scheduler(args)
    check_report_to(args)
    check_trainer_options(args)
    if lora_args.lora_bias not in ("none", "all", "lora_only"):
        raise TrainConfigError(f"--lora_bias must be none, all or lora_only, got {lora_args.lora_bias!r}")
    if lora_args.lora_weight_path and not (start := Path(lora_args.lora_weight_path)).is_dir():
        # (the adapter's weight file given for its dir was called "no such adapter dir")
        why = ("a file, not an adapter dir: give the dir that holds its adapter_config.json" if start.exists()
               else f"no such adapter dir{dirs_beside(start)}")
        raise TrainConfigError(f"--lora_weight_path {lora_args.lora_weight_path}: {why}")
    if mode == "full" and (lora_args.modules_to_save or lora_args.lora_weight_path):
        raise TrainConfigError("--modules_to_save and --lora_weight_path apply to LoRA; add --use_lora")
    if mode == "full" and (given := lora_flags_given(lora_args)):
        # (a float model without --use_lora trains in full: --lora_r 8 alone started a full fine-tune of 14B)
        raise TrainConfigError(f"{', '.join(given)}: LoRA settings, and {model_dir} trains in full without "
                               f"--use_lora True: add it to train LoRA, or drop them")
    if mode == "qlora" and lora_args.lora_bias != "none":
        # (the Int4 Linears' biases are buffers: nothing trained, while the adapter said it carried trained biases)
        raise TrainConfigError(f"--lora_bias {lora_args.lora_bias}: the GPTQ model's Linear biases are fixed buffers "
                               f"that Q-LoRA cannot train; leave --lora_bias none")
    check_checkpointing_options(args)
    if args.cuda_graphs and (loss_changes := graph_loss_changes(args)):
        raise TrainConfigError(f"--cuda_graphs True with {loss_changes}: the graphed step computes the plain loss; "
                               "drop --cuda_graphs True (they stay off by themselves with it)")
    if args.bf16 and args.fp16:
        raise TrainConfigError("--bf16 and --fp16 exclude each other")
    if args.on_nonfinite_loss not in ("stop", "skip"):
        raise TrainConfigError(f"--on_nonfinite_loss must be stop or skip, got {args.on_nonfinite_loss!r}")
    if args.fp16 and (args.use_cpu or not torch.cuda.is_available()):
        raise TrainConfigError("--fp16 needs a CUDA GPU; on the CPU training runs in fp32: drop --fp16 (the official "
                               "Q-LoRA script passes it for auto-gptq; here Q-LoRA trains in bf16 on a GPU)")

    # -- DeepSpeed -------------------------------------------------------------------------------------------
    if getattr(args, "fsdp", None):  # transformers takes it; the Int4 buffers, graphs and checkpoints are DeepSpeed's
        raise TrainConfigError("--fsdp: FSDP is not supported here; several GPUs train through DeepSpeed "
                               "(--deepspeed zero2) or plain data parallel (NPROC=N)")
    ds = deepspeed_config(args.deepspeed)
    zero_stage = None
    if ds is not None:
        zero_stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
        if mode == "qlora" and zero_stage == 3:
            raise TrainConfigError(
                "Q-LoRA cannot run under ZeRO-3: the packed Int4 weights are integer buffers that ZeRO-3 cannot "
                "partition, and each GPU holds the whole Int4 model anyway. Use --deepspeed zero2")
        if "scheduler" in ds:
            own = f"zero{zero_stage}" if zero_stage in (2, 3) else "zero2"
            raise TrainConfigError(
                f"--deepspeed {args.deepspeed} has a 'scheduler' block, which would replace the schedule that "
                f"--lr_scheduler_type asks for; remove it, or use --deepspeed {own} (the project's config of that "
                "stage, which has none)")
        if conflicts := deepspeed_conflicts(ds, args):
            raise conflicts_error(f"--deepspeed {args.deepspeed}", conflicts)
        if "optimizer" in ds and not str(args.optim).lower().startswith(("adamw", "optimizernames.adamw")):
            raise TrainConfigError(
                f"--deepspeed {args.deepspeed} brings its own optimizer ({ds['optimizer'].get('type')}), so "
                f"--optim {args.optim} would not run; use a config without an optimizer block (--deepspeed zero2)")

    if args.on_nonfinite_loss == "skip" and ds is not None:
        raise TrainConfigError(
            "--on_nonfinite_loss skip does not work under --deepspeed (DeepSpeed applies the step inside its "
            "backward pass); use --on_nonfinite_loss stop, or run without DeepSpeed")
    launch_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if ds is not None and not all(v in os.environ for v in launch_vars) and not _importable("mpi4py"):
        # without them deepspeed.initialize looks for MPI (mpi4py), after the data and the model have loaded
        raise TrainConfigError(
            f"--deepspeed needs the rank variables torchrun sets ({', '.join(launch_vars)}): run it through a training "
            f"script (bash scripts/finetune_{mode}.sh ... --deepspeed CONFIG, which launches it that way even for one "
            "process) or python -m finetune.training.launch --nproc_per_node N -m finetune.train ...")

    # -- output dir and resume -------------------------------------------------------------------------------
    identity = run_identity(model_dir, mode, lora_args, data_args, args)
    check_inputs_kept(args, model_dir, lora_args.lora_weight_path)
    check_data_kept(args, data_args)
    resume_from = check_output_dir(args, identity)
    if resume_from is not None and args.max_steps > 0:
        # transformers trains nothing from a checkpoint at or past --max_steps, saves, and reports the run finished
        done = checkpoint_step(resume_from)
        if args.max_steps <= done:
            raise TrainConfigError(f"--max_steps {args.max_steps}: the checkpoint {resume_from} is at step {done} "
                                   f"already, so nothing would train; give a --max_steps beyond {done} to train on "
                                   "from it")

    check_model_files(model_dir, mode, lora_args)

    if torch.cuda.is_available() and not args.use_cpu:
        device = f"cuda:{max(args.local_process_index, 0)}"
    else:
        device = "cpu"
    too_big = fit_problem(model_dir, mode, lora_args, data_args, args, device, ds)  # before any loading
    if too_big:
        raise TrainConfigError(too_big)
    return TrainPlan(model_dir=model_dir, mode=mode, quantized=quantized, device=device,
                     zero_stage=zero_stage, resume_from=resume_from, identity=identity, seq_length=seq_length,
                     chat_generation=chat_generation)


_TRUE = ("True", "true", "auto", "last")


def _lock_holder(out: Path) -> str | None:
    """The pid written in the output dir's lock file while another process holds the lock, else None."""
    import fcntl

    try:
        with open(out / LOCK_FILE) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = f.read().strip() or "unknown"
                return None if holder == str(os.getpid()) else holder  # this run's own lock (claim re-checks)
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


def check_inputs_kept(args, model_dir, lora_weight_path) -> None:
    """Refuse an --output_dir the run would write its outputs over, or clear, while it still has to read them
    there: the model dir or the --lora_weight_path adapter, or, with --overwrite_output_dir over a run of this
    project, either inside that run's dir (a checkpoint-N; the clearing removed them before they loaded)."""
    out = Path(args.output_dir).resolve()
    clears = args.overwrite_output_dir and is_project_run(out)
    for flag, path in (("--model_name_or_path", model_dir), ("--lora_weight_path", lora_weight_path)):
        if not path:
            continue
        p = Path(path).resolve()
        if p == out or (clears and out in p.parents):
            raise TrainConfigError(
                f"--output_dir {args.output_dir} {'is' if p == out else 'holds'} the {flag} dir {path}, an input of "
                f"this run{' that --overwrite_output_dir would remove before it loads' if clears else ''}; "
                "choose another --output_dir")


# .json files every run writes into --output_dir (adapter runs the first, full runs config.json): a data flag whose
# directory or pattern takes them would read them as data at the next run
RUN_JSON_FILES = ("adapter_config.json", "run_args.json", "run_info.json", "config.json", "trainer_state.json")


def check_data_kept(args, data_args) -> None:
    """Refuse an --output_dir where the run's own .json files would join the data: the directory --data_path (or
    --eval_data_path) reads, or the one its pattern matches them in. Such a run trained, and every later run with
    the same -d (its resume too) stopped on adapter_config.json as invalid data."""
    from ..data.records import read_as_data

    out = Path(args.output_dir)
    for flag, spec in (("--data_path", data_args.data_path), ("--eval_data_path", data_args.eval_data_path)):
        if not spec:
            continue
        taken = [n for n in RUN_JSON_FILES if read_as_data(out / n, spec)]
        if taken:
            raise TrainConfigError(
                f"--output_dir {args.output_dir} is where {flag} {spec} reads its data: the run's own files "
                f"({', '.join(taken[:2])}, ...) would be read as data by the next run with it; choose another "
                "--output_dir")


def check_output_dir(args, identity: dict) -> str | None:
    """The checkpoint to resume from (None: start at step 0), or a TrainConfigError saying why the output dir
    cannot take this run. Reads only: nothing in the dir changes here (run_dir.claim_output_dir writes)."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise TrainConfigError(f"--output_dir {out} is a file, not a directory")
    # Rank 0 claims the dir (run_dir.claim_output_dir), so another rank of the same launch may find it locked by
    # rank 0 already: only rank 0 asks (a multi-process test failed now and then on that race)
    holder = _lock_holder(out) if args.process_index == 0 else None
    if holder is not None:  # said before the model checks; run_dir.claim_output_dir takes the lock itself
        raise TrainConfigError(f"--output_dir {out} is in use by another training run (pid {holder}); wait for it "
                               "to end or choose another --output_dir")
    parent = next((p for p in [out, *out.absolute().parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise TrainConfigError(f"--output_dir {out}: {parent} is a file, not a directory")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise TrainConfigError(f"--output_dir {out}: {parent} is not writable")
    finished = (out / FINISHED_MARKER).is_file()
    explicit = args.resume_from_checkpoint
    if explicit in (None, "", "False", "false"):
        explicit = None
    if args.resume and explicit is not None and explicit not in _TRUE:
        # (the path was dropped silently: --resume took the newest checkpoint in --output_dir)
        raise TrainConfigError(f"--resume and --resume_from_checkpoint {explicit} exclude each other: --resume "
                               "continues the newest checkpoint in --output_dir, --resume_from_checkpoint the one "
                               "it names; give one")
    resume = args.resume or explicit in _TRUE
    if (resume or explicit) and args.overwrite_output_dir:  # (named as given: it said --resume to a user of the other)
        flag = "--resume" if args.resume else f"--resume_from_checkpoint {explicit}"
        raise TrainConfigError(f"{flag} and --overwrite_output_dir exclude each other: a resume continues a run's "
                               "training state, overwrite starts a new run in --output_dir; give one")
    if resume and finished:
        last = checkpoints(out)
        start = (f"--model_name_or_path {shlex.quote(str(out))}" if identity.get("mode") == "full"
                 else f"--lora_weight_path {shlex.quote(str(out))}")  # (quoted: a path with a space copies as one)
        also = (f", or from its last training state: --resume_from_checkpoint {shlex.quote(str(last[0]))}" if last
                else "")
        raise TrainConfigError(
            f"--resume: the run in {out} has finished ({FINISHED_MARKER}); nothing was changed. To train further, "
            f"start a new run into a new --output_dir from its weights: {start}{also}")
    if explicit in _TRUE and not args.resume and not checkpoints(out):
        # as the Trainer's train(resume_from_checkpoint=True) ("No valid checkpoint found in output directory");
        # --resume True is the switch that starts at step 0 when there is none
        raise TrainConfigError(f"--resume_from_checkpoint {explicit}: no checkpoint in {out} to continue from; "
                               "leave it out to start a new run, or pass --resume True, which starts at step 0 "
                               "when there is no checkpoint yet")
    if resume and (found := _resumable(out, identity)):
        return found
    if explicit and not resume:
        ckpt = Path(explicit)
        if finished and ckpt.absolute().parent == out.absolute():
            raise TrainConfigError(
                f"--resume_from_checkpoint {ckpt}: the run in {out} has finished ({FINISHED_MARKER}); nothing was "
                "changed. Continue from this checkpoint into a new dir: add --output_dir NEW_DIR")
        problem = checkpoint_problem(ckpt, identity)
        if problem:
            raise TrainConfigError(f"--resume_from_checkpoint {ckpt}: {problem}")
        if ckpt.absolute().parent == out.absolute():
            return str(ckpt)
    # A new run in out (or one continuing from a checkpoint of another dir, or --resume with no checkpoint).
    explicit = None if resume else explicit
    if not out.is_dir():
        return str(explicit) if explicit else None
    if is_project_run(out):
        if not args.overwrite_output_dir:
            if finished:
                raise TrainConfigError(
                    f"{out} holds a finished run; choose another --output_dir or pass --overwrite_output_dir")
            if checkpoints(out):
                raise TrainConfigError(
                    f"{out} holds checkpoints of an unfinished run; pass --resume to continue it "
                    "or --overwrite_output_dir to start over")
    elif (present := foreign_files(out)) and not args.overwrite_output_dir:
        clash = [n for n in present if n in RUN_OUTPUTS]
        raise TrainConfigError(
            f"--output_dir {out} is not empty and holds no run of this project ({_listing(present)}); "
            "choose a new or empty dir, or pass --overwrite_output_dir to write beside these files"
            + (f" (replacing {', '.join(clash)})" if clash else " (none of them is replaced)"))
    return str(explicit) if explicit else None


def _listing(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _resumable(out: Path, identity: dict) -> str | None:
    """--resume: the newest checkpoint an exact resume can use, falling back past incomplete or damaged ones
    (each said in the log); a checkpoint of another run stops the resume, naming both."""
    found = checkpoints(out)
    if not found:
        if out.is_dir():
            logger.warning("--resume: no checkpoint in %s; training starts at step 0", out)
        return None
    problems = []
    for p in found:
        problem = checkpoint_problem(p)
        if problem is None:
            mismatch = identity_mismatch(p, identity)
            if mismatch:
                raise TrainConfigError(f"--resume: {p} was {mismatch}; or start this run afresh in another "
                                       "--output_dir or with --overwrite_output_dir")
            for skipped, why in problems:
                logger.warning("--resume: %s is not usable (%s); falling back to %s", skipped, why, p.name)
            return str(p)
        problems.append((p, problem))
    p, problem = problems[0]
    if problem == WEIGHTS_ONLY_NOTE:
        raise TrainConfigError(f"--resume: the checkpoints in {out} hold {problem} ({start_from(p)}), or start over "
                               "with --overwrite_output_dir")
    raise TrainConfigError(
        f"--resume: no checkpoint in {out} can be resumed exactly; the newest, {p.name}: {problem}. Restore "
        "the file, or start over with --overwrite_output_dir")


def check_model_files(model_dir: Path, mode: str, lora_args) -> None:
    """What the model dir, its tokenizer and the adapter flags can be checked for before any weights load: config
    and weight headers (shapes, dtypes, truncation, GPTQ settings and g_idx), the vocabulary against the model,
    --lora_target_modules / --modules_to_save against the architecture, and a --lora_weight_path adapter against
    the model (shapes from its header, dtypes, values, the base it records)."""
    from ..adapters import AdapterError, check_base, checked_weights
    from ..errors import ModelLoadError
    from ..loading import inspect_model_dir, model_config
    from ..tokenization import load_tokenizer
    from .lora import check_target_modules

    try:
        inspect_model_dir(model_dir)
        load_tokenizer(model_dir)
    except ModelLoadError as e:
        raise TrainConfigError(str(e)) from None
    if mode == "full":
        return
    from ..modeling import QWenLMHeadModel

    with torch.device("meta"):  # names and shapes only; GPTQ layers have the Linears' names and sizes
        meta = QWenLMHeadModel(model_config(model_dir))
    try:
        check_target_modules(meta, lora_args.lora_target_modules, lora_args.modules_to_save)
    except ValueError as e:
        raise TrainConfigError(str(e)) from None
    if lora_args.lora_weight_path:
        try:
            check_base(lora_args.lora_weight_path, model_dir, explicit=True)
            checked_weights(meta, Path(lora_args.lora_weight_path))
            overridden = adapter_flags_not_applied(lora_args)
        except AdapterError as e:
            raise TrainConfigError(f"--lora_weight_path: {e}") from None
        if overridden:
            raise TrainConfigError(
                f"--lora_weight_path {lora_args.lora_weight_path} trains on with the adapter's own LoRA settings (its "
                f"adapter_config.json), so {', '.join(overridden)} would not be applied: drop "
                f"{'it' if len(overridden) == 1 else 'them'}, or train a new adapter without --lora_weight_path")


def adapter_flags_not_applied(lora_args) -> list[str]:
    """'--flag VALUE (the adapter's: VALUE)' for each LoRA flag set to another value than its default and the
    --lora_weight_path adapter's: it was silently not applied. (A flag left at its default is not the user's ask.)"""
    from ..adapters import read_adapter_config
    from .lora import LORA_CONFIG_KEYS

    cfg = read_adapter_config(lora_args.lora_weight_path)
    defaults = _flag_defaults(lora_args)
    out = []
    for flag, key in LORA_CONFIG_KEYS.items():
        mine, theirs = getattr(lora_args, flag), cfg.get(key)
        if _setting(mine) == _setting(defaults[flag]) or _setting(mine) == _setting(theirs):
            continue
        out.append(f"--{flag} {_show(list(mine) if isinstance(mine, (list, tuple)) else mine)} (the adapter's: "
                   f"{_show(sorted(theirs) if isinstance(theirs, list) else theirs)})")
    return out
