"""What a training run recorded about its data, read back for an adapter: the data flag of its run_args.json, as
the run read it (from its working dir, --skip_invalid), and whether the files still hold what run_info.json says it
trained on. Merge takes that data for its loss report and its calibration; eval warns when its held-out data is it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def run_dir(adapter_dir) -> Path | None:
    """The run dir above a checkpoint-N dir (its run_args.json, run_info.json, logs and other checkpoints), or None
    for any other dir."""
    p = Path(adapter_dir).expanduser()
    return p.parent if p.name.startswith("checkpoint-") else None


def run_args(adapter_dir: Path) -> tuple[Path, dict] | None:
    """(path, content) of the adapter's run's run_args.json: in the adapter dir, or, for a checkpoint-N dir (which
    has none), in the run dir above it; None when there is none or it is not a JSON object."""
    p = Path(adapter_dir) / "run_args.json"
    if not p.is_file() and (run := run_dir(adapter_dir)) is not None:
        p = run / "run_args.json"
    if not p.is_file():
        return None
    try:
        record = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return (p, record) if isinstance(record, dict) else None


def trained_skipping_invalid(adapter_dir: Path) -> bool:
    """Whether the adapter's run read its data with --skip_invalid True: its invalid records were counted and
    skipped there, and a reader of the same data skips them too (they stopped a merge, on a file the user had not
    named)."""
    found = run_args(adapter_dir)
    data = found[1].get("data") if found else None
    return isinstance(data, dict) and data.get("skip_invalid") is True


def training_data(adapter_dir: Path, changed: Callable[[str], None] | None = None) -> str | None:
    """The data file(s) the adapter was trained on, from its run's run_args.json (``run_args``), anchored at the
    run's working dir; None when none is recorded, readable, or still the same: ``changed(data)`` is called for
    files whose content is no longer what the run trained on."""
    found = run_args(adapter_dir)
    if found is None:
        return None
    p, record = found
    try:
        data, cwd = record.get("data", {}).get("data_path"), record.get("cwd")
    except AttributeError:
        return None
    if not data or not isinstance(data, str):
        return None
    if isinstance(cwd, str):
        data = _from_dir(data, cwd)
    from .data import DataError
    from .data.records import data_sources

    try:  # one file, or the several a glob / a list / a plain dir named in training
        if not all(Path(f).is_file() for f in data_sources(data)):
            return None
    except DataError:
        return None
    try:
        still = _still_the_training_data(p.parent, data)
    except OSError:  # a file that cannot be read (another user's): nothing can be said of it
        return None
    if still:
        return data
    if changed is not None:
        changed(data)
    return None


def _from_dir(data: str, cwd: str) -> str:
    """A data flag's value as the training run read it, from its working directory ``cwd``: each relative path or
    pattern of it (a comma-separated list's too, as data_sources splits it) anchored there. `data/train.json`
    given in the checkout was not found by a merge run from another dir."""
    from .data.records import spec_parts

    def anchored(part: str) -> str:
        part = os.path.expanduser(part)
        return part if os.path.isabs(part) else os.path.join(cwd, part)

    return ",".join(anchored(part) for part in spec_parts(data, lambda whole: os.path.exists(anchored(whole))))


def _still_the_training_data(run_dir: Path, data: str) -> bool:
    """Whether ``data`` still holds what the run trained on: its content hash against run_info.json's (True where
    the run recorded none, before session 44). A file edited or replaced since is not the run's training data: a
    "training-data" loss or a calibration on other records would be passed off as the run's."""
    try:
        recorded = json.loads((run_dir / "run_info.json").read_text()).get("data_content")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        recorded = None
    if not recorded:
        return True
    from .data.dataset import data_content

    return data_content(data) == recorded


__all__ = ["run_args", "run_dir", "trained_skipping_invalid", "training_data"]
