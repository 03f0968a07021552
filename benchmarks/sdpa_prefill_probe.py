"""Which SDPA kernel a multi-prompt prefill's attention takes, and what it allocates: q [n, heads, T, D] as the
engine's prefill_rotary_to_cache gives it (a transpose of [n, T, heads, D]), keys and values as views of a
[slots, heads, capacity, D] cache, causal, under the engine's inference_sdpa backends. For each (n, T, capacity):
the peak memory of one call, and PyTorch's reasons against flash and memory-efficient attention (NOTES step 89).

    python benchmarks/sdpa_prefill_probe.py --out $OUT/sdpa_prefill_probe.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import warnings
from contextlib import redirect_stderr
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.modeling.attention import inference_sdpa  # noqa: E402


def reasons(check, q, k, v) -> str:
    """PyTorch's debug warnings of a can_use_* check (empty: the kernel can run)."""
    try:
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, True, False)
    except TypeError:
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, True)
    buf = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, redirect_stderr(buf):
        warnings.simplefilter("always")
        ok = check(params, True)
    text = " | ".join(str(w.message) for w in caught) + buf.getvalue()
    return "ok" if ok else " ".join(text.split())[:400]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["8,1000,1024", "16,500,512", "1,8000,8192", "8,1024,1024",
                                                        "8,1000,1280", "4,1000,1024", "8,700,768", "2,1000,1024"])
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev, H, D = torch.device("cuda"), args.heads, args.head_dim
    rows = []
    for shape in args.shapes:
        n, T, cap = map(int, shape.split(","))
        q = torch.randn(n, T, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        cache_k = torch.randn(n, H, cap, D, device=dev, dtype=torch.bfloat16)
        cache_v = torch.randn_like(cache_k)
        k, v = cache_k[:, :, :T], cache_v[:, :, :T]
        row = dict(shape=shape, q_strides=list(q.stride()), k_strides=list(k.stride()),
                   flash=reasons(torch.backends.cuda.can_use_flash_attention, q, k, v),
                   efficient=reasons(torch.backends.cuda.can_use_efficient_attention, q, k, v))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad(), inference_sdpa(dev):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.cuda.synchronize()
        row["peak_mib"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del q, cache_k, cache_v, k, v
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
