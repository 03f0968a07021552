"""The seeded LoRA dropout kernel (finetune/training/seeded_dropout.py) alone, on the 14B step's LoRA inputs: us a
call and the rate of its bytes (read x, write y), beside a plain copy of the same tensor (the bandwidth it could
reach) and, with --old FILE, an earlier version of the module (e.g. `git show REV:finetune/training/seeded_dropout.py
> /tmp/old_sd.py`) timed in the same process. The launches are timed one after another without a CUDA graph, so
a small input measures the host (Python and Triton launch overhead, ~30 us), not the kernel (session 22: 30.5 us for
the hidden-size input with either kernel); use the large input, or a profile of the graphed step.

  python benchmarks/dropout_probe.py --old /tmp/old_sd.py --out benchmarks/results/dropout_probe.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import git_commit  # noqa: E402

SHAPES = {"hidden (c_attn, attn.c_proj, w1, w2 inputs)": (2048, 5120), "mlp.c_proj input": (2048, 13696)}


def _timed(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def _module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", help="an earlier seeded_dropout.py to time beside this one")
    ap.add_argument("--p", type=float, default=0.05)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    from finetune.training import seeded_dropout as new

    kernels = {"this tree": new}
    if args.old:
        kernels["old"] = _module(args.old, "old_seeded_dropout")
    seed = torch.tensor([1234], dtype=torch.int64, device="cuda")
    rows = []
    for label, shape in SHAPES.items():
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        gb = 2 * x.numel() * x.element_size() / 1e9
        entry = {"shape": list(shape), "what": label, "copy_us": round(_timed(lambda: x.clone()), 2)}
        for name, mod in kernels.items():
            us = _timed(lambda: mod.seeded_dropout_apply(x, seed, 7, args.p))
            y = mod.seeded_dropout_apply(x, seed, 7, args.p)
            entry[name] = {"us": round(us, 2), "tb_s": round(gb / us * 1e3, 3),
                           "dropped": round(float((y == 0).float().mean()), 5)}
        rows.append(entry)
        print(json.dumps(entry), flush=True)
    result = {"device": torch.cuda.get_device_name(), "p": args.p, "rows": rows, "commit": git_commit(),
              "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
