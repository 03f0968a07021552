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
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    method = qc.get("quant_method", "gptq")
    method = str(getattr(method, "value", method)).lower()
    if method != "gptq":
        raise ModelLoadError(f"quantization_config quant_method {method!r} is not supported; only 'gptq' (4 or 8 "
                             "bits)")
    bits = int(qc.get("bits", 4))
    try:
        check_bits(bits)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    group_size = qc.get("group_size", 128)
    return {
        "bits": bits,
        "group_size": -1 if group_size is None else int(group_size),
        "desc_act": bool(qc.get("desc_act", False)),
        "sym": bool(qc.get("sym", True)),
        "v2": is_v2_format(qc),
    }


def describe(model_dir) -> ModelDir:
    """What the dir at `model_dir` is (config.json only; nothing else is read)."""
    cfg = read_config(model_dir)
    try:
        gptq = gptq_of(cfg)
    except ModelLoadError as e:
        raise ModelLoadError(f"{Path(model_dir) / 'config.json'}: {e}") from None
    return ModelDir(path=Path(model_dir), config=cfg, family=cfg["model_type"], gptq=gptq)
