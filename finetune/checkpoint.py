"""Checkpoint files of a model dir, the one place that reads and writes them: finding the weight files,
what each holds from its header alone (safetensors headers checked against the file's size, the uncompressed
size of a legacy zip ``.bin``, so a truncated or malformed file is refused naming the file and the tensor before
any tensor is read), reading tensors one at a time, and writing sharded safetensors in the transformers naming.

The layouts are the ones transformers and Qwen's releases use, in transformers' order: model.safetensors, or
shards named by model.safetensors.index.json; pytorch_model.bin, or shards named by pytorch_model.bin.index.json;
any single *.safetensors as a last resort. Errors are raised as the caller's error type (``error=``), naming the file.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch

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
    position = 0
    for begin, end, name in sorted(entries):
        if end > data_bytes:
            raise error(f"{path}: tensor {name!r} ends at byte {end} of the data, but the file holds only "
                        f"{data_bytes} bytes after its header: the file is truncated (copy it again)")
        if begin != position:  # the format's rule (the safetensors library refuses it as it opens the file)
            raise error(f"{path}: tensor {name!r} starts at byte {begin} of the data, but the tensor before it ends "
                        f"at {position}: the header's offsets overlap or leave a gap (a corrupt header)")
        position = end
    if position != data_bytes:
        raise error(f"{path}: its tensors end at byte {position} of the data, but the file holds {data_bytes} bytes "
                    f"after its header: a corrupt header, or bytes appended")
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


# A training run's checkpoint dirs, as transformers' Trainer names them in the run's output dir
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir) -> list[Path]:
    """The checkpoint-N dirs in a run's output dir, newest (highest N) first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CHECKPOINT_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_files(model_dir, error=ModelLoadError) -> list[tuple[Path, list[str] | None]]:
    """[(file, tensor names or None if unknown without reading)] for a model dir, in shard order.

    Looks for model.safetensors, model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json
    (transformers' order, so that what is checked here is what from_pretrained loads), then any single
    *.safetensors. A whole file beside an index of the same format is refused: one of them is another model's.
    """
    d = Path(model_dir)
    for single, index_name in (("model.safetensors", "model.safetensors.index.json"),
                               ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        idx = d / index_name
        if (d / single).is_file() and idx.is_file():
            newer, older = sorted((d / single, idx), key=lambda f: f.stat().st_mtime, reverse=True)
            raise error(f"{d} holds both {single} and {index_name} (a whole checkpoint and a sharded one): one of "
                        f"them is left from another download or save ({newer.name} is the newer, {older.name} the "
                        f"older); remove that one")
        if (d / single).is_file():
            return [(d / single, None)]
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
    st = sorted(p for p in d.glob("*.safetensors") if p.is_file())  # (a directory of that name is no weights)
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

def tensor_shapes(model_dir, error=ModelLoadError) -> dict[str, tuple[int, ...]]:
    """tensor name -> shape for every tensor of the dir, from headers (no weights read)."""
    return {k: v.shape for k, v in checkpoint_tensors(model_dir, error).items()}


def iter_tensors(path: Path):
    """(name, CPU tensor) one at a time from one checkpoint file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for name in list(sd.keys()):
            yield name, sd.pop(name)


def read_shard(path: Path) -> dict:
    return dict(iter_tensors(path))


def parse_size(size) -> int:
    """Bytes in "2GB", "500MB", "1GiB" or an int."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(size), re.I)
    if not m:
        raise ValueError(f"cannot read size {size!r} (e.g. 2GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def shard_name(i: int, n: int) -> str:
    """The transformers name of shard i (1-based) of n."""
    return "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    Path(out_dir, "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2) + "\n")


def save_sharded(state_dict: dict, out_dir: Path, max_shard_size="2GB") -> list[str]:
    """safetensors shards in the transformers naming, with model.safetensors.index.json when more than one."""
    from .file_modes import save_weights

    limit = parse_size(max_shard_size)
    shards: list[dict] = [{}]
    size = 0
    for k, v in state_dict.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        name = shard_name(i, len(shards))
        save_weights({k: v.contiguous() for k, v in shard.items()}, Path(out_dir) / name, metadata={"format": "pt"})
        names.append(name)
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    if len(shards) > 1:
        write_index(out_dir, weight_map, total)
    return names


__all__ = ["checkpoint_files", "checkpoint_tensors", "TensorInfo", "safetensors_header", "zip_uncompressed_size",
           "tensor_shapes", "iter_tensors", "read_shard", "save_sharded", "shard_name", "write_index", "parse_size",
           "DTYPE_BYTES", "FLOAT_DTYPES", "INT_DTYPES"]
