"""Decode speed on one GPU: (a) the Int4 GEMV / small-M GEMM against a device copy for the Qwen-14B Linear
shapes, every kernel config, and (b) the inference engine on the issue-16 workloads over a 14B-shaped random
Int4 model (made by make_model_dir.py), written to benchmarks/results/decode.json.

    python benchmarks/decode_bench.py                      # both parts, 14B shape (~5 min on an H200)
    python benchmarks/decode_bench.py --part gemv --out /tmp/gemv.json   # (a) only (~2 min: 14B shapes, rows 1 8 32 64)
    python benchmarks/decode_bench.py --part gemv --gemv-shapes 14b 7b --gemv-rows 1 --out /tmp/gemv.json
    TRITON_INTERPRET=1 python benchmarks/decode_bench.py --part gemv --gemv-rows 1 8 --out /tmp/g.json  # CPU check
    python benchmarks/decode_bench.py --part engine --workloads b1_512 b64_mixed
    python benchmarks/decode_bench.py --tiny --out /tmp/decode.json   # the same code on the tiny model (CPU)

The GEMV part builds random packed buffers (no model), measures the device copy rate (read + write) and a read
rate (a sum over 2 GiB), then for every shape and row count times every candidate config of triton_gemv, the
tuner's pick ("tuned", with what the tuner measured) and dequantize+matmul, each from a CUDA graph over enough
copies of the layer to exceed the L2 four times (every call reads its weight from HBM), and prints one line per
config and the best per shape. A config that fails to compile or run is printed with its error; the others run.

Self-checks before anything is timed: every GEMV config against the dequantized matmul (a config that is
wrong is reported and never timed), and the engine's first greedy tokens against generate()'s (reported as
`agrees_with_generate`; the random model's logits are nearly flat, so a mismatch after a near-tie is possible
and is shown, not fatal: `first_difference` and `reference_gap`, generate()'s top-two logit gap there). A workload that fails is written with its error and the others still run.

Workloads (random model: min_new_tokens = max_new_tokens so every row decodes its whole length):
  b1_512          1 row, 24-token prompt, 512 new tokens
  b1_ctx2000      1 row, 2000-token prompt, 256 new tokens
  b64_mixed       64 rows, prompts of 50..1000 tokens (seeded), 256 new tokens each; tokens_per_s over the
                  decode steps (prefill_s: the first step, which prefills all 64 rows)
  b1_512_adapter  b1_512 with a LoRA adapter (r=64 on c_attn, c_proj (both), w1, w2), unmerged
  b64_mixed_adapters  b64_mixed with three such adapters loaded, the rows taking them and the base in turn (a
                  server's mix; not one of issue 16's targets: it checks that the engine's memory plan counts the
                  adapters' copies, and reports their cost at 64 rows)
  (b64_*: rows_in_first_step says how many rows the memory plan let join at once)
  eval_256        qwen-ft eval's generation (the engine, 32 rows at once) on 256 chats, 128 new tokens, beside
  eval_32_generate  transformers generate() (eval's --generator generate) on 32 of them
The timed run of each workload follows an identical warm-up run (Triton tuning, graph capture).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import finetune  # noqa: E402,F401
from finetune.inference import Engine, SamplingParams  # noqa: E402
from provenance import git_commit  # noqa: E402

# (in, out) of the four distinct Linear shapes of Qwen-14B (and of Qwen-7B)
GEMV_SHAPES = {"c_attn": (5120, 15360), "attn.c_proj": (5120, 5120), "w1/w2": (5120, 13696),
               "mlp.c_proj": (13696, 5120)}
GEMV_SHAPE_SETS = {"14b": GEMV_SHAPES, "7b": {"c_attn": (4096, 12288), "attn.c_proj": (4096, 4096),
                                              "w1/w2": (4096, 11008), "mlp.c_proj": (11008, 4096)}}
GEMV_ROWS = (1, 8, 32, 64)
# the adapters wrap the model: last
WORKLOADS = ["b1_512", "b1_ctx2000", "b64_mixed", "eval_256", "b1_512_adapter", "b64_mixed_adapters"]
# the same workloads scaled to the tiny model (CPU, seconds)
TINY = {"b1_512": dict(prompt=24, new=8), "b1_ctx2000": dict(prompt=300, new=4),
        "b64_mixed": dict(rows=5, lo=5, hi=40, new=6), "b1_512_adapter": dict(prompt=24, new=8),
        "b64_mixed_adapters": dict(rows=5, lo=5, hi=40, new=6, adapters=3),
        "eval_256": dict(chats=6, new=6, generate_chats=2)}
FULL = {"b1_512": dict(prompt=24, new=512), "b1_ctx2000": dict(prompt=2000, new=256),
        "b64_mixed": dict(rows=64, lo=50, hi=1000, new=256), "b1_512_adapter": dict(prompt=24, new=512),
        "b64_mixed_adapters": dict(rows=64, lo=50, hi=1000, new=256, adapters=3),
        "eval_256": dict(chats=256, new=128, generate_chats=32)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# -- (a) GEMV -------------------------------------------------------------------------------------------------------
def random_layer(K, N, device, seed=0, group_size=128):
    g = torch.Generator(device=device).manual_seed(seed)
    qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), device=device, dtype=torch.int32, generator=g)
    groups = -(-K // group_size)
    qzeros = torch.randint(-2**31, 2**31 - 1, (groups, N // 8), device=device, dtype=torch.int32, generator=g)
    scales = (torch.rand(groups, N, device=device, generator=g) * 0.02 + 0.001).half()
    g_idx = (torch.arange(K, device=device) // group_size).int()
    return dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx)


def layer_copies(K, N, device, timed=True) -> tuple[int, list[dict]]:
    """(packed bytes of one [K, N] Int4 layer, its random copies): more than 200 MiB of copies in all (4x the L2)
    when timed, so that a graph of one call per copy reads every weight from HBM (`time_gemv`); one otherwise."""
    weight_bytes = K * N // 2 + (K // 128) * N * 2 + (K // 128) * (N // 8) * 4
    copies = max(2, -(-200 * 2**20 // weight_bytes)) if timed else 1
    return weight_bytes, [random_layer(K, N, device, seed=i) for i in range(copies)]


def int4pack_layers(layers) -> list[dict]:
    """Each layer converted for aten's int4 kernel (finetune/quant/int4pack.py), as the probes call it."""
    from finetune.quant import int4pack as P

    packs = []
    for layer in layers:
        q, sz, perm = P.gptq_to_int4pack(**layer, group_size=128)
        packs.append(dict(packed=P.pack_for_cuda(q), sz=sz, perm=perm))
    return packs


