"""Data split over several files: a quoted glob, a comma-separated list, a plain directory of .json/.jsonl/.parquet
files.

Records come in a deterministic order (a glob's or a directory's files sorted by name, a list's in its order, then
each file's records in order), errors name the file and the record's index in that file, and the data cache key
covers every file's content.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from finetune.data import DataError, build_dataset, load_records
from finetune.data.records import data_sources
from finetune.evaluate import load_eval_records

ROOT = Path(__file__).resolve().parents[2]


def rec(q: str, a: str = "ok") -> dict:
    return {"id": q, "conversations": [{"from": "user", "value": q}, {"from": "assistant", "value": a}]}


def jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def shards(tmp_path):
    """data/train-0000{1,2,3}.jsonl written out of order, and a README beside them."""
    d = tmp_path / "data"
    jsonl(d / "train-00002.jsonl", [rec("c"), rec("d")])
    jsonl(d / "train-00001.jsonl", [rec("a"), rec("b")])
    (d / "train-00003.json").write_text(json.dumps([rec("e")]))
    (d / "README.md").write_text("not data")
    return d


def ids(records) -> list:
    return [r["id"] for r in records]


def test_a_glob_reads_its_files_sorted_by_name(shards, data_small_tokenizer):
    spec = str(shards / "train-*.json*")
    assert [Path(f).name for f in data_sources(spec)] == ["train-00001.jsonl", "train-00002.jsonl", "train-00003.json"]
    assert ids(load_records(spec)) == ids(load_eval_records(spec)) == ["a", "b", "c", "d", "e"]
    ds, summary = build_dataset(data_small_tokenizer, spec, 64, cache_dir=shards.parent / "cache", progress=False)
    single = [build_dataset(data_small_tokenizer, str(f), 64, cache_dir=shards.parent / "cache", progress=False)[0]
              for f in data_sources(spec)]
    assert ds["input_ids"] == [row for d in single for row in d["input_ids"]]  # each file's rows, in order
    two, _ = build_dataset(data_small_tokenizer, spec, 64, num_proc=2, cache_dir=shards.parent / "cache2",
                           progress=False)
    assert two["input_ids"] == ds["input_ids"]  # the same rows from two processes
    assert summary.records_read == 5 and summary.source == spec


def test_a_comma_separated_list_reads_in_the_order_given(shards):
    spec = f"{shards / 'train-00002.jsonl'}, {shards / 'train-00001.jsonl'}"  # (spaces after commas are fine)
    assert ids(load_records(spec)) == ["c", "d", "a", "b"]
    # a list entry may itself be a glob
    assert ids(load_records(f"{shards / 'train-00003.json'},{shards / 'train-0000[12].jsonl'}")) == list("eabcd")


def test_a_plain_directory_reads_its_json_and_jsonl_files_sorted(shards, data_small_tokenizer):
    assert ids(load_records(shards)) == list("abcde")  # README.md is not data
    _, summary = build_dataset(data_small_tokenizer, str(shards), 64, cache_dir=shards.parent / "cache",
                               progress=False)
    assert summary.records_read == 5


def test_a_broken_link_in_a_data_directory_is_named_not_left_out(shards, data_small_tokenizer):
    # a plain directory listed only what is_file() saw, so the link's file was dropped without a word (a glob named it)
    (shards / "train-00004.jsonl").symlink_to(shards.parent / "gone.jsonl")
    with pytest.raises(DataError) as e:
        load_records(shards, flag="--data_path")
    assert str(e.value) == (f"--data_path {shards / 'train-00004.jsonl'}: no such file: a broken symbolic link to "
                            f"{shards.parent / 'gone.jsonl'}")
    # the training path named the link's missing target, not the file of the directory at fault
    with pytest.raises(DataError) as e:
        build_dataset(data_small_tokenizer, str(shards), 64, cache_dir=shards.parent / "cache", progress=False)
    assert str(e.value).startswith(f"{shards / 'train-00004.jsonl'}: no such file: a broken symbolic link to "), e.value


def test_a_directory_with_data_it_would_not_read_is_refused(shards, data_small_tokenizer):
    """A compressed data file and a subdirectory of data files were left out of a directory's records without a
    word (a compressed file named alone is refused); hidden entries (an editor's, Jupyter's copies) stay ignored."""
    import gzip

    (shards / ".ipynb_checkpoints").mkdir()
    (shards / ".ipynb_checkpoints" / "train-00001-checkpoint.jsonl").write_text("{}\n")
    (shards / "tokenized").mkdir()  # a `datasets` save_to_disk dir beside the files: no data file of this reading
    for name in ("state.json", "dataset_info.json"):
        (shards / "tokenized" / name).write_text("{}")
    assert ids(load_records(shards)) == list("abcde")
    (shards / "more.jsonl.gz").write_bytes(gzip.compress(b"{}\n"))
    (shards / "sub").mkdir()
    (shards / "sub" / "c.jsonl").write_text("{}\n")
    for call in (lambda: load_records(shards),
                 lambda: build_dataset(data_small_tokenizer, str(shards), 64, cache_dir=shards.parent / "cache",
                                       progress=False)):
        with pytest.raises(DataError) as e:
            call()
        assert str(e.value) == (f"{shards}: data left out: the directory holds data files it would not read: "
                                "more.jsonl.gz (compressed: decompress it first), sub/ (a subdirectory: a directory's "
                                "own files are read, not its subdirectories'); name the files to train on instead (a "
                                "quoted glob such as 'DIR/**/*.jsonl', or a comma-separated list)")
    assert len(load_records(f"{shards}/*.jsonl")) == 4


def test_a_directory_reads_its_parquet_files_and_refuses_arrow_ones(shards, data_small_tokenizer):
    """The hub's Parquet shards beside a directory's .jsonl files are read with them, in name order; Arrow files
    were left out of its records without a word (one named alone is refused, naming its format)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([rec("c2"), rec("c3")]), shards / "train-00002b.parquet")
    assert ids(load_records(shards)) == ["a", "b", "c", "d", "c2", "c3", "e"]
    _, summary = build_dataset(data_small_tokenizer, str(shards), 64, cache_dir=shards.parent / "cache",
                               progress=False)
    assert summary.records_read == 7
    (shards / "extra.arrow").write_bytes(b"ARROW1")
    with pytest.raises(DataError, match=r"extra\.arrow \(Arrow: convert it to JSONL first\)"):
        load_records(shards)


