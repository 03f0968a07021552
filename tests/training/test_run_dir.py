"""A run's output dir: finished runs stay finished, checkpoints are resumed only when complete and of the same
run, overwriting clears the old run (and never other files), one run at a time, the demo replaces only demo
outputs; what a run leaves there (console log, model card, final eval) and what an interrupted run says."""

import fcntl
import json
import logging
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from finetune.data.encoding import MIN_MAX_LEN
from finetune.demo import make_demo_model
from finetune.train import main as train_main
from finetune.training.arguments import parse_args
from finetune.training.checks import LOCK_FILE, TrainConfigError, checkpoint_problem, preflight, start_from
from finetune.training.trainer import QwenTrainer

from _helpers import ROOT, subprocess_env, train_args

STEPS4 = ["--use_lora", "True", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
          "--logging_steps", "1"]


@pytest.fixture(scope="module")
def finished(model, data, tmp_path_factory):
    """A finished 4-step LoRA run with checkpoint-2 and checkpoint-4, evaluated on an eval set. Read-only:
    tests copy it."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    assert train_main(train_args(model, data, out, *STEPS4, "--eval_data_path", str(data))) == 0
    return out


def _copy(src, dst, finished_marker=True):
    shutil.copytree(src, dst)
    if not finished_marker:  # as a run killed after its last checkpoint
        (dst / "training_finished.json").unlink()
    return dst


def _snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def _preflight(argv):
    return preflight(*parse_args(argv))


def _one_line(err):
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# -- what a finished run leaves: eval at the end, model card, console log, released lock ----------------------

def test_eval_set_is_evaluated_at_the_end_without_eval_strategy(finished):
    info = json.loads((finished / "run_info.json").read_text())
    assert info["eval_loss"] is not None and math.isfinite(info["eval_loss"])
    state = json.loads((finished / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "eval_loss" in h] == [4]


def test_an_eval_set_that_is_the_training_data_is_warned_about(model, data, tmp_path, caplog):
    copy = tmp_path / "held out.json"  # the same content under another name
    copy.write_bytes(Path(data).read_bytes())
    other = tmp_path / "other.json"
    other.write_text(json.dumps(json.loads(Path(data).read_text())[:2]))
    for eval_path, warned in ((copy, True), (other, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert train_main(train_args(model, data, tmp_path / eval_path.stem, "--use_lora", "True", "--max_steps",
                                         "1", "--eval_data_path", str(eval_path))) == 0
        assert (f"--eval_data_path {eval_path} holds the same conversations as --data_path {data}: its loss measures"
                in caplog.text) is warned


def test_an_eval_file_that_the_training_data_also_reads_is_warned_about(model, data, tmp_path, caplog):
    # `-d data/ --eval_data_path data/heldout.json`: the directory trains on the held-out file too, and its loss was
    # reported as a held-out loss without a word (a copy of it among the training files is the same)
    records = json.loads(Path(data).read_text())
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.json").write_text(json.dumps(records[2:]))
    (d / "heldout.json").write_text(json.dumps(records[:2]))
    copy = tmp_path / "heldout-copy.json"
    copy.write_bytes((d / "heldout.json").read_bytes())
    other = tmp_path / "other.json"
    other.write_text(json.dumps(records[:1]))
    for eval_path, warned in ((d / "heldout.json", f"{d / 'heldout.json'} is"),
                              (f"{copy},{other}", f"{copy} (as {d / 'heldout.json'}) is"), (other, None)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert train_main(train_args(model, str(d), tmp_path / f"out{len(str(eval_path))}", "--use_lora", "True",
                                         "--max_steps", "1", "--eval_data_path", str(eval_path))) == 0
        expected = (f"--eval_data_path {eval_path}: {warned} read by --data_path {d} too (trained on): its loss is not "
                    "a held-out loss")
        assert (expected in caplog.text) if warned else "held-out loss" not in caplog.text, caplog.text


def test_model_card_describes_the_run(finished, model, data):
    card = (finished / "README.md").read_text()
    assert "More Information Needed" not in card  # not PEFT's empty template
    assert str(model) in card and str(data) in card
    assert "4 conversations used" in card and "r 16" in card
    info = json.loads((finished / "run_info.json").read_text())
    assert f"{info['eval_loss']:.4f}" in card
    assert "python -m finetune.train --model_name_or_path" in card and "--eval_data_path" in card
    assert "![loss curve](loss_curve.png)" in card and "| 4 |" in card


def test_model_card_describes_the_adapter_trained_on_and_a_resumed_runs_mean(finished, model, data, tmp_path):
    """--lora_weight_path trains the adapter's own LoRA (r 16 here) whatever the flags say: the card said the flags'
    r. A resumed run's train_loss is the mean since the resume (transformers'), which the card called the run's."""
    out = tmp_path / "on"
    argv = train_args(model, data, out, "--use_lora", "True", "--max_steps", "2", "--lora_weight_path", str(finished))
    for flag in ("--lora_r", "--lora_alpha"):  # (left to their defaults, 64 and 16, as the scripts' users leave them)
        i = argv.index(flag)
        del argv[i:i + 2]
    assert train_main(argv) == 0
    card = (out / "README.md").read_text()
    assert "- LoRA: r 16, alpha 32" in card and "r 64" not in card
    assert f"- Started from the adapter `{finished}` (--lora_weight_path" in card  # (not trained from scratch)
    run = _copy(finished, tmp_path / "run", finished_marker=False)
    assert train_main(train_args(model, data, run, *STEPS4, "--eval_data_path", str(data), "--resume_from_checkpoint",
                                 str(run / "checkpoint-2"))) == 0
    card = (run / "README.md").read_text()
    assert "mean over the steps since the resume from checkpoint-2" in card
    assert f"- Resumed from `{run / 'checkpoint-2'}`" in card


