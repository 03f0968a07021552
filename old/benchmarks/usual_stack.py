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

Two modes:

- ``--seq N`` (issue 7): random token rows of one length, batch 1, this script's own loop
  (forward, backward, AdamW), ``--steps`` timed after ``--warmup``.
- ``--chats FILE`` (issue 15, workload ``usual_stack_short``): what a user of the usual stack
  (LLaMA-Factory-like: transformers' ``Trainer``) runs on the chat file our scripts train on.
  The file is encoded by benchmarks/chat_rows.py in a subprocess (this project's ChatML
  encoder and the model dir's tokenizer, ``--tokenizer``; labels only on assistant replies)
  so that this process never imports ``finetune``.  Then ``Trainer`` with
  ``DataCollatorForSeq2Seq`` (rows padded to the longest of each batch, labels with -100),
  batch 2, gradient accumulation 8, gradient checkpointing, bf16, torch AdamW, the
  recipe of scripts/finetune_qlora.sh (lr 3e-4, cosine, warmup 1%, weight decay 0.1,
  beta2 0.95, clipping 1.0), ``--max-steps`` optimizer steps, logging every step.
  Throughput as our run_info.json measures it: over the optimizer steps after the first
  ``--skip-steps`` (2), from the end of the last skipped step to the end of training;
  ``tokens_per_s`` counts the non-padding input tokens, ``trained_tokens_per_s`` the
  label-bearing ones, ``padded_tokens_per_s`` every row position.  ``peak_reserved_gib`` is
  ``torch.cuda.max_memory_reserved()`` over the whole run.

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
import shlex
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
    vocab_size=2048,  # the project's small vocabulary (the default tokenizer of --chats) fits
    hidden_size=256,
    intermediate_size=640,  # 5 * 128: every in_features a multiple of the group size, like 13696 = 107 * 128
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)
QUANT = dict(bits=4, group_size=128, sym=True, desc_act=False)


# scripts/finetune_qlora.sh's recipe (the official Qwen one), which a user of the usual stack would set too.
RECIPE = dict(learning_rate=3e-4, weight_decay=0.1, adam_beta2=0.95, warmup_steps=0.01,
              lr_scheduler_type="cosine", max_grad_norm=1.0)
WORKLOAD = "usual_stack_short"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=None, help="random rows of this length, batch 1 (the issue-7 mode)")
    p.add_argument("--chats", default=None, metavar="FILE",
                   help="train through transformers' Trainer on this chat file instead (workload usual_stack_short)")
    p.add_argument("--ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing (prepare_model_for_kbit_training(use_gradient_checkpointing=...))")
    p.add_argument("--steps", type=int, default=None, help="--seq: timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=None,
                   help="--seq: untimed steps first (torch.compile, cuBLAS, allocator; default 2)")
    c = p.add_argument_group("--chats")
    c.add_argument("--tokenizer", default=None,
                   help="the model dir our run trains (its qwen.tiktoken) or a .tiktoken file; default the "
                        "project's small vocabulary, which benchmarks/make_model_dir.py writes into its dirs")
    c.add_argument("--max-len", type=int, default=2048, help="truncation (the scripts' --model_max_length)")
    c.add_argument("--max-steps", type=int, default=12, help="optimizer steps")
    c.add_argument("--skip-steps", type=int, default=2, help="optimizer steps left out of the throughput")
    c.add_argument("--batch-size", type=int, default=2, help="per_device_train_batch_size")
    c.add_argument("--grad-accum", type=int, default=8, help="gradient_accumulation_steps")
    p.add_argument("--out", action="append", default=[], help="JSON-lines file to append the result to (repeatable)")
    p.add_argument("--model-dir", default=None, help="where config.json + stub safetensors go (default: a temp dir)")
    p.add_argument("--site", action="append", default=[],
                   help="extra site dir(s) with the travelling wheels, appended to sys.path (default: $USUAL_SITE)")
    p.add_argument("--tiny", action="store_true", help="2-layer hidden-256 toy shape (CPU dry run)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--backend", default="torch", help='GPTQConfig backend (the notes: only "torch" trains)')
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if (args.seq is None) == (args.chats is None):
        p.error("give exactly one of --seq N and --chats FILE")
    if args.chats is not None:
        if args.steps is not None or args.warmup is not None:
            p.error("--steps and --warmup belong to --seq; with --chats use --max-steps and --skip-steps")
        for name in ("max_len", "max_steps", "batch_size", "grad_accum"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
        if not 0 <= args.skip_steps < args.max_steps:
            p.error(f"--skip-steps must be in [0, --max-steps), got {args.skip_steps} with --max-steps {args.max_steps}")
    else:
        args.steps = 5 if args.steps is None else args.steps
        args.warmup = 2 if args.warmup is None else args.warmup
    return args


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
    write_model_dir(mdir, shape, args.seq or args.max_len)
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


def lora_model(args, model, stats):
    """PEFT's k-bit preparation and LoRA r=64 alpha 16 dropout 0.05 on the 7 linear modules."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.ckpt)
    lcfg = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()  # transformers applies gradient checkpointing only in train mode
    trainable = [p for p in model.parameters() if p.requires_grad]
    stats["lora_params"] = int(sum(p.numel() for p in trainable))
    stats["lora_dtype"] = str(trainable[0].dtype).replace("torch.", "") if trainable else None
    return model


def train_loop(args, model, device, stats):
    import torch

    model = lora_model(args, model, stats)
    stats["grad_ckpt_active"] = bool(getattr(model.get_base_model(), "is_gradient_checkpointing", False))
    trainable = [p for p in model.parameters() if p.requires_grad]
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


def encode_chats(args) -> dict:
    """The chat file as token rows, encoded by benchmarks/chat_rows.py in a subprocess (see the docstring).
    Raises BadInput with chat_rows.py's one-line message."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="usual_rows_") as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, str(HERE / "chat_rows.py"), args.chats, "--max-len", str(args.max_len),
               "--out", str(out)]
        if args.tokenizer:
            cmd += ["--tokenizer", args.tokenizer]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            msg = lines[-1] if lines else f"benchmarks/chat_rows.py exited with {proc.returncode}"
            raise BadInput(msg.removeprefix("error: "))
        data = json.loads(out.read_text())
    return data


