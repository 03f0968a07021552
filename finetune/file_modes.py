"""Weights files written with the permissions every other file of the project's outputs gets.

safetensors 0.8 writes through a temporary file that it renames into place, and that file is always created
owner-only (0600, safetensors issue #782), whatever the umask: a merged model or an adapter then had
`model.safetensors` unreadable to the other users and containers that could read its config.json. Each weights file
the project writes, or has PEFT / transformers write, is given the mode a plain ``open()`` would have given it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()  # (reading the umask sets it: two readers at once could leave it 0)


def umask() -> int:
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def save_weights(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors' ``save_file`` with the file's mode as the umask allows (0644 under the usual 022)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~umask())


def weights_readable(directory, since: float) -> None:
    """Every ``*.safetensors`` in ``directory`` (and one level below: PEFT puts a named adapter in its own subdir)
    modified at or after ``since`` (a ``time.time()`` taken before the save) given the umask's mode."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    mode = 0o666 & ~umask()
    for path in [*directory.glob("*.safetensors"), *directory.glob("*/*.safetensors")]:
        try:
            st = path.lstat()
            if path.is_file() and not path.is_symlink() and st.st_mtime >= since - 1 and st.st_mode & 0o777 != mode:
                os.chmod(path, mode)
        except OSError:
            continue  # (a file that vanished, or one this user cannot chmod: left as it is)
