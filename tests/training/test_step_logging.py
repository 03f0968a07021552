"""What the trainer does around each step without waiting for the GPU: log lines read one step late but as
before (numbers, order, steps, in the checkpoints), the optimizer chosen by --optim auto and recorded, the
flops count taken once."""

import json

import pytest

from finetune.train import main as train_main
from finetune.training.arguments import default_optimizer, parse_args
from finetune.training.trainer import QwenTrainer

from _helpers import train_args


def _history(path):
    return json.loads(path.read_text())["log_history"]


def test_logs_read_one_step_late_are_the_logs_read_at_once(model, data, tmp_path, monkeypatch):
    """The same run with transformers' own logging (which reads each step's values at once) and with ours: the
    same entries, numbers, steps and epochs, in the same order; each checkpoint holds its own step's log."""
    common = ["--use_lora", "True", "--max_steps", "6", "--per_device_train_batch_size", "1",
              "--save_strategy", "steps", "--save_steps", "3", "--logging_steps", "2", "--eval_strategy", "steps",
              "--eval_steps", "3", "--eval_data_path", str(data)]
    lagged = tmp_path / "lagged"
    assert train_main(train_args(model, data, lagged, *common)) == 0
    # transformers' own: no staging, logged when its loop asks
    monkeypatch.setattr(QwenTrainer, "_maybe_log_save_evaluate", QwenTrainer.__mro__[1]._maybe_log_save_evaluate)
    at_once = tmp_path / "at_once"
    assert train_main(train_args(model, data, at_once, *common)) == 0

    def comparable(history):
        drop = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
                "eval_samples_per_second", "eval_steps_per_second")
        return [{k: v for k, v in h.items() if k not in drop} for h in history]

    a, b = comparable(_history(lagged / "trainer_state.json")), comparable(_history(at_once / "trainer_state.json"))
    assert a == b
    assert [h["step"] for h in a if "loss" in h] == [2, 4, 6]
    assert all("grad_norm" in h and "learning_rate" in h and "epoch" in h for h in a if "loss" in h)
    ckpt = comparable(_history(lagged / "checkpoint-3" / "trainer_state.json"))
    assert ckpt == comparable(_history(at_once / "checkpoint-3" / "trainer_state.json"))
    assert [h["step"] for h in ckpt] == [2, 3]  # step 2's log, then step 3's evaluation


def test_optim_auto_is_fused_adamw_on_a_gpu_without_deepspeed(tmp_path):
    assert default_optimizer(use_cpu=False, deepspeed=None, cuda=True) == "adamw_torch_fused"
    assert default_optimizer(use_cpu=True, deepspeed=None, cuda=True) == "adamw_torch"
    assert default_optimizer(use_cpu=False, deepspeed="ds_configs/zero2.json", cuda=True) == "adamw_torch"
    assert default_optimizer(use_cpu=False, deepspeed=None, cuda=False) == "adamw_torch"
    out = str(tmp_path)
    assert parse_args(["--output_dir", out, "--use_cpu", "True"])[3].optim.value == "adamw_torch"
    for chosen in ("adamw_torch", "adamw_torch_fused", "sgd"):  # a choice on the command line wins
        assert parse_args(["--output_dir", out, "--optim", chosen])[3].optim.value == chosen
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim: adamw_torch\n")  # and in a config file
    assert parse_args([str(cfg), "--output_dir", out])[3].optim.value == "adamw_torch"


