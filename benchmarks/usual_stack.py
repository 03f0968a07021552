"""The "usual stack" side of the speed benchmark (issue 7), one configuration per process.

What a user runs today for Q-LoRA on a GPTQ Int4 Qwen model:
transformers' ``Qwen2ForCausalLM`` loaded through transformers' GPTQ integration
(optimum + gptqmodel, ``GPTQConfig(bits=4, backend="torch")``), PEFT's
``prepare_model_for_kbit_training`` and LoRA r=64 on the 7 linear modules,
bf16 autocast, torch AdamW, batch 1.

Random Int4 weights without a 10 GB checkpoint: the model directory holds only
``config.json`` (with a GPTQ ``quantization_config``, so transformers treats the model
as pre-quantized) and a one-tensor ``model.safetensors``.  ``from_pretrained`` builds
the model on the meta device, optimum's ``convert_model`` swaps every block Linear for
gptqmodel's ``TorchLinear``, and transformers materialises every missing key with
``torch.empty`` on the target device (then ``initialize_weights`` gives embeddings /
lm_head / norms their usual init).  Just before the quantizer's post-load step
(optimum ``post_init_model``: GPTQ v1->v2 qzeros conversion, ``TorchLinear.post_init``
with its torch.compile) this script fills each QuantLinear's ``qweight`` / ``qzeros`` /
``scales`` / ``g_idx`` / ``bias`` with random (valid) GPTQ v1 data on the GPU, by
wrapping ``GptqHfQuantizer._process_model_after_weight_loading``.  Everything after
that is the stock code path.

Appends one JSON line per run to every ``--out`` file.  An out-of-memory is a result
(``"oom": true``), not a crash.

Environment (set by benchmarks/run_usual.sh): GPTQMODEL_DISABLE_PACK_EXT=1; the
wheels installed with ``pip install --target`` are added with ``--site`` (appended to
sys.path, so the image's own torch / transformers / peft / numpy always win), and
``benchmarks/pcre_shim`` stands in for pypcre.
"""

from __future__ import annotations

import argparse
import json
import os
import site
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Qwen-14B shape (Qwen v1 14B: hidden 5120, 40 layers, 40 heads, ffn 13696, vocab 152064).
FULL_SHAPE = dict(
    vocab_size=152064,
    hidden_size=5120,
    intermediate_size=13696,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=40,
)
TINY_SHAPE = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=640,  # 5 * 128: every in_features a multiple of the group size, like 13696 = 107 * 128
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)
QUANT = dict(bits=4, group_size=128, sym=True, desc_act=False)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing (prepare_model_for_kbit_training(use_gradient_checkpointing=...))")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (torch.compile, cuBLAS, allocator)")
    p.add_argument("--out", action="append", default=[], help="JSON-lines file to append the result to (repeatable)")
    p.add_argument("--model-dir", default=None, help="where config.json + stub safetensors go (default: a temp dir)")
    p.add_argument("--site", action="append", default=[],
                   help="extra site dir(s) with the travelling wheels, appended to sys.path (default: $USUAL_SITE)")
    p.add_argument("--tiny", action="store_true", help="2-layer hidden-256 toy shape (CPU dry run)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--backend", default="torch", help='GPTQConfig backend (the notes: only "torch" trains)')
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def setup_paths(args):
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sites = list(args.site)
    if not sites and os.environ.get("USUAL_SITE"):
        sites = [os.environ["USUAL_SITE"]]
    for s in sites:
        site.addsitedir(s)  # appends (after the image's site-packages) and runs its .pth files
    try:
        import pcre  # noqa: F401  (a real pypcre, if the machine has one)
    except ImportError:
        sys.path.append(str(HERE / "pcre_shim"))


def write_model_dir(path: Path, shape: dict, seq: int):
    """config.json with a GPTQ v1 quantization_config + a one-tensor safetensors stub."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_act="silu",
        max_position_embeddings=max(8192, seq),
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        use_sliding_window=False,
        attention_dropout=0.0,
        use_cache=False,
        bos_token_id=151643,
        eos_token_id=151643,
        dtype="bfloat16",
        quantization_config=dict(
            quant_method="gptq",
            **QUANT,
            format="gptq",  # GPTQ v1 checkpoint layout (what Qwen's released Int4 checkpoints use)
            checkpoint_format="gptq",
            true_sequential=True,
            damp_percent=0.01,
        ),
        **shape,
    )
    if shape["vocab_size"] < 151644:
        config["bos_token_id"] = config["eos_token_id"] = 0
    (path / "config.json").write_text(json.dumps(config, indent=2))
    # One real tensor so from_pretrained finds a weights file; every other key is "missing"
    # and is materialised with torch.empty on the target device (no 10 GB read or write).
    save_file({"model.norm.weight": torch.ones(shape["hidden_size"], dtype=torch.bfloat16)},
              str(path / "model.safetensors"), metadata={"format": "pt"})


def install_random_fill(stats: dict):
    """Fill every QuantLinear with random GPTQ v1 data right before the quantizer's post-load step."""
    import torch
    from transformers.quantizers import quantizer_gptq

    cls = quantizer_gptq.GptqHfQuantizer
    original = cls._process_model_after_weight_loading

    @torch.no_grad()
    def fill(model):
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear

        gen = None
        n = 0
        classes = set()
        for name, m in model.named_modules():
            if not isinstance(m, BaseQuantLinear):
                continue
            dev = m.qweight.device
            if gen is None or gen.device != dev:
                gen = torch.Generator(device=dev)
                gen.manual_seed(1234)
            # qweight: 8 random 4-bit codes per int32
            m.qweight.copy_(torch.randint(-(2**31), 2**31 - 1, m.qweight.shape, generator=gen,
                                          dtype=torch.int32, device=dev).to(m.qweight.dtype))
            # qzeros: symmetric 4-bit, GPTQ v1 stores zero-1 = 7 in every nibble (0x77777777)
            m.qzeros.fill_(0x77777777 if m.qzeros.dtype == torch.int32 else 0)
            if m.qzeros.dtype != torch.int32:
                raise RuntimeError(f"{name}: unexpected qzeros dtype {m.qzeros.dtype}")
            # scales: weight std ~ 0.01 like a trained 14B layer
            m.scales.copy_((torch.rand(m.scales.shape, generator=gen, device=dev) * 2e-3 + 1e-3).to(m.scales.dtype))
            # g_idx: desc_act False -> in-order groups
            gi = torch.arange(m.g_idx.shape[0], device=dev, dtype=torch.int32) // m.group_size
            m.g_idx.copy_(gi.to(m.g_idx.dtype))
            if getattr(m, "bias", None) is not None:
                m.bias.copy_((torch.randn(m.bias.shape, generator=gen, device=dev) * 0.02).to(m.bias.dtype))
            n += 1
            classes.add(f"{type(m).__module__}.{type(m).__qualname__}")
        stats["quant_linears"] = n
        stats["quant_linear_class"] = ",".join(sorted(classes)) or None

    def wrapped(self, model, **kwargs):
        if self.pre_quantized:
            fill(model)
        return original(self, model, **kwargs)

    cls._process_model_after_weight_loading = wrapped


