"""The input embedding cut to the data's token rows for training (finetune/training/compact_embedding.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.settings import override
from finetune.training.compact_embedding import CompactEmbedding, compact_input_embedding, data_token_ids

from _helpers import tiny_model


def _frozen(vocab=50, dim=6):
    e = nn.Embedding(vocab, dim)
    e.requires_grad_(False)
    return e


def test_the_rows_of_the_given_ids_are_the_full_tables():
    full = _frozen()
    compact = CompactEmbedding(full, torch.tensor([7, 3, 3, 41, 0]))
    assert compact.weight.shape == (4, 6) and not compact.weight.requires_grad
    ids = torch.tensor([[3, 41, 0], [7, 7, 3]])
    assert torch.equal(compact(ids), full(ids))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        CompactEmbedding(full, torch.tensor([3, 50]))
    with pytest.raises(ValueError, match="frozen"):
        CompactEmbedding(nn.Embedding(5, 2), torch.tensor([1]))


def test_data_token_ids_reads_every_dataset_and_the_extra_ids():
    datasets = pytest.importorskip("datasets")
    a = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [7, 9]], "labels": [[1, 1, 1], [1, 1]]})
    b = datasets.Dataset.from_dict({"input_ids": [[100, 5]]})
    assert data_token_ids((a, None, b), [151643, 6]).tolist() == [5, 6, 7, 9, 100, 151643]


def test_swapped_for_training_and_put_back_whole():
    model = tiny_model(seed=2).requires_grad_(False)  # LoRA training: the base frozen
    full = model.get_input_embeddings()
    ids = torch.tensor([[1, 5, 9, 5]])
    want = model(input_ids=ids).logits
    restore = compact_input_embedding(model, torch.tensor([9, 1, 5]))
    assert isinstance(model.get_input_embeddings(), CompactEmbedding) and restore.rows == 3
    assert restore.freed_gib == round((full.num_embeddings - 3) * full.embedding_dim * 4 / 2**30, 3)
    assert torch.equal(model(input_ids=ids).logits, want)  # the same vectors for the data's ids
    restore()
    assert model.get_input_embeddings() is full
    assert model(input_ids=torch.tensor([[2, 3]])).logits.shape[:2] == (1, 2)  # any id again


def test_left_whole_where_it_does_not_apply():
    model = tiny_model(seed=2).requires_grad_(False)
    full = model.get_input_embeddings()
    assert compact_input_embedding(model, torch.tensor([1]), "full fine-tuning") is None
    with override(compact_embedding=False):
        assert compact_input_embedding(model, torch.tensor([1])) is None
    full.weight.requires_grad_(True)  # --modules_to_save wte: it trains
    assert compact_input_embedding(model, torch.tensor([1])) is None
    full.weight.requires_grad_(False)
    model.lm_head.weight = full.weight  # tied
    assert compact_input_embedding(model, torch.tensor([1])) is None
    assert model.get_input_embeddings() is full
