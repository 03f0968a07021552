"""build_dataset: encoded rows, summary counts, skips, packing, processes, and the fingerprint cache."""

import json
import os

import pytest

pytest.importorskip("datasets")

from finetune.data import DataError, build_dataset, encode_conversation, load_records  # noqa: E402


def rec(i, reply="fine", turns=1):
    msgs = []
    for t in range(turns):
        msgs += [{"role": "user", "content": f"question {i}.{t}"}, {"role": "assistant", "content": reply}]
    return {"id": i, "messages": msgs}


GOOD = [rec(i, "answer " * (i % 7 + 1), turns=i % 3 + 1) for i in range(40)]


@pytest.fixture
def jsonl(tmp_path):
    def write(records, name="d.jsonl", raw_lines=()):
        p = tmp_path / name
        lines = [json.dumps(r) for r in records] + list(raw_lines)
        p.write_text("\n".join(lines) + "\n")
        return p
    return write


def test_rows_match_encode_conversation(data_small_tokenizer, jsonl, tmp_path):
    tok = data_small_tokenizer
    ds, summary = build_dataset(tok, jsonl(GOOD), max_len=None, cache_dir=tmp_path / "cache")
    assert len(ds) == len(GOOD)
    for row, r in zip(ds, GOOD):
        e = encode_conversation(tok, r)
        assert row["input_ids"] == e["input_ids"] and row["labels"] == e["labels"]
        assert row["length"] == len(e["input_ids"])
    assert summary.records_read == summary.records_used == 40 and summary.records_skipped == 0
    lengths = sorted(len(encode_conversation(tok, r)["input_ids"]) for r in GOOD)
    assert summary.total_tokens == sum(lengths) and summary.max == lengths[-1]
    assert summary.p50 == lengths[19] and summary.p90 == lengths[35] and summary.p99 == lengths[39]
    trained = sum(sum(1 for l in encode_conversation(tok, r)["labels"] if l != -100) for r in GOOD)
    assert summary.trained_tokens == trained and 0 < summary.trained_share < 1
    text = summary.format()
    assert "40 read, 40 used, 0 skipped" in text and "p50" in text and "truncated: 0" in text


def test_same_result_from_list_json_and_two_processes(data_small_tokenizer, jsonl, tmp_path):
    tok = data_small_tokenizer
    base, _ = build_dataset(tok, jsonl(GOOD), 64, cache_dir=tmp_path / "c1")
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps(GOOD))
    for source, procs in ((GOOD, None), (str(arr), None), (jsonl(GOOD, "e.jsonl"), 2), (GOOD, 2)):
        ds, s = build_dataset(tok, source, 64, num_proc=procs, cache_dir=tmp_path / "c2")
        assert ds["input_ids"][:] == base["input_ids"][:] and ds["labels"][:] == base["labels"][:]


def test_truncation_and_too_long_are_counted(data_small_tokenizer, jsonl, tmp_path):
    tok = data_small_tokenizer
    long_prompt = {"messages": [{"role": "user", "content": "q " * 100}, {"role": "assistant", "content": "a"}]}
    ds, s = build_dataset(tok, jsonl(GOOD + [long_prompt]), 40, cache_dir=tmp_path / "c")
    n_trunc = sum(len(encode_conversation(tok, r)["input_ids"]) > 40 for r in GOOD)
    assert n_trunc > 0 and s.truncated == n_trunc
    assert s.records_read == 41 and s.records_used == 40 and len(ds) == 40
    assert s.skipped["prompt longer than max_len (nothing left to train)"] == 1
    assert max(ds["length"][:]) <= 40


def test_invalid_record_raises_first_in_file_order(data_small_tokenizer, jsonl, tmp_path):
    bad = [{"messages": [{"role": "user", "content": "x"}]}, {"conversations": [{"from": "bot", "value": "x"}]}]
    path = jsonl(GOOD[:20] + bad + GOOD[20:])
    for procs in (None, 2):
        with pytest.raises(DataError) as e:
            build_dataset(data_small_tokenizer, path, 64, num_proc=procs, cache_dir=tmp_path / "c")
        assert e.value.reason == "no assistant turn" and e.value.index == 20 and e.value.line == 21
        assert str(path) in str(e.value)


