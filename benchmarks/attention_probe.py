"""Packed-row attention at the training shape, one kernel family against another (GPU only).

The graphed 40-layer step spends ~19.5 ms a 2048-token micro-batch in FlexAttention (NOTES step 49), ~130 TFLOP/s
by the FLOPs of three ~680-token chats a row. This times, on the same q/k/v (token-major [T, H, D] as c_attn writes
them, 40 heads of 128), forward and forward+backward of:
  flex          FlexAttention with the model's document block mask, compiled as the model compiles it
  flex_tuned    the same compiled with mode="max-autotune-no-cudagraphs" (inductor picks the kernel configs)
  varlen        torch's built-in FlashAttention-2 over the chats (cumulative lengths), if this torch has it
  causal_row    SDPA over the whole row, causal, no document mask (three times the FLOPs: a reference only)
Each variant's output and gradients are compared with flex's (max abs difference).

  python3 benchmarks/attention_probe.py --docs 683 683 682 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_xa_probe import graphed_us  # noqa: E402  (benchmarks/ is the script's own directory)


def _flops(docs, heads, dim, backward):
    # causal: half of each chat's L x L scores, two matmuls (QK^T, PV) of 2 FLOPs a multiply-add
    f = sum(2 * 2 * d * d * heads * dim / 2 for d in docs)
    return f * (3.5 if backward else 1.0)  # backward ~2.5x the forward's matmuls


def _time(fn, iters):
    """ms a call, from replays of a CUDA graph holding `iters` calls: launched one by one, a compiled call's host
    time (~0.1 ms forward, ~1 ms forward and backward) would be what is timed, not the kernels."""
    return graphed_us(fn, calls=iters, reps=5) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, nargs="+", default=[683, 683, 682], help="chat lengths in one row")
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.manual_seed(0)
    dev = "cuda"
    T, H, D = sum(args.docs), args.heads, args.dim
    scale = D ** -0.5
    qkv = torch.randn(T, 3, H, D, device=dev, dtype=torch.bfloat16)
    grad_out = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
    doc = torch.cat([torch.full((n,), i, device=dev) for i, n in enumerate(args.docs)])[None]
    cu = torch.tensor([0] + list(torch.tensor(args.docs).cumsum(0).tolist()), device=dev, dtype=torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return ((q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])) | (q_idx == kv_idx)

    block_mask = create_block_mask(mask_mod, 1, None, T, T, device=dev, _compile=True)
    flex_default = torch.compile(flex_attention)
    flex_tuned = torch.compile(flex_attention, mode="max-autotune-no-cudagraphs")

    def leaf():
        return qkv.clone().requires_grad_(True)

    def heads_major(x):  # [T, 3, H, D] -> three [1, H, T, D] views, as the model passes them
        return [x[:, i].unsqueeze(0).transpose(1, 2) for i in range(3)]

    def run_flex(fn):
        def f(x):
            q, k, v = heads_major(x)
            return fn(q, k, v, block_mask=block_mask, scale=scale).transpose(1, 2)[0]
        return f

    def run_causal_row(x):
        q, k, v = heads_major(x)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)[0]

    variants = {"flex": run_flex(flex_default), "flex_tuned": run_flex(flex_tuned), "causal_row": run_causal_row}
    try:
        from torch.nn.attention.varlen import varlen_attn
        import inspect

        causal_kw = ({"is_causal": True} if "is_causal" in inspect.signature(varlen_attn).parameters
                     else {"window_size": (-1, 0)})

        def run_varlen(x):
            q, k, v = x[:, 0], x[:, 1], x[:, 2]
            return varlen_attn(q, k, v, cu, cu, max(args.docs), max(args.docs), scale=scale, **causal_kw)
        variants["varlen"] = run_varlen
    except Exception as e:  # noqa: BLE001 - the probe reports what this torch lacks
        print(f"varlen: not available ({type(e).__name__}: {e})")

    results = {"docs": args.docs, "heads": H, "dim": D, "torch": torch.__version__,
               "device": torch.cuda.get_device_name(), "variants": {}}
    ref_out = ref_grad = None
    for name, fn in variants.items():
        try:
            x = leaf()
            out = fn(x)
            (g,) = torch.autograd.grad(out, x, grad_out)
            with torch.no_grad():
                fwd = _time(lambda: fn(x), args.iters)
            both_ms = _time(lambda: torch.autograd.grad(fn(x), x, grad_out), args.iters)
        except Exception as e:  # noqa: BLE001
            print(f"{name}: failed ({type(e).__name__}: {str(e)[:300]})")
            results["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        entry = {"forward_ms": round(fwd, 4), "forward_backward_ms": round(both_ms, 4),
                 "forward_tflops": round(_flops(args.docs, H, D, False) / fwd / 1e9, 1),
                 "forward_backward_tflops": round(_flops(args.docs, H, D, True) / both_ms / 1e9, 1)}
        if ref_out is None:
            ref_out, ref_grad = out.detach(), g
        elif name != "causal_row":
            entry["max_abs_diff_out"] = float((out.detach().float() - ref_out.float()).abs().max())
            entry["max_abs_diff_grad"] = float((g.float() - ref_grad.float()).abs().max())
        results["variants"][name] = entry
        print(name, entry, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
