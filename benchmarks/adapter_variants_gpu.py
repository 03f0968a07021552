"""Adapter layouts on the GPU decode engine against PEFT's own forward (a correctness check, not a speed figure).

The CPU tests compare the engine with `generate()` for every adapter layout, but on the CPU the engine runs eagerly;
on CUDA it runs its own kernels (the LoRA GEMVs, the per-row adapter tables). This runs each layout (rslora,
rank_pattern / alpha_pattern, layers_to_transform, modules_to_save, lm_head, c_proj only, r=64, r=40) on a small
Int4 model (group 128, hidden 256) in bf16: greedy tokens of engine rows with the adapter, and base rows beside them,
against PEFT's `generate()` with and without the adapter. bf16 rounding can flip a near tie late in a reply; a
layout applied wrongly diverges within the first tokens, in every row. The logit gap between the top two tokens
of the reference at a divergence says which.

    python benchmarks/adapter_variants_gpu.py --out $OUT/adapter_variants.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "rank_alpha_pattern": {"rank_pattern": {"c_attn": 8, "h.1.mlp.w2": 2}, "alpha_pattern": {"w1": 32}},
    "layers_to_transform": {"layers_to_transform": [1]},
    "modules_to_save": {"modules_to_save": ["wte", "lm_head"]},
    "norms_saved": {"targets": ("c_attn",), "modules_to_save": ["ln_1", "ln_f"]},
    "lm_head": {"targets": ("c_attn", "lm_head")},
    "c_proj_only": {"targets": ("c_proj",)},
    "r64": {"r": 64, "alpha": 16},
    "r40_no_c_proj": {"r": 40, "alpha": 16, "targets": ("c_attn", "w1", "w2")},
}
PROMPT = [1841, 872, 198, 100, 200, 300, 17, 5, 9, 77]
NEW = 24


def _perturb_saved_modules(adapter: Path) -> None:
    """modules_to_save copies are saved equal to the base: move them so that using them (or not) shows."""
    from safetensors.torch import load_file, save_file

    f = adapter / "adapter_model.safetensors"
    sd, g = load_file(f), torch.Generator().manual_seed(7)
    for k, v in sd.items():
        if "lora_" not in k:
            sd[k] = v + 0.3 * torch.randn(v.shape, generator=g) * max(v.float().std().item(), 0.3)
    save_file(sd, f, metadata={"format": "pt"})


def _reference(model, device) -> tuple[list[int], list[float]]:
    """PEFT's greedy tokens and, at each, the gap between its top two logits."""
    ids, gaps = list(PROMPT), []
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
            top = logits.topk(2)
            gaps.append(float(top.values[0] - top.values[1]))
            ids.append(int(top.indices[0]))
    return ids[len(PROMPT):], gaps


def _first_difference(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), -1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", help="cuda (the check); cpu runs the script's own path quickly")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = ap.parse_args()
    from _helpers import random_adapter

    from finetune import load_model, load_tokenizer
    from finetune.demo import make_demo_model
    from finetune.inference import Engine, SamplingParams

    work = Path(tempfile.mkdtemp(prefix="adapter_variants_"))
    base = make_demo_model(work / "base", int4=True, group_size=128, hidden_size=256, intermediate_size=1024,
                           kv_channels=64)
    tokenizer = load_tokenizer(base)
    params = SamplingParams(max_new_tokens=NEW, do_sample=False, repetition_penalty=1.0)
    results = []
    for name in args.variants:
        kw = dict(VARIANTS[name])
        adapter = random_adapter(base, work / name, targets=kw.pop("targets", ("c_attn", "c_proj", "w1", "w2")),
                                 r=kw.pop("r", 4), alpha=kw.pop("alpha", 8), **kw)
        if "modules_to_save" in kw:
            _perturb_saved_modules(adapter)
        entry = {"variant": name}
        try:
            model = load_model(base, adapter=adapter, dtype=torch.bfloat16, device=args.device)
            ref, ref_gaps = _reference(model, args.device)
            with model.disable_adapter():
                base_ref, base_gaps = _reference(model, args.device)
            entry["adapter_differs_from_base_at"] = _first_difference(ref, base_ref)
            entry["batches"] = []
            for rows in (["default"], ["default", None, "default"], ["default"] * 10):
                engine = Engine(model, tokenizer, max_batch=16)
                reqs = [engine.submit(PROMPT, params, adapter=a) for a in rows]
                while engine.has_work():
                    engine.step()
                batch = {"rows": len(rows), "adapter_rows": [], "base_rows": []}
                for r in reqs:
                    want, gaps = (ref, ref_gaps) if r.adapter else (base_ref, base_gaps)
                    at = _first_difference(r.output_ids, want)
                    batch["adapter_rows" if r.adapter else "base_rows"].append(
                        {"first_difference": at, "reference_gap": gaps[at] if at >= 0 else None})
                entry["batches"].append(batch)
            del model
        except Exception as e:  # noqa: BLE001  (a variant that fails is a finding: record it, go on)
            entry["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
        results.append(entry)
        compact = entry.get("error") or [
            (b["rows"], [r["first_difference"] for r in b["adapter_rows"]],
             [r["first_difference"] for r in b["base_rows"]]) for b in entry["batches"]]
        print(name, "differs from base at", entry.get("adapter_differs_from_base_at"), compact, flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    Path(args.out).write_text(json.dumps({"device": device, "variants": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
