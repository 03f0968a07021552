"""Where a serving engine's time to first token goes under a realistic arrival trace: requests with varied prompt
lengths arrive over time (not all at once with one length, as serve_bench.py's rounds do), and the engine is
stepped as the server's worker steps it. Each prefill and each CUDA-graph capture is timed (with a device sync
around it: that sync is the only change to the engine's behaviour), and every request's time to first token is
taken from its submission to the step() that returned its first token.

Two passes over two traces of the same kind in one engine: the first meets every graph key and prefill shape
for the first time, as a freshly started server does; the second shows what is left once they are warm.

    python benchmarks/engine_stalls.py --model-dir /tmp/m --out $OUT/engine_stalls.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode_bench import load, prompt_ids  # noqa: E402
from provenance import git_commit  # noqa: E402

from finetune.inference import Engine, SamplingParams  # noqa: E402
from finetune.inference import engine as engine_module  # noqa: E402


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 2)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_methods(engine, log, submits=False):
    """Wrap the engine's prefill and graph capture with synchronised timers that append to ``log``; each entry's
    ``at`` is its start on time.perf_counter()'s clock. ``submits``: each submit() logged too (when it came)."""
    prefill, capture, submit = engine._prefill, engine._capture, engine.submit

    def timed_prefill(reqs, touched):
        sync()
        t0 = time.perf_counter()
        prefill(reqs, touched)
        sync()
        log.append(dict(kind="prefill", rows=len(reqs), longest=max(len(r.prompt_ids) for r in reqs),
                        ms=round((time.perf_counter() - t0) * 1e3, 2), at=t0))

    arguments = inspect.signature(capture)  # the wrapper takes what the engine passes, whatever that grows to

    def timed_capture(*args, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = capture(*args, **kwargs)
        sync()
        named = arguments.bind(*args, **kwargs).arguments
        log.append(dict(kind="capture", rows=named.pop("b"), **named,
                        ms=round((time.perf_counter() - t0) * 1e3, 2), at=t0))
        return out

    def logged_submit(prompt_ids, *args, **kwargs):
        log.append(dict(kind="submit", tokens=len(prompt_ids), at=time.perf_counter()))
        return submit(prompt_ids, *args, **kwargs)

    engine._prefill, engine._capture = timed_prefill, timed_capture
    if submits:
        engine.submit = logged_submit


def relative(log, origin):
    """``log``'s entries with ``at`` as ms after ``origin`` (a time.perf_counter() reading), in the order they began
    (a prefill or capture is logged when it ends)."""
    return sorted((dict(e, at=round((e["at"] - origin) * 1e3, 2)) for e in log), key=lambda e: e["at"])


def trace(seed, n, seconds, lo, hi, vocab):
    rng = random.Random(seed)
    arrivals = sorted(rng.uniform(0, seconds) for _ in range(n))
    reqs = []
    for i, at in enumerate(arrivals):
        sampled = i % 2 == 1  # half greedy, half as Qwen's generation_config samples (top_p 0.8, penalty 1.1)
        params = SamplingParams(max_new_tokens=rng.randint(32, 256), do_sample=sampled, top_p=0.8 if sampled else 1.0,
                                repetition_penalty=1.1 if sampled else 1.0, seed=i if sampled else None)
        reqs.append((at, prompt_ids(rng.randint(lo, hi), seed * 1000 + i, vocab), params))
    return reqs


def run(engine, reqs, log):
    """Drive the engine like the server's worker: submit what has arrived, step while there is work."""
    start = time.perf_counter()
    pending = list(reqs)
    live = []  # (request, submitted at)
    first, steps, gaps = {}, [], []
    last_token_at = {}
    while pending or engine.has_work():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            _, ids, params = pending.pop(0)
            live.append((engine.submit(ids, params), time.perf_counter()))
        if not engine.has_work():
            time.sleep(min(0.002, max(0.0, pending[0][0] - now)) if pending else 0)
            continue
        t0 = time.perf_counter()
        touched = engine.step()
        t1 = time.perf_counter()
        steps.append((t1 - t0) * 1e3)
        for r in touched:
            if r.output_ids and r.id not in first:
                first[r.id] = t1
            if r.output_ids:
                if r.id in last_token_at:
                    gaps.append((t1 - last_token_at[r.id]) * 1e3)
                last_token_at[r.id] = t1
    ttft = [(first[r.id] - sub) * 1e3 for r, sub in live if r.id in first]
    med = statistics.median(steps)
    prefills = [e for e in log if e["kind"] == "prefill"]
    captures = [e for e in log if e["kind"] == "capture"]
    return dict(requests=len(live), wall_s=round(time.perf_counter() - start, 2),
                ttft_ms=dict(p50=pct(ttft, 0.5), p90=pct(ttft, 0.9), p99=pct(ttft, 0.99), max=pct(ttft, 1.0)),
                token_gap_ms=dict(p50=pct(gaps, 0.5), p99=pct(gaps, 0.99), max=pct(gaps, 1.0)),
                steps=len(steps), step_ms_p50=round(med, 2),
                slow_steps=sum(s > 3 * med for s in steps), slow_steps_ms=round(sum(s for s in steps if s > 3 * med), 1),
                prefills=len(prefills), prefill_ms=round(sum(e["ms"] for e in prefills), 1),
                captures=len(captures), capture_ms=round(sum(e["ms"] for e in captures), 1),
                capture_ms_each=dict(p50=pct([e["ms"] for e in captures], 0.5), max=pct([e["ms"] for e in captures], 1.0)),
                log=relative(log, start))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--seconds", type=float, default=8.0, help="arrivals spread over this many seconds")
    ap.add_argument("--lengths", type=int, nargs=2, default=[100, 900], help="prompt lengths, uniform")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--warm-up", action="store_true", help="Engine.warm_up() first, as qwen-ft serve does")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (no graphs, no timings that count)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    model, tok = load(args.model_dir, device)
    engine = Engine(model, tok, max_batch=args.max_batch, max_len=2048)
    log: list = []
    timed_methods(engine, log)
    # the trace's two halves: greedy, and sampled as Qwen's generation_config samples (qwen-ft serve warms up its
    # generation config's sampled and greedy steps)
    expect = [SamplingParams(), SamplingParams(do_sample=True, top_p=0.8, repetition_penalty=1.1)]
    warm_up_s = round(engine.warm_up(expect), 2) if args.warm_up else None
    if warm_up_s is not None:
        print(f"warm_up: {warm_up_s} s ({len(log)} prefills and captures)", flush=True)
    passes = []
    for p, seed in enumerate((1, 2)):
        log.clear()
        reqs = trace(seed, args.requests, args.seconds, *args.lengths, engine.vocab)
        res = dict(name="first" if p == 0 else "second (warm)", **run(engine, reqs, log))
        passes.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "log"}), flush=True)
    out = dict(command=" ".join(sys.argv), commit=git_commit(), device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               length_bucket=engine_module.LENGTH_BUCKET, warm_up_s=warm_up_s, passes=passes, args=vars(args))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
