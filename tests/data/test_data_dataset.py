"""build_dataset: encoded rows, summary counts, skips, packing, processes, and the fingerprint cache."""

import json
import os

import pytest

pytest.importorskip("datasets")

from finetune.data import DataError, TooLongError, build_dataset, encode_conversation, load_records  # noqa: E402


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


def test_a_large_jsonl_file_is_split_between_processes_unless_the_flag_says(data_small_tokenizer, jsonl, tmp_path,
                                                                           monkeypatch):
    """Without num_proc, a JSONL file of AUTO_SPLIT_BYTES and more is encoded by up to AUTO_MAX_PROCS processes (one
    per CPU), a smaller one or a JSON array by one; num_proc given is what runs. The rows are the same."""
    import finetune.data.dataset as dataset_mod

    calls = []
    encode = dataset_mod._encode_to_arrow
    monkeypatch.setattr(dataset_mod, "_encode_to_arrow",
                        lambda jobs, dst, procs, bar=None: calls.append((len(jobs), procs))
                        or encode(jobs, dst, procs, bar))
    lines = jsonl(GOOD, "big.jsonl")
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps(GOOD))
    want, _ = build_dataset(data_small_tokenizer, lines, 64, cache_dir=tmp_path / "c0")
    assert calls.pop() == (1, 1)  # small: one process
    monkeypatch.setattr(dataset_mod, "AUTO_SPLIT_BYTES", 1)
    cpus = dataset_mod.auto_procs(str(lines))
    assert 1 <= cpus <= dataset_mod.AUTO_MAX_PROCS
    got, _ = build_dataset(data_small_tokenizer, lines, 64, cache_dir=tmp_path / "c1")
    assert calls.pop() == (cpus, cpus) and got["input_ids"][:] == want["input_ids"][:]
    build_dataset(data_small_tokenizer, lines, 64, num_proc=1, cache_dir=tmp_path / "c2")
    assert calls.pop() == (1, 1)
    build_dataset(data_small_tokenizer, str(arr), 64, cache_dir=tmp_path / "c3")
    assert calls.pop()[1] == 1  # a JSON array is read by one process
    monkeypatch.setattr(dataset_mod.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert dataset_mod.auto_procs(str(lines)) == dataset_mod.AUTO_MAX_PROCS


def test_same_result_from_list_json_and_two_processes(data_small_tokenizer, jsonl, tmp_path):
    tok = data_small_tokenizer
    base, _ = build_dataset(tok, jsonl(GOOD), 64, cache_dir=tmp_path / "c1")
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps(GOOD))
    for source, procs in ((GOOD, None), (str(arr), None), (jsonl(GOOD, "e.jsonl"), 2), (GOOD, 2)):
        ds, s = build_dataset(tok, source, 64, num_proc=procs, cache_dir=tmp_path / "c2")
        assert ds["input_ids"][:] == base["input_ids"][:] and ds["labels"][:] == base["labels"][:]


def test_truncation_and_too_long_are_counted(data_small_tokenizer, jsonl, tmp_path):
    # (issue 14 item 14: a record left with nothing to train is counted only under skip_invalid)
    tok = data_small_tokenizer
    long_prompt = {"messages": [{"role": "user", "content": "q " * 100}, {"role": "assistant", "content": "a"}]}
    ds, s = build_dataset(tok, jsonl(GOOD + [long_prompt]), 40, skip_invalid=True, cache_dir=tmp_path / "c")
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
    with pytest.raises(DataError) as e:
        build_dataset(data_small_tokenizer, tmp_path / "missing.jsonl", 64, cache_dir=tmp_path / "c")
    assert str(e.value) == f"{tmp_path / 'missing.jsonl'}: no such file"
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


@pytest.mark.parametrize("text", ["[]", "", "\n\n"])
def test_an_empty_file_says_so(data_small_tokenizer, tmp_path, text):
    # as load_records (eval) words it, not "0 read; skipped: none"
    path = tmp_path / ("empty.json" if text == "[]" else "empty.jsonl")
    path.write_text(text)
    with pytest.raises(DataError, match="no usable records: the file holds no records") as e:
        build_dataset(data_small_tokenizer, str(path), 64, cache_dir=tmp_path / "c")
    assert str(path) in str(e.value)


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


def test_a_cache_dir_that_cannot_be_written_is_one_error_naming_it(data_small_tokenizer, jsonl, tmp_path):
    # (a read-only home or HF_DATASETS_CACHE under a file: NotADirectoryError / PermissionError, a traceback)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"file/cache: cannot write the encoded-data cache: .*HF_DATASETS_CACHE"):
        build_dataset(data_small_tokenizer, jsonl(GOOD), 64, cache_dir=tmp_path / "file" / "cache")


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


# -- issue 14: content-keyed cache, records with nothing to train, progress bars -----------------------------

