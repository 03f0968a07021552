"""What the commands (chat, eval, merge) share on their command lines: a parser whose errors are one line, flags
that may be given once, and the check that a command can write where its output goes, made before any work."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


SPELLING = "A flag takes - or _ alike (--max-new-tokens or --max_new_tokens), whole: it is not abbreviated."


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors (a bad value, a missing flag) as one line naming the flag, not the usage text above it (as
    the trainer's). A long flag takes - or _ alike (``--max_new_tokens`` for ``--max-new-tokens``: the trainer's
    flags are spelled with _, these with -), and is never abbreviated: argparse took a prefix (``--adapt``) silently,
    which a flag added later makes ambiguous, and a mistyped flag given to the wrong command for another's. An
    unknown flag or a stray value is named with what was likely meant (``unknown``)."""

    def __init__(self, *args, examples: str = "", **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("epilog", (f"examples:\n{examples}\n\n" if examples else "") + SPELLING)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._argv = respelled(list(sys.argv[1:] if args is None else args), self._option_string_actions)
        return super().parse_known_args(self._argv, namespace)

    def error(self, message):
        message = " ".join(message.split())
        if message.startswith(("unrecognized arguments", "the following arguments are required", "one of the")):
            # (a missing flag was said before the unknown one that was meant for it: `eval -d x` "requires --data")
            message = unknown(getattr(self, "_argv", []), self) or message
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def respelled(argv: list[str], options) -> list[str]:
    """``argv`` with each long flag that ``options`` (option string -> action) has only in the other spelling
    (_ for -, or - for _) written as it has it; values (``--system=--x_y``) and what follows ``--`` unchanged."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        name, eq, value = arg.partition("=")
        if name.startswith("--") and name not in options:
            for other in ("--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
                if other in options:
                    arg = other + eq + value
                    break
        out.append(arg)
    return out


def _norm(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_").lower()


# Names other tools (and the other commands) give a flag: a user's --model-dir, --output_dir or --data_path
ALIASES = {
    "model": ("model_dir", "model_path", "model_name_or_path", "base", "base_model", "base_model_name_or_path"),
    "adapter": ("adapter_dir", "adapter_path", "adapter_name_or_path", "lora", "lora_dir", "lora_path",
                "lora_weight_path", "peft", "peft_model", "checkpoint"),
    "output": ("output_dir", "out", "out_dir", "output_path", "save_dir"),
    "data": ("data_path", "data_file", "dataset", "eval_data", "eval_data_path", "eval_file", "test_data"),
    "query": ("question", "prompt", "message", "input"),
    "model_name_or_path": ("model", "model_dir", "model_path", "base_model"),
    "data_path": ("data", "data_file", "dataset", "train_data", "train_file"),
    "output_dir": ("output", "out", "out_dir", "output_path", "save_dir"),
    "lora_weight_path": ("adapter", "adapter_dir", "adapter_path", "lora_path"),  # (not --lora: --lora_r, --use_lora)
}

# The commands' parser builders (module, function), for "a flag of qwen-ft train, not of chat"
PARSERS = {"train": ("finetune.training.arguments", "build_parser"), "chat": ("finetune.chat", "_parser"),
           "merge": ("finetune.merge", "_parser"), "eval": ("finetune.evaluate", "_parser"),
           "serve": ("finetune.serve.cli", "_parser"), "demo": ("finetune.demo", "_parser")}


def _named(action) -> str:
    """An action's flag as help shows it: its short form and first long one (-m/--model)."""
    shorts = [o for o in action.option_strings if not o.startswith("--")]
    return "/".join(shorts + [o for o in action.option_strings if o.startswith("--")][:1])


def flag_hint(flag: str, parser) -> str:
    """What the user likely meant by ``flag``, unknown to ``parser`` (a command's), as " (...)" or "": another
    name of one of its flags, a flag it abbreviates or is near to, or the command whose flag it is."""
    import difflib

    options = parser._option_string_actions
    longs = {_norm(o): a for o, a in options.items() if o.startswith("--")}
    name = _norm(flag.partition("=")[0])
    if not flag.startswith("--"):  # -O for -o, -lora_r for --lora_r
        near = [o for o in options if len(o) == 2 and o.lower() == flag.lower()]
        if near or name in longs:
            return f" (did you mean {near[0] if near else _named(longs[name])}?)"
        return _elsewhere(name, parser)
    for dest, names in ALIASES.items():
        if name in names and dest in longs:
            return f" (did you mean {_named(longs[dest])}?)"
    prefixed = list(dict.fromkeys(a for n, a in longs.items() if n.startswith(name)))
    if prefixed:
        return f" (did you mean {' or '.join(_named(a) for a in prefixed[:3])}? flags are not abbreviated)"
    near = difflib.get_close_matches(name, list(longs), n=1, cutoff=0.75)
    if near:
        return f" (did you mean {_named(longs[near[0]])}?)"
    return _elsewhere(name, parser)


def _elsewhere(name: str, parser) -> str:
    """" (a flag of qwen-ft train, not of qwen-ft chat)" where other commands have the flag ``name`` (_norm's)."""
    command = parser.prog.split()[-1]
    elsewhere = [c for c in PARSERS if c != command and name in {_norm(o) for o in _options_of(c)}]
    if elsewhere:
        return f" (a flag of qwen-ft {', '.join(elsewhere)}, not of qwen-ft {command})"
    return ""


def _options_of(command: str) -> list[str]:
    """The option strings of a command's parser ([] where it cannot be built)."""
    import importlib

    module, builder = PARSERS[command]
    try:
        return list(getattr(importlib.import_module(module), builder)()._option_string_actions)
    except Exception:  # (a command whose imports fail here: no hint from it, the error line stays)
        return []


def value_hint(value: str, parser) -> str:
    """Where a value given without a flag likely belongs, as " (...)": a model or adapter dir, a data file, a
    question."""
    options = parser._option_string_actions

    def flag(*names):
        return next((options[n] for n in names if n in options), None)

    path = Path(home(value))
    adapter, model = flag("--adapter", "--lora_weight_path"), flag("--model", "--model_name_or_path")
    data, query = flag("--data", "--data_path"), flag("--query")
    if path.is_dir() and (path / "adapter_config.json").is_file() and adapter is not None:
        spec = f"NAME={value}" if adapter.metavar == "NAME=DIR" else value  # (serve's)
        return f" (an adapter dir goes with {_named(adapter)}: {_named(adapter).split('/')[0]} {spec})"
    if path.is_dir() and (path / "config.json").is_file() and model is not None:
        return f" (a model dir goes with {_named(model)}: {_named(model).split('/')[0]} {value})"
    if path.is_file() and path.suffix.lower() in (".json", ".jsonl") and data is not None:
        return f" (chat data goes with {_named(data)}: {_named(data).split('/')[0]} {value})"
    if not path.exists() and (value.startswith(("/", "./", "../", "~")) or value.endswith((".json", ".jsonl"))):
        # (a path, not a question: "/models/x" that is not there)
        return " (no such file or dir" + (f"; a model dir goes with {_named(model)}" if model is not None else "") + ")"
    if query is not None and not path.exists():
        return f" (a question goes with {_named(query)}, quoted)"
    return " (no flag takes it; quote a value that has spaces)"


def unknown(argv: list[str], parser) -> str | None:
    """The first unknown flag, or value no flag takes, in ``argv`` (as ``parser`` reads it), as one line with its
    hint; None when there is none."""
    options = parser._option_string_actions
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            return None
        if arg.startswith("-") and len(arg) > 1 and not _is_number(arg):
            name = arg.partition("=")[0] if arg.startswith("--") else arg[:2]
            action = options.get(name)
            if action is None:
                return f"unknown flag {arg.partition('=')[0]}{flag_hint(arg, parser)}"
            if "=" not in arg and not (len(arg) > 2 and not arg.startswith("--")):  # (not --x=v, not -mVALUE)
                n = action.nargs
                i += 0 if n == 0 else n if isinstance(n, int) else 1 if n in (None, "?") else 0
            continue
        return f"{arg!r} without a flag{value_hint(arg, parser)}"
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


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


def is_terminal(stream) -> bool:
    """Whether ``stream`` is a terminal (progress bars, visible control characters): False for a file, a pipe, a
    stream without isatty (a test's) or a closed one."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # (a closed stream)
        return False


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
