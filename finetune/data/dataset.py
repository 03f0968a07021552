"""Records -> an encoded (optionally packed) `datasets.Dataset`, cached by fingerprint, plus its summary.

  1. The records stream through validation and encoding straight into Arrow, in `num_proc` processes (a
     JSONL file is split at line starts into byte ranges; a JSON array or dataset dir is read by one
     process; an in-memory list is split into chunks). Nothing holds the corpus as Python objects as a
     whole, and there is no intermediate Arrow copy of the raw records.
     The result is one Arrow file in `datasets`' on-disk format, named by a `datasets` Hasher fingerprint
     of everything that determines it (file path, size and mtime, or the records themselves; tokenizer
     vocabulary; options; FORMAT_VERSION), opened as a memory-mapped `datasets.Dataset`. A second build
     with the same inputs opens the file instead of encoding again, and later `filter`/`map` steps cache
     next to it as usual. (The rows are written as whole record batches from numpy rather than through
     `Dataset.from_generator`'s example-by-example writer, which measured as costly as the tokenizer.)
  2. An invalid record becomes a row that carries its error (and, without `skip_invalid`, ends its shard),
     so the first error in file order is raised after the step, skip counts survive a cache hit, and
     nothing disappears unreported.
  3. `filter` keeps the records that have something to train on; with `packing`, `map` packs rows.

`datasets` is imported inside the functions: the GPU machine runs without it.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

from .encoding import ChatEncoder, chat_encoder
from .packing import pack_batch
from .records import DataError, _is_jsonl, iter_records, jsonl_shards, normalize_record
from .summary import summarize

# Part of the fingerprint: bump when the encoding or the row layout changes, to invalidate old caches.
FORMAT_VERSION = 1
TOO_LONG = "prompt longer than max_len (nothing left to train)"
BATCH_ROWS = 512  # rows per Arrow record batch


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


def _encode_loop(out, pairs, encoder, max_len, train_on_prompt, skip_invalid) -> None:
    encode = encoder.encode
    for rec, err in pairs:
        if err is not None:
            out.add([], [], 0, False, err.reason, err.to_json())
            if not skip_invalid:
                return  # the build will raise this error; no point encoding the rest of the shard
            continue
        e = encode(rec, max_len, train_on_prompt, normalized=True)
        out.add(e.input_ids, e.labels, e.n_trained, e.truncated)


def _record_pairs(offset: int, records: list):
    for i, raw in enumerate(records, offset):
        try:
            yield normalize_record(raw), None
        except DataError as e:
            yield None, e.located("<records>", i, None)


def _encode_shard(job: dict) -> str:
    """Encode one shard into its own Arrow file; run in a worker process or inline."""
    out = _ArrowRows(job["out"])
    try:
        if "records" in job:
            pairs = _record_pairs(job["offset"], job["records"])
        else:
            pairs = iter_records(job["path"], skip_invalid=True, shard=job["shard"])
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


def _encode_to_arrow(jobs: list[dict], dst: str, procs: int) -> None:
    """Run the shard jobs (in `procs` processes), then join their files, in order, into `dst` atomically."""
    tmp_base = f"{dst}.{os.getpid()}.tmp"
    for k, job in enumerate(jobs):
        job["out"] = f"{tmp_base}{k}"
    try:
        if procs > 1 and len(jobs) > 1:
            import multiprocessing as mp

            # fork: workers inherit the tokenizer's tiktoken encoding instead of rebuilding it (~1 s)
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
            with ctx.Pool(min(procs, len(jobs))) as pool:
                parts = pool.map(_encode_shard, jobs, chunksize=1)
        else:
            parts = [_encode_shard(job) for job in jobs]
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


def _trainable(n_trained: list[int]) -> list[bool]:
    return [n > 0 for n in n_trained]


def build_dataset(tokenizer, path_or_records, max_len: int | None, packing: bool = False,
                  train_on_prompt: bool = False, skip_invalid: bool = False, num_proc: int | None = None,
                  cache_dir: str | os.PathLike | None = None, verbose: bool = True):
    """Encode a data file (or a list of records) into a `datasets.Dataset`; return (dataset, DataSummary).

    Columns: input_ids, labels, length (and position_ids, num_sequences when packed). Raises DataError for
    an invalid record (unless `skip_invalid`: then counted in the summary, and printed) and when no record
    is left to train on. `verbose=False` (e.g. on non-main ranks) keeps the skip report off stderr; it is
    in the summary either way. `num_proc` processes encode (a JSONL file is split between them); the result is
    cached under `cache_dir` (default: the `datasets` cache) by a fingerprint of everything that
    determines it.
    """
    import datasets

    if packing and not max_len:
        raise ValueError("packing needs max_len (the length of a packed row)")
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    cache_dir = None if cache_dir is None else str(cache_dir)
    encoder = chat_encoder(tokenizer)

    from datasets.fingerprint import Hasher

    procs = max(1, num_proc or 1)
    common = {"encoder": encoder, "max_len": max_len, "train_on_prompt": train_on_prompt,
              "skip_invalid": skip_invalid}
    if isinstance(path_or_records, (str, os.PathLike)):
        source = str(path_or_records)
        p = Path(source)
        if not p.exists():
            raise DataError("file not found", "no such file", path=source)
        path = str(p.resolve())
        # Size and mtime of the file (of every file, for a dataset dir): an edited file is read again.
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        key = {"path": path, "stamp": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]}
        # JSONL splits into byte ranges, one per process; other forms are read by one process.
        shards = jsonl_shards(path, procs) if p.is_file() and _is_jsonl(path) else [None]
        jobs = [{"path": path, "shard": sh, **common} for sh in shards]
    else:
        records = list(path_or_records)
        source = f"{len(records)} in-memory records"
        key = {"records": records}
        step = -(-len(records) // procs) or 1
        jobs = [{"offset": i, "records": records[i:i + step], **common}
                for i in range(0, len(records), step)] or [{"offset": 0, "records": [], **common}]
    # Everything that determines the encoded rows, and nothing else (not num_proc: same rows either way).
    fingerprint = Hasher.hash({**key, **common, "version": FORMAT_VERSION})
    if cache_dir is None:
        cache_dir = os.path.join(datasets.config.HF_DATASETS_CACHE, "qwen_finetune")
    os.makedirs(cache_dir, exist_ok=True)
    arrow_file = os.path.join(cache_dir, f"encoded-{fingerprint}.arrow")
    if not os.path.exists(arrow_file):
        try:
            _encode_to_arrow(jobs, arrow_file, procs)
        except DataError as e:  # file-level (a broken JSON array): readable, without the traceback noise
            raise e from None
    encoded = datasets.Dataset.from_file(arrow_file)

    # The summary reads only the small columns (no token lists).
    reasons = encoded.data.column("reason").to_pylist()
    lengths = encoded.data.column("length").to_pylist()
    trained = encoded.data.column("n_trained").to_pylist()
    truncated = encoded.data.column("truncated").to_pylist()
    skipped = Counter(r for r in reasons if r is not None)
    used_len, used_trained, n_trunc = [], [], 0
    for r, n, t, tr in zip(reasons, lengths, trained, truncated):
        if r is not None:
            continue
        if t == 0:
            skipped[TOO_LONG] += 1
            continue
        used_len.append(n)
        used_trained.append(t)
        n_trunc += tr
    errors = []
    if any(r is not None for r in reasons):
        errors = [DataError.from_json(e) for e in encoded.data.column("error").to_pylist() if e is not None]
        if not skip_invalid:
            raise errors[0]  # the first invalid record in file order
    summary = summarize(source, used_len, used_trained, n_trunc, len(reasons), skipped, max_len)
    summary.examples = [str(e) for e in errors[:5]]
    if not used_len:
        raise DataError("no usable records", f"{len(reasons)} read; skipped: "
                        + (", ".join(f"{n} {r}" for r, n in skipped.items()) or "none")
                        + (f"; max_len is {max_len}" if skipped.get(TOO_LONG) else ""), path=source)
    if skipped and verbose:
        print(summary.format(), file=sys.stderr)  # skips are never silent, even if the caller ignores the summary

    ds = encoded
    if len(used_len) != len(reasons):
        ds = ds.filter(_trainable, input_columns="n_trained", batched=True, num_proc=num_proc,
                       desc="dropping records without trained tokens")
    ds = ds.remove_columns(["n_trained", "truncated", "reason", "error"])
    if packing:
        ds = ds.map(pack_batch, batched=True, batch_size=2000, num_proc=num_proc,
                    remove_columns=ds.column_names, fn_kwargs={"max_len": max_len},
                    desc="packing")
        summary.packed, summary.rows = True, len(ds)
    return ds, summary

