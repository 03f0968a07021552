"""Checkpoint files of a model dir: finding them, reading names, shapes and tensors, writing sharded safetensors.

The layouts are the ones transformers and Qwen's releases use: model.safetensors, or shards named by
model.safetensors.index.json; pytorch_model.bin, or shards named by pytorch_model.bin.index.json; any single
*.safetensors as a last resort. Used by loading, the GPTQ loader and quantizer, merge and the benchmarks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A model dir whose weight files cannot be found or read; the message names the dir or file."""


def checkpoint_files(model_dir) -> list[tuple[Path, list[str] | None]]:
    """[(file, tensor names, or None where only the file's own header knows them)] in shard order."""
    d = Path(model_dir)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        idx = d / index_name
        if idx.is_file():
            try:
                weight_map = json.loads(idx.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{idx}: not a weight index ({type(e).__name__}: {e})") from None
            by_file: dict[str, list[str]] = {}
            for name, fname in weight_map.items():
                by_file.setdefault(fname, []).append(name)
            files = [(d / f, names) for f, names in sorted(by_file.items())]
            for f, _ in files:
                if not f.is_file():
                    raise CheckpointError(f"{d}: weight file {f.name} named in {index_name} is missing")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).is_file():
            return [(d / single, None)]
    st = sorted(d.glob("*.safetensors"))
    if st:
        return [(p, None) for p in st]
    raise CheckpointError(f"{d} has no model weights (expected one of {', '.join(WEIGHT_FILES)})")


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    sd = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    return {k: tuple(v.shape) for k, v in sd.items()}


def tensor_files(model_dir) -> dict[str, Path]:
    """tensor name -> file, from the index or the files' headers (no weights read)."""
    out: dict[str, Path] = {}
    for path, names in checkpoint_files(model_dir):
        for n in (names if names is not None else _header_shapes(path)):
            out[n] = path
    return out


def tensor_shapes(model_dir) -> dict[str, tuple[int, ...]]:
    """tensor name -> shape for every tensor of the dir, read from headers (no weights read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, _ in checkpoint_files(model_dir):
        shapes.update(_header_shapes(path))
    return shapes


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
    from safetensors.torch import save_file

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
        save_file({k: v.contiguous() for k, v in shard.items()}, str(Path(out_dir) / name), metadata={"format": "pt"})
        names.append(name)
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    if len(shards) > 1:
        write_index(out_dir, weight_map, total)
    return names
