"""Q-LoRA training speed and memory of the project's path on a Qwen-14B-shaped Int4 model (one GPU).

One configuration per process (so peak memory is the configuration's own); each appends one JSON line to
--out. The packed random Int4 weights are built directly on the GPU (no 10 GB file).

  python benchmarks/train_speed.py --seq 2048 --ckpt --out results.jsonl       # one point of the sweep
  python benchmarks/train_speed.py --workload short --packing --out ...          # 100-600-token chats
  python benchmarks/train_speed.py --check --out ...                             # fast path == plain path
  python benchmarks/train_speed.py --packed-rows chats:400:680:1 --ckpt --accum 16 --out ...
                                        # the trainer's packed 2048-token rows (user_path.py's rows2048)
  python benchmarks/train_speed.py --generate --out ...                          # batch-1 chat generation
  python benchmarks/train_speed.py --tiny ...                                    # any of these on CPU, tiny

`benchmarks/run_speed.sh` runs the whole sweep on the H200.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.modeling import QWenConfig  # noqa: E402
from finetune.quant.loading import build_gptq_model_on_device  # noqa: E402
from finetune.settings import override, settings  # noqa: E402

H200_BF16_FLOPS = 790e12  # measured bf16 matmul rate of the H200 here (KINDS.md; 8192^3, random data)

QWEN14B = dict(vocab_size=152064, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, kv_channels=128,
               intermediate_size=27392, seq_length=2048, max_position_embeddings=8192, layer_norm_epsilon=1e-6,
               rotary_emb_base=10000, rotary_pct=1.0, no_bias=True, tie_word_embeddings=False,
               use_dynamic_ntk=True, use_logn_attn=True,
               quantization_config={"bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                                    "quant_method": "gptq"})
TINY = dict(QWEN14B, vocab_size=2048, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, kv_channels=32,
            intermediate_size=512, seq_length=256)
TARGETS = ["c_attn", "c_proj", "w1", "w2"]


def build(cfg: dict, device, layers: int | None = None, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    values = dict(cfg)
    if layers:
        values["num_hidden_layers"] = layers
    config = QWenConfig(**values)
    model = build_gptq_model_on_device(config, device=device, dtype=torch.bfloat16, seed=seed)
    model.config.use_cache = False
    model.requires_grad_(False)
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 master weights, as the trainer keeps them
    return model, config


def flops_per_token(config, seq: int) -> float:
    """4N for a frozen base (forward 2N + input gradients 2N; no weight gradients) plus attention: causal
    QK^T and AV cost 2*L*seq*d per token forward, three times that with backward."""
    d, L = config.hidden_size, config.num_hidden_layers
    inter = config.intermediate_size // 2
    per_layer = d * 3 * d + d * d + 3 * d * inter
    n = L * per_layer + d * config.vocab_size  # lm_head included (the loss needs it), embedding not
    return 4 * n + 6 * L * seq * d


def lora_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def step_fn(model, opt, device, graphs=None, accum: int = 1):
    """A training step per batch, as the trainer runs it: through the TrainGraphs when there is one. One optimizer
    step per batch, or with `accum` > 1 one every `accum` batches after clipping the gradients' norm to 1.0 (the
    trainer's --gradient_accumulation_steps and --max_grad_norm defaults)."""
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    calls = 0

    def step(batch):
        nonlocal calls
        with autocast:
            loss = graphs(model, batch) if graphs is not None else model(**batch).loss
        if accum == 1:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        (loss / accum).backward()
        calls += 1
        if calls % accum == 0:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, batches, device, warmup: int):
    for b in batches[:warmup]:
        step(b)
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # so the reserved peak is what the timed steps hold (graph pools included)
    if os.environ.get("BENCH_GC_FREEZE") == "1":  # A/B: keep the model's Python objects out of GC passes
        import gc

        gc.collect()
        gc.freeze()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for b in batches[warmup:]:
        loss = step(b)
    sync(device)
    return time.perf_counter() - t, float(loss)


