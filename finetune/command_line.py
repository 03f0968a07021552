"""What the commands (chat, eval, merge) share on their command lines: a parser whose errors are one line, flags
that may be given once, and the check that a command can write where its output goes, made before any work."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors (a bad value, a missing flag, an ambiguous abbreviation) as one line naming the flag, not
    the usage text above it (as the trainer's)."""

    def error(self, message):
        print(f"error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class Once(argparse.Action):
    """Stores the value, noting a second use (``repeated``): argparse keeps the last silently, so ``--adapter A
    --adapter B`` would run with B alone, as if A had been dropped."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = vars(namespace).setdefault("_given", set())
        if self.dest in seen and not hasattr(namespace, "_repeated"):
            namespace._repeated = f"{'/'.join(self.option_strings)} given twice ({getattr(namespace, self.dest)!r} " \
                                  f"and {values!r}); pass it once"
        seen.add(self.dest)
        setattr(namespace, self.dest, values)


def home(value):
    """A path flag's value with a leading ~ as the home dir (anything else as given): the shell expands ~ only in a
    word of its own, not in ``--output=~/x`` or a config file's value (which made a dir named "~" in the working
    dir). The trainer's path flags use it too (training/arguments.py)."""
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def expand_home(args: argparse.Namespace, *dests: str) -> None:
    """``home`` for these path flags of parsed arguments."""
    for dest in dests:
        setattr(args, dest, home(getattr(args, dest, None)))


def repeated(args: argparse.Namespace) -> str | None:
    """The line saying which ``Once`` flag was given twice, or None."""
    return getattr(args, "_repeated", None)


def given(args: argparse.Namespace, dest: str) -> bool:
    """Whether a ``Once`` flag was on the command line, rather than left at its default."""
    return dest in vars(args).get("_given", ())


def unwritable_place(directory: Path) -> str | None:
    """Why nothing can be written in ``directory`` (or, where it does not exist yet, in its nearest existing
    parent, under which it would be made), or None: tried with a temporary file, as permissions, read-only mounts
    and pseudo file systems (/proc) all say no only to a write."""
    parent = Path(directory)
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a directory"
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        return f"cannot write in {parent} ({e.strerror or e})"
    return None


def stdout_gone() -> int:
    """What a command does when the reader of its stdout has left (`qwen-ft chat -q ... | head -1`, `qwen-ft eval
    ... | head -3`; it was a BrokenPipeError traceback): it stops, quietly. The rest goes to os.devnull, since the
    interpreter's flush of stdout at exit would raise again; 141 is the status of a process that SIGPIPE ends, as
    `cat` in that pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # (a stdout with no file descriptor: a test's StringIO)
        pass
    return 141
