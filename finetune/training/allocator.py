"""The CUDA caching allocator's setting for a training process: expandable segments unless the user chose.

Why: a training run's tensors come and go in many sizes (activations per block, the kept MLP projections, the loss
chunks, the optimizer's buffers), and with fixed segments the allocator holds blocks it cannot reuse for the next
size: on the 14B model with 2048-token rows it held 17.5 GiB from the driver for 14.7 GiB of tensors. Expandable
segments grow one mapping a pool instead, so freed pages serve any later size: 16.9 GiB held there, the same speed
(benchmarks/NOTES.md step 55). The variable is read once, when the process first touches CUDA, so this runs
before anything else in ``train``'s ``main``. A value the user set (PYTORCH_CUDA_ALLOC_CONF or the newer
PYTORCH_ALLOC_CONF, even empty) stays as it is; ``expandable_segments:False`` turns it off.
"""

from __future__ import annotations

import os

TRAINING_ALLOC_CONF = "expandable_segments:True"


def allocator_settings(environ=os.environ) -> str | None:
    """The allocator variable's value as set (PYTORCH_CUDA_ALLOC_CONF, else PYTORCH_ALLOC_CONF); None where neither
    is set."""
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        if name in environ:
            return environ[name]
    return None


def default_allocator_settings(environ=os.environ) -> str | None:
    """Set PYTORCH_CUDA_ALLOC_CONF to TRAINING_ALLOC_CONF where neither allocator variable is set; returns the
    setting now in force (None: torch's defaults)."""
    chosen = allocator_settings(environ)
    if chosen is not None:
        return chosen or None
    environ["PYTORCH_CUDA_ALLOC_CONF"] = TRAINING_ALLOC_CONF
    return TRAINING_ALLOC_CONF


__all__ = ["TRAINING_ALLOC_CONF", "allocator_settings", "default_allocator_settings"]
