"""Device values read on the host one optimizer step late, so that reading them does not stall the GPU.

`.item()` on a CUDA tensor waits for everything queued before it on the stream. A `HostRead` instead copies
its values into pinned host memory without blocking and records an event after the copy; `values()` waits for
that event only. The trainer stages a step's values (loss, gradient norm, the non-finite guard's state) after
the step is queued and reads them after the next step is queued: the wait then covers the step already on the
GPU, never the one the host has just queued, and the host keeps one step ahead. On the CPU the values are simply
there.
"""

from __future__ import annotations

import torch


class HostRead:
    def __init__(self, values: torch.Tensor):
        """`values`: a 1-D tensor (on any device), read later with `values()`."""
        if values.is_cuda:
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = values, None

    def values(self) -> list[float]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()
