"""Records -> an encoded (optionally packed) `datasets.Dataset`, cached by fingerprint, plus its summary.

  1. The records stream through validation and encoding straight into Arrow, in `num_proc` processes (a
     JSONL file is split at line starts into byte ranges, a Parquet file at row-group boundaries; a JSON
     array or dataset dir is read by one process; an in-memory list is split into chunks). Nothing holds the
     corpus as Python objects as a whole, and there is no intermediate Arrow copy of the raw records.
     The result is one Arrow file in `datasets`' on-disk format, named by a `datasets` Hasher fingerprint
     of everything that determines it (file path and an xxh3 hash of its bytes, of every file for a dataset
     dir, or the records themselves; tokenizer vocabulary; options; FORMAT_VERSION), opened as a
     memory-mapped `datasets.Dataset`. (A hash, not size and mtime: `cp -p`, `rsync -a` and `tar` keep
     those for different content.) A second build
     with the same inputs opens the file instead of encoding again, and later `filter`/`map` steps cache
     next to it as usual. (The rows are written as whole record batches from numpy rather than through
     `Dataset.from_generator`'s example-by-example writer, which measured as costly as the tokenizer.)
  2. An invalid record becomes a row that carries its error (and, without `skip_invalid`, ends its shard),
     so the first error in file order is raised after the step, skip counts survive a cache hit, and
     nothing disappears unreported.
  3. A record left with nothing to train (the prompt before its first reply fills max_len) stops the build
     with a `TooLongError` naming how many there are and the first, unless `skip_invalid` (then counted);
     `filter` keeps the records that have something to train on; with `packing`, the used rows are packed
     (packing.pack_table) into a second cached file, named by the same fingerprint.

`datasets` is imported inside the functions: the GPU machine runs without it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

from .encoding import ChatEncoder, chat_encoder
from .packing import PACK_BLOCK, pack_table, packed_schema
from .records import (DataError, _iter_raw, check_data_file, data_sources, file_form, iter_records,
                      jsonl_shards_counted, normalize_record, parquet_shards)
from .summary import summarize

# Part of the fingerprint: bump when the encoding, the validation or the row layout changes, to invalidate
# old caches. 2: stricter validation (duplicate keys, conflicting fields, lone surrogates).
FORMAT_VERSION = 11  # 3: assistant "weight" 0 untrained, Alpaca records, text parts, tool replies stripped
# 4: tool records checked as plain ones and as the server checks them, Alpaca tools, null arguments
# 5: a reply with no trained segment untrained (its <|im_end|> too), an empty top-level "system" the default prompt
# 6: after weight-0 replies, truncation cuts inside the first trained reply rather than keep context alone
# 7: a record's "react" (the ReAct layout's mark, which normalised tool records carry) must be a boolean
# 8: public datasets' shapes: weights on prompt turns, Dolly / Open-Orca / Firefly columns, `conversation`, the
#    chatgpt / model roles, columns repeating the turns; preference, KTO, multimodal data and ShareGPT's differing
#    'markdown' refused
# 9: tool records take the assistant's chatgpt / model roles
# 10: LLaMA-Factory v1's {"type", "value"} content parts (text, an assistant's tool_call) and per-message loss_weight
# 11: TRL's prompt-completion records (two strings, or two lists of messages; the prompt's replies untrained)
TOO_LONG = "prompt longer than max_len (nothing left to train)"
BATCH_ROWS = 512  # rows per Arrow record batch
IN_MEMORY = "<records>"  # the "path" of records passed as a list
PACK_VERSION = 1  # part of a packed file's name: bump when the packing changes
# Without --preprocessing_num_workers a JSONL file this large is encoded by several processes (the rows are the
# same either way): 200k records (950 MB) took 124 s in one process and 78 s in two on a busy 2-core machine
# (benchmarks/NOTES.md step 68); a small file is not worth the workers' start. A Parquet file counts its compressed
# bytes: it splits later than the same records in JSONL would.
AUTO_SPLIT_BYTES = 64 << 20
AUTO_MAX_PROCS = 8


def auto_procs(path: str) -> int:
    """The processes that encode ``path`` (or the files it names: `data_sources`) when the caller does not say:
    up to AUTO_MAX_PROCS (the CPUs this process may run on) for JSONL and Parquet files of AUTO_SPLIT_BYTES and
    more in all, else one (other forms are read by one process each)."""
    files = [Path(f) for f in data_sources(path)]
    split = [f for f in files if f.is_file() and file_form(str(f)) in ("jsonl", "parquet")]
    if sum(f.stat().st_size for f in split) < AUTO_SPLIT_BYTES:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(AUTO_MAX_PROCS, cpus))


class TooLongError(DataError):
    """Records that max_len leaves nothing to train in (the text before the first trained reply fills it).

    A type of its own so a caller can name its own setting for max_len (the trainer: --model_max_length).
    """


class CacheDirError(DataError):
    """The encoded-data cache dir cannot be written: the machine's setting (HF_DATASETS_CACHE), no data file's
    fault, so no data flag is put before its path."""

    def given_by(self, flag: str | None) -> "DataError":
        return self


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("length", pa.int32()),
        ("n_trained", pa.int32()),
        ("truncated", pa.bool_()),
        ("reason", pa.string()),  # an invalid record's error category (kept for counting), else null
        ("error", pa.string()),  # its DataError as JSON
    ])


class _ArrowRows:
    """Collects encoded rows and writes them as record batches (flat numpy token arrays + offsets)."""

    def __init__(self, path: str):
        import pyarrow as pa

        self.pa = pa
        self.sink = pa.OSFile(path, "wb")
        self.writer = pa.ipc.new_stream(self.sink, _schema())
        self._reset()

    def _reset(self):
        self.ids, self.labels, self.lengths, self.trained, self.truncated = [], [], [], [], []
        self.reasons, self.errors = [], []

    def add(self, ids, labels, trained, truncated, reason=None, error=None):
        self.ids += ids
        self.labels += labels
        self.lengths.append(len(ids))
        self.trained.append(trained)
        self.truncated.append(truncated)
        self.reasons.append(reason)
        self.errors.append(error)
        if len(self.lengths) >= BATCH_ROWS:
            self.flush()

    def flush(self):
        import numpy as np

        if not self.lengths:
            return
        pa = self.pa
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int32)
        np.cumsum(self.lengths, out=offsets[1:])
        offsets = pa.array(offsets)
        batch = pa.record_batch([
            pa.ListArray.from_arrays(offsets, pa.array(np.array(self.ids, dtype=np.int32))),
            pa.ListArray.from_arrays(offsets, pa.array(np.array(self.labels, dtype=np.int32))),
            pa.array(self.lengths, pa.int32()),
            pa.array(self.trained, pa.int32()),
            pa.array(self.truncated, pa.bool_()),
            pa.array(self.reasons, pa.string()),
            pa.array(self.errors, pa.string()),
        ], schema=_schema())
        self.writer.write_batch(batch)
        self._reset()

    def close(self):
        self.flush()
        self.writer.close()
        self.sink.close()


def _encode_into(out: _ArrowRows, pairs, encoder: ChatEncoder, max_len, train_on_prompt: bool,
                 skip_invalid: bool) -> None:
    import gc

    # The loop makes many short-lived, acyclic lists; the cyclic GC would only rescan whatever else the
    # process holds (measured: up to a third of the time with 20k records alive in the caller).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        _encode_loop(out, pairs, encoder, max_len, train_on_prompt, skip_invalid)
    finally:
        if gc_was_enabled:
            gc.enable()


# Called with the number of records done since the last call (the progress bar, or a worker's shared
# counter); None: no progress shown.
_progress = None
PROGRESS_EVERY = 256  # records between progress updates


def _encode_loop(out, pairs, encoder, max_len, train_on_prompt, skip_invalid) -> None:
    encode = encoder.encode
    tick = _progress
    done = 0
    for rec, err in pairs:
        done += 1
        if tick is not None and done == PROGRESS_EVERY:
            tick(done)
            done = 0
        if err is not None:
            out.add([], [], 0, False, err.reason, err.to_json())
            if not skip_invalid:
                return  # the build will raise this error; no point encoding the rest of the shard
            continue
        e = encode(rec, max_len, train_on_prompt, normalized=True)
        out.add(e.input_ids, e.labels, e.n_trained, e.truncated)
    if tick is not None and done:
        tick(done)


def _record_pairs(offset: int, records: list):
    for i, raw in enumerate(records, offset):
        try:
            yield normalize_record(raw), None
        except DataError as e:
            yield None, e.located(IN_MEMORY, i, None)


def _encode_shard(job: dict) -> str:
    """Encode one shard into its own Arrow file; run in a worker process or inline."""
    out = _ArrowRows(job["out"])
    try:
        if "records" in job:
            pairs = _record_pairs(job["offset"], job["records"])
        else:
            pairs = iter_records(job["path"], skip_invalid=True, shard=job["shard"])  # (one file each)
        _encode_into(out, pairs, job["encoder"], job["max_len"], job["train_on_prompt"], job["skip_invalid"])
    finally:
        out.close()
    return job["out"]


def _concat_arrow(parts: list[str], dst: str) -> None:
    import pyarrow as pa

    with pa.OSFile(dst, "wb") as sink, pa.ipc.new_stream(sink, _schema()) as w:
        for p in parts:
            with pa.memory_map(p) as src:
                for batch in pa.ipc.open_stream(src):
                    w.write_batch(batch)


def _count_into(counter, n: int) -> None:
    with counter.get_lock():
        counter.value += n


def _worker_progress(counter) -> None:  # a Pool initializer: this worker's records go to the shared counter
    global _progress
    _progress = functools.partial(_count_into, counter)


def _encode_to_arrow(jobs: list[dict], dst: str, procs: int, bar=None) -> None:
    """Run the shard jobs (in `procs` processes), then join their files, in order, into `dst` atomically.
    `bar` (a tqdm bar, or None) counts the records done."""
    global _progress
    tmp_base = f"{dst}.{os.getpid()}.tmp"
    for k, job in enumerate(jobs):
        job["out"] = f"{tmp_base}{k}"
    try:
        if procs > 1 and len(jobs) > 1:
            import multiprocessing as mp

            # fork: workers inherit the tokenizer's tiktoken encoding instead of rebuilding it (~1 s)
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
            counter = ctx.Value("q", 0)
            init = (_worker_progress, (counter,)) if bar is not None else (None, ())
            with ctx.Pool(min(procs, len(jobs)), *init) as pool:
                result = pool.map_async(_encode_shard, jobs, chunksize=1)
                while not result.ready():
                    result.wait(0.5)
                    if bar is not None:
                        bar.update(counter.value - bar.n)
                parts = result.get()
        else:
            _progress = None if bar is None else bar.update
            try:
                parts = [_encode_shard(job) for job in jobs]
            finally:
                _progress = None
        if len(parts) == 1:
            os.replace(parts[0], dst)
        else:
            _concat_arrow(parts, tmp_base)
            os.replace(tmp_base, dst)
    finally:
        for job in jobs:
            if os.path.exists(job["out"]):
                os.remove(job["out"])
        if os.path.exists(tmp_base):
            os.remove(tmp_base)


def _write_packed(arrow_file: str, rows: list[int], max_len: int, dst: str, bar=None) -> None:
    """Pack the encoded rows `rows` of `arrow_file` into `dst` (atomically); `bar` counts the records."""
    import pyarrow as pa
    import pyarrow.compute as pc

    tmp = f"{dst}.{os.getpid()}.tmp"
    try:
        with pa.memory_map(arrow_file) as src:
            table = pa.ipc.open_stream(src).read_all()
            with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, packed_schema()) as w:
                for batch in pack_table(table, rows, max_len):
                    w.write_batch(batch)
                    if bar is not None:
                        bar.update(int(pc.sum(batch.column("num_sequences")).as_py()))
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _trainable(n_trained: list[int]) -> list[bool]:
    return [n > 0 for n in n_trained]


def _content_hash(content, single: Path | None) -> str:
    """The data's content hash (DataSummary.content) from its _content_key(s): ``single``, the one path read (else
    ``content`` is one key a file). A single file's content without its name (a moved or renamed copy is the same
    data); a dir's file names are part of what it holds."""
    from datasets.fingerprint import Hasher

    return Hasher.hash([c[1:] for c in content] if single is not None and single.is_file() else content)


