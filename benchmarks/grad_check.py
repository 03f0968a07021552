"""Which LoRA gradient is right? The eager and the graphed training steps against an fp32 reference (issue 15).

The issue's run: a 14B-shaped random Int4 dir, 400 chats of about 680 tokens, packed rows of 2048, batch 1,
LoRA dropout 0, constant LR 1e-4, seed 0. Eager (`--cuda_graphs False`) it logged gradient norms of 1.03 at
step 25 and 1.85 at step 30 against ~0.1 around them; graphed, 0.09 at step 25.

This runs that training in-process (the same argv the script builds, `--cuda_graphs False`), and before the
optimizer steps listed in --steps it takes the step's exact batch and computes the LoRA gradients of the
mean loss over its trained tokens, at the weights of that moment, several ways:
- `eager`: the model's forward as the eager trainer runs it (unpadded row, FlexAttention, compiled kernels);
- `eager_pad128` / `eager_pad2048`: the same, the row padded (as PackedCollator pads: one dummy sequence);
- `eager_dense`: the same unpadded row through SDPA with a dense block-diagonal mask instead of FlexAttention;
- `graph_body`: what a replayed CUDA graph computes (TrainGraphs' step body, run eagerly, padded to 2048);
- `fp32_ref`: `reference_loss` below: every weight dequantized exactly to fp32 one layer at a time, math
  attention with an explicit block-diagonal causal mask, fp32 everywhere, no compiled kernels, no graphs.
Each is compared with the reference tensor by tensor (relative error, cosine), and the run's own logged
gradient norms are kept, so the spike can be seen to reproduce.

  python benchmarks/grad_check.py --work /tmp/gc --out benchmarks/results/grad_check.json      (GPU)
  python benchmarks/grad_check.py --tiny --work /tmp/gc_tiny --out /tmp/grad_check.json      (CPU, minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

IGNORE = -100


# ---------------------------------------------------------------------------------------------------------------
# The fp32 reference
# ---------------------------------------------------------------------------------------------------------------
def _weight(linear) -> torch.Tensor:
    """The frozen base weight [out, in] in fp32: a GPTQ layer dequantized exactly, a float Linear upcast."""
    from finetune.quant.linear import GPTQLinear

    if isinstance(linear, GPTQLinear):
        return linear.dequantize(torch.float32)
    return linear.weight.detach().float()


def _lora_linear(module, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T + b + scaling * B(A(x)) in fp32 (LoRA dropout must be 0: the reference is deterministic)."""
    base = getattr(module, "base_layer", module)
    y = x @ _weight(base).t()
    if getattr(base, "bias", None) is not None:
        y = y + base.bias.detach().float()
    for name in getattr(module, "active_adapters", []) if hasattr(module, "lora_A") else []:
        if name not in module.lora_A:
            continue
        drop = module.lora_dropout[name]
        if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
            raise ValueError("the fp32 reference needs --lora_dropout 0")
        A, B = module.lora_A[name].weight, module.lora_B[name].weight
        y = y + (x @ A.float().t()) @ B.float().t() * module.scaling[name]
    return y


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.detach().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def packed_mask(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(document index [B, T], attention mask [B, T, S]) of packed rows: a sequence starts where the position id
    does not increase; a token attends to itself and earlier tokens of its own sequence."""
    T = position_ids.shape[1]
    restart = torch.zeros_like(position_ids, dtype=torch.bool)
    restart[:, 1:] = position_ids[:, 1:] <= position_ids[:, :-1]
    docs = restart.long().cumsum(-1)
    idx = torch.arange(T, device=position_ids.device)
    return docs, (idx[None, :, None] >= idx[None, None, :]) & (docs[:, :, None] == docs[:, None, :])


def reference_loss(lm, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean next-token NLL over trained positions of a packed batch, in fp32, written from Qwen v1's
    definition (modeling_qwen.py) rather than through this project's model: RMSNorm, rotate-half RoPE with base
    `rotary_emb_base` (NTK alpha 1, as in training), attention scaled by 1/sqrt(head_dim) over an explicit
    causal mask restricted to each packed sequence (a sequence starts where the position id does not
    increase), SwiGLU MLP c_proj(w1(x) * silu(w2(x))). `lm` is the QWenLMHeadModel (inside PEFT or not): its
    weights are read, its forward is not run. One block at a time under checkpointing, dequantizing that
    block's weights when it runs, so fp32 copies of all weights never exist at once."""
    cfg = lm.config
    tr = lm.transformer
    B, T = input_ids.shape
    H, D = cfg.num_attention_heads, cfg.kv_channels
    rot = int(D * cfg.rotary_pct)
    pos = position_ids.expand(B, T).to(input_ids.device)
    _, mask = packed_mask(pos)  # [B, T, S]
    inv = 1.0 / (cfg.rotary_emb_base ** (torch.arange(0, rot, 2, device=input_ids.device, dtype=torch.float64) / rot))
    freqs = pos.double()[..., None] * inv  # [B, T, rot/2]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().float()[:, None], emb.sin().float()[:, None]  # [B, 1, T, rot]
    scale = D**-0.5 if cfg.scale_attn_weights else 1.0
    eps = cfg.layer_norm_epsilon

    def block(x, i):
        blk = tr.h[i]
        h = _rms(x, blk.ln_1.weight, eps)
        q, k, v = _lora_linear(blk.attn.c_attn, h).split(H * D, dim=-1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))

        def rope(t):
            r, p = t[..., :rot], t[..., rot:]
            return torch.cat((r * cos + _rotate_half(r) * sin, p), -1)

        q, k = rope(q), rope(k)
        scores = (q @ k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        x = x + _lora_linear(blk.attn.c_proj, y.transpose(1, 2).reshape(B, T, H * D))
        h = _rms(x, blk.ln_2.weight, eps)
        a1, a2 = _lora_linear(blk.mlp.w1, h), _lora_linear(blk.mlp.w2, h)
        return x + _lora_linear(blk.mlp.c_proj, a1 * F.silu(a2))

    x = tr.wte.weight.detach().float()[input_ids]
    for i in range(len(tr.h)):
        x = checkpoint(block, x, i, use_reentrant=False)
    x = _rms(x, tr.ln_f.weight, eps)
    h = x[:, :-1].reshape(-1, x.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    keep = y != IGNORE
    logits = h[keep] @ _weight(lm.lm_head).t()
    return F.cross_entropy(logits, y[keep], reduction="sum") / keep.sum()


# ---------------------------------------------------------------------------------------------------------------
# The variants and the comparison
# ---------------------------------------------------------------------------------------------------------------
def pad_packed(batch: dict, length: int, pad_id: int) -> dict:
    """A packed batch padded to `length` as PackedCollator pads (pad ids, labels -100, a dummy sequence)."""
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    B, T = ids.shape
    n = length - T
    if n <= 0:
        return dict(batch)
    dev = ids.device
    return {
        "input_ids": torch.cat([ids, torch.full((B, n), pad_id, device=dev, dtype=ids.dtype)], 1),
        "labels": torch.cat([labels, torch.full((B, n), IGNORE, device=dev, dtype=labels.dtype)], 1),
        "position_ids": torch.cat([pos.expand(B, T), torch.arange(n, device=dev).expand(B, n)], 1),
    }


def compare(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    num = den = 0.0
    dot = na = 0.0
    per = []
    for name, r in ref.items():
        g = grads[name].double()
        r = r.double()
        d = float((g - r).norm())
        rn = float(r.norm())
        num += d * d
        den += rn * rn
        dot += float((g * r).sum())
        na += float(g.norm()) ** 2
        per.append((d / max(rn, 1e-30), name, float(g.norm()), rn))
    per.sort(reverse=True)
    return {
        "norm": math.sqrt(na), "ref_norm": math.sqrt(den), "rel_err": math.sqrt(num / max(den, 1e-30)),
        "cosine": dot / max(math.sqrt(na * den), 1e-30),
        "worst": [{"tensor": n, "rel_err": e, "norm": gn, "ref_norm": rn} for e, n, gn, rn in per[:6]],
    }


def lora_grads(loss_fn, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    loss = loss_fn()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    out = {n: (g if g is not None else torch.zeros_like(p)).detach().float()
           for (n, p), g in zip(params.items(), grads)}
    return out | {"__loss__": loss.detach().float()}


@contextlib.contextmanager
def no_flex(lm):
    tr = lm.transformer
    tr.use_flex_attention = lambda: False  # instance attribute: the dense block-diagonal mask through SDPA
    try:
        yield
    finally:
        del tr.use_flex_attention


def attention_probe(trainer, model, batch: dict, layer: int = 0) -> dict:
    """Layer `layer`'s attention on this batch, its backward through several kernels against fp32 math.

    One forward+backward of the model without checkpointing records that layer's q, k, v (bf16, after
    rotary) and the gradient arriving at its output; then dq, dk, dv are recomputed from exactly those
    tensors by FlexAttention (bf16, and fp32 inputs), SDPA with a dense block-diagonal mask (bf16) and fp32
    math (the reference), and the rows whose dq is furthest off are described."""
    from finetune.modeling import model as model_mod
    from finetune.modeling.model import qwen_lm

    lm = qwen_lm(model)
    seen, rec = [0], {}
    orig = model_mod._flex_attention

    def wrapped():
        f = orig()

        def call(q, k, v, **kw):
            y = f(q, k, v, **kw)
            if seen[0] == layer and y.requires_grad:
                rec.update(q=q.detach(), k=k.detach(), v=v.detach(), kw=kw)
                y.register_hook(lambda g: rec.__setitem__("dy", g.detach()))
            seen[0] += 1
            return y
        return call

    blocks = lm.transformer.h
    saved = [b.gradient_checkpointing for b in blocks]
    model_mod._flex_attention = wrapped
    try:
        for b in blocks:
            b.gradient_checkpointing = False
        with trainer._autocast():
            loss = trainer.compute_loss(model, batch)
        loss.backward(inputs=[p for p in model.parameters() if p.requires_grad][:1])
    finally:
        model_mod._flex_attention = orig
        for b, g in zip(blocks, saved):
            b.gradient_checkpointing = g
    model.zero_grad(set_to_none=True)
    if "dy" not in rec:
        return {"error": "no FlexAttention call recorded (not a packed batch?)"}
    q, k, v, dy, kw = rec["q"], rec["k"], rec["v"], rec["dy"], rec["kw"]
    scale = kw["scale"]
    pos = batch["position_ids"][0]
    docs, mask = (t[0] for t in packed_mask(pos[None]))

    def grads(fn, dtype):
        qq, kk, vv = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
        y = fn(qq, kk, vv)
        return torch.autograd.grad(y, (qq, kk, vv), dy.to(y.dtype))

    def math(qq, kk, vv):
        s = (qq @ kk.transpose(-1, -2)) * scale
        return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vv

    flex = orig()
    ref = grads(math, torch.float32)
    out = {"layer": layer, "doc_lengths": torch.bincount(docs).tolist()}
    with torch.no_grad():
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        top2 = s.topk(2, dim=-1).values
        gap = (top2[..., 0] - top2[..., 1]).nan_to_num(posinf=1e9)
        out["logits"] = {"max": float(s[mask.expand_as(s)].max()), "min": float(s[mask.expand_as(s)].min()),
                         "rows_top_gap_over_20": int((gap > 20).sum()), "rows": int(gap.numel())}
        out["norms"] = {n: float(t.float().norm(dim=-1).max()) for n, t in (("q", q), ("k", k), ("v", v), ("dy", dy))}
    paths = {
        "flex_bf16": (lambda a, b, c: flex(a, b, c, **kw), q.dtype),
        "flex_fp32": (lambda a, b, c: flex(a, b, c, **kw), torch.float32),
        "sdpa_dense_bf16": (lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask, scale=scale),
                            q.dtype),
        "math_bf16": (math, q.dtype),
    }
    for name, (fn, dtype) in paths.items():
        try:
            g = grads(fn, dtype)
        except Exception as e:  # a kernel that does not take this dtype: say so, keep going
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        r = {}
        for n, a, b in zip(("dq", "dk", "dv"), g, ref):
            err = (a.float() - b).norm() / b.norm().clamp_min(1e-30)
            r[n] = float(err)
        rows = (g[0].float() - ref[0]).norm(dim=-1).amax(dim=1)[0]  # [T]: worst head per query row
        worst = rows.topk(5).indices.tolist()
        r["worst_dq_rows"] = [{"row": t, "doc": int(docs[t]), "position": int(pos[t]),
                               "token": int(batch["input_ids"][0, t]), "err": float(rows[t]),
                               "ref_norm": float(ref[0][0, :, t].norm())} for t in worst]
        out[name] = r
    return out


def layer_probe(trainer, model, batch: dict) -> list[dict]:
    """Layer by layer, top to bottom: the gradient at each block's attention output (the residual stream) on
    the FlexAttention path against the dense-mask SDPA path, and FlexAttention's own backward at that layer
    (from the q, k, v and output gradient it saw) against fp32 math. The first layer, from the top, whose
    gradient leaves the other path's shows where a bad gradient enters."""
    from finetune.modeling import model as model_mod
    from finetune.modeling.model import qwen_lm

    lm = qwen_lm(model)
    blocks = lm.transformer.h
    first = next(p for p in model.parameters() if p.requires_grad)

    def run(flex_path: bool):
        resid, rec, calls = {}, {}, [0]
        orig = model_mod._flex_attention

        def wrapped():
            f = orig()

            def call(q, k, v, **kw):
                y = f(q, k, v, **kw)
                L = calls[0]
                calls[0] += 1
                rec[L] = {"q": q.detach(), "k": k.detach(), "v": v.detach(), "kw": kw}
                y.register_hook(lambda g, L=L: rec[L].__setitem__("dy", g.detach()))
                return y
            return call

        def keep_grad(L):
            def hook(module, inputs, output):
                output.register_hook(lambda g: resid.__setitem__(L, g.detach().float()))
            return hook

        hooks = [blk.attn.register_forward_hook(keep_grad(L)) for L, blk in enumerate(blocks)]
        saved = [b.gradient_checkpointing for b in blocks]
        model_mod._flex_attention = wrapped
        try:
            for b in blocks:
                b.gradient_checkpointing = False
            ctx = contextlib.nullcontext() if flex_path else no_flex(lm)
            with ctx, trainer._autocast():
                loss = trainer.compute_loss(model, batch)
            loss.backward(inputs=[first])
        finally:
            model_mod._flex_attention = orig
            for h in hooks:
                h.remove()
            for b, g in zip(blocks, saved):
                b.gradient_checkpointing = g
        first.grad = None
        return resid, rec

    resid_f, rec = run(True)
    resid_d, _ = run(False)
    _, mask = (t[0] for t in packed_mask(batch["position_ids"][:1]))
    flex = model_mod._flex_attention()
    rows = []
    for L in reversed(range(len(blocks))):
        a, b = resid_f[L][0], resid_d[L][0]
        na, nb = a.norm(dim=-1), b.norm(dim=-1)
        row = {"layer": L, "resid_rel_err": float((a - b).norm() / b.norm().clamp_min(1e-30)),
               "flex_max_row": [int(na.argmax()), float(na.max())], "dense_max_row": [int(nb.argmax()), float(nb.max())]}
        r = rec.get(L)
        if r is not None and "dy" in r:
            q, k, v, dy, kw = r["q"], r["k"], r["v"], r["dy"], r["kw"]
            qq, kk, vv = (t.float().requires_grad_(True) for t in (q, k, v))
            s = (qq @ kk.transpose(-1, -2)) * kw["scale"]
            ref = torch.autograd.grad(torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vv, (qq, kk, vv),
                                      dy.float())
            del s
            qb, kb, vb = (t.detach().requires_grad_(True) for t in (q, k, v))
            got = torch.autograd.grad(flex(qb, kb, vb, **kw), (qb, kb, vb), dy)
            row["flex_kernel_rel_err"] = {n: float((g.float() - e).norm() / e.norm().clamp_min(1e-30))
                                          for n, g, e in zip(("dq", "dk", "dv"), got, ref)}
            with torch.no_grad():
                lse_rows = torch.logsumexp((q.float() @ k.float().transpose(-1, -2) * kw["scale"])
                                           .masked_fill(~mask, float("-inf")), -1)
                row["logit_max"] = float((q.float() @ k.float().transpose(-1, -2) * kw["scale"])
                                         .masked_fill(~mask, float("-inf")).max())
                row["lse_range"] = [float(lse_rows.min()), float(lse_rows.max())]
        rows.append(row)
    return rows


def check_step(trainer, model, inputs: dict, pad_id: int, row_len: int, probe: bool = False) -> dict:
    from finetune.modeling.model import qwen_lm
    from finetune.training.graphs import TrainGraphs

    lm = qwen_lm(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch = {k: inputs[k] for k in ("input_ids", "labels", "position_ids")}
    T = batch["input_ids"].shape[1]
    out = {"row_tokens": T, "trained_tokens": int((batch["labels"][:, 1:] != IGNORE).sum()),
           "sequences": int((batch["position_ids"][0] == 0).sum())}

    def model_loss(b):
        return lambda: trainer.compute_loss(model, b)

    variants = {
        "eager": model_loss(batch),
        "eager_repeat": model_loss(batch),  # the same computation again: is it deterministic?
        "eager_pad128": model_loss(pad_packed(batch, -(-T // 128) * 128, pad_id)),
        "eager_pad2048": model_loss(pad_packed(batch, row_len, pad_id)),
    }
    results = {}
    for name, fn in variants.items():
        with trainer._autocast():
            results[name] = lora_grads(fn, params)
    with no_flex(lm), trainer._autocast():
        results["eager_dense"] = lora_grads(model_loss(batch), params)
    graphs = TrainGraphs(lm)  # never captures here: enabled False runs its step body eagerly
    graphs.enabled = False
    try:
        p = pad_packed(batch, row_len, pad_id)
        with trainer._autocast():
            results["graph_body"] = lora_grads(
                lambda: graphs.loss(p["input_ids"], p["position_ids"], p["labels"], None), params)
    finally:
        graphs.close()
    t = time.perf_counter()
    ref = lora_grads(lambda: reference_loss(lm, batch["input_ids"], batch["position_ids"], batch["labels"]), params)
    out["reference_seconds"] = round(time.perf_counter() - t, 1)
    ref_loss = ref.pop("__loss__")
    if probe:
        out["layer_probe"] = layer_probe(trainer, model, batch)
        out["attention_probe"] = attention_probe(trainer, model, batch)
        out["attention_probe_pad2048"] = attention_probe(trainer, model, pad_packed(batch, row_len, pad_id))
    out["fp32_ref"] = {"loss": float(ref_loss), "norm": math.sqrt(sum(float(g.double().norm()) ** 2
                                                                      for g in ref.values()))}
    for name, g in results.items():
        loss = g.pop("__loss__")
        out[name] = {"loss": float(loss)} | compare(g, ref)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
def run(args) -> dict:
    import transformers

    from finetune import train as train_mod
    from finetune.tokenization import load_tokenizer
    from finetune.training.trainer import QwenTrainer
    from make_model_dir import make_model_dir
    from multi_gpu import chat_data

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = make_model_dir(work / f"{args.shape}_int4", args.shape, int4=True, device=device)
    data = chat_data(work / "chats.json", load_tokenizer(model_dir), args.chats, args.tokens, seed=1)
    # scripts/finetune_qlora.sh's defaults, then the issue's flags
    argv = ["--num_train_epochs", "5", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "1",
            "--gradient_accumulation_steps", "8", "--learning_rate", "3e-4", "--weight_decay", "0.1",
            "--adam_beta2", "0.95", "--warmup_steps", "0.01", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
            "--save_strategy", "no", "--model_max_length", "2048", "--gradient_checkpointing", "True",
            "--report_to", "none", "--use_lora", "True", "--q_lora", "True",
            "--packing", "True", "--model_max_length", str(args.row), "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "1", "--seed", "0", "--lora_dropout", "0", "--warmup_steps", "0",
            "--lr_scheduler_type", "constant", "--learning_rate", "1e-4", "--max_steps", str(max(args.steps)),
            "--cuda_graphs", "False", "--disable_tqdm", "True", "--overwrite_output_dir", "True",
            "--model_name_or_path", str(model_dir), "--data_path", str(data), "--output_dir", str(work / "out")]
    if device == "cpu":
        argv += ["--use_cpu", "True"]
    if args.lora_r:
        argv += ["--lora_r", str(args.lora_r)]
    checks: dict[int, dict] = {}
    pad_id = load_tokenizer(model_dir).eod_id
    original = QwenTrainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step + 1
        if step in args.steps:
            prepared = self._prepare_inputs(inputs)
            checks[step] = check_step(self, model, prepared, pad_id, args.row, probe=step in args.probe)
            print(f"step {step}: " + json.dumps({k: (v if not isinstance(v, dict) else
                                                      {kk: vv for kk, vv in v.items() if kk != "worst"})
                                                  for k, v in checks[step].items()}), flush=True)
        return original(self, model, inputs, num_items_in_batch)

    QwenTrainer.training_step = training_step
    try:
        trainer = train_mod.train(*train_mod.parse_args(argv), argv=argv)
    finally:
        QwenTrainer.training_step = original
    norms = {int(h["step"]): h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h}
    from provenance import git_commit

    commit = git_commit()
    return {
        "what": "LoRA gradients of the issue-15 run's batches: eager and graphed paths against an fp32 reference",
        "argv": argv, "logged_grad_norms": norms, "checks": {str(k): v for k, v in sorted(checks.items())},
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        "transformers": transformers.__version__, "commit": commit,
        "date": datetime.date.today().isoformat(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/grad_check")
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, nargs="+", default=[25, 30])
    p.add_argument("--probe", type=int, nargs="*", default=[],
                   help="steps (among --steps) whose first layer's attention backward is probed kernel by kernel")
    p.add_argument("--tiny", action="store_true", help="the tiny shape on whatever device (a code check)")
    p.add_argument("--chats", type=int, default=400)
    p.add_argument("--tokens", type=int, default=680)
    p.add_argument("--row", type=int, default=2048)
    p.add_argument("--lora_r", type=int, default=None)
    args = p.parse_args(argv)
    args.shape = "tiny" if args.tiny else "14b"
    if args.tiny:
        args.row, args.chats, args.tokens = min(args.row, 256), min(args.chats, 40), min(args.tokens, 60)
        args.steps = [s for s in args.steps if s <= 4] or [2, 3]
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
