"""Profile the Qwen-14B-shaped Int4 model (fewer layers) on the GPU: where the time goes (GPU kernels by total
time, host time, GPU idle share). For benchmarks/NOTES.md.

  python benchmarks/profile_step.py --seq 2048 --ckpt [--ckpt-mode block]    # one Q-LoRA training step
  python benchmarks/profile_step.py --seq 2048 --ckpt --json OUT.json        # + GPU time by kind of kernel
  python benchmarks/profile_step.py --seq 2048 --ckpt --docs 3 --graphs --where 12
      # packed rows of 3 chats (FlexAttention's document mask, as the trainer's rows), replayed through the
      # trainer's CUDA graphs, and which lines of the package the copies, casts and adds come from
  python benchmarks/profile_step.py --decode 16                              # batch-1 decoding, per token
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import QWEN14B, build, checkpoint_whole_blocks, step_fn  # noqa: E402


def python_profile(fn, rows: int) -> None:
    """Host time by Python function (cProfile) over fn(): where the launch-bound time goes."""
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    fn()
    torch.cuda.synchronize()
    pr.disable()
    st = pstats.Stats(pr)
    st.sort_stats("tottime").print_stats(rows)
    st.sort_stats("cumulative").print_stats(rows)


# Kernel names -> what they do, first match wins (cuBLAS/CUTLASS GEMMs; this project's Triton kernels by their
# function names; FlexAttention's and SDPA's kernels; what torch.compile generated; the rest of aten).
CATEGORIES = [
    ("dequantize (Int4 -> bf16)", ("_dequant",)),
    ("attention", ("flex", "flash", "fmha", "attention", "triton_tem")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "sm80_", "splitk", "gemv")),
    ("loss (log-softmax, NLL)", ("softmax", "nll", "cross_entropy", "logsumexp")),
    ("LoRA dropout", ("seeded_dropout", "_dropout")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("compiled elementwise (norm, rotary, SwiGLU)", ("triton_poi", "triton_red", "triton_per")),
    ("copies and casts", ("copy", "cast", "to_dtype")),
    ("reductions", ("reduce",)),
    ("other elementwise", ("elementwise", "vectorized", "unrolled")),
]


def kernels(prof) -> list:
    """The profile's GPU kernel rows (key_averages), without the aten ops' rows, which repeat their kernels'
    time as their own device time."""
    from torch.autograd import DeviceType

    return [e for e in prof.key_averages() if e.self_device_time_total > 0 and e.device_type == DeviceType.CUDA]


def categorise(prof) -> dict:
    """GPU time (ms) by kind of kernel, and the 5 largest kernels of each kind."""
    out: dict[str, dict] = {}
    for e in kernels(prof):
        t = e.self_device_time_total / 1e3
        name = e.key.lower()
        cat = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        d = out.setdefault(cat, {"ms": 0.0, "kernels": []})
        d["ms"] += t
        d["kernels"].append((round(t, 3), e.count, e.key[:120]))
    for d in out.values():
        d["ms"] = round(d["ms"], 3)
        d["kernels"] = sorted(d["kernels"], reverse=True)[:5]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["ms"]))


def report(prof, wall_ms: float, title: str, rows: int) -> None:
    ka = prof.key_averages()
    total_gpu = sum(e.self_device_time_total for e in kernels(prof)) / 1e3
    print(f"{title}: wall {wall_ms:.2f} ms, GPU kernels {total_gpu:.2f} ms ({total_gpu / wall_ms:.0%} busy)")
    print(ka.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70))


def train_step(args, device):
    model, config = build(QWEN14B, device, layers=args.layers)
    model.train()
    if args.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.ckpt_mode == "block":
            checkpoint_whole_blocks()
        blocks = model.get_base_model().transformer.h
        for b in blocks[len(blocks) - args.keep_mlp:]:  # as --gradient_checkpointing_keep_gib sets it
            b.keep_mlp_projections = True
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    graphs = None
    if args.graphs:
        from finetune.training.graphs import enable_train_graphs

        graphs = enable_train_graphs(model, warmup=1)
    step = step_fn(model, opt, device, graphs)
    ids = torch.randint(0, config.vocab_size, (1, args.seq), device=device)
    batch = {"input_ids": ids, "labels": ids}
    if args.docs:  # packed rows: positions restart at every chat, so attention stays inside each (FlexAttention)
        edges = [round(i * args.seq / args.docs) for i in range(args.docs + 1)]
        pos = torch.cat([torch.arange(b - a) for a, b in zip(edges, edges[1:])])
        batch["position_ids"] = pos[None].to(device)
    for _ in range(3):
        step(batch)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        step(batch)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 3
    print(f"step: {wall * 1e3:.1f} ms")
    if args.python:
        return python_profile(lambda: step(batch), args.rows)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=bool(args.where),
                 record_shapes=bool(args.where)) as prof:
        step(batch)
        torch.cuda.synchronize()
    title = (f"seq {args.seq} layers {args.layers} ckpt {args.ckpt} ({args.ckpt_mode}, {args.keep_mlp} keep MLP "
             f"projections) docs {args.docs or 1} "
             f"{'graphed' if graphs is not None else 'eager'} step")
    report(prof, wall * 1e3, title, args.rows)
    if args.where:
        where(prof, args.where)
    if args.json:
        import json

        cats = categorise(prof)
        total = sum(d["ms"] for d in cats.values())
        for c, d in cats.items():
            print(f"{c:48s} {d['ms']:9.2f} ms {d['ms'] / total:6.1%}")
        Path(args.json).write_text(json.dumps({"title": title, "wall_ms": round(wall * 1e3, 2),
                                               "gpu_ms": round(total, 2), "categories": cats}, indent=1) + "\n")


MOVERS = ("aten::copy_", "aten::cat", "aten::add", "aten::add_", "aten::clone", "aten::contiguous", "aten::mul",
          "aten::_to_copy", "aten::fill_", "aten::zero_")


def where(prof, depth: int) -> None:
    """GPU time of the aten ops that copy, cast, concatenate, add or fill, by what called them: the chain of
    enclosing ops and Python frames (autograd's backward nodes for the backward), innermost first, `depth` links
    at most. Which lines a layout change would remove."""
    sites: dict = {}
    gemms: dict = {}
    for e in prof.events():
        if e.name in ("aten::mm", "aten::addmm", "aten::bmm") and e.device_time_total > 0:
            key = (e.name, str(e.input_shapes)[:90])  # the products by shape: the base's and the adapters'
            ms, n = gemms.get(key, (0.0, 0))
            gemms[key] = (ms + e.device_time_total / 1e3, n + 1)
        if e.name not in MOVERS or e.self_device_time_total <= 0:
            continue
        chain, parent = [], e.cpu_parent
        while parent is not None and len(chain) < depth:
            name = parent.name
            if not name.startswith("aten::") and "built-in method" not in name and "torch/" not in name:
                chain.append(name[:90])
            parent = parent.cpu_parent
        shape = str(e.input_shapes[0] if e.input_shapes else "")[:40]
        key = (e.name, shape, tuple(chain[:4]))
        ms, n = sites.get(key, (0.0, 0))
        sites[key] = (ms + e.self_device_time_total / 1e3, n + 1)
    print("\nmatrix products by input shapes (GPU ms, calls, us a call):")
    for (name, shapes), (ms, n) in sorted(gemms.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"{ms:8.3f} ms {n:5d} {1e3 * ms / n:8.1f} us  {name} {shapes}")
    rows = sorted(sites.items(), key=lambda kv: -kv[1][0])
    print(f"\ncopies, casts, adds and fills by caller (GPU ms, calls), {len(rows)} call sites:")
    for (name, shape, chain), (ms, n) in rows[:40]:
        print(f"{ms:8.3f} ms {n:5d}  {name} {shape}")
        for link in chain:
            print(f"{'':22s}{link}")


@torch.no_grad()
def decode(args, device):
    from transformers import GenerationConfig

    from finetune.modeling import QWenConfig
    from finetune.quant.loading import build_gptq_model_on_device

    config = QWenConfig(**dict(QWEN14B, num_hidden_layers=args.layers))
    model = build_gptq_model_on_device(config, device=device, dtype=torch.bfloat16).eval()
    prompt = torch.randint(0, 151000, (1, 24), device=device)

    def gen(n):
        gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        return model.generate(prompt, generation_config=gc)

    gen(8)
    torch.cuda.synchronize()
    t = time.perf_counter()
    gen(args.decode)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / args.decode
    print(f"decode: {wall * 1e3:.2f} ms per token")
    if args.python:
        return python_profile(lambda: gen(args.decode), args.rows)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gen(args.decode)
        torch.cuda.synchronize()
    report(prof, wall * 1e3 * args.decode, f"decode {args.decode} tokens, layers {args.layers} "
           f"({wall * 1e3:.2f} ms per token)", args.rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ckpt", action="store_true")
    ap.add_argument("--ckpt-mode", choices=["halves", "block"], default="halves")
    ap.add_argument("--keep-mlp", type=int, default=0, metavar="N",
                    help="with --ckpt: the last N blocks keep their MLP projections (the trainer's "
                         "--gradient_checkpointing_keep_gib)")
    ap.add_argument("--decode", type=int, default=0, help="profile batch-1 decoding of this many tokens instead")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--python", action="store_true", help="cProfile the host instead of the torch profiler")
    ap.add_argument("--json", help="also write the step's GPU time by kind of kernel to this file")
    ap.add_argument("--docs", type=int, default=0, help="the row packs this many chats (FlexAttention's mask)")
    ap.add_argument("--graphs", action="store_true", help="replay the step through the trainer's CUDA graphs")
    ap.add_argument("--where", type=int, default=0, metavar="FRAMES",
                    help="also list copies, casts and adds by the call stack (this many frames) that made them")
    args = ap.parse_args()
    device = torch.device("cuda")
    if args.decode:
        decode(args, device)
    else:
        train_step(args, device)


if __name__ == "__main__":
    main()
