"""`qwen-ft serve`: an OpenAI-compatible server for a base model and its LoRA adapters.

    qwen-ft serve [-m MODEL_DIR] [--adapter NAME=DIR ...] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                  [--max-batch N] [--max-model-len N] [--prefill-chunk N] [--max-queue N] [--device D] [--dtype T]
                  [--cors-origin ORIGIN ...]

The base is served under its dir name, each adapter under its NAME (the request's `model` picks one). Without -m
the base is the one the adapters record (as `qwen-ft chat -a DIR` takes it).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys

from ..command_line import OneLineParser, Once, given, repeated

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/\s?#]+$")  # what a browser sends as Origin: no path, no slash


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


API_KEY_ENV = "QWEN_FT_API_KEY"


def _parser() -> argparse.ArgumentParser:
    # one-line errors (a bad value, an unknown flag, a flag missing its value); every flag but the repeatable
    # --adapter and --cors-origin may be given once (argparse kept the last silently: --port 8001 --port 8002)
    p = OneLineParser(prog="qwen-ft serve", description=__doc__.split("\n\n")[0], examples=(
        "  qwen-ft serve -m /models/Qwen-14B-Chat-Int4 -a mine=output/my-adapter   (model \"mine\" in requests)"))
    p.add_argument("-m", "--model", action=Once, help="base model dir (float or Int4) or hub id (default: the base "
                   "the adapters record)")
    p.add_argument("-a", "--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter (a dir or hub id) served as model NAME (repeatable)")
    p.add_argument("--host", action=Once, default="127.0.0.1", help="address to listen on (default 127.0.0.1: "
                   "this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", action=Once, type=int, default=8000, help="default 8000")
    p.add_argument("--api-key", action=Once, default=os.environ.get(API_KEY_ENV),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $QWEN_FT_API_KEY, else none)")
    p.add_argument("--max-batch", action=Once, type=int, default=32,
                   help="rows decoded together (default 32, at most 512)")
    p.add_argument("--max-model-len", action=Once, type=int, default=None,
                   help="prompt + reply limit in tokens (default: the engine's, else the model's seq_length)")
    # 2,048: 8 streams of 4,000-token prompts on an H100 waited at most 195 ms for a joining prompt against 768 ms
    # whole, for 4.7% less throughput; 1,024 and 512 halved the wait again but cost 10% and, at 1,500-token prompts,
    # 2-3x the first-token time (NOTES step 96)
    p.add_argument("--prefill-chunk", action=Once, type=int, default=2048, metavar="N",
                   help="a prompt longer than N tokens that joins running requests is prefilled N positions a step, "
                   "so that their streams never wait for its whole prefill (default 2048; 0: prompts prefilled "
                   "whole, the most throughput)")
    p.add_argument("--max-queue", action=Once, type=int, default=None,
                   help="requests waiting beyond --max-batch before new ones get 429 (default 4 x max-batch)")
    p.add_argument("--max-stored-responses", action=Once, type=int, default=1000, metavar="N",
                   help="POST /v1/responses keeps the N most recent responses in memory (those not sent with store: "
                   "false) for GET /v1/responses/{id} and previous_response_id (default 1000; 0: none)")
    p.add_argument("--device", action=Once, default=None, help="default cuda when there is a GPU, else cpu")
    p.add_argument("--dtype", action=Once, default=None,
                   help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages on ORIGIN (e.g. http://localhost:3000; * for any) call the API from a "
                   "browser (repeatable; default none: browsers refuse cross-origin calls)")
    p.add_argument("--log-level", action=Once, default="warning",
                   help=f"uvicorn's log level: {', '.join(LOG_LEVELS)} (default warning)")
    return p


def parse_adapters(specs: list[str], base: str) -> list[tuple[str, str]]:
    """['NAME=DIR', ...] -> [(name, dir)]; raises ValueError naming the bad spec."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=DIR")
        if not NAME.match(name):
            raise ValueError(f"--adapter {spec!r}: NAME may hold letters, digits and . _ : / - only")
        if name == base:
            raise ValueError(f"--adapter {spec!r}: NAME {name!r} is the base model's name")
        if name in (n for n, _ in out):
            raise ValueError(f"--adapter {spec!r}: NAME {name!r} is given twice")
        out.append((name, path))
    return out


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host  # an IPv6 address in a URL (http://[::1]:8000)


