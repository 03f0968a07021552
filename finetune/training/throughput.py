"""Steady-state training speed for run_info.json: tokens per second over the optimizer steps after the
first few (compilation, Triton tuning and CUDA-graph capture happen there), summed over processes, and the
peak GPU memory each process reserved. `tokens_per_s` counts real tokens (padding excluded: it is what the
run trains through); `padded_tokens_per_s` the row positions the model computed."""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback

from ..data.encoding import IGNORE


class ThroughputMeter(TrainerCallback):
    def __init__(self, skip_steps: int = 2, pad_id: int | None = None):
        self.skip_steps = skip_steps
        self.pad_id = pad_id  # padding is this id (<|endoftext|>, which chat data never holds) where no mask says
        self.positions = 0  # row positions fed to the model (padding included), this process
        self.real = None  # device tensor: tokens that are not padding, this process
        self.trained = None  # device tensor: positions with a label, this process (no host sync per step)
        self._mark = None  # (time, global step, tokens, trained) when timing started
        self._end = None
        self._first_step = None

    def count(self, inputs: dict) -> None:
        """Called by the trainer for every training micro-batch."""
        ids = inputs.get("input_ids")
        if ids is None:
            return
        self.positions += ids.numel()
        mask = inputs.get("attention_mask")
        if mask is not None:
            n = mask.sum()
        elif self.pad_id is not None:
            n = (ids != self.pad_id).sum()
        else:
            n = torch.tensor(ids.numel(), device=ids.device)
        self.real = n if self.real is None else self.real + n
        labels = inputs.get("labels")
        if labels is not None:
            n = (labels != IGNORE).sum()
            self.trained = n if self.trained is None else self.trained + n

    def _snapshot(self, step: int):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the queued GPU work belongs to the steps already counted
        trained = 0 if self.trained is None else int(self.trained)
        real = 0 if self.real is None else int(self.real)
        return time.perf_counter(), step, real, trained, self.positions

    def on_step_end(self, args, state, control, **kwargs):
        if self._first_step is None:
            self._first_step = state.global_step - 1
        if self._mark is None and state.global_step - self._first_step == self.skip_steps:
            self._mark = self._snapshot(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self._mark is not None:
            self._end = self._snapshot(state.global_step)

    def summary(self, accelerator) -> dict | None:
        """Summed over processes (a collective: every process must call it). None when too few steps ran."""
        device = accelerator.device
        cuda = torch.cuda.is_available()
        # reserved is what the process holds from the driver (what limits a run); allocated is what tensors use of
        # it, the difference the allocator's cache and fragmentation
        peak = [torch.cuda.max_memory_reserved() / 2**30, torch.cuda.max_memory_allocated() / 2**30] if cuda else [0, 0]
        timed = self._mark is not None and self._end is not None and self._end[1] > self._mark[1]
        local = torch.tensor([self._end[i] - self._mark[i] for i in (2, 3, 4)] if timed else [0, 0, 0],
                             dtype=torch.float64, device=device)
        totals = accelerator.reduce(local, reduction="sum")
        peaks = accelerator.gather(torch.tensor([peak], dtype=torch.float64, device=device)).reshape(-1, 2)
        if not timed:
            return None
        seconds = self._end[0] - self._mark[0]
        return {"steps_timed": self._end[1] - self._mark[1], "seconds": round(seconds, 3),
                "tokens": int(totals[0]), "trained_tokens": int(totals[1]), "padded_tokens": int(totals[2]),
                "tokens_per_s": round(float(totals[0]) / seconds, 1),
                "trained_tokens_per_s": round(float(totals[1]) / seconds, 1),
                "padded_tokens_per_s": round(float(totals[2]) / seconds, 1),
                "peak_reserved_gib_per_process": [round(float(p[0]), 2) for p in peaks.tolist()] if cuda else None,
                "peak_allocated_gib_per_process": [round(float(p[1]), 2) for p in peaks.tolist()] if cuda else None}
