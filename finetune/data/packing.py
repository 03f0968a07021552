"""Packing: several encoded conversations per row, each with position_ids restarting at 0.

Convention shared with the model: inside a packed row, a position id of 0 starts a new sequence, and
attention never crosses from one sequence to another. No attention_mask is produced (one would imply a
padding mask across the whole row). Every sequence starts with <|im_start|>, whose label is -100, so the
(shifted) loss never asks the last token of one sequence to predict the first of the next.

Bins are filled first-fit in order of decreasing length (stable, so the result is deterministic), within
blocks of PACK_BLOCK conversations in dataset order, so the work streams (and the rows do not depend on how
many processes built the dataset). `pack_table` does this on Arrow columns (numpy on the flat token arrays,
no Python int per token); `pack_batch` is the same on Python lists, one block at a time.
"""

from __future__ import annotations

from typing import Iterator

PACK_BLOCK = 2000  # conversations packed together (first-fit within a block)


def pack_lengths(lengths: list[int], max_len: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= max_len (first-fit decreasing)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # sorted() is stable: deterministic
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"sequence {i} has {n} tokens, more than max_len={max_len}; encode with max_len")
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_len - n)
    return bins


def pack_batch(batch: dict, max_len: int) -> dict:
    """A `datasets.map(batched=True)` function: rows of input_ids/labels -> packed rows with position_ids."""
    ids, labels = batch["input_ids"], batch["labels"]
    out = {"input_ids": [], "labels": [], "position_ids": [], "length": [], "num_sequences": []}
    for group in pack_lengths([len(x) for x in ids], max_len):
        row_ids, row_labels, row_pos = [], [], []
        for i in group:
            row_ids += ids[i]
            row_labels += labels[i]
            row_pos += range(len(ids[i]))
        out["input_ids"].append(row_ids)
        out["labels"].append(row_labels)
        out["position_ids"].append(row_pos)
        out["length"].append(len(row_ids))
        out["num_sequences"].append(len(group))
    return out


def packed_schema():
    import pyarrow as pa

    # the column types `datasets.map(pack_batch)` gave (caches and collators saw these)
    return pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                      ("length", pa.int32()), ("position_ids", pa.list_(pa.int64())),
                      ("num_sequences", pa.int64())])


def pack_table(table, rows, max_len: int) -> Iterator:
    """Packed record batches (`packed_schema`) of the rows `rows` (ascending indices into an Arrow table with
    input_ids, labels and length columns), one batch per block of PACK_BLOCK rows: the rows `pack_batch` gives
    for each block, built from the flat token arrays."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths = table.column("length").to_numpy()
    tokens = table.select(["input_ids", "labels"])
    schema = packed_schema()
    for start in range(0, len(rows), PACK_BLOCK):
        block = np.asarray(rows[start:start + PACK_BLOCK], dtype=np.int64)
        bins = pack_lengths(lengths[block].tolist(), max_len)
        order = block[np.concatenate([np.asarray(b, dtype=np.int64) for b in bins])]  # rows in packed order
        seq_len = lengths[order].astype(np.int64)
        taken = tokens.take(pa.array(order))
        ids = pc.list_flatten(taken.column("input_ids")).to_numpy().astype(np.int32, copy=False)
        labels = pc.list_flatten(taken.column("labels")).to_numpy().astype(np.int32, copy=False)
        # position within its own sequence: token index minus the index where its sequence starts
        seq_start = np.zeros(len(order), dtype=np.int64)
        np.cumsum(seq_len[:-1], out=seq_start[1:])
        pos = np.arange(len(ids), dtype=np.int64) - np.repeat(seq_start, seq_len)
        per_bin = np.array([len(b) for b in bins], dtype=np.int64)
        first = np.zeros(len(bins), dtype=np.int64)
        np.cumsum(per_bin[:-1], out=first[1:])
        row_len = np.add.reduceat(seq_len, first)
        offsets = np.zeros(len(bins) + 1, dtype=np.int32)
        np.cumsum(row_len, out=offsets[1:])
        offsets = pa.array(offsets)
        yield pa.record_batch([
            pa.ListArray.from_arrays(offsets, pa.array(ids)),
            pa.ListArray.from_arrays(offsets, pa.array(labels)),
            pa.array(row_len.astype(np.int32)),
            pa.ListArray.from_arrays(offsets, pa.array(pos)),
            pa.array(per_bin),
        ], schema=schema)