def test_model_card_names_the_base_and_the_output_by_absolute_paths(model, data, tmp_path, monkeypatch):
    """`-m .` (in the model dir) and a relative -o: the card said "Base model: `.`" and "qwen-ft chat -m . --adapter
    out", which works from no other dir (the card is read from anywhere)."""
    import shlex

    import os

    monkeypatch.chdir(model)
    out = tmp_path / "relative out"
    assert train_main(train_args(".", data, os.path.relpath(out), "--use_lora", "True", "--max_steps", "1")) == 0
    card = (out / "README.md").read_text()
    assert f"- Base model: `{Path(model).resolve()}`" in card
    assert f"qwen-ft chat -m {shlex.quote(str(Path(model).resolve()))} --adapter {shlex.quote(str(out))}" in card


def test_model_card_says_why_a_short_run_has_no_loss_curve(model, data, tmp_path):
    # `qwen-ft train` without the scripts' --logging_steps 1 logs every 500 steps (transformers' default): a short
    # run's card had an empty "Loss curve" section and no loss_curve.png, without a word why
    out = tmp_path / "short"
    assert train_main(train_args(model, data, out, "--use_lora", "True", "--max_steps", "2",
                                 "--logging_steps", "500")) == 0
    card = (out / "README.md").read_text()
    section = card.split("## Loss curve", 1)[1].split("## Use", 1)[0]
    assert "No train loss was logged: the run took 2 optimizer step(s), and --logging_steps 500" in section
    assert not (out / "loss_curve.png").exists()


def test_console_log_is_kept_in_the_output_dir_and_lock_released(finished):
    log = (finished / "train.log").read_text()
    assert "data: " in log and "'loss':" in log and "Done." in log
    with open(finished / LOCK_FILE, "a+") as f:  # the run is over: its lock is free
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# -- item 3: a finished run is finished ------------------------------------------------------------------------

