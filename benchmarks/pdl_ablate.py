"""Where the dependent launches' time goes (NOTES step 32): decode_bench.py with one part of finetune/quant/pdl.py
taken out, in this process. Diagnostic only: every variant computes the same result.

    python benchmarks/pdl_ablate.py VARIANT -- DECODE_BENCH_ARGS...

Variants: ``full`` (as built), ``plain`` (FINETUNE_PDL=0's launches and kernels), ``no_prefetch`` (dependent launches,
no L2 prefetch), ``prefetch_only`` (the prefetch and the wait in the kernels, plain launches: the wait is then a
no-op), ``no_release`` (the Triton kernels do not release the product after them early), ``prefetch_8k`` (each CTA
prefetches at most its first 8 KiB)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("full", "plain", "no_prefetch", "prefetch_only", "no_release", "prefetch_8k")


def apply(variant: str) -> None:
    from finetune.quant import pdl
    from finetune.settings import override

    if variant not in VARIANTS:
        raise SystemExit(f"pdl_ablate: unknown variant {variant!r} (one of {', '.join(VARIANTS)})")
    if variant == "plain":
        override(pdl=False).__enter__()
    elif variant == "no_prefetch":
        pdl.DEVICE = pdl.DEVICE.replace('asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p), '
                                        '"r"(bytes) : "memory");', "")
        assert "bulk.prefetch" not in pdl.DEVICE
    elif variant == "prefetch_8k":
        head = "__device__ __forceinline__ void pdl_prefetch_l2(const void* p, unsigned bytes) {"
        assert pdl.DEVICE.count(head) == 1
        pdl.DEVICE = pdl.DEVICE.replace(head, head + "\n  bytes = bytes < 8192u ? bytes : 8192u;")
    elif variant == "prefetch_only":
        plain_run = pdl.run
        pdl.run = lambda kernel, dependent, grid, block, args, shared_mem=0: plain_run(
            kernel, False, grid, block, args, shared_mem)
    elif variant == "no_release":
        from finetune.inference import decode_kernels

        decode_kernels._release = lambda device: False


def main() -> int:
    args = sys.argv[1:]
    variant, rest = args[0], args[2:] if args[1:2] == ["--"] else args[1:]
    apply(variant)
    import decode_bench

    print(f"pdl_ablate: variant {variant}", flush=True)
    return decode_bench.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
