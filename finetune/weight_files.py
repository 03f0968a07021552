"""What a weight file holds, from its header alone: safetensors headers checked against the file's size, and the
uncompressed size of a legacy zip ``.bin``, so a truncated or malformed file is refused (naming the file and the
tensor) before any tensor is read."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import NamedTuple

from .errors import ModelLoadError

# safetensors dtype names -> bytes per element (the format's spec)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
INT_DTYPES = {"I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8"}
MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


def safetensors_header(path, error=ModelLoadError) -> dict[str, tuple[str, tuple[int, ...]]]:
    """tensor name -> (safetensors dtype, shape), after checking that every tensor's bytes lie inside the file
    and match its dtype and shape. Raises ``error`` naming the file (and the first bad tensor)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise error(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER):
            raise error(f"{path}: its header claims {n} bytes but the file has {size}: truncated, or not a "
                        f"safetensors file")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise error(f"{path}: the header is not valid JSON: truncated, or not a safetensors file") from None
    if not isinstance(header, dict):
        raise error(f"{path}: the header is not a JSON object: not a safetensors file")
    data_bytes = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise error(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        if dtype not in DTYPE_BYTES:
            raise error(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if any(d < 0 for d in shape):
            raise error(f"{path}: tensor {name!r} has a negative dimension {shape}")
        need = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != need or begin < 0:
            raise error(f"{path}: tensor {name!r} ({dtype} {shape}) spans bytes {begin}..{end} of the data, "
                        f"but needs {need}: the header is corrupt")
        entries.append((begin, end, name))
        out[name] = (dtype, tuple(shape))
    for begin, end, name in sorted(entries):
        if end > data_bytes:
            raise error(f"{path}: tensor {name!r} ends at byte {end} of the data, but the file holds only "
                        f"{data_bytes} bytes after its header: the file is truncated (copy it again)")
    return out


def zip_uncompressed_size(path, error=ModelLoadError) -> int:
    """Total uncompressed size of a torch.save zip file (a legacy ``.bin``), read from the zip's directory."""
    try:
        with zipfile.ZipFile(path) as z:
            return sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError) as e:
        raise error(f"{path}: not a readable torch.save zip archive ({e}): truncated or corrupt") from None


class TensorInfo(NamedTuple):
    file: Path
    dtype: str  # safetensors dtype name (F32, BF16, I32 ...)
    shape: tuple[int, ...]


_TORCH_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def checkpoint_files(model_dir, error=ModelLoadError) -> list[tuple[Path, list[str] | None]]:
    """[(file, tensor names or None if unknown without reading)] for a model dir, in shard order.

    Looks for model.safetensors.index.json, model.safetensors, pytorch_model.bin.index.json,
    pytorch_model.bin (the names transformers and Qwen's releases use), then any single *.safetensors.
    """
    d = Path(model_dir)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        idx = d / index_name
        if idx.is_file():
            try:
                weight_map = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
                items = [(str(k), str(v)) for k, v in weight_map.items()]
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise error(f"{idx}: not a valid index (a JSON object with a 'weight_map'): {e}") from None
            by_file: dict[str, list[str]] = {}
            for name, fname in items:
                by_file.setdefault(fname, []).append(name)
            for fname in by_file:
                if not (d / fname).is_file():
                    raise error(f"{d}: weight file {fname} named in {index_name} is missing")
            return [(d / f, names) for f, names in sorted(by_file.items())]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).is_file():
            return [(d / single, None)]
    st = sorted(d.glob("*.safetensors"))
    if st:
        return [(p, None) for p in st]
    raise error(f"{d} has no model weights (expected model.safetensors[.index.json] or "
                f"pytorch_model.bin[.index.json])")


def checkpoint_tensors(model_dir, error=ModelLoadError) -> dict[str, TensorInfo]:
    """Every tensor of a model dir's weight files -> (file, dtype, shape), from headers only (a .bin is opened
    memory-mapped on the meta device); truncated or malformed files are ``error`` naming the file."""
    out: dict[str, TensorInfo] = {}
    for path, _ in checkpoint_files(model_dir, error):
        if path.suffix == ".safetensors":
            for name, (dtype, shape) in safetensors_header(path, error).items():
                out[name] = TensorInfo(path, dtype, shape)
        else:
            import torch

            try:
                sd = torch.load(str(path), map_location="meta", weights_only=True, mmap=True)
            except Exception as e:  # a truncated zip, a pickle with code in it...: one line naming the file
                raise error(f"{path}: cannot be read as plain tensors ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}): truncated or corrupt?") from None
            for name, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    raise error(f"{path}: entry {name!r} is not a tensor")
                dtype = _TORCH_TO_ST.get(str(t.dtype).removeprefix("torch."), str(t.dtype))
                out[name] = TensorInfo(path, dtype, tuple(t.shape))
    return out


__all__ = ["checkpoint_files", "checkpoint_tensors", "TensorInfo","safetensors_header", "zip_uncompressed_size", "DTYPE_BYTES", "FLOAT_DTYPES", "INT_DTYPES"]
