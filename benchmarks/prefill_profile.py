"""Where one engine prefill's time goes (the first-token time of a request that joins alone): wall time of
``Engine._prefill`` for prompts of several lengths, warm (each length run before), against the GPU time of its
kernels under the torch profiler, by kernel family (decode_profile.family), with the kernel count. A wall time far
above the GPU time is host time (eager launches); GPU time near the wall is the kernels'. NOTES step 58.

    python benchmarks/prefill_profile.py --model-dir /tmp/m --out $OUT/prefill_profile.json
    python benchmarks/prefill_profile.py --model-dir /tmp/m --lengths 24 --adapter 64 --host 25   # with an adapter
    python benchmarks/prefill_profile.py --model-dir /tmp/m --lengths 24 200 --warm-up --beside 4  # as a server's join

--adapter R: the prompt uses a random r=R adapter (decode_bench.with_adapter). --host N: the N functions with the most
host time of three warm prefills (cProfile: own time and cumulative), to say what a host-bound prefill spends.
--warm-up: Engine.warm_up() first, as the server runs it. --beside N: each prompt joins beside N rows that keep
decoding (24-token prompts, on the adapter too), as a request joins a busy server; its prefill is the time every
running row's next token waits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode_bench import load, prompt_ids  # noqa: E402
from decode_profile import family  # noqa: E402
from provenance import git_commit  # noqa: E402

from finetune.inference import Engine, SamplingParams  # noqa: E402


def prefill_once(engine, ids, adapter=None) -> float:
    """Seconds of one prefill of ``ids`` (joining the batch as it is), synchronised; the request is then dropped."""
    req = engine.submit(ids, SamplingParams(max_new_tokens=1), adapter=adapter)
    with engine._step_lock, torch.no_grad():  # as step() runs it
        if engine._inflight is not None:  # (a join reads the step in flight first)
            engine._read(engine._take_inflight(), {})
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine._admit({})
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    req.cancel()
    while not req.finished:
        engine.step()
    return dt


def host_top(engine, ids, adapter, n: int) -> list[dict]:
    """The ``n`` functions with the most own host time over three warm prefills (ms a prefill), with their calls and
    cumulative time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3):
        prefill_once(engine, ids, adapter)
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive calls, own s, cumulative s, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:n]
    return [dict(function=f"{Path(f).name}:{line}:{name}", calls=c // 3, own_ms=round(tt * 1e3 / 3, 2),
                 cumulative_ms=round(ct * 1e3 / 3, 2)) for (f, line, name), (c, _, tt, ct, _) in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[24, 128, 500, 1000, 2000])
    ap.add_argument("--adapter", type=int, default=0, help="rank of a random adapter the prompts use (0: none)")
    ap.add_argument("--host", type=int, default=0, help="list the N functions with the most host time (cProfile)")
    ap.add_argument("--warm-up", action="store_true", help="Engine.warm_up() first, as the server does")
    ap.add_argument("--beside", type=int, default=0, help="rows that keep decoding while each prompt joins")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    model, tok = load(args.model_dir, device)
    adapter = None
    if args.adapter:
        from decode_bench import with_adapter

        model, adapter = with_adapter(model, args.adapter), "default"
    engine = Engine(model, tok, max_batch=8, max_len=4096)
    if args.warm_up:
        engine.warm_up()
    keep = SamplingParams(max_new_tokens=3000, min_new_tokens=3000)  # (no stop token ends them)
    running = [engine.submit(prompt_ids(24, 24 + i, engine.vocab), keep, adapter=adapter) for i in range(args.beside)]
    for _ in range(3 if running else 0):
        engine.step()
    results = []
    for n in args.lengths:
        ids = prompt_ids(n, n, engine.vocab)
        cold = prefill_once(engine, ids, adapter)
        warm = min(prefill_once(engine, ids, adapter) for _ in range(3))
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            profiled = prefill_once(engine, ids, adapter)
        by_family, kernels = defaultdict(float), defaultdict(int)
        top = defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                f = family(e.name)
                by_family[f] += e.device_time_total / 1e3
                kernels[f] += 1
                top[e.name[:90]] += e.device_time_total / 1e3
        gpu_ms = sum(by_family.values())
        row = dict(prompt_tokens=n, cold_ms=round(cold * 1e3, 2), warm_ms=round(warm * 1e3, 2),
                   profiled_ms=round(profiled * 1e3, 2), gpu_ms=round(gpu_ms, 2), kernels=sum(kernels.values()),
                   gpu_ms_by_family={k: round(v, 2) for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])},
                   kernels_by_family=dict(kernels),
                   top_kernels=[dict(name=k, ms=round(v, 3)) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]],
                   tflops=round(28e9 * n / warm / 1e12, 1), adapter_rank=args.adapter,
                   beside=sum(not r.finished for r in running), warmed_up=args.warm_up)
        if args.host:
            row["host_top"] = host_top(engine, ids, adapter, args.host)
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("top_kernels", "kernels_by_family", "host_top")}),
              flush=True)
        for line in row.get("host_top", []):
            print("  host", json.dumps(line), flush=True)
    out = dict(command=" ".join(sys.argv), commit=git_commit(), device=torch.cuda.get_device_name(device),
               results=results)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