def copy_bandwidth(device, nbytes=2 * 2**30) -> tuple[float, float]:
    """(device copy rate counting read + write, read rate of a sum), bytes/s."""
    src = torch.empty(nbytes // 2, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    reps = 10
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    sync(device)
    copy = 2 * nbytes * reps / (start.elapsed_time(end) / 1e3)
    f = src.view(torch.float16)
    f.zero_()
    f.sum()
    start.record()
    for _ in range(reps):
        f.sum()
    end.record()
    sync(device)
    return copy, nbytes * reps / (start.elapsed_time(end) / 1e3)


def time_gemv(fn, layers, x, device, reps=3) -> float:
    """Seconds per call, from a CUDA graph of one call per layer copy (the copies together exceed the L2 several
    times, as 40 layers do in decoding, so every call reads its weight from HBM without a flush kernel inside
    the timing; the graph removes the host launch cost)."""
    for layer in layers:  # outside the capture: tuning, and per-weight checks that read the device once
        fn(x, layer)
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in layers:
            fn(x, layer)
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        sync(device)
        best = min(best, start.elapsed_time(end) / 1e3 / len(layers))
    return best


def gemv_part(device, shape_sets=("14b",), rows_list=GEMV_ROWS) -> list[dict]:
    """Every candidate config of triton_gemv, the tuner's pick and dequantize+matmul, per shape and row count.

    On the CPU with TRITON_INTERPRET=1: the same configs on a small layer, checked against the dequantized
    matmul, not timed (a check that the config lists and this code run)."""
    from finetune.quant import triton_gemv as tg
    from finetune.quant.linear import dequantize_weight_t
    from finetune.quant.packing import dequantize_t

    timed = device.type == "cuda"
    if timed:
        copy_bps, read_bps = copy_bandwidth(device)
        print(f"device copy: {copy_bps / 1e12:.2f} TB/s (read + write); read (a sum): {read_bps / 1e12:.2f} TB/s",
              flush=True)
        shapes = {f"{k}/{name}": v for k in shape_sets for name, v in GEMV_SHAPE_SETS[k].items()}
    else:
        copy_bps = read_bps = float("nan")
        shapes = {"interpreter": (256, 192)}
    results = []
    for name, (K, N) in shapes.items():
        t_shape = time.perf_counter()
        weight_bytes, layers = layer_copies(K, N, device, timed)
        ref_w = dequantize_t(**layers[0], bits=4, dtype=torch.bfloat16 if timed else torch.float16).float()
        for M in rows_list:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16 if timed else torch.float16)
            ref = x.float() @ ref_w
            candidates = [(str(c), c) for c in tg.configs_for(M)] + ([("tuned", None)] if timed else [])
            best = None
            for label, cfg in candidates:
                def call(x, layer, cfg=cfg):
                    return tg.triton_gemv(x, **layer, bits=4, group_size=128, trivial_g_idx=True, config=cfg)
                row = dict(layer=name, K=K, N=N, rows=M, config=label, weight_bytes=weight_bytes)
                try:
                    t = time.perf_counter()
                    y = call(x, layers[0]).float()  # compiles (or, for "tuned", tunes)
                    row["first_call_s"] = time.perf_counter() - t
                    err = ((y - ref).norm() / ref.norm()).item()
                    row["rel_err"] = err
                    if not err < 5e-3:
                        row["error"] = f"wrong result: relative error {err:.2e} against the dequantized matmul"
                    elif timed:
                        sec = time_gemv(call, layers, x, device)
                        row.update(us=sec * 1e6, gbps=weight_bytes / sec / 1e9,
                                   pct_copy=100 * weight_bytes / sec / copy_bps,
                                   pct_read=100 * weight_bytes / sec / read_bps)
                except Exception as exc:  # noqa: BLE001  (a config this GPU cannot run: reported, the others run)
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                if label == "tuned":
                    key = next((k for k in tg._BEST if k[:3] == (K, N, tg.row_bucket(M))), None)
                    row["config"] = f"tuned {tg._BEST.get(key)}"
                    row["tuner_ms"] = [[str(c), ms] for c, ms in tg._TUNE_MS.get(key, [])]
                elif "us" in row and (best is None or row["us"] < best["us"]):
                    best = row
                results.append(row)
                if "us" in row:
                    shown = (f"{row['us']:8.1f} us {row['gbps']:6.0f} GB/s {row['pct_copy']:5.1f}% of copy "
                             f"{row['pct_read']:5.1f}% of read")
                else:
                    shown = row.get("error", f"rel_err {row['rel_err']:.1e} (not timed)")
                print(f"{name:16s} {K:5d}x{N:<5d} rows={M:<3d} {row['config']:34s} {shown}", flush=True)
                if row.get("tuner_ms"):
                    top = sorted(row["tuner_ms"], key=lambda t: t[1])[:3]
                    print("  tuner (one launch after an L2 flush, median of 5): "
                          + ", ".join(f"{c} {ms * 1e3:.1f} us" for c, ms in top), flush=True)
            if not timed:
                continue
            # the dequantize-then-matmul path GPTQLinear takes above 64 rows, for scale
            def dq(x, layer):
                return x @ dequantize_weight_t(**layer, bits=4, v2=False, dtype=torch.bfloat16, group_size=128,
                                               trivial_g_idx=True)
            row = dict(layer=name, K=K, N=N, rows=M, config="dequantize+matmul", weight_bytes=weight_bytes)
            try:
                sec = time_gemv(dq, layers, x, device)
                row.update(us=sec * 1e6, gbps=weight_bytes / sec / 1e9, pct_copy=100 * weight_bytes / sec / copy_bps,
                           pct_read=100 * weight_bytes / sec / read_bps)
                shown = f"{sec * 1e6:8.1f} us {row['gbps']:6.0f} GB/s {row['pct_copy']:5.1f}% of copy"
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                shown = row["error"]
            results.append(row)
            print(f"{name:16s} {K:5d}x{N:<5d} rows={M:<3d} {'dequantize+matmul':34s} {shown}", flush=True)
            if best is not None:
                vs = f", {row['us'] / best['us']:.1f}x faster than dequantize+matmul" if "us" in row else ""
                print(f"  best: {best['config']} {best['us']:.1f} us = {best['pct_copy']:.1f}% of copy{vs}", flush=True)
        print(f"  ({name}: {time.perf_counter() - t_shape:.0f} s)", flush=True)
        del layers
        if timed:
            torch.cuda.empty_cache()
    if timed:
        print_gemv_summary(results)
    return [dict(r, copy_tbps=copy_bps / 1e12, read_tbps=read_bps / 1e12) for r in results]


