"""The command line around training and evaluation: eval of a merged model, config files, the run's console,
--fp16 on the CPU, the demo's chat hint, and the memory estimate made before loading."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from finetune.demo import make_demo_model
from finetune.train import main as train_main
from finetune.training.arguments import parse_args
from finetune.training.checks import TrainConfigError, preflight

from _helpers import ROOT, subprocess_env, train_args, write_memorise


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"float": make_demo_model(root / "float"), "int4": make_demo_model(root / "int4", int4=True),
            "data": write_memorise(root / "mem.json")}


# -- out of GPU memory ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command,advice", [("eval", "--batch-size"), ("serve", "--max-batch"),
                                            ("merge", "--device cpu"), ("chat", "--device cpu")])
def test_a_command_out_of_gpu_memory_says_so_in_one_line(command, advice, monkeypatch, capsys):
    """torch's out-of-memory error from any qwen-ft command ends it with one line naming the command and what
    lowers its need (exit 2, no traceback); other errors still propagate."""
    import importlib

    import torch

    from finetune.cli import COMMANDS, main

    module = importlib.import_module(COMMANDS[command][0])

    def oom(argv):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(module, "main", oom)
    assert main([command, "-m", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: qwen-ft {command} ran out of GPU memory") and advice in err

    def other(argv):
        raise KeyError("not memory")

    monkeypatch.setattr(module, "main", other)
    with pytest.raises(KeyError):
        main([command])


@pytest.mark.parametrize("command", ["chat", "eval", "merge", "serve"])
def test_ctrl_c_ends_a_command_in_one_line(command, monkeypatch, capsys):
    # Ctrl-C while the model loaded (or in chat --query's reply) was a KeyboardInterrupt traceback
    import importlib

    from finetune.cli import COMMANDS, main

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(COMMANDS[command][0]), "main", interrupted)
    try:
        rc = main([command, "-m", "x"])
    except KeyboardInterrupt:  # (left to propagate, it would stop the test session)
        pytest.fail("KeyboardInterrupt escaped qwen-ft")
    assert rc == 130 and capsys.readouterr().err == f"\nqwen-ft {command}: interrupted\n"


@pytest.mark.parametrize("package", ["fastapi", "llguidance", "prometheus_client"])
def test_serve_without_its_extra_says_what_to_install(monkeypatch, capsys, package):
    # without fastapi (pip install -e ".[serve]") serve ended on the app's ModuleNotFoundError traceback
    from finetune.cli import main

    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    assert main(["serve", "-m", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: qwen-ft serve needs FastAPI, uvicorn, llguidance and "
                                                   f"prometheus_client ({package} is not installed)")
    assert '".[serve]"' in err


# -- eval of a model without an adapter (a merged model) -----------------------------------------------------


def test_eval_without_adapter_writes_the_report(setup, tmp_path, capsys, monkeypatch):
    from finetune.cli import main

    out = tmp_path / "report.json"
    # relative paths, as typed in the model's parent dir: the report records them absolute (it is read from
    # anywhere; "model": "." named nothing)
    monkeypatch.chdir(setup["float"].parent)
    rc = main(["eval", "-m", setup["float"].name, "--data", os.path.relpath(setup["data"]), "--max-new-tokens", "4",
               "--batch-size", "2", "--output", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "perplexity" in stdout
    # one model, no adapter: its column is "model" (it was "base" over a merged model's numbers)
    assert stdout.splitlines()[0].split() == ["metric", "model"]
    report = json.loads(out.read_text())
    assert report["model"] == str(setup["float"]) and report["adapter_dir"] is None
    assert report["data"] == str(setup["data"])
    assert (report["settings"]["dtype"], report["settings"]["device"]) == ("float32", "cpu")  # (what ran: CPU)
    assert "adapter" not in report  # no adapter metrics: one model evaluated
    assert report["base"]["records"] == 4 and report["base"]["generated"] == 4
    assert report["base"]["loss"] > 0 and len(report["samples"]) == 4


@pytest.mark.parametrize("argv", [[], ["help"], ["--version"], ["eval", "--no-generate", "--output", "REPORT"]])
def test_a_reader_that_leaves_stdout_ends_qwen_ft_quietly(setup, tmp_path, argv):
    """`qwen-ft | head -1` and `qwen-ft eval ... | head -3`: a reader that closed the pipe early made the first write a
    BrokenPipeError traceback (exit 1), and eval's --output report, written after its table, was never written. Now
    the command stops without a word with the status SIGPIPE gives (141, as `cat` in that pipe), the report
    written."""
    report = tmp_path / "report.json"
    if argv[:1] == ["eval"]:
        argv = ["eval", "-m", str(setup["float"]), "--data", str(setup["data"]), *argv[1:-1], str(report)]
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=subprocess_env())
    proc.stdout.close()  # (before anything is written: every write finds no reader)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()[-2000:]
    if argv[:1] == ["eval"]:
        assert json.loads(report.read_text())["base"]["records"] == 4


# -- config files --------------------------------------------------------------------------------------------


def test_config_file_then_flags(setup, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {setup['float']}\ndata_path: {setup['data']}\noutput_dir: {tmp_path / 'o'}\n"
                   "learning_rate: 3e-4\nlora_r: 4\nuse_lora: true\ngradient_checkpointing: true\n"
                   "evaluation_strategy: 'no'\nwarmup_ratio: 0.05\nnum_train_epochs: 2\n")
    model_args, _, lora_args, args = parse_args([str(cfg), "--lora_r", "8", "--num_train_epochs", "3"])
    assert model_args.model_name_or_path == str(setup["float"]) and lora_args.use_lora
    assert args.learning_rate == 3e-4  # a YAML string, converted as on the command line
    assert lora_args.lora_r == 8 and args.num_train_epochs == 3  # the flags after the file win
    assert args.activation_checkpointing is True and args.warmup_steps == 0.05
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"model_name_or_path": str(setup["float"]), "lora_r": 2}))
    assert parse_args([str(js)])[2].lora_r == 2
    # one name for a list flag is that name (it was iterated letter by letter: 'c' matches no module), and a
    # list for a flag that takes one stays a list
    cfg.write_text("lora_target_modules: c_attn\nmodules_to_save: wte\nreport_to: [none]\n")
    _, _, lora_args, args = parse_args([str(cfg)])
    assert lora_args.lora_target_modules == ["c_attn"] and lora_args.modules_to_save == ["wte"]
    assert args.report_to == []  # ("none" as transformers reads it)


def test_a_leading_tilde_in_a_path_flag_is_the_home_dir(tmp_path, monkeypatch):
    # the shell leaves ~ alone in --output_dir=~/x, in "~/x" and in a config file; a dir named "~" was made in
    # the working dir
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = tmp_path / "home"
    model_args, data_args, _, args = parse_args(["--output_dir=~/runs/a", "--data_path", "~/d.json", "-m", "~/m"])
    assert (args.output_dir, data_args.data_path, model_args.model_name_or_path) == \
        (str(home / "runs/a"), str(home / "d.json"), str(home / "m"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("output_dir: ~/runs/b\neval_data_path: ~/e.json\nlora_target_modules: [c_attn]\n")
    _, data_args, _, args = parse_args([str(cfg)])
    assert args.output_dir == str(home / "runs/b") and data_args.eval_data_path == str(home / "e.json")
    assert parse_args(["--data_path", "data/~x.json"])[1].data_path == "data/~x.json"  # only a leading ~


def test_a_config_file_s_list_of_data_files_reads_as_the_comma_separated_list(tmp_path, monkeypatch):
    """`data_path: [a.json, b.jsonl]` in a YAML (or JSON) config was refused ("is not a single value"); it is the
    comma-separated list --data_path takes, each item as a path (~ expanded); an item that cannot be one is a line."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data_path: [data/a.json, ~/b.jsonl]\neval_data_path:\n  - 'held/*.json'\n")
    _, data_args, _, _ = parse_args([str(cfg)])
    assert data_args.data_path == f"data/a.json,{tmp_path / 'home' / 'b.jsonl'}"
    assert data_args.eval_data_path == "held/*.json"
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"data_path": ["x.json", "y.json"]}))
    assert parse_args([str(js)])[1].data_path == "x.json,y.json"
    for text, says in (("data_path: []\n", "data_path: an empty list"), ("data_path: [a.json, 3]\n", "3 is not a path"),
                       ("data_path: ['a,b.json']\n", "'a,b.json' holds a comma")):
        cfg.write_text(text)
        with pytest.raises(TrainConfigError, match=f"config file {cfg}: {says}" if "empty" in says else says):
            parse_args([str(cfg)])


