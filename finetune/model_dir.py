"""What a model dir is: its config.json, the model family, and float or GPTQ (bits, group size, act-order).

The one place that answers "is this dir GPTQ?" and reads config.json for it; loading, the preflight checks,
merge, the demo, the memory estimate and the model's own `from_pretrained` ask here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import ModelLoadError
from .quant.packing import check_bits, is_v2_format

FAMILIES = {"qwen": "Qwen v1"}  # model_type -> family (Qwen2 comes next: ARCHITECTURE.md)


@dataclasses.dataclass(frozen=True)
class ModelDir:
    path: Path
    config: dict  # config.json as read
    family: str  # a key of FAMILIES
    gptq: dict | None  # {bits, group_size, desc_act, sym, v2} for a GPTQ dir, None for a float one

    @property
    def quantized(self) -> bool:
        return self.gptq is not None


def read_config(model_dir) -> dict:
    """config.json of a supported model dir; ModelLoadError (one line naming the file) otherwise."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        if (model_dir / "adapter_config.json").is_file():  # the usual slip: the trainer's adapter dir as the model
            raise ModelLoadError(f"{model_dir} has no config.json: it is a LoRA adapter dir (adapter_config.json), "
                                 f"not a model dir; pass it as the adapter (chat/eval/merge --adapter, serve --adapter "
                                 f"NAME=DIR, train --lora_weight_path) and its base model as the model")
        raise ModelLoadError(f"{model_dir} has no config.json: not a model directory (expected config.json and "
                             f"model weights, as an official Qwen model dir has)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise ModelLoadError(
            f"{cfg_path}: model_type {model_type!r} is not supported; this loader handles Qwen v1 dirs "
            f"(model_type 'qwen', e.g. Qwen-7B-Chat, Qwen-14B-Chat, Qwen-14B-Chat-Int4)"
        )
    return cfg


def gptq_of(config) -> dict | None:
    """Validated {bits, group_size, desc_act, sym, v2} of a config (a dict or a config object) that declares GPTQ
    quantization, None for a float one; ModelLoadError for a quantization this project cannot load."""
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if not qc:
        return None
    if not isinstance(qc, dict):
        if not hasattr(qc, "to_dict") and not hasattr(qc, "__dict__"):
            raise ModelLoadError(f"quantization_config must be an object (bits, group_size, ...), got {qc!r}")
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    method = qc.get("quant_method", "gptq")
    method = str(getattr(method, "value", method)).lower()
    if method != "gptq":
        raise ModelLoadError(f"quantization_config quant_method {method!r} is not supported; only 'gptq' (4 or 8 "
                             "bits)")
    return _gptq_settings(qc, "quantization_config ")


def _whole(value) -> bool:
    return not isinstance(value, bool) and (isinstance(value, int) or isinstance(value, float) and value.is_integer())


def _gptq_settings(qc: dict, where: str) -> dict:
    """{bits, group_size, desc_act, sym, v2} of a GPTQ settings dict (config.json's quantization_config or
    auto-gptq's quantize_config.json), each field checked (``where`` prefixes the field in a message)."""
    bits = qc.get("bits", 4)
    if not _whole(bits):
        raise ModelLoadError(f"{where}bits must be 4 or 8, got {bits!r}")
    try:
        check_bits(int(bits))
    except ValueError as e:
        raise ModelLoadError(f"{where}{e}") from None
    group_size = qc.get("group_size", 128)
    group_size = -1 if group_size is None else group_size
    if not _whole(group_size) or not (group_size == -1 or group_size > 0):
        raise ModelLoadError(f"{where}group_size must be a positive integer or -1 (one group per row), got "
                             f"{qc.get('group_size')!r}")
    for key in ("desc_act", "sym"):
        if qc.get(key) is not None and not isinstance(qc[key], bool):
            raise ModelLoadError(f"{where}{key} must be true or false, got {qc[key]!r}")
    fmt = qc.get("checkpoint_format", qc.get("format"))
    if fmt is not None and str(fmt).lower() not in ("gptq", "gptq_v2"):
        raise ModelLoadError(f"{where}checkpoint_format {fmt!r} is not supported; 'gptq' (auto-gptq's v1, as Qwen's "
                             f"Int4 releases ship) or 'gptq_v2'")
    return {
        "bits": int(bits),
        "group_size": int(group_size),
        "desc_act": bool(qc.get("desc_act", False)),
        "sym": bool(qc.get("sym", True)),
        "v2": is_v2_format(qc),
    }