def test_resume_on_a_finished_run_changes_nothing(finished, model, data, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    before = _snapshot(run)
    for flags in (["--resume", "True"], ["--resume", "True", "--max_steps", "8", "--learning_rate", "1e-2"],
                  ["--resume_from_checkpoint", str(run / "checkpoint-4")]):
        assert train_main(train_args(model, data, run, *STEPS4, *flags)) == 2
        line = _one_line(capsys.readouterr().err)
        assert "has finished" in line and "nothing was changed" in line and "--output_dir" in line
    assert _snapshot(run) == before


def test_the_finished_runs_way_on_quotes_a_path_with_a_space(finished, model, data, tmp_path, capsys):
    """The flags the refusal hands the user are copied into a shell: "--lora_weight_path out dir/run" split there."""
    import shlex

    run = _copy(finished, tmp_path / "out dir" / "run")
    assert train_main(train_args(model, data, run, *STEPS4, "--resume", "True")) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--lora_weight_path {shlex.quote(str(run))}" in line and "'" in line
    assert f"--resume_from_checkpoint {shlex.quote(str(run / 'checkpoint-4'))}" in line


def test_continuing_a_finished_run_goes_into_a_new_dir(finished, model, data, tmp_path, capsys):
    """The documented ways on: a new dir from the old adapter, or from the old run's last full state."""
    plan = _preflight(train_args(model, data, tmp_path / "next", *STEPS4, "--lora_weight_path", str(finished)))
    assert plan.resume_from is None
    before = _snapshot(finished)
    new = tmp_path / "continued"
    assert train_main(train_args(model, data, new, *STEPS4, "--max_steps", "6",
                                 "--resume_from_checkpoint", str(finished / "checkpoint-4"))) == 0
    assert f"resuming from {finished / 'checkpoint-4'} (step 4)" in capsys.readouterr().out
    state = json.loads((new / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h][-2:] == [5, 6]
    # steps 5 and 6 on the 6-step linear schedule (step 5 applied the finished 4-step schedule's 0: it trained nothing)
    lrs = [h["learning_rate"] for h in state["log_history"] if "loss" in h][-2:]
    assert lrs == pytest.approx([5e-3 * 2 / 6, 5e-3 * 1 / 6])
    assert _snapshot(finished) == before


# -- item 7: an incomplete checkpoint is never resumed -----------------------------------------------------------

def test_incomplete_checkpoint_falls_back_to_the_previous_one(finished, model, data, tmp_path, capsys, caplog):
    run = _copy(finished, tmp_path / "run", finished_marker=False)
    (run / "checkpoint-4" / "optimizer.pt").unlink()
    with caplog.at_level(logging.WARNING):
        assert train_main(train_args(model, data, run, *STEPS4, "--resume", "True")) == 0
    assert "checkpoint-4 is not usable (incomplete: optimizer.pt is missing); falling back to checkpoint-2" \
        in caplog.text
    assert f"resuming from {run / 'checkpoint-2'} (step 2)" in capsys.readouterr().out
    state = json.loads((run / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h][-2:] == [3, 4]
    # said in train.log too, with the data summary printed before the run took its dir (the console had them only)
    log = (run / "train.log").read_text()
    fell_back = log.rindex("checkpoint-4 is not usable (incomplete: optimizer.pt is missing)")
    assert "records: 4 read, 4 used" in log[fell_back:]
    assert fell_back < log.index(f"resuming from {run / 'checkpoint-2'}")


@pytest.mark.parametrize("missing", ["rng_state.pth", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                                     "adapter_model.safetensors"])
def test_without_a_complete_checkpoint_resume_names_the_missing_file(finished, model, data, tmp_path, missing):
    run = _copy(finished, tmp_path / "run", finished_marker=False)
    shutil.rmtree(run / "checkpoint-2")
    (run / "checkpoint-4" / missing).unlink()
    with pytest.raises(TrainConfigError, match=rf"checkpoint-4: incomplete: .*{missing}.* is missing.*"
                                               r"--overwrite_output_dir"):
        _preflight(train_args(model, data, run, *STEPS4, "--resume", "True"))
    with pytest.raises(TrainConfigError, match=rf"incomplete: .*{missing}"):
        _preflight(train_args(model, data, tmp_path / "new", *STEPS4,
                              "--resume_from_checkpoint", str(run / "checkpoint-4")))


# -- item 12: damaged checkpoint files, output dirs that cannot be written ------------------------------------

@pytest.mark.parametrize("name, damage", [
    ("adapter_model.safetensors", "truncate"), ("optimizer.pt", "truncate"), ("rng_state.pth", "flip"),
    ("scheduler.pt", "truncate"), ("trainer_state.json", "truncate"), ("dropout_seed.json", "truncate")])
def test_damaged_checkpoint_file_is_named_before_loading(finished, model, data, tmp_path, capsys, monkeypatch,
                                                         name, damage):
    import finetune.loading

    run = _copy(finished, tmp_path / "run", finished_marker=False)
    shutil.rmtree(run / "checkpoint-2")
    f = run / "checkpoint-4" / name
    if not f.exists():  # written by CUDA-graphed runs only: this CPU run's checkpoint gets one
        f.write_text('{"seed": 1234567890123}')
    raw = bytearray(f.read_bytes())
    if damage == "truncate":
        raw = raw[:len(raw) * 2 // 3]
    else:  # one byte inside the stored tensor data: only the zip checksums see it
        raw[len(raw) // 3] ^= 0xFF
    f.write_bytes(bytes(raw))
    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert train_main(train_args(model, data, run, *STEPS4, "--resume", "True")) == 2
    line = _one_line(capsys.readouterr().err)
    assert "checkpoint-4" in line and name in line and ("corrupt" in line or "truncated" in line)


def _state(change):
    def damage(ckpt):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        change(state)
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return damage


@pytest.mark.parametrize("damage, says", [
    # each was resumed into transformers' TypeError (TrainerState(**state)) after loading, or continued from the
    # wrong step, or (qwen_run.json a list) resumed without comparing the run at all
    (_state(lambda s: s.update(foo=1)), "trainer_state.json: corrupt (fields the Trainer does not know: foo)"),
    (_state(lambda s: s.update(global_step=True)), "trainer_state.json: corrupt (global_step True)"),
    (_state(lambda s: s.update(global_step=2)), "trainer_state.json: global_step 2, but the dir is checkpoint-4"),
    (_state(lambda s: s.update(log_history=5)), "trainer_state.json: corrupt (log_history 5)"),
    (_state(lambda s: s.update(epoch="x")), 'trainer_state.json: corrupt (epoch "x")'),
    (_state(lambda s: s.update(log_history=[1])), "trainer_state.json: corrupt (log_history holds entries"),
    (lambda c: (c / "qwen_run.json").write_text("[1]"), "qwen_run.json: corrupt (a JSON list, not an object)"),
    (lambda c: (c / "adapter_config.json").write_text('"x"'), "adapter_config.json: corrupt (a JSON str"),
])
def test_damaged_trainer_state_or_run_record_is_named_before_loading(finished, model, data, tmp_path, capsys,
                                                                     monkeypatch, damage, says):
    import finetune.loading

    run = _copy(finished, tmp_path / "run", finished_marker=False)
    shutil.rmtree(run / "checkpoint-2")
    damage(run / "checkpoint-4")
    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert train_main(train_args(model, data, run, *STEPS4, "--resume", "True")) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"checkpoint-4: {says}" in line, line


@pytest.mark.parametrize("flags, says", [
    # the path was dropped silently (--resume took the newest checkpoint in --output_dir)
    (["--resume", "True", "--resume_from_checkpoint", "{run}/checkpoint-2"],
     "--resume and --resume_from_checkpoint {run}/checkpoint-2 exclude each other"),
    # trained from step 0 (the Trainer's train(resume_from_checkpoint=True) raises "No valid checkpoint found")
    (["--resume_from_checkpoint", "true"], "--resume_from_checkpoint true: no checkpoint in {new} to continue from"),
    (["--resume_from_checkpoint", "{run}/checkpoint-4/optimizer.pt"],
     "--resume_from_checkpoint {run}/checkpoint-4/optimizer.pt: a file, not a checkpoint dir"),
    # "incomplete: trainer_state.json is missing" of a run dir given for its checkpoint
    (["--resume_from_checkpoint", "{run}"],
     "--resume_from_checkpoint {run}: a run dir, not one of its checkpoints; its newest is {run}/checkpoint-4"),
    # it named --resume, which was not given
    (["--resume_from_checkpoint", "{run}/checkpoint-2", "--overwrite_output_dir", "True"],
     "--resume_from_checkpoint {run}/checkpoint-2 and --overwrite_output_dir exclude each other"),
])
def test_resume_flags_that_cannot_both_hold_are_one_line(finished, model, data, tmp_path, capsys, flags, says):
    run = _copy(finished, tmp_path / "run", finished_marker=False)
    new = tmp_path / "new"
    out = run if "--resume" in flags else new
    flags = [f.format(run=run) for f in flags]
    assert train_main(train_args(model, data, out, *STEPS4, *flags)) == 2
    assert says.format(run=run, new=new) in _one_line(capsys.readouterr().err)
    assert not new.exists()


def test_output_dir_that_is_a_file(model, data, tmp_path, capsys):
    f = tmp_path / "out"
    f.write_text("x")
    assert train_main(train_args(model, data, f, "--use_lora", "True")) == 2
    assert "is a file, not a directory" in _one_line(capsys.readouterr().err)
    assert train_main(train_args(model, data, f / "sub", "--use_lora", "True")) == 2
    assert "is a file, not a directory" in _one_line(capsys.readouterr().err)


def test_output_dir_not_writable(model, data, tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only dirs")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert train_main(train_args(model, data, ro / "out", "--use_lora", "True")) == 2
        assert "is not writable" in _one_line(capsys.readouterr().err)
    finally:
        ro.chmod(0o755)


# -- item 8: overwrite clears the old run; another run's checkpoint is refused --------------------------------

def test_overwrite_removes_the_old_runs_checkpoints(finished, model, data, tmp_path, capsys, monkeypatch, caplog):
    run = _copy(finished, tmp_path / "run")

    def interrupted(self, *a, **k):  # the new run is stopped at its first step, before any checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(QwenTrainer, "training_step", interrupted)
    # a checkpoint-N dir of the user's own (no trainer_state.json) was removed with the run's checkpoints
    (run / "checkpoint-5").mkdir()
    (run / "checkpoint-5" / "mine.txt").write_text("mine")
    with caplog.at_level(logging.WARNING):
        assert train_main(train_args(model, data, run, *STEPS4, "--overwrite_output_dir", "True")) == 130
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-5"]
    assert not (run / "training_finished.json").exists() and (run / "checkpoint-5" / "mine.txt").read_text() == "mine"
    assert "left checkpoint-5 in" in caplog.text
    shutil.rmtree(run / "checkpoint-5")  # (a resume would name it: a checkpoint dir it cannot resume)
    assert not (run / "adapter_model.safetensors").exists() and not (run / "run_info.json").exists()
    assert f"no checkpoint was written in {run} yet (--save_strategy steps); run the command" in capsys.readouterr().err
    assert _preflight(train_args(model, data, run, *STEPS4, "--resume", "True")).resume_from is None


def test_save_total_limit_rotates_only_the_runs_checkpoints(finished, model, data, tmp_path):
    # (transformers' rotation counted every checkpoint-* dir: the user's own, which the overwrite had left, was
    # deleted as the oldest)
    run = _copy(finished, tmp_path / "run")
    (run / "checkpoint-1").mkdir()
    (run / "checkpoint-1" / "mine.txt").write_text("mine")
    assert train_main(train_args(model, data, run, *STEPS4, "--save_total_limit", "1",
                                 "--overwrite_output_dir", "True")) == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-4"]
    assert (run / "checkpoint-1" / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize("inputs", ["lora_weight_path", "checkpoint", "model"])
def test_overwrite_never_removes_the_runs_own_inputs(finished, model, data, tmp_path, capsys, inputs):
    # (the clearing removed the adapter or the model dir, then loading it was a traceback)
    run = _copy(finished, tmp_path / "run")
    if inputs == "model":
        shutil.copytree(model, run, dirs_exist_ok=True)
        flags = ["--model_name_or_path", str(run)]
    else:
        flags = ["--lora_weight_path", str(run if inputs == "lora_weight_path" else run / "checkpoint-2")]
    before = _snapshot(run)
    assert train_main(train_args(model, data, run, *STEPS4, *flags, "--overwrite_output_dir", "True")) == 2
    assert "an input of this run" in _one_line(capsys.readouterr().err)
    assert _snapshot(run) == before


@pytest.mark.parametrize("bad", ["data_path", "eval_data_path", "too_long"])
def test_overwrite_with_bad_data_leaves_the_old_run_whole(finished, model, data, tmp_path, capsys, bad):
    # (the old run was cleared when the dir was claimed, and the data was read after that)
    run = _copy(finished, tmp_path / "run")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"conversations": [{"from": "user", "value": "hi"}]}, 7]')
    flags = {"data_path": ["--data_path", str(broken)], "eval_data_path": ["--eval_data_path", str(broken)],
             "too_long": ["--model_max_length", str(MIN_MAX_LEN)]}[bad]
    before = _snapshot(run)
    assert train_main(train_args(model, data, run, *STEPS4, *flags, "--overwrite_output_dir", "True")) == 2
    line = _one_line(capsys.readouterr().err)
    where = f"--data_path {data}" if bad == "too_long" else f"--{bad} {broken}"
    assert line.startswith(f"error: {where}, record 1, line 1: "), line
    assert _snapshot(run) == before


def test_resume_refuses_a_checkpoint_of_another_run(finished, model, data, tmp_path):
    run = _copy(finished, tmp_path / "run", finished_marker=False)
    with pytest.raises(TrainConfigError, match=r"checkpoint-4 was written by a different run \(--lora_r 16 there, "
                                               r"8 now\)"):
        _preflight(train_args(model, data, run, *STEPS4, "--resume", "True", "--lora_r", "8"))
    with pytest.raises(TrainConfigError, match=r"--lora_target_modules c_attn c_proj w1 w2 there, c_attn now"):
        _preflight(train_args(model, data, run, *STEPS4, "--resume", "True", "--lora_target_modules", "c_attn"))
    other = make_demo_model(tmp_path / "int4", int4=True)
    with pytest.raises(TrainConfigError, match=rf"model {model} there, {other} now; mode lora there, qlora now"):
        _preflight(train_args(other, data, run, *STEPS4, "--resume", "True"))
    with pytest.raises(TrainConfigError, match=r"--resume_from_checkpoint .*checkpoint-2: written by a different "
                                               r"run \(--lora_r 16 there, 8 now\)"):
        _preflight(train_args(model, data, tmp_path / "new", *STEPS4, "--lora_r", "8",
                              "--resume_from_checkpoint", str(run / "checkpoint-2")))


@pytest.mark.parametrize("flags, differs", [
    (["--lora_alpha", "8"], "--lora_alpha 32 there, 8 now"),  # loaded into adapters scaled otherwise
    (["--learning_rate", "1"], "--learning_rate 0.005 there, 1.0 now"),  # the optimizer state kept the old one
    (["--weight_decay", "0.1"], "--weight_decay 0.0 there, 0.1 now"),
    (["--optim", "sgd"], "--optim adamw_torch there, sgd now"),  # was a KeyError from torch's SGD mid-run
    (["--model_max_length", "64"], "--model_max_length 128 there, 64 now"),  # other rows: batches skipped by count
    (["--packing", "True"], "--packing False there, True now"),
    (["--per_device_train_batch_size", "2"], "--per_device_train_batch_size 4 there, 2 now"),
    (["--gradient_accumulation_steps", "2"], "--gradient_accumulation_steps 1 there, 2 now"),
    (["--seed", "1"], "--seed 0 there, 1 now"),  # another order of the epoch's rows
    # the checkpoint's scheduler state was restored: the old schedule's next step, then the new one's, spliced
    (["--lr_scheduler_type", "constant"], "--lr_scheduler_type linear there, constant now"),
    (["--warmup_steps", "2"], "--warmup_steps 0 there, 2.0 now"),
])
def test_resume_refuses_settings_the_run_did_not_train_with(finished, model, data, tmp_path, flags, differs):
    run = _copy(finished, tmp_path / "run", finished_marker=False)
    with pytest.raises(TrainConfigError) as e:
        _preflight(train_args(model, data, run, *STEPS4, "--resume", "True", *flags))
    assert str(e.value).startswith(f"--resume: {run / 'checkpoint-4'} was written by a different run ({differs}")
    hint = (f"its adapter can start a new run with these settings (--lora_weight_path {run / 'checkpoint-4'} "
            "--output_dir NEW_DIR)")
    assert (hint in str(e.value)) is (flags[0] != "--lora_alpha")  # a new run from the adapter keeps its alpha
    # what a resume may change: how long it goes on, and how often it logs and saves
    assert _preflight(train_args(model, data, run, *STEPS4, "--resume", "True", "--max_steps", "6",
                                 "--save_steps", "3", "--logging_steps", "2")).resume_from == str(run / "checkpoint-4")


def test_resume_on_other_data_stops_before_loading_and_keeps_the_runs_records(finished, model, data, tmp_path,
                                                                              capsys, monkeypatch):
    import finetune.loading

    run = _copy(finished, tmp_path / "run", finished_marker=False)
    before = _snapshot(run)
    records = json.loads(Path(data).read_text())
    records[0]["conversations"][1]["value"] = "Another answer."
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(records))
    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert train_main(train_args(model, edited, run, *STEPS4, "--resume", "True", "--max_steps", "5")) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: --resume: {run / 'checkpoint-4'} was written by a different run (the training "
                           "data's content differs)"), line
    after = _snapshot(run)
    assert after.pop("train.log") and before.pop("train.log")  # the attempt is in the console log
    assert after == before  # run_args.json too: still the run's own

    # the same content under another name is the same data
    copy = tmp_path / "copy of data.json"
    copy.write_bytes(Path(data).read_bytes())
    monkeypatch.undo()
    assert train_main(train_args(model, copy, run, *STEPS4, "--resume", "True", "--max_steps", "5")) == 0
    assert "resuming from" in capsys.readouterr().out


# -- item 9: the demo replaces only demo outputs ------------------------------------------------------------------

def test_demo_never_replaces_a_dir_that_is_not_a_demo_output(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("mine")
    for target in (run, notes):
        before = _snapshot(target)
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "finetune_qlora.sh"), "-o", str(target)],
                              env=subprocess_env(QWEN_FT_CACHE=str(tmp_path / "cache"), CUDA_VISIBLE_DEVICES=""),
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "is not a demo output" in _one_line(proc.stderr)
        assert _snapshot(target) == before
    assert not (tmp_path / "cache").exists()  # stopped before making the demo model


# -- item 10: one run at a time in a dir ---------------------------------------------------------------------------

def test_second_run_into_a_locked_dir_stops(model, data, tmp_path, capsys, monkeypatch):
    import finetune.tokenization

    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK_FILE, "a+") as held:  # as the first run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        monkeypatch.setattr(finetune.tokenization, "load_tokenizer", lambda *a, **k: pytest.fail("went on"))
        assert train_main(train_args(model, data, out, "--use_lora", "True")) == 2
    line = _one_line(capsys.readouterr().err)
    assert "in use by another training run (pid 4242)" in line
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_only_rank_0_asks_whether_the_dir_is_locked(tmp_path):
    """Rank 0 of a launch claims the output dir while the other ranks still run their checks: a rank other than 0
    must not take rank 0's lock for another run's (tests/training/test_multi_gpu_bench.py failed now and then on
    that race). Rank 0 still stops on a dir another run holds."""
    from types import SimpleNamespace

    from finetune.training.checks import check_output_dir

    out = tmp_path / "out"
    out.mkdir()
    flags = dict(output_dir=str(out), overwrite_output_dir=False, resume=None, resume_from_checkpoint=None)
    with open(out / LOCK_FILE, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        assert check_output_dir(SimpleNamespace(**flags, process_index=1), {}) is None
        with pytest.raises(TrainConfigError, match=r"in use by another training run \(pid 4242\)"):
            check_output_dir(SimpleNamespace(**flags, process_index=0), {})


# -- item 13: --on_nonfinite_loss ------------------------------------------------------------------------------------

@pytest.fixture
def nan_at_step_2(monkeypatch):
    compute = QwenTrainer.compute_loss

    def poisoned(self, *a, **k):
        loss = compute(self, *a, **k)
        return loss * float("nan") if self.state.global_step == 1 else loss

    monkeypatch.setattr(QwenTrainer, "compute_loss", poisoned)


def test_nonfinite_loss_skip_skips_and_counts(model, data, tmp_path, nan_at_step_2, caplog):
    from safetensors.torch import load_file

    out = tmp_path / "skip"
    with caplog.at_level(logging.WARNING):
        assert train_main(train_args(model, data, out, "--use_lora", "True", "--max_steps", "3",
                                     "--logging_steps", "1", "--on_nonfinite_loss", "skip")) == 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["nonfinite_skipped_steps"] == 1 and info["global_step"] == 3
    assert "step 2: the loss is nan; the optimizer step is skipped (1 skipped so far)" in caplog.text
    assert "1 optimizer step(s) skipped" in caplog.text
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # the other steps did train


def test_nonfinite_loss_stop_names_the_step(model, data, tmp_path, nan_at_step_2, capsys):
    assert train_main(train_args(model, data, tmp_path / "stop", "--use_lora", "True", "--max_steps", "3")) == 2
    assert "the loss is nan at step 2" in _one_line(capsys.readouterr().err)


def test_eval_strategy_without_an_eval_set(model, data, tmp_path):
    with pytest.raises(TrainConfigError, match="--eval_strategy .*epoch needs an eval set: add --eval_data_path"):
        _preflight(train_args(model, data, tmp_path / "o", "--eval_strategy", "epoch"))


def test_nonfinite_loss_values_checked(model, data, tmp_path):
    with pytest.raises(TrainConfigError, match="stop or skip"):
        _preflight(train_args(model, data, tmp_path / "o", "--on_nonfinite_loss", "ignore"))
    with pytest.raises(TrainConfigError, match="skip does not work under --deepspeed"):
        _preflight(train_args(model, data, tmp_path / "o", "--on_nonfinite_loss", "skip", "--deepspeed",
                              str(ROOT / "ds_configs" / "zero2.json")))


# -- item 20: a dir of other files -------------------------------------------------------------------------------

def test_dir_of_other_files_is_refused_unless_overwrite(model, data, tmp_path, capsys, caplog):
    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text("my project")
    (out / "run_info.json").write_text("{}")
    (out / "notes.txt").write_text("keep me")
    before = _snapshot(out)
    assert train_main(train_args(model, data, out, "--use_lora", "True", "--max_steps", "2")) == 2
    line = _one_line(capsys.readouterr().err)
    assert "not empty" in line and "notes.txt" in line and "replacing README.md, run_info.json" in line
    assert _snapshot(out) == before
    with caplog.at_level(logging.WARNING):
        assert train_main(train_args(model, data, out, "--use_lora", "True", "--max_steps", "2",
                                     "--overwrite_output_dir", "True")) == 0
    assert "this run replaces README.md, run_info.json and leaves the rest" in caplog.text
    assert (out / "notes.txt").read_text() == "keep me"


def test_resume_without_checkpoints_into_a_dir_of_other_files_is_refused(model, data, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(TrainConfigError, match=r"not empty and holds no run of this project \(notes.txt\)"):
        _preflight(train_args(model, data, out, "--use_lora", "True", "--resume", "True"))


# -- friction: Ctrl-C, rows past seq_length ----------------------------------------------------------------------

def _interrupt_at_step_3(monkeypatch, interrupt=None):
    """The trainer interrupted as its third step begins (two checkpoints of STEPS4 written): KeyboardInterrupt raised
    there, or ``interrupt()`` called (a signal sent). Returns the trainer's own training_step, to put back."""
    step = QwenTrainer.training_step

    def interrupted(self, *a, **k):
        if self.state.global_step == 2:
            if interrupt is None:
                raise KeyboardInterrupt
            interrupt()
        return step(self, *a, **k)

    monkeypatch.setattr(QwenTrainer, "training_step", interrupted)
    return step


def test_ctrl_c_says_where_the_checkpoint_is_and_resume_says_where_it_continues(model, data, tmp_path, capsys,
                                                                               monkeypatch):
    out = tmp_path / "run"
    step = _interrupt_at_step_3(monkeypatch)
    assert train_main(train_args(model, data, out, *STEPS4)) == 130
    err = capsys.readouterr().err
    assert f"interrupted: the last complete checkpoint is {out / 'checkpoint-2'} (step 2); continue with the same " \
           "command with --resume True" in err
    monkeypatch.setattr(QwenTrainer, "training_step", step)
    assert train_main(train_args(model, data, out, *STEPS4, "--resume", "True")) == 0
    assert f"resuming from {out / 'checkpoint-2'} (step 2)" in capsys.readouterr().out
    log = (out / "train.log").read_text()  # both runs' consoles, in order
    assert log.index("interrupted: the last complete") < log.index("resuming from") < log.index("Done.")


def test_sigterm_ends_the_run_as_ctrl_c_does(model, data, tmp_path, capsys, monkeypatch):
    """SIGTERM (a scheduler's preemption, `timeout`, `kill`) ended the run without a word on where its checkpoint
    was; it now says so as Ctrl-C does, exits 143, and leaves the default SIGTERM handling as it found it."""
    import os
    import signal

    out = tmp_path / "run"
    _interrupt_at_step_3(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert train_main(train_args(model, data, out, *STEPS4)) == 143
    assert f"interrupted: the last complete checkpoint is {out / 'checkpoint-2'} (step 2); continue with the same " \
           "command with --resume True" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_save_only_model_checkpoints_are_said_to_start_a_new_run_not_to_resume(model, data, tmp_path, capsys,
                                                                               monkeypatch):
    """--save_only_model writes the weights alone: interrupted, the run said "no checkpoint was written" beside its
    checkpoints, and --resume said "optimizer.pt is missing. Restore the file", a file never written."""
    import shlex

    out = tmp_path / "run"
    step = _interrupt_at_step_3(monkeypatch)
    flags = (*STEPS4, "--save_only_model", "True")
    assert train_main(train_args(model, data, out, *flags)) == 130
    ckpt = out / "checkpoint-2"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted: the newest checkpoint, {ckpt}, holds the weights alone (as --save_only_model saves them: no "
        "optimizer, scheduler or RNG state), which cannot resume a run; a new run can start from them: "
        f"--lora_weight_path {shlex.quote(str(ckpt))} --output_dir NEW_DIR")
    monkeypatch.setattr(QwenTrainer, "training_step", step)
    assert train_main(train_args(model, data, out, *flags, "--resume", "True")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: --resume: the checkpoints in {out} hold the weights alone")
    assert "Restore" not in line and f"--lora_weight_path {shlex.quote(str(ckpt))}" in line
    (tmp_path / "full").mkdir()  # a full fine-tune's weights-only checkpoint starts a run as a model
    full = shlex.quote(str(tmp_path / "full"))
    assert start_from(tmp_path / "full") == f"--model_name_or_path {full} --output_dir NEW_DIR"
    assert train_main(train_args(model, data, tmp_path / "new", *STEPS4, "--lora_weight_path", str(ckpt))) == 0


def _square(x):
    return x * x


def _sigterm_action(_):
    import signal

    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_forked_worker_starts_with_sigterms_default_action():
    """A pool worker forked with the run's SIGTERM handler could miss the pool's terminate(): a SIGTERM that came just
    before it blocked on the queue's lock was only noted for Python, and the pool's join waited forever (the test
    below hung so, once). The worker starts with the default action, which ends it whenever the signal comes."""
    import multiprocessing

    from finetune.train import _sigterm_as_interrupt

    with _sigterm_as_interrupt():
        with multiprocessing.get_context("fork").Pool(1) as pool:
            assert pool.map(_sigterm_action, range(2)) == [True, True]


def test_the_sigterm_handler_stays_out_of_forked_workers_and_of_several_processes(capfd, monkeypatch):
    """The data's tokenizing pool forks workers that its exit stops with SIGTERM: they inherited the handler and
    printed "Process ForkPoolWorker-N: Traceback ... Terminated". Under a launch of several processes (torchrun's
    agent stops the other ranks with SIGTERM) no handler is installed."""
    import multiprocessing
    import signal

    from finetune.train import _sigterm_as_interrupt

    for _ in range(10):
        with _sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
            with multiprocessing.get_context("fork").Pool(2) as pool:
                assert pool.map(_square, range(4)) == [0, 1, 4, 9]
    assert "Traceback" not in capfd.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with _sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_ctrl_c_before_the_run_takes_its_dir_says_so(model, data, tmp_path, capsys, monkeypatch):
    import finetune.train

    def interrupted(*a, **k):  # e.g. while preflight reads the weight files' headers
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune.train, "preflight", interrupted)
    assert train_main(train_args(model, data, tmp_path / "o", *STEPS4)) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted before training began; nothing was written"]
    assert not (tmp_path / "o").exists()


def test_resume_discards_a_killed_checkpoint_save(finished, model, data, tmp_path, caplog):
    # a run killed while writing checkpoint-6 left .staging/checkpoint-6: its files must not end up in the
    # checkpoint-6 the resumed run writes there
    run = _copy(finished, tmp_path / "run", finished_marker=False)
    stale = run / ".staging" / "checkpoint-6"
    stale.mkdir(parents=True)
    (stale / "optimizer.pt").write_bytes(b"half")
    (stale / "stale_rank_file.pth").write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        assert train_main(train_args(model, data, run, *STEPS4, "--resume", "True", "--max_steps", "6")) == 0
    assert f"removed {run / '.staging'}: the unfinished checkpoint save of an interrupted run" in caplog.text
    assert not (run / ".staging").exists() and not (run / "checkpoint-6" / "stale_rank_file.pth").exists()
    assert checkpoint_problem(run / "checkpoint-6") is None


def test_rows_past_the_models_seq_length_warn_once(model, data, tmp_path, monkeypatch, caplog):
    import finetune.loading

    short = tmp_path / "short"
    shutil.copytree(model, short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["seq_length"] = 32
    (short / "config.json").write_text(json.dumps(cfg))

    class Loaded(Exception):
        pass

    def stop(*a, **k):
        raise Loaded

    monkeypatch.setattr(finetune.loading, "load_model", stop)
    from finetune.train import train

    for packing in ("False", "True"):
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(Loaded):
            train(*parse_args(train_args(short, data, tmp_path / f"o{packing}", "--use_lora", "True",
                                         "--packing", packing)))
        warned = [r.getMessage() for r in caplog.records if "seq_length" in r.getMessage()]
        assert len(warned) == 1 and warned[0].startswith("4 conversation(s) are longer than the model's "
                                                         "seq_length 32"), warned
        assert "--model_max_length 32" in warned[0]


def test_a_resume_past_the_epochs_last_step_is_refused(finished, model, data, tmp_path, capsys):
    """Without --max_steps, a checkpoint already at the steps --num_train_epochs makes trained nothing, saved, and
    marked the run finished (exit 0, "Done."), as a --max_steps at or below it did before it was refused."""
    run = _copy(finished, tmp_path / "run", finished_marker=False)
    weights = (run / "adapter_model.safetensors").read_bytes()
    assert train_main(train_args(model, data, run, *STEPS4, "--max_steps", "-1", "--num_train_epochs", "0.01",
                                 "--resume", "True")) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("error: --num_train_epochs 0.01: the checkpoint ") and "nothing would train" in line, line
    assert not (run / "training_finished.json").exists()
    assert (run / "adapter_model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("steps", ["2", "4"])
def test_a_resume_at_or_past_max_steps_is_refused_before_loading(finished, model, data, tmp_path, steps):
    """A checkpoint already at --max_steps trained nothing, saved, and marked the run finished (exit 0)."""
    run = _copy(finished, tmp_path / "run", finished_marker=False)
    before = _snapshot(run)
    with pytest.raises(TrainConfigError, match=rf"--max_steps {steps}: the checkpoint .*checkpoint-4 is at step 4 "
                                               r"already, so nothing would train; give a --max_steps beyond 4"):
        _preflight(train_args(model, data, run, *STEPS4, "--max_steps", steps, "--resume", "True"))
    with pytest.raises(TrainConfigError, match=r"--max_steps 2: the checkpoint .*checkpoint-2 is at step 2"):
        _preflight(train_args(model, data, tmp_path / "new", *STEPS4, "--max_steps", "2",
                              "--resume_from_checkpoint", str(run / "checkpoint-2")))
    assert _snapshot(run) == before


def test_a_hub_id_is_downloaded_into_cache_dir(model, data, tmp_path, monkeypatch):
    # --cache_dir was accepted and ignored: the official scripts pass it to from_pretrained as the hub cache's dir
    import huggingface_hub

    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda ref, cache_dir=None, **k: fetched.append((ref, cache_dir)) or str(model))
    cache = tmp_path / "hub-cache"
    plan = _preflight(train_args("Qwen/Qwen-7B-Chat", data, tmp_path / "out", *STEPS4, "--cache_dir", str(cache)))
    assert fetched == [("Qwen/Qwen-7B-Chat", str(cache))] and Path(plan.model_dir) == Path(model)
