"""`qwen-ft`: one entry point for the project's commands."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("finetune.train", "fine-tune (LoRA, Q-LoRA or full); see `qwen-ft train --help`"),
    "demo": ("finetune.demo", "make the tiny demo model (--make-model DIR [--int4])"),
    "chat": ("finetune.chat", "chat with a model (+ adapter): interactive, or one --query"),
    "merge": ("finetune.merge", "merge an adapter into its base: bf16 or Int4 (RTN / GPTQ) model dir"),
    "eval": ("finetune.evaluate", "held-out loss, perplexity, exact match, ROUGE-L (base vs adapter)"),
    "serve": ("finetune.serve.cli", "OpenAI-compatible server (+ chat page) for a model and its adapters"),
}


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `qwen-ft eval ... | head -3`, `qwen-ft | head -1`: it was a BrokenPipeError traceback
        from .command_line import stdout_gone

        return stdout_gone()


USAGE = "usage: qwen-ft COMMAND [ARGS]      qwen-ft help COMMAND: its flags      qwen-ft --version"
EXAMPLES = """examples (the tiny demo on the CPU: bash scripts/finetune_qlora.sh in the checkout):
  qwen-ft train -m /models/Qwen-14B-Chat-Int4 -d data/train.json -o output/my-adapter
  qwen-ft chat -a output/my-adapter         (the base model is the one the adapter records)
  qwen-ft eval -a output/my-adapter --data data/heldout.json
  qwen-ft merge -a output/my-adapter -o output/merged"""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return f"{USAGE}\n\ncommands:\n" + "\n".join(lines) + "\n\n" + EXAMPLES


def _main(argv: list[str]) -> int:
    if argv and argv[0] in ("-V", "--version"):  # (the package's version: what a bug report asks first)
        from . import __version__

        print(f"qwen-ft {__version__}")
        return 0
    if argv and argv[0] == "help":  # `qwen-ft help train` as `qwen-ft train --help` (as git and pip read it)
        if len(argv) > 1 and argv[1] in COMMANDS:
            argv = [argv[1], "--help"]
        elif len(argv) > 1 and argv[1] not in ("help", "-h", "--help"):  # (`qwen-ft help help`: this list)
            print(f"error: no command {argv[1]!r} to help with{_nearest(argv[1:])}; {LISTS}", file=sys.stderr)
            return 2
        else:
            argv = ["--help"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:  # one line on stderr (the list went to stdout above it, and was lost to a pipe)
        print(f"error: unknown command {argv[0]!r}{_nearest(argv)}; {LISTS}", file=sys.stderr)
        return 2
    from .settings import SettingsError, settings, unknown_switches

    try:
        settings()  # a bad FINETUNE_* switch is one line now, not a traceback wherever it is first read
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in unknown_switches():
        print(f"warning: {line}", file=sys.stderr)
    try:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        return module.main(argv[1:]) or 0
    except KeyboardInterrupt:  # Ctrl-C while a model loads or a one-shot reply runs (train says its own and returns)
        print(f"\nqwen-ft {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError (torch is imported by then)
            raise
        print(f"error: {out_of_memory(argv[0])}", file=sys.stderr)
        return 2


LISTS = "qwen-ft --help lists the commands"


def _nearest(argv: list[str]) -> str:
    """What the user likely meant by an unknown command: a near name (`evaluate`, `Chat`), or, for a flag first
    (`qwen-ft -m MODEL chat`), the command that follows it put first."""
    import difflib

    word = argv[0]
    if word.startswith("-"):
        later = next((a for a in argv[1:] if a in COMMANDS), None)
        return f" (the command comes first: qwen-ft {later or 'COMMAND'} {word} ...)"
    near = difflib.get_close_matches(word.lower(), COMMANDS, n=1, cutoff=0.5)
    near = near or [c for c in COMMANDS if word.lower().startswith(c)]  # evaluate, training, merged
    near = near or (["train"] if word.lower().replace("-", "") == "finetune" else [])
    return f" (did you mean {near[0]}?)" if near else ""


# What lowers the memory a command needs (train says it itself, with its own flags)
LOWER = {
    "serve": "a smaller --max-batch or --max-model-len (the key-value cache is allocated for both)",
    "eval": "a smaller --batch-size or --max-new-tokens",
    "chat": "a GPU with more free memory, or --device cpu",
    "merge": "--device cpu (the merge holds the base in fp32: 4 bytes a parameter)",
}


def out_of_memory(command: str) -> str:
    """One line for a command that ran out of GPU memory: what the process held, and what lowers the need."""
    import torch

    from .training.memory import held_on

    held = held_on(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else ""
    return f"qwen-ft {command} ran out of GPU memory{held}; try {LOWER.get(command, 'a smaller workload')}"


if __name__ == "__main__":
    sys.exit(main())
