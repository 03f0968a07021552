"""The decode step's attention alone, as the engine's graphs run it (GPU only): decode_kernels.decode_attention over
each row's own keys against SDPA over the step's key bucket with an additive mask (FINETUNE_DECODE_ATTENTION=0's
path), at the workloads' shapes, and the kernel at the grid of the exact key length against the grid of the
engine's covering_length (a graph captured there replays for every shorter step).

Each case: 40 heads of 128, bf16, rows at the positions the case names; the calls cycle through LAYERS layers' caches
(as a step does, so one layer's keys are not read from L2 again), timed from replays of a CUDA graph of many calls.
Reports us a layer and the KV bytes read a second. ``--variant NAME=FILE``: also time the decode_attention of
another copy of decode_kernels.py (``git show REV:finetune/inference/decode_kernels.py > FILE``), on the same
inputs, with its own default cut of the keys.

    python3 benchmarks/decode_attention_probe.py --out $OUT/attn_probe.json [--variant step67=/tmp/dk67.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lora_xa_probe import graphed_us  # noqa: E402
from provenance import git_commit  # noqa: E402

from finetune.inference import decode_kernels  # noqa: E402
from finetune.inference.fused_decode import additive_mask  # noqa: E402
from finetune.modeling.attention import inference_sdpa  # noqa: E402

HEADS, D, LAYERS = 40, 128, 8
# (name, rows' key counts): b1_512's and b1_ctx2000's last steps, and batches like serving's and b64_mixed's late steps
CASES = {
    "b1_n536": [536],
    "b1_n2000": [2000],
    "b1_n2256": [2256],
    "b8_n500-756": list(range(500, 757, 32))[:8],
    "b32_n600-1156": [600 + 18 * i for i in range(32)],
    "b64_n306-1256": [306 + 15 * i for i in range(64)],
}


def load_variant(spec: str):
    name, path = spec.split("=", 1)
    module_spec = importlib.util.spec_from_file_location(f"decode_kernels_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return name, module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--variant", action="append", default=[], help="NAME=FILE: another decode_kernels.py")
    ap.add_argument("--splits", type=int, nargs="*", default=[], help="also the kernel with these key splits")
    ap.add_argument("--calls", type=int, default=160, help="calls in the timed graph (cycling through the layers)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_attention_probe.py needs a CUDA device", file=sys.stderr)
        return 2
    variants = [load_variant(v) for v in args.variant]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    results = []
    for case in args.cases:
        keys = CASES[case]
        b, need = len(keys), max(keys)
        exact = -(-need // 256) * 256
        covering = decode_kernels.covering_length(b, HEADS, need)
        cap = max(exact, covering)
        k_cache = torch.randn(LAYERS, b, HEADS, cap, D, device=dev, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(b, HEADS, 1, D, device=dev, dtype=torch.bfloat16)
        pos = torch.tensor([n - 1 for n in keys], device=dev)
        scale = D ** -0.5
        layer = [0]

        def next_layer():
            layer[0] = (layer[0] + 1) % LAYERS
            return layer[0]

        def own(kv_len, fn=decode_kernels.decode_attention, *split):
            def call():
                i = next_layer()
                return fn(q, k_cache[i], v_cache[i], pos, scale, kv_len, *split)
            return call

        mask = additive_mask(torch.arange(cap, device=dev), pos, exact, torch.bfloat16)

        def sdpa():
            i = next_layer()
            with inference_sdpa(dev):
                return F.scaled_dot_product_attention(q, k_cache[i, :, :, :exact], v_cache[i, :, :, :exact],
                                                      attn_mask=mask, scale=scale)

        layer[0] = LAYERS - 1
        ref = sdpa().transpose(1, 2).reshape(b, 1, HEADS * D).float()
        timed = {"own_exact": own(exact), "own_covering": own(covering), "sdpa_bucket": sdpa}
        timed.update({f"own_split{s}_covering": own(covering, decode_kernels.decode_attention, s) for s in args.splits})
        for name, module in variants:  # (a copy from before covering_length ran at the exact grid only)
            timed.update({f"{name}_exact": own(exact, module.decode_attention),
                          f"{name}_covering": own(covering, module.decode_attention)})
        read = sum(keys) * HEADS * D * 2 * 2  # K and V, bf16
        row = dict(case=case, rows=b, keys_max=need, exact_kv_len=exact, covering_kv_len=covering,
                   split_exact=decode_kernels.key_split(b, HEADS, exact),
                   split_covering=decode_kernels.key_split(b, HEADS, covering), kv_mb_a_layer=round(read / 1e6, 1))
        for name, fn in timed.items():
            layer[0] = LAYERS - 1  # the next call reads layer 0, as ref did
            out = fn()
            if name != "sdpa_bucket":
                row[f"{name}_max_abs_diff"] = round((out.float() - ref).abs().max().item(), 5)
            us = graphed_us(fn, calls=args.calls, reps=10)
            row[f"{name}_us"] = round(us, 2)
            row[f"{name}_tb_s"] = round(read / us / 1e6, 2)
        print(json.dumps(row), flush=True)
        results.append(row)
        timed.clear()
        torch.cuda.empty_cache()
    report = dict(results=results, device=torch.cuda.get_device_name(), torch=torch.__version__,
                  commit=git_commit(), variants=args.variant)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