def build_for_training(args, cfg, device):
    """The model in train mode (checkpointed if asked), its AdamW over the adapters, and its TrainGraphs (None
    without graphs)."""
    model, config = build(cfg, device)
    model.train()
    if args.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.ckpt_mode == "block":
            checkpoint_whole_blocks()
    if device.type == "cuda" and not args.no_graphs:
        from finetune.training.graphs import enable_train_graphs

        # one eager step (compiles, Triton tuning), then the capture: both inside the untimed warm-up
        graphs = enable_train_graphs(model, warmup=1)
    else:
        graphs = None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=device.type == "cuda")
    return model, config, opt, graphs


def graph_stats(g) -> dict:
    if g is None:
        return {}
    return {"graph_captures": g.captures, "graph_replays": g.replays, "graph_eager_steps": g.eager_steps}


def checkpoint_whole_blocks():
    """A/B switch for benchmarks only: checkpoint each block as one segment (the layout before the halves)."""
    from finetune.modeling.model import QWenBlock

    def forward(self, x, rope=None, attn=None, query_scale=None, cache=None, use_cache=False):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(
                lambda x: self._mlp_half(self._attention_half(x, rope, attn, query_scale, None)), x)
        return self._mlp_half(self._attention_half(x, rope, attn, query_scale, cache))

    QWenBlock.forward = forward


def run_sweep_point(args, cfg, device) -> dict:
    model, config, opt, graphs = build_for_training(args, cfg, device)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.warmup + args.steps):
        ids = torch.randint(0, config.vocab_size, (1, args.seq), generator=g).to(device)
        batches.append({"input_ids": ids, "labels": ids})
    secs, loss = timed(step_fn(model, opt, device, graphs, accum=args.accum), batches, device, args.warmup)
    tokens = args.seq * args.steps
    tok_s = tokens / secs
    return {"tok_s": tok_s, "step_s": secs / args.steps, "loss": loss,
            "mfu": tok_s * flops_per_token(config, args.seq) / H200_BF16_FLOPS, "lora_params": lora_params(model),
            **graph_stats(graphs)}


def short_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(100, 600) for _ in range(n)]


def run_short(args, cfg, device) -> dict:
    """2,000 chats of 100-600 tokens: padded batches (dynamic padding) or packed rows; real tokens only."""
    from finetune.data import ChatCollator, PackedCollator, pack_lengths

    model, config, opt, graphs = build_for_training(args, cfg, device)
    lengths = short_lengths(2000)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    rows = [{"input_ids": s, "labels": s} for s in seqs]
    n_batches = args.warmup + args.steps
    if args.packing:
        groups = pack_lengths(lengths, args.row_len)
        collate = PackedCollator(pad_id=0, pad_to_multiple_of=args.row_len)
        batches = []
        for grp in groups[: n_batches * args.batch]:
            ids, pos = [], []
            for i in grp:
                ids += seqs[i]
                pos += list(range(len(seqs[i])))
            batches.append({"input_ids": ids, "labels": ids, "position_ids": pos})
        batches = [collate(batches[i: i + args.batch]) for i in range(0, len(batches), args.batch)][:n_batches]
    else:
        collate = ChatCollator(pad_id=0)
        batches = [collate(rows[i: i + args.batch]) for i in range(0, n_batches * args.batch, args.batch)]
    real = [int((b["labels"] != -100).sum()) for b in batches]  # padding is labelled -100 in both forms
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    secs, loss = timed(step_fn(model, opt, device, graphs, accum=args.accum), batches, device, args.warmup)
    tokens = sum(real[args.warmup:])
    padded = sum(b["input_ids"].numel() for b in batches[args.warmup:])
    return {"tok_s": tokens / secs, "real_tokens": tokens, "row_tokens": padded, "fill": tokens / padded,
            "loss": loss, "lora_params": lora_params(model), "rows_timed": args.steps * args.batch,
            **graph_stats(graphs)}


