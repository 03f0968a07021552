"""Profile one Q-LoRA training step of the Qwen-14B-shaped Int4 model (fewer layers) on the GPU: where the
time goes (GPU kernels by total time, host time, GPU idle share). For benchmarks/NOTES.md."""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import QWEN14B, build, step_fn  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ckpt", action="store_true")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    device = torch.device("cuda")
    model, config = build(QWEN14B, device, layers=args.layers)
    model.train()
    if args.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    step = step_fn(model, opt, device)
    ids = torch.randint(0, config.vocab_size, (1, args.seq), device=device)
    batch = {"input_ids": ids, "labels": ids}
    for _ in range(3):
        step(batch)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        step(batch)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(batch)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    kern = sorted([e for e in ka if e.self_device_time_total > 0], key=lambda e: -e.self_device_time_total)
    total_gpu = sum(e.self_device_time_total for e in kern)
    print(f"seq {args.seq} layers {args.layers} ckpt {args.ckpt}: wall {wall*1e3:.1f} ms/step, "
          f"GPU kernels {total_gpu/1e3:.1f} ms ({total_gpu/1e3/(wall*1e3):.0%} busy)")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
