"""`qwen-ft serve` under load: N concurrent streams through the real HTTP server and the `openai` client.

Where the server runs (--server): `process` starts `qwen-ft serve` as its own process, as a user runs it (its
warm-up, then the rounds); `thread` serves from a thread of this process, beside the client, whose parsing of every
chunk then shares the interpreter (the GIL) with the server and its engine thread. --adapters (random adapters made
here) and --engine-log (the engine's timers) need the thread; the default, auto, is process unless one of them is
given. Figures before session 43 were all measured in a thread.

For each concurrency level (default 1, 8, 32) and each mode: N streamed chat completions of exactly
--new-tokens tokens (min_tokens = max_tokens) after prompts of --prompt-tokens tokens (each stream its own
prompt), started together, after one unmeasured warm-up round of the same shape (CUDA graph capture); on a GPU
the engine's warm_up() runs first, as `qwen-ft serve` runs it before it listens.

What is measured, per stream and summarised per level:
- Tokens are counted from the server's usage, never from text: the streams ask for
  `stream_options: {"include_usage": true, "continuous_usage_stats": true}`, so every chunk carries the
  completion tokens so far and the server sends a chunk for every decode step that produced tokens, also
  when they decode to no visible text (a random model's tokens often do). A stream's token count is the final
  usage chunk's completion_tokens.
- TTFT (time to first token): from sending the request to the first chunk whose usage counts at least one
  completion token. The first chunk (role only, 0 tokens) does not count. (The engine's step that admits a
  request prefills it and runs one decode step, so that chunk usually carries 2 tokens.)
- ITL (inter-token latency): the gaps between a stream's successive token-carrying chunks; a chunk that
  brings k tokens after a gap g counts as k gaps of g/k.
- Aggregate tokens/s: all streams' completion tokens / the wall time of the round (first request sent to the
  last stream done).
Reported per level: aggregate tok/s, TTFT p50/p99, ITL p50/p99/max (the max: the longest wait of any running
stream, e.g. for a joining prompt's prefill, which p99 misses where few gaps are long), and per stream (ttft_ms, itl_ms_p50,
decode_tok_s = tokens after the first / time after the first, tokens).

Adapters (--adapters K: K random LoRA adapters, r 16 on every Linear of the blocks, loaded into the served
PeftModel). --modes picks the loads to compare, each at every level:
  base     every stream on the base model
  single   every stream on adapter lora0 (one adapter in the batch)
  mixed    streams spread round-robin over the K adapters, all sent at once: the engine decodes them in one
           batch, each row with its own adapter (per-row batching, what the server does)
  grouped  the same streams sent one adapter's group after the other (the next group when the previous one is
           done): what a server that batches by adapter and serves one group at a time would give; the
           server itself has no grouping, so this is measured through the client. TTFT counts from the
           round's start, so later groups' waiting shows in it.
Default modes: base without --adapters, mixed with them.
--json-share F: about that share of each round's streams ask for a JSON reply (a response_format schema of one
string too long to end within --new-tokens), so the report's itl_ms_p50_json / itl_ms_p50_plain show what rows held
to a schema (their masks, and the engine reading every step before the next) cost them and the rows beside them.
--stagger MS: the streams of a round are sent MS milliseconds apart instead of together (not with grouped), so each
request joins a batch that is decoding, alone, as requests reach a busy server; TTFT then counts from each request's
own send, and the running streams' ITL p99 shows what each join cost them.

  # on the H200: a 14B-shaped Int4 dir (random weights, made once), then the runs
  python benchmarks/make_model_dir.py --shape 14b --int4 --out /tmp/sb/int4
  python benchmarks/serve_bench.py --model-dir /tmp/sb/int4 --out benchmarks/results/serve.json
  python benchmarks/serve_bench.py --model-dir /tmp/sb/int4 --adapters 4 --modes single,mixed,grouped \\
      --out benchmarks/results/serve_lora.json
  # CPU check of the script itself (the tiny Int4 shape, small sizes)
  python benchmarks/serve_bench.py --tiny --out /tmp/serve_tiny.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # make_model_dir, provenance

from provenance import git_commit  # noqa: E402

TARGETS = {"aggregate_tok_s_at_32": 3000, "ttft_ms_p50_at_1": 150}
MODES = ("base", "single", "mixed", "grouped")
WORDS = ("river stone lantern orchard copper meadow violin harbor pepper glacier canvas thunder marble "
         "willow saddle compass ember falcon velvet prairie").split()


def percentile(values, q):
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def add_random_adapters(model, k: int, seed: int = 0):
    """K random LoRA adapters (B non-zero, so they change the output) named lora0..; -> (PeftModel, names)."""
    import torch
    from peft import LoraConfig, PeftModel

    from finetune.quant import register_peft

    names = [f"lora{i}" for i in range(k)]
    for i, name in enumerate(names):
        torch.manual_seed(seed + i)
        cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn", "c_proj", "w1", "w2"], lora_dropout=0.0,
                         init_lora_weights=False, task_type="CAUSAL_LM")
        register_peft(cfg)
        if i == 0:
            model = PeftModel(model, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), names


def make_prompts(server, n: int, tokens: int, seed: int) -> list[str]:
    """n user messages whose full chat prompt (system + ChatML) is `tokens` tokens (or just under)."""
    import random

    def length(text):
        return len(server.prompt(_req(text))[0])

    out = []
    for i in range(n):
        rng = random.Random(seed * 1000 + i)
        words = [rng.choice(WORDS) for _ in range(tokens)]
        lo, hi = 1, len(words)
        while lo < hi:  # the most words that fit
            mid = (lo + hi + 1) // 2
            if length(" ".join(words[:mid])) <= tokens:
                lo = mid
            else:
                hi = mid - 1
        out.append(" ".join(words[:lo]))
    return out


def json_format(new_tokens: int) -> dict:
    """The response_format of a --json-share stream: one JSON string too long to end within new_tokens tokens (16
    characters a token), so it runs to max_tokens as the plain streams do through min_tokens (which a JSON reply
    cannot take)."""
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": {"type": "string",
                                                                               "minLength": 16 * new_tokens}}}


async def one_stream(client, model, text, new_tokens, t0=None, json_reply=False) -> dict:
    """One streamed completion, timed by tokens (see the module doc). ``t0``: the time TTFT counts from
    (default: when this request is sent); ``json_reply``: held to ``json_format``."""
    sent = time.perf_counter()
    t0 = sent if t0 is None else t0
    marks: list[tuple[float, int]] = []  # (arrival, completion tokens so far) of each token-carrying chunk
    final = None
    length = {"response_format": json_format(new_tokens)} if json_reply else {"extra_body": {"min_tokens": new_tokens}}
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], stream=True, max_tokens=new_tokens,
        temperature=0, stream_options={"include_usage": True, "continuous_usage_stats": True}, **length)
    async for chunk in stream:
        now = time.perf_counter()
        usage = chunk.usage
        if usage is None:
            continue
        if not chunk.choices:  # the final usage chunk
            final = usage.completion_tokens
            continue
        if usage.completion_tokens > (marks[-1][1] if marks else 0):
            marks.append((now, usage.completion_tokens))
    done = time.perf_counter()
    itl = []
    for (ta, na), (tb, nb) in zip(marks, marks[1:]):
        itl += [(tb - ta) * 1000 / (nb - na)] * (nb - na)
    tokens = final if final is not None else (marks[-1][1] if marks else 0)
    first = marks[0] if marks else None
    decode_s = marks[-1][0] - first[0] if first else 0.0
    return {"model": model, "json": json_reply, "tokens": tokens,
            "ttft_ms": (first[0] - t0) * 1000 if first else None,
            "itl_ms": itl,
            "first_chunk_tokens": first[1] if first else 0,
            "decode_tok_s": (tokens - first[1]) / decode_s if first and decode_s > 0 else None,
            "seconds": done - sent}


async def run_level(url, mode, names, prompts, new_tokens, stagger_ms: float = 0, json_share: float = 0) -> dict:
    """One round: every prompt streamed, as the mode sends them (``stagger_ms`` apart, or together); the streams at
    every 1/json_share-th place (``json_streams``) ask for a JSON reply."""
    import openai

    async with openai.AsyncOpenAI(base_url=url, api_key="bench", timeout=1800, max_retries=0) as client:
        t0 = time.perf_counter()
        if mode == "base":
            jobs = [(names["base"], p) for p in prompts]
        elif mode == "single":
            jobs = [(names["adapters"][0], p) for p in prompts]
        else:  # mixed / grouped: round-robin over the adapters
            jobs = [(names["adapters"][i % len(names["adapters"])], p) for i, p in enumerate(prompts)]
        held = json_streams(len(jobs), json_share)
        if mode == "grouped":
            results = []
            for name in names["adapters"]:
                group = [(i, p) for i, (n, p) in enumerate(jobs) if n == name]
                results += await asyncio.gather(*[one_stream(client, name, p, new_tokens, t0, i in held)
                                                  for i, p in group])
        elif stagger_ms:
            async def sent_later(i, name, text):
                await asyncio.sleep(i * stagger_ms / 1000)
                return await one_stream(client, name, text, new_tokens, json_reply=i in held)  # (TTFT: own send)

            results = await asyncio.gather(*[sent_later(i, n, p) for i, (n, p) in enumerate(jobs)])
        else:
            results = await asyncio.gather(*[one_stream(client, n, p, new_tokens, t0, i in held)
                                             for i, (n, p) in enumerate(jobs)])
        wall = time.perf_counter() - t0
    ttft = [r["ttft_ms"] for r in results if r["ttft_ms"] is not None]
    itl = [g for r in results for g in r["itl_ms"]]
    tokens = sum(r["tokens"] for r in results)
    per_stream = [{"model": r["model"], "json": r["json"], "tokens": r["tokens"], "ttft_ms": _round(r["ttft_ms"]),
                   "itl_ms_p50": _round(percentile(r["itl_ms"], 50)), "decode_tok_s": _round(r["decode_tok_s"])}
                  for r in results]
    by_kind = {kind: [g for r in results if r["json"] == is_json for g in r["itl_ms"]]
               for kind, is_json in (("json", True), ("plain", False))}
    return {"t0": t0, "mode": mode, "streams": len(prompts), "json_streams": len(held), "stagger_ms": stagger_ms,
            "completion_tokens": tokens,
            "itl_ms_p50_json": _round(percentile(by_kind["json"], 50)) if held else None,
            "itl_ms_p50_plain": _round(percentile(by_kind["plain"], 50)) if held else None,
            "wall_s": round(wall, 3),
            "aggregate_tok_s": round(tokens / wall, 1), "ttft_ms_p50": _round(percentile(ttft, 50)),
            "ttft_ms_p99": _round(percentile(ttft, 99)), "itl_ms_p50": _round(percentile(itl, 50)),
            "itl_ms_p99": _round(percentile(itl, 99)), "itl_ms_max": _round(max(itl, default=None)),
            "streams_timed": len(ttft), "per_stream": per_stream}


def json_streams(n: int, share: float) -> set[int]:
    """The places (of n streams) that ask for a JSON reply: about share * n of them, spread evenly (one stream at
    any share above 0)."""
    k = min(n, max(1, round(share * n))) if share > 0 else 0
    return {i * n // k for i in range(k)}


@contextlib.contextmanager
def served_process(model_dir, max_batch: int, max_model_len: int, ready_timeout: float = 1800,
                   prefill_chunk: int = 2048):
    """`qwen-ft serve` on a free loopback port in its own process, with this repo's package first on its path:
    yields (API url, its warm-up seconds as it printed them or None, seconds until it answered /health); stopped
    with SIGINT (as Ctrl-C) on exit. RuntimeError with its output's last lines if it ends or is not up in time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "finetune.cli", "serve", "-m", str(Path(model_dir).resolve()), "--port", str(port),
           "--max-batch", str(max_batch), "--max-model-len", str(max_model_len), "--max-queue", "0",
           "--prefill-chunk", str(prefill_chunk)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    log = tempfile.NamedTemporaryFile("w+", prefix="serve_bench_server_", suffix=".log", delete=False)
    start = time.perf_counter()
    # cwd: `python -m` puts the working directory before PYTHONPATH, so from another checkout's root (an A/B's old
    # tree run from the repo) the server imported that checkout's package, not this one's
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True, cwd=ROOT)

    def output() -> str:
        return Path(log.name).read_text(errors="replace")

    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"qwen-ft serve ended (exit {proc.returncode}): {output()[-2000:]}")
            if time.perf_counter() - start > ready_timeout:
                raise RuntimeError(f"qwen-ft serve was not up within {ready_timeout:g} s: {output()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        ready_s = time.perf_counter() - start
        warm = re.search(r"warming up the decoder .*?done in ([0-9.]+) s", output())
        yield f"http://127.0.0.1:{port}/v1", float(warm.group(1)) if warm else None, ready_s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        os.unlink(log.name)


def _round(x, nd=2):
    return None if x is None else round(x, nd)


def _req(text):
    from finetune.serve.protocol import ChatCompletionRequest

    return ChatCompletionRequest(model="x", messages=[{"role": "user", "content": text}])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", help="a model dir (e.g. from make_model_dir.py --shape 14b --int4)")
    ap.add_argument("--tiny", action="store_true", help="CPU check: a tiny Int4 dir, small sizes")
    ap.add_argument("--streams", default=None, help="concurrency levels, comma-separated (default 1,8,32)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default 500")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 256")
    ap.add_argument("--adapters", type=int, default=0, help="K random LoRA adapters loaded into the server")
    ap.add_argument("--modes", default=None,
                    help=f"loads to compare, comma-separated, of {', '.join(MODES)} (default: base, or mixed with "
                         "--adapters)")
    ap.add_argument("--engine-log", action="store_true",
                    help="log each measured round's submits, prefills and graph captures (engine_stalls.py's "
                         "timers: they synchronise the device around each prefill and capture)")
    ap.add_argument("--server", choices=("auto", "process", "thread"), default="auto",
                    help="where the server runs: its own `qwen-ft serve` process, or a thread of this one (default "
                         "auto: process, or thread with --adapters / --engine-log)")
    ap.add_argument("--stagger", type=float, default=0, metavar="MS",
                    help="send a round's streams MS milliseconds apart (default 0: together)")
    ap.add_argument("--prefill-chunk", type=int, default=2048, metavar="N",
                    help="the server's --prefill-chunk (default 2048, as `qwen-ft serve`'s; 0: prompts prefilled "
                         "whole)")
    ap.add_argument("--json-share", type=float, default=0, metavar="F",
                    help="the share of each round's streams that ask for a JSON reply (response_format json_schema, "
                         "a string that runs to max_tokens): what constrained rows cost the batch they run in")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = ap.parse_args(argv)
    if not args.model_dir and not args.tiny:
        print("error: pass --model-dir DIR (or --tiny for the CPU check)", file=sys.stderr)
        return 2
    modes = (args.modes or ("mixed" if args.adapters else "base")).split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"error: --modes: unknown mode {bad[0]!r} (choose from {', '.join(MODES)})", file=sys.stderr)
        return 2
    if args.stagger < 0 or (args.stagger and "grouped" in modes):
        print(f"error: --stagger {args.stagger:g}: must be >= 0, and not with the grouped mode", file=sys.stderr)
        return 2
    if args.adapters < 0 or (not args.adapters and set(modes) - {"base"}):
        print(f"error: --modes {','.join(modes)} needs --adapters K (K >= 1)", file=sys.stderr)
        return 2
    in_thread = args.adapters or args.engine_log
    where = args.server if args.server != "auto" else "thread" if in_thread else "process"
    if where == "process" and in_thread:
        print("error: --server process: --adapters and --engine-log need --server thread (the random adapters and "
              "the engine's timers live in this process)", file=sys.stderr)
        return 2
    try:
        levels = [int(x) for x in (args.streams or ("1,2" if args.tiny else "1,8,32")).split(",")]
    except ValueError:
        print(f"error: --streams {args.streams!r}: expected comma-separated integers", file=sys.stderr)
        return 2
    if any(n < 1 for n in levels):
        print(f"error: --streams {args.streams!r}: every level must be >= 1", file=sys.stderr)
        return 2
    if not 0 <= args.json_share <= 1:
        print(f"error: --json-share {args.json_share:g}: must be in [0, 1]", file=sys.stderr)
        return 2
    prompt_tokens = args.prompt_tokens or (40 if args.tiny else 500)
    new_tokens = args.new_tokens or (8 if args.tiny else 256)

    import torch

    from finetune.loading import load_model
    from finetune.serve.app import Server
    from finetune.serve.background import serve_in_background
    from finetune.serve.models import base_name
    from finetune.tokenization import load_tokenizer

    model_dir = args.model_dir
    if args.tiny:
        from make_model_dir import make_model_dir

        model_dir = make_model_dir(Path(tempfile.mkdtemp(prefix="serve_bench_")) / "tiny-int4", "tiny", True, "cpu")
    # (in process mode the model here only builds the prompts, as the server will: on the CPU, off the GPU)
    model = load_model(model_dir, device="cpu" if where == "process" else None)
    tokenizer = load_tokenizer(model_dir)
    adapter_names: list[str] = []
    if args.adapters:
        model, adapter_names = add_random_adapters(model, args.adapters)
    names = {"base": base_name(model_dir), "adapters": adapter_names}
    max_model_len = prompt_tokens + new_tokens
    server = Server(model, tokenizer, base_name=names["base"], adapter_names=adapter_names,
                    max_batch=max(levels), max_model_len=max_model_len, max_queue=0, prefill_chunk=args.prefill_chunk)
    rounds = []
    for n in levels:
        prompts = make_prompts(server, n, prompt_tokens, seed=n)
        rounds.append((prompts, max(len(server.prompt(_req(p))[0]) for p in prompts)))
    warm_up_s = ready_s = None
    log = [] if args.engine_log else None
    if where == "process":
        del server, model
        served = served_process(model_dir, max(levels), max_model_len, prefill_chunk=args.prefill_chunk)
    else:
        if server.engine.device.type == "cuda":  # as `qwen-ft serve` does before it listens
            warm_up_s = round(server.engine.warm_up(server.default_sampling()), 2)
        if log is not None:
            from engine_stalls import relative, timed_methods

            timed_methods(server.engine, log, submits=True)
        served = serve_in_background(server)
    results = []
    with contextlib.ExitStack() as stack:
        try:
            live = stack.enter_context(served)
        except RuntimeError as e:  # the server did not come up: one line (its output's end included), no traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
        url = live.api_url if where == "thread" else live[0]
        if where == "process":
            warm_up_s, ready_s = live[1], round(live[2], 2)
        for prompts, prompt_max in rounds:
            for mode in modes:
                asyncio.run(run_level(url, mode, names, prompts, new_tokens, args.stagger, args.json_share))  # warm-up
                if log is not None:
                    log.clear()
                r = asyncio.run(run_level(url, mode, names, prompts, new_tokens, args.stagger, args.json_share))
                t0 = r.pop("t0")
                if log is not None:
                    r["engine_log"] = relative(log, t0)  # ms after the round's start
                r["prompt_tokens_max"] = prompt_max
                results.append(r)
                print(json.dumps({k: v for k, v in r.items() if k not in ("per_stream", "engine_log")}), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"model_dir": str(model_dir), "device": device, "prompt_tokens": prompt_tokens,
              "new_tokens": new_tokens, "adapters": args.adapters, "server": where, "warm_up_s": warm_up_s,
              "server_ready_s": ready_s, "modes": modes,
              "max_batch": max(levels),
              "levels": results, "targets": TARGETS,
              "stagger_ms": args.stagger, "prefill_chunk": args.prefill_chunk, "json_share": args.json_share,
              "definitions": "tokens from usage (continuous_usage_stats); TTFT: request sent -> first chunk whose "
                             "usage counts a completion token; ITL: gaps between token-carrying chunks per token",
              "command": "python benchmarks/serve_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": git_commit() or "unknown", "date": datetime.date.today().isoformat()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
