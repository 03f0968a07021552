"""Where a decode step's time goes (one GPU, 14B-shaped random Int4 model from make_model_dir.py): for each
batch size asked, the engine's whole step (host included), the CUDA-graph replay alone (GPU time of a step),
and, from an eager run under the torch profiler, the GPU time per kernel family (Int4 GEMV, lm_head, attention,
the rest) with the number of kernels a step launches, and the figures issue 16's step 8 is judged by: GPU time
and kernels per step besides the Int4 GEMV, matmuls and attention, and those kernels per layer. For
benchmarks/NOTES.md.

    python benchmarks/decode_profile.py --rows 1 32 --out $OUT/decode_profile.json
    python benchmarks/decode_profile.py --rows 1 32 --unfused-too   # also FINETUNE_FUSED_DECODE=0 (before/after)
    python benchmarks/decode_profile.py --rows 1 --adapter 64       # every row through an unmerged r=64 LoRA
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

from decode_bench import load, prompt_ids, with_adapter  # noqa: E402
from make_model_dir import make_model_dir  # noqa: E402
from provenance import git_commit  # noqa: E402

from finetune.inference import Engine, SamplingParams  # noqa: E402
from finetune.settings import override  # noqa: E402

# the part of a step that is neither weights (GEMV, matmuls) nor attention: what step 8 cuts
_WEIGHTS_AND_ATTENTION = ("int4_gemv", "int4_dequant", "matmul (lm_head, LoRA)", "attention", "split-K reduce")


def family(name: str) -> str:
    n = name.lower()
    if n.startswith("void ") and "gemv" in n:  # cuBLAS's GEMVs (a LoRA's x @ A; C++ names), not an Int4 kernel
        return "matmul (lm_head, LoRA)"
    if "gemv" in n or "gptq_mma_gemm" in n:  # the Int4 kernels: GEMVs and the small-M tensor-core GEMM
        return "int4_gemv"
    if "splitk_reduce" in n:  # the first GEMV design's second kernel
        return "split-K reduce"
    if "_dec_attn" in n:  # decode_kernels.decode_attention (fused_decode.use_own_keys)
        return "attention"
    if "_dec_" in n:  # finetune/inference/decode_kernels.py
        return "fused decode (norm, rotary + cache, swiglu)"
    if "dequant" in n:
        return "int4_dequant"
    # before matmuls: the memory-efficient SDPA kernels are named fmha_cutlass...
    if "flash" in n or "attention" in n or "fmha" in n or "efficient" in n or "sdpa" in n:
        return "attention"
    if "gemm" in n or "nvjet" in n or "cutlass" in n or "sm90" in n:
        return "matmul (lm_head, LoRA)"
    if "copy" in n or "memcpy" in n or "memset" in n:
        return "copies"
    return "other"


def steps(engine, n):
    for _ in range(n):
        engine.step()


def run_rows(model, tok, rows: int, prompt: int, new: int, prof_steps: int, adapter: str | None = None) -> dict:
    vocab = model.config.vocab_size
    params = SamplingParams(max_new_tokens=new, min_new_tokens=new)
    prompts = [prompt_ids(prompt, i, vocab) for i in range(rows)]
    out = dict(rows=rows, prompt_tokens=prompt, adapter=adapter)

    engine = Engine(model, tok, max_batch=rows)
    for p in prompts:  # warm-up: tuning, capture
        engine.submit(p, params, adapter=adapter)
    steps(engine, 4)
    torch.cuda.synchronize()
    timed = 32
    t = time.perf_counter()
    steps(engine, timed)
    torch.cuda.synchronize()
    out["engine_step_ms"] = (time.perf_counter() - t) / timed * 1e3
    # the graph of the current (bucket, length bucket) alone: the GPU time of one step
    (key, (graph, _)), = [(k, v) for k, v in engine._graphs.items() if k[0] == engine._bucket(rows)][-1:]
    graph.replay()
    torch.cuda.synchronize()
    reps = 50
    t = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    out["replay_ms"] = (time.perf_counter() - t) / reps * 1e3
    out["graph_key"] = list(key)
    out["host_ms"] = out["engine_step_ms"] - out["replay_ms"]
    out["tokens_per_s_engine"] = rows / out["engine_step_ms"] * 1e3
    out["tokens_per_s_replay"] = rows / out["replay_ms"] * 1e3
    while engine.has_work():
        engine.step()
    del engine

    # eager, under the profiler: kernels by family
    eager = Engine(model, tok, max_batch=rows, use_graphs=False)
    for p in prompts:
        eager.submit(p, params, adapter=adapter)
    steps(eager, 4)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        steps(eager, prof_steps)
        torch.cuda.synchronize()
    fam = defaultdict(float)
    count = defaultdict(int)
    top = []
    for e in prof.key_averages():
        us = e.self_device_time_total
        if us <= 0:
            continue
        f = family(e.key)
        fam[f] += us / prof_steps / 1e3
        count[f] += e.count / prof_steps
        top.append((us / prof_steps / 1e3, e.count / prof_steps, e.key[:90]))
    out["eager_gpu_ms_by_family"] = {k: round(v, 4) for k, v in sorted(fam.items(), key=lambda kv: -kv[1])}
    out["eager_kernels_per_step_by_family"] = {k: round(v, 1) for k, v in count.items()}
    out["eager_gpu_ms"] = sum(fam.values())
    rest = [f for f in fam if f not in _WEIGHTS_AND_ATTENTION]
    out["fused_decode"] = eager._kernels is not None
    out["rest_gpu_ms_per_step"] = round(sum(fam[f] for f in rest), 4)
    out["rest_kernels_per_step"] = round(sum(count[f] for f in rest), 1)
    out["rest_kernels_per_layer"] = round(out["rest_kernels_per_step"] / model.config.num_hidden_layers, 2)
    out["eager_top_kernels"] = [dict(ms=round(a, 4), per_step=round(b, 1), name=c)
                                for a, b, c in sorted(top, reverse=True)[:25]]
    while eager.has_work():
        eager.step()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--prompt", type=int, default=24)
    ap.add_argument("--prof-steps", type=int, default=4)
    ap.add_argument("--model-dir", default="/tmp/decode_bench/14b_int4")
    ap.add_argument("--out", default=None)
    ap.add_argument("--unfused-too", action="store_true",
                    help="also profile with FINETUNE_FUSED_DECODE=0 (the model's own blocks), for before/after")
    ap.add_argument("--adapter", type=int, default=0, metavar="RANK",
                    help="every row through a random unmerged LoRA adapter of this rank (decode_bench's)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_profile.py needs a CUDA GPU")
        return 2
    device = torch.device("cuda")
    make_model_dir(Path(args.model_dir), "14b", True, "cuda")
    model, tok = load(Path(args.model_dir), device)
    if args.adapter:
        model = with_adapter(model, args.adapter)
    results = []
    for fused in (True, False) if args.unfused_too else (True,):
        for rows in args.rows:
            with override(fused_decode=fused):
                r = run_rows(model, tok, rows, args.prompt, 64 + 40, args.prof_steps,
                             "default" if args.adapter else None)
            r.update(commit=git_commit() or "unknown", device=torch.cuda.get_device_name())
            print(json.dumps(r, indent=1), flush=True)
            results.append(r)
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
