"""A seeded structural fuzzer over what a user hands the trainer: command-line flags, config files (YAML and
JSON), DeepSpeed configs and the FINETUNE_* switches. Parse and check only (parse_args, then preflight, as
train() runs them before anything loads): each input either parses or stops with one line that names the flag,
file or variable; a traceback, or a value accepted that cannot train, fails the test with the input."""

import contextlib
import io
import json
import math
import random
import shutil

import pytest

from finetune.data import DataError
from finetune.settings import ENV, SettingsError, from_environ
from finetune.training.arguments import parse_args, resolve_sampling
from finetune.training.checks import TrainConfigError, preflight

from _helpers import ROOT, train_args

SEED = 20240611
N_FLAGS, N_CONFIGS, N_DEEPSPEED = 600, 300, 80

INT_FLAGS = ["lora_r", "lora_alpha", "model_max_length", "per_device_train_batch_size", "gradient_accumulation_steps",
             "max_steps", "seed", "save_total_limit", "preprocessing_num_workers", "dataloader_num_workers",
             "eval_accumulation_steps"]
FLOAT_FLAGS = ["learning_rate", "weight_decay", "max_grad_norm", "lora_dropout", "adam_beta1", "adam_beta2",
               "adam_epsilon", "warmup_steps", "warmup_ratio", "num_train_epochs", "logging_steps", "save_steps",
               "label_smoothing_factor", "gradient_checkpointing_keep_gib", "neftune_noise_alpha"]
BOOL_FLAGS = ["packing", "train_on_prompt", "use_lora", "skip_invalid", "use_rslora", "gradient_checkpointing",
              "cuda_graphs", "overwrite_output_dir", "resume"]
CHOICE_FLAGS = ["optim", "lr_scheduler_type", "lora_bias", "on_nonfinite_loss", "train_sampling_strategy",
                "save_strategy", "report_to"]
DIR_FLAGS = ["model_name_or_path", "output_dir", "lora_weight_path", "resume_from_checkpoint"]
FILE_FLAGS = ["data_path", "eval_data_path", "deepspeed"]
LIST_FLAGS = ["lora_target_modules", "modules_to_save"]
JSON_FLAGS = ["lr_scheduler_kwargs", "accelerator_config"]
ALL = INT_FLAGS + FLOAT_FLAGS + BOOL_FLAGS + CHOICE_FLAGS + DIR_FLAGS + FILE_FLAGS + LIST_FLAGS + JSON_FLAGS

NUMBERS = ["abc", "", "-1", "0", "-0", "1", "3", "0.5", "1.5", "nan", "NaN", "inf", "-inf", "1e400", "1e-300",
           "99999999999999999999", " 2", "0x10", "1_000", "2e3"]
BOOLS = ["True", "False", "true", "TRUE", "yes", "no", "on", "off", "1", "0", "2", "", "Nope", "t", "F"]
CHOICES = ["", "bogus", "adamw", "cosine", "steps", "none", "all", "skip", "stop", "random", "sgd", "tensorboard",
           "adamw_torch", "cosine_with_min_lr", "reduce_lr_on_plateau"]
JSONS = ["{bad", "[1]", "{}", '{"min_lr": 1e-6}', '{"foo": 1}', '"x"', "5", "/nonexistent/x.json"]


@pytest.fixture(scope="module")
def paths(model, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "adir").mkdir()
    (root / "afile.txt").write_text("x")
    return {"model": model, "data": data, "root": root, "dir": root / "adir", "file": root / "afile.txt",
            "missing": root / "missing" / "x"}


def _pathish(p, rng):
    return str(rng.choice([p["dir"], p["file"], p["missing"], p["data"], p["model"], ROOT / "ds_configs",
                           ROOT / "ds_configs" / "zero2.json"])) if rng.random() < 0.8 else rng.choice(["", " ", "~"])


def _value(flag, p, rng):
    if flag in INT_FLAGS or flag in FLOAT_FLAGS:
        return rng.choice(NUMBERS)
    if flag in BOOL_FLAGS:
        return rng.choice(BOOLS)
    if flag in CHOICE_FLAGS:
        return rng.choice(CHOICES)
    if flag in JSON_FLAGS:
        return rng.choice(JSONS)
    if flag in LIST_FLAGS:
        return rng.choice(["", "nothing", "c_attn", "wte", "lm_head", "attn", "h.0.attn.c_attn"])
    return _pathish(p, rng)