def _check_listen(host: str, port: int) -> None:
    """Bind (host, port) as the server will, so a taken port or an address not of this machine is an error now,
    not after minutes of loading the model."""
    _listen(host, port).close()


def _listen(host: str, port: int):
    """A socket bound to (host, port) (IPv6 for a host with a colon, else IPv4; SO_REUSEADDR), which uvicorn then
    listens on; ValueError naming the flag when it cannot be bound."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = None
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        return sock
    except OSError as e:
        if sock is not None:
            sock.close()
        raise _bind_error(e, host, port) from None


def _bind_error(e: OSError, host: str, port: int) -> ValueError:
    """Why (host, port) cannot be bound, naming the flag."""
    import errno
    import socket

    if isinstance(e, socket.gaierror):  # a name that does not resolve, 999.1.1.1, an IPv4 name for ::1
        return ValueError(f"--host {host!r}: not an address or a host name that resolves here ({e.strerror or e})")
    where = f"{_url_host(host)}:{port}"
    if e.errno == errno.EADDRINUSE:
        return ValueError(f"--port {port}: {where} is already in use (another server?); pick another --port")
    if e.errno == errno.EACCES:
        return ValueError(f"--port {port}: not allowed to listen on {where} ({e.strerror}; ports below 1024 need "
                          "root)")
    if e.errno == errno.EADDRNOTAVAIL:
        return ValueError(f"--host {host!r}: not an address of this machine ({e.strerror})")
    return ValueError(f"--host/--port: cannot listen on {where}: {e.strerror or e}")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may be any interface's
        return False


def open_without_key(args) -> str | None:
    """The warning for a server other machines can reach with no key (any client may then use the model), or
    None. A warning, not an error: serving a trusted network without a key is a choice the README shows."""
    if args.api_key is not None or _is_loopback(args.host):
        return None
    return (f"warning: --host {args.host} listens where other machines can reach it and no --api-key (nor "
            f"${API_KEY_ENV}) is set: anyone who reaches port {args.port} can use the model")


MAX_BATCH = 512  # rows decoded together; the KV cache of 512 rows of 500 positions is ~210 GB on the 14B model


def check_args(args) -> None:
    """Raise ValueError for a bad flag before any model is loaded."""
    if problem := repeated(args):
        raise ValueError(problem)
    for flag in ("max_batch", "port"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.port > 65535:
        raise ValueError(f"--port must be at most 65535, got {args.port}")
    if args.max_batch > MAX_BATCH:
        # (the warm-up walks every row count up to it and sizes the cache for that many rows: a huge value hung or
        # ran out of memory after the model had loaded)
        raise ValueError(f"--max-batch must be at most {MAX_BATCH}, got {args.max_batch}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError(f"--max-model-len must be at least 2, got {args.max_model_len}")
    if args.max_queue is not None and args.max_queue < 0:
        raise ValueError(f"--max-queue must be 0 or more, got {args.max_queue}")
    if args.prefill_chunk < 0:
        raise ValueError(f"--prefill-chunk must be 0 (off) or more, got {args.prefill_chunk}")
    if args.max_stored_responses < 0:
        raise ValueError(f"--max-stored-responses must be 0 (none) or more, got {args.max_stored_responses}")
    if args.log_level.lower() not in LOG_LEVELS:  # uvicorn raised KeyError for it, after the model had loaded
        raise ValueError(f"--log-level {args.log_level!r}: use one of {', '.join(LOG_LEVELS)}")
    if args.api_key is not None:
        # (an empty $QWEN_FT_API_KEY was reported as an empty --api-key, a flag the user had not given)
        source = "--api-key" if given(args, "api_key") else f"${API_KEY_ENV}"
        if not args.api_key.strip():
            raise ValueError(f"{source} is empty" + ("" if source == "--api-key" else
                                                     " (unset it to serve without a key)"))
        if args.api_key != args.api_key.strip():  # a client's header loses them, so no request ever matched
            raise ValueError(f"{source} begins or ends with white space, which no client's header keeps")
        if any(ord(c) < 32 or ord(c) == 127 for c in args.api_key):
            raise ValueError(f"{source} holds a control character, which an HTTP header cannot carry")
    for origin in args.cors_origin:
        if origin != origin.lower():  # browsers send it in lower case and it is matched exactly: never allowed
            raise ValueError(f"--cors-origin {origin!r}: browsers send the origin in lower case "
                             f"({origin.lower()!r})")
        if origin != "*" and not ORIGIN.match(origin):
            raise ValueError(f"--cors-origin {origin!r}: expected scheme://host[:port] with no path (e.g. "
                             "http://localhost:3000), or *")
    from ..loading import placement_problem

    if problem := placement_problem(args.device, args.dtype):  # (the check chat, eval and merge make first too)
        raise ValueError(problem)
    if not args.host.strip():  # uvicorn took '' as every interface, and the banner said http://:8000
        raise ValueError("--host is empty (0.0.0.0 for every interface)")
    _check_listen(args.host, args.port)


def too_short_for_any_prompt(max_model_len: int, model_dir) -> str | None:
    """Why a --max-model-len leaves no room for a reply to any request, or None. The shortest prompt a request can
    make (an empty system message and an empty user message: the ChatML frame alone) plus one reply token is the
    least that serves anything; below it the server started and answered every request with a 400. Measured with
    the model dir's tokenizer, as requests are; a tokenizer that cannot be read is left to the load to report."""
    from .. import react
    from ..errors import ModelLoadError
    from ..tokenization import load_tokenizer

    try:
        tokenizer = load_tokenizer(model_dir)
    except ModelLoadError:
        return None

    def prompt_len(system: str, question: str) -> int:  # (as Server.prepare builds a request's prompt)
        turns = react.build_turns([{"role": "system", "content": system}, {"role": "user", "content": question}])
        return len(react.prompt_ids(tokenizer, turns))

    least = prompt_len("", "") + 1
    if max_model_len >= least:
        return None
    return (f"--max-model-len {max_model_len} leaves no room for a reply to any request: the shortest prompt (an "
            f"empty system and user message) is {least - 1} tokens, so the least usable value is {least} (a one-word "
            f"question with the default system prompt needs {prompt_len(react.DEFAULT_SYSTEM, 'Hi') + 1})")


