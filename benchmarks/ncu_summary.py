"""A short table of an Nsight Compute CSV (``ncu --csv --page details``, as benchmarks/tools_trial.sh writes it): per
profiled kernel its grid, duration, DRAM and SM throughput, occupancy, registers, issue rate and the warp stall
reasons that cost the most (cycles a warp waits per issued instruction, from
``smsp__average_warps_issue_stalled_*_per_issue_active``), and the label ncu_kernels.py printed for it.

    python benchmarks/ncu_summary.py results/ncu_<commit>.csv[.gz] [--stalls 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import re
import sys
from collections import OrderedDict

WANTED = {  # (section, metric) -> short name
    ("GPU Speed Of Light Throughput", "Duration"): "duration",
    ("GPU Speed Of Light Throughput", "DRAM Throughput"): "dram_pct",
    ("GPU Speed Of Light Throughput", "Compute (SM) Throughput"): "sm_pct",
    ("GPU Speed Of Light Throughput", "Memory Throughput"): "mem_pct",
    ("Occupancy", "Achieved Occupancy"): "occupancy_pct",
    ("Occupancy", "Theoretical Occupancy"): "theoretical_pct",
    ("Launch Statistics", "Registers Per Thread"): "registers",
    ("Launch Statistics", "Waves Per SM"): "waves",
    ("Scheduler Statistics", "Issued Warp Per Scheduler"): "issued_per_scheduler",
    ("Scheduler Statistics", "No Eligible"): "no_eligible_pct",
    ("Warp State Statistics", "Warp Cycles Per Issued Instruction"): "cycles_per_issue",
    ("Memory Workload Analysis", "Memory Throughput"): "dram_bytes_per_s",
    ("Memory Workload Analysis", "L2 Hit Rate"): "l2_hit_pct",
    ("Instruction Statistics", "Executed Instructions"): "instructions",
}
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio")


def read(path: str) -> list[dict]:
    kernels: OrderedDict = OrderedDict()
    with (gzip.open(path, "rt", newline="") if path.endswith(".gz") else open(path, newline="")) as f:
        lines = [line for line in f if line.startswith('"')]  # the program's own output lines are not CSV rows
    for row in csv.DictReader(lines):
        k = kernels.setdefault(row["ID"], {"id": int(row["ID"]), "kernel": row["Kernel Name"][:40],
                                           "grid": row.get("Grid Size"), "block": row.get("Block Size"),
                                           "stalls": {}})
        name, value, unit = row.get("Metric Name", ""), row.get("Metric Value", ""), row.get("Metric Unit", "")
        try:
            number = float(value.replace(",", ""))
        except ValueError:
            continue
        m = STALL.fullmatch(name)
        if m:
            k["stalls"][m.group(1)] = number
            continue
        short = WANTED.get((row.get("Section Name", ""), name))
        if short:
            k[short] = number if not unit else f"{number:g} {unit}"
    return list(kernels.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--stalls", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    kernels = read(args.csv)
    if not kernels:
        print(f"{args.csv}: no profiled kernels in it", file=sys.stderr)
        return 1
    for k in kernels:
        top = sorted(k["stalls"].items(), key=lambda kv: -kv[1])[: args.stalls]
        fields = {key: v for key, v in k.items() if key not in ("stalls", "id", "kernel")}
        print(f"[{k['id']}] {k['kernel']} " + ", ".join(f"{key}={v}" for key, v in fields.items()))
        print("    stalls (cycles a warp waits per issue): " + ", ".join(f"{n} {v:.2f}" for n, v in top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(kernels, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
