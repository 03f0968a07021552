"""Model dirs, vocabularies and LoRA flags checked before any weights load (issue 14 items 11, 12, 19): one line
naming the file (and tensor) or the flag, from the trainer and the chat CLI alike."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import finetune  # noqa: F401
import finetune.loading
from finetune.demo import make_demo_model
from finetune.errors import ModelLoadError
from finetune.loading import inspect_model_dir, load_model
from finetune.tokenization import QWenTokenizer, TokenizerError, check_tokenizer_fits, load_tokenizer

from _helpers import train_args, write_memorise


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_checks")
    data = write_memorise(root / "mem.json")
    return {"root": root, "data": data, "float": make_demo_model(root / "float"),
            "int4": make_demo_model(root / "int4", int4=True)}


def damaged(dirs, tmp_path, kind="float"):
    d = tmp_path / kind
    shutil.copytree(dirs[kind], d)
    return d


def no_weight_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the check")

    monkeypatch.setattr(finetune.loading, "load_model", refuse)


def train_error(dirs, model, capsys, monkeypatch, *extra) -> str:
    """Run the trainer; it must stop with exit 2 and one 'error:' line before loading any weights."""
    from finetune.train import main

    no_weight_loading(monkeypatch)
    out = dirs["root"] / "out_never_written"
    rc = main(train_args(model, dirs["data"], out, "--max_steps", "1", "--use_lora", "True", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# -- item 11: the vocabulary against the model ----------------------------------------------------------------


def test_truncated_vocabulary_is_refused_before_loading(dirs, tmp_path, capsys, monkeypatch):
    d = damaged(dirs, tmp_path)
    lines = (d / "qwen.tiktoken").read_bytes().splitlines(keepends=True)
    (d / "qwen.tiktoken").write_bytes(b"".join(lines[:-40]))  # whole lines missing at the end: ranks contiguous
    with pytest.raises(TokenizerError, match=r"qwen\.tiktoken.*<\|endoftext\|> gets id 1800.*expects 1840"):
        load_tokenizer(d)
    msg = train_error(dirs, d, capsys, monkeypatch)
    assert "qwen.tiktoken" in msg and "1840" in msg and "truncated" in msg


def test_vocabulary_larger_than_the_model_is_refused(dirs, tmp_path, real_vocab_file, capsys, monkeypatch):
    d = damaged(dirs, tmp_path)
    shutil.copyfile(real_vocab_file, d / "qwen.tiktoken")
    with pytest.raises(TokenizerError, match=r"151851 ids, more than the model's vocab_size 2048"):
        load_tokenizer(d)
    assert "vocab_size 2048" in train_error(dirs, d, capsys, monkeypatch)


def test_truncated_real_vocabulary_against_a_qwen_sized_config(tmp_path, real_vocab_file):
    d = tmp_path / "qwen14b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen", "vocab_size": 152064}))
    check_tokenizer_fits(QWenTokenizer(str(real_vocab_file)), d)  # the real file fits
    lines = real_vocab_file.read_bytes().splitlines(keepends=True)
    (d / "qwen.tiktoken").write_bytes(b"".join(lines[:151000]))
    with pytest.raises(TokenizerError, match=r"gets id 151000.*expects 151643"):
        load_tokenizer(d)


def test_saved_tokenizer_with_a_truncated_vocabulary(tmp_path, dirs):
    tok = load_tokenizer(dirs["float"])
    tok.save_pretrained(tmp_path)
    lines = (tmp_path / "qwen.tiktoken").read_bytes().splitlines(keepends=True)
    (tmp_path / "qwen.tiktoken").write_bytes(b"".join(lines[:-5]))
    from transformers import AutoTokenizer

    with pytest.raises(TokenizerError, match=r"qwen\.tiktoken.*tokenizer_config\.json"):
        AutoTokenizer.from_pretrained(str(tmp_path))


# -- item 12: the model dir from config and headers -----------------------------------------------------------


def test_gptq_g_idx_out_of_range(dirs, tmp_path, capsys, monkeypatch):
    d = damaged(dirs, tmp_path, "int4")
    sd = load_file(str(d / "model.safetensors"))
    sd["transformer.h.1.mlp.w2.g_idx"][5] = 7  # the layer has 2 groups
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor 'transformer\.h\.1\.mlp\.w2\.g_idx' holds "
                                             r"group index 7.*2 groups"):
        inspect_model_dir(d)
    with pytest.raises(ModelLoadError, match="g_idx"):
        load_model(d, device="cpu")
    assert "transformer.h.1.mlp.w2.g_idx" in train_error(dirs, d, capsys, monkeypatch)


def test_truncated_safetensors_names_file_and_tensor(dirs, tmp_path, capsys, monkeypatch):
    for kind in ("float", "int4"):
        d = damaged(dirs, tmp_path, kind)
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
        with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor '.*' ends at byte .*truncated"):
            load_model(d, device="cpu")
        msg = train_error(dirs, d, capsys, monkeypatch)
        assert "model.safetensors" in msg and "truncated" in msg


@pytest.mark.parametrize("field, value, expect", [
    ("hidden_size", "64", r"hidden_size must be a positive integer, got '64'"),
    ("num_hidden_layers", -2, r"num_hidden_layers must be a positive integer"),
    ("rotary_emb_base", "abc", r"rotary_emb_base must be a positive number, got 'abc'"),
    ("tie_word_embeddings", True, r"does not describe a buildable Qwen model \(ValueError: Qwen v1 has an untied"),
])
def test_malformed_config_json(dirs, tmp_path, field, value, expect, capsys, monkeypatch):
    d = damaged(dirs, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config\.json: " + expect):
        load_model(d, device="cpu")
    assert "config.json" in train_error(dirs, d, capsys, monkeypatch)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match=r"config\.json: expected a JSON object"):
        load_model(d, device="cpu")


@pytest.mark.parametrize("kind", ["float", "int4"])
@pytest.mark.parametrize("name, text, expect", [
    ("generation_config.json", "{bad", r"generation_config\.json is not valid JSON: .*line 1 column 2"),
    ("generation_config.json", json.dumps({"max_new_tokens": "abc"}), r"generation_config\.json: max_new_tokens "
                                                                        r"must be an integer of at least 1"),
    ("generation_config.json", json.dumps({"num_return_sequences": "x"}), r"generation_config\.json: not a valid "
                                                                          r"generation config \(TypeError"),
    ("tokenizer_config.json", "[1]", r"tokenizer_config\.json: expected a JSON object, got list"),
])
def test_broken_side_json_files(dirs, tmp_path, kind, name, text, expect, capsys, monkeypatch):
    # generation_config.json was read after the weights (transformers' OSError traceback), and a broken
    # tokenizer_config.json silently skipped the special-token check it feeds
    d = damaged(dirs, tmp_path, kind)
    (d / name).write_text(text)
    with pytest.raises(ModelLoadError, match=expect):
        load_model(d, device="cpu")
    assert name in train_error(dirs, d, capsys, monkeypatch)


def test_empty_vocabulary_and_a_directory_for_weights(dirs, tmp_path, capsys, monkeypatch):
    d = damaged(dirs, tmp_path)
    (d / "qwen.tiktoken").write_bytes(b"")  # tiktoken failed on max() of nothing
    with pytest.raises(TokenizerError, match=r"qwen\.tiktoken: no token ranks: the file is empty"):
        load_tokenizer(d)
    assert "qwen.tiktoken" in train_error(dirs, d, capsys, monkeypatch)
    shutil.copy(dirs["float"] / "qwen.tiktoken", d / "qwen.tiktoken")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()  # was opened as a file: IsADirectoryError
    with pytest.raises(ModelLoadError, match="has no model weights"):
        load_model(d, device="cpu")
    assert "has no model weights" in train_error(dirs, d, capsys, monkeypatch)


def test_gptq_wrong_shapes_and_dtypes_from_headers(dirs, tmp_path):
    d = damaged(dirs, tmp_path, "int4")
    sd = load_file(str(d / "model.safetensors"))
    sd["transformer.h.0.attn.c_attn.scales"] = sd["transformer.h.0.attn.c_attn.scales"][:1].clone()
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor 'transformer\.h\.0\.attn\.c_attn\.scales' "
                                             r"has shape \[1, 192\].*expects \[2, 192\]"):
        inspect_model_dir(d)
    sd = load_file(str(dirs["int4"] / "model.safetensors"))
    sd["transformer.h.0.mlp.w1.qweight"] = sd["transformer.h.0.mlp.w1.qweight"].float()
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"'transformer\.h\.0\.mlp\.w1\.qweight' is F32, expected an integer"):
        inspect_model_dir(d)


def test_float_dir_with_integer_weights(dirs, tmp_path):
    d = damaged(dirs, tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    sd["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"].to(torch.int64)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"'transformer\.ln_f\.weight' is I64, expected a float tensor"):
        load_model(d, device="cpu")


def test_chat_cli_reports_bad_int4_dirs_in_one_line(dirs, tmp_path, capsys):
    from finetune.chat import main

    d = damaged(dirs, tmp_path, "int4")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["-m", str(d), "-q", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "bits=3" in err[0]


# -- item 19: LoRA target names against the architecture --------------------------------------------------------


@pytest.mark.parametrize("targets, expect", [
    (["c_attn", "c_prj"], r"'c_prj' matches no module"),
    (["attn"], r"'attn' names a QWenAttention, not a Linear"),
])
def test_lora_target_modules_must_name_linears(dirs, targets, expect, capsys, monkeypatch):
    import re

    for kind in ("float", "int4"):
        msg = train_error(dirs, dirs[kind], capsys, monkeypatch, "--lora_target_modules", *targets)
        assert re.search(expect, msg), msg
        assert "valid names: attn.c_proj, c_attn, c_proj, lm_head, mlp.c_proj, w1, w2" in msg


def test_modules_to_save_must_name_a_module(dirs, capsys, monkeypatch):
    msg = train_error(dirs, dirs["float"], capsys, monkeypatch, "--modules_to_save", "embedding")
    assert "'embedding' matches no module" in msg and "wte" in msg