class BadInput(Exception):
    """Input the run cannot start with (the chat file, the tokenizer): one line, exit code 2."""


def check_rows(data: dict, vocab: int) -> None:
    """Every token id must be an embedding row of the model (the chats' tokenizer against its vocab)."""
    for i, row in enumerate(data["rows"]):
        top = max(row["input_ids"])
        if top >= vocab:
            raise BadInput(f"{data['chats']}: record {i + 1} has token id {top}, but the model's vocabulary has "
                           f"{vocab} rows (tokenizer {data['tokenizer']}, {data['tokenizer_len']} tokens)")


def pad_only_tokenizer(pad_id: int):
    """A tokenizer that only pads (right side, with `pad_id`), for DataCollatorForSeq2Seq: the rows are token
    ids already, and padding never looks at the vocabulary."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    pad = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({pad: pad_id}, unk_token=pad)),
                                  pad_token=pad, padding_side="right")
    if tok.pad_token_id != pad_id:
        raise RuntimeError(f"pad-only tokenizer: pad id {tok.pad_token_id}, wanted {pad_id}")
    return tok


def train_chats(args, model, device, stats, data):
    """transformers' Trainer on the chat rows, as a user of the usual stack runs it (see the docstring)."""
    import collections
    import tempfile

    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    model = lora_model(args, model, stats)
    cuda = device.type == "cuda"
    rows = data["rows"]
    seq2seq = DataCollatorForSeq2Seq(pad_only_tokenizer(data["pad_id"]), padding="longest",
                                     label_pad_token_id=-100, return_tensors="pt")
    counts = collections.deque()  # per micro-batch, in the order the collator made them

    def collate(features):
        batch = seq2seq(features)
        counts.append((int(batch["attention_mask"].sum()), int((batch["labels"] != -100).sum()),
                       batch["input_ids"].numel()))
        return batch

    totals = [0, 0, 0]  # real (non-padding) input tokens, trained tokens, row positions fed to the model

    class CountingTrainer(Trainer):
        # The Trainer fetches each optimizer step's micro-batches before running them (and its data loader
        # may run one ahead), so the counts are matched to the micro-batches in order, as they are trained.
        def training_step(self, model, inputs, *a, **kw):
            for k, n in enumerate(counts.popleft()):
                totals[k] += n
            return super().training_step(model, inputs, *a, **kw)

    marks = []  # (time, optimizer step, *totals) at the start and at the end of every optimizer step
    logged = collections.defaultdict(list)  # the Trainer's per-step log: loss, grad_norm, learning_rate

    class Meter(TrainerCallback):
        def _mark(self, step):
            if cuda:
                torch.cuda.synchronize(device)  # the queued GPU work belongs to the steps already counted
            marks.append((time.perf_counter(), step, *totals))

        def on_train_begin(self, args_, state, control, **kw):
            self._mark(state.global_step)

        def on_step_end(self, args_, state, control, **kw):
            self._mark(state.global_step)

        def on_log(self, args_, state, control, logs=None, **kw):
            for key in ("loss", "grad_norm", "learning_rate"):
                if logs and key in logs:
                    logged[key].append(round(float(logs[key]), 6))

    with tempfile.TemporaryDirectory(prefix="usual_trainer_") as out_dir:
        targs = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum, gradient_checkpointing=args.ckpt, bf16=True,
            optim="adamw_torch", max_steps=args.max_steps, logging_steps=1, save_strategy="no", report_to="none",
            disable_tqdm=True, seed=args.seed, data_seed=args.seed, remove_unused_columns=False,
            label_names=["labels"], dataloader_num_workers=0, use_cpu=not cuda, **RECIPE)
        trainer = CountingTrainer(model=model, args=targs, train_dataset=rows, data_collator=collate,
                                  callbacks=[Meter()])
        try:
            trainer.train()
        finally:
            summarize_chats(args, marks, logged, stats)
    # the Trainer (re)applies checkpointing when training starts
    stats["grad_ckpt_active"] = bool(getattr(model.get_base_model(), "is_gradient_checkpointing", False))


