"""`qwen-ft serve`: an OpenAI-compatible server for a base model and its LoRA adapters.

    qwen-ft serve -m MODEL_DIR [--adapter NAME=DIR ...] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                  [--max-batch N] [--max-model-len N] [--max-queue N] [--device D] [--dtype T]
                  [--cors-origin ORIGIN ...]

The base is served under its dir name, each adapter under its NAME (the request's `model` picks one).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/\s?#]+$")  # what a browser sends as Origin: no path, no slash


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-ft serve", description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", required=True, help="base model dir (float or Int4) or hub id")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter served as model NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--api-key", default=os.environ.get("QWEN_FT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $QWEN_FT_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together (default 32)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + reply limit in tokens (default: the engine's, else the model's seq_length)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests waiting beyond --max-batch before new ones get 429 (default 4 x max-batch)")
    p.add_argument("--device", default=None, help="default cuda when there is a GPU, else cpu")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages on ORIGIN (e.g. http://localhost:3000; * for any) call the API from a "
                   "browser (repeatable; default none: browsers refuse cross-origin calls)")
    p.add_argument("--log-level", default="warning",
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


def check_args(args) -> None:
    """Raise ValueError for a bad flag before any model is loaded."""
    for flag in ("max_batch", "port"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.port > 65535:
        raise ValueError(f"--port must be at most 65535, got {args.port}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError(f"--max-model-len must be at least 2, got {args.max_model_len}")
    if args.max_queue is not None and args.max_queue < 0:
        raise ValueError(f"--max-queue must be 0 or more, got {args.max_queue}")
    if args.log_level.lower() not in LOG_LEVELS:  # uvicorn raised KeyError for it, after the model had loaded
        raise ValueError(f"--log-level {args.log_level!r}: use one of {', '.join(LOG_LEVELS)}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty")
    for origin in args.cors_origin:
        if origin != "*" and not ORIGIN.match(origin):
            raise ValueError(f"--cors-origin {origin!r}: expected scheme://host[:port] with no path (e.g. "
                             "http://localhost:3000), or *")
    import socket

    try:  # a taken port is an error now, not after minutes of loading the model
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None


def build_server(args):
    """Load the model and adapters; return the Server (the app is `create_app(server)`)."""
    from ..adapters import read_adapter_config
    from .app import Server
    from .models import base_name, load_served_model

    base = base_name(args.model)
    adapters = parse_adapters(args.adapter, base)
    for _, path in adapters:  # a missing or broken adapter is an error before the model loads
        read_adapter_config(path)
    model, tokenizer = load_served_model(args.model, adapters, dtype=args.dtype, device=args.device)
    return Server(model, tokenizer, base_name=base, adapter_names=[n for n, _ in adapters],
                  max_batch=args.max_batch, max_model_len=args.max_model_len, max_queue=args.max_queue,
                  api_key=args.api_key, cors_origins=args.cors_origin)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:  # the optional extra: without it the app's import was a traceback
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"error: qwen-ft serve needs FastAPI and uvicorn ({e.name or e} is not installed): "
              f"pip install -e \".[serve]\" in the checkout (or pip install fastapi uvicorn)", file=sys.stderr)
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

    names = ", ".join([server.base_name, *server.adapter_names])
    print(f"serving {names} on http://{args.host}:{args.port} (chat page at /, API at /v1)", flush=True)
    config = uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level=args.log_level)
    try:
        # (uvicorn.run, with requests in flight ended on Ctrl-C/SIGTERM instead of waited for; after SIGTERM uvicorn
        # raises the signal again once stopped, so the process ends by it, as under uvicorn.run)
        Uvicorn(config, server, on_stop=stopping).run()
    except KeyboardInterrupt:  # (uvicorn.run swallows it too: Ctrl-C is how a server is stopped)
        pass
    except OSError as e:  # e.g. the port is taken
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
