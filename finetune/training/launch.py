"""`python -m finetune.training.launch [torchrun options] -m finetune.train [trainer flags]`: the training scripts'
launcher for several processes, or DeepSpeed on one.

It is torch.distributed.run, except for how a failed rank ends: torchrun raises ChildFailedError and prints a
traceback and a report box after the trainer's own `error: ...` line; here the trainer's line is printed once, and
a rank that died another way (a signal, an exception) gets one line naming it. The exit code is the rank's. Ctrl-C
(or SIGTERM) ends the launch as it ends one process: rank 0's `interrupted: ...` line (where the last checkpoint is),
no traceback of torchrun's agent after it, and the exit code 128 + the signal's number.

A rank of this launcher does not print its one-line error itself (`say_error`): it leaves it in the reply file
torch elastic gives each process, and the launcher prints each distinct line once after the ranks have ended. Bad
input (a missing data file, a bad record, a wrong flag) is met by every rank alike, and each printed the same line;
a rank that printed only after another had failed could also be stopped before its line came out. A line that only
one rank met (its own device's memory) is printed as well.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

ERROR_EXIT = 2  # the trainer's exit code after its one-line error
LAUNCHED = "QWEN_FT_LAUNCHER"  # set for the ranks of this launcher: it prints their one-line errors


def _not_the_death_signal(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Received ")  # ("Received Signals.SIGINT death signal, shutting ...")


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    # the agent logs each failure at ERROR before raising; the rank has said what went wrong
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    # and a Ctrl-C as a warning, after rank 0's line that says where the last checkpoint is
    logging.getLogger("torch.distributed.elastic.agent.server.api").addFilter(_not_the_death_signal)
    _cpu_threads(args)
    os.environ[LAUNCHED] = "1"  # (the ranks inherit it)
    try:
        run(args)
    except SignalException as e:  # Ctrl-C or SIGTERM: the agent has stopped the ranks, which said their lines
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        # in the order they failed (a stable sort: the order the agent found them within a second)
        failures = sorted(e.failures.items(), key=lambda kv: kv[1].timestamp)
        for line in dict.fromkeys(error_lines(f for _, f in failures)):
            print(line, file=sys.stderr, flush=True)
        rank, failure = failures[0]
        code = failure.exitcode
        if code != ERROR_EXIT:
            how = f"signal {failure.signal_name()}" if code < 0 else f"exit code {code}"
            print(f"error: training process of rank {rank} failed ({how}); its output is above", file=sys.stderr,
                  flush=True)
        return code if code > 0 else 1
    return 0


def say_error(line: str) -> None:
    """A rank's one-line error: left in its reply file for the launcher to print (see above) when this launcher
    started it, else printed."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")  # ("" where torch elastic keeps no files)
    if os.environ.get(LAUNCHED) == "1" and path:
        try:
            with open(path, "w", encoding="utf-8") as f:
                # ("message" and "timestamp" as torch elastic reads the file; "line" is this launcher's)
                json.dump({"message": line, "timestamp": int(time.time()), "line": line}, f)
            return
        except OSError:
            pass  # (printed, then)
    print(line, file=sys.stderr, flush=True)


def error_lines(failures) -> list[str]:
    """The one-line errors ``say_error`` left for the launcher, of the failed processes (torch elastic's
    ProcessFailure) in that order, whatever their exit (one that aborted in its teardown after its line had said
    it all the same); a traceback torch elastic's own error handler recorded is no such line."""
    return [f.error_file_data["line"] for f in failures if isinstance(f.error_file_data.get("line"), str)]


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
