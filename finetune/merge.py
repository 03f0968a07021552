"""`qwen-ft merge`: a LoRA / Q-LoRA adapter + its base -> one standalone model dir in the official layout.

    qwen-ft merge --adapter DIR [--model BASE] --output OUT [--format float|bf16|int4] [--dtype bf16|fp16|fp32]
                  [--quant-method rtn|gptq]
                  [--calib-data FILE] [--eval-data FILE]

Routes (chosen from what the base dir is):
- float base (LoRA on Qwen-14B-Chat, or a Q-LoRA adapter given the matching bf16 base with --model): the
  LoRA deltas B @ A * alpha / r are added to the float weights (in fp32), written in --dtype (bf16 default).
- Int4 base only (a Q-LoRA adapter and Qwen-14B-Chat-Int4): each GPTQ Linear is dequantized exactly
  (``GPTQLinear.dequantize``), the delta added, and the result written as a float model, or, with
  ``--format int4``, quantized again: round-to-nearest (``--quant-method rtn``, no data) or calibrated GPTQ
  (``--quant-method gptq``, ``finetune/quant/gptq.py``) on a sample of the user's own conversations
  (``--calib-data``, default: the adapter's training data from its run_args.json).

Output: ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
above --max-shard-size), ``config.json`` (no quantization_config for float; for Int4 the auto-gptq
``quantization_config`` plus ``quantize_config.json``), ``generation_config.json``, the tokenizer files
(``qwen.tiktoken``...) and any other file of the base dir (e.g. the official remote code), so both
``finetune.load_model`` and the official ``trust_remote_code`` loader read it. The files are written into
``OUT/merge-incomplete`` and moved into OUT when all are there (``write_staged``).

Every route reports the loss (training masks) of the written model against the unmerged base+adapter, on
--eval-data (held-out data the user gives) or else a sample of --calib-data's file (reported as calibration data)
or of the adapter's training data (reported as such): printed and saved as ``merge_report.json`` in the output dir.
An Int4 export (RTN or GPTQ) whose loss rises more than INT4_WARN_DELTA is warned about, and so is a float-trained
adapter merged into an Int4 base.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import save_sharded
from .command_line import OneLineParser, Once, expand_home, repeated, unwritable_place
from .hub import reference
from .run_record import trained_skipping_invalid, training_data

SKIP_COPY = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "quantize_config.json",
             "merge_report.json"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


class MergeError(ValueError):
    pass


# -- writing a model dir ----------------------------------------------------------------------------------


def copy_side_files(base_dir: Path, out_dir: Path, adapter_dir: Path | None = None) -> None:
    """Tokenizer files, generation config, remote code...: every non-weight file of the base dir; the adapter's
    generation_config.json where it has one (trained on a base model: ChatML); and a chat template."""
    for p in base_dir.iterdir():
        if not p.is_file() or p.name in SKIP_COPY or p.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            continue
        shutil.copy2(p, out_dir / p.name)
    if adapter_dir is not None and not (out_dir / "qwen.tiktoken").is_file():
        for name in ("qwen.tiktoken", "tokenizer_config.json"):
            if (adapter_dir / name).is_file():
                shutil.copy2(adapter_dir / name, out_dir / name)
    if adapter_dir is not None and (adapter_dir / "generation_config.json").is_file():
        shutil.copy2(adapter_dir / "generation_config.json", out_dir / "generation_config.json")
    add_chat_template(out_dir)


def add_chat_template(out_dir: Path) -> None:
    """The project's chat template in a dir whose tokenizer files have none (the official releases' have none):
    outside tools (vLLM, TRL, lm-evaluation-harness) build prompts from it, as from an adapter dir's. Written as
    transformers 5 saves it (chat_template.jinja) and as 4.x read it (tokenizer_config.json's key)."""
    from .tokenization import CHAT_TEMPLATE

    path = out_dir / "tokenizer_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except ValueError:
        return  # (not the merge's to repair: the base's file as it was)
    if (out_dir / "chat_template.jinja").is_file() or (isinstance(cfg, dict) and cfg.get("chat_template")):
        return
    if isinstance(cfg, dict):
        cfg["chat_template"] = CHAT_TEMPLATE
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


def write_float_config(base_cfg: dict, out_dir: Path, dtype: torch.dtype) -> dict:
    """config.json of the merged model, the base's with the written dtype. The official remote code picks its dtype
    from the bf16/fp16/fp32 flags, not torch_dtype (all three absent or false: bf16 where the GPU has it), so all
    three are written; vLLM reads the rotary base from rope_theta (default 10000), not Qwen's rotary_emb_base, so a
    base of another value is written there too."""
    cfg = {k: v for k, v in base_cfg.items() if k != "quantization_config"}
    cfg["torch_dtype"] = DTYPE_NAMES[dtype]
    for flag, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        cfg[flag] = dtype == dt
    base = cfg.get("rotary_emb_base")
    if "rope_theta" not in cfg and isinstance(base, (int, float)) and not isinstance(base, bool) and base != 10000:
        cfg["rope_theta"] = base
    cfg.pop("_name_or_path", None)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return cfg


def write_int4_config(base_cfg: dict, out_dir: Path, bits: int, group_size: int, desc_act: bool,
                      damp_percent: float, sym: bool = True, true_sequential: bool = True,
                      model_name_or_path: str | None = None) -> dict:
    """config.json with quantization_config and quantize_config.json as auto-gptq wrote them."""
    from .quant.rtn import quantization_config

    qc = quantization_config(bits, group_size, desc_act, sym)
    qc.update(damp_percent=damp_percent, true_sequential=true_sequential)
    cfg = write_float_config(base_cfg, out_dir, torch.float16)
    cfg["quantization_config"] = qc
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    auto_gptq = {"bits": bits, "group_size": group_size, "damp_percent": damp_percent, "desc_act": desc_act,
                 "static_groups": False, "sym": sym, "true_sequential": true_sequential,
                 "model_name_or_path": model_name_or_path, "model_file_base_name": "model"}
    (out_dir / "quantize_config.json").write_text(json.dumps(auto_gptq, indent=2) + "\n")
    return cfg


# -- merging ------------------------------------------------------------------------------------------------


def check_float_layout(state_dict: dict, model: nn.Module) -> None:
    """A bias the float architecture has no place for is a MergeError naming it: a GPTQ base may store a bias beside
    a Linear that Qwen v1 builds without one (auto-gptq wrote zeros there, which the merge leaves out:
    quant/peft_lora.py drop_zero_biases); a non-zero one, written into the float dir, was an unexpected key (the
    loaders here refused the dir, others drop it: the model would compute otherwise)."""
    from .quant.peft_lora import architecture_keys

    expected = architecture_keys(model)
    for name in state_dict:
        if name not in expected and name.endswith(".bias") and name[:-len("bias")] + "weight" in expected:
            raise MergeError(f"{name}: the base stores a non-zero bias for this layer, which the float "
                             f"model's architecture (Qwen v1, no_bias) has no place for; --format int4 keeps it "
                             f"as the base stores it, or use the adapter unmerged")


def unaligned_groups(model: nn.Module, group_size: int) -> str | None:
    """A group size that does not divide the input width of every Linear an Int4 export quantizes (``--group-size
    256`` on Qwen-14B, whose mlp.c_proj takes 13696 = 107 x 128 inputs): this project's loader reads the export, but
    vLLM's GPTQ and Marlin layers refuse it ("input size is not aligned with the quantized weight shape"). Said,
    naming the first such Linear and a size that divides them all; None where every one is divided."""
    import math

    from .quant.rtn import is_quantized_module_name

    if group_size == -1:
        return None
    widths = {name: m.in_features for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and is_quantized_module_name(name)}
    off = [name for name, width in widths.items() if width % group_size]
    if not off:
        return None
    common = math.gcd(*widths.values())
    fits = next((g for g in (128, 64, 32) if common % g == 0), -1)
    return (f"--group-size {group_size} does not divide the {widths[off[0]]} inputs of {off[0]}"
            + (f" (nor those of {len(off) - 1} more Linears)" if len(off) > 1 else "")
            + f": vLLM refuses such a GPTQ checkpoint (this project's loader reads it); --group-size {fits} divides "
              f"every quantized Linear's inputs")


def merge_adapter(peft_model) -> nn.Module:
    """PEFT's merge_and_unload in fp32 (GPTQ layers: exact dequantize + delta -> fp32 nn.Linear)."""
    from .quant.peft_lora import GPTQLoraLinear

    for m in peft_model.modules():
        if isinstance(m, GPTQLoraLinear):
            m.merge_dtype = torch.float32
    # on an Int4 base the result is a float model with no quantization_config (finetune/peft_hooks.py)
    return peft_model.merge_and_unload(safe_merge=True)


def _sample(records: list, n: int | None, seed: int = 0) -> list:
    if n is None or len(records) <= n:
        return list(records)
    return random.Random(seed).sample(list(records), n)


# An Int4 export whose loss rises more than this (nats per trained token) above base+adapter has lost part of the
# fine-tune to rounding: warned, with what keeps more of it (RTN: the calibrated route; GPTQ: no merge, or a float one).
INT4_WARN_DELTA = 0.05


def _warn(report: dict, msg: str) -> None:
    report.setdefault("warnings", []).append(msg)
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def resolve_format(fmt: str, dtype: str | None) -> tuple[str, str | None]:
    """(--format, --dtype) -> ("float", dtype) or ("int4", None); a contradiction is a MergeError.
    --format bf16 is float in bf16 (so --dtype, if given, must agree); --dtype applies to float only."""
    if fmt not in ("float", "bf16", "int4"):
        raise MergeError(f"--format {fmt!r}: use float (in --dtype, default bf16), bf16 or int4")
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if fmt == "int4":
        if dtype is not None:
            raise MergeError(f"--dtype {dtype} applies to a float export; --format int4 writes packed Int4 weights "
                             f"with fp16 scales (drop --dtype, or use --format float --dtype {dtype})")
        return "int4", None
    if fmt == "bf16" and dtype not in (None, "bf16"):
        raise MergeError(f"--format bf16 and --dtype {dtype} contradict each other; for {dtype} weights use "
                         f"--format float --dtype {dtype}")
    return "float", dtype or "bf16"


# flags that only an Int4 export reads, and those only calibrated GPTQ reads: given to another route they did nothing
INT4_FLAGS = ("--bits", "--group-size", "--desc-act")
GPTQ_FLAGS = ("--calib-data", "--calib-samples", "--calib-max-len", "--damp-percent")
DEFAULTS = {"bits": 4, "group_size": 128, "desc_act": False, "damp_percent": 0.01, "n_calib": 128,
            "calib_max_len": 2048}


def check_route_flags(fmt: str, quant_method: str, given: dict) -> None:
    """A flag the chosen route does not read is a MergeError naming it (``given``: flag -> value or None/False
    when not given): ``--bits 8`` on a float export, or ``--calib-data`` on a round-to-nearest one, was ignored
    and the export looked like what was asked."""
    named = [f for f, v in given.items() if v not in (None, False)]
    if fmt != "int4":
        extra = [f for f in named if f in INT4_FLAGS + GPTQ_FLAGS]
        if extra:
            raise MergeError(f"{', '.join(extra)} appl{'ies' if len(extra) == 1 else 'y'} to an Int4 export "
                             f"(--format int4); a float export is not quantized")
    elif quant_method != "gptq":
        extra = [f for f in named if f in GPTQ_FLAGS]
        if extra:
            raise MergeError(f"{', '.join(extra)} appl{'ies' if len(extra) == 1 else 'y'} to calibrated GPTQ: add "
                             f"--quant-method gptq (round-to-nearest, the default, reads no data)")


def check_numbers(fmt: str, quant_method: str, n_calib, n_eval, calib_max_len: int, group_size: int,
                  damp_percent: float, max_shard_size) -> None:
    """The numeric flags, before anything loads (each failed with a traceback, most after the merge itself)."""
    from .checkpoint import parse_size
    from .data.encoding import MIN_MAX_LEN

    if n_eval is not None and n_eval < 0:
        raise MergeError(f"--eval-samples must be 0 or more (0: no loss report), got {n_eval}")
    try:
        shard = parse_size(max_shard_size)
    except (ValueError, OverflowError):  # ("1" and 400 zeros: a float that int() cannot take)
        shard = None
    if shard is None or shard < 1:
        raise MergeError(f"--max-shard-size {max_shard_size!r}: expected a positive size such as 2GB or 500MB")
    if fmt != "int4":
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size >= 1):
        raise MergeError(f"--group-size must be -1 (one group a row) or a positive number of columns, got {group_size}")
    if quant_method == "gptq":
        if n_calib is not None and n_calib < 1:
            raise MergeError(f"--calib-samples must be at least 1, got {n_calib}")
        if calib_max_len < MIN_MAX_LEN:
            raise MergeError(f"--calib-max-len {calib_max_len} is too small for any chat turn (at least {MIN_MAX_LEN})")
        if not 0 < damp_percent < 1:  # (NaN fails too) the dampening is a fraction of the Hessian's mean diagonal
            raise MergeError(f"--damp-percent must be in (0, 1), got {damp_percent}")


