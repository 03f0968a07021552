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
    # matplotlib (the loss curve) logs building its font cache at INFO, which the trainer's log level shows
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    # DeepSpeed is imported by accelerate whenever it is installed, used or not, and on a machine without a GPU
    # it logs "Setting accelerator to CPU ... unable to detect it". Naming the accelerator is what it asks for.
    # Checked without initialising CUDA (the device count comes from NVML where it can).
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