def _same_size_other_content(path, old_text, new_text):
    st = os.stat(path)
    assert len(new_text.encode()) == len(old_text.encode()) and new_text != old_text
    path.write_text(new_text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p, rsync -a and tar leave it
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_cache_follows_content_not_size_and_mtime(data_small_tokenizer, tmp_path, name):
    tok = data_small_tokenizer
    old = [rec(i, "apples") for i in range(5)]
    new = [rec(i, "melons") for i in range(5)]  # same length in characters and in bytes
    path = tmp_path / name
    dump = (lambda rs: json.dumps(rs)) if name.endswith(".json") else \
        (lambda rs: "".join(json.dumps(r) + "\n" for r in rs))
    path.write_text(dump(old))
    ds1, _ = build_dataset(tok, path, None, cache_dir=tmp_path / "c")
    assert ds1[0]["input_ids"] == encode_conversation(tok, old[0])["input_ids"]
    _same_size_other_content(path, dump(old), dump(new))
    ds2, _ = build_dataset(tok, path, None, cache_dir=tmp_path / "c")
    assert ds2._fingerprint != ds1._fingerprint
    assert ds2["input_ids"][:] == [encode_conversation(tok, r)["input_ids"] for r in new]


def test_cache_follows_content_of_a_datasets_dir(data_small_tokenizer, tmp_path):
    import datasets

    tok = data_small_tokenizer
    d = tmp_path / "ds"
    datasets.Dataset.from_list([{"id": "1", "messages": rec(1, "apples")["messages"]}]).save_to_disk(str(d))
    ds1, _ = build_dataset(tok, d, None, cache_dir=tmp_path / "c")
    arrow = next(d.glob("*.arrow"))
    data = arrow.read_bytes()
    assert data.count(b"apples") == 1
    st = os.stat(arrow)
    arrow.write_bytes(data.replace(b"apples", b"melons"))
    os.utime(arrow, ns=(st.st_atime_ns, st.st_mtime_ns))
    ds2, _ = build_dataset(tok, d, None, cache_dir=tmp_path / "c")
    assert ds2[0]["input_ids"] == encode_conversation(tok, rec(1, "melons"))["input_ids"] != ds1[0]["input_ids"]


def _three_of_five_too_long():
    long_prompt = lambda i: {"id": i, "messages": [{"role": "user", "content": f"q{i} " * 100},
                                                   {"role": "assistant", "content": "a"}]}
    return [rec(0), long_prompt(1), rec(2), long_prompt(3), long_prompt(4)]


def test_records_with_nothing_to_train_stop_the_build(data_small_tokenizer, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(_three_of_five_too_long(), indent=1))
    with pytest.raises(TooLongError) as e:
        build_dataset(data_small_tokenizer, path, 40, cache_dir=tmp_path / "c")
    err = e.value
    assert isinstance(err, DataError) and err.index == 1 and err.line is not None
    assert str(err) == (f"{path}, record 2, line {err.line}: prompt longer than max_len (nothing left to train): "
                        "3 of 5 records have no trained reply token within max_len 40 (the text before the first "
                        "trained reply fills it); this is the first")
    # the line is the one where record 2 starts
    starts = [i + 1 for i, l in enumerate(path.read_text().splitlines()) if l.startswith(" {")]
    assert err.line == starts[1]
    # with skip_invalid: trained on the other 2, the 3 counted, the first named in the summary
    ds, s = build_dataset(data_small_tokenizer, path, 40, skip_invalid=True, cache_dir=tmp_path / "c")
    assert len(ds) == 2 and s.records_read == 5 and s.records_skipped == 3
    assert s.skipped == {"prompt longer than max_len (nothing left to train)": 3}
    assert any("record 2" in x and "3 of 5 records" in x for x in s.examples)
    assert "3 skipped" in s.format()


def test_nothing_to_train_in_memory_records_and_with_invalid_ones(data_small_tokenizer, tmp_path):
    recs = _three_of_five_too_long()
    with pytest.raises(TooLongError, match=r"^<records>, record 2: .*3 of 5 records"):
        build_dataset(data_small_tokenizer, recs, 40, cache_dir=tmp_path / "c")
    # an invalid record before them is named first, as before
    with pytest.raises(DataError) as e:
        build_dataset(data_small_tokenizer, [{"messages": []}] + recs, 40, cache_dir=tmp_path / "c")
    assert not isinstance(e.value, TooLongError) and e.value.reason == "no conversations"
    # every record too long, even when skipping: no usable records, still a TooLongError (the caller names its
    # max_len setting)
    with pytest.raises(TooLongError, match="no usable records.*max_len is 40"):
        build_dataset(data_small_tokenizer, [recs[1]], 40, skip_invalid=True, cache_dir=tmp_path / "c")


def test_progress_bars_follow_progress_flag(data_small_tokenizer, jsonl, tmp_path, capfd):
    long_prompt = {"messages": [{"role": "user", "content": "q " * 100}, {"role": "assistant", "content": "a"}]}
    path = jsonl(GOOD + [long_prompt])  # a skipped row: the filter step runs, then packing
    kw = dict(packing=True, skip_invalid=True, verbose=False)
    build_dataset(data_small_tokenizer, path, 64, progress=False, cache_dir=tmp_path / "c1", **kw)
    err = capfd.readouterr().err
    assert "packing" not in err and "dropping records" not in err and "%|" not in err and "tokenizing" not in err
    import datasets

    assert not datasets.are_progress_bars_disabled()  # restored
    build_dataset(data_small_tokenizer, path, 64, progress=True, cache_dir=tmp_path / "c2", **kw)
    err = capfd.readouterr().err
    assert "packing" in err and "tokenizing" in err  # the bars this turns off do exist
    build_dataset(data_small_tokenizer, path, 64, progress=True, num_proc=2, cache_dir=tmp_path / "c3", **kw)
    bar = f"tokenizing (2 processes): 100%|{'█' * 10}| {len(GOOD) + 1}/{len(GOOD) + 1}"
    assert bar in capfd.readouterr().err  # the workers' records count
