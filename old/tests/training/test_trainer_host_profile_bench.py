"""benchmarks/trainer_host_profile.py --syncs on the CPU: the counting around the trainer (switched on from the
third optimizer step to the end of the loop, each sync warning counted at its innermost project frame). The
sync debug mode itself is CUDA's; here a stand-in records the switches and the meter's count raises the warning
torch would raise for a synchronizing call."""

import sys
import warnings

import pytest
import torch

from _helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import trainer_host_profile  # noqa: E402


def test_syncs_are_counted_per_step_at_their_site(monkeypatch):
    from finetune.training.throughput import ThroughputMeter
    from finetune.training.trainer import QwenTrainer

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    count = ThroughputMeter.count

    def syncing_count(self, inputs):  # as a `.item()` on a CUDA tensor would warn under mode "warn"
        count(self, inputs)
        if modes and modes[-1] == "warn":
            warnings.warn("called a synchronizing CUDA operation")

    monkeypatch.setattr(ThroughputMeter, "count", syncing_count)
    step, end = QwenTrainer.training_step, ThroughputMeter.on_train_end
    result = trainer_host_profile.profile(6, [], gpu=False, syncs=True)
    assert modes == ["warn", "default"]
    syncs = result["syncs_per_step"]
    assert syncs["steps_watched"] == 4  # steps 3-6
    (site, per_step), = syncs["sites"].items()
    assert site.startswith("finetune/training/trainer.py:") and " training_step" in site.split(" <- ")[0]
    assert per_step == 1.0  # one micro-batch a step
    assert (QwenTrainer.training_step, ThroughputMeter.on_train_end) == (step, end)  # put back


def test_syncs_need_a_gpu(capsys):
    with pytest.raises(SystemExit) as e:
        trainer_host_profile.main(["--syncs"])
    assert e.value.code == 2 and "--syncs counts CUDA syncs: it needs --gpu" in capsys.readouterr().err