def build(args, device, stats):
    import torch
    from transformers import AutoModelForCausalLM, GPTQConfig

    shape = TINY_SHAPE if args.tiny else FULL_SHAPE
    if args.model_dir:
        mdir = Path(args.model_dir)
    else:
        import tempfile
        mdir = Path(tempfile.mkdtemp(prefix="usual_qwen_"))
    write_model_dir(mdir, shape, args.seq)
    install_random_fill(stats)

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(mdir),
        quantization_config=GPTQConfig(bits=4, backend=args.backend),
        dtype=torch.bfloat16,
        device_map={"": device},
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    stats["load_s"] = round(time.perf_counter() - t0, 2)
    stats["vocab"] = shape["vocab_size"]
    return model


def train_loop(args, model, device, stats):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.ckpt)
    lcfg = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()  # transformers applies gradient checkpointing only in train mode
    base = model.get_base_model()
    stats["grad_ckpt_active"] = bool(getattr(base, "is_gradient_checkpointing", False))
    trainable = [p for p in model.parameters() if p.requires_grad]
    stats["lora_params"] = int(sum(p.numel() for p in trainable))
    stats["lora_dtype"] = str(trainable[0].dtype).replace("torch.", "") if trainable else None
    opt = torch.optim.AdamW(trainable, lr=1e-4)

    cuda = device.type == "cuda"
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        ids = torch.randint(0, stats["vocab"], (1, args.seq), generator=gen, device=device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync()
    stats["warmup_s"] = round(time.perf_counter() - t0, 2)
    if cuda:  # peak over load + warm-up, then the peak of the timed steps alone
        stats["peak_load_warmup_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(device)

    times = []
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    total = sum(times)
    stats["step_s"] = [round(x, 4) for x in times]
    stats["tok_s"] = round(args.seq * args.steps / total, 1) if total > 0 else None
    stats["loss"] = round(float(loss), 4)


def versions(stats):
    from importlib import metadata

    import torch
    import transformers

    stats["torch"] = torch.__version__
    stats["transformers"] = transformers.__version__
    for dist in ("gptqmodel", "peft", "optimum", "numpy", "accelerate"):
        try:
            stats[dist] = metadata.version(dist)
        except Exception:
            stats[dist] = None
    stats["python"] = sys.version.split()[0]
    stats["torch_file"] = str(Path(torch.__file__).parent)
    stats["transformers_file"] = str(Path(transformers.__file__).parent)
    try:
        import pcre
        stats["pcre"] = getattr(pcre, "__version__", "?")
    except Exception:
        stats["pcre"] = None


def append(paths, rec):
    line = json.dumps(rec, sort_keys=False)
    print(line, flush=True)
    for p in paths:
        p = Path(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("a") as f:
            f.write(line + "\n")


def main(argv=None):
    args = parse_args(argv)
    setup_paths(args)
    import torch

    torch.manual_seed(args.seed)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    rec = {"stack": "usual", "seq": args.seq, "ckpt": bool(args.ckpt), "tok_s": None, "peak_gib": None,
           "lora_params": None, "steps": args.steps, "tiny": bool(args.tiny), "backend": args.backend}
    stats: dict = {}
    rc = 0
    try:
        versions(stats)
        if device.type == "cuda":
            stats["device"] = torch.cuda.get_device_name(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            stats["device"] = "cpu"
        model = build(args, device, stats)
        train_loop(args, model, device, stats)
    except torch.cuda.OutOfMemoryError as e:
        rec["oom"] = True
        rec["error"] = f"OutOfMemoryError: {str(e).splitlines()[0][:300]}"
    except Exception as e:  # record, then fail the process
        rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        traceback.print_exc()
        rc = 1
    if device.type == "cuda":
        last = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if "peak_load_warmup_gib" in stats and "step_s" in stats:
            stats["peak_timed_gib"] = last
        stats["peak_gib"] = max(last, stats.get("peak_load_warmup_gib", 0.0))
    rec.update({k: v for k, v in stats.items() if k not in rec or rec[k] is None})
    rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    append(args.out, rec)
    return rc


if __name__ == "__main__":
    sys.exit(main())
