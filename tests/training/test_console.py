"""The third-party notices a training run's console leaves out (finetune/training/console.py)."""

import logging

from finetune.training.console import quiet_third_party_notices


def test_accelerates_accumulation_mismatch_notice_is_left_out_only_for_the_trainers_plugin(caplog):
    # transformers' Trainer gives accelerate a GradientAccumulationPlugin of 1 step; under DeepSpeed accelerate then
    # warned of a mismatch with the user's --gradient_accumulation_steps in every run that accumulates
    quiet_third_party_notices()
    quiet_third_party_notices()  # once is enough: the filter is not stacked
    log = logging.getLogger("accelerate.accelerator")  # accelerate's get_logger wraps this one, "[RANK 0] " first
    assert len(log.filters) == 1
    with caplog.at_level(logging.WARNING, logger="accelerate.accelerator"):
        log.warning("[RANK 0] Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed "
                    "config has 8. Using DeepSpeed's value.")
        log.warning("Gradient accumulation steps mismatch: GradientAccumulationPlugin has 4, DeepSpeed config has "
                    "8. Using DeepSpeed's value.")
        log.warning("something else")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("has 1," in m for m in messages)
    assert any("has 4," in m for m in messages) and any("something else" in m for m in messages)


def test_the_model_cards_missing_metadata_notice_is_left_out(caplog, tmp_path):
    # a user's README.md beside the run (--overwrite_output_dir) made PEFT's save log this about a file the run replaces
    from huggingface_hub import ModelCard

    quiet_third_party_notices()
    (tmp_path / "README.md").write_text("# my notes\n")
    with caplog.at_level(logging.WARNING, logger="huggingface_hub.repocard"):
        ModelCard.load(tmp_path / "README.md")
        logging.getLogger("huggingface_hub.repocard").warning("another notice")
    assert [r.getMessage() for r in caplog.records] == ["another notice"]
