"""DeepSpeed with 2 CPU processes over gloo, launched through the real scripts as a user would."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from finetune.demo import make_demo_model

from _helpers import ROOT, free_port

DATA = [
    {"conversations": [{"from": "user", "value": q}, {"from": "assistant", "value": a}]}
    for q, a in [("Name the red planet.", "Mars."), ("Name the ringed planet.", "Saturn."),
                 ("Name the largest planet.", "Jupiter."), ("Name our planet.", "Earth.")]
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    data = root / "data.json"
    data.write_text(json.dumps(DATA))
    return {"float": make_demo_model(root / "float"), "int4": make_demo_model(root / "int4", int4=True),
            "data": data}


def _script(name, model, data, out, *flags, **kw):
    return _run_script(name, model, data, out, *flags, **kw)[0]


def _run_script(name, model, data, out, *flags, nproc=2, deepspeed=None, port=None):
    """(run_info.json, the launch's console: stdout + stderr)"""
    env = dict(os.environ, NPROC=str(nproc), MASTER_PORT=str(port or free_port()), CUDA_VISIBLE_DEVICES="",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(Path.home() / ".cache" / "torch_extensions")))
    if deepspeed:
        env["DEEPSPEED"] = str(ROOT / "ds_configs" / deepspeed)
    cmd = ["bash", str(ROOT / "scripts" / name), "-m", str(model), "-d", str(data), "-o", str(out),
           "--max_steps", "3", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
           "--learning_rate", "1e-2", "--lr_scheduler_type", "cosine", "--warmup_steps", "1",
           "--logging_steps", "1", "--save_strategy", "no", "--lora_r", "8", "--lora_dropout", "0",
           "--model_max_length", "64", "--gradient_checkpointing", "False", "--disable_tqdm", "True",
           "--seed", "0", *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((Path(out) / "run_info.json").read_text()), proc.stdout + proc.stderr


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "adapter_model.safetensors"))


def test_qlora_zero2_two_processes(setup, tmp_path):
    from finetune import load_model

    out = tmp_path / "z2"
    info, console = _run_script("finetune_qlora.sh", setup["int4"], setup["data"], out)
    assert info["deepspeed"] and info["zero_stage"] == 2 and info["world_size"] == 2
    # the console says things once (rank 0), and third-party deprecations about their own code are not shown
    assert console.count("trainable params") == 1 and "FutureWarning" not in console, console[-3000:]
    # step 3 of 3 timed, the rows of both processes counted: the whole data set (4 rows) is one global batch
    from finetune.data import build_dataset
    from finetune.tokenization import load_tokenizer

    rows, _ = build_dataset(load_tokenizer(setup["int4"]), setup["data"], 64, verbose=False)
    assert info["throughput"]["steps_timed"] == 1
    assert info["throughput"]["trained_tokens"] == sum(sum(t != -100 for t in r["labels"]) for r in rows)
    # the precision policy (training/precision.py) after deepspeed.initialize: fp32 adapters, Int4 buffers untouched
    assert info["dtypes"]["trainable"] == ["float32"]
    assert info["dtypes"]["gptq.qweight"] == ["int32"] and info["dtypes"]["gptq.scales"] == ["float16"]

    # the schedule asked for is the one that ran (no DeepSpeed scheduler took over)
    state = json.loads((out / "trainer_state.json").read_text())
    lrs = [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h]
    # the rate each step trained with: linear warmup over 1 step, then cosine to 0 at step 3
    expected = [0.0] + [1e-2 * 0.5 * (1 + math.cos(math.pi * (k - 1) / 2)) for k in (1, 2)]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)

    model = load_model(setup["int4"], adapter=out)
    ids = torch.tensor([[1841, 872, 198, 50, 60, 70]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert any(v.abs().sum() > 0 for k, v in _adapter(out).items() if "lora_B" in k)


def test_offload_config_logs_the_rate_each_step_trained_with(setup, tmp_path):
    """ds_configs/zero2_offload.json has an optimizer block, so DeepSpeed owns the scheduler and steps it inside the
    backward pass: each log line showed the next step's rate (1e-2 for the warmup step, which applied 0)."""
    out = tmp_path / "offload"
    _script("finetune_qlora.sh", setup["int4"], setup["data"], out, nproc=1, deepspeed="zero2_offload.json")
    state = json.loads((out / "trainer_state.json").read_text())
    lrs = [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h]
    expected = [0.0] + [1e-2 * 0.5 * (1 + math.cos(math.pi * (k - 1) / 2)) for k in (1, 2)]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_two_processes_equal_one_with_same_global_batch(setup, tmp_path):
    """One SGD step at global batch 4: 2 processes x 2 rows (ZeRO-2) give the adapter 1 process x 4 rows gives."""
    flags = ["--max_steps", "1", "--optim", "sgd", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
             "--max_grad_norm", "0"]
    two, one = tmp_path / "two", tmp_path / "one"
    _script("finetune_lora.sh", setup["float"], setup["data"], two, *flags)
    info = _script("finetune_lora.sh", setup["float"], setup["data"], one, *flags,
                   "--per_device_train_batch_size", "4", nproc=1)
    assert info["world_size"] == 1 and not info["deepspeed"]
    a, b = _adapter(two), _adapter(one)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-7), k


def test_lora_zero3_two_processes_saves_gathered_adapter(setup, tmp_path):
    from peft import PeftModel

    from finetune import load_model

    out = tmp_path / "z3"
    info = _script("finetune_lora.sh", setup["float"], setup["data"], out, deepspeed="zero3.json")
    assert info["deepspeed"] and info["zero_stage"] == 3 and info["world_size"] == 2
    weights = _adapter(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    for k, v in weights.items():  # gathered, not the empty ZeRO-3 partitions
        assert v.numel() > 0 and v.shape[0] > 0, k
        if "lora_A" in k:
            assert cfg["r"] in v.shape, (k, v.shape)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    model = load_model(setup["float"], adapter=out)
    assert isinstance(model, PeftModel)


def test_two_processes_with_fewer_rows_than_a_round_say_how_many_rows_repeat(setup, tmp_path):
    """4 rows (one conversation a row), 2 processes x 4 a device: accelerate's sampler fills the 8 places of the
    round with the 4 rows and 4 repeats of them; the batch line and run_info.json say so."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    drawn = [i for p in range(2) for b in BatchSamplerShard(BatchSampler(SequentialSampler(range(4)), 4, False),
                                                              num_processes=2, process_index=p) for i in b]
    assert len(drawn) - 4 == 4  # what the sampler the Trainer shards with does

    info, console = _run_script("finetune_lora.sh", setup["float"], setup["data"], tmp_path / "o", "--max_steps", "1",
                                "--packing", "False", "--per_device_train_batch_size", "4")
    b = info["batches"]
    assert info["world_size"] == 2 and b["rows_per_epoch"] == 4 and b["rows_per_step"] == 8
    assert b["repeated_rows_per_epoch"] == 4
    line = next(x for x in console.splitlines() if x.startswith("batches: "))
    assert line.startswith("batches: an optimizer step holds the epoch's 4 rows (of up to 8: 4 a device x 1 accumulated"
                           " x 2 processes), and 4 repeated rows an epoch (the sampler completes the last round of 2 "
                           "processes x 4 a device with rows from the epoch's start"), line
