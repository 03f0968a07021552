"""Resolve a model reference (local dir or hub id) to a local directory."""

from __future__ import annotations

import os
from pathlib import Path


class ModelNotFoundError(FileNotFoundError):
    pass


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def resolve_model_dir(ref: str | os.PathLike, what: str = "model directory", cache_dir: str | None = None) -> Path:
    """A local dir as is; `org/name` through huggingface_hub's cache/download (``cache_dir``: that cache's dir, as
    training's --cache_dir gives it; default: the hub's own); otherwise a clear error that names ``what`` was
    looked for (a model directory, an adapter directory)."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    ref = str(ref)
    if p.exists():
        raise ModelNotFoundError(f"{ref} is a file, not {'an' if what[0] in 'aeiou' else 'a'} {what}")
    if not _looks_like_hub_id(ref):
        raise ModelNotFoundError(f"{what} {ref} does not exist{dirs_beside(p)}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, cache_dir=cache_dir))
    except Exception as e:  # offline, unknown id, auth: all end the same way for the user
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if p.parent.is_dir():  # `output/my-adapter` mistyped reads as a hub id: the local reading first
            raise ModelNotFoundError(f"{what} {ref} does not exist{dirs_beside(p)}; as a Hugging Face hub id it could "
                                     f"not be fetched either ({why})") from None
        raise ModelNotFoundError(
            f"{ref} is not a local directory and could not be fetched from the Hugging Face hub ({why}). Without "
            f"a network, download it elsewhere and pass its local directory instead, e.g. /models/{ref.split('/')[-1]}"
        ) from None


def reference(path) -> str:
    """A local path, or a data flag's glob, as an absolute one (each of a comma-separated list's, stripped as the
    data reader strips them), a hub id as given: what a report or model card records, read from anywhere ("Base
    model: `.`" named the dir only for a reader in it)."""
    text = str(path)

    def one(part: str) -> str:
        p = Path(part).expanduser()
        return os.path.abspath(p) if p.exists() or any(c in part for c in "*?[") else part

    if Path(text).expanduser().exists() or "," not in text:
        return one(text)
    return ",".join(one(part.strip()) for part in text.split(","))


def _dir_name(d: Path) -> str:
    """d as a directory name: a trailing slash, except for the root (which is one already)."""
    return str(d) if str(d).endswith("/") else f"{d}/"


def dirs_beside(p: Path, most: int = 6) -> str:
    """`` (DIR/ holds: a, b, ...)``: the directories beside a path that does not exist, when its parent does (a
    mistyped run name is the usual cause), else ``""``."""
    try:
        names = sorted(c.name for c in p.parent.iterdir() if c.is_dir() and not c.name.startswith("."))
    except OSError:
        return ""
    if not names:
        return f" ({_dir_name(p.parent)} holds no directories)"
    more = f", ... ({len(names)} in all)" if len(names) > most else ""
    return f" ({_dir_name(p.parent)} holds: {', '.join(names[:most])}{more})"
