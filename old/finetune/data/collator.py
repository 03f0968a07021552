"""Batches: pad to the longest row of the batch (never to model_max_length).

`ChatCollator` pads input_ids with the pad id (`<|endoftext|>`, the tokenizer's eod_id), labels with -100,
and returns an attention_mask of 1 for tokens and 0 for padding.

`PackedCollator` is for packed rows (see packing.py): it returns input_ids, labels and position_ids and no
attention_mask. Its padding forms one extra dummy sequence (position ids 0, 1, ... again, labels -100), so
the model's "position 0 starts a sequence" rule keeps real tokens from attending to padding. It also takes
unpacked rows (no position_ids: one sequence per row), which gives padded batches the same layout: what the
CUDA-graphed step trains on, with `pad_to_multiple_of` keeping the number of distinct shapes small.
"""

from __future__ import annotations

import torch

from .encoding import IGNORE


def padded_len(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


class ChatCollator:
    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None, label_pad_id: int = IGNORE):
        if pad_id is None:
            raise ValueError("pad_id is required (the tokenizer's eod_id, <|endoftext|>)")
        self.pad_id, self.multiple, self.label_pad_id = pad_id, pad_to_multiple_of, label_pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("empty batch")
        n = padded_len(max(len(r["input_ids"]) for r in rows), self.multiple)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), self.label_pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            if len(r["labels"]) != k:
                raise ValueError(f"row {i}: {k} input_ids but {len(r['labels'])} labels")
            ids[i, :k] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(r["labels"], dtype=torch.long)
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class PackedCollator(ChatCollator):  # same settings; rows carry position_ids and no attention_mask
    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("empty batch")
        n = padded_len(max(len(r["input_ids"]) for r in rows), self.multiple)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), self.label_pad_id, dtype=torch.long)
        pos = torch.arange(n, dtype=torch.long).repeat(len(rows), 1)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            row_pos = r.get("position_ids")
            if len(r["labels"]) != k or (row_pos is not None and len(row_pos) != k):
                raise ValueError(f"row {i}: input_ids, labels and position_ids differ in length")
            ids[i, :k] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(r["labels"], dtype=torch.long)
            if row_pos is not None:  # else one sequence: positions 0..k-1 as filled in
                pos[i, :k] = torch.as_tensor(row_pos, dtype=torch.long)
            pos[i, k:] -= k  # the padding is its own sequence: 0, 1, 2, ...
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
