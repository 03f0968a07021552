"""Reading and validating chat records: accepted forms, and one clear DataError per kind of bad input."""

import json

import pytest

from finetune.data import DEFAULT_SYSTEM, DataError, load_records, normalize_record

U = {"from": "user", "value": "Hi"}
A = {"from": "assistant", "value": "Hello."}
GOOD = {"id": 7, "conversations": [U, A]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


# -- accepted forms ---------------------------------------------------------------------------------------

NORMAL = {"id": "7", "system": DEFAULT_SYSTEM,
          "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


@pytest.mark.parametrize("record", [
    {"id": 7, "conversations": [U, A]},  # official Qwen form
    {"id": 7, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},  # ShareGPT
    {"id": 7, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},  # OpenAI
    {"id": 7, "conversations": [{"from": "system", "value": DEFAULT_SYSTEM}, U, A]},  # system turn
    {"id": 7, "system": DEFAULT_SYSTEM, "conversations": [U, A]},  # top-level system
    NORMAL,  # the normalised form itself
])
def test_accepted_forms_normalise_alike(record):
    assert normalize_record(record) == NORMAL


def test_custom_system_and_multi_turn():
    rec = normalize_record({"messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]})
    assert rec["system"] == "Be brief." and rec["id"] is None
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant"] * 2


def test_json_array_and_jsonl_read_the_same(tmp_path):
    recs = [GOOD, {"messages": [{"role": "user", "content": "中文?"}, {"role": "assistant", "content": "是的。"}]}]
    a = load_records(write_json(tmp_path / "a.json", recs))
    b = load_records(write_jsonl(tmp_path / "b.jsonl", recs))
    c = load_records(write_jsonl(tmp_path / "c.json", recs))  # JSONL content under a .json name
    assert a == b == c and len(a) == 2
    assert a.report.read == 2 and a.report.skipped == 0


def test_datasets_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"id": "1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    recs = load_records(tmp_path / "ds")
    assert recs[0]["messages"][1]["content"] == "a"


# -- bad input: each case names the file, the record (and line) and the cause ----------------------------

def bad(tmp_path, record, name="d.jsonl"):
    return write_jsonl(tmp_path / name, [GOOD, GOOD, record])


@pytest.mark.parametrize("record, cause", [
    ({"id": 1, "text": "no turns"}, "no conversations"),
    ({"conversations": []}, "no conversations"),
    ({"conversations": [{"from": "bot", "value": "x"}, A]}, "unknown role"),
    ({"conversations": [{"from": "user", "value": 3}, A]}, "invalid value"),
    ({"conversations": [{"from": "user", "value": None}, A]}, "invalid value"),
    ({"conversations": [U, {"from": "assistant", "value": ""}]}, "empty value"),
    ({"conversations": [U, {"from": "assistant", "value": "  \n"}]}, "empty value"),
    ({"conversations": [U]}, "no assistant turn"),
    ({"conversations": [U, U, A]}, "consecutive turns of the same role"),
    ({"conversations": [U, A, A]}, "consecutive turns of the same role"),
    ({"conversations": [U, {"from": "system", "value": "s"}, A]}, "system turn not first"),
    ({"conversations": [A, U]}, "starts with an assistant turn"),
    ({"conversations": [{"from": "system", "value": "s"}, A, U]}, "starts with an assistant turn"),
    ({"conversations": [{"value": "x"}, A]}, "invalid turn"),
    ("not an object", "record is not an object"),
])
def test_invalid_record(tmp_path, record, cause):
    path = bad(tmp_path, record)
    with pytest.raises(DataError) as e:
        load_records(path)
    msg = str(e.value)
    assert str(path) in msg and "record 2" in msg and "line 3" in msg and cause in msg
    assert e.value.reason == cause and e.value.index == 2 and e.value.line == 3
    assert isinstance(e.value, ValueError)


def test_invalid_record_in_json_array_names_index_and_line(tmp_path):
    path = write_json(tmp_path / "d.json", [GOOD, {"conversations": [U]}])
    with pytest.raises(DataError, match=r"d\.json, record 1, line \d+: no assistant turn"):
        load_records(path)


def test_file_missing(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json.*file not found"):
        load_records(tmp_path / "nope.json")


def test_invalid_json_has_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  ' + json.dumps(GOOD) + ',\n  {"conversations": [}\n]\n')
    with pytest.raises(DataError) as e:
        load_records(path)
    assert "invalid JSON" in str(e.value) and "line 3 column" in str(e.value) and "record 1" in str(e.value)


def test_jsonl_one_broken_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"conversations": [\n' + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError) as e:
        load_records(path)
    assert e.value.reason == "invalid JSON" and e.value.line == 3 and e.value.index == 1
    assert "record 1, line 3" in str(e.value)


def test_skip_invalid_counts_every_skip(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(GOOD), "{broken", json.dumps({"conversations": [U]}), json.dumps(GOOD),
             json.dumps({"conversations": [{"from": "bot", "value": "x"}, A]})]
    path.write_text("\n".join(lines) + "\n")
    recs = load_records(path, skip_invalid=True)
    assert len(recs) == 2
    rep = recs.report
    assert (rep.read, rep.used, rep.skipped) == (5, 2, 3)
    assert rep.reasons() == {"invalid JSON": 1, "no assistant turn": 1, "unknown role": 1}
    assert [e.line for e in rep.errors] == [2, 3, 5]
    printed = capsys.readouterr().err
    assert "3 skipped" in printed and "unknown role" in printed


def test_zero_usable_records_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [U]}])
    with pytest.raises(DataError, match="no usable records"):
        load_records(path, skip_invalid=True)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no usable records"):
        load_records(empty)
    with pytest.raises(DataError, match="no usable records"):
        load_records(write_json(tmp_path / "e.json", []))


def test_data_error_survives_pickling():
    import pickle

    e = DataError("unknown role", "turn 1", path="f.jsonl", index=3, line=4)
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e) and e2.line == 4 and e2.reason == "unknown role"


def test_works_without_datasets_installed(tmp_path):
    # The GPU machine has no `datasets`: importing the package, reading and encoding must not need it.
    import subprocess
    import sys
    from pathlib import Path

    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    code = (
        "import sys; sys.modules['datasets'] = None\n"
        "from finetune.tokenization import QWenTokenizer, SMALL_VOCAB\n"
        "from finetune.data import load_records, encode_conversation, ChatCollator\n"
        f"recs = load_records({str(path)!r})\n"
        "out = encode_conversation(QWenTokenizer(str(SMALL_VOCAB)), recs[0])\n"
        "assert out['input_ids'] and len(out['labels']) == len(out['input_ids'])\n"
    )
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_jsonl_shards_cover_the_file_with_true_positions(tmp_path, n):
    from finetune.data.records import iter_records, jsonl_shards

    lines = []
    for i in range(20):
        lines.append(json.dumps({"id": i, "conversations": [U, A]} if i % 5 else {"id": i, "conversations": [U]}))
        if i % 4 == 0:
            lines.append("")  # blank lines: line numbers and record indices part ways
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    whole = [(r and r["id"], e and (e.index, e.line)) for r, e in iter_records(path, skip_invalid=True)]
    shards = jsonl_shards(str(path), n)
    assert len(shards) <= n and shards[0][0] == 0 and shards[-1][1] is None
    parts = [(r and r["id"], e and (e.index, e.line))
             for sh in shards for r, e in iter_records(path, skip_invalid=True, shard=sh)]
    assert parts == whole and len(whole) == 20
    assert [e for _, e in whole if e] == [(0, 1), (5, 8), (10, 14), (15, 20)]