def adapter_dir(name: str, ref: str):
    """The dir of the adapter served as `name` (`ref`: a dir or a hub id, as chat takes one), its config read; an
    error naming the flag before anything loads."""
    from pathlib import Path

    from ..adapters import read_adapter_config
    from ..hub import resolve_model_dir

    path = Path(ref).expanduser()  # (as the loader takes it: x=~/adapter was "does not exist" here)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--adapter {name}={path}: {path} is a file, not an adapter directory")
    path = resolve_model_dir(ref, "adapter directory")
    read_adapter_config(path)
    return path


def recorded_base(specs: list[str]):
    """The base model dir the adapters record (`qwen-ft serve` without -m, as `qwen-ft chat -a DIR` takes it);
    ValueError when none is given or they record different bases."""
    from ..adapters import resolve_base

    if not specs:
        raise ValueError("-m/--model is required (the base model dir or hub id), unless --adapter NAME=DIR is given: "
                         "then the base is the one the adapter records")
    bases = {}
    for name, ref in parse_adapters(specs, base=""):
        # (resolve_base's checks: a base that cannot be found, another model's fingerprint, ...)
        bases.setdefault(resolve_base(adapter_dir(name, ref)), []).append(name)
    if len(bases) > 1:
        which = "; ".join(f"{', '.join(names)} on {base}" for base, names in bases.items())
        raise ValueError(f"the adapters record different base models ({which}): one server serves one base; give it "
                         "with -m/--model")
    return next(iter(bases))


