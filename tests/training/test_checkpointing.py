"""--gradient_checkpointing_keep_gib's arithmetic (finetune/training/checkpointing.py): how many blocks a budget
buys and which; the model-level behaviour (what is recomputed, same gradients) is in
tests/quant/test_quant_model.py."""

from __future__ import annotations

from types import SimpleNamespace

from finetune.training.checkpointing import GIB, keep_mlp_projections, kept_block_bytes

QWEN_14B = SimpleNamespace(hidden_size=5120, intermediate_size=27392)


def _blocks(n):
    return [SimpleNamespace(keep_mlp_projections=False) for _ in range(n)]


def test_a_14b_block_at_2048_bf16_tokens_costs_w1_w2_outputs_and_two_input_copies():
    assert kept_block_bytes(QWEN_14B, 2048, 2) == 2048 * (2 * 13696 + 2 * 5120) * 2  # 154 MB


def test_the_budget_buys_the_last_blocks_it_covers():
    per = kept_block_bytes(QWEN_14B, 2048, 2)
    blocks = _blocks(40)
    assert keep_mlp_projections(blocks, QWEN_14B, 1.0, 2048, 2) == GIB // per == 6
    assert [b.keep_mlp_projections for b in blocks] == [False] * 34 + [True] * 6
    # twice the tokens a micro-batch: half the blocks; a budget past the model: every block; 0: none (cleared)
    assert keep_mlp_projections(blocks, QWEN_14B, 1.0, 4096, 2) == 3 and sum(b.keep_mlp_projections for b in blocks) == 3
    assert keep_mlp_projections(blocks, QWEN_14B, 100.0, 2048, 2) == 40
    assert keep_mlp_projections(blocks, QWEN_14B, 0.0, 2048, 2) == 0
    assert not any(b.keep_mlp_projections for b in blocks)
