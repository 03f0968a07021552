"""An Int4 GEMM for many rows (prefill, training) that unpacks the GPTQ weights in its main loop, against today's
route (the whole weight dequantized to bf16 by ``triton_dequant``, then cuBLAS), for the Qwen-14B Linear shapes.

Why: every forward of more than 64 rows (a prefill, a prefill chunk, a training step's forward and recomputation)
and every input gradient dequantizes each weight to bf16 first: 0.5 byte read and 2 bytes written a weight, then 2
read again by the matmul. On the 14B model that is ~35 GB of traffic a forward besides the matmul's own, which NOTES
step 96 inferred as ~12 ms a prefill forward on an H100. A kernel that reads the packed words in its K loop never
writes the bf16 weight; what it pays instead is the unpacking, once per weight per CTA row block (BM rows).

Kernels (Triton; the weights as the dot's B operand, x as A, natural K order):
- forward y = x @ W.T: ``_fwd_kernel``. MODE 0: each weight (q - z) * s in fp32, rounded once to bf16 (the same
  numbers as the dequantized matmul's); MODE 1: the exact integers q - z in bf16, the dot's fp32 sums of one K block
  scaled once by the group's scales (as the decode kernels do). The K block lies inside one quantization group.
- input gradient dx = dy @ W: ``_bwd_kernel`` (the scale varies along the reduction there, so MODE 0 only).
Both take the packed words of a [BK, BN] tile by loading each word once per input it holds (the duplicates come from
L1), shifted by (k % 8) * 4; a grouped launch order keeps a few row blocks' x in L2 while the columns sweep.

    python benchmarks/int4_gemm_probe.py --out $OUT/int4_gemm_probe.json
    TRITON_INTERPRET=1 python benchmarks/int4_gemm_probe.py --check   # CPU: correctness of the kernels only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


@triton.jit
def _tile_order(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(row block, column block) of program ``pid``: GROUP_M row blocks sweep the columns together (L2 reuse)."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _fwd_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, y_ptr, M, N, K, stride_x, stride_y, stride_qz,
                ZERO_ADD: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, IEEE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_order(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_x + offs_k[None, :]
    qw_ptrs = qw_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :]
    shift = ((offs_k % 8) * 4)[:, None]
    zshift = (offs_n % 8) * 4
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        qw = tl.load(qw_ptrs, mask=mask_n[None, :], other=0)
        g = k0 // GROUP
        zw = tl.load(qz_ptr + g * stride_qz + offs_n // 8, mask=mask_n, other=0)
        z = ((zw >> zshift) & 0xF) + ZERO_ADD
        s = tl.load(sc_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        q = (qw >> shift) & 0xF
        if MODE == 0:
            w = ((q - z[None, :]).to(tl.float32) * s[None, :]).to(a.dtype)
            if IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        else:
            w = (q - z[None, :]).to(a.dtype)  # an exact integer in [-16, 15]
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee") * s[None, :]
            else:
                acc += tl.dot(a, w) * s[None, :]
        x_ptrs += BK
        qw_ptrs += (BK // 8) * N
    y_ptrs = y_ptr + offs_m[:, None] * stride_y + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _bwd_kernel(dy_ptr, qw_ptr, qz_ptr, sc_ptr, dx_ptr, M, N, K, stride_dy, stride_dx, stride_qz,
                ZERO_ADD: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr,
                BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """dx [M, K] = dy [M, N] @ W [N, K]: a [BM, BK] output tile, the reduction over N in BN steps."""
    pid_m, pid_k = _tile_order(tl.program_id(0), tl.cdiv(M, BM), K // BK, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_n = tl.arange(0, BN)
    mask_m = offs_m < M
    g = (pid_k * BK) // GROUP  # the tile's inputs lie in one group
    dy_ptrs = dy_ptr + offs_m[:, None] * stride_dy + offs_n[None, :]
    qw_ptrs = qw_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :]
    shift = ((offs_k % 8) * 4)[:, None]
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    for n0 in range(0, N, BN):
        cols = n0 + offs_n
        mask_n = cols < N
        a = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        qw = tl.load(qw_ptrs, mask=mask_n[None, :], other=0)
        zw = tl.load(qz_ptr + g * stride_qz + cols // 8, mask=mask_n, other=0)
        z = ((zw >> ((cols % 8) * 4)) & 0xF) + ZERO_ADD
        s = tl.load(sc_ptr + g * N + cols, mask=mask_n, other=0.0).to(tl.float32)
        q = (qw >> shift) & 0xF
        w = ((q - z[None, :]).to(tl.float32) * s[None, :]).to(a.dtype)  # [BK, BN]
        if IEEE:
            acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
        dy_ptrs += BN
        qw_ptrs += BN
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dx + offs_k[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None])


def int4_mm(x, qweight, qzeros, scales, zero_add=1, group_size=128, mode=0, bm=128, bn=128, bk=64, warps=8,
            stages=3, group_m=8):
    """x [M, K] @ W.T -> [M, N] in x's dtype, W the GPTQ layer (qweight [K/8, N], qzeros [K/g, N/8], scales)."""
    M, K = x.shape
    N = qweight.shape[1]
    assert K % bk == 0 and group_size % bk == 0 and x.stride(1) == 1
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _fwd_kernel[grid](x, qweight, qzeros, scales, y, M, N, K, x.stride(0), y.stride(0), qzeros.stride(0),
                      ZERO_ADD=zero_add, GROUP=group_size, MODE=mode, IEEE=x.dtype == torch.float32, BM=bm, BN=bn,
                      BK=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages)
    return y


