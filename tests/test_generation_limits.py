"""The most new tokens a model allows a reply (max(max_position_embeddings, 4 x seq_length) of its config.json), the
one-line refusal of a --max-new-tokens past it, which chat and eval give before the weights load, and the prompt
window of its generation config, read before the load."""

import json

import pytest

from finetune.generation_limits import max_new_tokens_limit, new_tokens_limit, too_many_new_tokens


@pytest.mark.parametrize("cfg, limit", [
    ({"max_position_embeddings": 8192, "seq_length": 2048}, 8192),  # Qwen-14B-Chat: the positions
    ({"max_position_embeddings": 300, "seq_length": 100}, 400),  # 4 x seq_length: dynamic NTK stretches the window
    ({"seq_length": 64}, 256),
    ({"max_position_embeddings": 300.0, "seq_length": 100}, None),  # not whole numbers: no limit read
    ({"max_position_embeddings": "300", "seq_length": 100}, None),
    ({}, None),
])
def test_the_limit_of_a_config_is_the_engines_default_length(cfg, limit):
    assert new_tokens_limit(cfg) == limit


def test_the_limit_of_a_dir_reads_its_config_and_is_none_where_there_is_none_to_read(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    (good / "config.json").write_text(json.dumps({"model_type": "qwen", "max_position_embeddings": 300,
                                                  "seq_length": 100}))
    assert max_new_tokens_limit(good) == 400
    assert max_new_tokens_limit(str(good)) == 400
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")  # (the load names what is wrong with it)
    assert max_new_tokens_limit(broken) is None
    assert max_new_tokens_limit(tmp_path / "absent") is None
    assert max_new_tokens_limit("Qwen/Qwen-14B-Chat-Int4") is None  # a hub id: no local config


def test_too_many_new_tokens_is_one_line_naming_the_holder_and_the_limit():
    assert too_many_new_tokens(None, 400, "m") is None  # (the flag not given)
    assert too_many_new_tokens(400, 400, "m") is None
    assert too_many_new_tokens(10 ** 9, None, "m") is None  # (no limit known)
    assert too_many_new_tokens(401, 400, "/models/q") == (
        "--max-new-tokens 401 is more than /models/q holds (at most 400: max(max_position_embeddings, 4 x "
        "seq_length) of its config.json)")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from finetune.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("limits") / "demo")


@pytest.mark.parametrize("case", ["set", "unset", "no file", "only in config.json"])
def test_the_prompt_window_read_before_loading_is_the_loaded_models(demo_dir, tmp_path, case):
    """eval builds its prompts before the model loads, at the window chat() reads from the loaded model's generation
    config (else 6144): the two must agree, wherever the dir puts the value or leaves it out."""
    import shutil

    import torch

    from finetune import load_model
    from finetune.generation_limits import prompt_window

    model_dir = tmp_path / "model"
    shutil.copytree(demo_dir, model_dir)
    gen_path, cfg_path = model_dir / "generation_config.json", model_dir / "config.json"
    gen = json.loads(gen_path.read_text())
    gen.pop("max_window_size")
    if case == "set":
        gen["max_window_size"] = 100
    if case in ("no file", "only in config.json"):
        gen_path.unlink()
    else:
        gen_path.write_text(json.dumps(gen))
    if case == "only in config.json":  # (transformers takes no max_window_size from there)
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "max_window_size": 100}))
    loaded = load_model(model_dir, dtype=torch.float32, device="cpu").generation_config
    assert prompt_window(model_dir) == (getattr(loaded, "max_window_size", None) or 6144)
    assert prompt_window(model_dir) == (100 if case == "set" else 6144)


def test_a_window_the_loader_refuses_is_its_error(demo_dir, tmp_path):
    import shutil

    from finetune.errors import ModelLoadError
    from finetune.generation_limits import prompt_window

    model_dir = tmp_path / "model"
    shutil.copytree(demo_dir, model_dir)
    gen_path = model_dir / "generation_config.json"
    gen_path.write_text(json.dumps({**json.loads(gen_path.read_text()), "max_window_size": 0}))
    with pytest.raises(ModelLoadError, match=r"generation_config.json: max_window_size must be an integer of at least "
                                             r"1 \(tokens\), got 0$"):
        prompt_window(model_dir)
