"""Which blocks keep their MLP projections under activation checkpointing (``--gradient_checkpointing_keep_gib``).

A checkpointed block recomputes ln_2, w1 and w2 in the backward pass (two of its five big matmuls, ~0.9 ms of a
2048-token micro-batch of the 14B model on an H200). A block with ``keep_mlp_projections`` computes them outside
the checkpoint and saves what their backward needs instead: per token w1's and w2's outputs (2 x the MLP width)
and at most two copies of their input (the adapters' dropped inputs, 2 x the hidden size), in the compute dtype.
The budget buys that for as many blocks as it covers, the last ones (the backward reaches and frees them first).
"""

from __future__ import annotations

GIB = 1 << 30


DEFAULT_KEEP_GIB = 1.0  # --gradient_checkpointing_keep_gib unset: this, plus what the compact input embedding frees


def keep_budget_gib(args, freed_gib: float = 0.0) -> float:
    """--gradient_checkpointing_keep_gib as a number: the value given, else DEFAULT_KEEP_GIB plus ``freed_gib`` (the
    GiB the compact input embedding gave back, training/compact_embedding.py); 0 for arguments without the flag."""
    value = getattr(args, "gradient_checkpointing_keep_gib", 0)
    return float(value) if value is not None else DEFAULT_KEEP_GIB + freed_gib


def kept_values_per_token(hidden_size: int, mlp_width: int) -> int:
    """Values a block keeping its MLP projections holds a token: w1's and w2's outputs and two input copies."""
    return 2 * mlp_width + 2 * hidden_size


def kept_block_bytes(config, tokens: int, act_bytes: int) -> int:
    """What keeping one block's MLP projections costs for a micro-batch of ``tokens`` (an upper bound)."""
    width = config.intermediate_size // 2  # Qwen v1: w1 and w2 are each half the configured size
    return tokens * kept_values_per_token(config.hidden_size, width) * act_bytes


def keep_mlp_projections(blocks, config, budget_gib: float, tokens: int, act_bytes: int) -> int:
    """Set ``keep_mlp_projections`` on the last blocks that ``budget_gib`` covers (and clear it on the others);
    returns how many."""
    per_block = kept_block_bytes(config, tokens, act_bytes)
    kept = min(len(blocks), int(budget_gib * GIB) // per_block) if per_block > 0 else 0
    for i, block in enumerate(blocks):
        block.keep_mlp_projections = i >= len(blocks) - kept
    return kept
