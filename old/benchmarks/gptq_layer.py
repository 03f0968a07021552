"""GPTQ layer benchmark on the GPU (issue 4): Qwen-14B Linear shapes at 2048 tokens in bf16.

For each shape: forward+backward time of GPTQLinear (Int4, group 128; backward = grad wrt the input, as
in Q-LoRA) against a plain bf16 nn.Linear of the same shape, frozen (the fair Q-LoRA baseline: forward +
grad_input) and trainable (also grad_weight); and the dequantize kernel's bandwidth (bytes read: packed
qweight, qzeros, scales, g_idx; written: W.T in bf16) against the GPU's copy bandwidth (a bf16 tensor of
W's size copied, counting bytes read and written).

Decode GEMV section (batch-1 generation): for the same shapes at M = 1 and 4 rows, the fused GEMV
(``triton_gemv.py``: reads the packed buffers, writes no float weight) against the dequantize + matmul path,
kernel time and GPTQLinear.forward under no_grad with the GEMV on and off (FINETUNE_GPTQ_GEMV=0), and the
GEMV's effective bandwidth: packed bytes read (qweight, qzeros, scales; g_idx is not read for the plain
group order) plus x and y, per second; the copy bandwidth of a qweight-sized buffer is the reference.

Usage: python benchmarks/gptq_layer.py [--tokens 2048] [--out benchmarks/results/gptq_layer.json] [--model]
       [--gemv]
(--model also builds the random 14B Int4 model directly on the GPU and reports its memory; --gemv runs only
the decode GEMV section and merges it into an existing --out file. The default run includes the GEMV
section.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [  # (name, in_features, out_features)
    ("attn.c_attn", 5120, 15360),
    ("attn.c_proj", 5120, 5120),
    ("mlp.w1 / mlp.w2", 5120, 13696),
    ("mlp.c_proj", 13696, 5120),
]


def bench(fn, warmup=10, rep=50) -> float:
    """Median milliseconds (triton.testing.do_bench, which flushes L2 between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def random_layer(in_f, out_f, device, bits=4, group_size=128, seed=0):
    from finetune.quant import GPTQLinear
    from finetune.quant.packing import default_g_idx

    g = torch.Generator(device=device).manual_seed(seed)
    per = 32 // bits
    groups = in_f // group_size
    qweight = torch.randint(-(2**31), 2**31 - 1, (in_f // per, out_f), generator=g, device=device, dtype=torch.int32)
    qzeros = torch.full((groups, out_f // per), 0x77777777, device=device, dtype=torch.int32)
    scales = (torch.rand(groups, out_f, generator=g, device=device) * 0.004 + 0.001).to(torch.float16)
    g_idx = default_g_idx(in_f, group_size, device=device)
    return GPTQLinear.from_quantized(qweight, qzeros, scales, g_idx, bits=bits, group_size=group_size)


def run_shape(name, in_f, out_f, tokens, device):
    from finetune.quant.triton_dequant import triton_dequantize_t

    dtype = torch.bfloat16
    layer = random_layer(in_f, out_f, device)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(tokens, out_f, device=device, dtype=dtype)

    def gptq_fwd_bwd():
        y = layer(x)
        y.backward(gy)

    frozen = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype).requires_grad_(False)
    trainable = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)

    def linear_fwd_bwd(lin):
        def f():
            y = lin(x)
            y.backward(gy)

        return f

    def gptq_fwd():
        with torch.no_grad():
            layer(x)

    def linear_fwd():
        with torch.no_grad():
            frozen(x)

    host_gptq = host_us(gptq_fwd_bwd)
    host_lin = host_us(linear_fwd_bwd(frozen))
    t_gptq = bench(gptq_fwd_bwd)
    t_frozen = bench(linear_fwd_bwd(frozen))
    t_train = bench(linear_fwd_bwd(trainable))
    t_gptq_f = bench(gptq_fwd)
    t_lin_f = bench(linear_fwd)

    out = torch.empty(in_f, out_f, device=device, dtype=dtype)

    def deq():
        triton_dequantize_t(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, dtype=dtype, out=out,
                            group_size=128)

    t_deq = bench(deq, rep=100)
    bytes_deq = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales, layer.g_idx))
    bytes_deq += out.numel() * out.element_size()
    src = torch.empty_like(out)
    t_copy = bench(lambda: out.copy_(src), rep=100)
    bytes_copy = 2 * out.numel() * out.element_size()
    flops = 2 * tokens * in_f * out_f
    return {
        "name": name,
        "in_features": in_f,
        "out_features": out_f,
        "tokens": tokens,
        "gptq_fwd_bwd_ms": t_gptq,
        "linear_frozen_fwd_bwd_ms": t_frozen,
        "linear_trainable_fwd_bwd_ms": t_train,
        "ratio_vs_frozen": t_gptq / t_frozen,
        "ratio_vs_trainable": t_gptq / t_train,
        "gptq_fwd_ms": t_gptq_f,
        "host_us_gptq_fwd_bwd": host_gptq,
        "host_us_linear_fwd_bwd": host_lin,
        "linear_fwd_ms": t_lin_f,
        "matmul_tflops_linear_fwd": flops / (t_lin_f * 1e-3) / 1e12,
        "dequant_ms": t_deq,
        "dequant_TBps": bytes_deq / (t_deq * 1e-3) / 1e12,
        "copy_TBps": bytes_copy / (t_copy * 1e-3) / 1e12,
        "dequant_vs_copy_bw": (bytes_deq / t_deq) / (bytes_copy / t_copy),
    }


GEMV_ROWS = (1, 4)


def run_gemv_shape(name, in_f, out_f, rows, device):
    """Decode GEMV vs dequantize + matmul for one shape and row count (bf16, Int4, group 128)."""
    from finetune.quant.triton_dequant import triton_dequantize_t
    from finetune.quant.triton_gemv import _BEST, row_bucket, triton_gemv

    dtype = torch.bfloat16
    layer = random_layer(in_f, out_f, device)
    x = torch.randn(rows, in_f, device=device, dtype=dtype)
    bufs = (layer.qweight, layer.qzeros, layer.scales, layer.g_idx)

    def gemv():
        triton_gemv(x, *bufs, 4, group_size=128, trivial_g_idx=True)

    wt = torch.empty(in_f, out_f, device=device, dtype=dtype)

    def dequant_matmul():
        triton_dequantize_t(*bufs, 4, dtype=dtype, out=wt, group_size=128, trivial_g_idx=True)
        torch.matmul(x, wt)

    gemv()  # tune + compile once
    y = triton_gemv(x, *bufs, 4, group_size=128, trivial_g_idx=True)
    ref = x @ triton_dequantize_t(*bufs, 4, dtype=dtype, group_size=128)
    rel_diff = float(((y.float() - ref.float()).norm() / ref.float().norm()).item())
    t_gemv = bench(gemv, rep=200)
    t_deq_mm = bench(dequant_matmul, rep=200)

    def layer_fwd():
        with torch.no_grad():
            layer(x)

    from finetune.settings import override

    with override(gptq_gemv=True):
        t_layer_gemv = bench(layer_fwd, rep=200)
        host_gemv = host_us(layer_fwd)
    with override(gptq_gemv=False):
        t_layer_deq = bench(layer_fwd, rep=200)
        host_deq = host_us(layer_fwd)

    packed_bytes = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales))
    bytes_read = packed_bytes + x.numel() * x.element_size() + rows * out_f * x.element_size()
    src = torch.empty_like(layer.qweight)
    dst = torch.empty_like(layer.qweight)
    t_copy = bench(lambda: dst.copy_(src), rep=200)
    cfg = next((v for k, v in _BEST.items() if k[:3] == (in_f, out_f, row_bucket(rows)) and k[7] == dtype), None)
    return {
        "name": name,
        "in_features": in_f,
        "out_features": out_f,
        "rows": rows,
        "gemv_ms": t_gemv,
        "dequant_matmul_ms": t_deq_mm,
        "speedup": t_deq_mm / t_gemv,
        "layer_fwd_gemv_ms": t_layer_gemv,
        "layer_fwd_dequant_matmul_ms": t_layer_deq,
        "host_us_layer_fwd_gemv": host_gemv,
        "host_us_layer_fwd_dequant_matmul": host_deq,
        "packed_bytes": packed_bytes,
        "gemv_GBps": bytes_read / (t_gemv * 1e-3) / 1e9,
        "copy_GBps": 2 * packed_bytes / (t_copy * 1e-3) / 1e9,
        "gemv_config": list(cfg) if cfg is not None else None,
        "rel_diff_vs_dequant_matmul": rel_diff,
    }


