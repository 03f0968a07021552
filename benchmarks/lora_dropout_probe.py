"""lora_A(dropout(x)) at the 14B shapes: the fused kernels (SeededDropout.project) against the dropout kernel
and cuBLAS, forward and backward, timed through CUDA graphs (GPU only).

Per LoRA site a training step runs, unfused: forward the dropout kernel and x_d @ A.T; backward g @ A, the
dropout kernel on that gradient and g.T @ x_d. Fused: one kernel forward, one backward (plus the sum of its row
parts). Each tile config of --fwd-tiles / --bwd-tiles is timed.

  python3 benchmarks/lora_dropout_probe.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.training import seeded_dropout as sd  # noqa: E402

TILES = {  # BM, BK, num_warps, num_stages
    "32x64w4s3": (32, 64, 4, 3), "32x64w4s2": (32, 64, 4, 2), "16x128w4s3": (16, 128, 4, 3),
    "64x64w4s3": (64, 64, 4, 3), "32x128w4s3": (32, 128, 4, 3), "64x64w8s3": (64, 64, 8, 3),
    "32x32w4s3": (32, 32, 4, 3), "16x64w4s3": (16, 64, 4, 3),
}


def _graph_ms(fn, iters=20):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * iters) * 1000  # us


def _tile(name):
    bm, bk, w, s = TILES[name]
    return dict(BM=bm, BK=bk, num_warps=w, num_stages=s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--k", type=int, nargs="+", default=[5120, 13696])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--fwd-tiles", nargs="+", default=list(TILES), choices=list(TILES))
    ap.add_argument("--bwd-tiles", nargs="+", default=list(TILES), choices=list(TILES))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    p, salt, R = 0.05, 3, args.rank
    seed = torch.tensor([1], device="cuda", dtype=torch.int64)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rank": R, "p": p, "shapes": []}
    for M in args.rows:
        for K in args.k:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            a = (torch.randn(R, K, device="cuda") / K ** 0.5).bfloat16()
            g = torch.randn(M, R, device="cuda", dtype=torch.bfloat16)
            xd = sd.seeded_dropout_apply(x, seed, salt, p)

            def unfused_fwd():
                torch.mm(sd.seeded_dropout_apply(x, seed, salt, p), a.t())

            def unfused_bwd():
                sd.seeded_dropout_apply(torch.mm(g, a), seed, salt, p)
                torch.mm(g.t(), xd)

            row = {"rows": M, "k": K, "unfused_forward_us": round(_graph_ms(unfused_fwd), 2),
                   "unfused_backward_us": round(_graph_ms(unfused_bwd), 2), "fused_forward_us": {},
                   "fused_backward_us": {}}
            for name in args.fwd_tiles:
                sd._FWD_TILE = _tile(name)
                try:
                    row["fused_forward_us"][name] = round(_graph_ms(lambda: sd.dropout_xa(x, a, seed, salt, p)), 2)
                except Exception as e:  # noqa: BLE001 - a config the GPU refuses (shared memory) is reported
                    row["fused_forward_us"][name] = f"{type(e).__name__}: {str(e)[:120]}"
            for name in args.bwd_tiles:
                sd._BWD_TILE = _tile(name)
                try:
                    row["fused_backward_us"][name] = round(
                        _graph_ms(lambda: sd.dropout_xa_backward(x, a, g, seed, salt, p)), 2)
                except Exception as e:  # noqa: BLE001
                    row["fused_backward_us"][name] = f"{type(e).__name__}: {str(e)[:120]}"
            print(json.dumps(row), flush=True)
            results["shapes"].append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
