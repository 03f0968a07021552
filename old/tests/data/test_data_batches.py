"""Collators (dynamic padding) and packing (position_ids restart per sequence, no cross-sequence labels)."""

import pytest
import torch

from finetune.data import ChatCollator, PackedCollator, encode_conversation, pack_lengths
from finetune.data.packing import pack_batch

PAD = 151643


def test_collator_pads_to_longest_row_not_max_length():
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    b = ChatCollator(PAD)(rows)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, PAD, PAD]]
    assert b["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(v.dtype == torch.long for v in b.values())


def test_collator_pad_to_multiple_of():
    b = ChatCollator(PAD, pad_to_multiple_of=8)([{"input_ids": [1] * 9, "labels": [1] * 9}])
    assert b["input_ids"].shape == (1, 16) and b["attention_mask"].sum() == 9


def test_collator_checks_lengths():
    with pytest.raises(ValueError, match="labels"):
        ChatCollator(PAD)([{"input_ids": [1, 2], "labels": [1]}])


def test_pack_lengths_first_fit_decreasing_is_deterministic():
    lengths = [5, 3, 8, 2, 4, 6]
    bins = pack_lengths(lengths, 10)
    assert bins == pack_lengths(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # nothing lost or repeated
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert bins == [[2, 3], [5, 4], [0, 1]]  # 8+2, 6+4, 5+3
    with pytest.raises(ValueError, match="max_len"):
        pack_lengths([11], 10)


def test_packed_rows_restart_positions_and_never_train_across_boundaries(data_small_tokenizer):
    tok = data_small_tokenizer
    recs = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": "answer " * (i + 1)}]} for i in range(6)]
    enc = [encode_conversation(tok, r) for r in recs]
    max_len = 2 * max(len(e["input_ids"]) for e in enc)
    packed = pack_batch({"input_ids": [e["input_ids"] for e in enc], "labels": [e["labels"] for e in enc]},
                        max_len)
    assert sum(packed["num_sequences"]) == 6 and len(packed["input_ids"]) < 6
    seen = []
    for ids, labels, pos in zip(packed["input_ids"], packed["labels"], packed["position_ids"]):
        assert len(ids) == len(labels) == len(pos) <= max_len
        starts = [i for i, p in enumerate(pos) if p == 0]
        for s, e in zip(starts, starts[1:] + [len(ids)]):
            assert pos[s:e] == list(range(e - s))
            assert ids[s] == tok.im_start_id
            # the model predicts labels[t] from tokens < t: the first token of each packed sequence is
            # never a target, so no sequence learns from the one before it
            assert labels[s] == -100
            seen.append((ids[s:e], labels[s:e]))
    assert sorted(map(str, seen)) == sorted(str((e["input_ids"], e["labels"])) for e in enc)


def test_packed_collator():
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, -100, 4], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]}]
    b = PackedCollator(PAD)(rows)
    assert set(b) == {"input_ids", "labels", "position_ids"}  # no attention_mask across sequences
    assert b["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, PAD, PAD]]
    assert b["labels"].tolist() == [[-100, 2, -100, 4], [-100, 6, -100, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]  # padding is its own sequence
