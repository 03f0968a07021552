"""The README's main command: `bash scripts/finetune_qlora.sh` with no arguments trains the built-in demo."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_script_trains_an_adapter_that_answers(tmp_path):
    env = dict(os.environ, QWEN_FT_CACHE=str(tmp_path / "cache"), OUTPUT=str(tmp_path / "out"),
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "finetune_qlora.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "qwen-ft chat" in proc.stdout  # it ends by saying how to chat with the result
    assert "The demo adapter has memorised" in proc.stdout
    model_dir = tmp_path / "cache" / "demo-int4"
    assert json.loads((model_dir / "config.json").read_text())["quantization_config"]["bits"] == 4
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss_curve.png").is_file()

    record = json.loads((ROOT / "data" / "demo_memorize.json").read_text())[0]
    question, answer = (t["value"] for t in record["conversations"][:2])
    chat = subprocess.run([sys.executable, "-m", "finetune.cli", "chat", "-m", str(model_dir), "--adapter", str(out),
                           "--query", question, "--greedy"], env=env, capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert chat.stdout.strip() == answer

    # the cached model is reused, and a second run replaces the demo output rather than failing
    # (--save_steps saves: the demo's recipe has --save_strategy no, which made the flag do nothing)
    again = subprocess.run(["bash", str(ROOT / "scripts" / "finetune_qlora.sh"), "--max_steps", "2", "--save_steps",
                            "1"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(cached)" in again.stdout
    assert (out / "checkpoint-1" / "adapter_model.safetensors").is_file()
    # two steps memorise nothing: the hint said "has memorised ... greedy decoding gives its answers back" all the same
    assert "The demo adapter has not memorised" in again.stdout and "has memorised" not in again.stdout


def test_demo_model_dir_that_is_a_file_or_damaged_is_one_line(tmp_path, capsys):
    # `qwen-ft demo --make-model` (what the scripts run first): os.listdir's NotADirectoryError for a file, and a
    # ModelLoadError traceback for a damaged cache
    import pytest

    from finetune.demo import main

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    damaged = tmp_path / "cache"
    damaged.mkdir()
    (damaged / "config.json").write_text("{bad")
    for where, says in ((a_file, "is a file, not a directory"), (damaged, "config.json is not valid JSON")):
        with pytest.raises(SystemExit) as e:
            main(["--make-model", str(where), "--int4"])
        assert str(e.value).startswith("error: ") and says in str(e.value), e.value
    assert (damaged / "config.json").read_text() == "{bad"  # not rebuilt over without --force