def test_file_level_errors(data_small_tokenizer, tmp_path):
    with pytest.raises(DataError, match="file not found"):
        build_dataset(data_small_tokenizer, tmp_path / "missing.jsonl", 64, cache_dir=tmp_path / "c")
    broken = tmp_path / "b.json"
    broken.write_text('[{"messages": [}]')
    with pytest.raises(DataError, match="invalid JSON"):
        build_dataset(data_small_tokenizer, broken, 64, cache_dir=tmp_path / "c")


def test_skip_invalid_counts_and_reasons(data_small_tokenizer, jsonl, tmp_path, capsys):
    bad = [{"messages": [{"role": "user", "content": "x"}]}, {"conversations": [{"from": "bot", "value": "x"}]}]
    path = jsonl(GOOD + bad, raw_lines=["{not json"])
    ds, s = build_dataset(data_small_tokenizer, path, 64, skip_invalid=True, num_proc=2,
                          cache_dir=tmp_path / "c")
    assert len(ds) == 40 and s.records_read == 43 and s.records_skipped == 3
    assert s.skipped == {"no assistant turn": 1, "unknown role": 1, "invalid JSON": 1}
    assert any("line 43" in e for e in s.examples)
    assert "3 skipped" in capsys.readouterr().err  # printed even if the caller drops the summary
    # the same numbers on a cache hit
    _, s2 = build_dataset(data_small_tokenizer, path, 64, skip_invalid=True, num_proc=2, cache_dir=tmp_path / "c")
    assert s2.skipped == s.skipped and s2.total_tokens == s.total_tokens
    # load_records agrees
    assert load_records(path, skip_invalid=True).report.reasons() == s.skipped


def test_zero_usable_records(data_small_tokenizer, jsonl, tmp_path):
    path = jsonl([{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="no usable records"):
        build_dataset(data_small_tokenizer, path, 64, skip_invalid=True, cache_dir=tmp_path / "c")


def test_packing(data_small_tokenizer, jsonl, tmp_path):
    tok = data_small_tokenizer
    ds, s = build_dataset(tok, jsonl(GOOD), 128, packing=True, cache_dir=tmp_path / "c")
    assert s.packed and s.rows == len(ds) < 40 and sum(ds["num_sequences"][:]) == 40
    assert sum(ds["length"][:]) == s.total_tokens
    for row in ds:
        assert len(row["input_ids"]) == len(row["position_ids"]) <= 128
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) == row["num_sequences"]
        assert all(row["input_ids"][i] == tok.im_start_id and row["labels"][i] == -100 for i in starts)
    with pytest.raises(ValueError, match="packing needs max_len"):
        build_dataset(tok, jsonl(GOOD), None, packing=True)


def test_second_build_hits_the_cache(data_small_tokenizer, jsonl, tmp_path):
    tok = data_small_tokenizer
    path = jsonl(GOOD)
    cache = tmp_path / "cache"
    ds1, s1 = build_dataset(tok, path, 64, cache_dir=cache)
    files1 = {f["filename"]: os.stat(f["filename"]).st_mtime_ns for f in ds1.cache_files}
    assert files1 and all(str(cache) in f for f in files1)
    ds2, s2 = build_dataset(tok, path, 64, cache_dir=cache)
    assert ds2._fingerprint == ds1._fingerprint
    assert {f["filename"]: os.stat(f["filename"]).st_mtime_ns for f in ds2.cache_files} == files1  # not rewritten
    assert s2 == s1
    # a different option or an edited file is a different fingerprint
    ds3, _ = build_dataset(tok, path, 64, train_on_prompt=True, cache_dir=cache)
    assert ds3._fingerprint != ds1._fingerprint
    path.write_text(path.read_text() + json.dumps(rec(99)) + "\n")
    ds4, s4 = build_dataset(tok, path, 64, cache_dir=cache)
    assert len(ds4) == 41 and s4.records_read == 41


def test_datasets_dir_and_train_on_prompt(data_small_tokenizer, tmp_path):
    import datasets

    tok = data_small_tokenizer
    datasets.Dataset.from_list([{"id": str(r["id"]), "messages": r["messages"]} for r in GOOD[:10]]).save_to_disk(
        str(tmp_path / "ds"))
    ds, s = build_dataset(tok, tmp_path / "ds", None, train_on_prompt=True, cache_dir=tmp_path / "c")
    assert len(ds) == 10 and s.records_read == 10
    for row, r in zip(ds, GOOD[:10]):
        assert row["labels"] == encode_conversation(tok, r, train_on_prompt=True)["labels"]
