"""How far the engine's per-step logits move when only the LoRA product's rounding changes (NOTES step 39).

The GPU test `test_int4_adapters_added_in_the_gemv_epilogue_match_the_separate_kernels` compares the engine with the
LoRA computed inside the tensor-core GEMV (h = x A, then (h * sel) @ bt.T added before the output's rounding) against
the engine with it added by separate kernels (cuBLAS's h in bf16, then an addmm on the rounded output). This script
runs the same tiny model and batch with adapters of several random inits, four ways each, and prints, per request,
the largest relative norm of the per-step logit difference while the two runs' tokens agree:

  fused    the GEMV computes h and adds the product (the default)
  cublas   separate kernels: h = matmul in bf16 (cuBLAS), addmm on the bf16 output (the test's reference)
  fp32h    separate kernels, h = x A summed in fp32 and rounded to bf16 (the kernel's rule for h)
  exact    separate kernels, h in fp32 unrounded, the product added to the output in fp32 before one rounding

If fused agrees with fp32h and exact about as well as cublas does with them, the kernel computes what it should and
the spread against cublas is the model's sensitivity to rounding h; if fused stands apart from all three, it is wrong.

    python benchmarks/lora_rounding_check.py --out $OUT/lora_rounding.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests", ROOT / "tests" / "inference"):
    sys.path.insert(0, str(p))

from finetune.inference import SamplingParams  # noqa: E402
from finetune.inference import row_adapters  # noqa: E402
from finetune.settings import override  # noqa: E402
from finetune.tokenization import SMALL_VOCAB, QWenTokenizer  # noqa: E402

from test_inference_cuda import (  # noqa: E402
    _max_rel_while_agreeing, decode_recorded, epilogue_model, separate_lora_hook)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="the adapters' random inits")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from test_inference_engine import prompts

    tok = QWenTokenizer(str(SMALL_VOCAB))
    batch = prompts([5, 40, 12], seed=3)
    names = ["first", None, "second"]
    results = []
    for seed in args.seeds:
        pm = epilogue_model(seed)
        params = SamplingParams(max_new_tokens=args.steps)
        runs = {}
        with override(gptq_lora_epilogue=True):
            runs["fused"] = decode_recorded(pm, tok, batch, names, params)
        real = row_adapters.RowAdapters._hook
        with override(gptq_lora_epilogue=False):
            runs["cublas"] = decode_recorded(pm, tok, batch, names, params)
            for rule in ("fp32h", "exact"):
                row_adapters.RowAdapters._hook = separate_lora_hook(rule)
                try:
                    runs[rule] = decode_recorded(pm, tok, batch, names, params)
                finally:
                    row_adapters.RowAdapters._hook = real
        pairs = {}
        keys = list(runs)
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                worst = [round(w, 5) for w in _max_rel_while_agreeing(*runs[a], *runs[b])]
                pairs[f"{a} vs {b}"] = worst
                print(f"seed {seed}: {a:>7} vs {b:<7} per request (adapters {names}): {worst}")
        results.append({"seed": seed, "max_rel_logits": pairs})
    if args.out:
        from provenance import git_commit

        Path(args.out).write_text(json.dumps({"commit": git_commit(), "device": torch.cuda.get_device_name(),
                                              "adapters": names, "steps": args.steps, "runs": results},
                                             indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
