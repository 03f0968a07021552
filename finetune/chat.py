"""`qwen-ft chat`: talk to a model dir (float or Int4), optionally with a LoRA / Q-LoRA adapter.

    qwen-ft chat -m MODEL [--adapter DIR] [--system S] [--query Q] [--temperature T] [--top_p P] [--top_k K]
                 [--max_new_tokens N] [--repetition_penalty R] [--greedy] [--history-window TOKENS]

Interactive: the reply streams as it is generated (``model.chat_stream``); the conversation is kept as
history, as much of it as fits in the history window (``max_window_size`` tokens, default the model's
generation config, 6144), newest turns first, as the official make_context does. Commands (``:help`` lists
them; the official cli_demo's names): ``:clear-history`` (or ``:clear``) forgets the history, ``:history`` shows
it, ``:seed N`` and ``:conf KEY=VALUE`` change the sampling, ``:exit`` (or ``:quit``, or end of input, Ctrl-D)
leaves; Ctrl-C stops a reply as it streams, and at the prompt ends the chat with status 130.

One-shot: ``--query Q`` prints the reply alone on stdout and exits 0 (scriptable).
Without ``-m`` the base is the one the adapter records; a base that moved is given with ``-m``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from .command_line import OneLineParser, Once, expand_home, is_terminal, repeated, stdout_gone
from .generation_limits import max_new_tokens_limit, new_tokens_limit, too_many_new_tokens

PROMPT = "User> "
ANSWER = "Qwen> "


def _parser() -> argparse.ArgumentParser:
    # (one line for a value argparse refuses, as eval and merge: its usage text above the error filled the screen)
    p = OneLineParser(prog="qwen-ft chat", description=__doc__.split("\n\n")[0], examples=(
        "  qwen-ft chat -a output/my-adapter                  (interactive; :help lists its commands)\n"
        "  qwen-ft chat -m /models/Qwen-14B-Chat-Int4 -q 'Who are you?' --greedy   (one reply on stdout)"))
    p.add_argument("-m", "--model", action=Once, help="model dir or hub id (default: the base the adapter records)")
    p.add_argument("-a", "--adapter", action=Once, help="LoRA / Q-LoRA adapter dir (one)")
    p.add_argument("--system", "-s", default="You are a helpful assistant.", action=Once, help="system prompt")
    p.add_argument("--query", "-q", action=Once, help="ask one question, print the reply, exit")
    # (unset: the model dir's generation_config.json decides, as in model.chat)
    p.add_argument("--temperature", type=float, default=None, action=Once,
                   help="below 0.01: greedy, as --greedy (default: the generation config's)")
    p.add_argument("--top_p", "--top-p", type=float, default=None, action=Once,
                   help="in (0, 1] (default: the generation config's; 0.8 for Qwen-Chat)")
    p.add_argument("--top_k", "--top-k", type=int, default=None, action=Once,
                   help="0: off (default: the generation config's; 0 for Qwen-Chat)")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=None, action=Once,
                   help="tokens a reply may take (default: the generation config's; 512 for Qwen-Chat)")
    p.add_argument("--repetition_penalty", "--repetition-penalty", type=float, default=None, action=Once,
                   help="1: none (default: the generation config's; 1.1 for Qwen-Chat)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (do_sample=False): reproducible")
    p.add_argument("--history-window", "--history_window", type=int, default=None, action=Once,
                   help="max_window_size: tokens of system + history kept in the prompt, newest turns first, as "
                        "officially; a message that with the system prompt alone does not fit is refused, not sent "
                        "(default: the generation config's)")
    p.add_argument("--seed", type=int, default=None, action=Once,
                   help="seed for sampling (not with --greedy or a temperature below 0.01)")
    p.add_argument("--device", default=None, action=Once, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, action=Once, help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    return p


def bad_flag(args) -> str | None:
    """The first sampling flag out of its range, as one line (checked before the model loads)."""
    from .inference.sampling import GREEDY_BELOW
    from .modeling.sampling_ranges import SAMPLING_RANGES

    checks = [("--max-new-tokens", args.max_new_tokens, lambda v: v >= 1, "at least 1"),
              *(("--" + name.replace("_", "-"), getattr(args, name), *SAMPLING_RANGES[name])
                for name in SAMPLING_RANGES),
              ("--history-window", args.history_window, lambda v: v >= 1, "at least 1"),
              ("--seed", args.seed, seed_ok, "in [0, 2**32) (numpy's seed range, which set_seed seeds too)")]
    for flag, value, ok, want in checks:
        if value is not None and not ok(value):  # (NaN fails every comparison)
            if flag == "--temperature":
                want += f" (below {GREEDY_BELOW}: greedy, as --greedy)"
            return f"{flag} must be {want}, got {value}"
    return None


def greedy_temperature(conf) -> bool:
    """Whether the temperature set is below GREEDY_BELOW: greedy decoding itself, as in the server and the official
    openai_api.py."""
    from .inference.sampling import GREEDY_BELOW

    return conf.temperature is not None and conf.temperature < GREEDY_BELOW


def greedy_because(conf) -> str | None:
    """Why these settings decode greedily, as the flag a user would name: "--greedy", "--temperature T"
    (greedy_temperature), or None."""
    if conf.greedy:
        return "--greedy"
    if greedy_temperature(conf):
        return f"--temperature {conf.temperature:g}"
    return None


def ignored_by_greedy(conf) -> list[tuple[str, object]]:
    """(dest, value) of each setting that greedy decoding would ignore, [] when not greedy: the sampling options
    given (a greedy temperature beside --greedy is no contradiction) and the seed, which seeds nothing without
    sampling."""
    if greedy_because(conf) is None:
        return []
    temperature = None if greedy_temperature(conf) else conf.temperature
    return [(dest, value) for dest, value in (("temperature", temperature), ("top_p", conf.top_p),
                                              ("top_k", conf.top_k), ("seed", conf.seed)) if value is not None]


def contradiction(args) -> str | None:
    """Flags that cannot all hold, as one line (``:conf`` refuses the same settings: greedy_refusal)."""
    if ignored := ignored_by_greedy(args):
        named = ", ".join(f"--{dest.replace('_', '-')} {value}" for dest, value in ignored)
        why = greedy_because(args)
        if why == "--greedy":
            does = "does not sample"
        else:
            from .inference.sampling import GREEDY_BELOW

            does = f"decodes greedily (below {GREEDY_BELOW:g}, as --greedy)"
        return f"{why} {does}, so {named} would be ignored; pass one or the other"
    if args.query is not None and not args.query.strip():
        return "--query is empty (the interactive chat skips empty lines; leave --query out for it)"
    return None


def seed_ok(seed: int) -> bool:
    return 0 <= seed < 2 ** 32


def generation_kwargs(args) -> dict:
    """The flags given, as chat()'s generation-config updates (unset flags keep the model's defaults); a
    temperature below 0.01 (0 included) is greedy decoding, as in the server and the official openai_api.py."""
    kw = {}
    if greedy_because(args) is not None:
        kw.update(do_sample=False, top_p=None, top_k=None, temperature=None)
    else:
        for name in ("temperature", "top_p", "top_k"):
            if getattr(args, name) is not None:
                kw[name] = getattr(args, name)
    for name in ("max_new_tokens", "repetition_penalty"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.history_window is not None:
        kw["max_window_size"] = args.history_window
    return kw


def trim_history(tokenizer, history: list, system: str, window: int) -> list:
    """The newest turns that make_context would still include for a next query (older ones are dropped)."""
    from .modeling import make_context

    # Read off make_context itself (which turns fit does not depend on the query): an estimate of the turns'
    # length dropped turns the model would still have seen. Control tokens enter its ids only as ids, so each
    # included turn is two <|im_start|>, besides the system's, the query's and the assistant header's.
    ids = make_context(tokenizer, "", history=history, system=system, max_window_size=window)[1]
    kept = (ids.count(tokenizer.im_start_id) - 3) // 2
    return history[len(history) - kept:] if kept else []


def window_size(model, kw: dict) -> int:
    """max_window_size as chat() reads it: the flag / :conf, else the generation config, else 6144."""
    return kw.get("max_window_size") or getattr(model.generation_config, "max_window_size", None) or 6144


def too_long(tokenizer, query: str, system: str, window: int) -> str | None:
    """Why the message alone (with the system prompt, no history) does not fit the window, or None. make_context
    would send it anyway, past the length the model is made for (a pasted file: garbage, or out of GPU memory)."""
    from .modeling import make_context

    n = len(make_context(tokenizer, query, history=[], system=system, max_window_size=window)[1])
    if n > window:
        return f"the message is {n} tokens with the system prompt, more than the {window}-token window"
    return None


def load(args):
    from .adapters import resolve_base
    from .errors import ModelLoadError
    from .hub import resolve_model_dir
    from .loading import load_model
    from .model_dir import check_chat_format
    from .tokenization import load_tokenizer

    if args.adapter:  # a hub id too (as eval and merge take one), and a missing dir named with what is beside it
        args.adapter = str(resolve_model_dir(args.adapter, "adapter directory"))
    # a hub id resolved now (as the adapter's base is), so that the checks below read its config before loading
    model_dir = resolve_base(args.adapter, args.model) if args.adapter else resolve_model_dir(args.model)
    check_chat_format(model_dir, args.adapter)
    if problem := too_many_new_tokens(args.max_new_tokens, max_new_tokens_limit(model_dir), model_dir):
        raise ModelLoadError(problem)  # (before the weights load, as eval's check)
    # the tokenizer first: it is checked against the model's config before any weights load
    tokenizer = load_tokenizer(model_dir, adapter=args.adapter)
    model = load_model(model_dir, adapter=args.adapter, dtype=args.dtype, device=args.device)
    return model, tokenizer


# C0 controls but newline and tab, DEL, C1: shown as \xNN on a terminal, where a model's ESC sequence (even a
# tiny model's stray byte) would clear the screen, retitle the window or move the cursor over the answer
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)] if chr(c) not in "\n\t"}


def for_terminal(out, text: str) -> str:
    """``text`` as ``out`` should show it: control characters made visible on a terminal, as-is elsewhere."""
    return text.translate(_CONTROLS) if is_terminal(out) else text


def stream_reply(model, tokenizer, query, history, system, out, **kw) -> str:
    """Print the reply as it grows; returns the final text."""
    printed = ""
    # closed even when Ctrl-C lands here rather than inside the stream: closing stops the generation behind it
    with contextlib.closing(model.chat_stream(tokenizer, query, history=history, system=system, **kw)) as stream:
        for text in stream:
            if text.startswith(printed):
                out.write(for_terminal(out, text[len(printed):]))
            else:  # the decoded text changed behind us (rare: a strip or a merged character): reprint the line
                out.write("\r" + ANSWER + for_terminal(out, text))
            out.flush()
            printed = text
    out.write("\n")
    out.flush()
    return printed


HELP = """Commands (as the official cli_demo's, where it has them):
  :help, :h                  this list
  :exit, :quit, :q           leave (or Ctrl-D)
  :clear-history, :clh       forget the history (also :clear, :cl, which the official demo uses to clear the
                             screen)
  :history, :his             the turns kept as history
  :seed                      the seed; :seed N sets it (each reply is sampled from it, as the official demo)
  :conf                      the generation settings; :conf KEY=VALUE [...] changes them (temperature, top_p,
                             top_k, max_new_tokens, repetition_penalty, greedy or do_sample, history_window
                             or max_window_size, seed; KEY=none: the default), checked as the flags are:
                             greedy beside a sampling setting or a seed is refused
  :reset-conf                the settings given on the command line again (the seed too)
A line starting with ':' that is none of these is sent as a message.
"""

# :conf names: the flags' dests, and the generation-config names the official demo takes
_CONF_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_new_tokens": "max_new_tokens",
               "repetition_penalty": "repetition_penalty", "greedy": "greedy", "do_sample": "greedy",
               "history_window": "history_window", "max_window_size": "history_window", "seed": "seed"}


def change_conf(conf: argparse.Namespace, words: list[str], limit: int | None = None) -> str:
    """Apply ``:conf KEY=VALUE ...`` to ``conf`` (the parsed flags), all or nothing; returns what to print. Values
    are read as the flags' own types read them; ``limit``: the most new tokens the model holds."""
    from .settings import yes_no

    types = {action.dest: action.type for action in _parser()._actions}
    changed = argparse.Namespace(**vars(conf))
    given: dict[str, str] = {}  # dest -> the key that set it
    for word in words:
        key, eq, text = word.partition("=")
        dest = _CONF_NAMES.get(key.strip().replace("-", "_"))
        if not eq or dest is None:
            return f"(:conf takes KEY=VALUE with KEY one of {', '.join(_CONF_NAMES)}; got {word!r})"
        if dest in given:  # (the last one was kept silently: top_p=0.5 top_p=0.9, greedy=yes do_sample=yes)
            same = "given twice" if given[dest] == key.strip() else f"and {given[dest]} set the same thing"
            return f"({key.strip()} {same}; nothing changed)"
        given[dest] = key.strip()
        try:
            if text.strip().lower() in ("none", "null", ""):
                value = None if dest != "greedy" else False
            elif dest == "greedy":
                value = yes_no(text) if key.strip() == "greedy" else not yes_no(text)
            else:
                value = types[dest](text)
        except ValueError:
            kind = "yes/no value" if dest == "greedy" else "whole number" if types[dest] is int else "number"
            return f"({key}: {text!r} is not a {kind}; nothing changed)"
        setattr(changed, dest, value)
    if (problem := bad_flag(changed) or too_many_new_tokens(changed.max_new_tokens, limit, "the model")) is not None:
        flag, rest = problem.split(" ", 1)  # "--top-p must be ...": named as :conf names it
        return f"({flag.lstrip('-').replace('-', '_')} {rest}; nothing changed)"
    if ignored := ignored_by_greedy(changed):  # (greedy=yes left an earlier top_p in effect beside it, unsaid)
        return f"({greedy_refusal(changed, ignored)}; nothing changed)"
    vars(conf).update(vars(changed))
    return describe_conf(conf)


def greedy_refusal(conf, ignored: list[tuple[str, object]]) -> str:
    """``ignored_by_greedy``'s settings as :conf names them, with both ways out (whichever was set first)."""
    named = ", ".join(f"{dest} {value}" for dest, value in ignored)
    unset = ", ".join(f"{dest}=none" for dest, _ in ignored)
    return (f"greedy does not sample, so {named} would be ignored: unset {'it' if len(ignored) == 1 else 'them'} "
            f"({unset}) or sample ({sample_instead(conf)})")


def sample_instead(conf) -> str:
    """The :conf settings that make greedy settings sample (both where --greedy and a greedy temperature are set)."""
    from .inference.sampling import GREEDY_BELOW

    return " and ".join(["greedy=no"] * bool(conf.greedy) + [f"temperature={GREEDY_BELOW:g} or more"] *
                        greedy_temperature(conf))


def describe_conf(conf: argparse.Namespace) -> str:
    shown = {dest: getattr(conf, dest) for dest in dict.fromkeys(_CONF_NAMES.values())}
    return "(" + ", ".join(f"{k}={('unset' if k == 'seed' else 'default') if v is None else v}"
                           for k, v in shown.items()) + ")"


def _on_cuda(model) -> bool:
    return next(model.parameters()).device.type == "cuda"


def warm_up(model, tokenizer, say, kw: dict) -> None:
    """The chat engine's first-use work (kernel compiles, CUDA graphs: seconds on a GPU) before the first question,
    so that the first reply does not wait for it in silence; nothing where the replies do not go through the engine
    (``FINETUNE_STATIC_DECODE=0``: generate()). ``kw``: the replies' generation settings (generation_kwargs), whose
    decode steps it captures."""
    from .inference.chat_decoder import engine_for, engine_takes
    from .inference.sampling import SamplingParams
    from .modeling.chat import _generation_config

    if engine_takes(model):
        try:
            expect = [SamplingParams.from_generation_config(_generation_config(model, tokenizer, None, dict(kw))[0])]
        except ValueError:  # options the engine does not implement: those replies go through generate()
            expect = []
        say(f"(decoder warmed up in {engine_for(model, tokenizer).warm_up(expect):.1f} s)")


def interactive(model, tokenizer, args, stdin=None, out=None) -> int:
    """The chat loop: a line is a message, or one of HELP's commands. ``args``: the parsed flags (``:conf``
    changes a copy; each reply's generation settings come from it)."""
    from transformers import set_seed

    stdin = stdin or sys.stdin
    out = out or sys.stdout
    conf = argparse.Namespace(**vars(args))  # (the seed too: :reset-conf gives back a combination the flags passed)
    limit = new_tokens_limit(model.config.to_dict())  # (:conf's max_new_tokens, as the flag is checked)
    try:
        import readline  # noqa: F401  (line editing and history in a terminal)
    except ImportError:  # pragma: no cover
        pass

    def say(text: str) -> None:  # (text: :history's turns among them)
        out.write(for_terminal(out, text) + ("" if text.endswith("\n") else "\n"))
        out.flush()

    if _on_cuda(model):
        warm_up(model, tokenizer, say, generation_kwargs(conf))
    say("Chat with the model. :help lists the commands; :exit (or Ctrl-D) leaves.")
    history: list = []
    while True:
        try:
            if stdin is sys.stdin:
                query = input(PROMPT)
            else:
                out.write(PROMPT)
                out.flush()
                query = stdin.readline()
                if not query:
                    raise EOFError
        except EOFError:  # Ctrl-D: the end of the chat
            out.write("\n")
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt: the status Ctrl-C gives elsewhere (it was 0, as Ctrl-D)
            out.write("\n")
            return 130
        query = query.strip()
        if not query:
            continue
        words = query[1:].split() if query.startswith(":") else []
        command = words[0] if words else None
        if command in ("exit", "quit", "q"):
            break
        if command in ("help", "h"):
            say(HELP)
            continue
        if command in ("clear-history", "clh", "clear", "cl", "clear-his"):
            history = []
            say("(history cleared)")
            continue
        if command in ("history", "his"):
            say("\n".join(f"User[{i}]: {q}\nQwen[{i}]: {r}" for i, (q, r) in enumerate(history))
                or "(no history)")
            continue
        if command == "seed":
            if len(words) > 1:
                try:
                    new_seed = int(words[1])
                except ValueError:
                    new_seed = None
                stays = f"the seed stays {'unset' if conf.seed is None else conf.seed}"
                if new_seed is None or not seed_ok(new_seed):
                    say(f"(:seed takes a whole number in [0, 2**32), got {words[1]!r}; {stays})")
                    continue
                if ignored_by_greedy(argparse.Namespace(**{**vars(conf), "seed": new_seed})):
                    say(f"(greedy does not sample, so seed {new_seed} would be ignored: sample first "
                        f"(:conf {sample_instead(conf)}); {stays})")
                    continue
                conf.seed = new_seed
            say(f"(seed {conf.seed if conf.seed is not None else 'unset: each reply draws afresh'})")
            continue
        if command == "conf":
            say(change_conf(conf, words[1:], limit) if len(words) > 1 else describe_conf(conf))
            continue
        if command == "reset-conf":
            conf = argparse.Namespace(**vars(args))
            say(describe_conf(conf))
            continue
        kw = generation_kwargs(conf)
        window = window_size(model, kw)
        if (problem := too_long(tokenizer, query, args.system, window)) is not None:
            say(f"({problem} (:conf history_window); not sent)")
            continue
        if conf.seed is not None:
            set_seed(conf.seed)
        out.write(ANSWER)
        out.flush()
        try:
            reply = stream_reply(model, tokenizer, query, history, args.system, out, **kw)
        except KeyboardInterrupt:
            out.write("\n(interrupted)\n")
            continue
        history = trim_history(tokenizer, history + [(query, reply)], args.system, window)
    return 0


def tolerate_bad_text(*streams) -> None:
    """Bytes the terminal's encoding cannot decode (a Latin-1 paste into a UTF-8 terminal) or characters it cannot
    encode (a reply in Chinese to an ASCII locale) become U+FFFD / '?' rather than a traceback that ends the chat:
    the model then sees the same U+FFFD that :history shows."""
    for stream in streams:
        if hasattr(stream, "reconfigure"):  # (a TextIOWrapper; not a test's StringIO)
            stream.reconfigure(errors="replace")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    expand_home(args, "model", "adapter")
    for flag, value in (("-m/--model", args.model), ("-a/--adapter", args.adapter)):
        if value is not None and not value.strip():  # an unset shell variable: --adapter "" chatted without one
            print(f"error: {flag} is empty", file=sys.stderr)
            return 2
    if not args.model and not args.adapter:
        print("error: pass -m MODEL (and/or --adapter DIR)", file=sys.stderr)
        return 2
    from .loading import placement_problem

    # (--device / --dtype: load_model refused them, but after a hub id was fetched and the tokenizer read)
    if (problem := repeated(args) or bad_flag(args) or contradiction(args)
            or placement_problem(args.device, args.dtype)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    tolerate_bad_text(sys.stdin, sys.stdout)
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    from .adapters import AdapterError
    from .hub import ModelNotFoundError
    from .loading import ModelLoadError

    try:
        model, tokenizer = load(args)
    except (AdapterError, ModelLoadError, ModelNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.query is not None:
            if args.seed is not None:
                from transformers import set_seed

                set_seed(args.seed)
            kw = generation_kwargs(args)
            if (problem := too_long(tokenizer, args.query, args.system, window_size(model, kw))) is not None:
                print(f"error: {problem} (--history-window)", file=sys.stderr)
                return 2
            reply, _ = model.chat(tokenizer, args.query, history=None, system=args.system, **kw)
            print(for_terminal(sys.stdout, reply), flush=True)
            return 0
        return interactive(model, tokenizer, args)
    except BrokenPipeError:
        return stdout_gone()


if __name__ == "__main__":
    sys.exit(main())