def summarize_chats(args, marks, logged, stats):
    """Per-step times and the steady-state throughput (the steps after the first --skip-steps)."""
    stats["step_s"] = [round(b[0] - a[0], 3) for a, b in zip(marks, marks[1:])]
    stats["steps_done"] = marks[-1][1] - marks[0][1] if marks else 0
    stats.update({f"log_{k}": v for k, v in logged.items()})
    if len(marks) < 2 + args.skip_steps:
        return  # no step after the skipped ones: no throughput
    a, b = marks[args.skip_steps], marks[-1]
    seconds = b[0] - a[0]
    stats.update(steps_timed=b[1] - a[1], seconds=round(seconds, 3), tokens=b[2] - a[2],
                 trained_tokens=b[3] - a[3], padded_tokens=b[4] - a[4],
                 tokens_per_s=round((b[2] - a[2]) / seconds, 1),
                 trained_tokens_per_s=round((b[3] - a[3]) / seconds, 1),
                 padded_tokens_per_s=round((b[4] - a[4]) / seconds, 1))


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


def git_commit():
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def main(argv=None):
    args = parse_args(argv)
    data = None
    if args.chats is not None:
        # the chat file and the tokenizer are checked before anything heavy is loaded
        try:
            data = encode_chats(args)
            check_rows(data, (TINY_SHAPE if args.tiny else FULL_SHAPE)["vocab_size"])
        except BadInput as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    setup_paths(args)
    import torch

    torch.manual_seed(args.seed)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    if data is None:
        rec = {"stack": "usual", "seq": args.seq, "ckpt": bool(args.ckpt), "tok_s": None, "peak_gib": None,
               "lora_params": None, "steps": args.steps, "tiny": bool(args.tiny), "backend": args.backend}
    else:
        argv = sys.argv[1:] if argv is None else list(argv)
        rec = {"workload": WORKLOAD, "stack": "usual",
               "command": shlex.join(["python", "benchmarks/usual_stack.py", *argv]),
               "launched_by": os.environ.get("USUAL_LAUNCH"),
               "tokens_per_s": None, "trained_tokens_per_s": None, "peak_reserved_gib": None,
               "chats": args.chats, "n_chats": len(data["rows"]), "truncated_chats": data["truncated"],
               "chat_tokens_mean": round(sum(len(r["input_ids"]) for r in data["rows"]) / len(data["rows"]), 1),
               "tokenizer": data["tokenizer"], "max_len": args.max_len, "max_steps": args.max_steps,
               "skip_steps": args.skip_steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
               "ckpt": bool(args.ckpt), "bf16": True, "optim": "adamw_torch", "recipe": RECIPE,
               "tiny": bool(args.tiny), "backend": args.backend, "lora_params": None}
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
        if data is None:
            train_loop(args, model, device, stats)
        else:
            train_chats(args, model, device, stats, data)
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
        if data is not None:
            stats["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    rec.update({k: v for k, v in stats.items() if k not in rec or rec[k] is None})
    rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if data is not None:
        rec["date"] = rec["time"]
        rec["commit"] = git_commit()
    append(args.out, rec)
    return rc

if __name__ == "__main__":
    sys.exit(main())
