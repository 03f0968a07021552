"""How fast the engine's h = x A can be at one decode row (issue 16's unmerged-adapter cost): cuBLAS through
torch.matmul on A_all [K, R] (what row_adapters.py runs; on the H200 a split-K GEMM plus a reduce kernel), F.linear
on A [R, K], and w1/w2's two products as one matmul over their concatenated A's. Each timed as 200 calls inside one
CUDA graph (launch gaps included, as in the engine's step). For benchmarks/NOTES.md.

    python benchmarks/lora_xa_probe.py --out $OUT/lora_xa.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F


def graphed_us(fn, calls: int = 200, reps: int = 20) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps / calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("lora_xa_probe.py needs a CUDA GPU")
        return 2
    dev, dt, R = "cuda", torch.bfloat16, args.rank
    rows = []
    for K in (5120, 13696):  # the 14B model's Linear inputs (c_attn, attn.c_proj, w1, w2: 5120; mlp.c_proj: 13696)
        x = torch.randn(1, 1, K, device=dev, dtype=dt)
        a_all = torch.randn(K, R, device=dev, dtype=dt) * 0.01  # [in, R], as row_adapters stacks it
        a = a_all.t().contiguous()  # [R, in]
        both = torch.cat([a_all, a_all], 1).contiguous()  # w1 and w2 share x
        r = dict(K=K, R=R)
        r["matmul_x_A_all_us"] = graphed_us(lambda: torch.matmul(x, a_all))
        r["linear_x_A_us"] = graphed_us(lambda: F.linear(x, a))
        r["matmul_2d_us"] = graphed_us(lambda: torch.mm(x.view(1, K), a_all))
        r["matmul_two_adapters_side_by_side_us"] = graphed_us(lambda: torch.matmul(x, both))
        rows.append(r)
        print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), results=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
