"""PEFT LoRA adapters for chat, evaluation and merging: find the base, check the adapter against it, load it.

What an adapter dir holds: ``adapter_config.json`` (PEFT's LoraConfig, which records the base model in
``base_model_name_or_path``) and the weights, ``adapter_model.safetensors`` or, from older PEFT (the
official Qwen finetune.py, 2023), ``adapter_model.bin``. The ``.bin`` is read only through
``torch.load(..., weights_only=True)``: a pickle from the internet never runs code here.

Loading is ``check_adapter`` then PEFT: before PEFT touches the model, every tensor of the adapter is
matched with the module it belongs to, so an adapter made for another architecture, size or rank layout is
one ``AdapterError`` naming the adapter dir and the first key that does not fit (PEFT alone would either
raise a long size-mismatch dump or, for a missing key, silently leave a zero LoRA in place).

2023-era configs (peft 0.5: ``"revision"``, ``"enable_lora": null``, no ``use_dora`` ...) load: keys the
installed PEFT does not know are dropped (listed at debug level), the rest builds today's ``LoraConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter that cannot be used with this base; the message names the adapter dir and the cause."""


# -- reading ------------------------------------------------------------------------------------------


def is_adapter_dir(path) -> bool:
    return path is not None and (Path(path) / CONFIG_NAME).is_file()


def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json as a dict (raises AdapterError when missing or not a LoRA adapter)."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        if not adapter_dir.exists():
            raise AdapterError(f"adapter {adapter_dir} does not exist")
        hint = " (it looks like a full model dir: pass it as the model, not as --adapter)" \
            if (adapter_dir / "config.json").is_file() else _checkpoint_hint(adapter_dir)
        raise AdapterError(f"adapter {adapter_dir} has no {CONFIG_NAME}: not a PEFT adapter dir{hint}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"adapter {adapter_dir}: {CONFIG_NAME} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter {adapter_dir}: {CONFIG_NAME} must be a JSON object, got {type(cfg).__name__}")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter {adapter_dir}: peft_type {peft_type!r} is not supported (LoRA only)")
    _check_config_values(adapter_dir, cfg)
    return cfg


def _checkpoint_hint(adapter_dir: Path) -> str:
    """For a run dir that holds checkpoint-N dirs only (a run stopped before its end): the newest one's adapter."""
    from .checkpoint import checkpoints

    try:
        found = checkpoints(adapter_dir)  # newest first
    except OSError:  # (an unreadable dir: the line without the hint)
        return ""
    with_adapter = [c for c in found if (c / CONFIG_NAME).is_file()]
    if with_adapter:
        step = with_adapter[0].name.removeprefix("checkpoint-")
        return (f"; it holds a run's checkpoints, the newest with an adapter being {with_adapter[0]} (pass that: the "
                f"adapter at step {step})")
    if found:
        return f"; its checkpoint-N dirs hold no {CONFIG_NAME} either"
    if (adapter_dir / "run_args.json").is_file():  # (a run that has saved nothing yet: it was the line alone)
        return ("; it is a training run's output dir with nothing saved yet (the adapter is written when the run "
                "ends, a checkpoint-N at each save, --save_steps): the run is still going or stopped before a save")
    return ""


NO_TARGETS = ("names no target_modules, so the modules it adapts are unknown (Qwen adapters list them, e.g. "
              "[\"c_attn\", \"c_proj\", \"w1\", \"w2\"])")


