"""`python -m finetune.training.launch [torchrun options] -m finetune.train [trainer flags]`: the training scripts'
launcher for several processes, or DeepSpeed on one.

It is torch.distributed.run, except for how a failed rank ends: torchrun raises ChildFailedError and prints a
traceback and a report box after the trainer's own `error: ...` line; here the trainer's line stands, and a
rank that died another way (a signal, an exception) gets one line naming it. The exit code is the rank's.
"""

from __future__ import annotations

import logging
import os
import sys

ERROR_EXIT = 2  # the trainer's exit code after printing its one-line error


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    # the agent logs each failure at ERROR before raising; the rank has said what went wrong
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    _cpu_threads(args)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = min(e.failures.items(), key=lambda kv: kv[1].timestamp)
        code = failure.exitcode
        if code != ERROR_EXIT:
            how = f"signal {failure.signal_name()}" if code < 0 else f"exit code {code}"
            print(f"error: training process of rank {rank} failed ({how}); its output is above", file=sys.stderr,
                  flush=True)
        return code if code > 0 else 1
    return 0


def _cpu_threads(args) -> None:
    """On the CPU, each process's share of the physical cores as its thread count, which accelerate otherwise
    sets itself with a warning (torchrun sets 1 only for several processes)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    if torch.cuda.is_available():
        return
    import psutil

    nproc = int(args.nproc_per_node) if str(args.nproc_per_node).isdigit() else 1
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // max(nproc, 1)))


if __name__ == "__main__":
    sys.exit(main())
