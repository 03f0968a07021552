"""Training end to end on the tiny models: Q-LoRA, LoRA and full; precision; schedule; accumulation; resume."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from finetune.demo import make_demo_model
from finetune.file_modes import umask
from finetune.train import main as train_main
from finetune.training.arguments import parse_args
from finetune.training.checks import DS_CONFIGS, TrainConfigError

from _helpers import ROOT, memorise_records, train_args, train_killed_at_step

MEMORISE = memorise_records()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"float": make_demo_model(root / "float"), "int4": make_demo_model(root / "int4", int4=True)}


@pytest.fixture(scope="module")
def memorise_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "memorise.json"
    p.write_text(json.dumps(MEMORISE))
    return p


def _args(model, data, out, *extra):
    return train_args(model, data, out, "--logging_steps", "1", *extra)


def _log(out):
    state = json.loads((Path(out) / "trainer_state.json").read_text())
    return state["log_history"]


def _encoded_lengths(model_dir):
    """The memorise set's conversations as token lists (what a step trains on, unpadded)."""
    from finetune.data import build_dataset
    from finetune.tokenization import load_tokenizer

    ds, _ = build_dataset(load_tokenizer(model_dir), MEMORISE, 128, packing=False, verbose=False)
    return ds["input_ids"]


def _run(argv):
    assert train_main(argv) == 0


def _adapter_state(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "adapter_model.safetensors"))


def test_qlora_memorises_and_changes_only_adapters(models, memorise_file, tmp_path):
    from finetune import load_model
    from finetune.train import train

    out = tmp_path / "qlora"
    margs = parse_args(_args(models["int4"], memorise_file, out, "--max_steps", "40", "--use_lora", "True",
                             "--q_lora", "True"))
    base = load_model(models["int4"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    trainer = train(*margs)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.3 * losses[0], losses

    model = trainer.model
    trained = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items()}
    for k, v in before.items():  # every base tensor (packed Int4 buffers included) is bit-identical
        assert torch.equal(trained[k], v), k
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    info = json.loads((out / "run_info.json").read_text())
    assert info["dtypes"]["trainable"] == ["float32"] and info["mode"] == "qlora"
    # steady-state speed over steps 3..40: every step is the whole memorise set (4 rows, one padded length)
    speed = info["throughput"]
    assert speed["steps_timed"] == 38 and speed["seconds"] > 0 and speed["tokens_per_s"] > 0
    assert speed["padded_tokens"] % (38 * 4) == 0
    row = speed["padded_tokens"] // (38 * 4)
    assert 16 < row <= 128  # a chat with its system prompt, within --model_max_length
    assert 0 < speed["trained_tokens"] < speed["tokens"] <= speed["padded_tokens"]
    per_step = sum(len(r) for r in _encoded_lengths(models["int4"]))
    assert speed["tokens"] == 38 * per_step  # real tokens: padding not counted
    assert speed["peak_reserved_gib_per_process"] is None  # no GPU here
    assert speed["peak_allocated_gib_per_process"] is None
    assert info["cuda_graphs"] is None
    assert info["dtypes"]["gptq.scales"] == ["float16"] and info["dtypes"]["gptq.qweight"] == ["int32"]
    assert (out / "adapter_config.json").is_file() and (out / "qwen.tiktoken").is_file()
    assert (out / "loss_curve.png").stat().st_size > 1000

    reloaded = load_model(models["int4"], adapter=out)
    ids = torch.tensor([[1841, 872, 198, 100, 200, 300]])
    model.eval()
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_lora_and_full_train(models, memorise_file, tmp_path, mode):
    from finetune import load_model

    out = tmp_path / mode
    extra = ["--use_lora", "True"] if mode == "lora" else ["--learning_rate", "1e-3"]
    _run(_args(models["float"], memorise_file, out, "--max_steps", "30", *extra))
    losses = [h["loss"] for h in _log(out) if "loss" in h]
    assert losses[-1] < 0.3 * losses[0], losses
    info = json.loads((out / "run_info.json").read_text())
    assert info["dtypes"]["trainable"] == ["float32"]
    # weights as readable as run_info.json (safetensors 0.8 wrote them owner-only: finetune/file_modes.py)
    weights = sorted(out.rglob("*.safetensors"))
    assert weights and {oct(w.stat().st_mode & 0o777) for w in weights} == {oct(0o666 & ~umask())}
    if mode == "full":
        assert (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file()
        reloaded = load_model(out)
        assert reloaded is not None


def test_lora_in_bf16_with_checkpointing_trains_eagerly(models, memorise_file, tmp_path):
    """The official LoRA lines' --bf16 True --gradient_checkpointing (with LoRA dropout), eager (the CPU here; on a
    GPU with the graphs off): the backward's recompute ran the LoRA inputs cast to fp32 where the forward had left
    them bf16, and torch's checkpoint stopped the first step with a CheckpointError."""
    out = tmp_path / "o"
    _run(_args(models["float"], memorise_file, out, "--max_steps", "2", "--use_lora", "True", "--bf16", "True",
               "--gradient_checkpointing", "True", "--lora_dropout", "0.05"))
    info = json.loads((out / "run_info.json").read_text())
    assert info["global_step"] == 2 and info["precision"]["trainer_autocast"] is True


def _cosine(step, base, warmup, total):
    if step < warmup:
        return base * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def test_lr_follows_requested_cosine(models, memorise_file, tmp_path):
    out = tmp_path / "lr"
    _run(_args(models["float"], memorise_file, out, "--use_lora", "True", "--max_steps", "12",
               "--warmup_steps", "3", "--lr_scheduler_type", "cosine", "--learning_rate", "1e-3"))
    logged = {h["step"]: h["learning_rate"] for h in _log(out) if "learning_rate" in h}
    assert len(logged) == 12
    for step, lr in logged.items():
        # the rate logged with step s is the one that step s trained with: the schedule at s - 1
        assert lr == pytest.approx(_cosine(step - 1, 1e-3, 3, 12), rel=1e-6, abs=1e-12), step


def test_gradient_accumulation_matches_big_batch(models, memorise_file, tmp_path):
    """4 accumulated micro-batches of 1 give the same update as one batch of 4 (loss = mean over all
    trained tokens of the whole batch, not a mean of per-micro-batch means)."""
    common = ["--use_lora", "True", "--max_steps", "1", "--learning_rate", "1e-2", "--lr_scheduler_type",
              "constant", "--optim", "sgd", "--max_grad_norm", "0", "--save_strategy", "no"]
    a, b = tmp_path / "acc", tmp_path / "big"
    _run(_args(models["float"], memorise_file, a, *common, "--per_device_train_batch_size", "1",
               "--gradient_accumulation_steps", "4"))
    _run(_args(models["float"], memorise_file, b, *common, "--per_device_train_batch_size", "4",
               "--gradient_accumulation_steps", "1"))
    sa, sb = _adapter_state(a), _adapter_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=1e-4, atol=1e-6), k


def test_preflight_errors(models, memorise_file, tmp_path):
    from finetune.training.checks import preflight

    def check(argv, match):
        with pytest.raises(TrainConfigError, match=match):
            preflight(*parse_args(argv))

    check(_args(tmp_path / "nope", memorise_file, tmp_path / "o"), "does not exist")
    check(_args(models["float"], tmp_path / "missing.json", tmp_path / "o"), "missing.json")
    check(_args(models["float"], memorise_file, tmp_path / "o", "--q_lora", "True"), "not quantized")
    check(_args(models["int4"], memorise_file, tmp_path / "o", "--deepspeed", str(ROOT / "ds_configs/zero3.json")),
          "ZeRO-3")
    novocab = tmp_path / "novocab"
    shutil.copytree(models["float"], novocab)
    (novocab / "qwen.tiktoken").unlink()
    check(_args(novocab, memorise_file, tmp_path / "o"), "qwen.tiktoken")
    done = tmp_path / "done"
    done.mkdir()
    (done / "training_finished.json").write_text("{}")
    check(_args(models["float"], memorise_file, done), "finished run")
    bad_ds = tmp_path / "sched.json"
    bad_ds.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}, "zero_optimization": {"stage": 2}}))
    check(_args(models["float"], memorise_file, tmp_path / "o", "--deepspeed", str(bad_ds)), "scheduler")