def _check_config_values(adapter_dir, cfg: dict) -> None:
    """The fields the adapter is built from, by type (PEFT takes them as they are, and a string rank or alpha
    fails deep inside the layer's construction, with a traceback)."""
    where = f"adapter {adapter_dir}: {CONFIG_NAME}"
    for key in ("r", "lora_alpha"):  # an integral float (8.0, as some JSON writers emit) is the integer
        if isinstance(cfg.get(key), float) and cfg[key].is_integer():
            cfg[key] = int(cfg[key])
    if isinstance(cfg.get("rank_pattern"), dict):
        cfg["rank_pattern"] = {k: int(v) if isinstance(v, float) and v.is_integer() else v
                               for k, v in cfg["rank_pattern"].items()}
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{where}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise AdapterError(f"{where}: lora_alpha must be a positive number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):  # {module pattern: rank / alpha}, read as r and lora_alpha are
        pattern = cfg.get(key) or {}
        bad = [v for v in pattern.values() if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
               or (key == "rank_pattern" and not isinstance(v, int))] if isinstance(pattern, dict) else [pattern]
        if bad:
            raise AdapterError(f"{where}: {key} must map module names to positive numbers"
                               f"{' (whole, for ranks)' if key == 'rank_pattern' else ''}, got {bad[0]!r}")
    dropout = cfg.get("lora_dropout", 0.0)
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0 <= dropout < 1):
        raise AdapterError(f"{where}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise AdapterError(f"{where}: bias must be 'none', 'all' or 'lora_only', got {cfg['bias']!r}")
    layers = cfg.get("layers_to_transform")

    def index(i) -> bool:
        return isinstance(i, int) and not isinstance(i, bool) and i >= 0

    if layers is not None and not index(layers) and not (isinstance(layers, list) and all(map(index, layers))):
        raise AdapterError(f"{where}: layers_to_transform must be a layer index or a list of them, got {layers!r}")
    saved = cfg.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) for m in saved)):
        raise AdapterError(f"{where}: modules_to_save must be a list of module names, got {saved!r}")
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise AdapterError(f"{where}: target_modules must be a module name, a regex or a list of names, got "
                           f"{targets!r}")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterError(f"{where}: base_model_name_or_path must be a path, got {base!r}")
    if targets is None:  # PEFT's default table has no Qwen entry: its matcher raised TypeError deep in the load
        raise AdapterError(f"{where}: {NO_TARGETS}")
    for key, what in UNSUPPORTED_VARIANTS.items():
        if cfg.get(key) not in (None, False, [], {}, ""):
            raise AdapterError(f"{where} sets {key}: {cfg[key]!r} ({what}); only plain LoRA (x A^T B^T scaling added "
                               f"to each targeted Linear) is supported here (a model merged from it where PEFT's "
                               f"merge_and_unload can merge it loads as a plain model dir)")
    init = cfg.get("init_lora_weights")
    if init == "lora_ga":  # (PEFT saves it unconverted as it saves PiSSA; on load its init falls back to the default)
        raise AdapterError(f"{where} sets init_lora_weights: 'lora_ga' (LoRA-GA): its init rewrites the base weights "
                           f"(the initial adapter's product taken out of them) and a load does not redo that, so on "
                           f"this base it would answer otherwise than it was trained; {_CONVERT}")
    if isinstance(init, str) and (rewrite := _base_rewriting_init(init)):
        name, fix = rewrite
        raise AdapterError(f"{where} sets init_lora_weights: {init!r} ({name}): loading it rewrites the base weights "
                           f"(an Int4 base has no float weights to rewrite), so the base beside it (eval's base "
                           f"column, the engine's rows without it, other adapters) would no longer be the base; {fix}")


# init_lora_weights whose init, which PEFT runs again on every load, rewrites the base layer's weight; what loads here
_CONVERT = ("PEFT converts it into a plain LoRA, which loads here: save the trained PeftModel with "
            "save_pretrained(DIR, path_initial_model_for_weight_conversion=INIT) (older PEFT: "
            "convert_pissa_to_lora=INIT), INIT being the adapter as initialised, saved before training")
_LOFTQ = ("PEFT's LoftQ recipe saves the adapter with init_lora_weights true beside the base it quantized: load it on "
          "that base")


def _base_rewriting_init(init: str) -> tuple[str, str] | None:
    """(name, what to do instead) for an init_lora_weights that rewrites the base on load, else None (PEFT's rule)."""
    if init.startswith("pissa"):
        return "PiSSA", _CONVERT
    if init.startswith("corda"):
        return "CorDA", _CONVERT
    if init.lower() == "olora":
        return "OLoRA", _CONVERT
    if init == "loftq":
        return "LoftQ", _LOFTQ
    return None


# LoraConfig fields whose non-default values change what the adapter computes beyond the plain LoRA product: the
# decode engine, the Int4 layer and merge apply that product only, so such an adapter would run as another model
UNSUPPORTED_VARIANTS = {
    "use_dora": "DoRA: a learned magnitude rescales each output",
    "lora_bias": "a bias on lora_B, which Qwen v1's bias-free c_proj, w1 and w2 cannot merge",
    "use_qalora": "QA-LoRA: the input is pooled by groups before lora_A",
    "alora_invocation_tokens": "activated LoRA: applied only after the invocation tokens",
    "layer_replication": "layers duplicated: another architecture",
    "target_parameters": "LoRA on parameters rather than modules",
    "trainable_token_indices": "trained rows of the embedding",
    "arrow_config": "Arrow routing between adapters",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}


def lora_config(adapter_dir, cfg: dict | None = None):
    """A current-PEFT LoraConfig from an adapter_config.json of any PEFT version (unknown keys dropped)."""
    from peft import LoraConfig

    cfg = dict(read_adapter_config(adapter_dir) if cfg is None else cfg)
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    dropped = sorted(k for k in cfg if k not in known)
    if dropped:
        logger.debug("adapter %s: ignoring config keys unknown to this PEFT: %s", adapter_dir, dropped)
    kwargs = {k: v for k, v in cfg.items() if k in known and k != "peft_type"}
    for key in ("loftq_config",):  # peft 0.5 wrote null where today's PEFT wants {}
        if kwargs.get(key) is None:
            kwargs.pop(key, None)
    try:
        config = LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"adapter {adapter_dir}: {CONFIG_NAME} is not a valid LoRA config: {e}") from None
    config.inference_mode = True
    return config


def adapter_base(adapter_dir) -> str | None:
    """The base model the adapter records (PEFT's base_model_name_or_path: an absolute path when the project saved
    it, so PEFT's own AutoPeftModel finds the same base), or None."""
    return read_adapter_config(adapter_dir).get("base_model_name_or_path") or None