def trainer_rows(spec: str, row_len: int, tokenizer_dir: str | None, seed: int = 42) -> tuple[list[dict], int]:
    """The rows the trainer packs (--packing True --model_max_length row_len) from `spec`: a data file, or
    chats:N:TOKENS:SEED, N conversations of about TOKENS tokens drawn by benchmarks/multi_gpu.py's chat_data (what
    benchmarks/user_path.py's rows2048 workloads train on: chats:400:680:1). Built by the project's own data
    pipeline (chat template, first-fit packing, labels), so they are the trainer's rows, in the order in which
    transformers' Trainer with --seed `seed` draws them in its first epoch (accelerate's seedable sampler:
    torch.randperm from a generator seeded with it): the k-th row here is the trainer's k-th micro-batch. The
    tokenizer: `tokenizer_dir`'s, else the project's small vocabulary, which the model dirs of
    benchmarks/make_model_dir.py carry. Returns (rows, the pad id)."""
    import tempfile

    from finetune.data import build_dataset
    from finetune.tokenization import SMALL_VOCAB, QWenTokenizer, load_tokenizer

    tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else QWenTokenizer(str(SMALL_VOCAB))
    with tempfile.TemporaryDirectory() as tmp:
        if spec.startswith("chats:"):
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from multi_gpu import chat_data

            n, tokens, chat_seed = (int(v) for v in spec.split(":")[1:])
            path = chat_data(Path(tmp) / "chats.json", tok, n, tokens, seed=chat_seed)
        else:
            path = Path(spec)
        dataset, _ = build_dataset(tok, str(path), row_len, packing=True, cache_dir=Path(tmp) / "cache",
                                   verbose=False, progress=False)
        rows = [{k: row[k] for k in ("input_ids", "labels", "position_ids")} for row in dataset]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in order], tok.eod_id


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the sequences in a packed row (a new one wherever the positions restart, padding included)."""
    starts = (position_ids == 0).nonzero().flatten().tolist() + [position_ids.numel()]
    return [b - a for a, b in zip(starts, starts[1:])]


def run_packed_rows(args, cfg, device) -> dict:
    """The trainer's packed rows (see trainer_rows), each padded to --seq by the collator the graphed trainer uses:
    position ids restarting at every chat, so each step attends through FlexAttention's document block mask on
    CUDA (--packed-layout documents); or the same tokens as one causal sequence, without position ids (causal:
    SDPA's causal kernel, the sweep point's attention on the same rows). tok_s counts every position, as the
    sweep point does (the trainer's padded_tokens_per_s); real_tok_s the non-padding tokens (its tokens_per_s)."""
    from finetune.data import PackedCollator

    rows, pad_id = trainer_rows(args.packed_rows, args.seq, args.tokenizer, args.rows_seed)
    model, config, opt, graphs = build_for_training(args, cfg, device)
    collate = PackedCollator(pad_id=pad_id, pad_to_multiple_of=args.seq)
    n_batches = args.warmup + args.steps
    picked = [rows[i % len(rows)] for i in range(n_batches * args.batch)]  # cycled when the data has fewer rows
    batches = [collate(picked[i: i + args.batch]) for i in range(0, len(picked), args.batch)]
    timed_batches = batches[args.warmup:]
    segments = [segment_lengths(p) for b in timed_batches for p in b["position_ids"]]
    real = sum(int((b["input_ids"] != pad_id).sum()) for b in timed_batches)
    trained = sum(int((b["labels"] != -100).sum()) for b in timed_batches)
    positions = sum(b["input_ids"].numel() for b in timed_batches)
    if args.packed_layout == "causal":
        batches = [{k: v for k, v in b.items() if k != "position_ids"} for b in batches]
        attended = len(segments) * args.seq ** 2
    else:
        attended = sum(n * n for seg in segments for n in seg)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    secs, loss = timed(step_fn(model, opt, device, graphs, accum=args.accum), batches, device, args.warmup)
    L, d = config.num_hidden_layers, config.hidden_size
    flops = flops_per_token(config, 0) * positions + 6 * L * d * attended  # attention: 6*L*d*len^2 a sequence
    return {"tok_s": positions / secs, "real_tok_s": real / secs, "trained_tok_s": trained / secs,
            "ms_per_row": 1000 * secs / (args.steps * args.batch), "loss": loss, "layout": args.packed_layout,
            "rows_seed": args.rows_seed,
            "rows_in_data": len(rows), "rows_timed": args.steps * args.batch,
            "chats_per_row": sum(r["position_ids"].count(0) for r in picked[args.warmup * args.batch:])
            / (args.steps * args.batch),
            "fill": real / positions, "mfu": flops / secs / H200_BF16_FLOPS, "lora_params": lora_params(model),
            **graph_stats(graphs)}


@torch.no_grad()
def run_generate(args, cfg, device) -> dict:
    """Batch-1 greedy decoding of --new tokens after a 24-token prompt: the inference engine that chat() uses on
    CUDA, and transformers' generate() on the same model in the same process."""
    from transformers import GenerationConfig

    from finetune.inference import Engine, SamplingParams
    from finetune.tokenization import SMALL_VOCAB, QWenTokenizer

    config = QWenConfig(**cfg)
    model = build_gptq_model_on_device(config, device=device, dtype=torch.bfloat16)
    model.eval()
    prompt = torch.randint(0, min(config.vocab_size, 151000), (1, 24), generator=torch.Generator().manual_seed(0)).to(device)
    gc = GenerationConfig(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    warm = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    result = {}
    if not args.no_engine:
        # The engine only reads the tokenizer's <|im_end|>/<|im_start|> ids (its stops); min_new_tokens = --new
        # holds them back, so the random model decodes the whole length whatever those ids are.
        engine = Engine(model, QWenTokenizer(str(SMALL_VOCAB)), max_batch=1)
        engine.generate([prompt[0].tolist()], SamplingParams(max_new_tokens=8))  # tunes the GEMV, captures graphs
        sync(device)
        t = time.perf_counter()
        static = engine.generate([prompt[0].tolist()], SamplingParams(max_new_tokens=args.new,
                                                                      min_new_tokens=args.new))[0]
        sync(device)
        result.update(gen_tok_s=len(static) / (time.perf_counter() - t), new_tokens=len(static))
    model.generate(prompt, generation_config=warm)
    sync(device)
    t = time.perf_counter()
    out = model.generate(prompt, generation_config=gc)
    sync(device)
    new = out.shape[1] - prompt.shape[1]
    result.update(gen_tok_s_generate=new / (time.perf_counter() - t))
    if not args.no_engine:
        ref = out[0, prompt.shape[1]:].tolist()
        result["same_tokens_as_generate"] = static == ref
        # bf16 on random weights: nearly flat logits, so rounding differences flip an argmax sooner or later
        result["first_difference_at"] = next((i for i, (a, b) in enumerate(zip(static, ref)) if a != b), None)
    return result


def run_check(args, cfg, device) -> dict:
    """Does the fast path compute what the plain path computes? Four runs on the same inputs and weights:

      fast  Triton dequantization, SDPA flash/efficient attention, compiled elementwise ops, chunked loss;
      plain torch dequantization, math attention, eager ops, full logits and one cross-entropy;

    each in bf16 (autocast over the bf16 frozen weights, as training runs) and in fp32 (the frozen weights
    upcast exactly). fast32 vs plain32 isolates the algorithm (a wrong kernel shows up there at any
    precision); fast16 vs plain16 the kernels at training precision; plain16 vs plain32 what bf16 itself
    costs on this model, the floor that fast16 vs plain32 can be held to. Errors are ||a-b|| / ||b|| of the
    logits and of each LoRA gradient (median and worst over the tensors)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # TF32 off: the fp32 runs must be fp32 (TF32 matmuls alone put 1e-4 errors into the logits)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, config = build(cfg, device, layers=args.check_layers)
    for n, p in model.named_parameters():  # non-zero B so LoRA gradients flow into A too
        if "lora_B" in n:
            p.data.normal_(0, 0.01)
    for m in model.modules():  # every run must see the same function: no random dropout masks
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, config.vocab_size, (1, args.seq), generator=g).to(device)

    def run(fast: bool, bf16: bool):
        with override(gptq_backend="auto" if fast else "torch", compile=fast):
            return _run(fast, bf16)

    def _run(fast: bool, bf16: bool):
        model.zero_grad(set_to_none=True)
        ctx = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
        # fused attention for the fast runs (on CUDA flash has no fp32 kernel: fp32 takes the efficient one)
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION] if fast else [SDPBackend.MATH]
        with ctx, sdpa_kernel(backends):
            if fast:
                loss = model(input_ids=ids, labels=ids).loss
            else:
                logits = model(input_ids=ids).logits.float()
                loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
        loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.eval()
        with torch.no_grad(), ctx, sdpa_kernel(backends):
            logits = model(input_ids=ids).logits.float()
        model.train()
        return {"loss": float(loss), "logits": logits, "grads": grads}

    runs = {"fast16": run(True, True), "plain16": run(False, True)}
    model.float()  # exact upcast of the bf16 frozen weights (the packed Int4 buffers stay as they are)
    runs.update({"fast32": run(True, False), "plain32": run(False, False)})

    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731

    def compare(a: str, b: str) -> dict:
        ga, gb = runs[a]["grads"], runs[b]["grads"]
        errs = sorted(((rel(ga[n], gb[n]), n) for n in gb if gb[n].norm() > 0), reverse=True)
        return {"logits_rel_err": rel(runs[a]["logits"], runs[b]["logits"]),
                "lora_grad_rel_err_median": errs[len(errs) // 2][0], "lora_grad_rel_err_max": errs[0][0],
                "worst": [{"name": n.replace("base_model.model.transformer.", ""), "rel_err": e,
                           "norm_a": float(ga[n].norm()), "norm_b": float(gb[n].norm())} for e, n in errs[:3]]}

    pairs = {f"{a}~{b}": compare(a, b) for a, b in
             (("fast32", "plain32"), ("fast16", "plain16"), ("plain16", "plain32"), ("fast16", "plain32"))}
    norms = sorted(float(g.norm()) for g in runs["plain32"]["grads"].values())
    headline = pairs["fast16~plain32"]
    return {"layers": args.check_layers, "seq": args.seq, "pairs": pairs,
            "losses": {k: v["loss"] for k, v in runs.items()}, "grad_norm_median_plain32": norms[len(norms) // 2],
            "lora_grad_tensors": len(norms), "logits_rel_err": headline["logits_rel_err"],
            "lora_grad_rel_err_max": headline["lora_grad_rel_err_max"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--ckpt", action="store_true", help="activation checkpointing")
    ap.add_argument("--ckpt-mode", choices=["halves", "block"], default="halves",
                    help="checkpoint segments: two per block (the model's) or one per block (A/B)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workload", choices=["sweep", "short"], default="sweep")
    ap.add_argument("--packed-rows", metavar="DATA|chats:N:TOKENS:SEED",
                    help="train on the rows the trainer packs from this data (--seq: the row length; --batch rows "
                         "a step), instead of random causal sequences")
    ap.add_argument("--packed-layout", choices=["documents", "causal"], default="documents",
                    help="--packed-rows: each chat attends within itself (the trainer's layout), or the whole row "
                         "as one causal sequence (the sweep point's attention on the same tokens)")
    ap.add_argument("--tokenizer", metavar="MODEL_DIR",
                    help="--packed-rows: this model dir's tokenizer (default: the project's small vocabulary, "
                         "as in benchmarks/make_model_dir.py's dirs)")
    ap.add_argument("--rows-seed", type=int, default=42,
                    help="--packed-rows: the rows in the order the trainer with this --seed takes them (its "
                         "default 42); with --warmup 32 the timed rows are those of a trainer run's timed steps")
    ap.add_argument("--accum", type=int, default=1,
                    help="micro-batches per optimizer step (the trainer's --gradient_accumulation_steps)")
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--batch", type=int, default=1, help="rows per step (short workload)")
    ap.add_argument("--row-len", type=int, default=4096, help="packed row length (short workload)")
    ap.add_argument("--generate", action="store_true")
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--check-layers", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on CPU, to test this script")
    ap.add_argument("--no-compile", action="store_true", help="eager RMSNorm/rotary/SwiGLU (FINETUNE_COMPILE=0)")
    ap.add_argument("--no-engine", action="store_true", help="--generate: only transformers' generate()")
    ap.add_argument("--no-gemv", action="store_true", help="decode through dequantize+matmul (FINETUNE_GPTQ_GEMV=0)")
    ap.add_argument("--no-graphs", action="store_true", help="train eagerly (no CUDA graphs)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.accum < 1:
        ap.error(f"--accum must be at least 1, got {args.accum}")
    if args.packed_rows:
        spec = args.packed_rows
        if spec.startswith("chats:"):
            parts = spec.split(":")[1:]
            if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts[:2]) or not parts[2].isdigit():
                ap.error(f"--packed-rows {spec}: expected chats:N:TOKENS:SEED (positive N and TOKENS, a seed)")
        elif not Path(spec).is_file():
            ap.error(f"--packed-rows {spec}: no such data file (or chats:N:TOKENS:SEED)")
        if args.check or args.generate or args.workload != "sweep":
            ap.error("--packed-rows is a training workload of its own: leave out --check, --generate and --workload")
    switches = {}
    if args.no_compile:
        switches["compile"] = False
    if args.no_gemv:
        switches["gptq_gemv"] = False
    with override(**switches):
        return _main(args)


def _main(args) -> int:

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cfg = TINY if args.tiny else QWEN14B
    if args.tiny and args.row_len > cfg["seq_length"] * 4:
        args.row_len = 1024
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    record = {"stack": "qwen-finetune", "seq": args.seq, "ckpt": args.ckpt, "tiny": args.tiny,
              "ckpt_mode": args.ckpt_mode if args.ckpt else None,
              "workload": ("check" if args.check else "generate" if args.generate
                           else "packed_rows" if args.packed_rows else args.workload),
              "packed_rows": args.packed_rows, "accum": args.accum,
              "packing": args.packing, "batch": args.batch, "steps": args.steps,
              "compile": settings().compile,
              "gc_freeze": os.environ.get("BENCH_GC_FREEZE") == "1",
              "gemv": settings().gptq_gemv,
              "graphs": not args.no_graphs and settings().cuda_graphs and not args.tiny,
              "torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    t0 = time.perf_counter()
    try:
        if args.check:
            record.update(run_check(args, cfg, device))
        elif args.generate:
            record.update(run_generate(args, cfg, device))
        elif args.packed_rows:
            record.update(run_packed_rows(args, cfg, device))
        elif args.workload == "short":
            record.update(run_short(args, cfg, device))
        else:
            record.update(run_sweep_point(args, cfg, device))
    except torch.cuda.OutOfMemoryError as e:
        record.update({"oom": True, "error": str(e).splitlines()[0]})
    except Exception as e:  # recorded, so one failing point does not hide the others
        record.update({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
    if device.type == "cuda":
        record["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        record["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30  # graph pools are reserved, not allocated
    record["wall_s"] = time.perf_counter() - t0
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    keys = [k for k in ("tok_s", "real_tok_s", "ms_per_row", "chats_per_row", "layout", "gen_tok_s", "gen_tok_s_generate", "peak_gib", "reserved_gib", "graph_replays", "mfu", "logits_rel_err", "lora_grad_rel_err_max",
                        "fill", "oom", "error") if k in record]
    print(json.dumps({k: record[k] for k in ["seq", "ckpt", "workload", "packing", "compile", "gemv", "graphs"] + keys}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