def host_us(fn, n=50):
    """CPU time per call when the GPU is not waited for (launch overhead)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def model_memory(device):
    from finetune.modeling import QWenConfig
    from finetune.quant.loading import build_gptq_model_on_device

    cfg = QWenConfig(vocab_size=152064, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                     kv_channels=128, intermediate_size=27392, seq_length=2048, no_bias=True,
                     quantization_config={"bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                                          "quant_method": "gptq"})
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    model = build_gptq_model_on_device(cfg, device=device, dtype=torch.bfloat16, seed=0)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t
    res = {
        "model_bytes": torch.cuda.memory_allocated() - base,
        "peak_bytes_build": torch.cuda.max_memory_allocated() - base,
        "build_s": build_s,
    }
    ids = torch.randint(0, 152064, (1, 512), device=device)
    with torch.no_grad():
        t = time.perf_counter()
        logits = model(ids).logits
        torch.cuda.synchronize()
        res["forward_512_tokens_s"] = time.perf_counter() - t
    res["logits_finite"] = bool(torch.isfinite(logits).all())
    del model, logits
    torch.cuda.empty_cache()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gptq_layer.json"))
    ap.add_argument("--model", action="store_true", help="also build the random 14B Int4 model on the GPU")
    ap.add_argument("--gemv", action="store_true",
                    help="only the decode GEMV section (M = 1 and 4 rows), merged into an existing --out file "
                         "(the default run includes it)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    gemv_rows = [run_gemv_shape(n, i, o, m, device) for n, i, o in SHAPES for m in GEMV_ROWS]
    if args.gemv:
        return write_gemv_only(args, gemv_rows)
    rows = [run_shape(n, i, o, args.tokens, device) for n, i, o in SHAPES]
    import triton

    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "dtype": "bfloat16",
        "bits": 4,
        "group_size": 128,
        "target_ratio_vs_frozen": 1.25,
        "shapes": rows,
        "gemv": gemv_rows,
    }
    if args.model:
        result["model_14b_int4"] = model_memory(device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    hdr = (f"| layer (in x out) @ {args.tokens} tok | GPTQ fwd+bwd ms | bf16 Linear frozen ms | ratio | "
           f"trainable ms | ratio | dequant ms | dequant TB/s | copy TB/s | host us GPTQ / Linear |")
    print(hdr)
    print("|" + "---|" * 10)
    for r in rows:
        print(f"| {r['name']} ({r['in_features']}x{r['out_features']}) | {r['gptq_fwd_bwd_ms']:.3f} | "
              f"{r['linear_frozen_fwd_bwd_ms']:.3f} | {r['ratio_vs_frozen']:.2f}x | "
              f"{r['linear_trainable_fwd_bwd_ms']:.3f} | {r['ratio_vs_trainable']:.2f}x | {r['dequant_ms']:.3f} | "
              f"{r['dequant_TBps']:.2f} | {r['copy_TBps']:.2f} | "
              f"{r['host_us_gptq_fwd_bwd']:.0f} / {r['host_us_linear_fwd_bwd']:.0f} |")
    print_gemv(gemv_rows)
    if "model_14b_int4" in result:
        m = result["model_14b_int4"]
        print(f"14B Int4 model on GPU: {m['model_bytes'] / 2**30:.2f} GiB (peak {m['peak_bytes_build'] / 2**30:.2f} "
              f"GiB while building)")
    print(f"wrote {args.out}")
    return result


def print_gemv(rows):
    print("| decode GEMV (in x out) | rows | GEMV ms | dequant+matmul ms | speedup | layer fwd ms GEMV / off | "
          "GEMV GB/s | copy GB/s | host us GEMV / off |")
    print("|" + "---|" * 9)
    for r in rows:
        print(f"| {r['name']} ({r['in_features']}x{r['out_features']}) | {r['rows']} | {r['gemv_ms']:.4f} | "
              f"{r['dequant_matmul_ms']:.4f} | {r['speedup']:.2f}x | {r['layer_fwd_gemv_ms']:.4f} / "
              f"{r['layer_fwd_dequant_matmul_ms']:.4f} | {r['gemv_GBps']:.0f} | {r['copy_GBps']:.0f} | "
              f"{r['host_us_layer_fwd_gemv']:.0f} / {r['host_us_layer_fwd_dequant_matmul']:.0f} |")


def write_gemv_only(args, gemv_rows):
    """--gemv: the GEMV section alone, merged into the existing results file (its other sections kept)."""
    import triton

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update({
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "gemv": gemv_rows,
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_gemv(gemv_rows)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("FINETUNE_GPTQ_BACKEND", "triton")
    main()