def print_gemv_summary(results) -> None:
    """One line per (shape, rows): the fastest config, the tuner's pick and dequantize+matmul."""
    print("\nsummary (% of the device copy rate):")
    print(f"{'layer':16s} {'rows':>4s}  {'best config':34s} {'us':>7s} {'%copy':>6s}  {'tuned us':>8s} {'%copy':>6s}"
          f"  {'dq+mm us':>8s}")
    keys = list(dict.fromkeys((r["layer"], r["rows"]) for r in results))
    for layer, rows in keys:
        mine = [r for r in results if (r["layer"], r["rows"]) == (layer, rows) and "us" in r]
        cands = [r for r in mine if not r["config"].startswith(("tuned", "dequantize"))]
        tuned = next((r for r in mine if r["config"].startswith("tuned")), None)
        dq = next((r for r in mine if r["config"] == "dequantize+matmul"), None)
        if not cands:
            print(f"{layer:16s} {rows:4d}  (no config ran)")
            continue
        best = min(cands, key=lambda r: r["us"])
        t = f"{tuned['us']:8.1f} {tuned['pct_copy']:6.1f}" if tuned else f"{'-':>8s} {'-':>6s}"
        d = f"{dq['us']:8.1f}" if dq else f"{'-':>8s}"
        print(f"{layer:16s} {rows:4d}  {best['config']:34s} {best['us']:7.1f} {best['pct_copy']:6.1f}  {t}  {d}")


