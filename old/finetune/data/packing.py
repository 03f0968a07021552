"""Packing: several encoded conversations per row, each with position_ids restarting at 0.

Convention shared with the model: inside a packed row, a position id of 0 starts a new sequence, and
attention never crosses from one sequence to another. No attention_mask is produced (one would imply a
padding mask across the whole row). Every sequence starts with <|im_start|>, whose label is -100, so the
(shifted) loss never asks the last token of one sequence to predict the first of the next.

Bins are filled first-fit in order of decreasing length (stable, so the result is deterministic), within
blocks of `block_size` conversations so the work streams through `datasets.map` (and its cache).
"""

from __future__ import annotations


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
