"""Hopper's wgmma with the A operand in registers, on one warpgroup: settles the facts a wgmma Int4 GEMM would be
built on (benchmarks/NOTES.md, after step 28) before any kernel depends on them.

One CTA of 128 threads computes D [64 x N] = A [64 x 16] @ B.T, B [N x 16], bf16 in, fp32 out, with
``wgmma.mma_async.m64nNk16`` (N = 8, 16, 32, 64: the decode GEMM's rows). A is loaded into registers in the fragment
layout of ``mma.sync.m16n8k16``'s A, each warp taking 16 rows (the layout mma_gemm's warps already unpack their
weights into); B is staged in shared memory without swizzling, as 8 x 8 core matrices, and given by a descriptor.
What is probed, each a candidate checked against torch's product:

- whether the register-A layout is mma.sync's, warp by warp (if every candidate fails, it is not);
- which of the descriptor's two byte offsets steps along K between core matrices and which steps along N (the
  "leading" and "stride" offsets): B is placed with one stride and described with the fields both ways round;
- whether an offset that is not a multiple of 128 bytes works (wgmma_gemm.py pads its x stages so that the copies
  into them hit 32 banks);
- the accumulator layout: warp w holds rows 16 w + lane / 4 (+ 8), and columns 8 j + 2 (lane % 4) (+ 1) of each
  8-column block j, in that register order.

    python benchmarks/wgmma_probe.py --out $OUT/wgmma_probe.json   # GPU (sm_90), seconds
    python benchmarks/wgmma_probe.py --ptx-only --nvrtc /tmp/nvrtc/x/nvidia/cuda_nvrtc/lib/libnvrtc.so.12
      # no GPU: compiles every variant for sm_90a with NVRTC and assembles it with Triton's ptxas
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

ROWS = (8, 16, 32, 64)

_SOURCE = r"""
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

extern "C" __global__ void __launch_bounds__(128) wgmma_probe(
    const u16* __restrict__ A, const u16* __restrict__ B, float* __restrict__ D,
    int k_stride, int n_stride, int lbo, int sbo)
{
    // the largest placement reaches 2,062 bytes (N = 64); a descriptor read the wrong way round reaches ~7.4 KB, and a
    // read past the CTA's shared memory is an illegal address that ends the process, so the buffer covers both
    __shared__ __align__(1024) unsigned char sB[16384];
    const int tid = threadIdx.x;
    // B element (n, k) at core matrix (k / 8, n / 8), row n % 8 (16 bytes a row), column k % 8
    for (int i = tid; i < __N__ * 16; i += 128) {
        const int n = i / 16, k = i % 16;
        const int off = (k >> 3) * k_stride + (n >> 3) * n_stride + (n & 7) * 16 + (k & 7) * 2;
        *reinterpret_cast<u16*>(sB + off) = B[i];
    }
    __syncthreads();
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    const u32 addr = static_cast<u32>(__cvta_generic_to_shared(sB));
    const u64 desc = static_cast<u64>((addr >> 4) & 0x3FFF)
                   | (static_cast<u64>((lbo >> 4) & 0x3FFF) << 16)
                   | (static_cast<u64>((sbo >> 4) & 0x3FFF) << 32);
    // A: mma.sync m16n8k16's fragment, rows offset by 16 per warp
    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int r0 = 16 * warp + g, r1 = r0 + 8;
    u32 a[4];
    a[0] = A[r0 * 16 + 2 * t] | (static_cast<u32>(A[r0 * 16 + 2 * t + 1]) << 16);
    a[1] = A[r1 * 16 + 2 * t] | (static_cast<u32>(A[r1 * 16 + 2 * t + 1]) << 16);
    a[2] = A[r0 * 16 + 2 * t + 8] | (static_cast<u32>(A[r0 * 16 + 2 * t + 9]) << 16);
    a[3] = A[r1 * 16 + 2 * t + 8] | (static_cast<u32>(A[r1 * 16 + 2 * t + 9]) << 16);
    float d[__N__ / 2];
#pragma unroll
    for (int i = 0; i < __N__ / 2; ++i) d[i] = 0.0f;
    const int scale_d = 0;  // D = A B (the accumulator's zeros are not read)
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %__SCALE__, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n__N__k16.f32.bf16.bf16 {__DREGS__}, {__AREGS__}, %__DESC__, p, 1, 1, 0;\n}\n"
        : __DOUT__
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d));
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#pragma unroll
    for (int j = 0; j < __N__ / 8; ++j) {
        const int c = 8 * j + 2 * t;
        D[r0 * __N__ + c] = d[4 * j];
        D[r0 * __N__ + c + 1] = d[4 * j + 1];
        D[r1 * __N__ + c] = d[4 * j + 2];
        D[r1 * __N__ + c + 1] = d[4 * j + 3];
    }
}
"""


def kernel_source(n: int) -> str:
    """The probe's CUDA C for N = n (8, 16, 32 or 64)."""
    if n not in ROWS:
        raise ValueError(f"N {n}: one of {ROWS}")
    nd = n // 2
    return (_SOURCE.replace("__DREGS__", ",".join(f"%{i}" for i in range(nd)))
            .replace("__AREGS__", ",".join(f"%{nd + i}" for i in range(4)))
            .replace("__DESC__", str(nd + 4)).replace("__SCALE__", str(nd + 5))
            .replace("__DOUT__", ", ".join(f'"+f"(d[{i}])' for i in range(nd)))
            .replace("__N__", str(n)))