def test_a_pipe_is_named_as_such_not_as_missing(tmp_path, data_small_tokenizer):
    # `-d <(zcat data.jsonl.gz)`: the pipe exists, and "no such file" sent the user looking for a missing path
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError) as e:
        load_records(fifo, flag="--data_path")
    assert str(e.value).startswith(f"--data_path {fifo}: not a data file: not a regular file (a pipe")
    # as the shell names one (/dev/fd/63, a link to /proc/PID/fd/pipe:[INODE]): the training path resolved the link
    # and read the target's brackets as a glob, "the pattern matches no file"
    pipe = tmp_path / "pipe:[947402]"
    os.mkfifo(pipe)
    (tmp_path / "63").symlink_to(pipe)
    with pytest.raises(DataError) as e:
        build_dataset(data_small_tokenizer, str(tmp_path / "63"), 64, cache_dir=tmp_path / "cache", progress=False)
    assert str(e.value).startswith(f"{tmp_path / '63'}: not a data file: not a regular file (a pipe"), e.value


@contextlib.contextmanager
def unreadable(name: str, mode: int = 0):
    """A data file (or directory holding one) this process may not read: ``mode`` and, as root (who reads
    anything), the effective uid of nobody meanwhile, in a directory of its own that nobody may enter (pytest's
    tmp dirs are root's alone)."""
    d = Path(tempfile.mkdtemp())
    try:
        d.chmod(0o755)
        if name.endswith("/"):
            jsonl(d / name / "data.jsonl", [rec("a")])
            (d / name).chmod(mode)
        else:
            jsonl(d / name, [rec("a")]).chmod(mode)
        if os.geteuid() != 0:
            yield d / name
            return
        import datasets.fingerprint  # noqa: F401  (imported now: nobody may not read root's site-packages)

        os.seteuid(65534)
        try:
            yield d / name
        finally:
            os.seteuid(0)
    finally:
        for sub in d.iterdir():
            sub.chmod(0o755)
        shutil.rmtree(d)


def test_a_file_without_read_permission_is_one_line(data_small_tokenizer):
    # (it was a PermissionError traceback from the first reader)
    with unreadable("data.jsonl") as f:
        with pytest.raises(DataError) as e:
            load_records(f, flag="--data_path")
        assert str(e.value) == f"--data_path {f}: unreadable file: Permission denied"
        with pytest.raises(DataError) as e:
            build_dataset(data_small_tokenizer, str(f.parent), 64, cache_dir=f.parent / "cache", progress=False)
        assert str(e.value) == f"{f}: unreadable file: Permission denied"


def test_a_directory_without_read_permission_is_one_line():
    # mode 0: not even its entries can be looked at; 0o311: entered but not listed (both were PermissionError
    # tracebacks, the first from data_sources in the trainer's preflight)
    for mode in (0, 0o311):
        with unreadable("data/", mode) as d:
            with pytest.raises(DataError) as e:
                data_sources(d)
            assert str(e.value) == f"{d}: unreadable directory: Permission denied"
            with pytest.raises(DataError) as e:
                load_records(d, flag="--data_path")
            assert str(e.value) == f"--data_path {d}: unreadable directory: Permission denied"
            with pytest.raises(DataError, match=f"^{d}: unreadable directory: Permission denied$"):
                load_records(f"{d},{d.parent}/other.jsonl")


