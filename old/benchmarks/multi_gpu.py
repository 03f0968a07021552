"""Multi-GPU runs through the real scripts (issue 8): DeepSpeed data-parallel Q-LoRA (ZeRO-2) on 1 and 2
processes and LoRA under ZeRO-3, as a user launches them (`bash scripts/finetune_qlora.sh ...` with GPUS and
DEEPSPEED set). Writes one JSON report:

- speed: Q-LoRA ZeRO-2, Qwen-14B-shaped random Int4 model, packed rows of --seq tokens, per-device batch 1,
  on 1 process (CUDA graphs) and on 2 (eager, the default there, and with --cuda_graphs True): steady tokens/s
  (run_info.json's throughput, after 2 warm-up steps), the ratios, peak memory per process; and, for
  reference, 1 GPU without DeepSpeed (CUDA graphs).
- grad_check: one SGD step at the same global batch (1 process x 2 rows against 2 x 1; dropout 0): the
  first step's LoRA update (-lr x gradient) of every adapter tensor compared, relative error.
- memorise: 2 processes repeat a 2-row batch; the loss must fall by several nats.
- zero3: LoRA on the bf16 model of the same shape under ZeRO-3 on 2 processes: speed, and the saved adapter
  (gathered, non-empty) reloads and runs.
Each run asserts the ZeRO stage and world size it asked for (from run_info.json).

  python benchmarks/multi_gpu.py --out $OUT/multi_gpu.json                       # on a 2-GPU machine
  python benchmarks/multi_gpu.py --shape tiny --cpu-procs 2 --out /tmp/mg.json   # the same path on CPU (gloo)
  python benchmarks/multi_gpu.py --single --out $OUT/mg1.json                    # one GPU: the 1-process runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu red green blue amber violet north "
         "south east west river stone cloud ember frost meadow harbor lantern quill saffron tundra").split()


def chat_data(path: Path, tokenizer, n: int, tokens: int, seed: int) -> Path:
    """n random conversations of about `tokens` tokens each (one user turn, one assistant turn)."""
    rng = random.Random(seed)
    per_word = len(tokenizer.encode(" ".join(WORDS))) / len(WORDS)
    words = max(4, int((tokens - 30) / per_word))  # 30: about the chat template and system prompt
    records = []
    for i in range(n):
        user = " ".join(rng.choice(WORDS) for _ in range(words // 4))
        answer = " ".join(rng.choice(WORDS) for _ in range(words - words // 4))
        records.append({"id": f"r{i}", "conversations": [{"from": "user", "value": user},
                                                         {"from": "assistant", "value": answer}]})
    path.write_text(json.dumps(records))
    return path


class Runner:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.port = 29600

    def run(self, name: str, script: str, model: Path, data: Path, procs: int, deepspeed: str | None,
            *flags: str) -> dict:
        out = self.work / name
        env = dict(os.environ, MASTER_PORT=str(self.port))
        self.port += 1
        if self.args.cpu_procs:
            env.update(NPROC=str(procs), CUDA_VISIBLE_DEVICES="")
        else:
            env["GPUS"] = ",".join(str(i) for i in range(procs))
        env.pop("DEEPSPEED", None)
        if deepspeed:
            env["DEEPSPEED"] = str(ROOT / "ds_configs" / f"{deepspeed}.json")
        a = self.args
        cmd = ["bash", str(ROOT / "scripts" / script), "-m", str(model), "-d", str(data), "-o", str(out),
               "--packing", "True", "--model_max_length", str(a.seq), "--per_device_train_batch_size", "1",
               "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--save_strategy", "no",
               "--report_to", "none", "--disable_tqdm", "True", "--seed", "0", "--lora_r", str(a.lora_r),
               "--lora_alpha", "16", "--gradient_checkpointing", "True", "--warmup_steps", "0",
               "--lr_scheduler_type", "constant", "--overwrite_output_dir", "True", *flags]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
        (self.work / f"{name}.log").write_text(proc.stdout + "\n" + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: exit {proc.returncode}; log in {self.work / (name + '.log')}:\n"
                               + proc.stderr[-3000:])
        info = json.loads((out / "run_info.json").read_text())
        state = json.loads((out / "trainer_state.json").read_text())
        info["losses"] = [h["loss"] for h in state["log_history"] if "loss" in h]
        info["wall_s"] = round(time.perf_counter() - t, 1)
        info["out"] = str(out)
        expect_stage = {"zero2": 2, "zero3": 3, None: None}[deepspeed]
        if info["world_size"] != procs or info["zero_stage"] != expect_stage:
            raise AssertionError(f"{name}: asked for {procs} processes and ZeRO {expect_stage}, ran "
                                 f"{info['world_size']} and {info['zero_stage']}")
        return info


def _speed(info: dict) -> dict:
    t = info.get("throughput") or {}
    return {"tokens_per_s": t.get("tokens_per_s"), "trained_tokens_per_s": t.get("trained_tokens_per_s"),
            "steps_timed": t.get("steps_timed"), "peak_reserved_gib_per_process": t.get("peak_reserved_gib_per_process"),
            "world_size": info["world_size"], "zero_stage": info["zero_stage"], "cuda_graphs": info.get("cuda_graphs"),
            "wall_s": info["wall_s"]}


def _adapter(out: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "adapter_model.safetensors"))


def grad_check(one: dict, two: dict, lr: float) -> dict:
    """The first SGD step's update of each adapter tensor, 1 process against 2 (the same initial adapter:
    same seed; B starts at zero, so its update is -lr x its gradient and A's update is zero)."""
    a, b = _adapter(one["out"]), _adapter(two["out"])
    errs, same_a = {}, True
    for k in a:
        if "lora_B" in k:
            ga, gb = -a[k].double() / lr, -b[k].double() / lr
            errs[k] = float((gb - ga).norm() / ga.norm().clamp_min(1e-30))
        else:
            same_a = same_a and bool((a[k] == b[k]).all())
    worst = max(errs.values())
    return {"lora_B_tensors": len(errs), "grad_rel_err_max": worst,
            "grad_rel_err_median": sorted(errs.values())[len(errs) // 2], "lora_A_identical": same_a,
            "ok": worst < 1e-2 and same_a}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["14b", "tiny"], default="14b")
    ap.add_argument("--cpu-procs", type=int, default=0, help="run on the CPU with this many processes (gloo)")
    ap.add_argument("--seq", type=int, default=None, help="packed row length (default 2048; tiny 128)")
    ap.add_argument("--steps", type=int, default=12, help="steps of the speed runs (2 are warm-up)")
    ap.add_argument("--memorise-steps", type=int, default=20)
    ap.add_argument("--lora-r", dest="lora_r", type=int, default=None, help="default 64 (tiny: 8)")
    ap.add_argument("--work", default="/tmp/multi_gpu")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    ap.add_argument("--skip", nargs="*", default=[], choices=["speed", "grad", "memorise", "zero3"])
    ap.add_argument("--single", action="store_true",
                    help="one GPU: only the one-process runs (a rehearsal of the 2-GPU run's set-up and speed runs)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    tiny = args.shape == "tiny"
    args.seq = args.seq or (128 if tiny else 2048)
    args.lora_r = args.lora_r or (8 if tiny else 64)
    procs = 2
    if args.single:
        args.skip = sorted(set(args.skip) | {"grad", "zero3"})
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from make_model_dir import make_model_dir

    from finetune.tokenization import load_tokenizer

    device = "cpu" if args.cpu_procs else "cuda"
    int4 = make_model_dir(work / f"{args.shape}-int4", args.shape, True, device)
    float_dir = None if "zero3" in args.skip else make_model_dir(work / f"{args.shape}-bf16", args.shape, False, device)
    tok = load_tokenizer(int4)
    # speed data: enough packed rows for every step of both processes; check data: exactly 2 rows
    many = chat_data(work / "chats.json", tok, n=8 * procs * args.steps, tokens=args.seq // 3, seed=1)
    two_rows = chat_data(work / "two_rows.json", tok, n=2, tokens=int(args.seq * 0.8), seed=2)
    rows = _packed_rows(tok, two_rows, args.seq)
    if rows != 2:
        raise SystemExit(f"the check data packs into {rows} rows of {args.seq} tokens, not 2")
    runner = Runner(args, work)
    report: dict = {"shape": args.shape, "seq": args.seq, "lora_r": args.lora_r, "cpu_procs": args.cpu_procs,
                    "device": "cpu" if args.cpu_procs else _gpu_name()}
    speed_flags = ("--max_steps", str(args.steps), "--learning_rate", "1e-4")

    def save():
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    if "speed" not in args.skip:
        s1 = _speed(runner.run("qlora_z2_1", "finetune_qlora.sh", int4, many, 1, "zero2", *speed_flags))
        s2 = None if args.single else _speed(
            runner.run("qlora_z2_2", "finetune_qlora.sh", int4, many, procs, "zero2", *speed_flags))
        # several processes replay graphs only when asked (not yet run on GPUs): both, for the comparison
        s2g = None if args.single else _speed(
            runner.run("qlora_z2_2_graphs", "finetune_qlora.sh", int4, many, procs, "zero2", *speed_flags,
                       "--cuda_graphs", "True"))
        ref = _speed(runner.run("qlora_1_graphs", "finetune_qlora.sh", int4, many, 1, None, *speed_flags))

        def ratio(a, b):
            return a["tokens_per_s"] / b["tokens_per_s"] if a and b and a["tokens_per_s"] and b["tokens_per_s"] \
                else None

        report["speed"] = {"one_process_zero2": s1, "two_processes_zero2": s2, "scaling": ratio(s2, s1),
                           "two_processes_zero2_graphs": s2g, "scaling_graphs": ratio(s2g, s1),
                           "one_process_no_deepspeed": ref}
        save()
    if "grad" not in args.skip:
        lr = 1e-2
        flags = ("--max_steps", "1", "--optim", "sgd", "--learning_rate", str(lr), "--max_grad_norm", "0",
                 "--lora_dropout", "0")
        one = runner.run("grad_1", "finetune_qlora.sh", int4, two_rows, 1, "zero2", *flags,
                         "--per_device_train_batch_size", "2")
        two = runner.run("grad_2", "finetune_qlora.sh", int4, two_rows, procs, "zero2", *flags)
        report["grad_check"] = grad_check(one, two, lr)
        save()
    if "memorise" not in args.skip:
        info = runner.run("memorise", "finetune_qlora.sh", int4, two_rows, 1 if args.single else procs, "zero2",
                          "--max_steps", str(args.memorise_steps), "--learning_rate", "1e-3" if not tiny else "1e-2")
        losses = info["losses"]
        report["memorise"] = {"losses": losses, "drop_nats": losses[0] - min(losses[-3:]),
                              "world_size": info["world_size"], "zero_stage": info["zero_stage"]}
        save()
    if "zero3" not in args.skip:
        info = runner.run("lora_z3_2", "finetune_lora.sh", float_dir, many, procs, "zero3", *speed_flags)
        weights = _adapter(info["out"])
        gathered = all(v.numel() > 0 for v in weights.values())
        b_nonzero = any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)
        report["zero3"] = {**_speed(info), "adapter_tensors": len(weights), "adapter_gathered": gathered,
                           "lora_B_trained": b_nonzero, "reload_runs": _reload_runs(float_dir, info["out"], device)}
        save()
    save()
    print(json.dumps(report, indent=1)[:4000])
    return 0


def _packed_rows(tokenizer, path, seq) -> int:
    from finetune.data import build_dataset

    rows, _ = build_dataset(tokenizer, path, seq, verbose=False, packing=True)
    return len(rows)


def _reload_runs(model_dir, adapter, device) -> bool:
    import torch

    from finetune import load_model

    model = load_model(model_dir, adapter=adapter, device=device)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]], device=device)).logits
    ok = bool(torch.isfinite(logits).all())
    del model
    return ok


def _gpu_name() -> str:
    import torch

    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