# A merge is written into OUT/INCOMPLETE and moved into OUT when every file is there: an interrupted merge (Ctrl-C,
# a full disk, a kill) leaves no dir that looks like a complete model, nor an earlier merge's files mixed with its own.
INCOMPLETE = "merge-incomplete"


def write_staged(out: Path, write, log=print) -> list[str]:
    """``write(dir)`` into ``out/INCOMPLETE``, then the earlier merge's files of ``out`` are removed and the new
    ones moved in, config.json last (the file that makes a dir a model dir). Returns ``write``'s result; an
    OSError (a full disk, no permission) is a MergeError naming ``out``."""
    import os

    stage = out / INCOMPLETE
    try:
        out.mkdir(parents=True, exist_ok=True)
        if stage.exists():
            log(f"merge: --overwrite: removing {stage} (an interrupted merge)")
            shutil.rmtree(stage)
        stage.mkdir()
        try:
            result = write(stage)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        # An earlier merge's weights, shard index, Int4 config and report go: a stale index names shards that are
        # gone, a stale quantize_config.json calls a float export GPTQ, a stale report describes other weights
        # (and an older model's PyTorch weights: loaders prefer the safetensors, but a 14B's .bin files are 28 GB
        # of another model left beside the new one)
        stale = sorted(p for p in out.glob("model*.safetensors")) + sorted(out.glob("pytorch_model*.bin")) + [
            out / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json", "quantize_config.json",
                              "merge_report.json", "config.json") if (out / n).is_file()]
        shown = [p.name for p in stale if p.name != "config.json" and not (stage / p.name).exists()]
        if shown:
            log(f"merge: --overwrite: removing {', '.join(shown)} from {out}")
        for p in stale:
            p.unlink()
        new = sorted(stage.iterdir(), key=lambda p: p.name == "config.json")
        for p in new:
            os.replace(p, out / p.name)
        stage.rmdir()
    except OSError as e:
        raise MergeError(f"writing the merged model into {out}: {e.strerror or e} ({e.filename or out})") from None
    return result