# -- the base an adapter was trained on ----------------------------------------------------------------
# PEFT records the base as the path the user typed; when the project's model saves an adapter (see peft_hooks) that
# path is made absolute and base_model.json beside adapter_config.json records a fingerprint of the base:
# config.json's hash and each weight file's size and a hash of three samples of it. A base that does not match is refused (or, given explicitly with
# -m, loaded with a warning naming both).

BASE_RECORD = "base_model.json"
_ARCH_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels",
              "intermediate_size")


def base_fingerprint(model_dir) -> dict:
    import hashlib

    d = Path(model_dir)
    raw = (d / "config.json").read_bytes()
    try:
        cfg = json.loads(raw)
    except ValueError:
        cfg = {}
    cfg = cfg if isinstance(cfg, dict) else {}
    weights = {p.name: _sample_digest(p) for p in sorted(d.iterdir())
               if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))}
    return {"config_sha256": hashlib.sha256(raw).hexdigest(), "weights": weights,
            "architecture": {k: cfg.get(k) for k in _ARCH_KEYS}, "quantized": bool(cfg.get("quantization_config"))}


_SAMPLE = 64 * 1024


def _sample_digest(path: Path) -> str:
    """'<size>:<sha256 of three 64 KiB samples (start, middle, end)>': tells apart weight files of the same size
    (another seed, another fine-tune) while reading 192 KiB of a multi-GB shard."""
    import hashlib

    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for offset in sorted({0, max(size // 2 - _SAMPLE // 2, 0), max(size - _SAMPLE, 0)}):
            f.seek(offset)
            h.update(f.read(_SAMPLE))
    return f"{size}:{h.hexdigest()[:32]}"


def record_base(adapter_dir, base_dir) -> None:
    """Write base_model.json into an adapter dir: the base's absolute path and fingerprint."""
    base_dir = Path(base_dir).resolve()
    record = {"path": str(base_dir), "fingerprint": base_fingerprint(base_dir)}
    (Path(adapter_dir) / BASE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def recorded_base(adapter_dir) -> dict | None:
    p = Path(adapter_dir) / BASE_RECORD
    if not p.is_file():
        return None
    try:
        record = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise AdapterError(f"adapter {adapter_dir}: {BASE_RECORD} is not valid JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), dict):
        raise AdapterError(f"adapter {adapter_dir}: {BASE_RECORD} has no 'fingerprint' object")
    return record


def check_base(adapter_dir, base_dir, explicit: bool) -> str | None:
    """Compare ``base_dir`` with the base the adapter records. A mismatch is an AdapterError naming both, unless
    ``explicit`` (the user named this base, e.g. with -m) and it is another dir than the recorded one: then a
    warning, also returned (so a report can carry it); none for the float twin of a recorded Int4 base (same
    architecture, merged or trained on); refused, explicit or not, for a model that `qwen-ft merge` made from this
    same adapter (its deltas would apply twice)."""
    merged_from = merged_adapter(base_dir)
    if merged_from is not None and _same_adapter(merged_from, adapter_identity(adapter_dir)):
        raise AdapterError(f"{Path(base_dir).resolve()} is a model with adapter {adapter_dir} already merged into it "
                           f"(its {MERGE_REPORT}): putting the adapter on it again applies its deltas twice; use the "
                           f"merged model without the adapter, or the adapter on its base")
    record = recorded_base(adapter_dir)
    if record is None or not (Path(base_dir) / "config.json").is_file():
        return None
    want, got = record["fingerprint"], base_fingerprint(base_dir)
    if want.get("config_sha256") == got["config_sha256"] and want.get("weights") == got["weights"]:
        return None
    what = "config.json differs" if want.get("config_sha256") != got["config_sha256"] else \
        "its weight files differ (names, sizes or sampled contents)"
    msg = (f"adapter {adapter_dir} was trained on {record.get('path')}, but the base {Path(base_dir).resolve()} is "
           f"not that model ({what})")
    same_dir = record.get("path") and Path(record["path"]).resolve() == Path(base_dir).resolve()
    if not explicit or same_dir:
        raise AdapterError(msg + ("; the model at the recorded path has changed since training" if same_dir else "")
                           + "; pass the intended base with -m/--model (checked, loaded with a warning)")
    if merged_from is not None:  # a merged model has the base's architecture but another adapter in its weights
        msg += f" (a merged model: its {MERGE_REPORT} records adapter {merged_from.get('path')})"
    elif want.get("architecture") == got["architecture"] and want.get("quantized") != got["quantized"]:
        # the float twin of the Int4 base a Q-LoRA adapter was trained on (a documented route); the other way
        # round load_adapter warns (float_adapter_on_int4). Any model of that architecture passed the architecture
        # check, so the weights GPTQ leaves unquantized (the final norm, the embedding's first rows) are compared
        twin = "float" if want.get("quantized") else "Int4"
        apart = _unquantized_weights_differ(record.get("path"), base_dir)
        if apart is None:
            logger.info("%s: the %s twin of the recorded base", msg, twin)
            return None
        msg += (f"; it has the recorded base's architecture, but {apart}, so it is not that model's {twin} twin")
    msg += "; loading it as asked"
    # once a process: the commands check the base when resolving it and again when the adapter loads onto it
    key = (str(Path(adapter_dir).resolve()), str(Path(base_dir).resolve()))
    if key not in _WARNED_BASES:
        _WARNED_BASES.add(key)
        logger.warning("%s", msg)
    return msg


_WARNED_BASES: set[tuple[str, str]] = set()

# Tensors GPTQ leaves in float, compared between an Int4 model and a float model of its architecture: the final norm
# whole and the embedding's first rows (read from the files' headers and a slice; a few KB)
_TWIN_TENSORS = (("transformer.ln_f.weight", None), ("transformer.wte.weight", 64))


def _unquantized_weights_differ(recorded, base_dir) -> str | None:
    """How the float weights of ``base_dir`` differ from those of the recorded base dir (the Int4 model keeps them
    in fp16, its float twin in bf16 or fp32: equal within fp16's rounding), or None when they agree or cannot be
    compared (the recorded dir is gone, a tensor is missing, a file cannot be read)."""
    from .checkpoint import checkpoint_tensors

    if not recorded or not Path(recorded).is_dir():
        return None
    try:
        there, here = checkpoint_tensors(recorded), checkpoint_tensors(base_dir)
        for name, rows in _TWIN_TENSORS:
            if name not in there or name not in here or there[name].shape != here[name].shape:
                return None
            a, b = _leading(there[name].file, name, rows), _leading(here[name].file, name, rows)
            if not torch.allclose(a, b, rtol=1e-2, atol=1e-4):
                return f"its {name} differs from the recorded base's (max |difference| {(a - b).abs().max():.3g})"
    except Exception:  # (any reading problem is for the loader to report, with its own words)
        return None
    return None


def _leading(path: Path, name: str, rows: int | None) -> torch.Tensor:
    """A tensor of a checkpoint file, or its first ``rows`` rows, in fp32."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            t = f.get_slice(name)[:rows] if rows else f.get_tensor(name)
    else:
        t = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)[name]
        t = t[:rows] if rows else t
    return t.float()

# -- models that `qwen-ft merge` wrote ---------------------------------------------------------------------
# Its merge_report.json records the adapter merged in: the adapter's resolved path and its weight file's sample
# digest (which still matches when the adapter dir was moved or copied).

MERGE_REPORT = "merge_report.json"


def adapter_identity(adapter_dir) -> dict:
    """{"path": the resolved adapter dir, "weights": "<file name> <size>:<sample digest>"} (weights None when the
    dir has no weight file)."""
    try:
        weights = adapter_weights_file(adapter_dir)
    except AdapterError:
        return {"path": str(Path(adapter_dir).resolve()), "weights": None}
    return {"path": str(Path(adapter_dir).resolve()), "weights": f"{weights.name} {_sample_digest(weights)}"}


def _same_adapter(recorded: dict, identity: dict) -> bool:
    """The same weights, or, where the report names no weights (written before adapter_merged), the same path."""
    if recorded.get("weights") and identity.get("weights"):
        return recorded["weights"] == identity["weights"]
    return bool(recorded.get("path")) and recorded.get("path") == identity.get("path")


def merged_adapter(model_dir) -> dict | None:
    """The adapter a `qwen-ft merge` output holds (from its merge_report.json), else None (also for a report that
    cannot be read: it is the merge's own record, not an input to refuse a model for)."""
    p = Path(model_dir) / MERGE_REPORT
    try:
        report = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
    except (ValueError, OSError):
        return None
    if not isinstance(report, dict):
        return None
    merged = report.get("adapter_merged")
    if isinstance(merged, dict) and isinstance(merged.get("path"), str):
        return {"path": merged["path"], "weights": merged.get("weights")}
    # a report written before adapter_merged: its "adapter" is the path as typed; an absolute one still names it
    if isinstance(report.get("adapter"), str) and Path(report["adapter"]).is_absolute():
        return {"path": str(Path(report["adapter"]).resolve()), "weights": None}
    return None


def trained_on(adapter_dir) -> str | None:
    """"float" or "int4": the kind of base the adapter was trained on (from base_model.json, else from the config of
    the base it records), None when unknown."""
    record = recorded_base(adapter_dir)
    if record is not None and "quantized" in record["fingerprint"]:
        return "int4" if record["fingerprint"]["quantized"] else "float"
    base = adapter_base(adapter_dir)
    if base and (Path(base) / "config.json").is_file():
        from .errors import ModelLoadError
        from .model_dir import describe

        try:
            return "int4" if describe(base).quantized else "float"
        except ModelLoadError:
            return None
    return None


def float_adapter_on_int4(adapter_dir, base_dir) -> str:
    return (f"adapter {adapter_dir} was trained on a float model ({adapter_base(adapter_dir)}) and is being put on "
            f"the Int4 base {base_dir}: its deltas meet rounded weights it never saw; use the float base (-m) "
            f"unless this is what you want")


def resolve_base(adapter_dir, model_dir=None) -> Path:
    """The base model dir: ``model_dir`` when given (a moved base; a fingerprint mismatch warns), else the one the
    adapter records (a fingerprint mismatch is refused)."""
    from .hub import ModelNotFoundError, resolve_model_dir

    if model_dir is not None:
        base = resolve_model_dir(model_dir)
        check_base(adapter_dir, base, explicit=True)
        return base
    recorded = adapter_base(adapter_dir)
    if not recorded:
        raise AdapterError(f"adapter {adapter_dir} does not record its base model (no base_model_name_or_path "
                           f"in {CONFIG_NAME}); pass the base model dir with -m/--model")
    try:
        base = resolve_model_dir(recorded)
    except ModelNotFoundError as e:
        raise AdapterError(f"adapter {adapter_dir} was trained on {recorded}, which cannot be found ({e}); if the "
                           f"base moved, pass its dir with -m/--model") from None
    check_base(adapter_dir, base, explicit=False)
    return base


def adapter_weights_file(adapter_dir) -> Path:
    for name in WEIGHT_NAMES:
        p = Path(adapter_dir) / name
        if p.is_file():
            return p
    raise AdapterError(f"adapter {adapter_dir} has no weights (expected {' or '.join(WEIGHT_NAMES)})")


# torch.save stores tensors uncompressed: a legacy .bin whose zip entries inflate far beyond the file is not one
MAX_BIN_INFLATION = 4


def adapter_tensor_shapes(adapter_dir) -> dict[str, tuple[int, ...]]:
    """Canonical key -> shape of every adapter tensor, from the file's header alone (safetensors: header checked
    against the file size; legacy .bin: the zip's directory checked for inflation, then the pickle read on the
    meta device). Non-float tensors are refused here, naming the tensor."""
    from .checkpoint import FLOAT_DTYPES, safetensors_header, zip_uncompressed_size

    path = adapter_weights_file(adapter_dir)
    where = f"adapter {adapter_dir}"
    if path.suffix == ".safetensors":
        header = safetensors_header(path, AdapterError)
        for k, (dtype, _) in header.items():
            if dtype not in FLOAT_DTYPES:
                raise AdapterError(f"{where}: tensor {k!r} in {path.name} is {dtype}; LoRA weights are float tensors")
        return {_canonical_key(k): shape for k, (_, shape) in header.items()}
    import zipfile

    if zipfile.is_zipfile(path):
        size = path.stat().st_size
        total = zip_uncompressed_size(path, AdapterError)
        if total > MAX_BIN_INFLATION * size + 2**20:
            raise AdapterError(f"{where}: {path.name} ({size} bytes) inflates to {total} bytes; torch.save writes "
                               f"tensors uncompressed, so this is not an adapter file: refused without reading it")
        try:
            sd = torch.load(str(path), map_location="meta", weights_only=True, mmap=True)
        except Exception as e:
            raise AdapterError(f"{where}: cannot read {path.name} ({_bin_problem(e)}); a legacy .bin is read "
                               f"only as plain tensors (weights_only=True)") from None
    else:
        sd = read_adapter_weights(adapter_dir)  # the pre-zip format: as large as the file, nothing inflates
    _check_tensor_dict(adapter_dir, path, sd)
    return {_canonical_key(k): tuple(v.shape) for k, v in sd.items()}


def _bin_problem(e: Exception) -> str:
    """One line for a file torch.load refused. Its UnpicklingError runs over several lines and advises loading with
    weights_only=False, which for a file that is more than tensors would run the code in it."""
    text = str(e)
    if "Weights only load failed" in text:
        return "it holds objects other than tensors: loading it would run code from the file"
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _check_tensor_dict(adapter_dir, path: Path, sd) -> None:
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise AdapterError(f"adapter {adapter_dir}: {path.name} is not a dict of tensors")
    for k, v in sd.items():
        if not v.is_floating_point():
            raise AdapterError(f"adapter {adapter_dir}: tensor {k!r} in {path.name} is {str(v.dtype).removeprefix('torch.')}; "
                               f"LoRA weights are float tensors")


def read_adapter_weights(adapter_dir) -> dict[str, torch.Tensor]:
    """The adapter's tensors on CPU: safetensors, or a legacy .bin through torch.load(weights_only=True)."""
    path = adapter_weights_file(adapter_dir)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterError(f"adapter {adapter_dir}: cannot read {path.name} ({_bin_problem(e)}); a legacy "
                           f".bin is read only as plain tensors (weights_only=True)") from None
    _check_tensor_dict(adapter_dir, path, sd)
    return {_canonical_key(k): v for k, v in sd.items()}


def check_adapter_values(adapter_dir, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse (naming the tensor) weights that would poison every output: NaN or infinite values."""
    for k, v in state_dict.items():
        bad = (~torch.isfinite(v)).sum().item()
        if bad:
            raise AdapterError(f"adapter {adapter_dir}: tensor {k!r} has {bad} of {v.numel()} values NaN or "
                               f"infinite ({adapter_weights_file(adapter_dir).name}); the adapter is broken (a "
                               f"diverged run?)")


_ADAPTER_NAME_IN_KEY = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)\.default(\.|$)")


def _canonical_key(key: str) -> str:
    """PEFT's saved form: 'base_model.model.<module>.lora_A.weight' (some writers kept '.default')."""
    key = _ADAPTER_NAME_IN_KEY.sub(r".\1\2", key)
    key = key.replace(".modules_to_save.default.", ".")
    return key


# -- checking -----------------------------------------------------------------------------------------


def _unwrap(model):
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def target_module_names(model: nn.Module, config) -> list[str]:
    """Names of the modules LoRA attaches to, by PEFT's own rule (suffix match, or full regex match)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        if check_target_module_exists(config, name):
            names.append(name)
    return names


def _module_io(module: nn.Module) -> tuple[int, int] | None:
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    return None


def _pattern_key(patterns, module_name: str) -> str | None:
    """The first rank_pattern / alpha_pattern key that matches the module, by PEFT's rule (get_pattern_key): the key
    grouped, so that an alternation ('c_attn|w1') matches a name's last parts as a whole."""
    for pattern in patterns or {}:
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return pattern
    return None


def _rank(config, module_name: str) -> int:
    pattern = _pattern_key(config.rank_pattern, module_name)
    return int(config.rank_pattern[pattern] if pattern is not None else config.r)


def _rank_text(config, key: str) -> str:
    pattern = _pattern_key(config.rank_pattern, key.removeprefix(PREFIX).split(".lora_")[0])
    return f"{config.rank_pattern[pattern]} (rank_pattern {pattern!r})" if pattern is not None else f"r={config.r}"


def check_adapter(model, adapter_dir, config=None, state_dict: dict | None = None) -> None:
    """Raise AdapterError (naming the adapter and the first bad key) unless every adapter tensor has a home
    of the right shape in ``model`` and every targeted module has its LoRA weights. ``state_dict``: tensors or
    shapes (default: the shapes read from the weight file's header, nothing else read)."""
    model = _unwrap(model)
    config = lora_config(adapter_dir) if config is None else config
    sd = adapter_tensor_shapes(adapter_dir) if state_dict is None else state_dict
    where = f"adapter {adapter_dir}"

    if config.target_modules is None:  # (a config built in memory; a file's is refused as it is read)
        raise AdapterError(f"{where}: {NO_TARGETS}")
    targets = target_module_names(model, config)
    layers = config.layers_to_transform
    layers = [layers] if isinstance(layers, int) else list(layers or [])
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    beyond = [i for i in layers if isinstance(n_layers, int) and i >= n_layers]
    if beyond:
        raise AdapterError(f"{where}: {CONFIG_NAME}'s layers_to_transform names layer {beyond[0]}, but the model has "
                           f"{n_layers} (0..{n_layers - 1}); it was made for a deeper model")
    if not targets:
        raise AdapterError(f"{where}: none of its target modules {_targets_text(config)} exist in "
                           f"this model ({type(model).__name__}; target_modules of {CONFIG_NAME})"
                           f"{_regex_hint(model, config.target_modules)}")
    modules = dict(model.named_modules())
    for m in config.modules_to_save or []:  # PEFT skips a name that matches nothing, and the adapter's rows with it
        if not any(name == m or name.endswith("." + m) for name in modules):
            raise AdapterError(f"{where}: {CONFIG_NAME}'s modules_to_save names {m!r}, which is no module of this "
                               f"model ({type(model).__name__}; Qwen's are e.g. 'wte', 'lm_head')")
    expected: dict[str, tuple[int, ...]] = {}
    for name in targets:
        io = _module_io(modules[name])
        if io is None:
            continue  # PEFT would reject it later with its own message; not a shape question
        in_f, out_f = io
        r = _rank(config, name)
        expected[f"{PREFIX}{name}.lora_A.weight"] = (r, in_f)
        expected[f"{PREFIX}{name}.lora_B.weight"] = (out_f, r)
    for name, module in modules.items():
        if not name or not config.modules_to_save:
            continue
        if any(name == m or name.endswith("." + m) for m in config.modules_to_save):
            module = getattr(module, "original_module", module)  # already wrapped by an adapter loaded before
            for pname, p in module.named_parameters(recurse=False):
                expected[f"{PREFIX}{name}.{pname}"] = tuple(p.shape)
    optional = base_bias_keys(model, config, targets)  # saved by PEFT with bias "all" / "lora_only"

    sd = rename_legacy_biases(sd, targets)
    sd = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in sd.items()}  # tensors or shapes
    lora_keys = [k for k in sd if ".lora_" in k]
    if not lora_keys:
        raise AdapterError(f"{where}: its weights hold no LoRA tensors (keys like "
                           f"'{PREFIX}transformer.h.0.attn.c_attn.lora_A.weight')")
    for k, v in sd.items():
        if k not in expected and k in optional:
            if v != optional[k]:
                raise AdapterError(f"{where} does not fit this model: {k!r} has shape {list(v)}, the model needs "
                                   f"{list(optional[k])} (another model size?)")
            continue
        if k not in expected:
            layer = re.search(r"\.h\.(\d+)\.", k)
            hint = (f"; a bias, but {CONFIG_NAME} says bias {config.bias!r}" if k.endswith(".bias") and
                    config.bias == "none" else
                    "; a LoRA on the embedding (wte), which is not supported here; to train the embedding, put wte "
                    "in modules_to_save (trained in full)"
                    if ".lora_embedding_" in k else
                    f"; a DoRA magnitude vector, but {CONFIG_NAME} says use_dora false (DoRA is not supported here)"
                    if ".lora_magnitude_vector" in k else
                    f"; its keys lack PEFT's {PREFIX!r} prefix, so PEFT would load none of them: save the adapter with "
                    f"PeftModel.save_pretrained" if not k.startswith(PREFIX) and PREFIX + k in expected else
                    f"; layer {layer.group(1)} is not in {CONFIG_NAME}'s layers_to_transform {layers}"
                    if layers and layer and int(layer.group(1)) < (n_layers or 0) else
                    f"; the model has that module, but {CONFIG_NAME}'s target_modules {_targets_text(config)} do not "
                    f"name it" if ".lora_" in k and k.removeprefix(PREFIX).split(".lora_")[0] in modules else
                    ": a whole copy of that base layer's weight, which PEFT saves for a LoRA on lm_head or wte "
                    "(save_embedding_layers); this project loads LoRA tensors only: save the adapter again with "
                    "save_pretrained(dir, save_embedding_layers=False)"
                    if k.endswith(".base_layer.weight") and k.removeprefix(PREFIX).split(".base_layer")[0] in modules
                    else " (another architecture or layer count?)")
            raise AdapterError(f"{where} does not fit this model: its tensor {k!r} {list(v)} has no place "
                               f"in {type(model).__name__}{hint}")
        if v != expected[k]:
            raise AdapterError(f"{where} does not fit this model: {k!r} has shape {list(v)}, the model "
                               f"needs {list(expected[k])} (another model size, or a rank other than "
                               f"{_rank_text(config, k)} from {CONFIG_NAME})")
    missing = [k for k in expected if k not in sd]
    if missing:
        raise AdapterError(f"{where} does not fit this model: {len(missing)} tensor(s) the config targets are "
                           f"missing from its weights, first {missing[0]!r} (target_modules "
                           f"{_targets_text(config)})")


def base_bias_keys(model, config, targets) -> dict[str, tuple[int, ...]]:
    """Key -> shape of each base-layer bias an adapter may carry: with bias "lora_only" the biases of its targeted
    modules, with "all" every bias of the model. They are trained with the adapter, and PEFT loads them into the base
    layers themselves (see ``changes_base``)."""
    if config.bias == "none":
        return {}
    targeted, out = set(targets), {}
    for name, module in _unwrap(model).named_modules():
        if not name or name.endswith(".base_layer") or ".lora_" in name or ".modules_to_save." in name:
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        bias = getattr(base, "bias", None)
        if not isinstance(bias, torch.Tensor):
            continue
        if name in targeted:
            out[f"{PREFIX}{name}.base_layer.bias"] = tuple(bias.shape)
        elif config.bias == "all":
            out[f"{PREFIX}{name}.bias"] = tuple(bias.shape)
    return out


def rename_legacy_biases(sd: dict, targets) -> dict:
    """PEFT before the base_layer wrapper (0.5/0.6: the official Qwen finetune.py) saved a targeted module's trained
    bias as '<module>.bias'; today's PEFT loads only '<module>.base_layer.bias' and drops the other unseen."""
    legacy = {f"{PREFIX}{name}.bias": f"{PREFIX}{name}.base_layer.bias" for name in targets}
    return {legacy.get(k, k): v for k, v in sd.items()}


def changes_base(config) -> bool:
    """Whether an adapter with this config loads trained biases into the base layers (PEFT's bias "all" or
    "lora_only"): its base model is then no longer at hand beside it, neither through PEFT's ``disable_adapter()`` nor
    for the engine's rows without this adapter."""
    return getattr(config, "bias", "none") != "none"


def _regex_hint(model, targets) -> str:
    """The end of the message for target_modules that match nothing: for a string, PEFT's rule for one (a name meant
    for a list, such as "c_attn", matches nothing as a regex) and the list to write instead."""
    if not isinstance(targets, str):
        return "; it was made for another architecture"
    names = [n for n, m in model.named_modules() if _module_io(m) is not None]
    last = {n.rsplit(".", 1)[-1] for n in names}
    parts = targets.split("|")
    listed = parts if all(part in last for part in parts) else ["c_attn", "c_proj", "w1", "w2"]
    example = f" (as {names[0]!r})" if names else ""
    return (f": a string is one regex that must match a module's whole name{example}; a list, such as "
            f"{json.dumps(listed)}, matches modules by the last parts of their names")


def _targets_text(config) -> str:
    # a string is one regex that must match a module's whole name (PEFT's rule), not a list of letters
    t = config.target_modules
    return f"(regex) {t!r}" if isinstance(t, str) else str(sorted(t or []))


# -- loading ------------------------------------------------------------------------------------------


def checked_weights(model, adapter_dir, config=None) -> dict[str, torch.Tensor]:
    """The adapter's tensors after every check: shapes against ``model`` from the header before reading, then
    dtypes and finiteness of the values. The one path every adapter load takes (see peft_hooks for PEFT's own)."""
    config = lora_config(adapter_dir) if config is None else config
    check_adapter(model, adapter_dir, config, adapter_tensor_shapes(adapter_dir))
    sd = read_adapter_weights(adapter_dir)
    check_adapter_values(adapter_dir, sd)
    return rename_legacy_biases(sd, target_module_names(_unwrap(model), config))


def check_model_base(model, adapter_dir) -> None:
    """The adapter's recorded base against the loaded ``model`` (check_base, explicit), and a warning for a
    float-trained adapter on an Int4 model: for every adapter put on a model, the first or a further one."""
    base = getattr(_unwrap(model), "name_or_path", None)
    if base and (Path(base) / "config.json").is_file():
        check_base(adapter_dir, Path(base), explicit=True)
    if getattr(getattr(_unwrap(model), "config", None), "quantization_config", None) and \
            trained_on(adapter_dir) == "float":
        logger.warning(float_adapter_on_int4(adapter_dir, base or "given"))


def use_adapter_generation_config(model, adapter_dir) -> None:
    """An adapter dir's generation_config.json, where it has one, becomes the base model's: training on a base
    model ("raw") writes one in ChatML (model_dir.chat_generation_config), which model.chat needs."""
    if (Path(adapter_dir) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(adapter_dir))


def load_adapter(model, adapter_dir, adapter_name: str = "default", is_trainable: bool = False):
    """Wrap ``model`` with the LoRA adapter in ``adapter_dir`` (checked first) -> a PeftModel; in eval mode with
    frozen weights unless ``is_trainable`` (then the LoRA weights train, as --lora_weight_path wants).

    Given a PeftModel, the adapter is added to it under ``adapter_name`` after the same checks and the model is
    returned (PEFT's rule: not made active, see ``set_adapter``): several adapters for the engine or a server.
    Works for float bases and Int4 (GPTQLinear) bases alike; adapters of any PEFT version since 0.5."""
    from peft import PeftModel, set_peft_model_state_dict

    from .hub import resolve_model_dir

    if not Path(adapter_dir).is_dir():
        adapter_dir = resolve_model_dir(adapter_dir, "adapter directory")
    adapter_dir = Path(adapter_dir)
    config = lora_config(adapter_dir)
    config.inference_mode = not is_trainable
    adding = isinstance(model, PeftModel)
    if adding and adapter_name in model.peft_config:
        raise AdapterError(f"adapter {adapter_dir}: the model already holds an adapter named {adapter_name!r}; "
                           f"load it under another name")
    check_model_base(model, adapter_dir)
    sd = checked_weights(model, adapter_dir, config)

    import finetune.quant  # noqa: F401  (LoRA on GPTQLinear is registered on import)
    from finetune.quant import register_peft
    from finetune.quant.peft_lora import loading_adapter

    register_peft(config)
    if adding:
        peft_model = model
        with loading_adapter():  # (the weights below overwrite the init's)
            peft_model.add_adapter(adapter_name, config)  # (frozen unless trainable, as PEFT's load_adapter leaves it)
        if is_trainable:
            peft_model.set_requires_grad(adapter_name)
    else:
        from peft import PeftModelForCausalLM

        cls = PeftModelForCausalLM if str(config.task_type or "CAUSAL_LM").upper() == "CAUSAL_LM" else PeftModel
        with loading_adapter():
            peft_model = cls(model, config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(peft_model, sd, adapter_name=adapter_name)
    lora_missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k and f".{adapter_name}." in k]
    if lora_missing:  # check_adapter should make this impossible
        raise AdapterError(f"adapter {adapter_dir}: PEFT did not load {lora_missing[0]!r}")
    if not is_trainable:  # trainable: PEFT has already left only the adapter (and modules_to_save) trainable
        if not adding:  # (adding: the adapters already there keep their state, as PEFT's load_adapter keeps it)
            for p in peft_model.parameters():
                p.requires_grad_(False)
        peft_model.eval()
    return peft_model


__all__ = [
    "AdapterError", "adapter_base", "base_bias_keys", "base_fingerprint", "changes_base", "check_adapter",
    "check_adapter_values", "check_base", "check_model_base",
    "checked_weights", "float_adapter_on_int4", "is_adapter_dir", "load_adapter", "record_base", "trained_on",
    "lora_config", "read_adapter_config", "read_adapter_weights", "rename_legacy_biases", "resolve_base",
    "target_module_names",
]
