"""The non-finite-loss guard without a host read per step (finetune/training/nonfinite.py): with a fused
optimizer the skip happens on the device (found_inf), "skip" drops only the bad step's update and counts it,
"stop" applies nothing from the first bad step on and stops naming it at the next read, never after a checkpoint;
and the step path (training_step, the guard at the optimizer step, the staging of the step's values, the fused
optimizer's step) reads no tensor on the host."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

from finetune.train import main as train_main
from finetune.training.nonfinite import FoundInfHooks, NonFiniteGuard, NonFiniteLossError
from finetune.training.trainer import QwenTrainer

from _helpers import train_args

FUSED = ["--use_lora", "True", "--optim", "adamw_torch_fused", "--logging_steps", "1"]


def poison(monkeypatch, step):
    """Step `step`'s loss becomes NaN. Returns a dict that gets the trainer and the trainable weights as they
    were when that step started (after step - 1's update)."""
    seen = {}
    compute = QwenTrainer.compute_loss

    def poisoned(self, *a, **k):
        loss = compute(self, *a, **k)
        seen["trainer"] = self
        if self.state.global_step == step - 1:
            seen.setdefault("before", {n: p.detach().clone() for n, p in self.model.named_parameters()
                                       if p.requires_grad})
            return loss * float("nan")
        return loss

    monkeypatch.setattr(QwenTrainer, "compute_loss", poisoned)
    return seen


def _adapter(out, step):
    return load_file(str(out / f"checkpoint-{step}" / "adapter_model.safetensors"))


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_skip_on_the_device_drops_only_that_update_and_counts_it(model, data, tmp_path, monkeypatch, caplog):
    poison(monkeypatch, 3)
    out = tmp_path / "skip"
    with caplog.at_level("WARNING"):
        assert train_main(train_args(model, data, out, *FUSED, "--max_steps", "5", "--on_nonfinite_loss", "skip",
                                     "--save_strategy", "steps", "--save_steps", "1")) == 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["optimizer"]["fused"] and info["optimizer"]["nonfinite_guard"] == "device"
    assert info["nonfinite_skipped_steps"] == 1 and info["global_step"] == 5
    assert "step 3: the loss is nan; the optimizer step is skipped (1 skipped so far)" in caplog.text
    assert not _same(_adapter(out, 1), _adapter(out, 2))  # step 2 trained
    assert _same(_adapter(out, 2), _adapter(out, 3))  # step 3 did not change a weight
    assert not _same(_adapter(out, 3), _adapter(out, 4))  # and step 4 trained again
    # the fused kernel undid its step count for the skipped step (bias correction continues from 2)
    opt = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in opt["state"].values()} == {2.0}
    log = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert [h["step"] for h in log] == [1, 2, 3, 4, 5]
    # transformers' filter, kept: the bad step counts as the mean of the others since the last log (none here)
    assert log[2]["loss"] == 0.0 and all(torch.isfinite(torch.tensor(h["loss"])) for h in log)