def int4_mm_t(dy, qweight, qzeros, scales, zero_add=1, group_size=128, bm=128, bk=128, bn=64, warps=8, stages=3,
              group_m=8):
    """dy [M, N] @ W -> [M, K] in dy's dtype (the input gradient of ``int4_mm``)."""
    M, N = dy.shape
    K = qweight.shape[0] * 8
    assert K % bk == 0 and group_size % bk == 0 and dy.stride(1) == 1
    dx = torch.empty(M, K, device=dy.device, dtype=dy.dtype)
    grid = (triton.cdiv(M, bm) * (K // bk),)
    _bwd_kernel[grid](dy, qweight, qzeros, scales, dx, M, N, K, dy.stride(0), dx.stride(0), qzeros.stride(0),
                      ZERO_ADD=zero_add, GROUP=group_size, IEEE=dy.dtype == torch.float32, BM=bm, BK=bk, BN=bn,
                      GROUP_M=group_m, num_warps=warps, num_stages=stages)
    return dx


def check(device) -> int:
    """Both kernels against the exact fp32 dequantized product on small layers (runs under TRITON_INTERPRET=1)."""
    from decode_bench import random_layer

    from finetune.quant.packing import dequantize_t

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = 6e-3 if dtype == torch.bfloat16 else 1e-5
    bad = 0
    for K, N, M, tiles in [(256, 96, 40, (16, 32, 32)), (384, 64, 17, (32, 32, 64)), (256, 160, 70, (64, 64, 32))]:
        lay = random_layer(K, N, device, seed=K + N + M)
        w_t = dequantize_t(**lay, bits=4, dtype=torch.float32)  # [K, N]
        x = torch.randn(M, K, device=device).to(dtype)
        dy = torch.randn(M, N, device=device).to(dtype)
        bm, bn, bk = tiles
        for mode in (0, 1):
            y = int4_mm(x, lay["qweight"], lay["qzeros"], lay["scales"], mode=mode, bm=bm, bn=bn, bk=bk, warps=4,
                        stages=2, group_m=2)
            ref = x.float() @ w_t
            err = ((y.float() - ref).norm() / ref.norm()).item()
            bad += err > tol
            print(f"fwd mode {mode} K={K} N={N} M={M}: rel err {err:.2e} {'ok' if err <= tol else 'WRONG'}")
        dx = int4_mm_t(dy, lay["qweight"], lay["qzeros"], lay["scales"], bm=bm, bk=bk, bn=bn, warps=4, stages=2,
                       group_m=2)
        ref = dy.float() @ w_t.t()
        err = ((dx.float() - ref).norm() / ref.norm()).item()
        bad += err > tol
        print(f"bwd K={K} N={N} M={M}: rel err {err:.2e} {'ok' if err <= tol else 'WRONG'}")
    return 1 if bad else 0


def _time_ms(fn, reps=20) -> float:
    """Median of three CUDA-event timings of ``reps`` calls each, after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[1]


FWD_CONFIGS = [  # (mode, BM, BN, BK, warps, stages)
    (0, 128, 128, 64, 4, 4), (0, 128, 128, 64, 8, 3), (0, 128, 256, 64, 8, 3), (0, 256, 128, 64, 8, 3),
    (0, 128, 128, 128, 8, 3), (0, 64, 128, 128, 4, 4), (0, 64, 256, 64, 4, 4),
    (1, 128, 128, 128, 8, 3), (1, 128, 256, 64, 8, 3), (1, 256, 128, 64, 8, 3), (1, 64, 128, 128, 4, 4),
]
BWD_CONFIGS = [  # (BM, BK, BN, warps, stages)
    (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
    (64, 128, 64, 4, 4),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", type=int, default=[128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--check", action="store_true", help="correctness only, on small layers (CPU interpreter or GPU)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.check:
        return check(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    from decode_bench import GEMV_SHAPE_SETS, random_layer
    from provenance import git_commit

    from finetune.quant.triton_dequant import triton_dequantize_t

    device = torch.device("cuda")
    if check(device):
        return 1
    commit = git_commit() or "unknown"
    results = []
    t0 = time.time()
    for name, (K, N) in GEMV_SHAPE_SETS["14b"].items():
        lay = random_layer(K, N, device, seed=1)
        qw, qz, sc = lay["qweight"], lay["qzeros"], lay["scales"]
        w_t = triton_dequantize_t(qw, qz, sc, lay["g_idx"], 4, dtype=torch.bfloat16, group_size=128)
        for M in args.rows:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
            ref = x.float() @ w_t.float()
            ref_t = dy.float() @ w_t.float().t()
            flop = 2 * M * K * N
            row = dict(shape=name, K=K, N=N, M=M, commit=commit, device=torch.cuda.get_device_name(device))

            def dq():
                return triton_dequantize_t(qw, qz, sc, lay["g_idx"], 4, dtype=torch.bfloat16, group_size=128,
                                           trivial_g_idx=True)
            row["dequant_ms"] = _time_ms(dq)
            row["cublas_fwd_ms"] = _time_ms(lambda: x @ w_t)
            row["cublas_bwd_ms"] = _time_ms(lambda: dy @ w_t.t())
            row["today_fwd_ms"] = _time_ms(lambda: x @ dq())
            row["today_bwd_ms"] = _time_ms(lambda: dy @ dq().t())
            fwd, bwd = {}, {}
            for cfg in FWD_CONFIGS:
                mode, bm, bn, bk, warps, stages = cfg
                try:
                    def f(cfg=cfg):
                        return int4_mm(x, qw, qz, sc, mode=mode, bm=bm, bn=bn, bk=bk, warps=warps, stages=stages)
                    err = ((f().float() - ref).norm() / ref.norm()).item()
                    fwd[str(cfg)] = dict(ms=_time_ms(f), rel_err=err)
                except Exception as exc:  # out of shared memory or registers: not a candidate here
                    fwd[str(cfg)] = dict(error=str(exc).splitlines()[0][:160])
            for cfg in BWD_CONFIGS:
                bm, bk, bn, warps, stages = cfg
                try:
                    def b(cfg=cfg):
                        return int4_mm_t(dy, qw, qz, sc, bm=bm, bk=bk, bn=bn, warps=warps, stages=stages)
                    err = ((b().float() - ref_t).norm() / ref_t.norm()).item()
                    bwd[str(cfg)] = dict(ms=_time_ms(b), rel_err=err)
                except Exception as exc:
                    bwd[str(cfg)] = dict(error=str(exc).splitlines()[0][:160])
            row["fwd"], row["bwd"] = fwd, bwd
            good_f = {k: v["ms"] for k, v in fwd.items() if "ms" in v and v["rel_err"] < 6e-3}
            good_b = {k: v["ms"] for k, v in bwd.items() if "ms" in v and v["rel_err"] < 6e-3}
            bf = min(good_f, key=good_f.get) if good_f else None
            bb = min(good_b, key=good_b.get) if good_b else None
            row["best_fwd"], row["best_bwd"] = bf, bb
            results.append(row)
            tf = lambda ms: flop / ms / 1e9  # noqa: E731  TFLOP/s
            print(json.dumps(dict(
                shape=name, M=M, dequant_ms=round(row["dequant_ms"], 4),
                cublas_fwd_tflops=round(tf(row["cublas_fwd_ms"]), 1), today_fwd_ms=round(row["today_fwd_ms"], 4),
                fused_fwd_ms=round(good_f[bf], 4) if bf else None, best_fwd=bf,
                today_bwd_ms=round(row["today_bwd_ms"], 4), fused_bwd_ms=round(good_b[bb], 4) if bb else None,
                best_bwd=bb, t=round(time.time() - t0))), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
