"""What a decode step's graph capture at a new key length costs, and where (NOTES step 64): session 28's serving
traces showed captures of 1-2 rows over SDPA taking 640-820 ms where others took ~110-190 ms. Two parts, in one
process whose SDPA keeps its own backend choice or (--no-cudnn) has cuDNN attention switched off:
- the decode step's masked one-query SDPA (one layer's 14B shape, an additive mask as the fused step builds it),
  first and second call at each new (rows, key length);
- the engine: after warm_up, one row decoded across key-length buckets (each bucket's first step is a capture,
  timed by engine_stalls' timers), then b1_512's decode rate (24-token prompt, 512 new tokens) once graphs exist.

    python benchmarks/capture_probe.py --model-dir /tmp/m --out $OUT/capture_probe.json [--no-cudnn]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode_bench import load, prompt_ids  # noqa: E402
from engine_stalls import timed_methods  # noqa: E402
from provenance import git_commit  # noqa: E402

from finetune.inference import Engine, SamplingParams  # noqa: E402


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) * 1e3, 3)


def one_query_sdpa(rows_list, lengths, heads=40, dim=128):
    """ms of the first and second masked one-query SDPA call at each fresh (rows, key length)."""
    out = []
    for rows in rows_list:
        for kv in lengths:
            q = torch.randn(rows, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(rows, heads, kv, dim, device="cuda", dtype=torch.bfloat16)
            mask = torch.zeros(rows, 1, 1, kv, device="cuda", dtype=torch.bfloat16)
            mask[:, :, :, kv - 7:] = float("-inf")

            def call():
                F.scaled_dot_product_attention(q, k, k, attn_mask=mask, scale=dim ** -0.5)
            out.append(dict(rows=rows, kv_len=kv, first_ms=timed(call), second_ms=timed(call)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--no-cudnn", action="store_true", help="cuDNN attention off for the whole process")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.no_cudnn:
        torch.backends.cuda.enable_cudnn_sdp(False)
    device = torch.device("cuda")
    model, tok = load(args.model_dir, device)
    engine = Engine(model, tok, max_batch=4, max_len=4096)
    log: list = []
    timed_methods(engine, log)
    warm_up_s = round(engine.warm_up(), 2)
    log.clear()
    # one row across the key-length buckets: a prompt whose reply crosses from one bucket into the next
    captures = []
    for n in (300, 560, 820, 1080, 1340, 1860):
        log.clear()
        engine.generate([prompt_ids(n, n, engine.vocab)], SamplingParams(max_new_tokens=8, min_new_tokens=8))
        captures += [dict(prompt=n, **e) for e in log if e["kind"] == "capture"]
    sdpa = one_query_sdpa((1, 2, 8, 32), (640, 896, 1152, 1664))
    prompt = prompt_ids(24, 1, engine.vocab)
    params = SamplingParams(max_new_tokens=512, min_new_tokens=512)
    log.clear()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.generate([prompt], params)  # the graphs of 256-768 keys (warm_up held 256): what a chat reply meets
    torch.cuda.synchronize()
    first_reply_s = round(time.perf_counter() - t0, 3)
    reply_captures = [e for e in log if e["kind"] == "capture"]
    t0 = time.perf_counter()
    engine.generate([prompt], params)
    torch.cuda.synchronize()
    second_reply_s = round(time.perf_counter() - t0, 3)
    out = dict(command=" ".join(sys.argv), commit=git_commit(), device=torch.cuda.get_device_name(device),
               no_cudnn=args.no_cudnn, warm_up_s=warm_up_s, captures_one_row=captures, one_query_sdpa=sdpa,
               b1_512=dict(first_reply_s=first_reply_s, first_reply_captures=reply_captures,
                           second_reply_s=second_reply_s, second_tok_s=round(512 / second_reply_s, 1)))
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(dict(no_cudnn=args.no_cudnn, warm_up_s=warm_up_s,
                          captures=[(c["rows"], c["kv_len"], c["ms"]) for c in captures],
                          sdpa=[(s["rows"], s["kv_len"], s["first_ms"], s["second_ms"]) for s in sdpa],
                          b1_512=out["b1_512"] | {"first_reply_captures": [(c["kv_len"], c["ms"]) for c in reply_captures]})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
