"""Parquet data files (the hub's `data/train-00000-of-00003.parquet`): one record a row, its null fields absent, read
through the same validation as JSON records; errors name the file and the row."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finetune.data import DataError, build_dataset, load_records
from finetune.data.records import data_sources
from finetune.evaluate import load_eval_records


def tool_record(name: str, param: str, value: str) -> dict:
    tools = [{"type": "function", "function": {"name": name, "description": f"Calls {name}.", "parameters": {
        "type": "object", "properties": {param: {"type": "string"}}, "required": [param]}}}]
    call = {"id": "c1", "type": "function", "function": {"name": name, "arguments": json.dumps({param: value})}}
    return {"id": name, "tools": tools, "messages": [
        {"role": "user", "content": f"{name} {value}?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny"}, {"role": "assistant", "content": "Sunny."}]}


# OpenAI's messages, each record with fields the others lack: written to one Parquet file, every record holds the
# union of them, null where it has none (a top-level system, tools, a message's name, weight, tool_calls, and each
# tool's parameters those of the other tools: "query": null beside "city" was rendered into the prompt)
RECORDS = [
    {"id": "sys", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello."}]},
    {"id": "name", "system": "Answer in French.",
     "messages": [{"role": "user", "content": "Hi", "name": "alice"}, {"role": "assistant", "content": "Bonjour."}]},
    {"id": "weight", "messages": [{"role": "user", "content": "1+1?"},
                                  {"role": "assistant", "content": "3", "weight": 0},
                                  {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "2"}]},
    tool_record("get_weather", "city", "Paris"),
    tool_record("search", "query", "Paris weather"),
]


def parquet(path: Path, records: list, **kw) -> Path:
    """``records`` as a Parquet file whose columns are the union of theirs, as the hub's files are written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_struct_array(pa.array(records)), path, **kw)  # (from_pylist: the first's keys)
    return path


def jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def rec(q: str, a: str = "ok") -> dict:
    return {"id": q, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def ids(records) -> list:
    return [r["id"] for r in records]


def test_a_union_schema_file_reads_and_encodes_as_its_records_in_jsonl(tmp_path, data_small_tokenizer):
    path = parquet(tmp_path / "train.parquet", RECORDS, row_group_size=1)  # (a row group a record: splits in two)
    rows = pq.read_table(path).to_pylist()
    assert rows[0]["system"] is None and rows[0]["tools"] is None and rows[0]["messages"][1]["name"] is None
    assert rows[3]["tools"][0]["function"]["parameters"]["properties"]["query"] is None  # (the other tool's)
    same = jsonl(tmp_path / "train.jsonl", RECORDS)
    assert load_records(path) == load_records(same) == load_eval_records(path)
    built = {}
    for name, f, procs in (("jsonl", same, 1), ("parquet", path, 1), ("parquet, two processes", path, 2)):
        ds, summary = build_dataset(data_small_tokenizer, str(f), 4096, num_proc=procs, cache_dir=tmp_path / name,
                                    progress=False)
        built[name] = (ds["input_ids"], ds["labels"])
        assert summary.records_read == summary.records_used == len(RECORDS), name
    assert built["parquet"] == built["parquet, two processes"] == built["jsonl"]
    assert len(built["jsonl"][0]) == len(RECORDS)


def test_a_file_is_parquet_by_its_first_bytes_not_its_name(tmp_path):
    path = parquet(tmp_path / "train.jsonl", [rec("a"), rec("b")])  # (written by a tool that named it so)
    assert ids(load_records(path)) == ["a", "b"]


def test_an_invalid_row_is_one_line_naming_the_file_and_the_row(tmp_path, data_small_tokenizer):
    path = parquet(tmp_path / "train.parquet", [rec("a"), rec("b"), {"id": "c", "messages": [
        {"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    said = f"--data_path {path}, record 3: unknown role: turn 1 has role 'bot' (accepted: "
    with pytest.raises(DataError) as e:
        load_records(path, flag="--data_path")
    assert str(e.value).startswith(said) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(DataError) as e:
        build_dataset(data_small_tokenizer, str(path), 64, cache_dir=tmp_path / "cache", progress=False)
    assert str(e.value).startswith(said.removeprefix("--data_path ")), str(e.value)
    _, summary = build_dataset(data_small_tokenizer, str(path), 64, skip_invalid=True, cache_dir=tmp_path / "cache",
                               progress=False, verbose=False)
    assert summary.records_used == 2 and summary.skipped == {"unknown role": 1}


def test_a_glob_reads_jsonl_and_parquet_files_sorted_by_name(tmp_path, data_small_tokenizer):
    jsonl(tmp_path / "data" / "train-00002.jsonl", [rec("c")])
    parquet(tmp_path / "data" / "train-00001.parquet", [rec("a"), rec("b")])
    parquet(tmp_path / "data" / "train-00003.parquet", [rec("d")])
    spec = str(tmp_path / "data" / "train-*")
    assert [Path(f).name for f in data_sources(spec)] == ["train-00001.parquet", "train-00002.jsonl",
                                                          "train-00003.parquet"]
    assert ids(load_records(spec)) == ids(load_records(tmp_path / "data")) == list("abcd")
    _, summary = build_dataset(data_small_tokenizer, spec, 64, cache_dir=tmp_path / "cache", progress=False)
    assert summary.records_used == 4
    # a record too long is named in its own file, by its row (counted in the file's footer)
    parquet(tmp_path / "data" / "train-00003.parquet", [rec("d"), rec("long " * 200)])
    for source in (spec, str(tmp_path / "data" / "train-00003.parquet")):
        with pytest.raises(DataError) as e:
            build_dataset(data_small_tokenizer, source, 64, cache_dir=tmp_path / "cache", progress=False)
        assert str(e.value).startswith(f"{tmp_path / 'data' / 'train-00003.parquet'}, record 2: prompt longer than "
                                       "max_len"), str(e.value)


@pytest.mark.parametrize("content, said", [
    (b"PAR1" + b"\x00garbage" * 4, "unreadable Parquet file: Parquet magic bytes not found in footer"),
    (b"PAR1" + b"\x00garbage" * 4 + b"PAR1", "unreadable Parquet file: Parquet file size is 40 bytes, smaller than"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n",
     "not a Parquet file: it is a Git LFS pointer: the hub's file was not downloaded (`git lfs pull`)"),
])
def test_a_damaged_parquet_file_is_one_line(tmp_path, data_small_tokenizer, content, said):
    path = tmp_path / "train-00000-of-00001.parquet"
    path.write_bytes(content)
    for read in (lambda: load_records(path, flag="--data_path"),
                 lambda: build_dataset(data_small_tokenizer, str(path), 64, cache_dir=tmp_path / "cache",
                                       progress=False)):
        with pytest.raises(DataError) as e:
            read()
        msg = str(e.value)
        assert said in msg and msg.split(said)[0].removeprefix("--data_path ") == f"{path}: " and "\n" not in msg, msg


def test_a_bytes_column_is_refused_naming_the_column(tmp_path):
    path = parquet(tmp_path / "train.parquet", [{**rec("a"), "blob": None}, {**rec("b"), "blob": b"\x00\x01"}])
    with pytest.raises(DataError) as e:
        load_records(path)
    assert str(e.value) == (f"{path}, record 2: not JSON data: column 'blob' holds binary data (bytes), which no JSON "
                            "record holds (a chat record is text): drop the column, or convert it to text")
    assert ids(load_records(path, skip_invalid=True)) == ["a"]  # (null there: absent)
    # a timestamp inside a message is named with its place
    import datetime

    path = parquet(tmp_path / "when.parquet", [{"messages": [{"role": "user", "content": "q"},
                                                             {"role": "assistant", "content": "a",
                                                              "at": datetime.datetime(2024, 1, 1)}]}])
    with pytest.raises(DataError, match=r"record 1: not JSON data: column 'messages' holds a timestamp \(at "
                                        r"messages\[1\]\.at\), which no JSON record holds"):
        load_records(path)
    # an image column (the hub's Image feature: its bytes) is refused as multimodal data, which it is
    path = parquet(tmp_path / "vision.parquet", [{**rec("a"), "images": [{"bytes": b"\x89PNG", "path": None}]}])
    with pytest.raises(DataError, match=r"record 1: multimodal data: the record has 'images'"):
        load_records(path)


def test_invalid_utf8_in_a_string_column_names_the_row_and_the_column(tmp_path):
    raw = pa.array([b"ok", b"caf\xe9"], pa.binary())
    text = pa.StringArray.from_buffers(len(raw), raw.buffers()[1], raw.buffers()[2])  # (not validated)
    path = tmp_path / "latin1.parquet"
    pq.write_table(pa.table({"instruction": text, "output": ["fine", "fine"]}), path)
    with pytest.raises(DataError) as e:
        load_records(path)
    assert str(e.value) == f"{path}, record 2: not UTF-8: column 'instruction' holds invalid UTF-8 bytes b'\\xe9'"


def test_the_cache_is_rebuilt_when_the_parquet_file_changes(tmp_path, data_small_tokenizer):
    path = parquet(tmp_path / "train.parquet", [rec("a"), rec("b")])

    def build():
        return build_dataset(data_small_tokenizer, str(path), 64, cache_dir=tmp_path / "cache", progress=False)

    first, summary1 = build()
    assert build()[0].cache_files == first.cache_files
    stat = os.stat(path)
    parquet(path, [rec("a"), rec("B")])  # same size, same mtime: only the content differs
    assert os.stat(path).st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second, summary2 = build()
    assert second.cache_files != first.cache_files and summary2.content != summary1.content
    assert second["input_ids"][0] == first["input_ids"][0] and second["input_ids"][1] != first["input_ids"][1]


def test_a_parquet_file_is_split_between_processes_at_its_row_groups(tmp_path, data_small_tokenizer, monkeypatch):
    """As a JSONL file is: a large one without num_proc (AUTO_SPLIT_BYTES), or num_proc given; the same rows. One
    row group is not split."""
    import finetune.data.dataset as dataset_mod
    from finetune.data.records import parquet_shards

    calls = []
    encode = dataset_mod._encode_to_arrow
    monkeypatch.setattr(dataset_mod, "_encode_to_arrow",
                        lambda jobs, dst, procs, bar=None: calls.append((len(jobs), procs))
                        or encode(jobs, dst, procs, bar))
    records = [rec(f"q{i}", "a" * (i % 5 + 1)) for i in range(40)]
    path = parquet(tmp_path / "train.parquet", records, row_group_size=5)
    assert parquet_shards(str(path), 3) == ([(0, 3, 0), (3, 6, 15), (6, 8, 30)], 40)
    want, _ = build_dataset(data_small_tokenizer, str(path), 64, cache_dir=tmp_path / "c0")
    assert calls.pop() == (1, 1)  # small: one process
    monkeypatch.setattr(dataset_mod, "AUTO_SPLIT_BYTES", 1)
    monkeypatch.setattr(dataset_mod.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    got, _ = build_dataset(data_small_tokenizer, str(path), 64, cache_dir=tmp_path / "c1")
    assert calls.pop() == (3, 3) and got["input_ids"] == want["input_ids"] and got["labels"] == want["labels"]
    one = parquet(tmp_path / "one.parquet", records)
    assert parquet_shards(str(one), 3) == ([None], 40)
    got, _ = build_dataset(data_small_tokenizer, str(one), 64, num_proc=2, cache_dir=tmp_path / "c2")
    assert calls.pop() == (1, 2) and got["input_ids"] == want["input_ids"]
