"""A Triton Int4 GEMM for 9-64 rows with the operands swapped (out.T = W @ x.T), against today's tensor-core GEMM
(finetune/quant/mma_gemm.py), for the Qwen-14B Linear shapes.

Why this shape of kernel: NOTES steps 21-22 found the CUDA mma.sync GEMM bound inside the SM at 32-64 rows (the
unpacking, the shared-memory reads of x and the mma chains), and named Hopper's wgmma as the lever left. Triton
emits wgmma on sm_90 and can take wgmma's A operand from registers. With the weights as A ([BLOCK_N outputs x
BLOCK_K inputs], unpacked and zero-shifted in registers, never written to shared memory) and x.T as B ([BLOCK_K
x rows], staged in shared memory by Triton's pipeliner), every weight is unpacked once per CTA for all rows and the
rows ride in wgmma's N dimension (16-64). Numerics as the CUDA kernels: (q - zero) is an exact integer in bf16,
products are exact and summed in fp32, and each 128-input group's sum is scaled once by its fp16 scale in fp32.
Split-K through triton_gemv's own epilogue (``_store_splits``, its counters): each split writes fp32 partials, the
last program of a tile sums them in split order (deterministic) and resets its counter.

    python benchmarks/swap_gemm_probe.py --rows 16 32 64 --out $OUT/swap_gemm_probe.json
    TRITON_INTERPRET=1 python benchmarks/swap_gemm_probe.py --check   # CPU: correctness of the kernel only
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from finetune.quant.triton_gemv import _counters, _store_splits  # noqa: E402  (triton_gemv's split-K epilogue)


@triton.jit
def _swap_gemm_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_x, k_per_split, SPLIT,
                      ZERO_ADD: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr, ONE_SPLIT: tl.constexpr, DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    k8 = tl.arange(0, BLOCK_K // 8)
    shifts = tl.arange(0, 8) * 4
    zshift = (offs_n % 8) * 4
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    for k0 in range(k_start, k_end, BLOCK_K):
        # [BLOCK_N, BLOCK_K / 8] packed words (8 inputs each, lowest nibble first) -> [BLOCK_N, BLOCK_K]
        qw = tl.load(qw_ptr + (k0 // 8 + k8)[None, :] * N + offs_n[:, None])
        q = (qw[:, :, None] >> shifts[None, None, :]) & 0xF
        q = tl.reshape(q, [BLOCK_N, BLOCK_K])
        g = k0 // GROUP
        zw = tl.load(qz_ptr + g * (N // 8) + offs_n // 8)
        z = ((zw >> zshift) & 0xF) + ZERO_ADD
        s = tl.load(sc_ptr + g * N + offs_n).to(tl.float32)
        xt = tl.load(x_ptr + offs_m[None, :] * stride_x + (k0 + offs_k)[:, None], mask=mask_m[None, :], other=0.0)
        if DOT_F32:  # Triton's CPU interpreter converts integers to bf16 and multiplies bf16 wrongly
            acc += tl.dot((q - z[:, None]).to(tl.float32), xt.to(tl.float32), input_precision="ieee") * s[:, None]
        else:
            w = (q - z[:, None]).to(tl.bfloat16)  # an exact integer in [-16, 15]
            acc += tl.dot(w, xt) * s[:, None]
    _store_splits(tl.trans(acc), out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, mask_m, offs_n < N, M, N, pid_n, pid_s,
                  SPLIT, BLOCK_M, BLOCK_N, ONE_SPLIT)


def swap_gemm(x, qweight, qzeros, scales, zero_add=1, group_size=128, block_n=128, block_k=128, warps=4, stages=3,
              per_sm=2, sms=132):
    """x [M, K] bf16 @ W.T -> [M, N] bf16, W the GPTQ layer (qweight [K/8, N], qzeros [K/g, N/8], fp16 scales)."""
    M, K = x.shape
    N = qweight.shape[1]
    block_m = max(16, triton.next_power_of_2(M))
    tiles = triton.cdiv(N, block_n)
    k_blocks = K // block_k
    split = max(1, min(k_blocks, triton.cdiv(per_sm * sms, tiles)))
    k_per_split = triton.cdiv(k_blocks, split) * block_k
    split = triton.cdiv(K, k_per_split)
    out = torch.empty(M, N, device=x.device, dtype=torch.bfloat16)
    ws = torch.empty(split * M * N, device=x.device, dtype=torch.float32) if split > 1 else out
    cnt = _counters(x.device, tiles)
    _swap_gemm_kernel[(tiles, split)](x, qweight, qzeros, scales, out, ws, cnt, M, N, K, x.stride(0), k_per_split,
                                      split, ZERO_ADD=zero_add, GROUP=group_size, BLOCK_N=block_n, BLOCK_M=block_m,
                                      BLOCK_K=block_k, ONE_SPLIT=split == 1,
                                      DOT_F32=x.device.type != "cuda", num_warps=warps, num_stages=stages)
    return out


def check(device) -> int:
    """The kernel against the exact fp32 dequantized product on small layers (runs under TRITON_INTERPRET=1)."""
    from decode_bench import random_layer

    from finetune.quant.packing import dequantize_t

    bad = 0
    cases = [(256, 64, 3, 64, 1), (512, 128, 17, 64, 4), (384, 256, 64, 128, 3), (256, 128, 9, 128, 2)]
    for K, N, M, bn, per_sm in cases:
        lay = random_layer(K, N, device, seed=K + N)
        x = torch.randn(M, K, device=device).to(torch.bfloat16)
        ref = x.float() @ dequantize_t(**lay, bits=4, dtype=torch.float32)
        y = swap_gemm(x, lay["qweight"], lay["qzeros"], lay["scales"], block_n=bn, block_k=128, per_sm=per_sm, sms=4)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        again = torch.equal(y, swap_gemm(x, lay["qweight"], lay["qzeros"], lay["scales"], block_n=bn, block_k=128,
                                         per_sm=per_sm, sms=4))
        ok = err < 4e-3 and again
        bad += not ok
        print(f"K={K} N={N} M={M} block_n={bn}: rel err {err:.2e}, repeat {again}: {'ok' if ok else 'WRONG'}")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", type=int, default=[16, 32, 64])
    ap.add_argument("--block-n", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--stages", nargs="+", type=int, default=[3, 4])
    ap.add_argument("--per-sm", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--check", action="store_true", help="correctness only, on small layers (CPU interpreter or GPU)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.check:
        return check(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    from decode_bench import GEMV_SHAPE_SETS, copy_bandwidth, layer_copies
    from mma_gemv_probe import repacked, time_candidate
    from provenance import git_commit

    from finetune.quant import mma_gemm as MG
    from finetune.quant.packing import dequantize_t

    device = torch.device("cuda")
    if check(device):
        return 1
    copy_bps, _ = copy_bandwidth(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    commit = git_commit() or "unknown"
    results, best = [], {}
    for name, (K, N) in GEMV_SHAPE_SETS["14b"].items():
        weight_bytes, layers = layer_copies(K, N, device)
        packed = repacked(layers)
        exact = dequantize_t(**layers[0], bits=4, dtype=torch.float32)
        for M in args.rows:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            ref = x.float() @ exact

            def gemm(x, pk):
                return MG.mma_gemm(x, pk["wpack"], pk["scales"], pk["qzeros"], pk["zero_add"], 128, pk["perm"])
            row = time_candidate(results, name, K, N, M, "mma_gemm (today)", gemm, packed, x, ref, weight_bytes,
                                 copy_bps, commit, width=34)
            if row:
                best.setdefault((M, "mma_gemm"), {})[name] = row["us"]
            for bn, warps, stages, per_sm in itertools.product(args.block_n, args.warps, args.stages, args.per_sm):
                def fn(x, lay, bn=bn, warps=warps, stages=stages, per_sm=per_sm):
                    return swap_gemm(x, lay["qweight"], lay["qzeros"], lay["scales"], block_n=bn, warps=warps,
                                     stages=stages, per_sm=per_sm, sms=sms)
                label = f"swap bn{bn} w{warps} s{stages} sm{per_sm}"
                row = time_candidate(results, name, K, N, M, label, fn, layers, x, ref, weight_bytes, copy_bps,
                                     commit, width=34)
                if row and row["rel_err"] < 4e-3 and row["repeat"]:
                    cur = best.setdefault((M, "swap"), {})
                    if name not in cur or row["us"] < cur[name]:
                        cur[name] = row["us"]
    per_layer = {"c_attn": 1, "attn.c_proj": 1, "w1/w2": 2, "mlp.c_proj": 1}
    summary = []
    for (M, kind), shapes in sorted(best.items()):
        if len(shapes) == len(per_layer):
            us = sum(shapes[s] * n for s, n in per_layer.items())
            summary.append(dict(rows=M, kernel=kind, layer_us=us, per_shape=shapes))
            print(f"rows={M:<3d} {kind:9s} one decoder layer {us:7.1f} us  {shapes}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(results=results, summary=summary), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
