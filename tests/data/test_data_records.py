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
    {"id": 7, "messages": [{"role": "developer", "content": DEFAULT_SYSTEM}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello."}]},  # OpenAI's newer name for system
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


@pytest.mark.parametrize("damage", ["arrow file missing", "no dataset_info.json"])
def test_damaged_datasets_dir_is_a_data_error(tmp_path, damage):
    """datasets' own exception was a traceback out of `qwen-ft train` (which reports DataErrors in one line)."""
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "ds"
    datasets.Dataset.from_list([GOOD]).save_to_disk(str(d))
    for f in d.glob("*.arrow") if damage == "arrow file missing" else [d / "dataset_info.json"]:
        f.unlink()
    if damage == "no dataset_info.json":
        (d / "dataset_dict.json").write_text("{}")  # (read as a DatasetDict dir, which it is not)
    with pytest.raises(DataError) as e:
        load_records(d)
    assert str(e.value).startswith(f"{d}: unreadable datasets dir: datasets.load_from_disk failed: ")


def test_a_llama_factory_data_folder_is_not_read_as_a_datasets_dir(tmp_path):
    """LLaMA-Factory keeps its data files beside dataset_info.json, its registry of them: the folder was taken for
    a `datasets` save_to_disk dir ("datasets.load_from_disk failed: ... neither a Dataset directory nor ...")."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "dataset_info.json").write_text(json.dumps({"my_chat": {"file_name": "my_chat.jsonl"}}))
    (d / "my_chat.jsonl").write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(DataError) as e:
        load_records(d)
    assert str(e.value).startswith(f"{d}: not a data file: the directory holds dataset_info.json but no state.json: a "
                                   "LLaMA-Factory data folder")
    assert len(load_records(f"{d}/*.jsonl")) == 1  # (its files, named, read)


def test_an_empty_system_column_is_the_default_prompt():
    """LLaMA-Factory reads an empty `system` column as its default prompt (exports fill it on every row): it trained
    an empty system prompt that chat and the server never show. A system turn of empty text stays empty."""
    for rec in ({"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "system": "", "history": []},
                {"system": "", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}):
        assert normalize_record(rec)["system"] == "You are a helpful assistant."
    turn = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "q"},
                         {"role": "assistant", "content": "a"}]}
    assert normalize_record(turn)["system"] == ""
    assert normalize_record({"system": " ", **GOOD})["system"] == " "  # (only the empty string: LLaMA-Factory's `or`)


def test_a_record_without_turns_names_its_keys(tmp_path):
    """{"data": [...]} around the records said only that the record had neither key."""
    p = tmp_path / "wrapped.json"
    p.write_text(json.dumps({"data": [GOOD]}))
    with pytest.raises(DataError) as e:
        load_records(p)
    assert str(e.value) == (f"{p}, record 1, line 1: no conversations: the record has neither 'conversations' nor "
                            "'messages' (nor the Alpaca 'instruction' / 'output'); its keys: 'data'")



@pytest.mark.parametrize("record, said", [
    ({"messages": None}, "'messages' is null"),
    ({"id": 1, "conversations": None, "messages": None}, "'conversations' and 'messages' are null"),
])
def test_a_record_with_null_turns_says_null(tmp_path, record, said):
    """{"messages": null} said that the record had neither 'conversations' nor 'messages', its keys: 'messages'."""
    p = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(DataError) as e:
        load_records(p)
    assert str(e.value) == f"{p}, record 1, line 1: no conversations: {said}; give the turns as a non-empty list"

# -- bad input: each case names the file, the record (and line) and the cause ----------------------------

def bad(tmp_path, record, name="d.jsonl"):
    return write_jsonl(tmp_path / name, [GOOD, GOOD, record])


@pytest.mark.parametrize("record, cause", [
    ({"id": 1, "body": "no turns"}, "no conversations"),
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
    assert str(path) in msg and "record 3" in msg and "line 3" in msg and cause in msg
    assert e.value.reason == cause and e.value.index == 2 and e.value.line == 3
    assert isinstance(e.value, ValueError)


def test_invalid_record_in_json_array_names_index_and_line(tmp_path):
    path = write_json(tmp_path / "d.json", [GOOD, {"conversations": [U]}])
    with pytest.raises(DataError, match=r"d\.json, record 2, line \d+: no assistant turn"):
        load_records(path)


def test_file_missing(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError) as e:
        load_records(missing)
    assert str(e.value) == f"{missing}: no such file"  # once, not "file not found: no such file"
    # the command-line flag that gave the path, named before it (as the trainer's "--data_path X: no such file")
    with pytest.raises(DataError) as e:
        load_records(missing, flag="--data")
    assert str(e.value) == f"--data {missing}: no such file" and e.value.flag == "--data"


def test_flag_survives_pickle_and_json(tmp_path):
    import pickle

    err = DataError("no assistant turn", path="d.json", index=2, line=3).given_by("--eval-data")
    assert str(err) == "--eval-data d.json, record 3, line 3: no assistant turn"
    for copy in (pickle.loads(pickle.dumps(err)), DataError.from_json(err.to_json())):
        assert str(copy) == str(err) and copy.flag == "--eval-data"
    assert err.given_by("--other") is err  # the first flag named stays


def test_invalid_json_has_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  ' + json.dumps(GOOD) + ',\n  {"conversations": [}\n]\n')
    with pytest.raises(DataError) as e:
        load_records(path)
    assert "invalid JSON" in str(e.value) and "line 3 column" in str(e.value) and "record 2" in str(e.value)


def test_jsonl_one_broken_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"conversations": [\n' + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError) as e:
        load_records(path)
    assert e.value.reason == "invalid JSON" and e.value.line == 3 and e.value.index == 1
    assert "record 2, line 3" in str(e.value)


def test_jsonl_error_column_is_on_the_broken_line(tmp_path):
    # a line cut short (a crashed writer) said "column 1": json counted the column on the empty text after the newline
    cut = '{"conversations": [{"from": "user", "value": "Hi"}'
    for end in ("\n", "\r\n", ""):
        path = tmp_path / "d.jsonl"
        path.write_text(json.dumps(GOOD) + "\n" + cut + end, newline="")
        with pytest.raises(DataError) as e:
            load_records(path)
        assert str(e.value).endswith(f"record 2, line 2: invalid JSON: Expecting ',' delimiter at line 2 column "
                                     f"{len(cut) + 1}"), (end, str(e.value))


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_errors_say_at_once(tmp_path, suffix):
    # json's own words end in "at": the message read "Unterminated string starting at at line 1 ..."
    path = tmp_path / f"d{suffix}"
    path.write_text('{"conversations": "ab\n')
    with pytest.raises(DataError) as e:
        load_records(path)
    assert "Unterminated string starting at line 1 column 19" in str(e.value) and " at at " not in str(e.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_raw_control_characters_in_strings_are_read_as_written(tmp_path, suffix):
    """A tab (or, in a JSON array, a line break) typed inside a string, as hand-edited and some exported files
    have: the official finetune.py reads the data with json.load(strict=False), which takes them as the characters
    they are (QwenLM/Qwen issue 310's traceback shows the call); they were refused here."""
    rec = '{"conversations": [{"from": "user", "value": "a\tb"}, {"from": "assistant", "value": "c%sd"}]}'
    text = rec % ("\t" if suffix == ".jsonl" else "\n")
    path = tmp_path / f"d{suffix}"
    path.write_text(text + "\n" if suffix == ".jsonl" else f"[{text}]\n")
    (got,) = load_records(path)
    values = [m["content"] for m in got["messages"]]
    assert values == ["a\tb", "c\td" if suffix == ".jsonl" else "c\nd"], got


def test_a_bom_inside_a_jsonl_file_is_named(tmp_path):
    # `cat a.jsonl b.jsonl`, b.jsonl starting with a BOM: only "Expecting value at line 2 column 1", cause unseen
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\ufeff" + json.dumps(GOOD) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records(path)
    assert "record 2, line 2: invalid JSON" in str(e.value) and "byte order mark" in str(e.value)


def test_records_separated_by_a_carriage_return_alone_are_named(tmp_path):
    # (old Mac line ends: the whole file is one line, and the error was only "Extra data at line 1 column ...")
    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\r" + json.dumps(GOOD) + "\r").encode())
    with pytest.raises(DataError) as e:
        load_records(path)
    assert "record 1, line 1: invalid JSON: Extra data" in str(e.value), str(e.value)
    assert "carriage return alone" in str(e.value) and "tr '\\r' '\\n'" in str(e.value), str(e.value)
    path.write_bytes((json.dumps(GOOD) + "\r\n" + json.dumps(GOOD) + "\r\n").encode())  # CRLF reads as before
    assert len(load_records(path)) == 2


def test_a_json_array_saved_as_jsonl_is_named_as_such(tmp_path):
    # (it was only "Expecting value at line 1 column 1")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps([GOOD, GOOD], indent=1))
    with pytest.raises(DataError) as e:
        load_records(path)
    assert "record 1, line 1" in str(e.value) and "opens a JSON array" in str(e.value)
    assert "name it .json" in str(e.value)
    path.write_text(json.dumps(GOOD) + "\n[\n")  # a later line that opens an array is only a broken line
    with pytest.raises(DataError) as e:
        load_records(path)
    assert "record 2, line 2" in str(e.value) and "JSON array" not in str(e.value)


def test_records_spread_over_several_lines_are_named_as_such(tmp_path):
    # pretty-printed records (`jq .`, json.dump(indent=2) a record): it was only "Expecting property name enclosed
    # in double quotes at line 1 column 2", on a line that holds "{"
    for name in ("d.jsonl", "d.json"):  # (a .json file that is no array is read one object a line too)
        path = tmp_path / name
        path.write_text(json.dumps(GOOD, indent=2) + "\n" + json.dumps(GOOD, indent=2) + "\n")
        with pytest.raises(DataError) as e:
            load_records(path)
        assert str(e.value).startswith(f"{path}, record 1, line 1: invalid JSON: Expecting property name"), e.value
        assert str(e.value).endswith("(the line holds only '{': a record spread over several lines, as "
                                     "pretty-printed JSON is? Each record must be on one line: `jq -c . FILE > "
                                     "FILE.jsonl`)"), e.value
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD)[:30] + "\n")  # a line cut short is not that
    with pytest.raises(DataError) as e:
        load_records(path)
    assert "record 2, line 2: invalid JSON" in str(e.value) and "several lines" not in str(e.value)


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

    from _helpers import ROOT

    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    code = (
        "import sys; sys.modules['datasets'] = None\n"
        "from finetune.tokenization import QWenTokenizer, SMALL_VOCAB\n"
        "from finetune.data import load_records, encode_conversation, ChatCollator\n"
        f"recs = load_records({str(path)!r})\n"
        "out = encode_conversation(QWenTokenizer(str(SMALL_VOCAB)), recs[0])\n"
        "assert out['input_ids'] and len(out['labels']) == len(out['input_ids'])\n"
    )
    root = ROOT
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


# -- hostile files (issue 14, item 15): each one DataError naming the file and the record -------------------

def test_messages_count_records_from_one_like_lines(tmp_path):
    # the third record, on the third line, is "record 3, line 3"; .index stays the 0-based position
    path = bad(tmp_path, {"conversations": [U]})
    with pytest.raises(DataError) as e:
        load_records(path)
    assert f"{path}, record 3, line 3: no assistant turn" in str(e.value) and e.value.index == 2
    # turns too: the first turn is turn 1
    with pytest.raises(DataError, match="turn 1 has no 'from'"):
        normalize_record({"conversations": [{"value": "x"}, A]})


@pytest.mark.parametrize("codec, name", [
    ("utf-16", "UTF-16 (with a byte order mark)"), ("utf-16-le", "UTF-16 little-endian"),
    ("utf-16-be", "UTF-16 big-endian"), ("utf-32", "UTF-32 (with a byte order mark)"),
    ("utf-32-le", "UTF-32 little-endian"), ("utf-32-be", "UTF-32 big-endian"),
])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_utf16_and_utf32_files_are_named(tmp_path, codec, name, suffix):
    path = tmp_path / f"d{suffix}"
    text = json.dumps([GOOD]) if suffix == ".json" else json.dumps(GOOD) + "\n"
    path.write_bytes(text.encode(codec))
    with pytest.raises(DataError) as e:
        load_records(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: not UTF-8: the file is {name}") and "must be UTF-8" in msg and "iconv" in msg


def _binary_forms(path, records):
    """The files data arrives in besides JSON / JSONL / Parquet (name -> the path written)."""
    import bz2
    import gzip
    import lzma
    import zipfile

    import pyarrow as pa
    import pyarrow.feather

    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    table = pa.Table.from_pylist(records)
    out = {}
    for name, write in (("gzip-compressed", lambda f: f.write_bytes(gzip.compress(text))),
                        ("bzip2-compressed", lambda f: f.write_bytes(bz2.compress(text))),
                        ("xz-compressed", lambda f: f.write_bytes(lzma.compress(text))),
                        ("a zip archive", lambda f: zipfile.ZipFile(f, "w").writestr("d.jsonl", text)),
                        ("an Arrow (Feather) file", lambda f: pyarrow.feather.write_feather(table, str(f))),
                        ("an Arrow stream", lambda f: f.write_bytes(_arrow_stream(table)))):
        f = path / f"{len(out)}.jsonl"  # (the suffix a user keeps: the content tells)
        write(f)
        out[name] = f
    return out


def _arrow_stream(table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:  # what a `datasets` save_to_disk shard holds
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def test_arrow_and_compressed_files_are_named_with_a_way_to_jsonl(tmp_path):
    """A `datasets` dir's Arrow shard or a .jsonl.gz said "not UTF-8: invalid UTF-8 bytes b'\\xc4' at byte offset
    212", naming no cause; the conversion the message gives works. (Parquet is read: test_data_parquet.py.)"""
    import subprocess
    import sys

    for name, path in _binary_forms(tmp_path, [GOOD, GOOD]).items():
        with pytest.raises(DataError) as e:
            load_records(path)
        assert str(e.value).startswith(f"{path}: not a JSON / JSONL file: the file is {name}"), str(e.value)
        if "python -c" in str(e.value):  # the command as given, FILE named
            code = str(e.value).split('python -c "', 1)[1].rsplit('"', 1)[0].replace("FILE", str(path))
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
            assert len(load_records(f"{path}.jsonl")) == 2, name


def test_utf8_bom_is_accepted(tmp_path):
    for name, text in (("a.json", json.dumps([GOOD])), ("b.jsonl", json.dumps(GOOD) + "\n")):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert len(load_records(path)) == 1


def test_invalid_utf8_in_json_array_names_the_record(tmp_path):
    path = tmp_path / "d.json"
    body = json.dumps([GOOD, GOOD, {"conversations": [U, {"from": "assistant", "value": "café"}]}], indent=1,
                      ensure_ascii=False)
    data = body.encode().replace("café".encode(), b"caf\xe9")  # Latin-1 é
    path.write_bytes(data)
    with pytest.raises(DataError) as e:
        load_records(path)
    assert e.value.reason == "not UTF-8" and e.value.index == 2 and e.value.line is not None
    offset = data.index(b"\xe9")
    assert f"{path}, record 3, line {e.value.line}: not UTF-8: invalid UTF-8 bytes b'\\xe9' at byte offset " \
           f"{offset}" in str(e.value)
    # a record error like any other: --skip_invalid counts it and keeps the rest
    recs = load_records(path, skip_invalid=True)
    assert len(recs) == 2 and recs.report.reasons() == {"not UTF-8": 1}


def test_invalid_utf8_in_jsonl_names_record_line_and_offset(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(GOOD).encode() + b"\n"
    path.write_bytes(good + b"\n" + b'{"conversations": [{"from": "user", "value": "\xff"}]}\n')
    with pytest.raises(DataError) as e:
        load_records(path)
    offset = len(good) + 1 + b'{"conversations": [{"from": "user", "value": "'.__len__()
    assert str(e.value) == (f"{path}, record 2, line 3: not UTF-8: invalid UTF-8 bytes b'\\xff' at byte offset "
                            f"{offset} (column {offset - len(good)} of the line)")


@pytest.mark.parametrize("form", ["json", "jsonl"])
def test_json_nested_100000_levels_is_a_data_error(tmp_path, form):
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / f"d.{form}"
    if form == "json":
        path.write_text("[" + json.dumps(GOOD) + ",\n" + deep + "]")
    else:
        path.write_text(json.dumps(GOOD) + "\n" + '{"conversations": ' + deep + "}\n")
    with pytest.raises(DataError) as e:
        load_records(path)
    assert f"{path}, record 2, line 2: invalid JSON: nested too deeply" in str(e.value)


@pytest.mark.parametrize("form", ["json", "jsonl"])
def test_5000_digit_id_is_a_data_error(tmp_path, form):
    rec = '{"id": ' + "7" * 5000 + ', "conversations": [{"from": "user", "value": "Hi"}, ' \
          '{"from": "assistant", "value": "Hello."}]}'
    path = tmp_path / f"d.{form}"
    path.write_text("[" + json.dumps(GOOD) + ",\n" + rec + "]" if form == "json" else json.dumps(GOOD) + "\n" + rec)
    with pytest.raises(DataError) as e:
        load_records(path)
    assert f"{path}, record 2, line 2: invalid JSON: a number too long to read" in str(e.value)
    assert "4300 digits" in str(e.value)


@pytest.mark.parametrize("raw, reason, detail", [
    ('{"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello."}], '
     '"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]}',
     "both 'conversations' and 'messages'", "keep one"),
    ('{"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello."}], '
     '"conversations": [{"from": "user", "value": "Bye"}, {"from": "assistant", "value": "Bye."}]}',
     "duplicate key", "key 'conversations' appears twice"),
    ('{"conversations": [{"from": "user", "role": "assistant", "value": "Hi"}, {"from": "assistant", "value": "x"}]}',
     "both 'from' and 'role'", "turn 1 has 'from' 'user' and 'role' 'assistant'"),
    ('{"conversations": [{"from": "user", "value": "Hi", "content": "Ho"}, {"from": "assistant", "value": "x"}]}',
     "both 'value' and 'content'", "turn 1 has 'value' 'Hi' and 'content' 'Ho'"),
    ('{"conversations": [{"from": "user", "value": "Hi \\ud800 there"}, {"from": "assistant", "value": "x"}]}',
     "lone surrogate", "turn 1 (user) holds U+D800 at character 4"),
    ('{"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "x\\udc00"}]}',
     "lone surrogate", "turn 2 (assistant) holds U+DC00"),
    ('{"system": "\\ud83d", "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "x"}]}',
     "lone surrogate", "the top-level 'system' holds U+D83D"),
])
@pytest.mark.parametrize("form", ["json", "jsonl"])
def test_ambiguous_records_are_refused(tmp_path, raw, reason, detail, form):
    path = tmp_path / f"d.{form}"
    path.write_text("[" + json.dumps(GOOD) + ",\n" + raw + "]" if form == "json" else json.dumps(GOOD) + "\n" + raw)
    with pytest.raises(DataError) as e:
        load_records(path)
    assert e.value.reason == reason and e.value.index == 1 and e.value.line == 2
    assert str(e.value).startswith(f"{path}, record 2, line 2: {reason}: ") and detail in str(e.value)
    # a record error: skippable and counted
    recs = load_records(path, skip_invalid=True)
    assert len(recs) == 1 and recs.report.reasons() == {reason: 1}


def test_synonyms_that_agree_and_surrogate_pairs_are_fine():
    rec = normalize_record({"conversations": [{"from": "human", "role": "user", "value": "a 😀", "content": "a 😀"},
                                              {"from": "gpt", "value": "b"}]})
    assert rec["messages"][0] == {"role": "user", "content": "a 😀"}
    assert normalize_record(json.loads('{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}, '
                                       '{"role": "assistant", "content": "ok"}]}'))["messages"][0]["content"] == "😀"


def test_datasets_dir_with_both_forms_in_columns(tmp_path):
    # a dataset that mixes the forms has both columns, null where a row uses the other form: not a conflict
    datasets = pytest.importorskip("datasets")
    rows = [{"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}], "messages": None},
            {"conversations": None, "messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    recs = load_records(tmp_path / "ds")
    assert [r["messages"][1]["content"] for r in recs] == ["a", "a2"]


def test_in_memory_id_too_long_to_convert():
    with pytest.raises(DataError, match="invalid id: an id too long to convert"):
        normalize_record({"id": 10 ** 5000, "conversations": [U, A]})
    assert normalize_record({"id": 12, "conversations": [U, A]})["id"] == "12"


def test_alpaca_records_become_conversations():
    """The Alpaca form LLaMA-Factory reads: the user turn is the instruction, then a newline and the input when
    there is one; `history` pairs come first; `system` and `id` carry over."""
    rec = normalize_record({"id": 7, "system": "Be brief.", "instruction": "Translate", "input": "bonjour",
                            "output": "hello", "history": [["Hi", "Hello."]]})
    assert rec == {"id": "7", "system": "Be brief.", "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Translate\nbonjour"}, {"role": "assistant", "content": "hello"}]}
    plain = normalize_record({"instruction": "Say hi", "input": "", "output": "hi"})
    assert plain["messages"] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    assert plain["system"] == DEFAULT_SYSTEM
    assert normalize_record(plain) == plain


@pytest.mark.parametrize("record, reason, detail", [
    ({"instruction": "x"}, "invalid alpaca record", "'output' is missing or empty"),
    ({"instruction": "  ", "output": "y"}, "invalid alpaca record", "'instruction' is blank"),
    ({"instruction": "x", "input": 3, "output": "y"}, "invalid alpaca record",
     "'input' must be a string, got a number"),
    ({"instruction": "x", "output": "y", "history": [["q"]]}, "invalid alpaca record", "'history' item 1"),
    ({"instruction": "x", "output": "y", "messages": [{"role": "user", "content": "q"}]},
     "both 'messages' and Alpaca fields", "keep one form"),
    ({"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]},
     "invalid weight", "turn 1 (user) has weight 1, but a prompt turn is not trained on its own: --train_on_prompt"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
     "invalid weight", "weight 0.5; it must be 0"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
     "no trained assistant turn", "every assistant turn has weight 0"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "a"}]},
     "invalid value", "turn 1 (user)[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
      "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0},
                   {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
     "invalid weight", "not supported in tool / function-call conversations"),
])
def test_alpaca_weight_and_content_part_errors_name_the_field(record, reason, detail):
    with pytest.raises(DataError) as e:
        normalize_record(record)
    assert e.value.reason == reason and detail in str(e.value), str(e.value)


def test_openai_fine_tuning_records_weights_and_text_parts():
    """OpenAI's chat fine-tuning JSONL: content as text parts (joined, as the server joins them) and assistant
    "weight" 0 kept as context (normalised as "weight": 0; 1 is the default and not written)."""
    rec = normalize_record({"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "kind."}]},
        {"role": "user", "content": [{"type": "text", "text": "q1"}]},
        {"role": "assistant", "content": "a1", "weight": 0},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": [{"type": "text", "text": "a2"}], "weight": 1}]})
    assert rec["system"] == "Be kind."
    assert rec["messages"] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "weight": 0},
                               {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    assert normalize_record(rec) == rec
