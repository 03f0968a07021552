"""Load a GPTQ (Int4/Int8) Qwen v1 directory into QWenLMHeadModel with GPTQLinear layers.

The model is built with its parameters on the meta device; every Linear that the checkpoint stores as
``<name>.qweight`` becomes a GPTQLinear; then the checkpoint is streamed tensor by tensor (safetensors
shard by shard, or pytorch_model.bin memory-mapped) straight into place on the target device. No float copy
of the quantized weights is ever made: a 14B Int4 dir needs ~10 GB of GPU memory (7 GB packed + two 1.5 GB
bf16 embeddings).

Dtypes (the precision policy, training/precision.py): float tensors of the checkpoint (embedding, lm_head, norms, c_attn bias)
are cast once to the compute dtype (bf16 on CUDA where supported, fp32 on CPU, or what ``dtype`` says);
GPTQ buffers keep their own dtypes (int32; scales fp16).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ModelLoadError
from ..checkpoint import FLOAT_DTYPES, INT_DTYPES, checkpoint_files, checkpoint_tensors, iter_tensors
from .linear import GPTQLinear
from .packing import default_g_idx, num_groups, pack_rows
from .rtn import QWEN_QUANTIZED_SUFFIXES, is_quantized_module_name

GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


class GPTQLoadError(ModelLoadError):
    """A GPTQ model dir that cannot be loaded; the message says which dir and why."""


# -- config ---------------------------------------------------------------------------------------------


def gptq_settings(quantization_config) -> dict:
    """Validated {bits, group_size, desc_act, sym, v2} from a config's quantization_config (model_dir.gptq_of)."""
    from ..model_dir import gptq_of

    try:
        settings = gptq_of({"quantization_config": quantization_config})
    except ModelLoadError as e:
        raise GPTQLoadError(str(e)) from None
    if settings is None:
        raise GPTQLoadError("config has no quantization_config; not a GPTQ model")
    return settings


def _resolve_device(device, device_map=None) -> torch.device:
    if device is None and device_map is not None:
        if isinstance(device_map, dict):
            devices = {str(v) for v in device_map.values()}
            if len(devices) != 1:
                raise GPTQLoadError(f"device_map spreading the model over several devices is not supported: {device_map}")
            device = devices.pop()
        elif device_map in ("auto", "balanced", "sequential"):
            device = None
        else:
            device = device_map
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, str) and dtype != "auto":
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "half": torch.float16, "fp32": torch.float32, "float32": torch.float32,
                 "float": torch.float32}
        if dtype.lower() not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
        return names[dtype.lower()]
    if isinstance(dtype, torch.dtype):
        return dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# -- building -------------------------------------------------------------------------------------------


def _build_meta_model(config):
    """The causal-LM class registered for the config's type (the Qwen v1 model: finetune/registry.py), on the
    meta device. Looked up, not imported: this package is a layer the models use, never the other way round."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    with torch.device("meta"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    return model


def replace_with_gptq_linears(model: nn.Module, module_names, settings: dict, with_bias=None) -> list[str]:
    """Swap the named nn.Linear modules for (meta) GPTQLinear of the same shape; returns the names.

    ``with_bias``: names whose checkpoint holds a ``bias`` (some GPTQ writers store one for every layer);
    None = as the float Linear has it."""
    replaced = []
    for name in module_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child, None)
        if not isinstance(old, nn.Linear):
            raise GPTQLoadError(f"checkpoint has GPTQ tensors for {name!r}, but the model has no Linear there "
                                f"(found {type(old).__name__})")
        new = GPTQLinear(
            old.in_features,
            old.out_features,
            bias=(old.bias is not None) if with_bias is None else (name in with_bias),
            bits=settings["bits"],
            group_size=settings["group_size"],
            v2=settings["v2"],
            desc_act=settings["desc_act"],
            device="meta",
        )
        setattr(parent, child, new)
        replaced.append(name)
    return replaced


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = value


def _expected_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer the checkpoint must provide."""
    out = dict(model.named_parameters(remove_duplicate=False))
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for bname, buf in mod._buffers.items():
            if buf is None or bname in mod._non_persistent_buffers_set:
                continue
            out[f"{mod_name}.{bname}" if mod_name else bname] = buf
    return out