QUANTIZE_CONFIG = "quantize_config.json"
# the settings that decide how the packed tensors are read (sym only decided how they were made)
_LAYOUT = ("bits", "group_size", "desc_act", "v2")


def check_quantize_config(model_dir, gptq: dict | None) -> None:
    """auto-gptq's quantize_config.json, where present beside a GPTQ config.json, must describe the same layout:
    auto-gptq loads by it, transformers by config.json, so two different answers are refused rather than one
    silently picked. Without quantization_config in config.json it is said so, naming both files."""
    path = Path(model_dir) / QUANTIZE_CONFIG
    if not path.is_file():
        return
    cfg_path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if gptq is None:
        return  # a float dir with a stale quantize_config.json; a packed checkpoint is named by the weight check
    own = _gptq_settings(data, f"{path}: ")
    for key in _LAYOUT:
        if own[key] != gptq[key]:
            name = "checkpoint_format" if key == "v2" else key
            raise ModelLoadError(f"{path}: {name} {own[key]!r} contradicts {cfg_path}'s quantization_config "
                                 f"({gptq[key]!r}); the two files must describe the same checkpoint")


def describe(model_dir) -> ModelDir:
    """What the dir at `model_dir` is (config.json only; nothing else is read)."""
    cfg = read_config(model_dir)
    try:
        gptq = gptq_of(cfg)
    except ModelLoadError as e:
        raise ModelLoadError(f"{Path(model_dir) / 'config.json'}: {e}") from None
    check_quantize_config(model_dir, gptq)
    return ModelDir(path=Path(model_dir), config=cfg, family=cfg["model_type"], gptq=gptq)


def generation_file(model_dir, adapter_dir=None) -> Path:
    """The generation_config.json that applies: an adapter's own (training on a base model writes one, see
    chat_generation_config) before the model dir's."""
    if adapter_dir is not None and (Path(adapter_dir) / "generation_config.json").is_file():
        return Path(adapter_dir) / "generation_config.json"
    return Path(model_dir) / "generation_config.json"


def _generation(model_dir, adapter_dir=None) -> dict:
    """The applying generation_config.json as read; {} where it is absent or broken (the loader names the file)."""
    try:
        gen = json.loads(generation_file(model_dir, adapter_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return gen if isinstance(gen, dict) else {}


def chat_format(model_dir, adapter_dir=None) -> str:
    """The chat format the applying generation_config.json names: "chatml" (Qwen-*-Chat; also a dir without the
    file or the field, as the official chat() defaults), or a base model's "raw". A broken file reads as chatml:
    the loader names the file."""
    return str(_generation(model_dir, adapter_dir).get("chat_format") or "chatml")


def chat_generation_config(model_dir) -> dict | None:
    """A base model's generation_config.json (chat_format "raw", as Qwen-7B's) with chat_format "chatml": what a
    model or adapter trained on it here is saved with, as it learnt the ChatML of the training data (the official
    scripts kept "raw", so that chat() refused the result). None for a chat model's dir."""
    gen = _generation(model_dir)
    return None if str(gen.get("chat_format") or "chatml") == "chatml" else {**gen, "chat_format": "chatml"}


def check_chat_format(model_dir, adapter_dir=None) -> None:
    """A model (or adapter) whose generation config has a chat_format other than chatml, a base model's "raw",
    cannot chat: one line before the weights load, not model.chat's ValueError at the first reply."""
    fmt = chat_format(model_dir, adapter_dir)
    if fmt == "chatml":
        return
    path = generation_file(model_dir, adapter_dir)
    hint = ""
    if adapter_dir is not None and path.parent == Path(model_dir):
        # (an adapter trained here on a base model carries a chatml generation_config.json; one from elsewhere not)
        hint = (f"; if the adapter was trained on chat data (ChatML), copy {path.name} into {adapter_dir} with "
                f"\"chat_format\": \"chatml\"")
    raise ModelLoadError(f"{path}: chat_format {fmt!r}: chat needs a chat model (chat_format \"chatml\", as "
                         f"Qwen-*-Chat have); {fmt!r} is a base model's{hint}")
