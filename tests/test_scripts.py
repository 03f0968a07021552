"""The training scripts as a user runs them: the official Qwen command lines unchanged, --help, a config file.

The official flag sets (tests/fixtures/official_cmdlines.py, copied from QwenLM/Qwen with the commit noted) run
through scripts/finetune_*.sh on the tiny models with the model, data and output paths replaced, `--fp16` removed (it
needs a GPU) and `--max_steps 2` appended; their `--deepspeed finetune/ds_config_zero2.json` (zero3) stays.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.demo import make_demo_model

from _helpers import ROOT, free_port, subprocess_env, write_memorise

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from official_cmdlines import CMDLINES, QWEN_COMMIT

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    return {"float": make_demo_model(root / "float"), "int4": make_demo_model(root / "int4", int4=True),
            "data": write_memorise(root / "mem.json")}


def _script(name, argv, tmp_path, **env):
    """Run scripts/<name> from the repository root (the official lines name ds configs relative to it)."""
    env = subprocess_env(CUDA_VISIBLE_DEVICES="", QWEN_FT_CACHE=str(tmp_path / "demo-cache"),
                         MASTER_PORT=str(free_port()), **env)
    for k in ("MODEL", "DATA", "OUTPUT", "DEEPSPEED", "NPROC"):
        env.pop(k, None)
    return subprocess.run(["bash", str(ROOT / "scripts" / name), *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)


def _official(name, setup, out, ds=None, keep_fp16=False):
    """(project script, the official flags with the model, data and output paths replaced). The --deepspeed path
    stays the official one (finetune/ds_config_zero2.json, finetune_lora_ds.sh's default too) unless `ds` is given;
    --fp16 is dropped (it needs a GPU) unless `keep_fp16`; --bf16 stays (the scripts train on the CPU with
    --use_cpu, in bf16)."""
    script, kind, flags = CMDLINES[name]
    subst = {"$MODEL": str(setup[kind]), "$DATA": str(setup["data"]), "output_qwen": str(out),
             "${DS_CONFIG_PATH}": "finetune/ds_config_zero2.json"}
    argv = [subst.get(f, f) for f in flags]
    if ds is not None:
        argv[argv.index("--deepspeed") + 1] = ds
    if not keep_fp16 and "--fp16" in argv:
        i = argv.index("--fp16")
        del argv[i:i + 2]
    return script, argv


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_fixture_is_the_official_sets():
    assert len(QWEN_COMMIT) == 40
    assert len(CMDLINES) == 5  # every fine-tuning script of the official repo
    for script, kind, flags in CMDLINES.values():
        assert flags[:2] == ["--model_name_or_path", "$MODEL"]
        assert ("--use_lora" in flags) is (script != "finetune_full.sh")
    official_ds = json.loads((FIXTURES / "qwen_ds_config_zero2.json").read_text())
    assert "scheduler" in official_ds and "optimizer" in official_ds


@pytest.mark.parametrize("name", list(CMDLINES))
def test_official_command_line_trains(setup, tmp_path, name):
    """Each official line, its paths replaced and nothing else but --fp16 (GPU only): --bf16 in bf16 on the CPU,
    with checkpointing and LoRA dropout; finetune/ds_config_zero2.json (zero3) read as ds_configs/zero2.json."""
    out = tmp_path / "out"
    script, argv = _official(name, setup, out)
    proc = _script(script, [*argv, "--max_steps", "2"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "mpi4py" not in proc.stderr and "Traceback" not in proc.stderr
    # --model_name_or_path / --data_path / --output_dir acted as -m / -d / -o: no demo
    assert "demo" not in proc.stdout and not (tmp_path / "demo-cache").exists()
    info = json.loads((out / "run_info.json").read_text())
    mode = "qlora" if "--q_lora" in argv else "lora" if "--use_lora" in argv else "full"
    assert info["global_step"] == 2 and info["mode"] == mode
    official_ds = argv[argv.index("--deepspeed") + 1] if "--deepspeed" in argv else None
    stage = None if official_ds is None else 3 if official_ds.endswith("zero3.json") else 2
    assert info["deepspeed"] is (stage is not None) and info["zero_stage"] == stage
    if official_ds is not None:
        assert (f"note: --deepspeed {official_ds} is the official Qwen scripts' config, not here: using "
                f"{ROOT / 'finetune' / 'ds_configs' / f'zero{stage}.json'}") in proc.stderr
    assert info["precision"]["compute_dtype"] == ("bfloat16" if "--bf16" in argv else "float32")
    run_args = json.loads((out / "run_args.json").read_text())
    kind = CMDLINES[name][1]
    assert run_args["model_dir"] == str(setup[kind]) and run_args["data"]["data_path"] == str(setup["data"])
    assert run_args["cwd"] == str(ROOT)  # (where a relative data path is read from: merge reads it from anywhere)
    assert (out / ("model.safetensors" if mode == "full" else "adapter_model.safetensors")).is_file()


def test_official_qlora_line_unmodified_on_cpu_names_fp16(setup, tmp_path):
    """Paths replaced, nothing else: the official Q-LoRA line's --fp16 stops the run before loading."""
    out = tmp_path / "out"
    script, argv = _official("finetune_qlora_single_gpu.sh", setup, out, ds=str(FIXTURES / "qwen_ds_config_zero2.json"),
                             keep_fp16=True)
    proc = _script(script, argv, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "--fp16" in errors[0], proc.stderr[-3000:]
    assert not out.exists() and not (tmp_path / "demo-cache").exists()


def test_official_deepspeed_config_is_refused(setup, tmp_path):
    """Qwen's ds_config_zero2.json carries optimizer and scheduler blocks: refused, saying why and what to use."""
    out = tmp_path / "out"
    script, argv = _official("finetune_lora_ds.sh", setup, out, ds=str(FIXTURES / "qwen_ds_config_zero2.json"))
    proc = _script(script, argv, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "scheduler" in errors[0] and "--lr_scheduler_type" in errors[0] and "use --deepspeed zero2 " in errors[0]
    assert not out.exists()


@pytest.mark.parametrize("mode", ["qlora", "lora", "full"])
def test_help_prints_the_scripts_usage(mode, tmp_path):
    proc = _script(f"finetune_{mode}.sh", ["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{'Q-LoRA' if mode == 'qlora' else 'LoRA' if mode == 'lora' else 'Full'}")
    assert f"Usage: bash scripts/finetune_{mode}.sh [-m MODEL]" in proc.stdout
    assert "CONFIG" in proc.stdout and "DEEPSPEED" in proc.stdout
    assert "set -euo" not in proc.stdout and "source" not in proc.stdout


@pytest.mark.parametrize("name, command", [("chat", "chat"), ("merge", "merge"), ("serve", "serve")])
def test_the_other_scripts_help_is_their_usage_then_the_commands(name, command, tmp_path):
    """chat.sh and merge.sh printed their header with the comment marks; serve.sh printed no usage of its own."""
    proc = _script(f"{name}.sh", ["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].startswith(f"Usage: bash scripts/{name}.sh ") and not any(l.startswith("#") for l in lines)
    assert f"usage: qwen-ft {command} " in proc.stdout


@pytest.mark.parametrize("argv", [["--help"], []])
def test_the_shared_part_run_by_itself_names_the_scripts(argv, tmp_path):
    # (bash scripts/_launch.sh --help ended in "MODE: unbound variable")
    proc = _script("_launch.sh", argv, tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: {ROOT / 'scripts' / '_launch.sh'} is the training scripts' shared part: run "
        "scripts/finetune_qlora.sh, finetune_lora.sh or finetune_full.sh"], proc.stderr


def test_an_unknown_trainer_flag_names_the_script_and_the_trainers_help(tmp_path):
    # the trainer said `python -m finetune.train --help`, a command the user had not run
    script = ROOT / "scripts" / "finetune_qlora.sh"
    proc = _script("finetune_qlora.sh", ["-m", str(tmp_path / "m"), "-d", str(tmp_path / "d.json"),
                                         "--lora_rr", "8"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert _error_lines(proc.stderr) == [
        f"error: unknown flag: --lora_rr (did you mean --lora_r?); the trainer's flags, which {script} passes on: "
        f"qwen-ft train --help (the script's own: bash {script} --help)"], proc.stderr


def test_the_demo_refused_for_a_flag_leaves_no_output_dir_it_made(tmp_path):
    # the demo made its output dir (with its marker) before the trainer refused the flag, and left it behind
    out = tmp_path / "runs" / "demo"
    proc = _script("finetune_qlora.sh", ["-o", str(out), "--lora_rr", "8"], tmp_path)
    assert proc.returncode == 2 and "unknown flag: --lora_rr" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()
    out.mkdir(parents=True)  # a dir that was there before is left as it was found, marked as the demo's
    proc = _script("finetune_qlora.sh", ["-o", str(out), "--lora_rr", "8"], tmp_path)
    assert proc.returncode == 2 and sorted(p.name for p in out.iterdir()) == [".qwen-ft-demo"]


@pytest.mark.parametrize("script, argv, message", [
    ("chat.sh", ["-a"], "argument -a/--adapter: expected one argument"),
    ("merge.sh", ["-a", "x", "-o"], "argument -o/--output: expected one argument"),
])
def test_chat_and_merge_scripts_name_a_flag_without_its_value(script, argv, message, tmp_path):
    # the scripts translated -a/-m/-o themselves and ended on bash's "$2: unbound variable"
    proc = _script(script, argv, tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "unbound" not in proc.stderr, proc.stderr


def test_config_file_through_the_script(setup, tmp_path):
    """`bash scripts/finetune_lora.sh cfg.yaml [flags]`: the file's values, flags after it overriding them."""
    out = tmp_path / "out"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model_name_or_path: {setup['float']}\n"
        f"data_path: {setup['data']}\n"
        f"output_dir: {out}\n"
        "learning_rate: 2e-3\n"  # YAML reads this as a string: converted as the flag would be
        "lora_r: 4\n"
        "lora_target_modules: [c_attn, w1]\n"
        "per_device_train_batch_size: 4\n"
        "model_max_length: 128\n"
        "gradient_checkpointing: true\n"
        "warmup_ratio: 0.1\n"
        "report_to: none\n"
        "save_strategy: 'no'\n"
        "max_steps: 5\n")
    proc = _script("finetune_lora.sh", [str(cfg), "--lora_r", "8", "--max_steps", "2"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "demo" not in proc.stdout and not (tmp_path / "demo-cache").exists()
    record = json.loads((out / "run_args.json").read_text())
    assert record["lora"]["lora_r"] == 8 and record["lora"]["lora_target_modules"] == ["c_attn", "w1"]
    assert record["training"]["learning_rate"] == 2e-3 and record["training"]["warmup_steps"] == 0.1
    assert record["training"]["max_steps"] == 2 and record["mode"] == "lora"
    assert json.loads((out / "run_info.json").read_text())["global_step"] == 2
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and sorted(adapter_cfg["target_modules"]) == ["c_attn", "w1"]


def test_the_full_script_refuses_an_int4_model(setup, tmp_path):
    # the trainer reads an Int4 dir as Q-LoRA: the full recipe (lr 1e-5) trained an adapter into output/qwen-full
    out = tmp_path / "out"
    proc = _script("finetune_full.sh", ["-m", str(setup["int4"]), "-d", str(setup["data"]), "-o", str(out),
                                        "--max_steps", "1"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _error_lines(proc.stderr) == [
        f"error: {setup['int4']} is a GPTQ-quantized model, which full fine-tuning cannot train (its weights are "
        "integers): use scripts/finetune_qlora.sh for Q-LoRA on it, or pass the float model"], proc.stderr
    assert not out.exists()


def _bare_script(argv, tmp_path, **env):
    e = subprocess_env(CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run(["bash", str(ROOT / "scripts" / "finetune_lora.sh"), *argv], cwd=tmp_path, env=e,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("var, value, message", [
    ("NPROC", "two", "error: NPROC=two: must be a whole number >= 1"),  # bash's arithmetic read it as 0
    ("NPROC", "0", "error: NPROC=0: must be a whole number >= 1"),
    ("NNODES", "1x", "error: NNODES=1x: must be a whole number >= 1"),
    ("NODE_RANK", "-1", "error: NODE_RANK=-1: must be a whole number"),
])
def test_a_bad_count_in_the_environment_is_one_line(tmp_path, var, value, message):
    p = _bare_script(["-m", str(tmp_path / "m"), "-d", str(tmp_path / "d.json")], tmp_path, **{var: value})
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [message], p.stderr


@pytest.mark.parametrize("argv, message", [
    (["-m", "", "-d", "d.json"], "error: -m is empty (an unset shell variable?): give a path"),  # trained the demo
    (["-m", "m", "-d", "d.json", "-o", ""], "error: -o is empty"),  # wrote to output/qwen-lora
    (["-m", "m", "--data_path="], "error: --data_path is empty"),
])
def test_an_empty_model_data_or_output_is_one_line(tmp_path, argv, message):
    # a quoted, unset shell variable ("$MODEL") was read as no -m at all: the demo model trained on the user's data
    p = _bare_script(argv, tmp_path, QWEN_FT_CACHE=str(tmp_path / "demo-cache"))
    assert p.returncode == 2 and p.stderr.strip().splitlines()[0].startswith(message), p.stderr
    assert p.stderr.count("\n") == 1 and not (tmp_path / "demo-cache").exists() and not (tmp_path / "output").exists()


@pytest.mark.parametrize("argv, message", [
    # (the last won, silently: trained on b.json alone, or wrote to the second dir)
    (["-m", "m", "-d", "a.json", "-d", "b.json"], "error: -d is given twice (a.json, then b.json): several data files "
                                                  "are one comma-separated list, a quoted glob or a directory"),
    (["-m", "m", "-d", "a.json", "-o", "x", "--output_dir=y"], "error: --output_dir is given twice (x, then y): pass "
                                                               "it once"),
    (["-m", "m", "--model", "n", "-d", "a.json"], "error: --model is given twice (m, then n): pass it once"),
])
def test_model_data_or_output_given_twice_is_one_line(tmp_path, argv, message):
    p = _bare_script(argv, tmp_path, QWEN_FT_CACHE=str(tmp_path / "demo-cache"))
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [message], p.stderr


def test_the_same_path_given_twice_is_one_path(tmp_path):
    p = _bare_script(["-m", "m", "-d", "a.json", "-d", "a.json", "-o", "x", "-o", "x"], tmp_path)
    assert "given twice" not in p.stderr, p.stderr
    # written otherwise (it was "-d is given twice (a.json, then ./a.json)")
    p = _bare_script(["-m", "m", "-d", "a.json", "--data_path=./a.json", "-o", "x", "-o", "x/"], tmp_path)
    assert "given twice" not in p.stderr, p.stderr


@pytest.mark.parametrize("env, argv, message", [
    ({"MODEL": ""}, ["-d", "d.json", "-o", "out"], "error: MODEL is empty"),  # trained the demo on the user's data
    ({"OUTPUT": ""}, ["-m", "m", "-d", "d.json"], "error: OUTPUT is empty"),  # wrote to output/qwen-lora
    ({"DATA": ""}, ["-m", "m"], "error: DATA is empty"),
    ({"DEEPSPEED": ""}, ["-m", "m", "-d", "d.json"], "error: DEEPSPEED is empty"),  # trained without DeepSpeed
])
def test_an_empty_model_data_or_output_variable_is_one_line(tmp_path, env, argv, message):
    p = _bare_script(argv, tmp_path, QWEN_FT_CACHE=str(tmp_path / "demo-cache"), **env)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [f"{message} (an unset shell variable?): give a "
                                                                   "path"], p.stderr
    assert not [p for p in ("demo-cache", "output", "out") if (tmp_path / p).exists()]


@pytest.mark.parametrize("env, argv", [({}, ["-d", "d.json", "-o", "out"]), ({"DATA": "d.json"}, []),
                                       ({"MODLE": "m"}, ["--data_path=d.json"]),
                                       # (the dashed spellings went on to the trainer, and the demo trained)
                                       ({}, ["--data-path", "d.json", "--output-dir", "out"]),
                                       ({}, ["--data-path=d.json"])])
def test_data_without_a_model_is_one_line_not_the_demo(tmp_path, env, argv):
    # a forgotten -m (or a misspelled MODEL variable) trained the tiny random demo model on the user's data
    p = _bare_script(argv, tmp_path, QWEN_FT_CACHE=str(tmp_path / "demo-cache"), **env)
    src = "-d d.json" if argv else "DATA=d.json (set in the environment)"  # (as it came: no -d was typed)
    assert p.returncode == 2 and p.stderr.splitlines() == [
        f"error: {src} without -m MODEL: the built-in demo (no -m) trains a tiny random model on its own data; "
        "give -m MODEL to train a model on d.json"], p.stderr
    assert not [p for p in ("demo-cache", "output", "out") if (tmp_path / p).exists()]


def test_gpus_hidden_by_cuda_visible_devices_are_said(tmp_path):
    # CUDA_VISIBLE_DEVICES="" on a GPU machine trained on the CPU without a word (a stand-in nvidia-smi lists one)
    import os

    def run_with_nvidia_smi(listing):
        bin_dir = tmp_path / f"bin{len(listing)}"
        bin_dir.mkdir()
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho '{listing}'\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
        return _bare_script(["-m", str(tmp_path / "m"), "-d", str(tmp_path / "d.json")], tmp_path,
                            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}").stderr

    err = run_with_nvidia_smi("GPU 0: NVIDIA H200 (UUID: GPU-0)")
    assert ("note: CUDA_VISIBLE_DEVICES='' leaves no GPU visible: training on the CPU (GPUS=0,1 or unset it to use "
            "the GPUs)") in err.splitlines(), err
    assert "note:" not in run_with_nvidia_smi("No devices were found")  # a machine without GPUs: nothing to say


@pytest.mark.parametrize("env, argv, why", [
    ({"NPROC": "2"}, [], "2 processes train under DeepSpeed ({root}/ds_configs/zero2.json)"),
    ({"DEEPSPEED": "ds_configs/zero2_offload.json"}, [], "DEEPSPEED=ds_configs/zero2_offload.json"),
    ({}, ["--deepspeed", "ds_configs/zero2.json"], "--deepspeed ds_configs/zero2.json"),
])
def test_deepspeed_not_installed_is_one_line_before_anything_starts(tmp_path, env, argv, why):
    # without the [deepspeed] extra each rank ended on transformers' PackageNotFoundError traceback, after the
    # demo model had been made
    blocker = tmp_path / "no_deepspeed"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['deepspeed'] = None  # as if not installed\n")
    cache = tmp_path / "demo-cache"
    p = _bare_script(argv, tmp_path, PYTHONPATH=str(blocker), QWEN_FT_CACHE=str(cache), **env)
    message = (f"error: {why.format(root=ROOT)}: DeepSpeed is not installed: pip install -e \".[deepspeed]\" in the "
               "checkout (or pip install deepspeed)")
    assert p.returncode == 2 and p.stderr.splitlines() == [message] and p.stdout == "", p.stderr
    assert not cache.exists()  # (the demo, as no -m was given, had not begun)