def _checked_meta_model(model_dir: Path, config):
    """The meta model (GPTQLinear where the checkpoint is packed) after every check that needs no weights:
    quantization settings, tensor names, header shapes and dtypes, g_idx ranges."""
    try:
        settings = gptq_settings(getattr(config, "quantization_config", None))
    except GPTQLoadError as e:
        raise GPTQLoadError(f"{model_dir}: {e}") from None

    infos = checkpoint_tensors(model_dir, GPTQLoadError)
    keys = {name: info.file for name, info in infos.items()}
    quant_modules = sorted({k[: -len(".qweight")] for k in keys if k.endswith(".qweight")})
    if not quant_modules:
        raise GPTQLoadError(f"{model_dir}: config.json declares GPTQ quantization but the checkpoint has no "
                            f"'*.qweight' tensors")

    model = _build_meta_model(config)
    replace_with_gptq_linears(model, quant_modules, settings, with_bias={m for m in quant_modules if f"{m}.bias" in keys})
    expected = _expected_tensors(model)
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]

    unexpected = [k for k in keys if k not in expected and not any(p.search(k) for p in ignore)]
    missing = [k for k in expected if k not in keys]
    # g_idx absent (some exporters omit it without desc_act): the default k // group_size order
    default_g_idx_for = [k for k in missing if k.endswith(".g_idx") and not settings["desc_act"]]
    missing = [k for k in missing if k not in default_g_idx_for]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s), first {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), first {unexpected[0]!r}")
        raise GPTQLoadError(f"{model_dir}: the checkpoint does not match the model: " + "; ".join(parts))
    _check_header_shapes(model_dir, infos, expected, settings)
    _check_g_idx(model, keys, [k for k in keys if k.endswith(".g_idx") and k in expected])

    return model, settings, expected, default_g_idx_for, tied


def check_gptq_dir(model_dir, config) -> None:
    """Raise GPTQLoadError (one line naming the file and tensor) unless the GPTQ dir can load; reads headers and
    the small g_idx tensors only."""
    _checked_meta_model(Path(model_dir), config)


def load_gptq_model(model_dir, config=None, dtype=None, device=None, **kwargs):
    """A GPTQ Qwen v1 dir -> QWenLMHeadModel (eval mode) with GPTQLinear layers, on ``device``.

    ``dtype``: compute dtype for the float weights (default bf16 on CUDA with bf16, else fp32);
    ``device``: default the current CUDA device when there is one, else CPU. Accepts (and mostly
    ignores) from_pretrained's kwargs: ``torch_dtype`` (alias of dtype), ``device_map`` (one device only),
    ``trust_remote_code``, ``low_cpu_mem_usage``, ``revision``...
    """
    from finetune.hub import resolve_model_dir

    model_dir = resolve_model_dir(model_dir)
    if dtype is None:
        dtype = kwargs.pop("torch_dtype", None)
    device = _resolve_device(device, kwargs.pop("device_map", None))
    dtype = _resolve_dtype(dtype, device)
    if config is None:
        from finetune.modeling import QWenConfig

        config = QWenConfig.from_pretrained(str(model_dir))
    model, settings, expected, default_g_idx_for, tied = _checked_meta_model(model_dir, config)

    for path, _ in checkpoint_files(model_dir):
        for name, tensor in iter_tensors(path):
            target = expected.get(name)
            if target is None:
                continue  # ignored key (e.g. rotary inv_freq)
            if tuple(tensor.shape) != tuple(target.shape):
                raise GPTQLoadError(f"{model_dir}: tensor {name!r} has shape {tuple(tensor.shape)} in the "
                                    f"checkpoint, the model expects {tuple(target.shape)}")
            attr = name.rpartition(".")[2]
            module = model.get_submodule(name.rpartition(".")[0])
            if isinstance(module, GPTQLinear) and attr in GPTQLinear._NEVER_CAST:
                want = target.dtype  # int32, scales fp16: never cast
                if attr != "scales" and tensor.is_floating_point():
                    raise GPTQLoadError(f"{model_dir}: {name!r} is {tensor.dtype}, expected an integer tensor")
            elif tensor.is_floating_point():
                want = dtype
            else:
                want = tensor.dtype
            _set_tensor(model, name, tensor.to(device=device, dtype=want))
            del tensor

    for name in default_g_idx_for:
        module = model.get_submodule(name.rpartition(".")[0])
        _set_tensor(model, name, default_g_idx(module.in_features, module.group_size, device=device))
    if tied:
        model.tie_weights()
    still_meta = [n for n, t in _expected_tensors(model).items() if t.device.type == "meta"]
    if still_meta:
        raise GPTQLoadError(f"{model_dir}: {len(still_meta)} tensor(s) not loaded, first {still_meta[0]!r}")
    _check_no_meta_buffers(model, str(model_dir))
    model.name_or_path = str(model_dir)  # PEFT records it as base_model_name_or_path
    model.config._name_or_path = str(model_dir)
    if (model_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    model.eval()
    return model


def _check_header_shapes(model_dir, infos, expected, settings=None) -> None:
    """Shapes and dtype kinds of every tensor, from the files' headers, against the model config.json describes."""
    for name, info in infos.items():
        target = expected.get(name)
        if target is None:
            continue
        attr = name.rpartition(".")[2]
        if tuple(info.shape) != tuple(target.shape):
            packed = f" (packed with bits {settings['bits']}, group_size {settings['group_size']} from its " \
                     f"quantization_config)" if settings and attr in GPTQ_SUFFIXES else ""
            raise GPTQLoadError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, but config.json's model "
                                f"expects {list(target.shape)}{packed}")
        if attr in ("qweight", "qzeros", "g_idx") and info.dtype not in INT_DTYPES:
            raise GPTQLoadError(f"{info.file}: tensor {name!r} is {info.dtype}, expected an integer tensor (int32)")
        if target.is_floating_point() and info.dtype not in FLOAT_DTYPES:
            raise GPTQLoadError(f"{info.file}: tensor {name!r} is {info.dtype}, expected a float tensor")


