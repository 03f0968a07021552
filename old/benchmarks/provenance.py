"""The commit a benchmark result was measured at: QWEN_FT_COMMIT when set (the device machine's copy of the
tree can carry a stale .git), else git's short HEAD, else None (not a git checkout)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    if os.environ.get("QWEN_FT_COMMIT"):
        return os.environ["QWEN_FT_COMMIT"]
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return (r.stdout.strip() or None) if r.returncode == 0 else None