def test_stop_applies_nothing_from_the_bad_step_on_and_names_it(model, data, tmp_path, monkeypatch, capsys):
    seen = poison(monkeypatch, 2)
    out = tmp_path / "stop"
    # read one step late: step 3 runs (its update held back too), its checkpoint is never written (batch 1: four
    # steps an epoch, so no epoch end reads in between)
    assert train_main(train_args(model, data, out, *FUSED, "--max_steps", "6", "--save_strategy", "steps",
                                 "--save_steps", "3", "--per_device_train_batch_size", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the loss is nan at step 2 (epoch ") and "stopped without applying" in err[-1]
    trainer = seen["trainer"]
    assert trainer.state.global_step == 3
    now = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(now[n], seen["before"][n]) for n in now)  # neither step 2 nor step 3 applied
    assert not list(out.glob("checkpoint-*"))


def test_stop_reads_the_flag_before_saving(model, data, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, 2)
    out = tmp_path / "stop_at_save"
    assert train_main(train_args(model, data, out, *FUSED, "--max_steps", "4", "--save_strategy", "steps",
                                 "--save_steps", "1")) == 2
    assert "the loss is nan at step 2" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


@pytest.fixture
def host_reads_fail(monkeypatch):
    """Inside the trainer's own step code (not transformers' or the model's), reading a tensor on the host
    raises: what a per-step GPU sync would be."""
    active = [False]

    def trap(name):
        original = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            if active[0]:
                raise AssertionError(f"Tensor.{name} in the trainer's step path (a host sync per step on a GPU)")
            return original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu"):
        trap(name)

    def trapping(fn, on: bool):
        """fn with the trap on (our code) or off (transformers' and the model's) while it runs."""
        def run(*a, **k):
            before, active[0] = active[0], on
            try:
                return fn(*a, **k)
            finally:
                active[0] = before
        return run

    for name in ("training_step", "_begin_optimizer_step", "_stage_record"):
        monkeypatch.setattr(QwenTrainer, name, trapping(getattr(QwenTrainer, name), True))
    monkeypatch.setattr(torch.optim.AdamW, "step", trapping(torch.optim.AdamW.step, True))
    # transformers' step and the model's forward/backward are not this code
    monkeypatch.setattr(Trainer, "training_step", trapping(Trainer.training_step, False))
    return active


def test_the_step_path_reads_nothing_on_the_host(model, data, tmp_path, monkeypatch, host_reads_fail, caplog):
    poison(monkeypatch, 2)
    out = tmp_path / "nosync"
    with caplog.at_level("WARNING"):
        assert train_main(train_args(model, data, out, *FUSED, "--max_steps", "3", "--on_nonfinite_loss", "skip")) == 0
    assert "step 2: the loss is nan; the optimizer step is skipped (1 skipped so far)" in caplog.text
    info = json.loads((out / "run_info.json").read_text())
    assert info["nonfinite_skipped_steps"] == 1 and info["optimizer"]["nonfinite_guard"] == "device"


def test_the_trap_catches_a_host_read(model, data, tmp_path, monkeypatch, host_reads_fail):
    """The test above fails if a per-step check on the host comes back (here: the old guard's)."""
    observe = NonFiniteGuard.observe

    def old_guard(self, loss):
        finite = observe(self, loss)
        if not torch.isfinite(loss).all():
            raise AssertionError("unreachable: the losses are finite")
        return finite

    monkeypatch.setattr(NonFiniteGuard, "observe", old_guard)
    with pytest.raises(AssertionError, match=r"Tensor.__bool__ in the trainer's step path"):
        train_main(train_args(model, data, tmp_path / "o", *FUSED, "--max_steps", "1"))


# -- the guard's pieces ------------------------------------------------------------------------------------------

def _steps(guard, losses_per_step):
    flags = []
    for n, losses in enumerate(losses_per_step, 1):
        for v in losses:
            guard.observe(torch.tensor(v))
        flags.append(float(guard.end_step(n)))
    return flags


def test_skip_flags_only_bad_steps_and_stop_holds_from_the_first():
    nan, inf = float("nan"), float("inf")
    steps = [[1.0, 2.0], [1.0, nan], [1.0, 1.0], [inf, 1.0], [1.0, 1.0]]
    skip = NonFiniteGuard("skip")
    assert _steps(skip, steps) == [0, 1, 0, 1, 0]
    msg = skip.verdict(skip.snapshot().tolist())
    assert msg == "steps 2 on: 2 optimizer steps skipped for a non-finite loss (the first: nan; 2 skipped so far)"
    assert skip.verdict(skip.snapshot().tolist()) is None  # nothing new since the last read
    stop = NonFiniteGuard("stop")
    assert _steps(stop, steps) == [0, 1, 1, 1, 1]
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 2 \(epoch 1.50\)"):
        stop.verdict(stop.snapshot().tolist(), epoch=1.5)


def test_found_inf_hooks_merge_with_a_grad_scalers_flag():
    """fp16: GradScaler sets found_inf on a fused optimizer and deletes it after the step; the guard's flag is
    merged in for the step and the scaler's attribute is left as the scaler expects."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    guard = NonFiniteGuard("skip")
    guard.observe(torch.tensor(1.0))
    guard.end_step(1)
    FoundInfHooks(opt, guard)
    p.grad = torch.ones(3)
    opt.found_inf = theirs = torch.ones(())  # the scaler found an overflow; the guard did not
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and opt.found_inf is theirs
    del opt.found_inf
    guard.observe(torch.tensor(float("nan")))
    guard.end_step(2)
    opt.step()  # no scaler: the guard's flag alone skips
    assert torch.equal(p.detach(), torch.ones(3)) and not hasattr(opt, "found_inf")
    guard.observe(torch.tensor(1.0))
    guard.end_step(3)
    opt.step()
    assert (p.detach() < 1).all()