def candidates(n: int) -> list[dict]:
    """B's placements and descriptor fields: core matrices adjacent along K (128 bytes apart) and along N apart by
    the other stride, or the reverse, or (``padded``) as finetune/quant/wgmma_gemm.py places them: along N 128 bytes
    apart, the second core-matrix column along K 16 bytes past the first's end; each described with the K step as
    the leading offset and as the stride."""
    out = []
    blocks = max(n // 8, 1)
    for placement, (k_stride, n_stride) in (("k_adjacent", (128, 256)), ("n_adjacent", (128 * blocks, 128)),
                                            ("padded", (128 * blocks + 16, 128))):
        for k_is_leading in (True, False):
            lbo, sbo = (k_stride, n_stride) if k_is_leading else (n_stride, k_stride)
            out.append(dict(placement=placement, k_is_leading=k_is_leading, k_stride=k_stride, n_stride=n_stride,
                            lbo=lbo, sbo=sbo))
    return out


def run_one(device, n: int, start: int) -> None:
    """Candidates ``start``.. of N = ``n``, one JSON line each as it finishes (the child process of ``run``)."""
    kernel = torch.cuda._compile_kernel(kernel_source(n), "wgmma_probe", compute_capability="90a",
                                        nvcc_options=["-std=c++17"])
    g = torch.Generator(device="cpu").manual_seed(n)
    # small integers: every product and sum exact in fp32, so a right layout matches bit for bit
    A = torch.randint(-8, 8, (64, 16), generator=g).to(torch.bfloat16).to(device)
    B = torch.randint(-8, 8, (n, 16), generator=g).to(torch.bfloat16).to(device)
    ref = A.float() @ B.float().t()
    for i, cand in enumerate(candidates(n)):
        if i < start:
            continue
        D = torch.full((64, n), float("nan"), device=device)
        kernel(grid=(1, 1, 1), block=(128, 1, 1),
               args=[A.view(torch.int16), B.view(torch.int16), D, cand["k_stride"], cand["n_stride"],
                     cand["lbo"], cand["sbo"]])
        torch.cuda.synchronize(device)
        row = dict(N=n, index=i, **cand, exact=bool(torch.equal(D, ref)), wrong_elements=int((D != ref).sum().item()),
                   # which A rows came out right (all 64 when the register layout is right)
                   right_rows=int((D == ref).all(dim=1).sum().item()))
        print(json.dumps(row), flush=True)


def run() -> list[dict]:
    """Every candidate of every N, each N in a child process: a candidate that faults (an illegal address ends the
    CUDA context) is recorded as such and the child restarted after it."""
    import subprocess

    results = []
    for n in ROWS:
        cands, start = candidates(n), 0
        while start < len(cands):
            proc = subprocess.run([sys.executable, __file__, "--child", str(n), str(start)], capture_output=True,
                                  text=True, timeout=120)
            rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            for row in rows:
                print(json.dumps(row), flush=True)
            results += rows
            start += len(rows)
            if proc.returncode and start < len(cands):
                err = (proc.stderr.strip().splitlines() or ["no message"])[-1]
                row = dict(N=n, index=start, **cands[start], exact=False, fault=err[:300])
                print(json.dumps(row), flush=True)
                results.append(row)
                start += 1
    return results


def ptx_only(nvrtc: str | None) -> int:
    """Every N compiled for sm_90a and assembled (no GPU): the asm strings are valid PTX."""
    import ctypes
    import re
    import tempfile

    from mma_sass import assemble_ptx, compile_ptx, find_nvrtc

    lib_path = nvrtc or find_nvrtc()
    if not lib_path:
        print("no libnvrtc found: pass --nvrtc (pip download --no-deps nvidia-cuda-nvrtc-cu12, then unzip)")
        return 2
    lib = ctypes.CDLL(lib_path)
    with tempfile.TemporaryDirectory() as tmp:
        for n in ROWS:
            ptx = compile_ptx(lib, kernel_source(n), "90a")
            asm, _ = assemble_ptx(ptx, "90a", Path(tmp), f"n{n}")
            if asm.returncode:
                print(f"N={n}: ptxas failed: {asm.stderr.strip()[:1500]}")
                return 1
            regs = re.search(r"Used (\d+) registers", asm.stderr)
            print(f"N={n}: sm_90a PTX assembled, {regs.group(1) if regs else '?'} registers, "
                  f"{ptx.count('wgmma.mma_async')} wgmma")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ptx-only", action="store_true", help="compile and assemble for sm_90a only (no GPU)")
    ap.add_argument("--nvrtc", default=None, help="libnvrtc.so.12 for --ptx-only")
    ap.add_argument("--out")
    ap.add_argument("--child", nargs=2, type=int, metavar=("N", "START"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_one(torch.device("cuda"), *args.child)
        return 0
    if args.ptx_only:
        return ptx_only(args.nvrtc)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("wgmma_probe needs an sm_90 GPU (H100/H200)")
        return 2
    results = run()
    found = sorted({(r["placement"], r["k_is_leading"]) for r in results if r["exact"]})
    summary = dict(exact_layouts=[dict(placement=a, k_is_leading=b) for a, b in found],
                   all_rows_exact_somewhere=all(any(r["exact"] for r in results if r["N"] == n) for n in ROWS))
    print(json.dumps(summary))
    if args.out:
        from provenance import git_commit

        Path(args.out).write_text(json.dumps(dict(results=results, summary=summary, commit=git_commit() or "unknown",
                                                  device=torch.cuda.get_device_name()), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