# -- (b) engine workloads -------------------------------------------------------------------------------------------
def load(model_dir, device):
    from finetune import load_model, load_tokenizer

    model = load_model(model_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                       device=str(device))
    model.eval()
    return model, load_tokenizer(model_dir)


def with_adapter(model, rank, names=("default",)):
    """The model wrapped with random LoRA adapters ``names`` (r=rank on c_attn, c_proj (both), w1, w2)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "w1", "w2"],
                        init_lora_weights=False)
    pm = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, config)
    for name, p in pm.named_parameters():  # small random B: a real adapter's scale, not a broken model
        if "lora_B" in name:
            p.data.mul_(0.01)
    return pm.eval()


def adapter_names(count: int) -> list[str]:
    return ["default"] + [f"adapter{i}" for i in range(1, count)] if count else []


def prompt_ids(n, seed, vocab):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, min(vocab, 150000) - 10, (n,), generator=g).tolist()


def run_engine(engine, prompts, new, adapter=None, stats=None):
    """(seconds of the first step (prefill of every row that fits + one decode step), seconds of the other
    steps, tokens those produced, outputs). ``adapter``: one name for every prompt, or a list of one a prompt.
    ``stats`` (a dict) gets rows_in_first_step."""
    device = engine.device
    params = SamplingParams(max_new_tokens=new, min_new_tokens=new)
    adapters = adapter if isinstance(adapter, list) else [adapter] * len(prompts)
    reqs = [engine.submit(p, params, adapter=a) for p, a in zip(prompts, adapters)]
    sync(device)
    t0 = time.perf_counter()
    engine.step()
    sync(device)
    t1 = time.perf_counter()
    if stats is not None:
        stats["rows_in_first_step"] = engine.occupancy()[0]
    # the first step also ran one decode step for every admitted row (its tokens are read by the next step():
    # the engine runs one step ahead), timed in t1 - t0
    first = sum(len(r.output_ids) for r in reqs) + sum(not r.finished for r in reqs)
    while engine.has_work():
        engine.step()
    sync(device)
    t2 = time.perf_counter()
    total = sum(len(r.output_ids) for r in reqs)
    return t1 - t0, t2 - t1, total - first, [r.output_ids for r in reqs]


def agrees_with_generate(model, prompt, ours, n=8) -> dict:
    """Whether the engine's first ``n`` greedy tokens are generate()'s, and where not, the first position that
    differs and the gap between generate()'s top two logits there: a gap near 0 is a tie that bf16's order of
    sums may break either way, a large one a fault."""
    from transformers import GenerationConfig

    ids = torch.tensor([prompt], device=model.device)
    gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc, output_scores=True,
                         return_dict_in_generate=True)
    ref = out.sequences[0, len(prompt):].tolist()
    at = next((i for i, (a, b) in enumerate(zip(ref, ours[:n])) if a != b), -1)
    gap = None
    if at >= 0:
        top = out.scores[at][0].float().topk(2).values
        gap = round(float(top[0] - top[1]), 5)
    return dict(agrees_with_generate=ref == ours[:n], first_difference=at, reference_gap=gap)


def workload(name, model, tok, spec, device, vocab) -> dict:
    if name in ("b1_512", "b1_ctx2000", "b1_512_adapter"):
        engine = Engine(model, tok, max_batch=1)
        p = prompt_ids(spec["prompt"], 0, vocab)
        adapter = "default" if name == "b1_512_adapter" else None
        # warm-up, twice: the first run's decode steps make the tensor-core kernel's weight copy, so the next
        # prefill (24 rows) is that kernel's first 17-32 row call, which compiles its configuration: the likely
        # cause of a process's first timed prefill taking 0.11-0.57 s against 0.06 s after one warm-up (NOTES 18)
        for _ in range(2):
            run_engine(engine, [p], spec["new"], adapter)
        pre, dec, n, outs = run_engine(engine, [p], spec["new"], adapter)
        total = spec["new"]
        return dict(tokens_per_s=total / (pre + dec), decode_tokens_per_s=n / dec, prefill_s=pre,
                    new_tokens=total, prompt_tokens=spec["prompt"], **agrees_with_generate(model, p, outs[0]))
    if name in ("b64_mixed", "b64_mixed_adapters"):
        g = torch.Generator().manual_seed(1)
        lengths = torch.randint(spec["lo"], spec["hi"] + 1, (spec["rows"],), generator=g).tolist()
        prompts = [prompt_ids(n, i, vocab) for i, n in enumerate(lengths)]
        names = [None] + adapter_names(spec.get("adapters", 0))
        adapter = [names[i % len(names)] for i in range(len(prompts))]  # the base and each adapter in turn
        engine = Engine(model, tok, max_batch=spec["rows"])
        stats = {}
        run_engine(engine, prompts, spec["new"], adapter)
        pre, dec, n, outs = run_engine(engine, prompts, spec["new"], adapter, stats)
        return dict(tokens_per_s=n / dec, prefill_s=pre, decode_s=dec, rows=spec["rows"], new_tokens=spec["new"],
                    prompt_tokens=sum(lengths), adapters=len(names) - 1, **stats,
                    note="tokens_per_s: generated tokens over the decode steps")
    raise ValueError(name)


def eval_workloads(model, tok, spec, device, tmp: Path) -> list[tuple[str, dict]]:
    from finetune.evaluate import evaluate_model

    words = ("gate owl falcon door moon river code number colour green silver north project secret "
             "answer question packing adapter model token").split()
    g = torch.Generator().manual_seed(2)
    records = []
    for i in range(spec["chats"]):
        q = " ".join(words[j] for j in torch.randint(0, len(words), (int(torch.randint(5, 40, (1,),
                                                                                         generator=g)),),
                                                                      generator=g).tolist())
        records.append({"id": f"e{i}", "conversations": [{"from": "user", "value": q + "?"},
                                                          {"from": "assistant", "value": "A reply."}]})
    out = []
    for label, recs, generator in (("eval_256", records, "engine"),
                                   ("eval_32_generate", records[:spec["generate_chats"]], "generate")):
        if generator == "engine":  # warm-up (tuning and graphs for the buckets eval uses)
            evaluate_model(model, tok, recs[:32], max_new_tokens=4, generator="engine", gen_batch_size=32)
        sync(device)
        t = time.perf_counter()
        report = evaluate_model(model, tok, recs, batch_size=8, max_new_tokens=spec["new"], generator=generator,
                                gen_batch_size=32)
        sync(device)
        wall = time.perf_counter() - t
        base = report["base"]
        # tokens from the generated ids (eval counts them), never re-encoded text: the random model's tokens
        # are mostly past the small vocabulary of the model dir's tokenizer and decode to nothing
        out.append((label, dict(tokens_per_s=base["tokens_per_s"], generated_tokens=base["generated_tokens"],
                                generation_s=base["generation_seconds"], wall_s=wall,
                                generation_and_loss_s=base["seconds"], chats=len(recs),
                                max_new_tokens=spec["new"], generator=generator,
                                note="eval of the base model: held-out loss + greedy replies; tokens_per_s: "
                                     "generated tokens over the generation's seconds (loss excluded)")))
    return out


def engine_part(args, device) -> list[dict]:
    from make_model_dir import make_model_dir

    specs = TINY if args.tiny else FULL
    model_dir = Path(args.model_dir) if args.model_dir else Path(args.work) / ("tiny_int4" if args.tiny else
                                                                             "14b_int4")
    t = time.perf_counter()
    make_model_dir(model_dir, "tiny" if args.tiny else "14b", True, str(device))
    print(f"model dir {model_dir} ready in {time.perf_counter() - t:.0f} s", flush=True)
    entries = []
    plain = None
    for name in args.workloads:
        command = " ".join(["python", "benchmarks/decode_bench.py", "--part", "engine", "--workloads", name]
                           + (["--tiny"] if args.tiny else []))
        entry = dict(workload=name, command=command)
        try:
            import gc

            gc.collect()
            if device.type == "cuda":  # the peak of this workload alone (the model's memory included)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            if plain is None:
                plain = load(model_dir, device)
            model, tok = plain
            if name in ("b1_512_adapter", "b64_mixed_adapters"):
                model = with_adapter(model, 8 if args.tiny else 64, adapter_names(specs[name].get("adapters", 1)))
                plain = None  # LoRA layers are in it now: a later workload loads the model again
            vocab = model.config.vocab_size
            if name == "eval_256":
                results = eval_workloads(model, tok, specs[name], device, Path(args.work))
            else:
                results = [(name, workload(name, model, tok, specs[name], device, vocab))]
            for label, res in results:
                e = dict(entry, workload=label, **res)
                if device.type == "cuda":
                    e["peak_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
                entries.append(e)
                print(json.dumps(e), flush=True)
            del model
        except Exception as exc:  # noqa: BLE001  (write the failure, run the other workloads)
            traceback.print_exc()
            entries.append(dict(entry, error=f"{type(exc).__name__}: {exc}"))
    return entries


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny model (the same code, CPU is fine)")
    ap.add_argument("--part", choices=("all", "gemv", "engine"), default="all")
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=WORKLOADS)
    ap.add_argument("--gemv-shapes", nargs="+", choices=sorted(GEMV_SHAPE_SETS), default=["14b"],
                    help="the GEMV part's Linear shapes (default: 14b)")
    ap.add_argument("--gemv-rows", nargs="+", type=int, default=list(GEMV_ROWS),
                    help="the GEMV part's row counts, 1..64 (default: 1 8 32 64)")
    ap.add_argument("--model-dir", help="an Int4 model dir to use (default: made under --work)")
    ap.add_argument("--work", default="/tmp/decode_bench", help="where the model dir is made")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode.json"))
    args = ap.parse_args(argv)
    bad = [r for r in args.gemv_rows if not 1 <= r <= 64]
    if bad:
        ap.error(f"--gemv-rows: {bad[0]} is outside 1..64 (the GEMV's row range)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = dict(commit=git_commit() or "unknown", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=device_name(device), torch=torch.__version__, tiny=args.tiny)
    entries = []
    if args.part in ("all", "gemv"):
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            command = " ".join(["python", "benchmarks/decode_bench.py", "--part", "gemv", "--gemv-shapes",
                                *args.gemv_shapes, "--gemv-rows", *map(str, args.gemv_rows)])
            t = time.perf_counter()
            entries += [dict(workload="gemv", command=command, **r)
                        for r in gemv_part(device, args.gemv_shapes, args.gemv_rows)]
            print(f"gemv part: {time.perf_counter() - t:.0f} s", flush=True)
        else:
            print("gemv part: skipped (needs CUDA, or TRITON_INTERPRET=1 for an untimed check of the configs)")
    if args.part in ("all", "engine"):
        entries += engine_part(args, device)
    entries = [dict(e, **meta) for e in entries]
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else []
    done = {(e["workload"], e.get("tiny", False)) for e in entries}
    # keep the other workloads' entries; this run's replace the earlier ones of the same workload and mode
    kept = [e for e in old if (e.get("workload"), e.get("tiny", False)) not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(kept + entries, indent=1) + "\n")
    print(f"wrote {len(entries)} entries to {out}")
    failed = [e for e in entries if "error" in e and e["workload"] != "gemv"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