def merge(adapter, output, model=None, fmt: str = "float", dtype: str | None = None, quant_method: str | None = None,
          calib_data=None, eval_data=None, n_calib: int | None = None, n_eval: int = 64,
          calib_max_len: int | None = None, bits: int | None = None, group_size: int | None = None,
          desc_act: bool = False, damp_percent: float | None = None, true_sequential: bool = True,
          max_shard_size="2GB", device=None, overwrite: bool = False, seed: int = 0, log=print) -> dict:
    """Run one merge route; returns the report (also written to OUT/merge_report.json). The quantization
    arguments left None take DEFAULTS; one given to a route that does not read it is a MergeError."""
    from .adapters import (adapter_identity, check_base, float_adapter_on_int4, read_adapter_config, resolve_base,
                           trained_on)
    from .evaluate import eval_loss, load_eval_records
    from .loading import load_model
    from .model_dir import describe
    from .tokenization import load_tokenizer

    t0 = time.time()
    for flag, value in (("--adapter", adapter), ("--output", output), ("--model", model), ("--calib-data", calib_data),
                        ("--eval-data", eval_data), ("--device", device)):
        if isinstance(value, str) and not value.strip():  # an unset shell variable: Path("") is the current dir
            raise MergeError(f"{flag} is empty")
    from .loading import placement_problem

    if problem := placement_problem(device):  # (load_model refused it only after the data had been read)
        raise MergeError(problem)
    from .hub import resolve_model_dir

    adapter = resolve_model_dir(adapter, "adapter directory")  # a hub id (org/name) too, as chat takes one
    out = Path(output)
    fmt, dtype = resolve_format(fmt, dtype)
    if quant_method not in (None, "rtn", "gptq"):
        raise MergeError(f"--quant-method {quant_method!r}: use rtn or gptq")
    if quant_method is not None and fmt != "int4":  # (rtn was accepted silently there, where gptq was refused)
        raise MergeError(f"--quant-method {quant_method} {'calibrates' if quant_method == 'gptq' else 'quantizes'} an "
                         "Int4 export: add --format int4 (a float export is not quantized)")
    quant_method = quant_method or "rtn"
    check_route_flags(fmt, quant_method, {"--bits": bits, "--group-size": group_size, "--desc-act": desc_act,
                                          "--calib-data": calib_data, "--calib-samples": n_calib,
                                          "--calib-max-len": calib_max_len, "--damp-percent": damp_percent})
    bits = DEFAULTS["bits"] if bits is None else bits
    group_given = group_size is not None
    group_size = DEFAULTS["group_size"] if group_size is None else group_size
    damp_percent = DEFAULTS["damp_percent"] if damp_percent is None else damp_percent
    n_calib = DEFAULTS["n_calib"] if n_calib is None else n_calib
    calib_len_given = calib_max_len is not None
    calib_max_len = DEFAULTS["calib_max_len"] if calib_max_len is None else calib_max_len
    check_numbers(fmt, quant_method, n_calib, n_eval, calib_max_len, group_size, damp_percent, max_shard_size)
    base_dir = resolve_base(adapter, model)
    recorded = read_adapter_config(adapter).get("base_model_name_or_path")
    # the inputs: the base, the adapter, and the Int4 base a Q-LoRA adapter merged into its float twin is checked on
    inputs = [base_dir, adapter] + ([Path(recorded)] if recorded and model is not None else [])
    if any(out.resolve() == p.resolve() for p in inputs):
        raise MergeError(f"--output {out} is an input of this merge (the base, the adapter or the base the adapter "
                         f"was trained on); choose a new dir")
    if out.exists() and not out.is_dir():
        raise MergeError(f"--output {out} is a file, not a directory; choose a new dir")
    if out.is_symlink() and not out.exists():  # (the write failed on it after the whole merge had run)
        raise MergeError(f"--output {out} is a link to {os.readlink(out)}, which does not exist; remove the link or "
                         "choose a new dir")
    if (out / "adapter_config.json").is_file():  # (even with --overwrite) a model written beside an adapter
        raise MergeError(f"--output {out} holds an adapter (adapter_config.json): the merged model would be mixed "
                         f"into it; choose a new dir")

    if problem := unwritable_place(out):  # found now, not after the merge
        raise MergeError(f"--output {out}: {problem}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        if (out / INCOMPLETE).exists():
            raise MergeError(f"--output {out} holds an interrupted merge ({out / INCOMPLETE}); pass --overwrite to "
                             f"replace it")
        raise MergeError(f"--output {out} exists and is not empty (pass --overwrite to replace its files)")
    base_info = describe(base_dir)
    base_cfg, base_int4 = base_info.config, base_info.quantized
    seq_length = base_cfg.get("seq_length")
    if calib_len_given and isinstance(seq_length, int) and calib_max_len > seq_length:
        # (calibration conversations are cut to the model's seq_length, as training cuts them: more did nothing)
        raise MergeError(f"--calib-max-len {calib_max_len} is more than the model's seq_length {seq_length}, to which "
                         f"calibration conversations are cut (as training cuts them); give at most {seq_length}")
    recorded_gptq = None if base_int4 or not recorded else _gptq_settings(Path(recorded))
    qlora_on_float = recorded_gptq is not None
    if fmt == "int4" and not group_given and (base_int4 or qlora_on_float):
        # the Int4 base's own group size (a demo's 32), not 128 whatever it was
        group_size = (base_info.gptq if base_int4 else recorded_gptq)["group_size"]
    if base_int4:
        route = "int4 base: dequantize + merge"
    elif qlora_on_float:
        route = "Q-LoRA adapter merged into the float base"
    else:
        route = "LoRA merged into the float base"
    route += f" -> int{bits} ({quant_method})" if fmt == "int4" else f" -> {fmt} ({dtype})"
    log(f"merge: {route}; base {base_dir}, adapter {adapter}")
    report: dict = {}
    if model is not None and (other := check_base(adapter, base_dir, explicit=True)):  # (on the console already)
        report.setdefault("warnings", []).append(other)
    if base_int4 and trained_on(adapter) == "float":  # load_model below warns on the console
        report.setdefault("warnings", []).append(float_adapter_on_int4(adapter, base_dir))

    # (the adapter's vocabulary, copied into OUT where the base has none, is checked against the base first)
    tokenizer = load_tokenizer(base_dir, adapter=adapter)
    # data for the report (and GPTQ's calibration)
    train_data = training_data(adapter, changed=lambda data: log(
        f"merge: {data} (the adapter's training data in run_args.json) has changed since the run trained on it (its "
        "content differs): not used for the report or the calibration; pass --eval-data / --calib-data"))
    calib_path = calib_data or train_data
    eval_path = eval_data or calib_path
    # the flag that gave each path, for the errors (None: the adapter's training data, from its run_args.json)
    calib_flag = "--calib-data" if calib_data else None
    eval_flag = "--eval-data" if eval_data else calib_flag
    # the adapter's training data is read as its run read it: invalid records skipped (and counted) where it skipped
    skip = train_data is not None and trained_skipping_invalid(adapter)
    eval_all = load_eval_records(eval_path, flag=eval_flag, skip_invalid=skip and not eval_flag) if eval_path else []
    eval_records = _sample(eval_all, n_eval, seed)
    # say what the loss is measured on: held-out data only when the user gives it
    # (--calib-data's file was reported as the training data: the adapter may never have seen it)
    data_kind = "held-out" if eval_data else "calibration-data" if calib_data else "training-data"
    if eval_records and not eval_data:
        what = "the calibration data" if calib_data else "the adapter's training data"
        log(f"merge: no --eval-data: the loss below is on {len(eval_records)} conversations of {eval_path} "
            f"({what}, not held out)")
    if not eval_path and n_eval:  # said, not silently a report without a loss
        log(f"merge: no --eval-data, and {adapter} records no training data that is still readable and unchanged "
            f"(run_args.json): the report has no loss; pass --eval-data FILE for one")
    if fmt == "int4" and quant_method == "gptq" and not calib_path:
        raise MergeError("--quant-method gptq needs calibration conversations: pass --calib-data FILE (e.g. a "
                         "sample of your training data); the adapter's run_args.json names no readable data file")
    calib_records = None
    if fmt == "int4" and quant_method == "gptq":  # read (and checked) now, not after the merge
        # without --eval-data the report's data is this file, read and checked once above
        calib_all = eval_all if calib_path == eval_path else \
            load_eval_records(calib_path, flag=calib_flag, skip_invalid=skip and not calib_flag)
        calib_records = _sample(calib_all, n_calib, seed + 1)

    if eval_records and eval_data and train_data:
        from .data.dataset import files_in_both, named_in_both
        from .data.records import data_sources

        # --eval-data that the run trained on (the same file, a copy, or a file of its data dir) was reported as a
        # held-out loss (said after every data check: a merge that stops on bad data says only that)
        if both := files_in_both(train_data, eval_data):
            if len(both) == len(data_sources(eval_data)):
                data_kind = "training-data"
            _warn(report, f"--eval-data {eval_data}: {named_in_both(both)} the adapter's training data ({train_data}, "
                          "in its run_args.json): its loss is not a held-out loss")
    peft_model = load_model(base_dir, adapter=adapter, dtype=torch.float32, device=device)
    max_len = getattr(peft_model.config, "seq_length", None)
    # adapter_merged: what check_base reads to refuse this adapter on the merged model (its deltas twice)
    report.update({"route": route, "base": reference(base_dir), "adapter": reference(adapter),
                   "adapter_merged": adapter_identity(adapter), "output": os.path.abspath(out),
                   "format": fmt, "dtype": dtype, "eval_data": reference(eval_path) if eval_path else None,
                   "eval_data_kind": data_kind if eval_records else None, "eval_records": len(eval_records)})
    if eval_records:
        unmerged = eval_loss(peft_model, tokenizer, eval_records, max_len=max_len)
        report["unmerged_loss"] = unmerged["loss"]
        log(f"merge: {data_kind} loss of base+adapter (unmerged): {report['unmerged_loss']:.4f}")
        if unmerged["left_out"]:  # said, not a bare "nan" (no scored token at all) or a loss over fewer records
            log(f"merge: note: the loss leaves out {unmerged['left_out']} of {len(eval_records)} conversations: no "
                f"reply token within the model's seq_length {max_len} (the prompt fills it)")
        if cut := unmerged["truncated"]:  # as eval says it: a loss over the conversations' first max_len tokens
            log(f"merge: note: the loss scores {cut} of {len(eval_records)} conversations truncated to the model's "
                f"seq_length {max_len}, as training truncates them")
    if eval_records and qlora_on_float:
        # the cost against what was trained: the recorded Int4 base + adapter
        trained = load_model(Path(recorded), adapter=adapter, dtype=torch.float32, device=device)
        report["trained_int4_base_loss"] = eval_loss(trained, tokenizer, eval_records, max_len=max_len)["loss"]
        log(f"merge: {data_kind} loss of the Int4 base it was trained on + adapter: "
            f"{report['trained_int4_base_loss']:.4f}")
        del trained
    merged = merge_adapter(peft_model)
    del peft_model
    if eval_records:
        report["merged_fp32_loss"] = eval_loss(merged, tokenizer, eval_records, max_len=max_len)["loss"]

    if fmt == "float":
        check_float_layout(merged.state_dict(), merged)
        sd = {k: v.detach().to("cpu", DTYPES[dtype]) for k, v in merged.state_dict().items()}
    else:
        from .quant.rtn import quantize_state_dict

        if problem := unaligned_groups(merged, group_size):
            _warn(report, problem)
        float_sd = {k: v.detach().cpu() for k, v in merged.state_dict().items()}
        if quant_method == "rtn":
            sd = quantize_state_dict(float_sd, bits=bits, group_size=group_size, desc_act=desc_act)
            report["quantization"] = {"method": "rtn", "bits": bits, "group_size": group_size, "desc_act": desc_act}
        else:
            from .data import encode_conversation
            from .quant.gptq import gptq_quantize_model

            samples = [encode_conversation(tokenizer, r, max_len=min(calib_max_len, max_len or calib_max_len))
                       ["input_ids"] for r in calib_records]
            log(f"merge: GPTQ on {len(samples)} calibration conversations from {calib_path}")
            packed = gptq_quantize_model(merged, samples, bits=bits, group_size=group_size,
                                         damp_percent=damp_percent, desc_act=desc_act,
                                         true_sequential=true_sequential, log=log)
            sd = {}
            for k, v in float_sd.items():
                module, _, attr = k.rpartition(".")
                if module in packed and attr == "weight":
                    for pk, pv in packed[module].items():
                        sd[f"{module}.{pk}"] = pv.contiguous()
                elif v.is_floating_point():
                    sd[k] = v.to(torch.float16)
                else:
                    sd[k] = v
            report["quantization"] = {"method": "gptq", "bits": bits, "group_size": group_size,
                                      "desc_act": desc_act, "damp_percent": damp_percent,
                                      "true_sequential": true_sequential, "calib_data": reference(calib_path),
                                      "calib_samples": len(samples)}

    def write_model(d: Path) -> list[str]:
        names = save_sharded(sd, d, max_shard_size)
        if fmt == "float":
            write_float_config(base_cfg, d, DTYPES[dtype])
        else:
            write_int4_config(base_cfg, d, bits, group_size, desc_act, damp_percent,
                              true_sequential=true_sequential if quant_method == "gptq" else False,
                              model_name_or_path=str(base_dir))
        copy_side_files(base_dir, d, adapter)
        return names

    files = write_staged(out, write_model, log)
    del merged
    report["files"] = files

    if eval_records:
        reloaded = load_model(out, dtype=torch.float32, device=device)
        report["merged_loss"] = eval_loss(reloaded, tokenizer, eval_records, max_len=max_len)["loss"]
        report["loss_delta"] = report["merged_loss"] - report["unmerged_loss"]
        del reloaded
        log(f"merge: {data_kind} loss of the written model: {report['merged_loss']:.4f} "
            f"(unmerged {report['unmerged_loss']:.4f}, delta {report['loss_delta']:+.4f})")
        if fmt == "int4" and report["loss_delta"] > INT4_WARN_DELTA:
            if quant_method == "rtn":
                _warn(report, f"round-to-nearest Int4 raised the loss by {report['loss_delta']:+.4f} (more than "
                              f"{INT4_WARN_DELTA}): it lost part of the fine-tune; --quant-method gptq --calib-data "
                              f"FILE calibrates on your conversations and keeps more of it")
            else:  # (a calibrated export that still loses this much: only no re-quantization keeps all of it)
                _warn(report, f"GPTQ Int4 raised the loss by {report['loss_delta']:+.4f} (more than "
                              f"{INT4_WARN_DELTA}): it lost part of the fine-tune; the adapter unmerged (--adapter in "
                              f"chat, eval and serve) or a float merge (--format float) keeps all of it")
    report["seconds"] = round(time.time() - t0, 2)
    from .evaluate import json_safe

    (out / "merge_report.json").write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    log(f"merge: wrote {out} ({', '.join(files)})")
    return report


def _gptq_settings(path: Path) -> dict | None:
    """The GPTQ settings of a GPTQ model dir (describe's, validated), None for anything else (a float dir, or one
    that is not a readable model dir)."""
    from .errors import ModelLoadError
    from .model_dir import describe

    try:
        return describe(path).gptq if path.is_dir() else None
    except ModelLoadError:
        return None


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="qwen-ft merge", description=__doc__.split("\n\n")[0], examples=(
        "  qwen-ft merge -a output/my-adapter -m /models/Qwen-14B-Chat -o output/merged\n"
        "  qwen-ft merge -a output/my-adapter -o output/merged-int4 --format int4 --quant-method gptq"))
    once = {"action": Once}
    p.add_argument("-a", "--adapter", required=True, **once,
                   help="LoRA / Q-LoRA adapter dir (or a run's checkpoint-N, or a hub id)")
    p.add_argument("-m", "--model", **once,
                   help="base model dir (default: the base the adapter records); for a Q-LoRA adapter, the matching "
                        "bf16 model merges without re-quantizing")
    p.add_argument("-o", "--output", required=True, **once, help="new model dir")
    p.add_argument("--format", default="float", choices=["float", "bf16", "int4"], **once,
                   help="float: a float model in --dtype (default); bf16: the same as float with --dtype bf16; "
                        "int4: quantized again to GPTQ Int4 (Int8 with --bits 8; see --quant-method)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), **once,
                   help="float weights' dtype for --format float (default bf16)")
    p.add_argument("--quant-method", default=None, choices=["rtn", "gptq"], **once,
                   help="--format int4: rtn (round-to-nearest, no data; the default) or gptq (calibrated on "
                        "--calib-data; keeps more of the fine-tune)")
    p.add_argument("--calib-data", **once,
                   help="conversations for GPTQ calibration (default: the adapter's training data)")
    p.add_argument("--calib-samples", type=int, default=None, **once, help="GPTQ: conversations sampled (default 128)")
    p.add_argument("--calib-max-len", type=int, default=None, **once,
                   help="GPTQ: tokens a conversation (default 2048, or the model's seq_length where that is less; at "
                        "most the seq_length, to which conversations are cut)")
    p.add_argument("--eval-data", **once, help="held-out conversations for the loss report (default: the calibration "
                                               "or training data, reported as such)")
    p.add_argument("--eval-samples", type=int, default=64, **once,
                   help="conversations the loss report scores (of --eval-data or its default), sampled with --seed "
                        "where there are more (default 64; 0: no loss report)")
    p.add_argument("--bits", type=int, default=None, choices=[4, 8], **once, help="--format int4: 4 (default) or 8")
    p.add_argument("--group-size", type=int, default=None, **once,
                   help="--format int4: columns that share a scale (default: the Int4 base's, else 128; -1: one "
                        "group a row)")
    p.add_argument("--desc-act", action="store_true", help="--format int4: act-order (columns by importance)")
    p.add_argument("--damp-percent", type=float, default=None, **once,
                   help="GPTQ: dampening, a fraction of the Hessian's mean diagonal (default 0.01)")
    p.add_argument("--max-shard-size", default="2GB", **once,
                   help="the size at which the weights are split into several files with an index (a tensor is "
                        "never cut; default 2GB; e.g. 500MB, 1GiB)")
    p.add_argument("--device", default=None, **once,
                   help="where to merge (default: cuda if available); fp32 needs 4 bytes per parameter")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --output (its weights, configs and report are replaced; other "
                        "files stay)")
    p.add_argument("--seed", type=int, default=0, **once,
                   help="seed of the random samples: the report's conversations where there are more than "
                        "--eval-samples, GPTQ's where more than --calib-samples (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    expand_home(args, "model", "adapter", "output")
    if problem := repeated(args):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    from .adapters import AdapterError
    from .data import DataError
    from .hub import ModelNotFoundError
    from .loading import ModelLoadError

    try:
        merge(args.adapter, args.output, model=args.model, fmt=args.format, dtype=args.dtype,
              quant_method=args.quant_method, calib_data=args.calib_data, eval_data=args.eval_data,
              n_calib=args.calib_samples, n_eval=args.eval_samples, calib_max_len=args.calib_max_len,
              bits=args.bits, group_size=args.group_size, desc_act=args.desc_act, damp_percent=args.damp_percent,
              max_shard_size=args.max_shard_size, device=args.device, overwrite=args.overwrite, seed=args.seed)
    except (MergeError, AdapterError, ModelLoadError, ModelNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
