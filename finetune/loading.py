"""Model dir (float or GPTQ Int4) + optional adapter -> a model ready for chat, training or evaluation.

Every way a dir can be wrong ends in one `ModelLoadError` naming the dir and the cause (no config.json, unknown
model_type, missing / unexpected / mis-shaped weights), checked before transformers is asked to load anything.
Loading the model needs no vocabulary file.
"""

from __future__ import annotations

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


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
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
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"unknown device {device!r} ({' '.join(str(e).split())[:120]}); use cpu, cuda or "
                             "cuda:N") from None
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


def checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of every tensor in the dir's weight files, read from headers (no weights loaded)."""
    return {k: v.shape for k, v in checkpoint_tensors(model_dir).items()}


# Fields of config.json the architecture is built from: each must be a positive integer.
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "kv_channels", "seq_length")


def model_config(model_dir: Path, cfg: dict | None = None):
    """The QWenConfig of a model dir, with the fields the architecture is built from checked (one line naming
    config.json and the field), and the model buildable from it (checked on the meta device)."""
    from .modeling import QWenConfig, QWenLMHeadModel

    cfg_path = model_dir / "config.json"
    cfg = read_config(model_dir) if cfg is None else cfg
    for key in _POSITIVE_INTS:
        value = cfg.get(key)
        if key in cfg and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ModelLoadError(f"{cfg_path}: {key} must be a positive integer, got {value!r}")
    try:
        config = QWenConfig.from_pretrained(str(model_dir))
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

            try:  # what from_pretrained does with the file's contents: transformers' own validation of the values
                GenerationConfig.from_dict(data)
            except Exception as e:  # in one line
                raise ModelLoadError(f"{path}: not a valid generation config "
                                     f"({type(e).__name__}: {' '.join(str(e).split())})") from None


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
    if problems:
        raise ModelLoadError(f"{model_dir}: the weights do not match config.json: " + "; ".join(problems))
    for k in expected:
        if infos[k].dtype not in FLOAT_DTYPES:
            raise ModelLoadError(f"{infos[k].file}: tensor {k!r} is {infos[k].dtype}, expected a float tensor "
                                 f"(a float model's weights; an Int4 dir declares quantization_config)")


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
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    dtype = _parse_dtype(dtype) or default_dtype(device)
    if model_dir is None and adapter:
        from .adapters import resolve_base

        model_dir = resolve_base(adapter)
    model_dir = resolve_model_dir(model_dir)
    info = describe(model_dir)
    cfg = info.config

    config = model_config(model_dir, cfg)
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

    # PEFT records this as the adapter's base: the absolute path, valid from any working directory
    model.name_or_path = str(model_dir.resolve())
    model.config._name_or_path = model.name_or_path
    if adapter:
        from .adapters import load_adapter  # checks the adapter against the model, then PEFT

        model = load_adapter(model, resolve_model_dir(adapter, "adapter directory"))
    model.eval()
    return model


__all__ = ["load_model", "ModelLoadError", "check_device", "default_dtype", "check_weights", "checkpoint_shapes",
           "inspect_model_dir", "model_config", "read_config", "check_side_files"]