def test_an_output_dir_where_the_runs_files_would_join_the_data_is_refused(models, memorise_file, tmp_path):
    """-d DIR -o DIR trained, wrote adapter_config.json and run_info.json among the data, and every later run with
    that -d (its resume too) stopped on them as invalid records. A pattern that cannot take them is fine."""
    from finetune.training.checks import preflight

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy2(memorise_file, data / "train.json")
    for spec, out, flag in ((data, data, "--data_path"), (data / "*.json", data, "--data_path"),
                            (tmp_path / "**" / "*.json", data / "run", "--data_path")):
        with pytest.raises(TrainConfigError, match=rf"--output_dir .* is where {flag} .* reads its data: the run's own "
                                                   r"files \(adapter_config.json, run_args.json, ...\)"):
            preflight(*parse_args(_args(models["float"], spec, out)))
    with pytest.raises(TrainConfigError, match="is where --eval_data_path"):
        preflight(*parse_args(_args(models["float"], memorise_file, data, "--eval_data_path", str(data))))
    for spec, out in ((data / "t?ain.json", data), (data / "train.json", data), (data, data / "run")):
        # nothing the run writes is read as data (beside train.json: --overwrite_output_dir, as for any other file)
        preflight(*parse_args(_args(models["float"], spec, out, "--overwrite_output_dir", "True")))


