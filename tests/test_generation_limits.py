"""The most new tokens a model allows a reply (max(max_position_embeddings, 4 x seq_length) of its config.json) and
the one-line refusal of a --max-new-tokens past it, which chat and eval give before the weights load."""

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