def data_content(source: str) -> str:
    """The content hash a build of ``source`` (a data flag's value) records as DataSummary.content, without building:
    what a later step (merge) compares to tell whether the files still hold the data a run trained on."""
    paths = [Path(f).resolve() for f in data_sources(source)]
    if len(paths) == 1:
        return _content_hash(_content_key(paths[0]), paths[0])
    return _content_hash([_content_key(f) for f in paths], None)


def _content_key(p: Path) -> list[tuple[str, int, str]]:
    """(name, size, xxh3-128 of the bytes) of a data file, or of every file of a dataset dir (names relative)."""
    import xxhash  # a dependency of `datasets`; ~10x faster than blake2b, and this runs on every build

    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    key = []
    for f in files:
        h = xxhash.xxh3_128()
        size = 0
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(view[:n])
                size += n
        key.append((f.name if f == p else str(f.relative_to(p)), size, h.hexdigest()))
    return key


def files_in_both(spec: str, other: str) -> list[tuple[str, str]]:
    """(file of ``other``, file of ``spec``) for each data file (or dataset dir) that both data flags read: the same
    path (then both are ``other``'s name for it: "train.json (as /abs/train.json)" read as a copy), or a file of the
    same content under another name. A directory given as training data reads a held-out file inside it too, and
    its loss was reported as held out. A file that cannot be read is no match (a warning's check, not the read)."""
    ours = [(f, Path(f).resolve()) for f in data_sources(spec)]
    found = []
    for f in data_sources(other):
        real = Path(f).resolve()
        for g, g_real in ours:
            if real == g_real:
                found.append((f, f))
                break
            try:
                same = (real.is_file() and g_real.is_file() and real.stat().st_size == g_real.stat().st_size
                        and _content_key(real)[0][1:] == _content_key(g_real)[0][1:])
            except OSError:  # (another user's unreadable training file: a traceback from a warning's check)
                same = False
            if same:
                found.append((f, g))
                break
    return found


