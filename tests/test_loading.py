"""Loading model dirs: official layout without remote code, dtypes, and one clear error per bad input."""

from __future__ import annotations

import json
import os
import shutil
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import finetune
from finetune import load_model
from finetune.loading import ModelLoadError
from finetune.modeling import QWenLMHeadModel


@pytest.fixture()
def model_dir(tiny_model_dir, tmp_path):
    """A private copy of the tiny dir that a test may damage."""
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    return d


def test_tiny_dir_has_official_layout(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "qwen.tiktoken",
            "tokenizer_config.json"} <= names
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen" and cfg["architectures"] == ["QWenLMHeadModel"]
    assert "auto_map" in cfg  # as the official dirs: must be ignored, never executed
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["kv_channels"]) == (64, 2, 4, 16)
    assert (cfg["intermediate_size"], cfg["vocab_size"], cfg["seq_length"]) == (256, 2048, 256)
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["pad_token_id"] == 1840
    assert (gen["chat_format"], gen["max_window_size"], gen["top_p"], gen["top_k"]) == ("chatml", 6144, 0.8, 0)
    sd = load_file(tiny_model_dir / "model.safetensors")
    assert sd["transformer.h.0.mlp.w1.weight"].shape == (128, 64)
    assert sd["transformer.h.1.attn.c_attn.bias"].shape == (192,)


def test_make_demo_model_is_deterministic_and_has_an_int4_form(tmp_path):
    from finetune.demo import make_demo_model

    a = load_file(make_demo_model(tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(make_demo_model(tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(make_demo_model(tmp_path / "c", seed=4, num_hidden_layers=3) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "transformer.h.2.ln_1.weight" in c and not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    d = make_demo_model(tmp_path / "d", seed=3, int4=True)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq" and cfg["quantization_config"]["bits"] == 4
    q = load_file(d / "model.safetensors")
    assert q["transformer.h.0.attn.c_attn.qweight"].dtype == torch.int32
    assert torch.equal(q["lm_head.weight"], a["lm_head.weight"].half())  # float parts kept, in fp16


def test_auto_classes_load_without_remote_code(tiny_model_dir):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert type(config).__name__ == "QWenConfig"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert isinstance(model, QWenLMHeadModel)
    assert type(AutoModel.from_pretrained(tiny_model_dir)).__name__ == "QWenModel"
    assert isinstance(AutoTokenizer.from_pretrained(tiny_model_dir), finetune.QWenTokenizer)
    ours = load_model(tiny_model_dir, dtype="fp32", device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours(ids).logits)
    for name, p in ours.state_dict().items():
        assert torch.equal(p, load_file(tiny_model_dir / "model.safetensors")[name]), name


def test_load_model_defaults(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert not model.training
    cuda = torch.cuda.is_available()
    assert model.device.type == ("cuda" if cuda else "cpu")
    assert model.dtype == (torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32)
    assert model.generation_config.max_window_size == 6144


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), (torch.float16, torch.float16),
                                            ("fp32", torch.float32)])
def test_load_model_dtype_casts_every_float_weight(tiny_model_dir, dtype, expected):
    model = load_model(tiny_model_dir, dtype=dtype, device="cpu")
    assert {p.dtype for p in model.parameters()} == {expected}
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]])).logits
    assert out.dtype == expected and torch.isfinite(out.float()).all()


def test_loading_needs_no_vocab_file(model_dir):
    (model_dir / "qwen.tiktoken").unlink()
    assert isinstance(load_model(model_dir), QWenLMHeadModel)
    with pytest.raises(ValueError, match="qwen.tiktoken"):
        finetune.load_tokenizer(model_dir)


def _shard(model_dir):
    """model.safetensors split into two shards named by model.safetensors.index.json; the single file removed."""
    sd = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    keys = sorted(sd)
    weight_map = {}
    for i, ks in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in ks}, model_dir / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sd


