"""What a prompt of a length not seen before costs over one seen before (NOTES step 60): session 27's trace showed
single-prompt prefills of 80-150 ms where a repeated length takes 29-50 ms. Parts timed at fresh lengths (each
length used once, then again): causal SDPA under each backend, the int4 Linears' dequantize + matmul shape, and the
engine's whole prefill with SDPA's default choice against flash only.

    python benchmarks/new_length_probe.py --model-dir /tmp/m --out $OUT/new_length_probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import git_commit  # noqa: E402

BACKENDS = {"default": None, "flash": [SDPBackend.FLASH_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION]}


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def sdpa_first_use(lengths, heads=40, dim=128):
    """ms of the first and second causal SDPA call at each fresh length, per backend (one layer's shape)."""
    out = {}
    for index, (name, backends) in enumerate(BACKENDS.items()):
        rows = []
        for T in (T + 2 * index for T in lengths):  # fresh lengths for each backend
            q = torch.randn(1, heads, T, dim, device="cuda", dtype=torch.bfloat16)

            def call():
                if backends is None:
                    F.scaled_dot_product_attention(q, q, q, is_causal=True)
                else:
                    with sdpa_kernel(backends):
                        F.scaled_dot_product_attention(q, q, q, is_causal=True)
            try:
                rows.append(dict(T=T, first_ms=round(timed(call), 3), second_ms=round(timed(call), 3)))
            except RuntimeError as e:
                rows.append(dict(T=T, error=str(e).splitlines()[0][:200]))
                break
        out[name] = rows
    return out


def matmul_first_use(lengths):
    w = torch.randn(5120, 15360, device="cuda", dtype=torch.bfloat16)
    rows = []
    for T in lengths:
        x = torch.randn(T, 5120, device="cuda", dtype=torch.bfloat16)
        rows.append(dict(T=T, first_ms=round(timed(lambda: x @ w), 3), second_ms=round(timed(lambda: x @ w), 3)))
    return rows


def engine_prefills(model_dir, lengths):
    """The engine's prefill at fresh lengths (first and second call), as built (SDPA without cuDNN in inference)
    and with SDPA's own choice (``Settings.sdpa_flash`` off), in one process."""
    from decode_bench import load, prompt_ids
    from prefill_profile import prefill_once

    from finetune.inference import Engine
    from finetune.settings import override

    model, tok = load(model_dir, torch.device("cuda"))
    engine = Engine(model, tok, max_batch=8, max_len=4096)
    engine.warm_up()
    engine.step()  # reads the warm-up's last step, which is still in flight
    prefill_once(engine, prompt_ids(2000, 2000, engine.vocab))  # the cache at its size for every length below
    out = {}
    for offset, (name, flash) in enumerate((("no_cudnn", True), ("sdpa_default", False))):
        rows = []
        with override(sdpa_flash=flash):
            for T in lengths:
                ids = prompt_ids(T + offset, T, engine.vocab)  # fresh for each pass
                first, second = prefill_once(engine, ids), prefill_once(engine, ids)
                rows.append(dict(T=T + offset, first_ms=round(first * 1e3, 2), second_ms=round(second * 1e3, 2)))
                print(json.dumps(dict(pass_=name, **rows[-1])), flush=True)
        out[name] = rows
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    info = dict(torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
                cudnn_sdp_enabled=torch.backends.cuda.cudnn_sdp_enabled(),
                flash_sdp_enabled=torch.backends.cuda.flash_sdp_enabled())
    order = getattr(torch._C, "_get_sdp_priority_order", None)
    if order is not None:
        info["sdp_priority_order"] = [str(b) for b in order()]
    print(json.dumps(info), flush=True)
    result = dict(command=" ".join(sys.argv), commit=git_commit(), device=torch.cuda.get_device_name(), info=info)
    result["sdpa"] = sdpa_first_use([301, 457, 613, 777, 919, 1301])
    for name, rows in result["sdpa"].items():
        print(name, json.dumps(rows), flush=True)
    result["matmul"] = matmul_first_use([303, 459, 615, 779, 921])
    print("matmul", json.dumps(result["matmul"]), flush=True)
    if args.model_dir:
        result["engine"] = engine_prefills(args.model_dir, [305, 461, 617, 781, 923, 1307])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
