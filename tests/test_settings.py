"""The FINETUNE_* switches read from the environment (finetune/settings.py)."""

import pytest

from finetune.settings import ENV, SettingsError, from_environ, yes_no


def test_yes_no_words():
    assert [yes_no(w) for w in ("1", "true", " YES ", "On")] == [True] * 4
    assert [yes_no(w) for w in ("0", "False", "no ", "OFF")] == [False] * 4
    for bad in ("2", "maybe", ""):
        with pytest.raises(ValueError):
            yes_no(bad)


def test_switches_from_the_environment():
    s = from_environ({ENV["compile"]: " off ", ENV["cuda_graphs"]: "1", ENV["gptq_backend"]: "Torch",
                      ENV["compact_embedding"]: ""})  # empty: the default
    assert (s.compile, s.cuda_graphs, s.gptq_backend, s.compact_embedding) == (False, True, "torch", True)
    with pytest.raises(SettingsError, match=r"^FINETUNE_COMPILE='maybe': expected 1 or 0$"):
        from_environ({ENV["compile"]: "maybe"})
    with pytest.raises(SettingsError, match="FINETUNE_GPTQ_BACKEND='cuda': expected one of auto, triton, torch"):
        from_environ({ENV["gptq_backend"]: "cuda"})


def test_the_environment_is_read_as_it_is_when_asked(monkeypatch):
    # from_environ's default was os.environ as bound at import: once something replaced os.environ (something in
    # the test suite's process does), switches set afterwards were never seen
    import os

    monkeypatch.setattr(os, "environ", dict(os.environ, **{ENV["compile"]: "maybe"}))
    with pytest.raises(SettingsError, match="FINETUNE_COMPILE='maybe'"):
        from_environ()


@pytest.mark.parametrize("entry", ["cli", "train"])
def test_a_bad_switch_stops_a_command_in_one_line_before_it_starts(entry, tmp_path, monkeypatch, capsys):
    # it was a traceback from wherever the switch was first read: for the trainer, run_info.json, after training
    import finetune.settings
    import finetune.train
    from finetune.cli import main as cli_main

    monkeypatch.setattr(finetune.settings, "_current", None)  # read the environment again, as a new process
    monkeypatch.setenv(ENV["cuda_graphs"], "x")
    monkeypatch.setattr(finetune.train, "train", lambda *a, **k: pytest.fail("the run started"))
    argv = ["-m", str(tmp_path / "model"), "-d", str(tmp_path / "data.json"), "-o", str(tmp_path / "out")]
    rc = cli_main(["chat", *argv[:2]]) if entry == "cli" else finetune.train.main(argv)
    assert rc == 2 and capsys.readouterr().err == "error: FINETUNE_CUDA_GRAPHS='x': expected 1 or 0\n"


def test_a_misspelt_or_retired_switch_is_named_not_silently_ignored(monkeypatch, capsys):
    # FINETUNE_CUDA_GRAPH=0 was ignored without a word: the run captured graphs the user meant to switch off
    import finetune.settings
    from finetune.cli import main as cli_main
    from finetune.settings import unknown_switches

    env = {"FINETUNE_CUDA_GRAPH": "0", "FINETUNE_PDL": "0", "FINETUNE_ZZZ": "1", ENV["compile"]: "0", "HOME": "/x"}
    assert unknown_switches(env) == [
        "FINETUNE_CUDA_GRAPH is not a qwen-finetune switch (did you mean FINETUNE_CUDA_GRAPHS?); it is ignored",
        "FINETUNE_PDL is no longer a switch (removed); it is ignored",
        "FINETUNE_ZZZ is not a qwen-finetune switch (the switches: " + ", ".join(sorted(ENV.values()))
        + "); it is ignored"]
    assert unknown_switches({ENV["compile"]: "0"}) == []
    monkeypatch.setattr(finetune.settings, "_current", None)
    monkeypatch.setenv("FINETUNE_CUDA_GRAPH", "0")
    with pytest.raises(SystemExit):  # (argparse's --help exits)
        cli_main(["chat", "--help"])
    assert "warning: FINETUNE_CUDA_GRAPH is not a qwen-finetune switch (did you mean FINETUNE_CUDA_GRAPHS?)" in (
        capsys.readouterr().err)
