"""The non-finite-loss guard (--on_nonfinite_loss), kept on the device so that no training step waits for the GPU.

Each micro-batch's loss sets a flag on the device (`observe`); at the optimizer step the flag, reduced over
processes, decides on the device whether the update is applied (`end_step`): torch's fused Adam/AdamW/SGD/Adagrad
take it as their `found_inf` (what GradScaler passes them; with fp16 the scaler's own flag is kept), so the kernel
itself leaves parameters and optimizer state untouched. With "skip" only that step's update is dropped; with
"stop" the flag stays set from the first bad step on, so no later update is applied either until the host reads
the state (`snapshot`, then `verdict`) and stops the run naming that first step. The global step counter and the
LR schedule advance over skipped steps as over any other.

Optimizers that do not take `found_inf` (any other --optim) read the flag on the host at each step (one sync per
step, as before); under DeepSpeed the engine applies the update inside the backward pass, before any check can
run, so "stop" stops at the next read (and, as everywhere, before any checkpoint is written).
"""

from __future__ import annotations

import math

import torch

# torch optimizers whose fused kernels skip the update (and undo their step count) when `found_inf` is set
_FOUND_INF_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


class NonFiniteLossError(RuntimeError):
    pass


def takes_found_inf(optimizer) -> bool:
    """Whether `optimizer` (a torch optimizer, unwrapped) skips its update on the device given `found_inf`."""
    return (isinstance(optimizer, _FOUND_INF_OPTIMIZERS) and bool(optimizer.defaults.get("fused"))
            and getattr(optimizer, "_step_supports_amp_scaling", False))


def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's (or anyone's) wrapper."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class NonFiniteGuard:
    """Device-side state of the guard. Every tensor is 0-dim on the loss's device, made on first use."""

    SNAPSHOT = ("bad_total", "count", "first_step", "first_loss")

    def __init__(self, mode: str):
        if mode not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite_loss must be stop or skip, got {mode!r}")
        self.mode = mode
        self.device = None
        self.found_inf = None

    def _init(self, device):
        self.device = device
        f = lambda: torch.zeros((), dtype=torch.float32, device=device)  # noqa: E731
        i = lambda: torch.zeros((), dtype=torch.int64, device=device)  # noqa: E731
        self.pending, self.pending_loss = f(), f()  # this optimizer step, this process: any bad loss, the first one
        self.found_inf = f()  # 1: the optimizer must not apply this step (what fused kernels read)
        self.bad_total = i()  # steps with a non-finite loss, whole run
        self.count, self.first_step, self.first_loss = i(), i(), f()  # since the last snapshot
        self._step_no = i()

    # -- on the device, every micro-batch / step; nothing here reads a value on the host ------------------------
    def observe(self, loss: torch.Tensor) -> torch.Tensor:
        """Record one micro-batch's (detached) loss; returns whether it is finite (a device bool)."""
        if self.device is None:
            self._init(loss.device)
        loss = loss.detach().float().reshape(())
        finite = torch.isfinite(loss)
        first = (~finite) & (self.pending == 0)
        self.pending_loss.copy_(torch.where(first, loss, self.pending_loss))
        self.pending.copy_(torch.maximum(self.pending, (~finite).float()))
        return finite

    def end_step(self, step_no: int, world_size: int = 1) -> torch.Tensor:
        """The optimizer step `step_no` (1-based) is about to run: fold its micro-batches' flags (every process
        agrees: a MAX all-reduce, queued like any collective) and return `found_inf` for it."""
        if self.device is None:
            return None
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(self.pending, op=dist.ReduceOp.MAX)
        bad = self.pending > 0
        first = bad & (self.count == 0)
        self._step_no.fill_(step_no)  # a fill kernel: the step number goes to the device without a sync
        self.first_step.copy_(torch.where(first, self._step_no, self.first_step))
        self.first_loss.copy_(torch.where(first, self.pending_loss, self.first_loss))
        self.count.add_(bad.long())
        self.bad_total.add_(bad.long())
        skip = bad if self.mode == "skip" else self.bad_total > 0  # stop: held from the first bad step on
        self.found_inf.copy_(skip.float())
        self.pending.zero_()
        self.pending_loss.zero_()
        return self.found_inf

    def snapshot(self) -> torch.Tensor | None:
        """The state to read on the host (float32, in SNAPSHOT order); the since-last-snapshot part restarts."""
        if self.device is None:
            return None
        out = torch.stack([self.bad_total.float(), self.count.float(), self.first_step.float(), self.first_loss])
        self.count.zero_()
        self.first_step.zero_()
        self.first_loss.zero_()
        return out

    # -- on the host, when a snapshot has been read -----------------------------------------------------------
    def verdict(self, values, epoch: float | None = None) -> str | None:
        """Raise NonFiniteLossError (stop) or return the warning to log (skip) for a read snapshot; None when
        nothing happened since the previous one."""
        bad_total, count, first_step, first_loss = values
        if not count:
            return None
        first_step, loss = int(first_step), _loss_text(first_loss)
        if self.mode == "stop":
            where = f"step {first_step}" + (f" (epoch {epoch:.2f})" if epoch is not None else "")
            raise NonFiniteLossError(
                f"the loss is {loss} at {where}; stopped without applying it. Lower --learning_rate, use --bf16 "
                "instead of --fp16, or check the data (--on_nonfinite_loss skip skips such steps); the last "
                "checkpoint is intact")
        if count == 1:
            return f"step {first_step}: the loss is {loss}; the optimizer step is skipped ({int(bad_total)} skipped so far)"
        return (f"steps {first_step} on: {int(count)} optimizer steps skipped for a non-finite loss (the first: "
                f"{loss}; {int(bad_total)} skipped so far)")


def _loss_text(value: float) -> str:
    return str(value) if not math.isfinite(value) else "non-finite on another process"


class FoundInfHooks:
    """Step hooks on a torch optimizer that take `found_inf` (see `takes_found_inf`): before each step the
    guard's flag becomes the optimizer's `found_inf`, merged with one GradScaler has set (fp16); after it, the
    attribute is as it was (GradScaler deletes its own)."""

    def __init__(self, optimizer, guard: NonFiniteGuard):
        self.guard = guard
        self._theirs = []
        self.handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    def _pre(self, opt, args, kwargs):
        theirs = getattr(opt, "found_inf", None)
        self._theirs.append(theirs)
        ours = self.guard.found_inf
        if ours is not None:
            opt.found_inf = ours if theirs is None else torch.maximum(theirs, ours.to(theirs.device))

    def _post(self, opt, args, kwargs):
        theirs = self._theirs.pop()
        if theirs is None:
            if hasattr(opt, "found_inf"):
                del opt.found_inf
        else:
            opt.found_inf = theirs

    def remove(self):
        for h in self.handles:
            h.remove()
