"""The output dir a run owns: its lock, clearing the run it overwrites, and the console log kept in it.

Preflight (checks.check_output_dir) has decided that the run may use the dir; `claim_output_dir` makes it
the run's (rank 0 only) and undoes what it set up (lock, log copy) when the run ends, however it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import shutil
import sys
from pathlib import Path

from .checks import (DEMO_MARKER, LOCK_FILE, RUN_OUTPUTS, STAGING, TrainConfigError, check_output_dir,
                     checkpoints, foreign_files, is_project_run)

logger = logging.getLogger(__name__)

CONSOLE_LOG = "train.log"


LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # (train.main's console format)


class EarlyConsole:
    """What a run prints and logs before it claims its output dir (preflight's warnings, such as a checkpoint it
    falls back from, the data summary, the clearing of an overwritten run), held so that train.log starts with it:
    the console showed these lines and the log lacked them."""

    def __init__(self):
        self.buffer = io.StringIO()
        self._handler = None
        self._saved = None

    def __enter__(self):
        self._handler = logging.StreamHandler(self.buffer)
        self._handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(self._handler)
        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self.buffer), _Tee(sys.stderr, self.buffer)
        return self

    def stop(self) -> str:
        """Stop holding (the streams back as they were); the text held."""
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler = None
            sys.stdout, sys.stderr = self._saved
        return self.buffer.getvalue()

    def __exit__(self, *exc):
        self.stop()


@contextlib.contextmanager
def claim_output_dir(args, identity: dict, early: EarlyConsole | None = None):
    """Lock args.output_dir for this run, clear the run it overwrites (--overwrite_output_dir), and copy the
    console into <output_dir>/train.log until the block ends, starting with what ``early`` held."""
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK_FILE, "a+")
    except OSError as e:
        raise TrainConfigError(f"--output_dir {out}: cannot write there ({e.strerror})") from None
    try:
        _lock(lock, out)
        # Another run may have used the dir between preflight and the lock: decide again, under the lock
        # (quietly: preflight has already logged what it found).
        checks_log = logging.getLogger(check_output_dir.__module__)
        level = checks_log.level
        checks_log.setLevel(logging.ERROR)
        try:
            check_output_dir(args, identity)
        finally:
            checks_log.setLevel(level)
        if args.overwrite_output_dir:
            _clear_previous_run(out)
        elif (out / STAGING).exists():  # a save that was killed: never a checkpoint; its files must not mix into one
            shutil.rmtree(out / STAGING)
            logger.warning("removed %s: the unfinished checkpoint save of an interrupted run", out / STAGING)
        with _console_copy(out / CONSOLE_LOG, early.stop() if early is not None else ""):
            yield out
    finally:
        lock.close()  # releases the flock


def _lock(lock, out: Path) -> None:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise TrainConfigError(f"--output_dir {out} is in use by another training run (pid {holder}); wait for it "
                               "to end or choose another --output_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()


def _clear_previous_run(out: Path) -> None:
    """--overwrite_output_dir: the old run's checkpoints, completion marker and outputs go, so that a later
    --resume can never continue the old run and a new run that stops early leaves nothing of the old one to
    mistake for its own. Only a run of this project is cleared; other files are never deleted."""
    if is_project_run(out):
        # a checkpoint the Trainer wrote holds trainer_state.json (saves are staged, then renamed whole); a
        # checkpoint-N dir without one is the user's, or something else's, and stays
        ckpts = checkpoints(out)
        theirs = [p for p in ckpts if not (p / "trainer_state.json").is_file()]
        old = [p for p in ckpts if p not in theirs]
        old += [p for p in (out / STAGING, *(out / n for n in RUN_OUTPUTS)) if p.exists()]
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if old:
            logger.warning("--overwrite_output_dir: removed the previous run's %s from %s",
                           ", ".join(p.name for p in old), out)
        if theirs:
            logger.warning("--overwrite_output_dir: left %s in %s: no trainer_state.json, so no run's checkpoint",
                           ", ".join(p.name for p in theirs), out)
        return
    present = [n for n in foreign_files(out) if n != DEMO_MARKER]
    clash = [n for n in present if n in RUN_OUTPUTS]
    if clash:
        logger.warning("--overwrite_output_dir: %s holds files of something else; this run replaces %s and "
                       "leaves the rest", out, ", ".join(clash))
    elif present:
        logger.warning("--overwrite_output_dir: %s holds other files; this run writes beside them", out)


class _Tee(io.TextIOBase):
    """A text stream that writes to the console stream and to the log file."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, s):
        self.stream.write(s)
        if "\r" not in s and not self.file.closed:  # progress-bar redraws stay on the console only
            self.file.write(s)
        return len(s)

    def flush(self):
        self.stream.flush()
        if not self.file.closed:
            self.file.flush()

    def isatty(self):
        return self.stream.isatty()

    def fileno(self):
        return self.stream.fileno()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")


@contextlib.contextmanager
def _console_copy(path: Path, held: str = ""):
    """Everything printed to stdout/stderr, and every log record, also goes to `path` (appended: a resumed
    run's log follows the interrupted one's), after ``held``, what the run printed before."""
    f = open(path, "a", encoding="utf-8", buffering=1)
    f.write(held)
    handler = logging.StreamHandler(f)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    # Log records reach the console through handlers bound to the original streams; the file gets its own.
    root.addHandler(handler)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(sys.stdout, f), _Tee(sys.stderr, f)
    try:
        yield
    except Exception as e:  # the one-line error the CLI prints after the streams are restored: keep it here too
        f.write(f"error: {e}\n")
        raise
    finally:
        sys.stdout, sys.stderr = saved
        root.removeHandler(handler)
        f.close()
