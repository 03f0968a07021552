"""Host time per optimizer step in the trainer around the model's forward and backward (cProfile).

Runs `finetune.train` (through QwenTrainer, as the scripts do) on the tiny demo model for --steps steps and
reports, per optimizer step, the milliseconds spent in each piece of transformers' loop that is not the model:
batch fetch, the trainer's own work in training_step, gradient clipping, the optimizer step, the scheduler,
zero_grad, the flops count, logging/saving. On the CPU the numbers are host time only (the tiny model's
compute is in "forward+backward"); on a GPU the same run shows where the host waits (a sync shows up as time in
the function that reads the value). Runs with any checkout on PYTHONPATH, so before/after can be compared:

    PYTHONPATH=. python benchmarks/trainer_host_profile.py --steps 200 [--optim adamw_torch_fused] [--gpu]

`--syncs` (GPU) also counts the CUDA syncs of the steady steps by the Python line that caused them: torch's sync
debug mode set to "warn" from the third optimizer step to the end of the loop, each warning's stack reduced to
its innermost frames in finetune, transformers and accelerate ("syncs_per_step"). With `--packing True`
(and CUDA graphs, the default) this is the graphed trainer path, where only logging should read values back.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import sys
import tempfile
import traceback
import warnings
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


class SyncSites:
    """CUDA syncs counted by Python site, from optimizer step `start` (0-based) to the end of the training loop
    (torch.cuda.set_sync_debug_mode("warn"): every synchronizing call warns)."""

    FRAMES = ("/finetune/", "/transformers/", "/accelerate/")

    def __init__(self, start: int = 2):
        self.start = start
        self.counts: dict[str, int] = {}
        self.steps = 0
        self._on = False

    def install(self, stack: contextlib.ExitStack) -> None:
        from finetune.training.throughput import ThroughputMeter
        from finetune.training.trainer import QwenTrainer

        step, end = QwenTrainer.training_step, ThroughputMeter.on_train_end
        watch = self

        def training_step(trainer, *a, **k):
            if not watch._on and trainer.state.global_step >= watch.start:
                watch._first = trainer.state.global_step
                watch._switch(True)
            return step(trainer, *a, **k)

        def on_train_end(meter, args, state, control, **k):
            if watch._on:
                watch._switch(False)
                watch.steps = state.global_step - watch._first
            return end(meter, args, state, control, **k)

        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("always")  # every sync, not the first of each line
        shown = warnings.showwarning
        warnings.showwarning = lambda message, category, *a, **k: (
            self._record() if "synchroniz" in str(message) else shown(message, category, *a, **k))
        QwenTrainer.training_step, ThroughputMeter.on_train_end = training_step, on_train_end
        stack.callback(setattr, QwenTrainer, "training_step", step)
        stack.callback(setattr, ThroughputMeter, "on_train_end", end)
        stack.callback(lambda: self._switch(False) if self._on else None)

    def _switch(self, on: bool) -> None:
        import torch

        torch.cuda.set_sync_debug_mode("warn" if on else "default")
        self._on = on

    def _record(self) -> None:
        frames = [f for f in traceback.extract_stack() if any(d in f.filename.replace("\\", "/")
                                                                    for d in self.FRAMES)]
        site = " <- ".join(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-3:])) or "?"
        self.counts[site] = self.counts.get(site, 0) + 1

    def per_step(self) -> dict:
        steps = max(self.steps, 1)
        return {"steps_watched": self.steps,
                "sites": {k: round(v / steps, 3) for k, v in sorted(self.counts.items(), key=lambda kv: -kv[1])}}


def _short(path: str) -> str:
    path = path.replace("\\", "/")
    for d in ("/finetune/", "/transformers/", "/accelerate/"):
        if d in path:
            return d.strip("/") + "/" + path.split(d, 1)[1]
    return path


def profile(steps: int, extra: list[str], gpu: bool, syncs: bool = False) -> dict:
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
    watch = SyncSites() if syncs else None
    with contextlib.ExitStack() as stack:
        if watch is not None:
            watch.install(stack)
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
    result = {"steps": steps, "argv_extra": extra, "ms_per_step": out, "optimizer": info.get("optimizer"),
              "cuda_graphs": info.get("cuda_graphs")}
    if watch is not None:
        result["syncs_per_step"] = watch.per_step()
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--gpu", action="store_true", help="train on the GPU (default: CPU)")
    ap.add_argument("--syncs", action="store_true",
                    help="count the CUDA syncs of the steady steps by Python site (needs --gpu)")
    ap.add_argument("--out", help="also write the JSON here")
    a, extra = ap.parse_known_args(argv)
    if a.syncs and not a.gpu:
        ap.error("--syncs counts CUDA syncs: it needs --gpu")
    result = profile(a.steps, extra, a.gpu, a.syncs)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
