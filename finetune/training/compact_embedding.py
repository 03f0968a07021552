"""The frozen input embedding cut down to the rows the training data uses, for the length of training.

Why: Qwen's input embedding is 152,064 x 5,120 fp16 on the 14B model, 1.45 GiB of GPU memory, and a LoRA run never
trains it; a fine-tuning set uses a small share of the vocabulary (the benchmark chats a few thousand ids, real
chat sets tens of thousands). Every id the run will feed the model is known before training starts (the tokenized
train and eval sets, the special tokens the collator pads with), so the embedding keeps those rows on the GPU and
a lookup table maps each id to its row: the same vectors for every id the data holds, and the memory freed goes
to what the run can use (``--gradient_checkpointing_keep_gib``). The full table waits in CPU memory (1.45 GiB a
process on 14B) and goes back in place before evaluation and saving, so nothing after training sees the difference.

Not used where the embedding trains (``--modules_to_save wte``), is tied to the output layer, is partitioned
(ZeRO-3) or offloaded (an accelerate hook), or with ``FINETUNE_COMPACT_EMBEDDING=0``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..settings import settings

logger = logging.getLogger(__name__)


class CompactEmbedding(nn.Module):
    """Stands in for a frozen ``nn.Embedding``: ``weight`` holds the rows of ``ids`` (sorted), ``remap`` [vocab]
    maps an id to its row. An id outside ``ids`` reads row 0 (the graphed step cannot raise): the caller makes
    ``ids`` cover every id it will feed (``data_token_ids``)."""

    def __init__(self, full: nn.Embedding, ids: torch.Tensor):
        super().__init__()
        if full.weight.requires_grad:
            raise ValueError("CompactEmbedding stands in for a frozen embedding only")
        device = full.weight.device
        ids = torch.unique(ids.to(torch.long)).to(device)
        if ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= full.num_embeddings:
            raise ValueError(f"token ids must lie in [0, {full.num_embeddings}), got {ids.numel()} ids "
                             f"from {int(ids[0]) if ids.numel() else None} to {int(ids[-1]) if ids.numel() else None}")
        self.num_embeddings, self.embedding_dim = full.num_embeddings, full.embedding_dim
        self.padding_idx = full.padding_idx
        self.weight = nn.Parameter(full.weight.detach()[ids].clone(), requires_grad=False)
        remap = torch.zeros(full.num_embeddings, dtype=torch.long, device=device)
        remap[ids] = torch.arange(ids.numel(), device=device)
        self.register_buffer("remap", remap, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.remap[input_ids], self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} of {self.num_embeddings} rows, {self.embedding_dim}"


def data_token_ids(datasets, extra_ids) -> torch.Tensor:
    """Every token id of the ``input_ids`` column of each dataset given (None skipped), and ``extra_ids``."""
    import numpy as np
    import pyarrow.compute as pc

    found = [np.asarray(list(extra_ids), dtype=np.int64)]
    for ds in datasets:
        if ds is None:
            continue
        table = ds.data.table if hasattr(ds.data, "table") else ds.data
        if "input_ids" not in table.column_names:
            raise ValueError(f"a dataset without an input_ids column (columns: {', '.join(table.column_names)})")
        column = table.column("input_ids")
        for chunk in column.chunks:
            found.append(pc.unique(pc.list_flatten(chunk)).to_numpy(zero_copy_only=False).astype(np.int64))
    return torch.from_numpy(np.unique(np.concatenate(found)))


def compact_input_embedding(lm, ids: torch.Tensor, why_not: str | None = None):
    """Swap ``lm``'s input embedding for a CompactEmbedding of ``ids`` and return a function that puts the full one
    back (None, and nothing swapped, where it does not apply: ``why_not`` given by the caller, a trained, tied or
    offloaded embedding, or the switch off). The full table moves to CPU memory meanwhile."""
    full = lm.get_input_embeddings()
    reason = why_not
    if reason is None and not settings().compact_embedding:
        reason = "FINETUNE_COMPACT_EMBEDDING=0"
    elif reason is None and type(full) is not nn.Embedding:
        reason = f"the input embedding is a {type(full).__name__}"
    elif reason is None and full.weight.requires_grad:
        reason = "the input embedding trains"
    elif reason is None and any(full.weight is p for p in lm.get_output_embeddings().parameters()):
        reason = "the input embedding is tied to the output layer"
    elif reason is None and (hasattr(full, "_hf_hook") or full.weight.device.type == "meta"):
        reason = "the input embedding is offloaded"
    if reason is not None:
        logger.info("input embedding: kept whole (%s)", reason)
        return None
    device = full.weight.device
    on_gpu = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if on_gpu else 0
    compact = CompactEmbedding(full, ids)
    compact._forward_hooks.update(full._forward_hooks)  # PEFT's inputs-require-grad hook, if it set one
    compact._forward_pre_hooks.update(full._forward_pre_hooks)
    full.to("cpu")
    lm.set_input_embeddings(compact)
    if on_gpu:
        # give the table's block back to the driver: held in PyTorch's cache it would serve only allocations outside
        # the CUDA graphs' private pool (NOTES step 53)
        torch.cuda.empty_cache()
        # what the allocator really got back (the compact rows and the lookup table taken off): a reference to the
        # old table held elsewhere would keep it on the GPU, and the keep budget must not count it then
        freed = max(0, before - torch.cuda.memory_allocated(device))
    else:
        freed = (full.num_embeddings - compact.weight.shape[0]) * full.embedding_dim * full.weight.element_size()
    logger.info("input embedding: %d of %d rows on %s (the tokens of the training data), %.2f GiB freed for "
                "training", compact.weight.shape[0], full.num_embeddings, device, freed / 2**30)

    def restore():
        full.to(device)
        lm.set_input_embeddings(full)

    restore.rows, restore.freed_bytes, restore.freed_gib = compact.weight.shape[0], freed, round(freed / 2**30, 3)
    return restore


__all__ = ["CompactEmbedding", "compact_input_embedding", "data_token_ids"]
