"""`qwen-ft serve` under load: N concurrent streams through the real HTTP server and the `openai` client.

For each concurrency level (default 1, 8, 32): N streamed chat completions of exactly --new-tokens tokens
(min_tokens = max_tokens) after prompts of --prompt-tokens tokens (each stream its own prompt), started
together, after one unmeasured warm-up round of the same shape (CUDA graph capture). Reported per level:
aggregate tokens/s (all completion tokens / wall time of the round), time to first token p50/p99 (request
sent -> first content chunk), inter-token latency p50 (gaps between a stream's content chunks; a chunk
is one token except where a multi-byte character or a stop-string prefix is held back).

With --adapters K, K random LoRA adapters (r 16, every Linear of the blocks) are loaded into the served
PeftModel and the streams are spread over them round-robin: adapters are applied per row in one batch.

  # on the H200: a 14B-shaped Int4 dir (random weights, made once), then the run
  python benchmarks/make_model_dir.py --shape 14b --int4 --out /tmp/sb/int4
  python benchmarks/serve_bench.py --model-dir /tmp/sb/int4 --out benchmarks/results/serve.json
  python benchmarks/serve_bench.py --model-dir /tmp/sb/int4 --adapters 4 --out benchmarks/results/serve_lora.json
  # CPU check of the script itself (the tiny Int4 shape, small sizes)
  python benchmarks/serve_bench.py --tiny --out /tmp/serve_tiny.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # make_model_dir

TARGETS = {"aggregate_tok_s_at_32": 3000, "ttft_ms_p50_at_1": 150}
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


class LiveServer:
    """The app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, server):
        import uvicorn

        from finetune.serve.app import create_app

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self.uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        for _ in range(600):
            if self.uv.started:
                return
            time.sleep(0.1)
        raise RuntimeError("the server did not start within 60 s")

    def close(self):
        self.uv.should_exit = True
        self.thread.join(60)


def make_prompts(server, n: int, tokens: int, seed: int) -> list[str]:
    """n user messages whose full chat prompt (system + ChatML) is `tokens` tokens (or just under)."""
    import random

    from finetune.serve.protocol import ChatCompletionRequest

    def length(text):
        return len(server.prompt(ChatCompletionRequest(model="x", messages=[{"role": "user", "content": text}]))[0])

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


async def one_stream(client, model, text, new_tokens):
    t0 = time.perf_counter()
    times, usage = [], None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], stream=True, max_tokens=new_tokens,
        temperature=0, stream_options={"include_usage": True}, extra_body={"min_tokens": new_tokens})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage:
            usage = chunk.usage
    return t0, times, usage.completion_tokens if usage else 0


async def run_level(url, models, prompts, new_tokens):
    import openai

    async with openai.AsyncOpenAI(base_url=url, api_key="bench", timeout=1800, max_retries=0) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[one_stream(client, models[i % len(models)], p, new_tokens)
                                         for i, p in enumerate(prompts)])
        wall = time.perf_counter() - t0
    ttft = [(times[0] - start) * 1000 for start, times, _ in results if times]
    itl = [(b - a) * 1000 for _, times, _ in results for a, b in zip(times, times[1:])]
    tokens = sum(n for _, _, n in results)
    return {"streams": len(prompts), "completion_tokens": tokens, "wall_s": round(wall, 3),
            "aggregate_tok_s": round(tokens / wall, 1), "ttft_ms_p50": percentile(ttft, 50),
            "ttft_ms_p99": percentile(ttft, 99), "itl_ms_p50": percentile(itl, 50)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", help="a model dir (e.g. from make_model_dir.py --shape 14b --int4)")
    ap.add_argument("--tiny", action="store_true", help="CPU check: a tiny Int4 dir, small sizes")
    ap.add_argument("--streams", default=None, help="concurrency levels, comma-separated (default 1,8,32)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default 500")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 256")
    ap.add_argument("--adapters", type=int, default=0, help="random LoRA adapters, streams spread over them")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = ap.parse_args(argv)
    if not args.model_dir and not args.tiny:
        print("error: pass --model-dir DIR (or --tiny for the CPU check)", file=sys.stderr)
        return 2
    levels = [int(x) for x in (args.streams or ("1,2" if args.tiny else "1,8,32")).split(",")]
    prompt_tokens = args.prompt_tokens or (40 if args.tiny else 500)
    new_tokens = args.new_tokens or (8 if args.tiny else 256)

    import torch

    from finetune.loading import load_model
    from finetune.serve.app import Server
    from finetune.serve.models import base_name
    from finetune.tokenization import load_tokenizer

    model_dir = args.model_dir
    if args.tiny:
        from make_model_dir import make_model_dir

        model_dir = make_model_dir(Path(tempfile.mkdtemp(prefix="serve_bench_")) / "tiny-int4", "tiny", True, "cpu")
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    names = [base_name(model_dir)]
    adapter_names: list[str] = []
    if args.adapters:
        model, adapter_names = add_random_adapters(model, args.adapters)
        names = adapter_names
    max_len = prompt_tokens + new_tokens
    server = Server(model, tokenizer, base_name=base_name(model_dir), adapter_names=adapter_names,
                    max_batch=max(levels), max_model_len=max_len, max_queue=0)
    live = LiveServer(server)
    results = []
    try:
        for n in levels:
            prompts = make_prompts(server, n, prompt_tokens, seed=n)
            asyncio.run(run_level(live.url, names, prompts, new_tokens))  # warm-up: graphs for these shapes
            r = asyncio.run(run_level(live.url, names, prompts, new_tokens))
            r["prompt_tokens_max"] = max(len(server.prompt(_req(p))[0]) for p in prompts)
            results.append(r)
            print(json.dumps(r), flush=True)
    finally:
        live.close()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"model_dir": str(model_dir), "device": device, "prompt_tokens": prompt_tokens,
              "new_tokens": new_tokens, "adapters": args.adapters, "max_batch": max(levels), "levels": results,
              "targets": TARGETS, "per_row_adapters": bool(args.adapters),
              "command": "python benchmarks/serve_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def _req(text):
    from finetune.serve.protocol import ChatCompletionRequest

    return ChatCompletionRequest(model="x", messages=[{"role": "user", "content": text}])


if __name__ == "__main__":
    sys.exit(main())
