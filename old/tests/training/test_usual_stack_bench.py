"""benchmarks/usual_stack.py --chats (issue 15, workload usual_stack_short): the usual stack through transformers'
Trainer on our chat file. The rows it trains are this project's encoding of the file (benchmarks/chat_rows.py);
bad input stops with one line before anything loads; on the CPU (tiny shape, when gptqmodel can be found: it is
not in CI's install) one epoch through the Trainer counts exactly the file's tokens."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from _helpers import ROOT, memorise_records, subprocess_env

BENCH = ROOT / "benchmarks"


def run(script, *args, timeout=120, **env):
    return subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(proc):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


@pytest.fixture
def chats(tmp_path):
    recs = memorise_records()
    recs[1]["system"] = "You answer in one sentence."
    recs[2]["conversations"] += [{"from": "user", "value": "And the fourth moon?"},
                                 {"from": "assistant", "value": "It is called Pell."}]
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(recs))
    return path, recs


def test_chat_rows_are_the_trainers_encoding(chats, tmp_path, data_small_tokenizer):
    from finetune.data import encode_conversation

    path, recs = chats
    out = tmp_path / "rows.json"
    proc = run("chat_rows.py", path, "--out", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["rows"] == [encode_conversation(data_small_tokenizer, r, 2048) for r in recs]
    assert data["pad_id"] == data_small_tokenizer.eod_id and data["truncated"] == 0
    # labels only on the assistant replies (and their <|im_end|>)
    row = data["rows"][0]
    trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert data_small_tokenizer.decode(trained) == recs[0]["conversations"][1]["value"] + "<|im_end|>"


def test_chat_rows_bad_record_is_one_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"id": "a", "conversations": [{"from": "user", "value": "hi"}]}]))
    line = one_error_line(run("chat_rows.py", path, "--out", tmp_path / "rows.json"))
    assert str(path) in line and "record 1" in line
    assert not (tmp_path / "rows.json").exists()


def test_usual_stack_bad_chats_stop_before_loading(tmp_path):
    out = tmp_path / "res.jsonl"
    line = one_error_line(run("usual_stack.py", "--chats", tmp_path / "missing.json", "--tiny", "--device", "cpu",
                              "--out", out))
    assert "missing.json" in line
    assert not out.exists()  # no result line for a run that never started


def test_usual_stack_token_ids_beyond_the_vocab(chats, tmp_path, real_vocab_file):
    # the real vocabulary's ids (up to 151k) do not fit the tiny shape's 2048 embedding rows
    path, _ = chats
    line = one_error_line(run("usual_stack.py", "--chats", path, "--tokenizer", real_vocab_file, "--tiny",
                              "--device", "cpu"))
    assert "record 1" in line and "2048 rows" in line


def test_usual_stack_chats_flag_conflicts(chats):
    path, _ = chats
    proc = run("usual_stack.py", "--chats", path, "--steps", "3")
    assert proc.returncode == 2 and "--max-steps" in proc.stderr
    proc = run("usual_stack.py", "--chats", path, "--seq", "64")
    assert proc.returncode == 2 and "exactly one of --seq N and --chats FILE" in proc.stderr


def _gptqmodel_site():
    """(site dir or None) where gptqmodel is found: installed, or the --target dir of $USUAL_SITE."""
    if importlib.util.find_spec("gptqmodel") is not None:
        return None
    site = os.environ.get("USUAL_SITE")
    if site and os.path.isdir(os.path.join(site, "gptqmodel")):
        return site
    pytest.skip("gptqmodel is not installed (not in CI's install): set USUAL_SITE to a dir with the wheels of "
                "benchmarks/wheels.sh installed with pip --target")


def test_usual_stack_chats_one_epoch_on_cpu(chats, tmp_path, data_small_tokenizer):
    site = _gptqmodel_site()
    path, recs = chats
    out = tmp_path / "res.jsonl"
    # 4 chats, batch 2, accumulation 2: one optimizer step is the whole file; 2 steps = 2 epochs
    args = ["--chats", path, "--tiny", "--device", "cpu", "--max-steps", "2", "--skip-steps", "0",
            "--grad-accum", "2", "--out", out]
    proc = run("usual_stack.py", *args, *(["--site", site] if site else []), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text().splitlines()[-1])
    assert rec["workload"] == "usual_stack_short" and "error" not in rec
    assert rec["command"].startswith("python benchmarks/usual_stack.py --chats ")
    assert rec["quant_linear_class"] == "gptqmodel.nn_modules.qlinear.torch.TorchLinear"
    assert rec["grad_ckpt_active"] and rec["n_chats"] == 4 and rec["steps_timed"] == 2
    from finetune.data import encode_conversation

    enc = [encode_conversation(data_small_tokenizer, r, 2048) for r in recs]
    # every chat trained once per epoch: the non-padding tokens and the labelled ones, exactly
    assert rec["tokens"] == 2 * sum(len(e["input_ids"]) for e in enc)
    assert rec["trained_tokens"] == 2 * sum(sum(lab != -100 for lab in e["labels"]) for e in enc)
    # padded to the longest row of each batch (2 epochs x 2 batches x 2 rows), not to --max-len
    assert rec["tokens"] <= rec["padded_tokens"] <= 8 * max(len(e["input_ids"]) for e in enc)
    assert rec["tokens_per_s"] > 0 and len(rec["log_loss"]) == 2 and len(rec["step_s"]) == 2
