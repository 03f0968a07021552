"""The inference engine's host time per decode step, measured without a GPU: the engine in its CUDA-graph mode on
the CPU with each captured graph replaced by a no-op (its output: fixed random logits), so a step's time is the
engine's own Python and tensor work outside the graph: building inputs, picking tokens, reading them,
bookkeeping. Also the torch ops the engine dispatches per step outside the graph (on CUDA each costs the host
a launch, ~5-10 us; here the ops of the sampled case also compute on the CPU, which a GPU does
asynchronously, so its time is not host time). `--rev REV` measures finetune/inference/engine.py as it was at
a git revision beside the working tree's. For benchmarks/NOTES.md (Step 9).

    python benchmarks/engine_host_cost.py --rows 1 32 --rev 86179b3 --out /tmp/engine_host_cost.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.demo import TINY_CONFIG, randomize_weights  # noqa: E402
from finetune.inference import SamplingParams  # noqa: E402
from finetune.inference import engine as current_engine  # noqa: E402
from finetune.modeling import QWenConfig, QWenLMHeadModel  # noqa: E402
from finetune.tokenization import SMALL_VOCAB, QWenTokenizer  # noqa: E402


def engine_at(rev: str):
    """finetune/inference/engine.py as of git revision `rev`, imported as a sibling of today's module
    -> (module, None), or (None, the error)."""
    shown = subprocess.run(["git", "show", f"{rev}:finetune/inference/engine.py"], cwd=ROOT, capture_output=True,
                           text=True)
    if shown.returncode != 0:
        return None, f"--rev {rev}: git show failed: {shown.stderr.strip()}"
    text = shown.stdout
    path = Path(tempfile.mkdtemp()) / "engine.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"finetune.inference.engine_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, None


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


class _NoopGraph:
    def replay(self):
        pass


def measure(module, model, tok, rows: int, params: SamplingParams, steps: int) -> dict:
    engine = module.Engine(model, tok, max_batch=rows, use_graphs=False)
    engine.use_graphs = True  # (a CPU model: the engine refuses use_graphs=True there; the graphs are no-ops below)
    logits = torch.randn(rows, engine.vocab, generator=torch.Generator().manual_seed(0))
    logits[:, [tok.im_end_id, tok.im_start_id]] = -1e4  # no row stops early

    def capture(b, kv_len, pick=None, *_):  # (newer engines also pass the attention choice)
        return _NoopGraph(), logits[:b].clone()

    engine._capture = capture
    for i in range(rows):
        engine.submit([5 + i, 6, 7], params)
    for _ in range(3):  # prefill, first launches
        engine.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    ops = _CountOps()
    with ops:
        engine.step()
    return dict(rows=rows, host_us_median=round(statistics.median(times) * 1e6, 1),
                host_us_min=round(min(times) * 1e6, 1), torch_ops_per_step=ops.n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rev", default=None, help="also measure the engine of this git revision")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if any(r < 1 for r in args.rows) or args.steps < 1:
        print("error: --rows and --steps must be >= 1", file=sys.stderr)
        return 2
    engines = [("working tree", current_engine)]
    if args.rev:
        old, problem = engine_at(args.rev)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        engines.append((args.rev, old))
    torch.set_num_threads(1)
    values = {k: v for k, v in TINY_CONFIG.items() if k not in ("architectures", "auto_map", "model_type")}
    torch.manual_seed(0)
    model = QWenLMHeadModel(QWenConfig(**values))
    randomize_weights(model, 0)
    model.eval()
    tok = QWenTokenizer(str(SMALL_VOCAB))
    cases = {
        # as benchmarks/decode_profile.py runs it (min_new_tokens: every step holds the stop tokens back)
        "greedy": SamplingParams(max_new_tokens=args.steps + 8, min_new_tokens=args.steps + 8),
        "greedy, repetition_penalty 1.1": SamplingParams(max_new_tokens=args.steps + 8, repetition_penalty=1.1),
        "sampled top_p 0.8, no seed": SamplingParams(max_new_tokens=args.steps + 8, do_sample=True, top_p=0.8),
        "sampled top_p 0.8, seeded": SamplingParams(max_new_tokens=args.steps + 8, do_sample=True, top_p=0.8,
                                                    seed=0),
    }
    results = []
    for name, module in engines:
        for case, params in cases.items():
            for rows in args.rows:
                r = dict(engine=name, case=case, **measure(module, model, tok, rows, params, args.steps))
                print(json.dumps(r), flush=True)
                results.append(r)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