def test_batches_are_copied_to_the_gpu_without_waiting(model, data, tmp_path, monkeypatch):
    """accelerate copies each batch with non_blocking=False by default, which synchronizes the stream (a full GPU
    sync per micro-batch); here non_blocking is on unless the user passes an accelerator config."""
    from finetune.training import arguments

    assert arguments.copies_to_a_gpu(use_cpu=False, cuda=True)
    assert not arguments.copies_to_a_gpu(use_cpu=True, cuda=True) and not arguments.copies_to_a_gpu(False, cuda=False)
    monkeypatch.setattr(arguments, "copies_to_a_gpu", lambda use_cpu, cuda=None: not use_cpu)  # as on a GPU machine
    pins = arguments.pins_for_an_accelerator
    monkeypatch.setattr(arguments, "pins_for_an_accelerator", lambda: True)
    args = parse_args(["--output_dir", str(tmp_path)])[3]
    assert args.accelerator_config.non_blocking and args.dataloader_pin_memory
    own = parse_args(["--output_dir", str(tmp_path), "--accelerator_config", '{"non_blocking": false}'])[3]
    assert own.accelerator_config.non_blocking is False
    # on the CPU (--use_cpu, as the tests train) nothing is overlapped and no notice about pinning is printed
    assert not parse_args(["--output_dir", str(tmp_path), "--use_cpu", "True"])[3].accelerator_config.non_blocking
    from finetune.train import train

    monkeypatch.setattr(arguments, "pins_for_an_accelerator", pins)  # this machine's answer: no pinning warning
    trainer = train(*parse_args(train_args(model, data, tmp_path / "o", "--use_lora", "True", "--max_steps", "1",
                                           "--use_cpu", "False")))
    assert trainer.accelerator.dataloader_config.non_blocking is True


def test_no_pinned_memory_without_an_accelerator(model, data, tmp_path, monkeypatch):
    """`qwen-ft train` on a CPU-only machine (no --use_cpu, as the scripts add) does not ask the DataLoader to
    pin memory, which torch answers with a UserWarning at the first step; with an accelerator it still pins."""
    import warnings

    from finetune.training import arguments

    def pins(*flags):
        return parse_args(["--output_dir", str(tmp_path), *flags])[3].dataloader_pin_memory

    monkeypatch.setattr(arguments, "pins_for_an_accelerator", lambda: False)
    assert pins() is False
    assert pins("--dataloader_pin_memory", "True") is False
    monkeypatch.setattr(arguments, "pins_for_an_accelerator", lambda: True)
    assert pins() is True
    assert pins("--dataloader_pin_memory", "False") is False
    monkeypatch.undo()
    import torch

    if torch.accelerator.is_available():
        pytest.skip("needs a machine without an accelerator")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train_main(train_args(model, data, tmp_path / "o", "--use_lora", "True", "--max_steps", "1",
                                     "--use_cpu", "False")) == 0
    assert not [w for w in caught if "pin_memory" in str(w.message)]


@pytest.mark.parametrize("optim, fused, route", [("adamw_torch", False, "host"), ("adamw_torch_fused", True, "device")])
def test_run_info_records_the_optimizer(model, data, tmp_path, optim, fused, route):
    out = tmp_path / optim
    assert train_main(train_args(model, data, out, "--use_lora", "True", "--max_steps", "2", "--optim", optim)) == 0
    record = json.loads((out / "run_info.json").read_text())["optimizer"]
    assert record == {"optim": optim, "class": "AdamW", "fused": fused, "deepspeed": False, "nonfinite_guard": route}


def test_flops_count_takes_the_parameter_count_once(model, data, tmp_path, monkeypatch):
    """transformers counts every parameter for every micro-batch's flops; here the count is taken once, and the
    total is the same."""
    from transformers import Trainer

    from finetune.modeling.model import QWenLMHeadModel

    calls = []
    num_parameters = QWenLMHeadModel.num_parameters

    def counting(self, *a, **k):
        calls.append(k)
        return num_parameters(self, *a, **k)

    monkeypatch.setattr(QWenLMHeadModel, "num_parameters", counting)
    argv = ["--use_lora", "True", "--max_steps", "4", "--per_device_train_batch_size", "1"]
    assert train_main(train_args(model, data, tmp_path / "ours", *argv)) == 0
    assert calls == [{"exclude_embeddings": True}]
    monkeypatch.setattr(QwenTrainer, "floating_point_ops", Trainer.floating_point_ops)
    assert train_main(train_args(model, data, tmp_path / "theirs", *argv)) == 0
    assert len(calls) == 1 + 4

    def flos(out):
        return json.loads((out / "trainer_state.json").read_text())["total_flos"]

    assert flos(tmp_path / "ours") == flos(tmp_path / "theirs") > 0
