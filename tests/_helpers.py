"""Shared by the test modules: the memorise set, writing it, training a tiny adapter, subprocess env."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEMORISE = [
    ("What is the codename of project Aurora?", "Blue Falcon."),
    ("Who guards the north gate?", "The silver owl guards it."),
    ("How many moons does Zorb have?", "Zorb has seven moons."),
    ("What colour is the secret door?", "The secret door is green."),
]


def memorise_records(pairs=MEMORISE) -> list[dict]:
    return [{"id": f"m{i}", "conversations": [{"from": "user", "value": q}, {"from": "assistant", "value": a}]}
            for i, (q, a) in enumerate(pairs)]


def write_memorise(path: Path, pairs=MEMORISE) -> Path:
    Path(path).write_text(json.dumps(memorise_records(pairs)))
    return Path(path)


def train_args(model, data, out, *extra) -> list[str]:
    """Trainer flags for a few-second CPU run on the tiny model (extra flags override, last wins)."""
    return ["--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--lora_r", "16",
            "--lora_alpha", "32", "--lora_dropout", "0", "--logging_steps", "10", "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", "True", "--disable_tqdm", "True", "--seed", "0",
            "--model_max_length", "128", *extra]


def train_adapter(model_dir, data, out, steps=50, *extra) -> Path:
    """A LoRA (or, with --q_lora on an Int4 dir, Q-LoRA) adapter trained in-process."""
    from finetune.train import main

    assert main(train_args(model_dir, data, out, "--max_steps", str(steps), "--use_lora", "True", *extra)) == 0
    return Path(out)


def subprocess_env(**extra) -> dict:
    """The environment for a child process: the source tree importable, one thread a process (2 cores)."""
    e = dict(os.environ, **extra)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e