def named_in_both(both: list[tuple[str, str]]) -> str:
    """``files_in_both``'s pairs as a warning names them, with their verb: "a.json is", "a.json (as b.json), c.json
    are" (a copy named with the file it copies)."""
    names = ", ".join(f if f == g else f"{f} (as {g})" for f, g in both)
    return f"{names} {'is' if len(both) == 1 else 'are'}"


def record_place(source: str, sources: list[str], row: int) -> tuple[str, int, int | None]:
    """(file, index in it, line) of the encoded row `row` of data read from `sources` (one or several files or
    dataset dirs; `source`: as the user gave them, named when there is only one). Re-reads the files up to
    it, so only for reporting."""
    if len(sources) == 1:
        return sources[0], row, _record_line(sources[0], row)
    for f in sources:
        if Path(f).is_file() and file_form(f) == "parquet":  # a row a record: counted in its footer, not read
            n = parquet_shards(f, 1)[1]
            if row < n:
                return f, row, None
            row -= n
            continue
        for i, line, _, _ in _iter_raw(f):
            if row == 0:
                return f, i, line
            row -= 1
    return source, row, None


def _record_line(source: str, index: int) -> int | None:
    """The line of record `index` of a data file (None for in-memory records, dataset dirs and Parquet files);
    re-reads the file up to it, so only for reporting."""
    if source == IN_MEMORY or not Path(source).is_file() or file_form(source) == "parquet":
        return None
    for i, line, _, _ in _iter_raw(source):
        if i == index:
            return line
    return None