def build_server(args):
    """Load the model and adapters; return the Server (the app is `create_app(server)`)."""
    from ..adapters import check_base
    from ..generation_limits import max_new_tokens_limit
    from ..hub import resolve_model_dir
    from ..model_dir import chat_format
    from .app import Server
    from .models import base_name, load_served_model, unserved_options

    if args.model is None:
        args.model = str(recorded_base(args.adapter))
        print(f"serve: the base model is {args.model}, which the adapters record", file=sys.stderr, flush=True)
    base = base_name(args.model)
    model_dir = resolve_model_dir(args.model)
    if problem := unserved_options(model_dir):
        raise ValueError(problem)
    if (fmt := chat_format(model_dir)) != "chatml":  # (the server's chat() config refused it after the weights loaded)
        raise ValueError(f"{model_dir / 'generation_config.json'}: chat_format {fmt!r}: the "
                         f"server needs a chat model (chat_format \"chatml\"); an adapter trained on this base model "
                         f"serves once merged: qwen-ft merge --adapter DIR -o OUT, then serve -m OUT")
    # as chat and eval refuse such a --max-new-tokens (and vLLM a max_model_len past the model's): requests that long
    # would decode at positions no rotary scaling of the model covers, and ask the KV cache for more than any device
    limit = max_new_tokens_limit(model_dir)
    if args.max_model_len is not None and limit and args.max_model_len > limit:
        raise ValueError(f"--max-model-len {args.max_model_len} is more than the model holds (at most {limit}: "
                         "max(max_position_embeddings, 4 x seq_length) of its config.json)")
    if args.max_model_len is not None and (problem := too_short_for_any_prompt(args.max_model_len, model_dir)):
        raise ValueError(problem)
    adapters = []
    for name, ref in parse_adapters(args.adapter, base):  # a missing or broken adapter: an error before the load
        path = adapter_dir(name, ref)
        # the base the adapter records against -m, as the load checks it, but before the weights load: another
        # base warns (once), the model the adapter was merged into or a changed recorded base is refused
        check_base(path, model_dir, explicit=True)
        adapters.append((name, str(path)))
    model, tokenizer = load_served_model(model_dir, adapters, dtype=args.dtype, device=args.device)
    return Server(model, tokenizer, base_name=base, adapter_names=[n for n, _ in adapters],
                  max_batch=args.max_batch, max_model_len=args.max_model_len, max_queue=args.max_queue,
                  api_key=args.api_key, cors_origins=args.cors_origin, prefill_chunk=args.prefill_chunk,
                  max_stored_responses=args.max_stored_responses)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:  # the optional extra: without it the app's import was a traceback (llguidance: JSON response_format)
        import fastapi  # noqa: F401
        import llguidance  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"error: qwen-ft serve needs FastAPI, uvicorn, llguidance and prometheus_client ({e.name or e} is not "
              f"installed): pip install -e \".[serve]\" in the checkout (or pip install fastapi uvicorn llguidance "
              f"prometheus-client)",
              file=sys.stderr)
        return 2
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    from ..adapters import AdapterError
    from ..hub import ModelNotFoundError
    from ..loading import ModelLoadError

    try:
        check_args(args)
        if warning := open_without_key(args):  # before the load, so a mistake can be stopped at once
            print(warning, file=sys.stderr, flush=True)
        server = build_server(args)
    except (ValueError, AdapterError, ModelLoadError, ModelNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if server.engine.device.type == "cuda":  # first-use compiles and graph captures, before any request waits
        print("warming up the decoder (kernel compiles, CUDA graphs)...", end=" ", flush=True)
        print(f"done in {server.engine.warm_up(server.default_sampling()):.1f} s", flush=True)
    import uvicorn

    from .app import create_app
    from .background import Uvicorn

    def stopping(ended: int) -> None:
        print(f"qwen-ft serve: stopping; {ended} request(s) in flight ended with 503 server_shutting_down",
              file=sys.stderr, flush=True)

    try:  # bound before "serving" is said: the port was free at the check, but the load takes minutes
        sock = _listen(args.host, args.port)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = ", ".join([server.base_name, *server.adapter_names])
    print(f"serving {names} on http://{_url_host(args.host)}:{args.port} (chat page at /, API at /v1)", flush=True)
    config = uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level=args.log_level.lower())
    try:
        # (uvicorn.run, with requests in flight ended on Ctrl-C/SIGTERM instead of waited for; after SIGTERM uvicorn
        # raises the signal again once stopped, so the process ends by it, as under uvicorn.run)
        Uvicorn(config, server, on_stop=stopping).run(sockets=[sock])
    except KeyboardInterrupt:  # raised again once stopped, as SIGTERM is: Ctrl-C's status, as elsewhere (it was 0)
        return 130
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