def check(argv):
    """("ok", parsed) or ("error", message); anything else raised is the test's failure."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                parsed = parse_args(argv)
            except TrainConfigError:
                raise
            except ValueError as e:  # as main() turns transformers' own checks into one line
                raise TrainConfigError(" ".join(str(e).split())) from None
            resolve_sampling(parsed[1], parsed[3])
            preflight(*parsed)
        return "ok", parsed
    except (TrainConfigError, DataError) as e:
        return "error", str(e)


def _names(flag) -> list[str]:
    out = [flag]
    if flag == "gradient_checkpointing":
        out.append("activation_checkpointing")
    if flag == "warmup_ratio":
        out.append("warmup_steps")
    return out


def _workable(parsed) -> list[str]:
    """What an accepted run holds that cannot train (the invariants the checks promise)."""
    _, data_args, lora_args, args = parsed
    bad = []
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        bad.append(f"learning_rate {args.learning_rate}")
    if args.max_steps == 0 or args.max_steps < -1:
        bad.append(f"max_steps {args.max_steps}")
    if args.max_steps < 0 and not (math.isfinite(args.num_train_epochs) and args.num_train_epochs > 0):
        bad.append(f"num_train_epochs {args.num_train_epochs}")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            bad.append(name)
    for name, strategy in (("save_steps", args.save_strategy), ("logging_steps", args.logging_strategy)):
        value = getattr(args, name)
        if str(getattr(strategy, "value", strategy)) == "steps" and not (math.isfinite(value) and value > 0):
            bad.append(f"{name} {value}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            bad.append(name)
    if not (math.isfinite(args.adam_epsilon) and args.adam_epsilon > 0):
        bad.append("adam_epsilon")
    if not math.isfinite(args.warmup_steps) or args.warmup_steps < 0:
        bad.append("warmup_steps")
    if not (0 <= lora_args.lora_dropout < 1) or lora_args.lora_r < 1 or not lora_args.lora_target_modules:
        bad.append("lora")
    if data_args.model_max_length < 16:
        bad.append("model_max_length")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        bad.append("save_total_limit")
    for name in ("packing", "use_lora" if False else "train_on_prompt"):
        if not isinstance(getattr(data_args, name), bool):
            bad.append(f"{name} {getattr(data_args, name)!r}")
    if not isinstance(args.resume, bool):
        bad.append(f"resume {args.resume!r}")
    return bad


def _assert_one_line(status, result, what, names):
    assert status in ("ok", "error"), (what, result)
    if status == "error":
        assert "\n" not in result and "Traceback" not in result, (what, result)
        assert any(n in result for n in names), f"{what}: the message names none of {names}: {result}"
    else:
        assert not (bad := _workable(result)), f"{what}: accepted a value that cannot train: {bad}"


def test_command_line_flags(paths, tmp_path):
    rng = random.Random(SEED)
    for i in range(N_FLAGS):
        out = tmp_path / f"o{i}"
        extra, names = [], []
        for _ in range(rng.choice([1, 1, 1, 2])):
            flag = rng.choice(ALL)
            value = _value(flag, paths, rng)
            names += _names(flag)
            if flag == "save_steps":
                extra += ["--save_strategy", "steps"]
            if rng.random() < 0.5:
                extra.append(f"--{flag}={value}")
            else:
                extra += [f"--{flag}", value]
            if rng.random() < 0.1:  # the flag given twice: argparse's rule, the last wins
                extra += [f"--{flag}", value]
            if value.startswith(str(paths["root"])) or value == str(paths["data"]):
                names.append(value)
        argv = train_args(paths["model"], paths["data"], out, "--use_lora", "True", "--max_steps", "1", *extra)
        status, result = check(argv)
        # a bad value can also be reported by what it leads to: a dir, a file, the data, or a memory estimate
        _assert_one_line(status, result, extra, names + ["--output_dir", "needs about", "--data_path",
                                                         "--model_name_or_path", "config.json", "adapter",
                                                         str(paths["model"]), "--resume", "checkpoint",
                                                         "--eval_strategy", "--max_steps", "model_max_length",
                                                         "nothing to train"])
        shutil.rmtree(out, ignore_errors=True)


CONFIG_VALUES = [None, True, False, 0, 1, 2, -1, 0.5, 1.5, float("nan"), float("inf"), "", "abc", "True", "1e-4",
                 [], ["c_attn"], [1, 2], [["a"]], {}, {"a": 1}, {"min_lr": 1e-6}]


def _yaml_scalar(v):
    if isinstance(v, float) and math.isnan(v):
        return ".nan"
    if isinstance(v, float) and math.isinf(v):
        return ".inf"
    return json.dumps(v)  # JSON is YAML (flow style)


def test_config_files(paths, tmp_path):
    rng = random.Random(SEED + 1)
    for i in range(N_CONFIGS):
        suffix = rng.choice([".yaml", ".json", ".yml"])
        config = tmp_path / f"c{i}{suffix}"
        keys = rng.sample(ALL + ["lora_rr", "not_a_flag"], rng.choice([1, 1, 2, 3]))
        values = {k: rng.choice(CONFIG_VALUES) for k in keys}
        shape = rng.random()
        if suffix == ".json":
            text = json.dumps(values)  # (NaN / Infinity as Python's json writes them)
        else:
            text = "".join(f"{k}: {_yaml_scalar(v)}\n" for k, v in values.items())
        if shape < 0.08:
            text = rng.choice(["", "[1, 2]", "{bad", "- a\n- b\n", "a: [1\n", "\t x: 1\n", "5"])
        elif shape < 0.14:
            text = "\ufeff" + text
        elif shape < 0.2 and keys:
            k = keys[0]
            text = (json.dumps(values)[:-1] + f', "{k}": 1}}' if suffix == ".json"
                    else text + f"{k}: 1\n")  # a key given twice
        config.write_text(text, encoding="utf-8")
        out = tmp_path / f"o{i}"
        argv = [str(config), "-m", str(paths["model"]), "-d", str(paths["data"]), "-o", str(out), "--use_cpu", "True",
                "--report_to", "none", "--max_steps", "1"]
        status, result = check(argv)
        _assert_one_line(status, result, text, [str(config), *keys, "--output_dir", "needs about", "--data_path",
                                                "--model_name_or_path", "--resume", "--deepspeed", "--eval_strategy",
                                                "nothing to train", "--max_steps", "model_max_length", "adapter",
                                                "--lora", "--use_lora", "--optim", "--lr_scheduler", "--report_to",
                                                "--warmup", "checkpoint", "--activation_checkpointing"])
        shutil.rmtree(out, ignore_errors=True)


def test_a_flag_after_the_config_file_wins(paths, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("use_lora: true\nlora_r: 4\nlearning_rate: 1e-4\npacking: false\n")
    _, (_, data_args, lora_args, args) = check([str(config), *train_args(paths["model"], paths["data"],
                                                                         tmp_path / "o", "--lora_r", "12")])
    assert lora_args.lora_r == 12 and args.learning_rate == 5e-3  # train_args passes --learning_rate 5e-3
    _, (_, data_args, lora_args, args) = check([str(config), "-m", str(paths["model"]), "-d", str(paths["data"]),
                                                "-o", str(tmp_path / "o2"), "--use_cpu", "True"])
    assert lora_args.lora_r == 4 and args.learning_rate == 1e-4 and data_args.packing is False


DS_MUTATIONS = [
    ("zero_optimization", None), ("zero_optimization", 2), ("zero_optimization", {"stage": 3}),
    ("zero_optimization", {"stage": "auto"}), ("zero_optimization", {"stage": 5}), ("fp16", "yes"),
    ("fp16", {"enabled": True}), ("bf16", {"enabled": "auto"}), ("optimizer", {"type": "AdamW", "params": "x"}),
    ("optimizer", {"type": "AdamW", "params": {"lr": 1.0}}), ("scheduler", {"type": "WarmupLR"}),
    ("train_micro_batch_size_per_gpu", 3), ("train_micro_batch_size_per_gpu", "auto"), ("gradient_clipping", 0.5),
    ("gradient_accumulation_steps", 0), ("train_batch_size", 7), ("optimizer", "adam"),
]


def test_deepspeed_configs(paths, tmp_path, int4_model):
    rng = random.Random(SEED + 2)
    base = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    for i in range(N_DEEPSPEED):
        cfg = dict(base)
        changes = rng.sample(DS_MUTATIONS, rng.choice([1, 1, 2]))
        for key, value in changes:
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        ds = tmp_path / f"ds{i}.json"
        text = json.dumps(cfg)
        if rng.random() < 0.1:
            text = rng.choice(["", "{bad", "[]", "\ufeff" + text])
        ds.write_text(text, encoding="utf-8")
        model = int4_model if rng.random() < 0.3 else paths["model"]
        argv = train_args(model, paths["data"], tmp_path / f"o{i}", "--use_lora", "True", "--max_steps", "1",
                          "--deepspeed", str(ds))
        status, result = check(argv)
        # without torchrun's rank variables the last check before loading says so: every config check came first
        assert status == "error" and "\n" not in result, (text, result)
        assert str(ds) in result or "--deepspeed" in result or "ZeRO-3" in result, (text, result)


@pytest.fixture(scope="module")
def int4_model(tmp_path_factory):
    from finetune.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("int4"), int4=True)


def test_finetune_switches():
    rng = random.Random(SEED + 3)
    values = ["0", "1", "true", "False", " 1 ", "yes", "2", "maybe", "on", "-1", "auto", "triton", "torch", "TORCH"]
    for _ in range(120):
        env = {var: rng.choice(values) for var in rng.sample(sorted(ENV.values()), rng.choice([1, 2, 3]))}
        try:
            from_environ(env)
        except SettingsError as e:
            assert "\n" not in str(e) and any(str(e).startswith(f"{var}=") for var in env), (env, e)


@pytest.fixture(autouse=True)
def _no_rank_variables(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    # --report_to all/wandb reaches the W&B check, whose wandb.setup() keeps its first settings for the process:
    # offline here, and torn down after, so a later test's own W&B mode is the one it sets
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield
    import sys

    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
