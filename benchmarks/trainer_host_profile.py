"""Host time per optimizer step in the trainer around the model's forward and backward (cProfile).

Runs `finetune.train` (through QwenTrainer, as the scripts do) on the tiny demo model for --steps steps and
reports, per optimizer step, the milliseconds spent in each piece of transformers' loop that is not the model:
batch fetch, the trainer's own work in training_step, gradient clipping, the optimizer step, the scheduler,
zero_grad, the flops count, logging/saving. On the CPU the numbers are host time only (the tiny model's
compute is in "forward+backward"); on a GPU the same run shows where the host waits (a sync shows up as time in
the function that reads the value). Runs with any checkout on PYTHONPATH, so before/after can be compared:

    PYTHONPATH=. python benchmarks/trainer_host_profile.py --steps 200 [--optim adamw_torch_fused] [--gpu]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
from pathlib import Path

# (label, function name, a path fragment of its file); cumulative time per step
PIECES = [
    ("train loop (epochs, without setup and the end)", "_run_epoch", "transformers/trainer.py"),
    ("training_step (ours + transformers')", "training_step", "finetune/training/trainer.py"),
    ("forward+backward (transformers' training_step)", "training_step", "transformers/trainer.py"),
    ("batch fetch", "get_batch_samples", "transformers/trainer.py"),
    ("gradient clipping", "_clip_grad_norm", "transformers/trainer.py"),
    ("optimizer step (accelerate's, with the torch optimizer)", "step", "accelerate/optimizer.py"),
    ("scheduler step", "step", "torch/optim/lr_scheduler.py"),
    ("zero_grad", "zero_grad", "torch/nn/modules/module.py"),
    ("flops count", "floating_point_ops", ""),
    ("log/save/evaluate", "_maybe_log_save_evaluate", ""),
    ("guard at the optimizer step", "_begin_optimizer_step", ""),
    ("callbacks: step end", "on_step_end", "transformers/trainer_callback.py"),
]


def profile(steps: int, extra: list[str], gpu: bool) -> dict:
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    from _helpers import train_args, write_memorise

    from finetune.demo import make_demo_model
    from finetune.train import main

    tmp = Path(tempfile.mkdtemp(prefix="trainer_host_"))
    model = make_demo_model(tmp / "model")
    data = write_memorise(tmp / "d.json")
    argv = train_args(model, data, tmp / "out", "--use_lora", "True", "--max_steps", str(steps),
                      "--logging_steps", "1", "--per_device_train_batch_size", "1", *extra)
    if gpu:
        argv += ["--use_cpu", "False"]
    prof = cProfile.Profile()
    prof.enable()
    code = main(argv)
    prof.disable()
    if code != 0:
        raise SystemExit(f"training failed ({code})")
    stats = pstats.Stats(prof).stats
    out = {}
    for label, name, where in PIECES:
        total = sum(ct for (path, _, fn), (_, _, _, ct, _) in stats.items()
                    if fn == name and where in path.replace("\\", "/"))
        out[label] = round(1000 * total / steps, 3)
    out["trainer's own (training_step minus transformers')"] = round(
        out["training_step (ours + transformers')"] - out["forward+backward (transformers' training_step)"], 3)
    out["outside forward+backward"] = round(
        out["train loop (epochs, without setup and the end)"] - out["forward+backward (transformers' training_step)"], 3)
    info = json.loads((tmp / "out" / "run_info.json").read_text())
    return {"steps": steps, "argv_extra": extra, "ms_per_step": out, "optimizer": info.get("optimizer")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--gpu", action="store_true", help="train on the GPU (default: CPU)")
    ap.add_argument("--out", help="also write the JSON here")
    a, extra = ap.parse_known_args()
    result = profile(a.steps, extra, a.gpu)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