@contextlib.contextmanager
def _bar(show: bool, total: int | None, desc: str, unit: str):
    """A tqdm bar on stderr for one stage of the build (None when hidden)."""
    if not show:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit) as bar:
        yield bar


@contextlib.contextmanager
def _progress_bars(show: bool):
    """`datasets`' own progress bars (filter, map, loading a dataset dir) on or off for the build; off follows
    the trainer's --disable_tqdm."""
    import datasets

    if show or datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def build_dataset(tokenizer, path_or_records, max_len: int | None, packing: bool = False,
                  train_on_prompt: bool = False, skip_invalid: bool = False, num_proc: int | None = None,
                  cache_dir: str | os.PathLike | None = None, verbose: bool = True, progress: bool = True):
    """Encode a data file (several: a glob, a comma-separated list or a plain directory, see
    `records.data_sources`; or a list of records) into a `datasets.Dataset`; return (dataset, DataSummary).

    Columns: input_ids, labels, length (and position_ids, num_sequences when packed). Raises DataError for
    an invalid record, and TooLongError for records that `max_len` leaves nothing to train in (unless
    `skip_invalid`: then both are counted in the summary, and printed), and when no record is left to train
    on. `verbose=False` (e.g. on non-main ranks) keeps the skip report off stderr; it is in the summary
    either way. `progress=False` hides the progress bars (tokenizing, packing, `datasets`' own). `num_proc`
    processes encode (a JSONL or Parquet file is split between them; None: ``auto_procs``); the result is cached under
    `cache_dir` (default: the `datasets` cache) by a fingerprint of everything that determines it (every
    file's content).
    """
    with _progress_bars(progress):
        return _build_dataset(tokenizer, path_or_records, max_len, packing, train_on_prompt, skip_invalid,
                              num_proc, cache_dir, verbose, progress)


