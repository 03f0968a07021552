"""The training scripts' launcher (finetune/training/launch.py): a bad input that every rank meets is one error line,
printed by the launcher once the ranks have ended, and the launch exits with the rank's code."""

import json
import os
import subprocess

import pytest

from finetune.training import launch

from _helpers import ROOT, free_port, train_args


def _failure(tmp_path, rank, exitcode, message=None, timestamp=0):
    """torch elastic's record of a failed process, with the reply file ``say_error`` writes (none: no message)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / f"error_{rank}.json"
    if message is not None:
        error_file.write_text(json.dumps({"message": message, "timestamp": timestamp, "line": message}))
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(error_file))


def test_a_ranks_error_is_left_for_this_launcher_and_printed_under_any_other(model, tmp_path, capsys, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from finetune.train import main

    missing = tmp_path / "missing.json"
    reply = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(reply))  # (torchrun gives each process one)
    line = f"error: --data_path {missing}: no such file"

    monkeypatch.setenv(launch.LAUNCHED, "1")
    assert main(train_args(model, missing, tmp_path / "out")) == 2
    assert capsys.readouterr().err == ""
    # the file as torch elastic reads it for the launcher
    assert launch.error_lines([ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(reply))]) == [line]

    reply.unlink()
    monkeypatch.delenv(launch.LAUNCHED)  # plain torchrun, or no launcher: the rank says it
    assert main(train_args(model, missing, tmp_path / "out")) == 2
    assert capsys.readouterr().err == line + "\n" and not reply.exists()


def _launch(failures: dict, capsys, monkeypatch) -> tuple[int, str]:
    """(exit code, stderr) of the launcher whose ranks failed as ``failures`` (rank -> ProcessFailure) say."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    def failed(args):
        assert os.environ[launch.LAUNCHED] == "1"  # (what the ranks inherit)
        raise ChildFailedError("finetune.train", failures)

    monkeypatch.setattr(torch.distributed.run, "run", failed)
    monkeypatch.setenv(launch.LAUNCHED, "")  # (restored after the test)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = launch.main(["--nproc_per_node", str(len(failures)), "-m", "finetune.train"])
    return code, capsys.readouterr().err


def test_the_launcher_prints_each_ranks_error_line_once_in_the_order_they_failed(tmp_path, capsys, monkeypatch):
    bad = "error: --data_path d.json, record 3, line 3: no assistant turn: nothing to train on or score"
    own = "error: out of memory while loading the model (cuda:2 ...)"
    failures = {0: _failure(tmp_path, 0, 2, bad, 100), 1: _failure(tmp_path, 1, 2, bad, 100),
                2: _failure(tmp_path, 2, 2, own, 101), 3: _failure(tmp_path, 3, -15)}  # (stopped by the agent)
    assert _launch(failures, capsys, monkeypatch) == (2, f"{bad}\n{own}\n")


def test_a_rank_that_died_another_way_is_named_after_the_lines_left(tmp_path, capsys, monkeypatch):
    import time

    bad = "error: --lora_r must be positive, got 0"
    own = "error: out of memory in optimizer step 3 (cuda:2 ...)"
    later = int(time.time()) + 60  # (a failure without a reply file is stamped when the agent finds it)
    failures = {1: _failure(tmp_path, 1, -9), 0: _failure(tmp_path, 0, 2, bad, later),
                2: _failure(tmp_path, 2, -6, own, later)}  # (its line left, then aborted in its teardown)
    code, err = _launch(failures, capsys, monkeypatch)
    assert code == 1 and err == (f"{bad}\n{own}\nerror: training process of rank 1 failed (signal SIGKILL); its "
                                 "output is above\n")
    # a traceback that torch elastic's own error handler recorded is no line of ours
    traceback = {"message": {"message": "RuntimeError: x", "extraInfo": {"py_callstack": "...", "timestamp": "0"}}}
    (tmp_path / "error_0.json").write_text(json.dumps(traceback))
    assert _launch({0: _failure(tmp_path, 0, 2)}, capsys, monkeypatch) == (2, "")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_ends_the_launch_without_torchruns_traceback(sig, capsys, monkeypatch):
    """Ctrl-C on an NPROC=2 or DeepSpeed run: after rank 0's "interrupted: ... continue with --resume True" came the
    agent's warning and a traceback of its SignalException, and the exit code 1 (one process: that line, 130)."""
    import logging
    import signal

    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def interrupted(args):
        number = getattr(signal, sig)
        logging.getLogger("torch.distributed.elastic.agent.server.api").warning(
            "Received %s death signal, shutting down workers", number)
        raise SignalException(f"Process 1 got signal: {int(number)}", sigval=number)

    monkeypatch.setattr(torch.distributed.run, "run", interrupted)
    monkeypatch.setenv(launch.LAUNCHED, "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = launch.main(["--nproc_per_node", "2", "-m", "finetune.train"])
    assert (code, capsys.readouterr().err) == (128 + int(getattr(signal, sig)), "")


@pytest.mark.parametrize("bad", ["missing file", "bad record"])
def test_two_processes_through_the_script_print_a_bad_inputs_error_once(model, tmp_path, bad):
    """NPROC=2 through scripts/finetune_lora.sh (torchrun, DeepSpeed over gloo): each rank printed the line."""
    pytest.importorskip("deepspeed")  # (several processes train under DeepSpeed; the script requires it)
    data = tmp_path / "data.json"
    if bad == "bad record":
        data.write_text(json.dumps([{"conversations": [{"from": "user", "value": "hi"}]}]))
    env = dict(os.environ, NPROC="2", MASTER_PORT=str(free_port()), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "finetune_lora.sh"), "-m", str(model), "-d", str(data),
                           "-o", str(tmp_path / "out"), "--max_steps", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
    expected = (f"error: --data_path {data}: no such file" if bad == "missing file" else
                f"error: --data_path {data}, record 1, line 1: no assistant turn: nothing to train on or score")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and lines == [expected], proc.stdout[-2000:] + proc.stderr[-4000:]
