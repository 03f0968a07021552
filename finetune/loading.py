"""Model dir (float or GPTQ Int4) + optional adapter -> a model ready for chat, training or evaluation.

Every way a dir can be wrong ends in one `ModelLoadError` naming the dir and the cause (no config.json, unknown
model_type, missing / unexpected / mis-shaped weights), checked before transformers is asked to load anything.
Loading the model needs no vocabulary file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import ModelLoadError
from .hub import resolve_model_dir
from .model_dir import describe, read_config
from .checkpoint import FLOAT_DTYPES, checkpoint_tensors

def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bf16 where the hardware has it (CUDA with bf16 support), else fp32 (CPU), as training/precision.py decides for training."""
    dev = torch.device(device) if device is not None else None
    on_cuda = torch.cuda.is_available() if dev is None else dev.type == "cuda"
    if on_cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype in (torch.bfloat16, torch.float16, torch.float32):
        return dtype
    if isinstance(dtype, torch.dtype):  # (torch.int8 failed deep in the load: "Only Tensors of floating point ...")
        raise ModelLoadError(f"unsupported dtype {dtype}; use one of bf16, fp16, fp32 (torch.bfloat16, torch.float16, "
                             "torch.float32)")
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    if str(dtype).lower() not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    return names[str(dtype).lower()]


def check_device(device) -> torch.device:
    """``device`` as a torch.device that exists here; else ModelLoadError in one line (not torch's assertion
    from deep inside the first copy to it, after the weights were read)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):  # (torch's words listed 20 device types, cut off mid-word)
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if not torch.backends.cuda.is_built() else "no GPU is visible"
            raise ModelLoadError(f"device {device!r}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r}: there are {torch.cuda.device_count()} GPUs here "
                                 f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif dev.type != "cpu":
        raise ModelLoadError(f"device {device!r}: only cpu and cuda are supported")
    return dev


def placement_problem(device=None, dtype=None) -> str | None:
    """A --device / --dtype flag that check_device / parse_dtype refuse, as one line naming it, or None: for a
    command to check before it reads anything (data, a hub download, weights), as serve does."""
    for flag, value, check in (("--device", device, check_device), ("--dtype", dtype, parse_dtype)):
        if value is not None:
            try:
                check(value)
            except ModelLoadError as e:
                return f"{flag}: {e}"
    return None


def checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of every tensor in the dir's weight files, read from headers (no weights loaded)."""
    return {k: v.shape for k, v in checkpoint_tensors(model_dir).items()}


# Fields of config.json the architecture is built from: each must be a positive integer (an integral float such as
# 64.0, as some JSON writers emit, is taken as the integer).
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "kv_channels", "seq_length", "max_position_embeddings")
# ... positive numbers (a string "1e-6" failed at the first forward; a zero or negative one gave NaN or garbage)
_POSITIVE_NUMBERS = ("layer_norm_epsilon", "rotary_emb_base")
# ... numbers in a range
_RANGES = (("emb_dropout_prob", lambda v: 0 <= v < 1, "a number in [0, 1)"),
           ("attn_dropout_prob", lambda v: 0 <= v < 1, "a number in [0, 1)"),
           ("rotary_pct", lambda v: 0 < v <= 1, "a number in (0, 1]"),
           ("initializer_range", lambda v: v >= 0, "a number >= 0"))
# ... and booleans (the string "false" is truthy: it switched the feature on)
_BOOLS = ("no_bias", "use_dynamic_ntk", "use_logn_attn", "scale_attn_weights", "bf16", "fp16", "fp32",
          "softmax_in_fp32", "use_cache_quantization", "use_cache_kernel", "tie_word_embeddings")


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == value


