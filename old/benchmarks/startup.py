"""Start-up time of the commands a user types first (CPU machine): wall seconds per run, median of N.

    python benchmarks/startup.py [--runs 7] [--out benchmarks/results/startup.json]

`qwen-ft --help` and `import finetune.data` load neither transformers' model code nor PEFT (the registrations
are post-import hooks, finetune/registry.py); `qwen-ft train --help` builds transformers' TrainingArguments
parser, which imports torch and transformers' trainer arguments: that is its cost, measured here beside them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "qwen-ft --help": [sys.executable, "-m", "finetune.cli", "--help"],
    "import finetune": [sys.executable, "-c", "import finetune"],
    "import finetune.data": [sys.executable, "-c", "import finetune.data"],
    "qwen-ft train --help": [sys.executable, "-m", "finetune.cli", "train", "--help"],
    "import torch (reference)": [sys.executable, "-c", "import torch"],
}


def time_command(cmd: list[str], runs: int) -> dict:
    subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)  # warm the file cache
    walls = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)
        walls.append(time.perf_counter() - t)
    return {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls), "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "startup.json"))
    args = ap.parse_args(argv)
    results = {name: time_command(cmd, args.runs) for name, cmd in COMMANDS.items()}
    for name, r in results.items():
        print(f"{name:<28} median {r['median_s']:.2f} s (min {r['min_s']:.2f}, max {r['max_s']:.2f})")
    record = {"date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0], "results": results}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