class _Terminal:
    """A stderr that is a terminal, or not (`isatty`), writing nowhere."""

    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty

    def write(self, text):
        return len(text)

    def flush(self):
        pass


def test_train_progress_bars_show_on_a_terminal_only_unless_disable_tqdm_is_given(tmp_path, monkeypatch):
    """The trainer's, tokenizing's and packing's bars follow --disable_tqdm; without it they were shown in a log
    file or a pipe too (`qwen-ft train ... 2> log`: a line a redraw). Now hidden there unless the flag (or a config
    file's disable_tqdm) says otherwise; --help says the default instead of transformers' "(default: None)"."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()  # (transformers hides the bars itself below WARNING: another command's)
    hf_logging.set_verbosity_warning()
    try:
        _check_train_progress_bars(tmp_path, monkeypatch)
    finally:
        hf_logging.set_verbosity(verbosity)


def _check_train_progress_bars(tmp_path, monkeypatch):
    argv = ["-m", "x", "-d", "x.json", "-o", str(tmp_path / "o")]
    cfg = tmp_path / "run.yaml"
    cfg.write_text("disable_tqdm: false\n")
    for tty, extra, hidden in ((True, [], False), (False, [], True), (False, ["--disable_tqdm", "False"], False),
                               (True, ["--disable_tqdm", "True"], True), (False, [str(cfg)], False)):
        monkeypatch.setattr(sys, "stderr", _Terminal(tty))
        flags = extra + argv if extra[:1] == [str(cfg)] else argv + extra
        assert parse_args(flags)[3].disable_tqdm is hidden, (tty, extra)


def test_eval_progress_bars_show_on_a_terminal_only(setup, monkeypatch, capsys):
    # (they were drawn into a log file or a pipe, a line a redraw)
    from finetune.cli import main

    argv = ["eval", "-m", str(setup["float"]), "--data", str(setup["data"]), "--max-new-tokens", "2"]
    for tty in (False, True):
        drawn = []
        monkeypatch.setattr(sys, "stderr", type("Err", (_Terminal,), {"write": lambda self, t: drawn.append(t)})(tty))
        assert main(argv) == 0
        assert any("generating" in t for t in drawn) is tty, drawn


def test_train_help_shows_the_lora_defaults_and_no_false_default_for_no_flags(capsys):
    # the LoRA flags had no help, so --help showed no default; --no_packing repeated --packing's help ending in
    # "(default: False)", right under "--packing ... (default: True)"
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    for flag, default in (("--lora_r", "64"), ("--lora_alpha", "16"), ("--lora_dropout", "0.05"),
                          ("--lora_target_modules", "['c_attn', 'c_proj', 'w1', 'w2']"), ("--use_rslora", "False")):
        entry = text.split(f" {flag.replace('_', '-')} ", 1)[1].split(" --", 1)[0]  # after its dashed alias
        assert f"(default: {default})" in entry, (flag, entry)
    assert "--no_packing, --no-packing The same as --packing False --train_on_prompt" in text
    assert ("--disable_tqdm DISABLE_TQDM, --disable-tqdm DISABLE_TQDM Hide the progress bars (training's, "
            "tokenizing's, packing's) (default: shown where stderr is a terminal, hidden where it is a file or a "
            "pipe) --") in text
    assert parse_args(["--no_packing"])[1].packing is False and parse_args([])[1].packing is True


def test_train_help_names_the_command_and_the_config_file(capsys):
    # the usage line said "usage: cli.py" (python -m finetune.cli) or "train.py", and never showed the config file
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: qwen-ft train [CONFIG] [-m MODEL] [-d DATA] [-o OUTPUT]")
    assert "cli.py" not in out and "train.py" not in out and "YAML or JSON" in out


def test_train_help_names_the_official_flags_it_translates_and_the_deepspeed_configs(capsys):
    # --evaluation_strategy and --warmup_ratio (translated before parsing) were nowhere in --help, and --deepspeed
    # had transformers' "a path to a JSON config file or a dict", naming none of ds_configs/
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--evaluation_strategy is --eval_strategy" in text and "--warmup_ratio R is --warmup_steps R" in text
    assert "finetune/ds_config_zero2.json (zero3) names ds_configs/zero2.json (zero3.json)" in text
    entry = text.split(" --deepspeed DEEPSPEED ", 1)[1].split(" --", 1)[0]
    assert entry.startswith("A DeepSpeed config: the path of a JSON file, or the name of one the package ships "
                            "(zero2: ZeRO-2, zero3: ZeRO-3,"), entry


def test_bf16_without_a_gpu_or_use_cpu_is_one_line_naming_the_flag(monkeypatch):
    # transformers said "Your setup doesn't support bf16/gpu. You need to assign use_cpu ..." (no flag named, and
    # nothing of what the CPU does without it)
    from finetune.training import arguments
    from finetune.training.checks import TrainConfigError

    monkeypatch.setattr(arguments, "no_bf16_device", lambda: True)
    with pytest.raises(TrainConfigError, match=r"^--bf16 needs a CUDA GPU.*add --use_cpu True.*drop --bf16"):
        parse_args(["--bf16", "True"])
    with pytest.raises(TrainConfigError, match=r"^--bf16_full_eval needs"):
        parse_args(["--bf16_full_eval", "True"])
    assert parse_args(["--bf16", "True", "--use_cpu", "True"])[3].bf16  # bf16 on the CPU, as the scripts run it
    assert not parse_args([])[3].bf16


def test_train_takes_the_short_model_data_output_flags(setup, tmp_path):
    """`qwen-ft train -m -d -o` as the scripts, chat, eval and serve take them; they override a config file too."""
    model_args, data_args, _, args = parse_args(["-m", str(setup["float"]), "-d", str(setup["data"]),
                                                 "-o", str(tmp_path / "o"), "--max_steps", "2"])
    assert (model_args.model_name_or_path, data_args.data_path, args.output_dir, args.max_steps) == (
        str(setup["float"]), str(setup["data"]), str(tmp_path / "o"), 2)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: /elsewhere\ndata_path: {setup['data']}\noutput_dir: {tmp_path / 'x'}\n")
    model_args, _, _, args = parse_args([str(cfg), "-m", str(setup["float"]), "-o", str(tmp_path / "o")])
    assert model_args.model_name_or_path == str(setup["float"]) and args.output_dir == str(tmp_path / "o")


def test_without_an_output_dir_the_run_goes_where_the_scripts_put_it(setup, capsys):
    """No --output_dir: output/qwen-<mode>, as scripts/finetune_<mode>.sh would write it, said on the console (not
    transformers' ./trainer_output); one given stays as given."""
    model_args_etc = parse_args(["-m", str(setup["float"]), "-d", str(setup["data"]), "--use_lora", "True"])
    preflight(*model_args_etc)
    assert model_args_etc[3].output_dir == os.path.join("output", "qwen-lora")
    assert "no --output_dir: the run goes to output/qwen-lora" in capsys.readouterr().out
    model_args_etc = parse_args(["-m", str(setup["float"]), "-d", str(setup["data"]), "-o", "mine"])
    preflight(*model_args_etc)
    assert model_args_etc[3].output_dir == "mine"


def test_config_file_errors_are_one_line(setup, tmp_path, capsys):
    bad_key = tmp_path / "typo.yaml"
    bad_key.write_text("lora_rank: 8\nlearning_rate: 1e-4\n")
    assert train_main([str(bad_key)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "typo.yaml" in err and "lora_rank" in err and len(err.splitlines()) == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text("lora_r: 8\n  learning_rate: [1e-4\n")
    assert train_main([str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert "broken.yaml" in err and "line" in err and len(err.splitlines()) == 1
    assert train_main([str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    # an empty file (or all comments) is said to be one: it was "--model_name_or_path is required"
    for name, text in (("empty.yaml", ""), ("comments.yml", "# lora_r: 8\n\n"), ("empty.json", " \n")):
        (tmp_path / name).write_text(text)
        assert train_main([str(tmp_path / name), "-m", str(setup["int4"])]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: config file {tmp_path / name}: holds no flags") and len(err.splitlines()) == 1
    # values of the wrong type, named with the file (not argparse's usage text, nor a TypeError from the model)
    for text, says in (("lora_r: abc\n", "lora_r: 'abc' is not a valid value"),
                       ("lora_r: 4.5\n", "lora_r: 4.5 is not a whole number"),
                       ("lora_r: true\n", "lora_r: True is not a number"),
                       ("learning_rate: [1, 2]\n", "learning_rate: [1, 2] is not a number"),
                       # were a TypeError from pathlib, and argparse's usage text without the file
                       ("model_name_or_path: [a, b]\n", "model_name_or_path: ['a', 'b'] is not a single value"),
                       ("use_cpu: maybe\n", "use_cpu: 'maybe' is not a valid value"),
                       ("lora_target_modules: {a: 1}\n", "lora_target_modules: {'a': 1} is not a list of names")):
        typed = tmp_path / "typed.yaml"
        typed.write_text(text)
        assert train_main([str(typed)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: config file ") and says in err and len(err.splitlines()) == 1, err


# -- precision and the console -------------------------------------------------------------------------------


def test_fp16_on_the_cpu_is_refused_before_loading(setup, tmp_path):
    with pytest.raises(TrainConfigError, match="--fp16"):
        preflight(*parse_args(train_args(setup["int4"], setup["data"], tmp_path / "o", "--fp16", "True")))


def test_console_shows_no_third_party_notices(setup, tmp_path):
    """A run with checkpointing as the official lines ask for it: no FutureWarnings for the checkpointing names,
    no DeepSpeed accelerator probe line, no PAD/BOS/EOS notice."""
    env = subprocess_env(CUDA_VISIBLE_DEVICES="")
    env.pop("DS_ACCELERATOR", None)
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "finetune.train",
                           *train_args(setup["float"], setup["data"], out, "--use_lora", "True", "--max_steps", "2",
                                       "--gradient_checkpointing")],
                          env=env, capture_output=True, text=True, timeout=900)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    assert "FutureWarning" not in console, console
    assert "Setting accelerator to CPU" not in console and "PAD/BOS/EOS" not in console, console


def test_checkpointing_is_enabled_once_without_reentrant(setup, tmp_path, monkeypatch):
    from finetune.modeling import QWenLMHeadModel
    from finetune.train import train

    calls = []
    original = QWenLMHeadModel.activation_checkpointing_enable

    def spy(self, *a, **k):
        calls.append(k.get("activation_checkpointing_kwargs", a[0] if a else None))
        return original(self, *a, **k)

    monkeypatch.setattr(QWenLMHeadModel, "activation_checkpointing_enable", spy)
    trainer = train(*parse_args(train_args(setup["float"], setup["data"], tmp_path / "o", "--use_lora", "True",
                                           "--max_steps", "1", "--gradient_checkpointing", "True")))
    assert calls == [{"use_reentrant": False}]
    blocks = trainer.model.get_base_model().transformer.h
    assert all(b.gradient_checkpointing for b in blocks)
    # the default --gradient_checkpointing_keep_gib (1) covers every block of the tiny model at 128 tokens
    assert all(b.keep_mlp_projections for b in blocks)
    info = json.loads((tmp_path / "o" / "run_info.json").read_text())["checkpointing"]
    assert info["blocks"] == len(blocks) == info["blocks_keeping_mlp_projections"] and info["kept_gib"] > 0


# -- the demo's chat hint ------------------------------------------------------------------------------------


def test_demo_hint_is_greedy_and_shell_quoted(tmp_path):
    from finetune.demo import chat_hint

    model, adapter = tmp_path / "my models" / "demo int4", tmp_path / "out dir" / "demo"
    data = ROOT / "data" / "demo_memorize.json"
    line = chat_hint(model, adapter, data).splitlines()[-1]
    argv = shlex.split(line)
    question = json.loads(data.read_text())[0]["conversations"][0]["value"]
    assert argv[:2] == ["qwen-ft", "chat"] and "--greedy" in argv
    assert argv[argv.index("-m") + 1] == str(model) and argv[argv.index("--adapter") + 1] == str(adapter)
    assert argv[argv.index("--query") + 1] == question


def test_demo_hint_for_a_full_fine_tune_chats_with_the_written_model(tmp_path):
    # finetune_full.sh's demo printed `qwen-ft chat -m DEMO --adapter OUT`, which chat refuses: OUT is a model dir
    from finetune.demo import chat_hint

    model, out = tmp_path / "demo", tmp_path / "demo-full"
    out.mkdir()
    (out / "config.json").write_text("{}")
    line = chat_hint(model, out, ROOT / "data" / "demo_memorize.json").splitlines()[-1]
    argv = shlex.split(line)
    assert argv[:4] == ["qwen-ft", "chat", "-m", str(out)] and "--adapter" not in argv and "--greedy" in argv
    assert "demo model has memorised" in chat_hint(model, out, ROOT / "data" / "demo_memorize.json")


# -- the memory estimate -------------------------------------------------------------------------------------


def test_memory_estimate_counts_the_adapters_peft_makes(setup, tmp_path):
    from finetune.loading import load_model
    from finetune.training.lora import attach_lora
    from finetune.training.memory import estimate_memory, tensor_shapes

    for kind, extra in (("float", ["--use_lora", "True"]), ("int4", ["--q_lora", "True"])):
        margs = parse_args(train_args(setup[kind], setup["data"], tmp_path / kind, *extra,
                                      "--lora_target_modules", "c_attn", "w2"))
        plan = preflight(*margs)
        cfg = json.loads((setup[kind] / "config.json").read_text())
        est = estimate_memory(cfg, tensor_shapes(setup[kind]), plan.mode, margs[2], margs[1], margs[3], "cpu", None)
        model = attach_lora(load_model(setup[kind], device="cpu"), margs[2], plan)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert est.trainable_params == trainable, kind
        assert est.adapters == 4 * trainable and est.optimizer == 12 * trainable
        assert est.tokens == 4 * 128  # --per_device_train_batch_size 4 x --model_max_length 128
        if kind == "float":
            assert est.weights == 4 * sum(p.numel() for p in model.get_base_model().parameters() if not p.requires_grad)


def test_memory_preflight_stops_when_clearly_over(setup, tmp_path, monkeypatch):
    import finetune.loading
    from finetune.training import memory

    argv = train_args(setup["int4"], setup["data"], tmp_path / "o", "--q_lora", "True")
    est_total = []
    real = memory.estimate_memory
    monkeypatch.setattr(memory, "estimate_memory", lambda *a: est_total.append(real(*a)) or est_total[-1])

    monkeypatch.setattr(memory, "available_bytes", lambda device: 10 * 1024**3)
    preflight(*parse_args(argv))  # fits
    need = est_total[-1].total
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(need / 1.1))
    preflight(*parse_args(argv))  # within the margin: not clearly over, runs
    monkeypatch.setattr(memory, "available_bytes", lambda device: need // 2)
    with pytest.raises(TrainConfigError, match=r"needs about .* GiB on cpu .*weights .*activations .* is free"):
        preflight(*parse_args(argv))

    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert train_main(argv) == 2


# -- the tests' real vocabulary ------------------------------------------------------------------------------


def test_real_vocabulary_from_qwen_tiktoken(tmp_path):
    """$QWEN_TIKTOKEN names the real vocabulary: used when it is there; a skip naming it where it is not, a
    failure under CI=true."""
    from _helpers import REAL_VOCAB

    def run(vocab, ci):
        env = subprocess_env(QWEN_TIKTOKEN=str(vocab))
        env.pop("CI", None)
        if ci:
            env["CI"] = "true"
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                               "tests/test_tokenization.py::test_special_ids"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)

    missing = tmp_path / "nowhere" / "qwen.tiktoken"
    skipped = run(missing, ci=False)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout and str(missing) in skipped.stdout, skipped.stdout
    failed = run(missing, ci=True)
    assert failed.returncode == 1 and "CI=true: CI always has it" in failed.stdout, failed.stdout  # fixture: an error
    if REAL_VOCAB.is_file():
        moved = tmp_path / "elsewhere" / "vocab.tiktoken"
        moved.parent.mkdir()
        os.symlink(REAL_VOCAB, moved)
        passed = run(moved, ci=True)
        assert passed.returncode == 0 and "1 passed" in passed.stdout, passed.stdout


# -- a seeded fuzzer over merge's and eval's flags and paths: the documented value, or one line before loading ------


FUZZ_SEED, FUZZ_CASES = 1234, 120
FUZZ_VALUES = ["", " ", "x", "-1", "0", "1", "3", "4", "8", "16", "64", "0.5", "1e-3", "nan", "inf", "-inf", "1e400",
               "99999999999999999999", "-99999999999999999999", "1" + "0" * 400, "\uff12", "2GB", "0KB", "-5MB",
               "150KB"]


def _as_int(v):
    try:
        return int(v)  # argparse's type=int (which takes "\uff12", a full-width 2, too)
    except ValueError:
        return None


def _as_float(v):
    try:
        return float(v)
    except ValueError:
        return None


def _size_ok(v) -> bool:
    import math
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?i?B)?\s*", v, re.I)
    if not m or not math.isfinite(float(m.group(1))):
        return False
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[(m.group(2) or "B").upper()]
    return int(float(m.group(1)) * mult) >= 1


def _int_in(lo=None, hi=None, also=()):
    def ok(v):
        n = _as_int(v)
        return n is not None and (n in also or ((lo is None or n >= lo) and (hi is None or n <= hi)))
    return ok


MERGE_FLAGS = {  # what the README and --help document, for an Int4 GPTQ merge (the route that reads them all)
    # --calib-max-len: at most the model's seq_length (the tiny model's 256), to which conversations are cut
    "--eval-samples": _int_in(0), "--calib-samples": _int_in(1), "--calib-max-len": _int_in(16, 256),
    "--bits": _int_in(also=(4, 8), lo=9, hi=0), "--group-size": _int_in(1, also=(-1,)),
    "--damp-percent": lambda v: (f := _as_float(v)) is not None and 0 < f < 1, "--max-shard-size": _size_ok,
    "--seed": _int_in(),
}


def _eval_flags(limit):
    return {"--max-new-tokens": _int_in(1, limit), "--batch-size": _int_in(1), "--gen-batch-size": _int_in(1),
            "--max-samples": _int_in(1), "--max-len": _int_in(16),
            "--repetition-penalty": lambda v: (f := _as_float(v)) is not None and 0 < f < float("inf"),
            "--generator": lambda v: v in ("engine", "generate")}


@pytest.fixture(scope="module")
def fuzz_setup(setup, tmp_path_factory):
    from _helpers import train_adapter

    root = tmp_path_factory.mktemp("fuzz")
    adapter = train_adapter(setup["float"], setup["data"], root / "adapter", 2)
    return dict(setup, root=root, adapter=adapter)


def _fuzz_run(argv, capsys):
    """('loaded', None) when every check passed (load_model is patched to raise), else ('refused', the line)."""
    from finetune.cli import main

    capsys.readouterr()
    try:
        rc = main(argv)
    except _FuzzLoaded:
        return "loaded", None
    except SystemExit as e:
        rc = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("warning")]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (argv, rc, err)
    return "refused", err[0]


class _FuzzLoaded(Exception):
    pass


@pytest.mark.parametrize("command", ["merge", "eval"])
def test_fuzzed_flags_and_paths_parse_as_documented_or_are_one_line_naming_them(fuzz_setup, tmp_path, capsys,
                                                                                monkeypatch, command):
    """Seeded: 1-3 flags given a wrong type, empty, negative, zero, huge, NaN or inf value (sometimes twice), and an
    output of every kind (a file, a full dir, the adapter, the base, the data, a place nothing can be written in,
    a name with spaces and unicode, a dir inside the adapter). Nothing loads a model (load_model raises): a case
    either passes every check, when all its values are documented as valid, or is refused in one line that names
    one of its bad flags or paths; never a traceback."""
    import random

    import finetune.loading
    from finetune.generation_limits import max_new_tokens_limit

    def loaded(*a, **k):
        raise _FuzzLoaded

    monkeypatch.setattr(finetune.loading, "load_model", loaded)
    s = fuzz_setup
    adapter, base, data = str(s["adapter"]), str(s["float"]), str(s["data"])
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    proc = os.path.isdir("/proc/self")
    if command == "merge":
        flags = MERGE_FLAGS
        outputs = {str(tmp_path / "new"): True, str(tmp_path / "a_file"): False, str(tmp_path / "full"): False,
                   adapter: False, base: False, str(s["adapter"] / "merged"): True, "": False,
                   str(tmp_path / "with space" / "\u00fc\u540d"): True, **({"/proc/merged": False} if proc else {})}
        fixed = ["merge", "-a", adapter, "--format", "int4", "--quant-method", "gptq", "--calib-data", data,
                 "--eval-data", data]
        out_flag = "--output"
    else:
        flags = _eval_flags(max_new_tokens_limit(base))
        outputs = {str(tmp_path / "r.json"): True, str(tmp_path): False,
                   str(s["adapter"] / "adapter_config.json"): False, str(s["float"] / "config.json"): False,
                   data: False, "": False,
                   str(tmp_path / "with space" / "\u00fc\u540d.json"): True, str(s["adapter"] / "eval.json"): True,
                   **({"/proc/r.json": False} if proc else {})}
        fixed = ["eval", "-a", adapter, "--data", data]
        out_flag = "--output"
    rng = random.Random(FUZZ_SEED)
    seen = {"loaded": 0, "refused": 0}
    # every flag with every value once (a new output), then every output alone, then seeded combinations
    sweep = [[(f, v)] for f in sorted(flags) for v in FUZZ_VALUES] + [[] for _ in outputs]
    for case in range(len(sweep) + FUZZ_CASES):
        argv, bad = list(fixed), []
        chosen = sweep[case] if case < len(sweep) else [(f, None) for f in rng.sample(sorted(flags), rng.randint(1, 3))]
        for flag, value in chosen:
            if value is not None:
                argv += [flag, value]
                bad += [] if flags[flag](value) else [flag]
                continue
            values = FUZZ_VALUES + (["engine", "generate"] if flag == "--generator" else [])
            good = [v for v in values if flags[flag](v)]
            value = rng.choice(good if good and rng.random() < 0.6 else values)  # enough cases pass every check
            argv += [flag, value]
            if not flags[flag](value):
                bad.append(flag)
            if rng.random() < 0.1:  # given twice
                argv += [flag, rng.choice(FUZZ_VALUES)]
                bad.append(f"{flag} given twice")
        if command == "eval" and "--gen-batch-size" in argv and any(
                a == "--generator" and b == "generate" for a, b in zip(argv, argv[1:])):
            bad.append("--gen-batch-size")  # (the engine's batch: generate() takes --batch-size)
        if case < len(sweep):  # a valid output beside a flag; each output alone
            output = min(o for o in outputs if outputs[o]) if chosen else sorted(outputs)[case - len(sweep)
                                                                                          + len(outputs)]
        else:
            output = rng.choice(sorted(o for o in outputs if outputs[o] or rng.random() < 0.5))
        argv += [out_flag, output]
        if not outputs[output]:
            bad.append(output or "--output is empty")
        outcome, line = _fuzz_run(argv, capsys)
        seen[outcome] += 1
        if not bad:
            assert outcome == "loaded", (case, argv, line)
        else:
            assert outcome == "refused", (case, argv, bad)
            # the line names one of the bad flags or paths (a path as given, or its flag)
            assert any(b.split(" given")[0] in line or b in line for b in bad) or (
                any(b in outputs for b in bad) and f"{out_flag} " in line), (case, argv, bad, line)
    assert seen["loaded"] > FUZZ_CASES / 4 and seen["refused"] > FUZZ_CASES / 4, seen


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_qwen_ft_version_prints_the_package_version(capsys, flag):
    """What a bug report asks first: it was "unknown command '--version'", exit 2."""
    import importlib.metadata

    from finetune import __version__
    from finetune.cli import main

    assert main([flag]) == 0
    assert capsys.readouterr().out.strip() == f"qwen-ft {__version__}"
    assert __version__ == importlib.metadata.version("qwen-finetune")  # the package's own, as pip shows it
    assert main(["--bogus"]) == 2 and "unknown command '--bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, hint", [
    (["evaluate"], "unknown command 'evaluate' (did you mean eval?)"),
    (["Chat", "-m", "x"], "unknown command 'Chat' (did you mean chat?)"),
    (["finetune"], "unknown command 'finetune' (did you mean train?)"),
    (["-m", "x", "chat"], "unknown command '-m' (the command comes first: qwen-ft chat -m ...)"),
    (["xyz"], "unknown command 'xyz'"),
])
def test_an_unknown_command_names_the_one_meant(capsys, argv, hint):
    # (it was "unknown command 'evaluate'" alone, and a flag before the command the same)
    from finetune.cli import main

    assert main(argv) == 2
    out, err = capsys.readouterr()
    # one line on stderr, nothing on stdout (the command list printed there above it was lost to a pipe)
    assert err == f"error: {hint}; qwen-ft --help lists the commands\n" and out == "", (out, err)


def test_help_before_a_command_is_that_commands_help(capsys):
    """`qwen-ft help train` (as git and pip read it) was "unknown command 'help' (did you mean eval?)", exit 2."""
    from finetune.cli import main

    with pytest.raises(SystemExit) as e:  # (argparse's --help exits 0)
        main(["help", "serve"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: qwen-ft serve")
    assert main(["help"]) == 0 and "commands:" in capsys.readouterr().out
    assert main(["help", "trian"]) == 2
    assert capsys.readouterr().err == ("error: no command 'trian' to help with (did you mean train?); qwen-ft --help "
                                       "lists the commands\n")
    # `qwen-ft help help` was "no command 'help' to help with (did you mean eval?)", exit 2
    assert main(["help", "help"]) == 0 and "commands:" in capsys.readouterr().out


def test_the_command_list_says_how_to_get_a_commands_flags_and_shows_examples_that_parse(capsys, monkeypatch):
    """`qwen-ft` alone: the commands, `qwen-ft help COMMAND`, and examples; each example's flags are its
    command's own (a flag renamed later would leave a wrong example behind)."""
    import importlib

    from finetune.cli import COMMANDS, main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert "qwen-ft help COMMAND" in out and "--version" in out
    examples = [line.split("(")[0] for line in out.splitlines() if line.startswith("  qwen-ft ")]
    assert len(examples) == 4, out
    for example in examples:
        command, *flags = shlex.split(example)[1:]
        module = importlib.import_module(COMMANDS[command][0])
        if command == "train":
            from finetune.training.arguments import parse_args

            parsed = parse_args(flags)
            assert parsed[0].model_name_or_path and parsed[1].data_path and parsed[3].output_dir, example
        else:
            args = module._parser().parse_args(flags)
            assert args.adapter, example
