"""The trainer's side of data problems (issue 14): records with nothing to train stop the run before any model
loads, naming the count, the first record and the flags; `datasets`' progress bars follow --disable_tqdm."""

import json

import pytest

pytest.importorskip("datasets")

from finetune.train import main as train_main  # noqa: E402

from _helpers import memorise_records, train_args  # noqa: E402


def _three_of_five_too_long(path):
    recs = memorise_records()
    long_prompt = lambda i: {"id": f"long{i}", "conversations": [{"from": "user", "value": f"q{i} " * 100},
                                                                 {"from": "assistant", "value": "a"}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in [recs[0], long_prompt(1), recs[1], long_prompt(2),
                                                           long_prompt(3)]))
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    import finetune.loading

    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))


def test_records_with_nothing_to_train_stop_before_the_model_loads(tiny_model_dir, tmp_path, capsys,
                                                                   no_model_load):
    data = _three_of_five_too_long(tmp_path / "d.jsonl")
    argv = train_args(tiny_model_dir, data, tmp_path / "o", "--use_lora", "True", "--model_max_length", "64")
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == (f"error: --data_path {data}, record 2, line 2: prompt longer than max_len (nothing left to train): "
                      "3 of 5 records have no trained reply token within max_len 64 (the text before the first "
                      "trained reply fills it); this is the first; raise --model_max_length (now 64), or pass "
                      "--skip_invalid True to skip and count such records")


def test_a_bad_eval_file_is_named_by_its_flag(tiny_model_dir, tmp_path, capsys, no_model_load):
    # (the error named the file alone, as it did for --data_path's: which flag gave it was left to the user)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in memorise_records()))
    held_out = tmp_path / "e.jsonl"
    held_out.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    argv = train_args(tiny_model_dir, data, tmp_path / "o", "--use_lora", "True", "--eval_data_path", str(held_out))
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --eval_data_path {held_out}, record 1, line 1: no assistant turn: nothing to train on or "
                   "score"], err


def test_a_cache_dir_error_names_no_data_flag(tiny_model_dir, tmp_path, capsys, no_model_load, monkeypatch):
    # (the cache is the machine's setting: "--data_path <cache dir>" would point at the wrong thing)
    import datasets

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "file"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in memorise_records()))
    assert train_main(train_args(tiny_model_dir, data, tmp_path / "o", "--use_lora", "True")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'file' / 'qwen_finetune'}: cannot write the "
                                               "encoded-data cache"), err


def test_skip_invalid_trains_on_the_rest_and_reports_the_count(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import finetune.loading

    class Loaded(Exception):
        pass

    def stop(*a, **k):
        raise Loaded

    monkeypatch.setattr(finetune.loading, "load_model", stop)
    data = _three_of_five_too_long(tmp_path / "d.jsonl")
    argv = train_args(tiny_model_dir, data, tmp_path / "o", "--use_lora", "True", "--model_max_length", "64",
                      "--skip_invalid", "True")
    with pytest.raises(Loaded):  # the data passed: the run went on to load the model
        train_main(argv)
    out = capsys.readouterr()
    assert "5 read, 2 used, 3 skipped" in out.out + out.err
    assert "skipped 3: prompt longer than max_len (nothing left to train)" in out.err
    assert f"e.g. {data}, record 2, line 2" in out.err
    assert (out.out + out.err).count("5 read, 2 used, 3 skipped") == 1  # (the summary was printed twice)


def test_all_records_too_long_under_skip_invalid_names_the_length_flag(tiny_model_dir, tmp_path, capsys,
                                                                       no_model_load):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"conversations": [{"from": "user", "value": "q " * 100},
                                                  {"from": "assistant", "value": "a"}]}) + "\n")
    argv = train_args(tiny_model_dir, data, tmp_path / "o", "--use_lora", "True", "--model_max_length", "64",
                      "--skip_invalid", "True")
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "no usable records" in err and "raise --model_max_length (now 64)" in err and "--skip_invalid" not in err


@pytest.mark.parametrize("disable", [True, False])
def test_datasets_progress_bars_follow_disable_tqdm(tiny_model_dir, tmp_path, capfd, disable, monkeypatch):
    import datasets

    from finetune.tokenization import load_tokenizer

    # a cache of its own: a hit in the shared one (an earlier run that had the same temporary path) shows no bar
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    from finetune.train import _datasets
    from finetune.training.arguments import parse_args

    data = _three_of_five_too_long(tmp_path / "d.jsonl")  # skipped rows: packing takes the others
    _, data_args, _, args = parse_args(train_args(tiny_model_dir, data, tmp_path / "o", "--use_lora", "True",
                                                  "--model_max_length", "64", "--skip_invalid", "True",
                                                  "--packing", "True", "--disable_tqdm", str(disable)))
    capfd.readouterr()
    _datasets(load_tokenizer(tiny_model_dir), data_args, args)
    err = capfd.readouterr().err
    assert ("packing" in err) == (not disable) and ("tokenizing" in err) == (not disable)