def _build_dataset(tokenizer, path_or_records, max_len, packing, train_on_prompt, skip_invalid, num_proc,
                   cache_dir, verbose, progress):
    import datasets

    if packing and not max_len:
        raise ValueError("packing needs max_len (the length of a packed row)")
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    cache_dir = None if cache_dir is None else str(cache_dir)
    encoder = chat_encoder(tokenizer)

    from datasets.fingerprint import Hasher

    procs = max(1, num_proc) if num_proc else 1
    common = {"encoder": encoder, "max_len": max_len, "train_on_prompt": train_on_prompt,
              "skip_invalid": skip_invalid}
    if isinstance(path_or_records, (str, os.PathLike)):
        source = str(path_or_records)
        sources = data_sources(source)  # one file or dataset dir, or several (a glob, a list, a plain dir)
        for f in sources:  # by the names given: resolved, a pipe (/dev/fd/63) read as the glob "pipe:[947402]",
            if not Path(f).is_dir():  # and a broken link in a data dir was named by its missing target
                check_data_file(f)
        paths = [str(Path(f).resolve()) for f in sources]
        if not num_proc:
            procs = auto_procs(source)
        # The content (of every file, for a dataset dir), and the path, which the cached errors name.
        if len(paths) == 1:
            p = Path(paths[0])
            key = {"path": paths[0], "content": _content_key(p)}
        else:  # every file's path and content, in reading order: a change in any one is another build
            p = None
            key = {"paths": paths, "content": [_content_key(Path(f)) for f in paths]}

        def make_jobs():  # only on a cache miss: splitting a JSONL file reads it through
            # JSONL splits into byte ranges, Parquet into row groups, one per process; other forms are read by one
            # process.
            jobs, n_records = [], 0
            for path in paths:
                shards, n = [None], None  # (a JSON array's count is known only once it is read)
                form = file_form(path) if Path(path).is_file() else None
                if form == "jsonl":
                    shards, n = jsonl_shards_counted(path, procs)
                elif form == "parquet":
                    shards, n = parquet_shards(path, procs)
                jobs += [{"path": path, "shard": sh, **common} for sh in shards]
                n_records = None if n is None or n_records is None else n_records + n
            return jobs, n_records
    else:
        records = list(path_or_records)
        source = f"{len(records)} in-memory records"
        key = {"records": records}

        def make_jobs():
            step = -(-len(records) // procs) or 1
            return [{"offset": i, "records": records[i:i + step], **common}
                    for i in range(0, len(records), step)] or [{"offset": 0, "records": [], **common}], len(records)
    # Everything that determines the encoded rows, and nothing else (not num_proc: same rows either way).
    fingerprint = Hasher.hash({**key, **common, "version": FORMAT_VERSION})
    if cache_dir is None:
        cache_dir = os.path.join(datasets.config.HF_DATASETS_CACHE, "qwen_finetune")
    try:  # a cache that cannot be written (a read-only home, HF_DATASETS_CACHE under a file) was a traceback
        os.makedirs(cache_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir):
            pass
    except OSError as e:
        raise CacheDirError("cannot write the encoded-data cache", f"{e.strerror or e} (set HF_DATASETS_CACHE to "
                            "a writable dir)", path=cache_dir) from None
    arrow_file = os.path.join(cache_dir, f"encoded-{fingerprint}.arrow")
    if not os.path.exists(arrow_file):
        try:
            jobs, n_records = make_jobs()
            with _bar(progress, n_records, f"tokenizing ({procs} processes)" if procs > 1 else "tokenizing",
                      " records") as bar:
                _encode_to_arrow(jobs, arrow_file, procs, bar)
        except DataError as e:  # file-level (a broken JSON array): readable, without the traceback noise
            raise e from None
    encoded = datasets.Dataset.from_file(arrow_file)

    # The summary reads only the small columns (no token lists).
    reasons = encoded.data.column("reason").to_pylist()
    lengths = encoded.data.column("length").to_pylist()
    trained = encoded.data.column("n_trained").to_pylist()
    truncated = encoded.data.column("truncated").to_pylist()
    skipped = Counter(r for r in reasons if r is not None)
    used_len, used_trained, used_rows, n_trunc = [], [], [], 0
    first_too_long = None  # row index = record index: every record has a row once no error ends a shard
    for i, (r, n, t, tr) in enumerate(zip(reasons, lengths, trained, truncated)):
        if r is not None:
            continue
        if t == 0:
            skipped[TOO_LONG] += 1
            if first_too_long is None:
                first_too_long = i
            continue
        used_rows.append(i)
        used_len.append(n)
        used_trained.append(t)
        n_trunc += tr
    errors = []
    if any(r is not None for r in reasons):
        errors = [DataError.from_json(e) for e in encoded.data.column("error").to_pylist() if e is not None]
        if not skip_invalid:
            raise errors[0]  # the first invalid record in file order
    if first_too_long is not None:
        n = skipped[TOO_LONG]
        where, index, line = IN_MEMORY, first_too_long, None
        if isinstance(path_or_records, (str, os.PathLike)):
            where, index, line = record_place(source, sources, first_too_long)
        too_long = TooLongError(TOO_LONG, f"{n} of {len(reasons)} record{'s' * (len(reasons) > 1)} "
                                f"{'have' if n > 1 else 'has'} no trained reply token within max_len {max_len} (the "
                                "text before the first trained reply fills it)"
                                + ("; this is the first" if n > 1 else ""), path=where, index=index, line=line)
        if not skip_invalid:
            raise too_long
        errors.append(too_long)  # in the summary's examples
    summary = summarize(source, used_len, used_trained, n_trunc, len(reasons), skipped, max_len)
    summary.examples = [str(e) for e in errors[:5]]
    summary.content = (_content_hash(key["content"], p) if "content" in key else
                       Hasher.hash(key["records"]))
    if not used_len:
        cls = TooLongError if skipped.get(TOO_LONG) else DataError
        empty = ("no records given" if not isinstance(path_or_records, (str, os.PathLike))
                 else "the files hold no records" if "paths" in key  # ("[]" was "the file is empty")
                 else "the dataset holds no records" if p.is_dir() else "the file holds no records")
        detail = (empty if not reasons else f"{len(reasons)} read; skipped: "
                  + (", ".join(f"{n} {r}" for r, n in skipped.items()) or "none")
                  + (f"; max_len is {max_len}" if skipped.get(TOO_LONG) else ""))
        raise cls("no usable records", detail, path=source)
    if skipped and verbose:
        print(summary.format(), file=sys.stderr)  # skips are never silent, even if the caller ignores the summary

    if packing:
        # Packed from the flat token arrays into a file of its own next to the encoded one (datasets.map over
        # Python lists of ints cost more than the tokenizer). Blocks of PACK_BLOCK used records in file order:
        # the same rows whatever num_proc.
        packed_file = os.path.join(cache_dir, f"packed-v{PACK_VERSION}-b{PACK_BLOCK}-{fingerprint}.arrow")
        if not os.path.exists(packed_file):
            with _bar(progress, len(used_rows), "packing", " records") as bar:
                _write_packed(arrow_file, used_rows, max_len, packed_file, bar)
        ds = datasets.Dataset.from_file(packed_file)
        summary.packed, summary.rows = True, len(ds)
        return ds, summary
    ds = encoded
    if len(used_len) != len(reasons):
        ds = ds.filter(_trainable, input_columns="n_trained", batched=True, num_proc=num_proc,
                       desc="dropping records without trained tokens")
    return ds.remove_columns(["n_trained", "truncated", "reason", "error"]), summary
