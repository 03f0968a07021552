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
    assert keep_mlp_projections(blocks, QWEN_14B, 1.0, 4096, 2) == 3
    assert sum(b.keep_mlp_projections for b in blocks) == 3
    assert keep_mlp_projections(blocks, QWEN_14B, 100.0, 2048, 2) == 40
    assert keep_mlp_projections(blocks, QWEN_14B, 0.0, 2048, 2) == 0
    assert not any(b.keep_mlp_projections for b in blocks)


def test_the_memory_estimate_counts_the_kept_projections():
    from finetune.training.memory import estimate_memory

    cfg = {"hidden_size": 5120, "num_hidden_layers": 40, "intermediate_size": 27392}
    lora = SimpleNamespace(lora_r=64, lora_target_modules=["w1"], modules_to_save=None)
    data = SimpleNamespace(model_max_length=2048)

    def activations(keep_gib, checkpointing=True):
        args = SimpleNamespace(bf16=True, fp16=False, optim="adamw_torch", per_device_train_batch_size=1,
                               world_size=1, gradient_checkpointing=checkpointing,
                               gradient_checkpointing_keep_gib=keep_gib)
        return estimate_memory(cfg, {}, "lora", lora, data, args, "cuda:0", None).activations

    # the budget is added whole while the blocks can take it, never more than keeping every block costs, and
    # not at all without checkpointing
    assert abs(activations(1.0) - activations(0.0) - GIB) < 2048 * 2
    assert activations(1000.0) - activations(0.0) == 40 * kept_block_bytes(SimpleNamespace(**cfg), 2048, 2)
    assert activations(1.0, checkpointing=False) == activations(0.0, checkpointing=False)


def test_the_keep_budget_unset_is_one_gib_plus_what_the_compact_embedding_freed():
    from types import SimpleNamespace

    from finetune.training.arguments import parse_args
    from finetune.training.checkpointing import keep_budget_gib

    assert keep_budget_gib(SimpleNamespace(gradient_checkpointing_keep_gib=None), 1.4) == 2.4
    assert keep_budget_gib(SimpleNamespace(gradient_checkpointing_keep_gib=0.5), 1.4) == 0.5  # given: as given
    assert keep_budget_gib(SimpleNamespace(gradient_checkpointing_keep_gib=0.0), 1.4) == 0.0
    assert keep_budget_gib(SimpleNamespace()) == 0.0
    base = ["--model_name_or_path", "m", "--data_path", "d.json", "--output_dir", "o"]
    assert parse_args(base)[3].gradient_checkpointing_keep_gib is None
    assert parse_args(base + ["--gradient_checkpointing_keep_gib", "2.5"])[3].gradient_checkpointing_keep_gib == 2.5
