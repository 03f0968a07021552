"""What a prefill allocates beyond the KV cache, per position, on the GPU: the number behind the engine's memory
reserve when requests join (engine.ACTIVATION_HIDDEN / ACTIVATION_MLP / MEMORY_MARGIN, NOTES step 89). For each
group shape (rows x prompt tokens) a fresh engine makes its cache first (a warm-up step), then the peak allocated
memory over one step that prefills the group is read against the memory allocated before it.

    python benchmarks/prefill_memory.py --model-dir /tmp/m --out $OUT/prefill_memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode_bench import device_name, load, prompt_ids  # noqa: E402

from finetune.inference import Engine, SamplingParams  # noqa: E402
from finetune.inference import engine as engine_module  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="/tmp/m")
    ap.add_argument("--groups", nargs="+", default=["8x1000", "1x8000", "64x100", "16x500"],
                    help="ROWSxTOKENS prompt groups, each prefilled in one step")
    ap.add_argument("--trace-mib", type=int, default=0,
                    help="also print where each allocation of at least this many MiB during the step was made")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    model, tok = load(args.model_dir, device)
    vocab = model.config.vocab_size
    cfg = model.config
    width = (engine_module.ACTIVATION_HIDDEN * cfg.hidden_size
             + engine_module.ACTIVATION_MLP * (cfg.intermediate_size // 2)) * 2
    results = []
    for group in args.groups:
        rows, tokens = map(int, group.split("x"))
        engine = Engine(model, tok, max_batch=rows)
        engine._ensure(rows, tokens + 8)  # the cache first: its bytes are not the prefill's
        params = SamplingParams(max_new_tokens=4, min_new_tokens=4)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        reqs = [engine.submit(prompt_ids(tokens, i, vocab), params) for i in range(rows)]
        if args.trace_mib:
            torch.cuda.memory._record_memory_history(max_entries=200000)
        engine.step()  # the prefill (and one decode step, whose graph is captured)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        if args.trace_mib:
            for event in torch.cuda.memory._snapshot()["device_traces"][0]:
                if event["action"] == "alloc" and event["size"] >= args.trace_mib << 20:
                    frames = [f"{f['filename'].split('/')[-1]}:{f['line']}:{f['name']}" for f in event["frames"]
                              if "finetune" in f["filename"] or "benchmarks" in f["filename"]]
                    print(json.dumps(dict(group=group, mib=round(event["size"] / 2**20, 1), frames=frames[:8])))
            torch.cuda.memory._record_memory_history(enabled=None)
        positions = rows * tokens
        row = dict(group=group, positions=positions, peak_mib=round(peak / 2**20, 1),
                   bytes_a_position=round(peak / positions), estimate_bytes_a_position=width,
                   device=device_name(device))
        print(json.dumps(row), flush=True)
        results.append(row)
        for r in reqs:
            r.cancel()
        while engine.has_work():
            engine.step()
        del engine
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