def _check_g_idx(model: nn.Module, keys: dict[str, Path], names: list[str]) -> None:
    """Every g_idx value names a group of its layer (an out-of-range one would index past the scales)."""
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(keys[n], []).append(n)
    for path, file_names in by_file.items():
        for name, g_idx in _read_tensors(path, file_names):
            module = model.get_submodule(name.rpartition(".")[0])
            groups = num_groups(module.in_features, module.group_size)
            if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
                bad = int(g_idx.max()) if int(g_idx.max()) >= groups else int(g_idx.min())
                raise GPTQLoadError(f"{path}: tensor {name!r} holds group index {bad}, but the layer has {groups} "
                                    f"groups (0..{groups - 1}; in_features {module.in_features}, group_size "
                                    f"{module.group_size}): the checkpoint is corrupt")


def _read_tensors(path: Path, names: list[str]):
    """(name, CPU tensor) for the named tensors of one file, reading only those."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in names:
                yield name, f.get_tensor(name)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for name in names:
            yield name, sd[name]


def _check_no_meta_buffers(model: nn.Module, where: str) -> None:
    """Buffers the checkpoint does not hold (non-persistent ones) cannot be recovered from a meta build."""
    for mod_name, mod in model.named_modules():
        for bname, buf in mod._buffers.items():
            if buf is not None and buf.device.type == "meta":
                raise GPTQLoadError(
                    f"{where}: buffer {mod_name}.{bname} is not in the checkpoint and was built on the meta "
                    f"device; the model must compute it (e.g. in forward) rather than hold it as a "
                    f"non-persistent buffer"
                )


# -- random models for benchmarks -----------------------------------------------------------------------


def build_gptq_model_on_device(config, device="cuda", dtype=torch.bfloat16, seed=0, suffixes=QWEN_QUANTIZED_SUFFIXES):
    """A QWenLMHeadModel with random GPTQ weights made directly on ``device`` (no files): every Linear named
    by ``suffixes`` is a GPTQLinear with random 4/8-bit values centred on a symmetric zero point, small fp16 scales;
    float weights random N(0, 0.02) in ``dtype`` (norms 1). For benchmarks (the 14B shapes) only."""
    device = torch.device(device)
    qc = getattr(config, "quantization_config", None) or {"bits": 4, "group_size": 128, "quant_method": "gptq"}
    settings = gptq_settings(qc)
    bits = settings["bits"]
    model = _build_meta_model(config)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_quantized_module_name(n, suffixes)]
    replace_with_gptq_linears(model, names, settings)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    zero = 2 ** (bits - 1) - (0 if settings["v2"] else 1)
    per = 32 // bits
    zero_word = 0
    for j in range(per):
        zero_word |= zero << (bits * j)
    if zero_word >= 2**31:
        zero_word -= 2**32
    for name, t in _expected_tensors(model).items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if isinstance(module, GPTQLinear) and attr in GPTQLinear._NEVER_CAST:
            if attr == "qweight":
                # values spread evenly around the zero point (1 .. 2**bits - 1 around 2**(bits - 1)): centred,
                # as real GPTQ weights are. Uniform random words average half a step below zero, a direction
                # every Linear writes into the residual stream; on the 14B shape that drove attention logits to
                # ~700 and the bf16 attention backward into cancellation noise (benchmarks/NOTES.md, step 6).
                q = torch.randint(1, 2**bits, (module.in_features, module.out_features), generator=gen,
                                  device=device)
                v = pack_rows(q, bits)
                del q
            elif attr == "qzeros":
                v = torch.full(t.shape, zero_word, device=device, dtype=torch.int32)
            elif attr == "scales":
                v = (torch.rand(t.shape, generator=gen, device=device) * 0.004 + 0.001).to(torch.float16)
            else:
                v = default_g_idx(module.in_features, module.group_size, device=device)
        elif t.is_floating_point():
            if attr == "weight" and t.dim() == 1:
                v = torch.ones(t.shape, device=device, dtype=dtype)
            elif attr == "bias":
                v = torch.zeros(t.shape, device=device, dtype=dtype)
            else:
                v = (torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)
        else:
            v = torch.zeros(t.shape, device=device, dtype=t.dtype)
        _set_tensor(model, name, v)
    _check_no_meta_buffers(model, "build_gptq_model_on_device")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    return model


__all__ = [
    "GPTQLoadError",
    "load_gptq_model",
    "build_gptq_model_on_device",
    "gptq_settings",
    "replace_with_gptq_linears",
]