def test_a_directory_without_data_files_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError) as e:
        load_records(tmp_path / "empty")
    assert str(e.value) == (f"{tmp_path / 'empty'}: not a data file: a directory that is not a `datasets` "
                            "save_to_disk dir and holds no .json / .jsonl / .ndjson / .parquet files")


def test_an_error_names_its_file_and_its_index_there(shards, data_small_tokenizer):
    jsonl(shards / "train-00002.jsonl", [rec("c"), {"conversations": [{"from": "bot", "value": "x"}]}])
    spec = str(shards / "train-*.jsonl")
    for read in (lambda: load_records(spec), lambda: load_eval_records(spec),
                 lambda: build_dataset(data_small_tokenizer, spec, 64, cache_dir=shards.parent / "cache",
                                       progress=False)):
        with pytest.raises(DataError) as e:
            read()
        msg = str(e.value)
        assert "\n" not in msg and "train-00002.jsonl, record 2, line 2: unknown role" in msg, msg
    # skipped with --skip_invalid: counted, the others kept
    _, summary = build_dataset(data_small_tokenizer, spec, 64, skip_invalid=True, cache_dir=shards.parent / "cache",
                               progress=False, verbose=False)
    assert summary.records_read == 4 and summary.skipped == {"unknown role": 1}


def test_a_record_too_long_is_named_in_its_own_file(shards, data_small_tokenizer):
    jsonl(shards / "train-00002.jsonl", [rec("c"), rec("long " * 200)])
    with pytest.raises(DataError) as e:
        build_dataset(data_small_tokenizer, str(shards / "train-*.jsonl"), 64, cache_dir=shards.parent / "cache",
                      progress=False)
    assert str(e.value).startswith(f"{shards / 'train-00002.jsonl'}, record 2, line 2: prompt longer than max_len")


def test_the_cache_key_covers_every_file(shards, data_small_tokenizer):
    cache = shards.parent / "cache"
    spec = str(shards / "train-*.jsonl")

    def build():
        return build_dataset(data_small_tokenizer, spec, 64, cache_dir=cache, progress=False)

    first, summary1 = build()
    assert build()[0].cache_files == first.cache_files  # unchanged: the cached file is read
    stat = os.stat(shards / "train-00002.jsonl")
    jsonl(shards / "train-00002.jsonl", [rec("c"), rec("D")])  # same size, same mtime: only the content differs
    os.utime(shards / "train-00002.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second, summary2 = build()
    assert second.cache_files != first.cache_files and summary2.content != summary1.content
    assert second["input_ids"][3] != first["input_ids"][3] and second["input_ids"][:3] == first["input_ids"][:3]
    jsonl(shards / "train-00004.jsonl", [rec("f")])  # a new file matching the glob
    assert len(build()[0]) == 5


def test_a_pattern_matching_nothing_is_one_line_naming_it(tmp_path, data_small_tokenizer):
    spec = str(tmp_path / "data" / "*.jsonl")
    for read in (lambda: load_records(spec), lambda: load_eval_records(spec, flag="--data"),
                 lambda: build_dataset(data_small_tokenizer, spec, 64, cache_dir=tmp_path / "cache", progress=False)):
        with pytest.raises(DataError) as e:
            read()
        assert str(e.value).endswith(f"{spec}: no match: the pattern matches no file")
    with pytest.raises(DataError) as e:
        load_eval_records(spec, flag="--data")
    assert str(e.value) == f"--data {spec}: no match: the pattern matches no file"


def test_list_errors_name_the_entry(shards):
    a = shards / "train-00001.jsonl"
    with pytest.raises(DataError) as e:
        load_records(f"{a},{shards / 'missing.jsonl'}")
    assert str(e.value) == f"{shards / 'missing.jsonl'}: no such file"
    with pytest.raises(DataError, match="an empty entry in the comma-separated list"):
        load_records(f"{a},")
    with pytest.raises(DataError, match=r"is named more than once \(its records would be read twice\)"):
        load_records(f"{a},{shards / 'train-*.jsonl'}")


def test_an_existing_name_with_a_comma_or_a_star_is_one_file(tmp_path):
    for name in ("a,b.jsonl", "x*.jsonl"):
        jsonl(tmp_path / name, [rec(name)])
        assert ids(load_records(tmp_path / name)) == [name]


def test_the_trainer_names_the_flag_and_the_pattern(tmp_path, tiny_model_dir, capsys):
    from finetune.train import main

    spec = str(tmp_path / "nothing-*.jsonl")
    rc = main(["--model_name_or_path", str(tiny_model_dir), "--data_path", spec, "--output_dir", str(tmp_path / "o"),
               "--use_cpu", "True", "--report_to", "none"])
    assert rc == 2 and capsys.readouterr().err == f"error: --data_path {spec}: no match: the pattern matches no file\n"


def test_the_trainer_reads_a_glob(tmp_path, tiny_model_dir, shards):
    """A glob through the whole trainer (what run_args.json records too: the pattern as given)."""
    from finetune.train import main

    out = tmp_path / "out"
    rc = main(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(shards / "train-*.jsonl"),
               "--output_dir", str(out), "--use_cpu", "True", "--report_to", "none", "--max_steps", "1",
               "--per_device_train_batch_size", "4", "--save_strategy", "no", "--disable_tqdm", "True",
               "--use_lora", "True", "--model_max_length", "64"])
    assert rc == 0