def model_config(model_dir: Path, cfg: dict | None = None):
    """The QWenConfig of a model dir, with the fields the architecture is built from checked (one line naming
    config.json and the field), and the model buildable from it (checked on the meta device)."""
    from .modeling import QWenConfig, QWenLMHeadModel

    cfg_path = model_dir / "config.json"
    cfg = read_config(model_dir) if cfg is None else cfg
    integral = {}
    for key in _POSITIVE_INTS:
        value = cfg.get(key)
        if isinstance(value, float) and value.is_integer():
            value = integral[key] = int(value)
        if key in cfg and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ModelLoadError(f"{cfg_path}: {key} must be a positive integer, got {cfg[key]!r}")
    for key in _POSITIVE_NUMBERS:
        if key in cfg and not (_is_number(cfg[key]) and cfg[key] > 0):
            raise ModelLoadError(f"{cfg_path}: {key} must be a positive number, got {cfg[key]!r}")
    for key, ok, want in _RANGES:
        if key in cfg and not (_is_number(cfg[key]) and ok(cfg[key])):
            raise ModelLoadError(f"{cfg_path}: {key} must be {want}, got {cfg[key]!r}")
    if "use_flash_attn" in cfg and cfg["use_flash_attn"] not in (True, False, "auto"):
        raise ModelLoadError(f"{cfg_path}: use_flash_attn must be true, false or \"auto\", got "
                             f"{cfg['use_flash_attn']!r}")
    for key in _BOOLS:
        if key in cfg and not isinstance(cfg[key], bool):
            raise ModelLoadError(f"{cfg_path}: {key} must be true or false, got {cfg[key]!r}")
    try:
        config = QWenConfig.from_pretrained(str(model_dir), **integral)
        with torch.device("meta"):
            QWenLMHeadModel(config)
    except Exception as e:  # whatever the constructor trips on, said in one line about the file
        raise ModelLoadError(f"{cfg_path}: does not describe a buildable Qwen model ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
    check_side_files(model_dir)
    return config


def check_side_files(model_dir: Path) -> None:
    """generation_config.json and tokenizer_config.json, where present, as readable JSON objects (and the first as
    a generation config): the loaders read the first after the weights (a traceback then), and the vocabulary check
    would silently skip the ids a broken second one records."""
    import json

    for name in ("generation_config.json", "tokenizer_config.json"):
        path = model_dir / name
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
        if name == "generation_config.json":
            from transformers import GenerationConfig

            problem = generation_problem(data)  # (first: its lines name the field and the range)
            if problem:
                raise ModelLoadError(f"{path}: {problem}")
            try:  # what from_pretrained does with the file's contents: transformers' own validation of the values
                GenerationConfig.from_dict(data)
            except Exception as e:  # in one line
                raise ModelLoadError(f"{path}: not a valid generation config "
                                     f"({type(e).__name__}: {' '.join(str(e).split())})") from None


def generation_problem(gen: dict) -> str | None:
    """The first value of a generation_config.json that the chat, the engine or generate() would trip on (a
    traceback at the first reply) or silently misread, as ``<field> must be ..., got ...``; the ranges are the chat
    flags' (modeling/sampling_ranges.py SAMPLING_RANGES)."""
    from .inference.sampling import GREEDY_BELOW
    from .modeling.sampling_ranges import SAMPLING_RANGES, whole

    def _ids(value) -> bool:
        return isinstance(value, list) and bool(value) and all(whole(t) and t >= 0 for t in value)

    checks = [
        *((name, *SAMPLING_RANGES[name]) for name in SAMPLING_RANGES),
        ("max_new_tokens", lambda v: whole(v) and v >= 1, "an integer of at least 1 (tokens)"),
        ("min_new_tokens", lambda v: whole(v) and v >= 0, "an integer >= 0 (tokens)"),
        ("max_window_size", lambda v: whole(v) and v >= 1, "an integer of at least 1 (tokens)"),
        ("eos_token_id", lambda v: _ids([v]) or _ids(v), "a token id or a list of token ids"),
        ("pad_token_id", lambda v: _ids([v]), "a token id"),
        ("stop_words_ids", lambda v: isinstance(v, list) and all(_ids(s) for s in v),
         "a list of token-id lists, e.g. [[151643]]"),
        ("do_sample", lambda v: isinstance(v, bool), "true or false"),
    ]
    for key, ok, want in checks:
        if gen.get(key) is not None and not ok(gen[key]):
            return f"{key} must be {want}, got {gen[key]!r}"
    if gen.get("do_sample") and gen.get("temperature") is not None and gen["temperature"] < GREEDY_BELOW:
        return (f"temperature {gen['temperature']!r} with do_sample true: sampling needs a temperature of at least "
                f"{GREEDY_BELOW}; for greedy decoding set do_sample false")
    return None


def check_weights(model_dir: Path, config) -> None:
    """Compare the checkpoint's names, shapes and dtypes (from headers) with what the config's model expects."""
    from .modeling import QWenLMHeadModel

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in QWenLMHeadModel(config).state_dict().items()}
    infos = checkpoint_tensors(model_dir)
    found = {k: v.shape for k, v in infos.items() if not k.endswith("rotary_emb.inv_freq")}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [k for k in expected if k in found and found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if mismatched:
        k = mismatched[0]
        problems.append(f"{len(mismatched)} mis-shaped (first: {k}: checkpoint {list(found[k])}, "
                        f"config expects {list(expected[k])})")
    if any(k.endswith(".qweight") for k in unexpected):  # GPTQ-packed weights under a float config.json
        qc = model_dir / "quantize_config.json"
        problems.append("the checkpoint is GPTQ-packed (qweight) but config.json has no quantization_config" +
                        (f" (the settings are in {qc.name}: add them to config.json as quantization_config with "
                         f"quant_method 'gptq', as Qwen's Int4 releases have them)" if qc.is_file() else ""))
    if problems:
        raise ModelLoadError(f"{model_dir}: the weights do not match config.json: " + "; ".join(problems))
    for k in expected:
        if infos[k].dtype not in FLOAT_DTYPES:
            raise ModelLoadError(f"{infos[k].file}: tensor {k!r} is {infos[k].dtype}, expected a float tensor "
                                 f"(a float model's weights; an Int4 dir declares quantization_config)")


_CHUNK = 2**24  # elements a finiteness check looks at at once (a 16 MiB mask, not one the size of an embedding)


def check_finite_weights(model, model_dir: Path) -> None:
    """Refuse (naming the file and tensor) float weights holding NaN or infinite values: every output of the model
    would be NaN or garbage, with no word why (a broken conversion or download). One pass over the loaded weights,
    a few chunks at a time."""
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or t.device.type == "meta":
            continue
        flat = t.detach().reshape(-1)
        bad = sum(int((~torch.isfinite(flat[i:i + _CHUNK])).sum()) for i in range(0, flat.numel(), _CHUNK))
        if bad:
            info = checkpoint_tensors(model_dir).get(name)
            where = info.file if info is not None else model_dir
            raise ModelLoadError(f"{where}: tensor {name!r} has {bad} of {t.numel()} values NaN or infinite (loaded "
                                 f"as {str(t.dtype).removeprefix('torch.')}); the weights are broken (copy the model "
                                 f"dir again from its source)")


def inspect_model_dir(model_dir) -> dict:
    """Everything about a model dir that can be checked without reading weights: config.json, the weight files'
    headers against their sizes, and every tensor's name, shape and dtype against the config (GPTQ dirs: also the
    quantization settings and g_idx ranges). Raises ModelLoadError (one line naming the file); returns config.json."""
    model_dir = resolve_model_dir(model_dir)
    info = describe(model_dir)
    cfg = info.config
    config = model_config(model_dir, cfg)
    if info.quantized:
        from .quant.loading import check_gptq_dir

        check_gptq_dir(model_dir, config)
    else:
        check_weights(model_dir, config)
    return cfg


def load_model(model_dir, adapter=None, dtype=None, device=None):
    """Load a Qwen v1 model dir (local or hub id) in the compute dtype, optionally with a PEFT adapter, in eval mode.

    device: default "cuda" when a GPU is there, else "cpu". dtype: default bf16 on a GPU with bf16, else fp32;
    every float weight is cast to it once, here. With an adapter and model_dir None, the base is the one the
    adapter records (see finetune/adapters.py)."""
    for name, value in (("model_dir", model_dir), ("adapter", adapter)):
        # ("" was read as no adapter, and None as the model dir failed inside os.fspath)
        if value is not None and not (isinstance(value, (str, os.PathLike)) and str(value).strip()):
            raise ModelLoadError(f"load_model: {name} must be a path (or a hub id), got {value!r}")
    if model_dir is None and adapter is None:
        raise ModelLoadError("load_model: give the model dir (or an adapter, whose recorded base is loaded)")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    dtype = parse_dtype(dtype) or default_dtype(device)
    if model_dir is None and adapter:
        from .adapters import resolve_base

        model_dir = resolve_base(adapter)
    model_dir = resolve_model_dir(model_dir)
    info = describe(model_dir)
    cfg = info.config

    config = model_config(model_dir, cfg)
    if adapter:
        # the adapter checked against the model's names and shapes before the base's weights load (minutes and the
        # GPU's memory on a 14B model): a truncated file or another rank or model size is said at once
        from .adapters import adapter_tensor_shapes, check_adapter, lora_config
        from .modeling import QWenLMHeadModel

        adapter_dir = resolve_model_dir(adapter, "adapter directory")
        with torch.device("meta"):  # names and shapes only; GPTQ layers have the Linears' names and sizes
            meta = QWenLMHeadModel(config)
        check_adapter(meta, adapter_dir, lora_config(adapter_dir), adapter_tensor_shapes(adapter_dir))
        check_side_files(adapter_dir)  # (its generation_config.json, where it has one, is the model's below)
    if info.quantized:
        from .quant.loading import load_gptq_model  # the Int4 path (finetune/quant)

        model = load_gptq_model(model_dir, config=config, dtype=dtype, device=device)
    else:
        from .modeling import QWenLMHeadModel

        check_weights(model_dir, config)
        try:
            model = QWenLMHeadModel.from_pretrained(str(model_dir), config=config, dtype=dtype)
        except Exception as e:  # one readable error instead of a deep transformers traceback
            raise ModelLoadError(f"{model_dir}: loading the weights failed: {type(e).__name__}: {e}") from e
        model = model.to(device)

    check_finite_weights(model, model_dir)
    # PEFT records this as the adapter's base: the absolute path, valid from any working directory
    model.name_or_path = str(model_dir.resolve())
    model.config._name_or_path = model.name_or_path
    if adapter:
        from .adapters import load_adapter, use_adapter_generation_config  # checks the adapter, then PEFT

        use_adapter_generation_config(model, adapter_dir)
        model = load_adapter(model, adapter_dir)
    model.eval()
    return model


__all__ = ["load_model", "ModelLoadError", "check_device", "placement_problem", "default_dtype", "check_weights",
           "checkpoint_shapes", "inspect_model_dir", "model_config", "check_finite_weights", "read_config",
           "check_side_files"]
