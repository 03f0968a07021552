"""A base model (generation_config.json's chat_format "raw", as Qwen-7B's) trained on chat data: the official LoRA
recipe's full wte and lm_head, and what is saved chats in ChatML (the official scripts kept "raw", so chat()
refused their result): chat with the adapter, its checkpoints, a merge of it; the server refuses the base itself
before loading it."""

import json
import shutil

import pytest

from finetune.demo import make_demo_model
from finetune.errors import ModelLoadError

from _helpers import train_adapter, write_memorise


def _raw(d):
    gen = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**gen, "chat_format": "raw"}))
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("base_model")
    base = _raw(make_demo_model(root / "base"))
    data = write_memorise(root / "mem.json")
    adapter = train_adapter(base, data, root / "adapter", 4, "--save_strategy", "steps", "--save_steps", "2")
    return {"root": root, "base": base, "data": data, "adapter": adapter}


def test_lora_on_a_base_model_trains_wte_and_lm_head_and_saves_chatml(trained):
    adapter = trained["adapter"]
    assert sorted(json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"]) == ["lm_head", "wte"]
    for d in (adapter, adapter / "checkpoint-4"):
        gen = json.loads((d / "generation_config.json").read_text())
        assert gen["chat_format"] == "chatml"
        assert gen["top_p"] == json.loads((trained["base"] / "generation_config.json").read_text())["top_p"]


def test_modules_to_save_none_keeps_the_base_models_embedding_frozen(trained, tmp_path, capsys):
    out = train_adapter(trained["base"], trained["data"], tmp_path / "a", 1, "--modules_to_save", "none")
    assert not json.loads((out / "adapter_config.json").read_text()).get("modules_to_save")
    assert json.loads((out / "generation_config.json").read_text())["chat_format"] == "chatml"
    assert "is a base model" not in capsys.readouterr().out


def test_a_chat_models_run_writes_no_generation_config_of_its_own(tmp_path):
    base = make_demo_model(tmp_path / "chat_model")
    out = train_adapter(base, write_memorise(tmp_path / "m.json"), tmp_path / "a", 1)
    assert not (out / "generation_config.json").exists()
    assert not json.loads((out / "adapter_config.json").read_text()).get("modules_to_save")


def test_the_adapter_chats_on_the_base_and_the_base_alone_is_refused(trained, tmp_path):
    from finetune import load_model, load_tokenizer
    from finetune.model_dir import check_chat_format

    model = load_model(trained["base"], adapter=trained["adapter"], device="cpu")
    assert model.generation_config.chat_format == "chatml"
    reply, _ = model.chat(load_tokenizer(trained["base"]), "hi", history=None, do_sample=False, max_new_tokens=3)
    assert isinstance(reply, str)
    check_chat_format(trained["base"], trained["adapter"])
    with pytest.raises(ModelLoadError, match="chat_format 'raw': chat needs a chat model"):
        check_chat_format(trained["base"])
    elsewhere = tmp_path / "elsewhere"  # an adapter trained before, or by another tool: the hint says what to add
    shutil.copytree(trained["adapter"], elsewhere)
    (elsewhere / "generation_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"copy generation_config.json into .*elsewhere with \"chat_format\""):
        check_chat_format(trained["base"], elsewhere)


def test_a_merge_of_it_chats(trained, tmp_path):
    from finetune.merge import merge
    from finetune.model_dir import chat_format

    out = tmp_path / "merged"
    merge(str(trained["adapter"]), str(out), log=lambda *a, **k: None)
    assert chat_format(out) == "chatml"


def test_the_server_refuses_a_base_model_before_loading_it(trained, monkeypatch):
    pytest.importorskip("fastapi")
    from finetune.serve import cli, models

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(models, "load_served_model", no_load)
    args = cli._parser().parse_args(["-m", str(trained["base"])])
    with pytest.raises(ValueError, match="chat_format 'raw': the server needs a chat model .* qwen-ft merge"):
        cli.build_server(args)


def test_the_default_leaves_an_adapters_own_modules_and_a_lora_on_lm_head(trained, tmp_path, capsys):
    """From an adapter (--lora_weight_path) its own config decides: the default was applied and then refused as a
    flag the adapter would not apply. LoRA on lm_head keeps it (a full copy replaced the LoRA silently)."""
    old = train_adapter(trained["base"], trained["data"], tmp_path / "old", 1, "--modules_to_save", "none")
    capsys.readouterr()
    on = train_adapter(trained["base"], trained["data"], tmp_path / "on", 1, "--lora_weight_path", str(old))
    assert not json.loads((on / "adapter_config.json").read_text()).get("modules_to_save")
    assert "is a base model" not in capsys.readouterr().out
    head = train_adapter(trained["base"], trained["data"], tmp_path / "head", 1,
                         "--lora_target_modules", "c_attn", "lm_head")
    cfg = json.loads((head / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["wte"] and sorted(cfg["target_modules"]) == ["c_attn", "lm_head"]


def test_a_run_that_trained_no_saved_modules_resumes_as_it_was(trained, tmp_path):
    """A base model's LoRA run written before wte and lm_head became its default (its checkpoints record none)."""
    from finetune.train import main

    from _helpers import train_args

    run = tmp_path / "run"
    common = ["--use_lora", "True", "--save_strategy", "steps", "--save_steps", "1"]
    assert main(train_args(trained["base"], trained["data"], run, *common, "--max_steps", "1",
                           "--modules_to_save", "none")) == 0
    (run / "training_finished.json").unlink()
    # a newer checkpoint cut short (its optimizer state missing), which --resume falls back past: the default was
    # read off it, so the run went on with wte and lm_head and then stopped as another run's checkpoint
    shutil.copytree(run / "checkpoint-1", run / "checkpoint-5")
    (run / "checkpoint-5" / "optimizer.pt").unlink()
    (run / "checkpoint-5" / "qwen_run.json").unlink()
    assert main(train_args(trained["base"], trained["data"], run, *common, "--max_steps", "2", "--resume", "True")) == 0
    assert not json.loads((run / "adapter_config.json").read_text()).get("modules_to_save")


def test_peft_from_pretrained_takes_the_adapters_generation_config(trained):
    from peft import PeftModel

    from finetune import load_model

    model = PeftModel.from_pretrained(load_model(trained["base"], device="cpu"), str(trained["adapter"]))
    assert model.generation_config.chat_format == "chatml"


def test_peft_from_pretrained_checks_the_adapters_generation_config_first(trained, tmp_path):
    # load_model checked it; PEFT's from_pretrained read it with transformers' own error, after the weights
    from peft import PeftModel

    from finetune import load_model

    broken = tmp_path / "broken"
    shutil.copytree(trained["adapter"], broken)
    (broken / "generation_config.json").write_text('{"chat_format": "chatml", "top_p": 7}')
    with pytest.raises(ModelLoadError, match=r"broken/generation_config\.json: top_p must be"):
        PeftModel.from_pretrained(load_model(trained["base"], device="cpu"), str(broken))
    with pytest.raises(ModelLoadError, match=r"broken/generation_config\.json: top_p must be"):
        load_model(trained["base"], adapter=broken, device="cpu")