def test_the_scripts_pass_a_quoted_glob_through_unexpanded(tmp_path, shards):
    """finetune_*.sh forward -d as one word: the trainer, not the shell, expands the pattern."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\n[ "$1" = -c ] && { echo 0; exit 0; }\nfor a in "$@"; do echo "ARG:$a"; done\n')
    fake.chmod(0o755)
    pattern = str(shards / "train-*.jsonl")
    for script in ("finetune_qlora.sh", "finetune_lora.sh", "finetune_full.sh"):
        p = subprocess.run(["bash", str(ROOT / "scripts" / script), "-m", str(tmp_path / "model"), "-d", pattern,
                            "-o", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                           env={**os.environ, "PYTHON": str(fake), "CUDA_VISIBLE_DEVICES": "", "NPROC": "1"})
        args = [line[4:] for line in p.stdout.splitlines() if line.startswith("ARG:")]
        assert p.returncode == 0 and args[args.index("--data_path") + 1] == pattern, (script, p.stdout, p.stderr)


def test_eval_refuses_an_output_that_is_one_of_the_data_files(shards):
    from finetune.evaluate import _is_data_file

    spec = str(shards / "train-*.jsonl")
    assert _is_data_file(str(shards / "train-00002.jsonl"), spec)
    assert not _is_data_file(str(shards / "report.json"), spec)


def test_merge_finds_training_data_given_as_a_glob(shards, tmp_path):
    """merge's default calibration / report data is the adapter's --data_path, a glob included."""
    from finetune.run_record import training_data

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for data, found in ((str(shards / "train-*.jsonl"), True), (str(tmp_path / "gone-*.jsonl"), False)):
        (adapter / "run_args.json").write_text(json.dumps({"data": {"data_path": data}}))
        assert training_data(adapter) == (data if found else None)


def test_a_dataset_dict_of_several_splits_names_the_split_to_read(tmp_path):
    """A DatasetDict's 'train' split was read whatever else it held, so `qwen-ft eval --data DICT` scored the
    training records as held-out ones: with several splits the path must name one (its dir); one split is read."""
    import datasets

    row = {"id": "a", "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]}
    held = {**row, "id": "held"}
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list([row]),
                                 "test": datasets.Dataset.from_list([held])})
    both.save_to_disk(str(tmp_path / "both"))
    with pytest.raises(DataError) as e:
        load_records(tmp_path / "both", flag="--data")
    assert str(e.value) == (f"--data {tmp_path / 'both'}: not a data file: a DatasetDict with 2 splits (train, test): "
                            f"name the split to read by its dir, e.g. {tmp_path / 'both' / 'train'}")
    assert ids(load_records(tmp_path / "both" / "test")) == ["held"]
    datasets.DatasetDict({"validation": datasets.Dataset.from_list([held])}).save_to_disk(str(tmp_path / "one"))
    assert ids(load_records(tmp_path / "one")) == ["held"]


def test_training_data_and_files_in_both_that_cannot_read_a_file_say_nothing(shards, tmp_path, monkeypatch):
    """eval's and merge's warning checks read the adapter's recorded training files: one that cannot be read
    (another user's) was a PermissionError traceback from a check of a file the user never named."""
    import finetune.data.dataset as dataset
    from finetune.data.dataset import files_in_both
    from finetune.run_record import training_data

    spec = str(shards / "train-*.jsonl")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "run_args.json").write_text(json.dumps({"data": {"data_path": spec}}))
    (adapter / "run_info.json").write_text(json.dumps({"data_content": "recorded"}))
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes((shards / "train-00002.jsonl").read_bytes())
    assert files_in_both(spec, str(copy)) == [(str(copy), str(shards / "train-00002.jsonl"))]

    def unreadable(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(dataset, "data_content", unreadable)
    monkeypatch.setattr(dataset, "_content_key", unreadable)
    assert training_data(adapter) is None
    assert files_in_both(spec, str(copy)) == []
    same = str(shards / "train-00002.jsonl")
    assert files_in_both(spec, same) == [(same, same)]  # the same file needs no read (named once, not "as" itself)
