"""Training speed on the path users run (issue 15): `bash scripts/finetune_qlora.sh -m DIR -d DATA -o OUT` with
the script's defaults, plus only what a workload names and `--max_steps`, on a Qwen-14B-shaped random Int4 dir.

Workloads (`--workloads`, default all):
  short_default     2,000 conversations of 100-600 tokens, the script's defaults
  short_padded      the same, --packing False
  rows2048_ckpt     400 chats of about 680 tokens (packed into 2048-token rows), --per_device_train_batch_size 1
                    --gradient_accumulation_steps 16
  rows2048_no_ckpt  the same, --gradient_checkpointing False
  rows2048_zero2    rows2048_ckpt under DeepSpeed ZeRO-2 on one GPU (DEEPSPEED=ds_configs/zero2.json)
The figure is run_info.json's steady-state throughput (the optimizer steps after the first two): real tokens
(padding excluded) per second, and the peak memory the process reserved. Each entry keeps the exact command.
The usual stack's figure on the same short chats comes from benchmarks/usual_stack.py (run_usual.sh).

  python benchmarks/user_path.py --out benchmarks/results/user_path.json              (GPU, about 2-3 min each)
  python benchmarks/user_path.py --tiny --work /tmp/up --out /tmp/up.json            (CPU code check)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from multi_gpu import WORDS, chat_data  # noqa: E402
from provenance import git_commit  # noqa: E402

WORKLOADS = {
    # name: (data, flags, environment); steps come from --steps (one value, or name=N)
    "short_default": ("short", [], {}),
    "short_padded": ("short", ["--packing", "False"], {}),
    "rows2048_ckpt": ("long", ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "16"], {}),
    "rows2048_no_ckpt": ("long", ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "16",
                                  "--gradient_checkpointing", "False"], {}),
    "rows2048_zero2": ("long", ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "16"],
                       {"DEEPSPEED": "ds_configs/zero2.json"}),
}
DEFAULT_STEPS = {"short_default": 10, "short_padded": 12, "rows2048_ckpt": 8, "rows2048_no_ckpt": 8,
                 "rows2048_zero2": 8}


def short_chats(path: Path, tokenizer, n: int, lo: int, hi: int, seed: int = 0) -> Path:
    """n conversations (one user turn, one reply) whose token counts are spread evenly over [lo, hi]."""
    rng = random.Random(seed)
    per_word = len(tokenizer.encode(" ".join(WORDS))) / len(WORDS)
    records = []
    for i in range(n):
        words = max(4, int((rng.randint(lo, hi) - 30) / per_word))  # 30: template and system prompt
        user = " ".join(rng.choice(WORDS) for _ in range(max(1, words // 4)))
        answer = " ".join(rng.choice(WORDS) for _ in range(words - words // 4))
        records.append({"id": f"s{i}", "conversations": [{"from": "user", "value": user},
                                                         {"from": "assistant", "value": answer}]})
    path.write_text(json.dumps(records))
    return path


def run_workload(name: str, model: Path, data: Path, work: Path, steps: int, extra: list[str], timeout: int,
                 device_name: str) -> dict:
    _, flags, env_add = WORKLOADS[name]
    out = work / f"out_{name}"
    cmd = ["bash", "scripts/finetune_qlora.sh", "-m", str(model), "-d", str(data), "-o", str(out), *flags,
           "--max_steps", str(steps), "--overwrite_output_dir", "True", "--save_strategy", "no", *extra]
    env = dict(os.environ, **env_add)
    shown = " ".join(f"{k}={v}" for k, v in env_add.items()) + (" " if env_add else "") + shlex.join(cmd)
    print(f"== {name}: {shown}", flush=True)
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, log = proc.returncode, proc.stdout + "\n" + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, log = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    wall = round(time.perf_counter() - t, 1)
    (work / f"{name}.log").write_text(log)
    entry = {"workload": name, "command": shown, "steps": steps, "wall_s": wall, "device": device_name,
             "commit": git_commit(), "date": datetime.date.today().isoformat()}
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "FINETUNE_COMPACT_EMBEDDING"):  # settings that change the figures
        if os.environ.get(var):
            entry[var] = os.environ[var]
    info_path = out / "run_info.json"
    if rc != 0 or not info_path.is_file():
        entry.update(error=f"exit {rc}", log_tail=log[-2500:])
        print(f"   failed ({rc}):\n{log[-2500:]}", flush=True)
        return entry
    info = json.loads(info_path.read_text())
    speed = info.get("throughput") or {}
    peaks = speed.get("peak_reserved_gib_per_process") or [None]
    allocated = speed.get("peak_allocated_gib_per_process") or [None]
    state = json.loads((out / "trainer_state.json").read_text()) if (out / "trainer_state.json").is_file() else {}
    entry.update(
        tokens_per_s=speed.get("tokens_per_s"), trained_tokens_per_s=speed.get("trained_tokens_per_s"),
        padded_tokens_per_s=speed.get("padded_tokens_per_s"), peak_reserved_gib=peaks[0],
        peak_allocated_gib=allocated[0], input_embedding=info.get("input_embedding"),
        checkpointing=info.get("checkpointing"),
        steps_timed=speed.get("steps_timed"), seconds_timed=speed.get("seconds"),
        cuda_graphs=info.get("cuda_graphs"), zero_stage=info.get("zero_stage"), batches=info.get("batches"),
        optimizer=info.get("optimizer"),
        losses=[h["loss"] for h in state.get("log_history", []) if "loss" in h],
        grad_norms=[h["grad_norm"] for h in state.get("log_history", []) if "grad_norm" in h])
    print(f"   {entry['tokens_per_s']} tok/s real, {entry['peak_reserved_gib']} GiB reserved "
          f"({entry['peak_allocated_gib']} allocated), {wall} s wall", flush=True)
    return entry


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--steps", nargs="*", default=[], help="N for all, or NAME=N")
    p.add_argument("--work", default="/tmp/user_path")
    p.add_argument("--out", default=None, help="JSON list; entries of the same workload are replaced")
    p.add_argument("--tiny", action="store_true", help="the tiny shape (CPU code check)")
    p.add_argument("--timeout", type=int, default=420, help="seconds per workload")
    p.add_argument("--extra", default="", help="more trainer flags for every workload (shell words)")
    args = p.parse_args(argv)

    import torch

    from finetune.tokenization import load_tokenizer
    from make_model_dir import make_model_dir

    steps = dict(DEFAULT_STEPS)
    for s in args.steps:
        if "=" in s:
            k, v = s.split("=", 1)
            steps[k] = int(v)
        else:
            steps = {k: int(s) for k in steps}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    shape = "tiny" if args.tiny else "14b"
    model = make_model_dir(work / f"{shape}_int4", shape, int4=True, device="cuda" if cuda else "cpu")
    tok = load_tokenizer(model)
    if args.tiny:
        data = {"short": short_chats(work / "short.json", tok, 64, 20, 100),
                "long": chat_data(work / "long.json", tok, 24, 60, seed=1)}
        extra = ["--model_max_length", "256"]
    else:
        data = {"short": short_chats(work / "short.json", tok, 2000, 100, 600),
                "long": chat_data(work / "long.json", tok, 400, 680, seed=1)}
        extra = []
    extra += shlex.split(args.extra)

    results = []
    out = Path(args.out) if args.out else None
    if out and out.is_file():
        results = [e for e in json.loads(out.read_text()) if e.get("workload") not in args.workloads]
    for name in args.workloads:
        results.append(run_workload(name, model, data[WORKLOADS[name][0]], work, steps[name], extra,
                                    args.timeout, device_name))
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all("error" not in e for e in results) else 1


if __name__ == "__main__":
    sys.exit(main())
