"""Resolve a model reference (local dir or hub id) to a local directory."""

from __future__ import annotations

import os
from pathlib import Path


class ModelNotFoundError(FileNotFoundError):
    pass


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def resolve_model_dir(ref: str | os.PathLike, what: str = "model directory") -> Path:
    """A local dir as is; `org/name` through huggingface_hub's cache/download; otherwise a clear error that names
    ``what`` was looked for (a model directory, an adapter directory)."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    ref = str(ref)
    if p.exists():
        raise ModelNotFoundError(f"{ref} is a file, not {'an' if what[0] in 'aeiou' else 'a'} {what}")
    if not _looks_like_hub_id(ref):
        raise ModelNotFoundError(f"{what} {ref} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref))
    except Exception as e:  # offline, unknown id, auth: all end the same way for the user
        raise ModelNotFoundError(
            f"{ref} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Without a network, download "
            f"it elsewhere and pass its local directory instead, e.g. /models/{ref.split('/')[-1]}"
        ) from None