@pytest.mark.parametrize("command, hint", [
    (["-m", "finetune.cli", "train"], "; qwen-ft train --help lists them"),  # what the qwen-ft console script runs
    (["-m", "finetune.train"], "; python -m finetune.train --help lists them"),
])
def test_an_unknown_flag_names_the_help_of_the_command_that_was_run(command, hint, tmp_path):
    # it named `python -m finetune.train --help` whatever the user ran (scripts: tests/test_scripts.py)
    import subprocess
    import sys

    from _helpers import subprocess_env

    env = subprocess_env()
    env.pop("QWEN_FT_SCRIPT", None)
    p = subprocess.run([sys.executable, *command, "--lora_rr", "8"], cwd=tmp_path, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr == f"error: unknown flag: --lora_rr (did you mean --lora_r?){hint}\n"


@pytest.mark.parametrize("flags, message", [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1, got 0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1, got 0"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0 (0 trains nothing), got nan"),
    (["--learning_rate=-1e-4"], "--learning_rate must be a finite number > 0"),
    (["--learning_rate", "0"], "--learning_rate must be a finite number > 0 (0 trains nothing), got 0.0"),
    (["--max_steps", "0"], "--max_steps 0 trains nothing; leave it out (or -1) to train --num_train_epochs (3)"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1)"),
    # (both became --warmup_steps, and the later one won: 3 or 5 steps of warmup by the flags' order)
    (["--warmup_steps", "3", "--warmup_ratio=0.5"], "--warmup_ratio and --warmup_steps both given: give one"),
    (["--warmup-steps", "3", "--warmup-ratio", "0.5"], "--warmup_ratio and --warmup_steps both given: give one"),
    (["--warmup-ratio", "1.5"], "--warmup_ratio must be in [0, 1)"),  # (was "unknown flag: --warmup-ratio")
    (["--lora_rr", "8"], "unknown flag: --lora_rr (did you mean --lora_r?)"),
    (["--max_steps", "abc"], "argument --max_steps/--max-steps: invalid int value: 'abc'"),
    # (a prefix was taken for the flag it abbreviates: --lora_target for --lora_target_modules, --output for
    # --output_dir, until a second flag began the same, and a typo of another command's flag was taken for one)
    (["--lora", "8"], "unknown flag: --lora (did you mean --lora_r or --lora_alpha or --lora_dropout? flags are not "
                      "abbreviated)"),
    (["--output", "o"], "unknown flag: --output (did you mean -o/--output_dir?)"),
    (["--query", "hi"], "unknown flag: --query (a flag of qwen-ft chat, not of qwen-ft train)"),
    (["--adapter", "a"], "unknown flag: --adapter (did you mean --lora_weight_path?)"),
    (["/tmp/my", "data.json"], "values without a flag: '/tmp/my' 'data.json' (the flag before takes one value; quote a path that has spaces)"),
    # a single-dash flag was "value without a flag: '-O' (the flag before takes one value ...)"
    (["-O", "out"], "unknown flag: -O (did you mean -o?); "),
    (["-lora_r", "8"], "unknown flag: -lora_r (did you mean --lora_r?); "),
    (["-x"], "unknown flag: -x; "),
    (["-q", "hi"], "unknown flag: -q (a flag of qwen-ft chat, not of qwen-ft train); "),
    (["--lora_r", "8", "-5"], "value without a flag: '-5' (the flag before takes one value"),  # (a number: a value)
    (["--lora_alpha", "0"], "--lora_alpha must be positive"),
    (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1), got 1.5"),
    (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    # (accepted, and two runs with different data seeds wrote the same adapter, byte for byte)
    (["--data_seed", "3"], "--data_seed does nothing with group_by_length sampling (--packing False's default)"),
    (["--gradient_checkpointing_keep_gib", "-1"], "--gradient_checkpointing_keep_gib must be a finite number >= 0"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], "nothing to train: --num_train_epochs 0"),
    (["--bf16", "True", "--fp16", "True"], "fp16 and bf16"),  # transformers' own check, as one line
    # each of these was taken: no checkpoint written (save_steps <= 0), never logged (NaN), every epoch trained for
    # a typo (max_steps -5), NaN Adam states or torch's ValueError after loading, a ZeroDivisionError in eval
    (["--save_strategy", "steps", "--save_steps", "-1"], "--save_steps must be a whole number of steps, or a "
                                                         "fraction of the run's steps in (0, 1), got -1.0"),
    (["--save_strategy", "steps", "--save_steps", "0"], "--save_steps must be a whole number"),
    # (transformers read an --eval_steps of 0 as unset: evaluated every --logging_steps instead)
    (["--eval_strategy", "steps", "--eval_steps", "0", "--eval_data_path", str(ROOT / "data" / "demo_memorize.json")],
     "--eval_steps must be a whole number of steps, or a fraction of the run's steps in (0, 1), got 0.0"),
    # (transformers reads --eval_steps only under --eval_strategy steps: evaluated only at the end, nothing said)
    (["--eval_steps", "1", "--eval_data_path", str(ROOT / "data" / "demo_memorize.json")],
     "--eval_steps 1 applies only with --eval_strategy steps, and it is no (the default): add --eval_strategy steps"),
    (["--eval_strategy", "epoch", "--eval_steps", "5", "--eval_data_path", str(ROOT / "data" / "demo_memorize.json")],
     "--eval_steps 5 applies only with --eval_strategy steps, and it is epoch: add"),
    (["--logging_steps", "nan"], "--logging_steps must be a whole number of steps"),
    (["--logging_steps", "-1"], "--logging_steps must be a whole number of steps"),
    (["--max_steps", "-5"], "--max_steps must be a positive number of steps, or -1 (the default)"),
    (["--adam_beta1", "1.5"], "--adam_beta1 must be in [0, 1), got 1.5"),
    (["--adam_beta2", "nan"], "--adam_beta2 must be in [0, 1), got nan"),
    (["--adam_epsilon", "0"], "--adam_epsilon must be a finite number > 0"),
    (["--warmup_steps", "nan"], "--warmup_steps must be a finite number >= 0"),
    (["--save_total_limit", "0"], "--save_total_limit must be at least 1 (leave it out to keep every checkpoint)"),
    (["--eval_accumulation_steps", "0"], "--eval_accumulation_steps must be at least 1, got 0"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be at least 0, got -1"),
    (["--preprocessing_num_workers", "0"], "--preprocessing_num_workers must be at least 1"),
    (["--label_smoothing_factor", "nan"], "--label_smoothing_factor must be in [0, 1), got nan"),
    (["--neftune_noise_alpha", "-1"], "--neftune_noise_alpha must be a finite number >= 0, got -1.0"),
    (["--output_dir", ""], "--output_dir is empty"),
    # (argparse kept the last list: adapters on w1 alone, or only lm_head trained in full)
    (["--lora_target_modules", "c_attn", "--lora_target_modules", "w1"],
     "--lora_target_modules is given twice (c_attn, then w1): give all its names after one --lora_target_modules, "
     "e.g. --lora_target_modules c_attn w1"),
    (["--lora_target_modules", "c_attn", "--lora-target-modules=w1"], "--lora_target_modules is given twice"),
    (["--modules_to_save", "wte", "--modules_to_save=lm_head"], "--modules_to_save is given twice (wte, then lm_head)"),
    # (the last path won, silently: trained on the second file alone, wrote to the second dir)
    (["-d", "/elsewhere/b.json"], "--data_path is given twice ("),
    (["--eval_data_path", "a.json", "--eval-data-path=b.json"],
     "--eval_data_path is given twice (a.json, then b.json): several data files are one comma-separated list"),
    (["-o", "/elsewhere/out"], "--output_dir is given twice ("),
    # transformers' own messages named no flag (or came from the Trainer after loading, or were a traceback)
    (["--optim", "adamw"], "--optim 'adamw' is not an optimizer transformers knows (did you mean adamw_torch?)"),
    (["--lr_scheduler_kwargs", "{bad"], "--lr_scheduler_kwargs: invalid JSON at column 2"),
    (["--lr_scheduler_kwargs", "[1]"], "--lr_scheduler_kwargs: '[1]' is not a JSON object"),
    (["--lr_scheduler_kwargs", '{"foo": 1}'], "--lr_scheduler_type linear with --lr_scheduler_kwargs {\"foo\": 1}: "
                                              "get_linear_schedule_with_warmup() got an unexpected keyword argument"),
    (["--lr_scheduler_type", "cosine_with_min_lr"], "--lr_scheduler_type cosine_with_min_lr: One of min_lr or"),
    # (was "get_wsd_schedule() missing 1 required positional argument: 'num_decay_steps'", naming no flag)
    (["--lr_scheduler_type", "warmup_stable_decay"], "--lr_scheduler_type warmup_stable_decay: needs num_decay_steps: "
     "give it in --lr_scheduler_kwargs, e.g. '{\"num_decay_steps\": N}'"),
    (["--accelerator_config", "/nonexistent/acc.json"], "--accelerator_config /nonexistent/acc.json: no such file"),
    (["--gradient_checkpointing_kwargs", "x"], "(--gradient_checkpointing_kwargs): 'x' is not a JSON object"),
    (["--accelerator_config", '{"foo": 1}'], "--accelerator_config: not accelerate's settings: foo"),
    (["--logging_steps", "inf"], "--logging_steps must be a whole number of steps"),  # an OverflowError
    # transformers takes it; nothing here was built or tested for FSDP (the Int4 buffers, graphs, checkpoints)
    (["--fsdp", "full_shard"], "--fsdp: FSDP is not supported here; several GPUs train through DeepSpeed"),
    # an empty path (a quoted, unset shell variable) was read as not given: no eval, a fresh adapter, no resume, no
    # DeepSpeed, and nothing said
    (["--eval_data_path", ""], "--eval_data_path is empty (an unset shell variable?): give a path, or leave the flag"),
    (["--lora_weight_path="], "--lora_weight_path is empty"),
    # (the adapter's weight file, given for its dir, was "no such adapter dir")
    (["--lora_weight_path", __file__], f"--lora_weight_path {__file__}: a file, not an adapter dir: give the dir that "
                                       "holds its adapter_config.json"),
    (["--resume_from_checkpoint", " "], "--resume_from_checkpoint is empty"),
    (["--deepspeed", ""], "--deepspeed is empty"),
    # the Trainer's own tracebacks after the model had loaded
    (["--save_strategy", "best"], "--save_strategy best needs --metric_for_best_model (loss: the eval set's loss)"),
    (["--metric_for_best_model", "accuracy"], "--metric_for_best_model accuracy: not a metric this run's evaluation "
                                              "computes; it computes loss, runtime"),
    (["--use_liger_kernel", "True"], "--use_liger_kernel: Liger's kernels patch transformers' own model classes"),
    # each was taken and did nothing: no checkpointing to keep blocks of; the model's own kwargs won; no evaluation
    # to pick a best model from; the graphed step's plain loss
    (["--gradient_checkpointing_keep_gib", "1"], "--gradient_checkpointing_keep_gib 1.0 applies only with "
                                                 "--gradient_checkpointing True"),
    (["--gradient_checkpointing", "True", "--gradient_checkpointing_kwargs", '{"use_reentrant": true}'],
     '--gradient_checkpointing_kwargs {"use_reentrant": true}: checkpointing here is non-reentrant'),
    (["--load_best_model_at_end", "True"], "--load_best_model_at_end needs evaluations to pick the best checkpoint"),
    (["--cuda_graphs", "True", "--label_smoothing_factor", "0.1"],
     "--cuda_graphs True with --label_smoothing_factor 0.1: the graphed step computes the plain loss"),
])
def test_numeric_flags_out_of_range_are_one_line_before_loading(models, memorise_file, tmp_path, capsys,
                                                                monkeypatch, flags, message):
    import finetune.loading

    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    argv = _args(models["float"], memorise_file, tmp_path / "o", "--use_lora", "True", "--max_steps", "1", *flags)
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("kind, flags, message", [
    # (the run trained the whole float model: --lora_r 8 without --use_lora was a full fine-tune)
    ("float", ["--lora_r", "8", "--lora_target_modules", "w1"], "--lora_r 8, --lora_target_modules w1: LoRA settings, "
                                                                "and {model} trains in full without --use_lora True"),
    ("float", ["--use_rslora", "True"], "--use_rslora True: LoRA settings"),
    # (the Int4 Linears' biases are buffers: nothing trained, and the adapter said it carried trained biases)
    ("int4", ["--lora_bias", "all"], "--lora_bias all: the GPTQ model's Linear biases are fixed buffers"),
])
def test_lora_settings_that_would_not_apply_are_one_line_before_loading(models, memorise_file, tmp_path, capsys,
                                                                        monkeypatch, kind, flags, message):
    import finetune.loading

    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert train_main(_args(models[kind], memorise_file, tmp_path / "o", "--max_steps", "1", *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(model=models[kind]) in err and err.count("\n") == 1, err


@pytest.mark.parametrize("optim, package", [("adamw_bnb_8bit", "bitsandbytes"), ("schedule_free_adamw", "schedulefree"),
                                             ("galore_adamw", "galore_torch")])
def test_an_optimizer_whose_package_is_missing_is_one_line_before_loading(models, memorise_file, tmp_path, capsys,
                                                                          monkeypatch, optim, package):
    # transformers built the optimizer after the data and the model had loaded: an ImportError traceback on every rank
    import importlib.util

    import finetune.loading

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    argv = _args(models["float"], memorise_file, tmp_path / "o", "--use_lora", "True", "--max_steps", "1",
                 "--optim", optim)
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --optim {optim}: ") and package.split("_")[0] in err and err.count("\n") == 1, err


def test_push_to_hub_without_the_hub_is_one_line_before_loading(models, memorise_file, tmp_path, capsys, monkeypatch):
    # the Trainer created the Hub repo when it was built, after loading: a ConnectError traceback offline
    import finetune.loading

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    argv = _args(models["float"], memorise_file, tmp_path / "o", "--use_lora", "True", "--max_steps", "1",
                 "--push_to_hub", "True")
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --push_to_hub: the Hub cannot be reached or no token is set (") and \
        err.count("\n") == 1, err


@pytest.mark.parametrize("flags", [["--use_lora", "False"], ["--q_lora", "False"], ["--use_lora", "True",
                                                                                    "--q_lora", "False"]])
def test_an_int4_dir_with_lora_said_off_is_refused_not_trained_as_q_lora(models, memorise_file, tmp_path, capsys,
                                                                        monkeypatch, flags):
    import finetune.loading

    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert train_main(_args(models["int4"], memorise_file, tmp_path / "o", "--max_steps", "1", *flags)) == 2
    err = capsys.readouterr().err
    flag = "--use_lora False" if flags[:2] == ["--use_lora", "False"] else "--q_lora False"
    assert err.startswith(f"error: {flag}: ") and "is a GPTQ-quantized model, which full fine-tuning cannot train" \
        in err and err.count("\n") == 1, err


def test_bad_data_stops_before_model_load(models, tmp_path, capsys, monkeypatch):
    import finetune.loading

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(MEMORISE[0]) + "\n" + '{"conversations": [{"from": "robot", "value": "x"}]}\n')
    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert train_main(_args(models["float"], bad, tmp_path / "o", "--use_lora", "True")) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err and "robot" in err


@pytest.mark.parametrize("config, message", [
    ("[1, 2]", "must be a JSON object, got list"),
    ('{"zero_optimization": 2}', "'zero_optimization' must be an object, got 2"),
    ('{"zero_optimization": {"stage": "auto"}}', "zero_optimization.stage must be 0, 1, 2 or 3, got 'auto'"),
    ('{"optimizer": "adam"}', "'optimizer' must be an object, got 'adam'"),
    ("", "invalid JSON at line 1 column 1"),
    (None, "a directory, not a config file"),
    # were an AttributeError from transformers, accelerate's message without the file, or a silent last-wins
    ('{"zero_optimization": {"stage": 2}, "fp16": "yes"}', "'fp16' must be an object, got 'yes'"),
    ('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": "x"}}',
     "'optimizer.params' must be an object, got 'x'"),
    ('{"train_micro_batch_size_per_gpu": "auto"}', "no 'zero_optimization' section: add one with its stage"),
    ('{"zero_optimization": {"stage": 2}, "zero_optimization": {"stage": 3}}', "'zero_optimization' is given twice"),
])
def test_deepspeed_config_of_the_wrong_shape_is_one_line(models, memorise_file, tmp_path, capsys, config, message):
    # transformers and accelerate read the file while TrainingArguments is built: an AttributeError or
    # IsADirectoryError from inside them, or a JSON error that did not name the file
    ds = tmp_path / "ds"
    if config is None:
        ds.mkdir()
    else:
        ds.write_text(config)
    assert train_main(_args(models["float"], memorise_file, tmp_path / "o", "--use_lora", "True",
                            "--deepspeed", str(ds))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --deepspeed {ds}: ") and message in err and err.count("\n") == 1, err


def test_a_missing_deepspeed_config_names_the_packages_own(models, memorise_file, tmp_path, capsys, monkeypatch):
    """`DEEPSPEED=ds_configs/zero2.json` from another dir: "no such file (the project's configs are in ds_configs/)"
    did not say where that ds_configs/ is; installed from a wheel there was none (the hint looked for the checkout's
    beside the package, and said only where the path was read from)."""
    monkeypatch.chdir(tmp_path)
    assert train_main(_args(models["float"], memorise_file, tmp_path / "o", "--use_lora", "True",
                            "--deepspeed", "ds_configs/zero2.json")) == 2
    assert capsys.readouterr().err == (f"error: --deepspeed ds_configs/zero2.json: no such file (the path is read from "
                                       f"{tmp_path}; the package's own configs go by name: --deepspeed zero2, "
                                       "zero2_offload, zero3, zero3_offload)\n")


def test_deepspeed_takes_a_shipped_configs_name_from_any_dir(tmp_path, monkeypatch):
    """Installed from a wheel (pip install ., not -e) the checkout's ds_configs/ is not beside the package: the
    configs are in it (finetune/ds_configs, which ds_configs/ links to) and --deepspeed takes their names."""

    monkeypatch.chdir(tmp_path)
    assert DS_CONFIGS == (ROOT / "ds_configs").resolve()  # (the checkout's link, to the package's dir)
    for name in ("zero2_offload", "zero2_offload.json"):
        *_, args = parse_args(["-m", "M", "-d", "D", "-o", "O", "--use_cpu", "True", "--deepspeed", name])
        assert args.deepspeed == str(DS_CONFIGS / "zero2_offload.json")
    (tmp_path / "zero2.json").write_text('{"zero_optimization": {"stage": 1}}')  # a file of the name wins
    *_, args = parse_args(["-m", "M", "-d", "D", "-o", "O", "--use_cpu", "True", "--deepspeed", "zero2.json"])
    assert args.deepspeed == "zero2.json" and args.hf_deepspeed_config.config["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize("official, own", [("finetune/ds_config_zero2.json", "zero2.json"),
                                           ("finetune/ds_config_zero3.json", "zero3.json")])
def test_the_official_scripts_deepspeed_paths_name_the_projects_configs(models, memorise_file, tmp_path, capsys,
                                                                       monkeypatch, official, own):
    """The official lines' --deepspeed finetune/ds_config_zero2.json (no such file here): "no such file" named no
    replacement; now the config of the same ZeRO settings here, said in one line."""
    monkeypatch.chdir(tmp_path)
    args = parse_args(_args(models["float"], memorise_file, tmp_path / "o", "--use_lora", "True",
                            "--deepspeed", official))[3]
    assert args.deepspeed == str(DS_CONFIGS / own)
    assert capsys.readouterr().err == (f"note: --deepspeed {official} is the official Qwen scripts' config, not here: "
                                       f"using {DS_CONFIGS / own}, its ZeRO settings without the optimizer "
                                       "and scheduler blocks that would replace --optim and --lr_scheduler_type\n")


def test_qwen_vl_fix_vit_is_refused_saying_why(models, memorise_file, tmp_path, capsys):
    # (an unknown flag with no near name said nothing of what it was)
    assert train_main(_args(models["float"], memorise_file, tmp_path / "o", "--fix_vit", "True")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown flag: --fix_vit (Qwen-VL's finetune.py flag, which freezes the vision "
                          "tower; the models trained here are Qwen text models, with none: drop it); ") and \
        err.count("\n") == 1


def test_deepspeed_config_with_a_bom_is_one_line(models, memorise_file, tmp_path, capsys):
    # transformers' json.load of the file raised "Unexpected UTF-8 BOM" naming neither the flag nor the file
    ds = tmp_path / "ds.json"
    ds.write_bytes(b"\xef\xbb\xbf" + (ROOT / "ds_configs" / "zero2.json").read_bytes())  # as Notepad saves it
    assert train_main(_args(models["float"], memorise_file, tmp_path / "o", "--use_lora", "True",
                            "--deepspeed", str(ds))) == 2
    err = capsys.readouterr().err
    assert err == f"error: --deepspeed {ds}: starts with a UTF-8 BOM, which transformers' reader of the file " \
                  "refuses; save it as UTF-8 without a BOM\n"


@pytest.mark.parametrize("name, text, message", [
    # each was taken silently (the last of two values, a resume of 2, packing None) or was a traceback (a
    # TypeError from pathlib, an OSError from reading file descriptor 5)
    ("twice.yaml", "lora_r: 8\nlearning_rate: 1e-4\nlora_r: 16\n", "'lora_r' is given twice (again at line 3)"),
    ("twice.json", '{"lora_r": 8, "lora_r": 16}', "'lora_r' is given twice"),
    ("two.yaml", "resume: 2\n", "resume: 2 is not true or false"),
    ("null.json", '{"packing": null}', "packing: None is not true or false"),
    ("maybe.yaml", "packing: maybe\n", "packing: 'maybe' is not a valid value"),
    ("ds.yaml", "deepspeed: 5\n", "deepspeed: 5 is not a path or a mapping"),
    ("acc.yaml", "accelerator_config: 5\n", "accelerator_config: 5 is not a path or a mapping"),
    ("report.yaml", "report_to: 5\n", "report_to: 5 is not a name or a list of names"),
    ("out.yaml", "output_dir: true\n", "output_dir: True is not a path"),
])
def test_config_file_values_that_cannot_be_meant_are_one_line_naming_the_file(models, memorise_file, tmp_path,
                                                                              capsys, name, text, message):
    config = tmp_path / name
    config.write_text(text)
    assert train_main([str(config), "-m", str(models["float"]), "-d", str(memorise_file), "-o",
                       str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file {config}: {message}") and err.count("\n") == 1, err


def test_chat_data_given_without_d_says_data_goes_with_d(memorise_file, tmp_path, capsys):
    # `qwen-ft train data.json` read the data as a config of flags ("got a list"), and a JSONL file was "a value
    # without a flag (the flag before takes one value)" where no flag came before
    record = tmp_path / "one.json"
    record.write_text('{"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]}')
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(record.read_text() + "\n")
    for path, message in ((memorise_file, f"config file {memorise_file}: must map flag names to values, got a list "
                                          f"of records (chat data goes with -d: -d {memorise_file})"),
                          (record, f"config file {record}: not trainer flags: conversations (a chat record: data "
                                   f"goes with -d: -d {record})"),
                          (jsonl, f"value without a flag: '{jsonl}' (chat data goes with -d: -d {jsonl})")):
        assert train_main([str(path)]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"


def test_config_file_values_read_as_the_command_line_reads_them(models, memorise_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_bytes(b"\xef\xbb\xbf" + b"use_lora: 1\nresume_from_checkpoint: false\nrun_name: 2024\n"
                       b"lora_target_modules: c_attn\nsave_strategy: no\neval_strategy: off\n")  # a BOM, as Windows
    # editors write; YAML's bare no / off (false) are the command line's `no` ("False is not one of no, ...")
    model_args, data_args, lora_args, args = parse_args([str(config), "-m", str(models["float"]), "-d",
                                                         str(memorise_file), "-o", str(tmp_path / "o")])
    assert lora_args.use_lora is True and lora_args.lora_target_modules == ["c_attn"]
    assert args.resume_from_checkpoint == "false" and args.run_name == "2024"
    assert str(args.save_strategy.value if hasattr(args.save_strategy, "value") else args.save_strategy) == "no"
    assert str(args.eval_strategy.value if hasattr(args.eval_strategy, "value") else args.eval_strategy) == "no"
    # names spelled with dashes, as the command line takes them (--max-steps): "not trainer flags" before
    config.write_text("max-steps: 7\nlora-target-modules: [c_attn, w1]\noutput-dir: ~/runs/x\n")
    model_args, data_args, lora_args, args = parse_args([str(config), "-m", str(models["float"]), "-d",
                                                         str(memorise_file)])
    assert args.max_steps == 7 and lora_args.lora_target_modules == ["c_attn", "w1"]
    assert args.output_dir == str(Path.home() / "runs" / "x")
    config.write_text("max-steps: 7\nmax_steps: 8\n")
    with pytest.raises(TrainConfigError, match="max-steps and max_steps are the same flag; give it once"):
        parse_args([str(config), "-m", str(models["float"]), "-d", str(memorise_file)])


@pytest.mark.parametrize("values, message", [
    ({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 3},
     "train_micro_batch_size_per_gpu is 8 there, --per_device_train_batch_size 4 here; gradient_accumulation_steps "
     "is 3 there, --gradient_accumulation_steps 1 here"),
    ({"gradient_clipping": 0.5}, "gradient_clipping is 0.5 there, --max_grad_norm 1.0 here"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": "auto"}}},
     "optimizer.params.lr is 0.0001 there, --learning_rate 0.005 here"),
    ({"bf16": {"enabled": True}}, "bf16.enabled is true there, and this run turns DeepSpeed's bf16 off (it computes "
                                  "in float32"),
])
def test_deepspeed_values_that_contradict_the_command_line_are_one_line_before_loading(
        models, memorise_file, tmp_path, monkeypatch, values, message):
    # transformers' "Please correct the following DeepSpeed config values" ValueError once the model had loaded
    import finetune.loading
    from finetune.train import train

    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg.update(values)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(cfg))
    margs = parse_args(_args(models["float"], memorise_file, tmp_path / "o", "--use_lora", "True",
                             "--deepspeed", str(ds)))
    for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29500")):  # as torchrun sets them (after parsing: nothing starts here)
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(TrainConfigError) as e:
        train(*margs)
    assert str(e.value).startswith(f"--deepspeed {ds} sets values the command line decides: {message}")
    assert str(e.value).endswith('set them to "auto" (as in ds_configs/) or pass the flags to match')


def test_deepspeed_without_a_launcher_stops_before_loading(models, memorise_file, tmp_path, capsys, monkeypatch):
    # `qwen-ft train --deepspeed ...` by hand: DeepSpeed looked for MPI once the data and the model had loaded
    import finetune.loading
    import finetune.training.checks as checks

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(checks, "_importable", lambda module: module != "mpi4py")  # no mpi4py either
    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "o"
    assert train_main(_args(models["float"], memorise_file, out, "--use_lora", "True",
                            "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --deepspeed needs the rank variables torchrun sets") and "scripts/" in err, err
    assert not out.exists()


def test_deepspeed_not_installed_is_one_line_before_parsing(models, memorise_file, tmp_path, capsys, monkeypatch):
    # without the [deepspeed] extra, transformers' TrainingArguments raised PackageNotFoundError (a traceback)
    import sys

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    ds = ROOT / "ds_configs" / "zero2.json"
    out = tmp_path / "o"
    assert train_main(_args(models["float"], memorise_file, out, "--use_lora", "True", "--deepspeed", str(ds))) == 2
    err = capsys.readouterr().err
    assert err == f'error: --deepspeed {ds}: DeepSpeed is not installed: pip install -e ".[deepspeed]" in the ' \
                  "checkout (or pip install deepspeed)\n"
    assert not out.exists()


@pytest.mark.parametrize("where", ["load", "step"])
def test_out_of_memory_is_one_line_with_what_to_change(models, memorise_file, tmp_path, capsys, monkeypatch, where):
    """A device out-of-memory error while loading or in a training step ends the run with one line: where it
    happened and the flags that lower the need (half the batch with twice the accumulation first), no traceback."""
    import finetune.loading
    from finetune.training.trainer import QwenTrainer

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    if where == "load":
        monkeypatch.setattr(finetune.loading, "load_model", oom)
    else:
        monkeypatch.setattr(QwenTrainer, "train", oom)
    for ckpt in ("False", "True"):
        assert train_main(_args(models["float"], memorise_file, tmp_path / f"o{ckpt}", "--use_lora", "True",
                                "--gradient_accumulation_steps", "3", "--gradient_checkpointing", ckpt)) == 2
        err = capsys.readouterr().err
        line = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(line) == 1 and "Traceback" not in err, err
        assert ("while loading the model" if where == "load" else "in optimizer step 1") in line[0]
        assert "--per_device_train_batch_size 2 --gradient_accumulation_steps 6" in line[0]
        assert "--model_max_length (now 128)" in line[0]
        assert ("--gradient_checkpointing True" in line[0]) == (ckpt == "False")  # not asked of a run that has it
        assert ("--gradient_checkpointing_keep_gib 0 (now 1 plus what the compact input embedding freed"
                in line[0]) == (ckpt == "True")


def test_too_short_max_length_is_an_error(models, memorise_file, tmp_path, capsys):
    assert train_main(_args(models["float"], memorise_file, tmp_path / "o", "--use_lora", "True",
                            "--model_max_length", "16")) == 2
    assert "model_max_length" in capsys.readouterr().err


def test_resume_after_kill_matches_uninterrupted(models, memorise_file, tmp_path):
    """A run killed with SIGKILL after its step-4 checkpoint, resumed with --resume, ends with the same adapter
    as a run that was never interrupted."""
    common = ["--use_lora", "True", "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4",
              "--per_device_train_batch_size", "1", "--lora_dropout", "0.1"]
    full = tmp_path / "full"
    _run(_args(models["float"], memorise_file, full, *common))

    killed = tmp_path / "killed"
    # SIGKILL the process itself when step 7 starts: after the step-4 checkpoint, mid-way to step 8.
    proc = train_killed_at_step(_args(models["float"], memorise_file, killed, *common), step=6)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (killed / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (killed / "checkpoint-8").exists()

    _run(_args(models["float"], memorise_file, killed, *common, "--resume", "True"))
    sa, sb = _adapter_state(full), _adapter_state(killed)
    for k in sa:  # within float tolerance: the killed run is a child process, summing in its own thread order
        assert torch.allclose(sa[k], sb[k], rtol=1e-4, atol=1e-6), (k, (sa[k] - sb[k]).abs().max())
    steps = [h["step"] for h in _log(killed) if "loss" in h]
    assert steps[-1] == 8


@pytest.mark.parametrize("stage, mode", [(2, "qlora"), (3, "lora"), (2, "full")])
def test_deepspeed_config_follows_resolved_precision(models, memorise_file, tmp_path, stage, mode):
    """`--bf16 True` as the official scripts pass it: below ZeRO-3 the adapters stay fp32 on a bf16 base, so
    DeepSpeed must not cast the model (bf16 off) and must run the forward under its own torch_autocast (it
    switches off an autocast entered outside its engine); ZeRO-3 and full fine-tuning use DeepSpeed's bf16."""
    from finetune.training.checks import TrainPlan
    from finetune.training import precision as policy

    margs = parse_args(_args(models["float"], memorise_file, tmp_path / "o", "--bf16", "True", "--deepspeed",
                             str(ROOT / f"ds_configs/zero{stage}.json")))
    args = margs[3]
    plan = TrainPlan(model_dir=models["float"], mode=mode, quantized=mode == "qlora", device="cpu",
                     zero_stage=stage, resume_from=None)
    precision = policy.decide(args, plan)
    policy.apply(args, precision)
    assert precision.compute_dtype == torch.bfloat16
    cfg = args.hf_deepspeed_config.config
    native_bf16 = stage == 3 or mode == "full"
    assert cfg["bf16"]["enabled"] is native_bf16 and args.bf16 is native_bf16
    assert ("torch_autocast" in cfg) is (not native_bf16)
    if not native_bf16:
        assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "scheduler" not in cfg


@pytest.mark.parametrize("report_to", ["tensorboard", "wandb"])
def test_report_to_tensorboard_and_offline_wandb(models, memorise_file, tmp_path, monkeypatch, report_to):
    if report_to == "wandb":
        pytest.importorskip("wandb")
        monkeypatch.setenv("WANDB_MODE", "offline")  # no network: runs are written locally
        monkeypatch.setenv("WANDB_DIR", str(tmp_path))
        monkeypatch.setenv("WANDB_SILENT", "true")
    else:
        pytest.importorskip("tensorboard")
    out = tmp_path / "o"
    _run(_args(models["float"], memorise_file, out, "--use_lora", "True", "--max_steps", "3",
               "--report_to", report_to))
    if report_to == "wandb":
        runs = list((tmp_path / "wandb").glob("offline-run-*"))
        assert runs and any(runs[0].rglob("*.wandb"))
    else:
        assert list(out.rglob("events.out.tfevents.*"))  # under output_dir/runs/


@pytest.mark.parametrize("report_to, message", [
    ("wandbb", "--report_to wandbb: not a reporting integration (did you mean wandb?)"),
    ("mlflow", "--report_to mlflow: not installed (pip install mlflow)"),
])
def test_report_to_unknown_or_not_installed_is_one_line_before_loading(models, memorise_file, tmp_path, capsys,
                                                                       monkeypatch, report_to, message):
    # the Trainer's ValueError / RuntimeError tracebacks once the model had loaded
    import finetune.loading
    import finetune.training.checks as checks

    monkeypatch.setattr(checks, "_available_integrations", lambda: ["tensorboard"])
    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert train_main(_args(models["float"], memorise_file, tmp_path / "o", "--use_lora", "True",
                            "--report_to", report_to)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_report_to_wandb_without_a_login_is_one_line_before_loading(models, memorise_file, tmp_path):
    # wandb.init's UsageError ("No API key configured") when training began, after the model had loaded. A child
    # process: wandb keeps the settings of its first setup in a process, and no terminal to prompt on.
    import subprocess
    import sys

    pytest.importorskip("wandb")
    from _helpers import subprocess_env

    env = {k: v for k, v in subprocess_env(HOME=str(tmp_path)).items()
           if not k.startswith("WANDB_") and k != "NETRC"}
    out = tmp_path / "o"
    p = subprocess.run([sys.executable, "-m", "finetune.train", *_args(models["float"], memorise_file, out,
                        "--use_lora", "True", "--report_to", "wandb")], cwd=tmp_path, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: --report_to wandb: no W&B API key: run `wandb login`")
    assert "Traceback" not in p.stderr and "Loading weights" not in p.stderr and not out.exists()


def test_packing_is_the_default_and_the_run_says_what_a_step_holds(models, tmp_path, capsys):
    # packed rows hold several conversations: the log and run_info.json say how many a step holds and how
    # many steps an epoch has (the Trainer's own count)
    base = ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(tmp_path)]
    assert parse_args(base)[1].packing is True
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(memorise_records() * 6))  # 24 short conversations
    out = tmp_path / "packed"
    argv = _args(models["int4"], data, out, "--packing", "True", "--use_lora", "True", "--q_lora", "True",
                 "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                 "--num_train_epochs", "1")
    _run(argv)
    info = json.loads((out / "run_info.json").read_text())
    b = info["batches"]
    assert b["packing"] is True and b["rows_per_step"] == 4 and b["conversations_per_row"] > 1
    assert b["steps_per_epoch"] == b["total_steps"] == info["global_step"]
    printed = capsys.readouterr().out
    assert "batches: an optimizer step holds 4 rows (2 a device x 2 accumulated x 1 process)" in printed
    assert f"{b['steps_per_epoch']} optimizer steps an epoch" in printed


def test_data_that_packs_into_fewer_rows_than_a_step_holds_says_what_a_step_really_holds(models, tmp_path, capsys):
    # four short conversations pack into one row: the line said "an optimizer step holds 16 rows ... 1 optimizer
    # steps an epoch" (the configured size, and bad grammar); it now says the step holds the epoch's one row
    out = tmp_path / "one_row"
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(memorise_records()))  # 4 short conversations
    argv = _args(models["float"], data, out, "--packing", "True", "--use_lora", "True",
                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4",
                 "--num_train_epochs", "2", "--model_max_length", "256")
    _run(argv)
    info = json.loads((out / "run_info.json").read_text())
    b = info["batches"]
    assert b["rows_per_epoch"] == 1 and b["rows_per_step"] == 16  # rows_per_step kept: what the flags allow
    assert b["repeated_rows_per_epoch"] == 0  # one process: no sampler fills a round with repeats
    assert b["steps_per_epoch"] == 1 and b["total_steps"] == info["global_step"] == 2  # the Trainer's own count
    assert b["conversations_per_step"] == 4
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("batches: "))
    assert line.startswith("batches: an optimizer step holds the epoch's 1 row (of up to 16: 4 a device x 4 "
                           "accumulated x 1 process), 4 conversations (packed: 4.0 a row;"), line
    assert line.endswith("; 1 optimizer step an epoch, 2 in this run (2 epochs)"), line
    assert "1 optimizer steps" not in printed and "holds 16 rows" not in printed


def test_dataloader_drop_last_counts_the_steps_it_trains_and_refuses_an_empty_epoch(models, tmp_path, capsys):
    """--dataloader_drop_last: the plan counted the dropped round as a step (3 an epoch said, 2 trained); with fewer
    rows than one batch the run was transformers' traceback, or with --max_steps 0 steps trained and "Done."."""
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(memorise_records() * 3))  # 12 conversations, one a row
    out = tmp_path / "drop"
    _run(_args(models["float"], data, out, "--packing", "False", "--use_lora", "True", "--num_train_epochs", "2",
               "--per_device_train_batch_size", "5", "--gradient_accumulation_steps", "1",
               "--dataloader_drop_last", "True"))
    info = json.loads((out / "run_info.json").read_text())
    assert info["batches"]["steps_per_epoch"] == 2 and info["batches"]["total_steps"] == info["global_step"] == 4
    from types import SimpleNamespace as N

    from finetune.train import batch_plan

    # an epoch smaller than one step: the step holds the rows the dropped round leaves (8 of 10), not "the epoch's 10"
    plan = batch_plan(N(rows=10, records_used=10, packed=False), N(packing=False),
                      N(per_device_train_batch_size=4, gradient_accumulation_steps=8, world_size=1, max_steps=-1,
                        dataloader_drop_last=True, num_train_epochs=1, train_sampling_strategy="random"))
    assert plan["text"].startswith("batches: an optimizer step holds the epoch's 8 rows (of up to 32")
    capsys.readouterr()
    data.write_text(json.dumps(memorise_records()))  # 4 short conversations: one packed row
    for steps in ([], ["--max_steps", "4"]):
        assert train_main(_args(models["float"], data, tmp_path / "none", "--use_lora", "True",
                                "--per_device_train_batch_size", "2", "--dataloader_drop_last", "True",
                                "--model_max_length", "256", "--packing", "True", *steps)) == 2
        assert capsys.readouterr().err == (
            "error: --dataloader_drop_last True drops every batch: the data makes 1 row an epoch (packed), fewer than "
            "one round of batches (2: 2 a device x 1 process); lower --per_device_train_batch_size, or drop "
            "--dataloader_drop_last\n")
        assert not (tmp_path / "none").exists()


def test_one_chat_a_row_batches_chats_of_like_length_by_default(model, tmp_path):
    """--packing False: --train_sampling_strategy auto becomes group_by_length (transformers' LengthGroupedSampler),
    so a batch pads less than in random order; random stays available; packed rows keep random order."""
    import json
    import random

    from finetune.train import train
    from finetune.training.arguments import parse_args

    from _helpers import train_args

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    records = [{"id": f"r{i}", "conversations": [
        {"from": "user", "value": "Say some words."},
        {"from": "assistant", "value": " ".join(rng.choice(words) for _ in range(rng.choice([2, 4, 30, 60])))}]}
        for i in range(64)]
    data = tmp_path / "varied.json"
    data.write_text(json.dumps(records))

    def real_share(out, *flags):
        trainer = train(*parse_args(train_args(model, data, tmp_path / out, "--use_lora", "True", "--max_steps",
                                               "10", *flags)))
        speed = json.loads((tmp_path / out / "run_info.json").read_text())["throughput"]
        return trainer.args.train_sampling_strategy, speed["tokens_per_s"] / speed["padded_tokens_per_s"]

    grouped, grouped_share = real_share("grouped")
    plain, random_share = real_share("random", "--train_sampling_strategy", "random")
    assert (grouped, plain) == ("group_by_length", "random")
    assert grouped_share > random_share + 0.1, (grouped_share, random_share)  # measured: 0.84 against 0.67
    packed, _ = real_share("packed", "--packing", "True", "--max_steps", "4")
    assert packed == "random"


def test_log_level_quiets_the_projects_own_log_lines_too(models, memorise_file, tmp_path, caplog):
    # --log_level set transformers' verbosity (the Trainer's) and left the project's INFO lines as they were
    import logging

    def project_info(out, *extra):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            _run(_args(models["int4"], memorise_file, tmp_path / out, "--q_lora", "True", "--use_lora", "True",
                       "--max_steps", "1", *extra))
        return [r.getMessage() for r in caplog.records if r.name.startswith("finetune") and r.levelno == logging.INFO]

    assert project_info("default")  # (e.g. "input embedding: kept whole (not on a GPU)")
    assert project_info("quiet", "--log_level", "warning") == []
    assert logging.getLogger("finetune").level == logging.NOTSET  # (restored: main() also runs in-process)


@pytest.mark.parametrize("paths", [["a.json", "./a.json"], ["out", "out/"], ["a.json,b.json", "./a.json, b.json"]])
def test_a_path_flag_given_twice_as_the_same_path_written_otherwise_is_one_path(paths):
    # (`-d a.json -d ./a.json` was "--data_path is given twice (a.json, then ./a.json)")
    flag = "-o" if paths[0] == "out" else "-d"
    other = ["-d", "x.json"] if flag == "-o" else ["-o", "o"]
    _, data_args, _, args = parse_args(["-m", "m", *other, flag, paths[0], flag, paths[1]])
    assert (args.output_dir if flag == "-o" else data_args.data_path) == paths[1]