def test_sharded_checkpoint_loads(model_dir):
    sd = _shard(model_dir)
    model = load_model(model_dir, dtype="fp32", device="cpu")
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])


@pytest.mark.parametrize("int4", [False, True], ids=["float", "int4"])
def test_a_whole_checkpoint_beside_a_sharded_one_is_refused(tmp_path, int4):
    """A stale model.safetensors left beside the index of another download: the checks read the shards and
    transformers' loader the single file, so a float dir ran on other weights than were checked."""
    from finetune.demo import make_demo_model

    d = make_demo_model(tmp_path / "m", seed=0, int4=int4)
    other = make_demo_model(tmp_path / "other", seed=1, int4=int4)
    _shard(d)
    shutil.copy(other / "model.safetensors", d / "model.safetensors")
    os.utime(d / "model.safetensors.index.json", (1, 1))  # (the shards' index the older here)
    with pytest.raises(ModelLoadError, match=r"holds both model.safetensors and model.safetensors.index.json .*"
                                             r"\(model.safetensors is the newer, "
                                             r"model.safetensors.index.json the older"):
        load_model(d, dtype="fp32", device="cpu")


def test_safetensors_win_over_a_bin_index_as_in_transformers(model_dir):
    """The checks' file list is transformers' choice: model.safetensors before pytorch_model.bin[.index.json]."""
    from finetune.checkpoint import checkpoint_files

    (model_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": "absent.bin"}}))
    assert checkpoint_files(model_dir) == [(model_dir / "model.safetensors", None)]
    load_model(model_dir, dtype="fp32", device="cpu")  # (the index's missing shard is not what loads)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear error each
# ---------------------------------------------------------------------------------------------------------------
def test_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_adapter_dir_given_as_the_model_says_so(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no config.json: it is a LoRA adapter dir.*pass it as the adapter"):
        load_model(tmp_path / "adapter")


def test_a_hub_id_that_cannot_be_fetched_names_no_other_commands_flag(monkeypatch):
    # the same message ends chat, eval, merge and serve, which take -m: it named the trainer's --model_name_or_path
    import huggingface_hub

    from finetune.hub import ModelNotFoundError, resolve_model_dir

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model_dir("Qwen/Qwen-7B-Chat")
    assert "could not be fetched" in str(e.value) and "e.g. /models/Qwen-7B-Chat" in str(e.value)
    assert "--model_name_or_path" not in str(e.value)


def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_unknown_model_type(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["model_type"] = "llama"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="model_type 'llama' is not supported"):
        load_model(model_dir)


def test_no_weights(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model weights"):
        load_model(model_dir)


def test_missing_and_unexpected_weights_are_named(model_dir):
    sd = load_file(model_dir / "model.safetensors")
    del sd["transformer.h.1.mlp.w2.weight"]
    sd["transformer.h.1.mlp.w3.weight"] = torch.zeros(2, 2)
    save_file(sd, model_dir / "model.safetensors")
    with pytest.raises(ModelLoadError) as e:
        load_model(model_dir)
    msg = str(e.value)
    assert "1 missing (first: transformer.h.1.mlp.w2.weight)" in msg
    assert "1 unexpected (first: transformer.h.1.mlp.w3.weight)" in msg


def test_misshaped_weights_are_named(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["intermediate_size"] = 512  # the checkpoint's MLP is 128 wide, this config says 256
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"mis-shaped \(first: transformer.h.0.mlp.w1.weight: checkpoint "
                                             r"\[128, 64\], config expects \[256, 64\]\)"):
        load_model(model_dir)


def test_invalid_config_json(model_dir):
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(model_dir)


# ---------------------------------------------------------------------------------------------------------------
# The Int4 hook (the quant engineer's loader is faked here)
# ---------------------------------------------------------------------------------------------------------------
def test_gptq_dirs_go_to_the_project_loader(model_dir, monkeypatch):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    calls = []
    fake = types.ModuleType("finetune.quant.loading")

    def load_gptq_model(path, **kwargs):
        calls.append((str(path), kwargs))
        return QWenLMHeadModel(kwargs.get("config") or finetune.modeling.QWenConfig.from_pretrained(path))

    fake.load_gptq_model = load_gptq_model
    monkeypatch.setitem(sys.modules, "finetune.quant.loading", fake)

    from transformers import AutoModelForCausalLM

    assert isinstance(load_model(model_dir), QWenLMHeadModel)
    assert isinstance(QWenLMHeadModel.from_pretrained(model_dir), QWenLMHeadModel)
    assert isinstance(AutoModelForCausalLM.from_pretrained(model_dir), QWenLMHeadModel)
    assert len(calls) == 3 and all(c[0] == str(model_dir) for c in calls)
    assert calls[1][1]["config"].quantization_config["quant_method"] == "gptq"


# The official Qwen-14B-Chat config.json, verbatim but for the sizes (made tiny).
OFFICIAL_CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                 "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False,
    "hidden_size": 64, "intermediate_size": 256, "initializer_range": 0.02, "kv_channels": 16,
    "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192, "model_type": "qwen", "no_bias": True,
    "num_attention_heads": 4, "num_hidden_layers": 2, "onnx_safe": None, "rotary_emb_base": 10000,
    "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 2048, "softmax_in_fp32": False,
    "tie_word_embeddings": False, "tokenizer_class": "QWenTokenizer", "transformers_version": "4.32.0",
    "use_cache": True, "use_cache_kernel": False, "use_cache_quantization": False, "use_dynamic_ntk": True,
    "use_flash_attn": "auto", "use_logn_attn": True, "vocab_size": 2048,
}
OFFICIAL_TOKENIZER_CONFIG = {
    "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}


def test_official_config_and_tokenizer_config_load_without_remote_code(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (model_dir / "config.json").write_text(json.dumps(OFFICIAL_CONFIG, indent=2))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(OFFICIAL_TOKENIZER_CONFIG, indent=2))
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        (model_dir / extra).unlink(missing_ok=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # no trust_remote_code
    assert isinstance(model, QWenLMHeadModel) and model.config.seq_length == 2048
    assert isinstance(load_model(model_dir, device="cpu"), QWenLMHeadModel)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert isinstance(tok, finetune.QWenTokenizer) and tok.im_end_id == 1842


@pytest.mark.parametrize("device, message", [
    ("tpu", "^unknown device 'tpu'; use cpu, cuda or cuda:N$"),  # (torch's 20 device types, cut mid-word)
    ("cuda:x", "^unknown device 'cuda:x'; use cpu, cuda or cuda:N$"),
    ("cuda:99", "device 'cuda:99'"),
    ("meta", "only cpu and cuda are supported"),
])
def test_a_device_that_is_not_here_is_one_line_before_the_weights_are_read(tmp_path, monkeypatch, device, message):
    """(and not torch's "Torch not compiled with CUDA enabled" assertion from the first copy to the device)"""
    import finetune.loading

    monkeypatch.setattr(finetune.loading, "describe", lambda *a: pytest.fail("the model dir was read"))
    with pytest.raises(ModelLoadError, match=message):
        load_model(tmp_path, device=device)
    with pytest.raises(ModelLoadError, match="unknown dtype 'float7'"):
        load_model(tmp_path, device="cpu", dtype="float7")
    with pytest.raises(ModelLoadError, match=r"unsupported dtype torch.int8; use one of bf16, fp16, fp32"):
        load_model(tmp_path, device="cpu", dtype=torch.int8)  # (failed deep in the load, in torch's words)


def test_a_mistyped_local_dir_is_reported_as_local_with_what_is_beside_it(tmp_path, monkeypatch):
    """`--adapter output/qwen-qlora` (a run named otherwise) reads as a hub id too: it said only that the hub could
    not be fetched; now the local reading comes first, with the directories that are there."""
    import huggingface_hub

    from finetune.hub import ModelNotFoundError, resolve_model_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    (tmp_path / "output" / "demo-qlora").mkdir(parents=True)
    (tmp_path / "output" / "notes.txt").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model_dir("output/qwen-qlora", "adapter directory")
    assert str(e.value) == ("adapter directory output/qwen-qlora does not exist (output/ holds: demo-qlora); as a "
                            "Hugging Face hub id it could not be fetched either (OSError: offline)")
    with pytest.raises(ModelNotFoundError, match=r"nope/x/y does not exist$"):  # no parent: nothing to list
        resolve_model_dir(tmp_path / "nope" / "x" / "y")
    with pytest.raises(ModelNotFoundError, match=r"holds: demo-qlora\)$"):
        resolve_model_dir(tmp_path / "output" / "other")
    with pytest.raises(ModelNotFoundError, match=r"^adapter directory /qwen-ft-nope-9f3 does not exist \(/ holds"):
        resolve_model_dir("/qwen-ft-nope-9f3", "adapter directory")  # the root named once, not as "//"


@pytest.mark.parametrize("kwargs, message", [
    (dict(adapter=""), "load_model: adapter must be a path (or a hub id), got ''"),  # was no adapter, silently
    (dict(model_dir=None), "load_model: give the model dir (or an adapter, whose recorded base is loaded)"),
    (dict(model_dir=3), "load_model: model_dir must be a path (or a hub id), got 3"),
])
def test_load_model_names_a_missing_or_empty_argument(kwargs, message, tmp_path):
    from finetune import load_model
    from finetune.demo import make_demo_model

    args = {"model_dir": make_demo_model(tmp_path / "m"), **kwargs}
    with pytest.raises(ModelLoadError) as e:
        load_model(device="cpu", **args)
    assert str(e.value) == message


@pytest.mark.parametrize("kwargs, message", [
    (dict(model_dir=""), "load_tokenizer: model_dir must be a path (or a hub id), got ''"),  # was the current dir
    (dict(model_dir=None), "load_tokenizer: model_dir must be a path (or a hub id), got None"),  # was a TypeError
    (dict(model_dir="M", adapter=" "), "load_tokenizer: adapter must be a path (or a hub id), got ' '"),
    (dict(model_dir="M", check_against=""), "load_tokenizer: check_against must be a path (or a hub id), got ''"),
])
def test_load_tokenizer_names_a_missing_or_empty_argument(kwargs, message, tmp_path, monkeypatch):
    from finetune import load_tokenizer
    from finetune.demo import make_demo_model

    model_dir = make_demo_model(tmp_path / "m")
    monkeypatch.chdir(model_dir)  # (where "" found a vocabulary)
    args = {k: (str(model_dir) if v == "M" else v) for k, v in kwargs.items()}
    with pytest.raises(ModelLoadError) as e:
        load_tokenizer(**args)
    assert str(e.value) == message
    assert load_tokenizer(model_dir).im_end_id == load_tokenizer(".").im_end_id  # "." is a path, as typed


def test_reference_is_absolute_for_local_paths_and_globs_and_as_given_for_a_hub_id(tmp_path, monkeypatch):
    # what reports and model cards record: read from another dir, "data/*.json" or "." named nothing
    from finetune.hub import reference

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.json").write_text("[]")
    monkeypatch.chdir(tmp_path)
    assert reference(".") == str(tmp_path) and reference("data/a.json") == str(tmp_path / "data" / "a.json")
    assert reference("data/*.json") == str(tmp_path / "data" / "*.json")
    assert reference("data/a.json,data/*.jsonl") == f"{tmp_path}/data/a.json,{tmp_path}/data/*.jsonl"
    assert reference("data/a.json, data/*.jsonl") == f"{tmp_path}/data/a.json,{tmp_path}/data/*.jsonl"  # (as read)
    assert reference("Qwen/Qwen-7B-Chat") == "Qwen/Qwen-7B-Chat"
