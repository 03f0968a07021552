"""What a training run's console shows: the notices third-party code prints that say nothing to the user.

The project's own causes are fixed where they arise (the renamed checkpointing flags are translated in
arguments.py, train.py calls the new checkpointing API and states the tokenizer's special tokens in the model
config, the model answers PEFT's read of the deprecated `is_gradient_checkpointing` without transformers'
warning). What is left is silenced here, each by its exact source, never by a broad filter.
"""

from __future__ import annotations

import logging
import os
import warnings


def quiet_third_party_notices() -> None:
    # torch 2.13 deprecated all_gather_into_tensor, which DeepSpeed's ZeRO calls every step: one FutureWarning per
    # process about DeepSpeed's code, not the user's
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    # transformers' Trainer counts gradient accumulation itself and hands accelerate a plugin of 1 step, so under
    # DeepSpeed accelerate warns of a "mismatch" with the config's value (the --gradient_accumulation_steps the
    # user gave, filled in for "auto") in every run that accumulates; a real difference between the flag and the
    # config stops the run before loading (checks.deepspeed_config), so the warning only misleads
    accelerate_log = logging.getLogger("accelerate.accelerator")
    if not any(isinstance(f, _TrainerAccumulationNotice) for f in accelerate_log.filters):
        accelerate_log.addFilter(_TrainerAccumulationNotice())
    # PEFT's save_pretrained reads the README.md already in the dir it saves to (a user's, beside the run under
    # --overwrite_output_dir) as a model card, and huggingface_hub then warns that it has no metadata block: about a
    # file the run replaces with its own card when it ends (training/model_card.py)
    card_log = logging.getLogger("huggingface_hub.repocard")
    if not any(isinstance(f, _NoCardMetadataNotice) for f in card_log.filters):
        card_log.addFilter(_NoCardMetadataNotice())
    # matplotlib (the loss curve) logs building its font cache at INFO, which the trainer's log level shows
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    # DeepSpeed is imported by accelerate whenever it is installed, used or not, and on a machine without a GPU
    # it logs "Setting accelerator to CPU ... unable to detect it". Naming the accelerator is what it asks for.
    # Checked without initialising CUDA (the device count comes from NVML where it can).
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


class _TrainerAccumulationNotice(logging.Filter):
    """Drops accelerate's "Gradient accumulation steps mismatch" warning where its plugin holds the 1 step that
    transformers' Trainer always gives it (any other count is let through)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1," not in record.getMessage()


class _NoCardMetadataNotice(logging.Filter):
    """Drops huggingface_hub's "Repo card metadata block was not found" (nothing else of its repocard logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Repo card metadata block was not found")
