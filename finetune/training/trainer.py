"""transformers' Trainer with what fine-tuning here needs on top: autocast for fp32 adapters on a
half-precision base, a stop on (or a skip of) a non-finite loss, and checkpoints that appear only once complete
and record the run that wrote them."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data import ChatCollator, PackedCollator
from .checks import CHECKPOINT_RUN
from .throughput import ThroughputMeter

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


# Unpacked rows under CUDA graphs are padded to a multiple of this: a few shapes (one graph each), at most
# 127 padding tokens a row, and FlexAttention's block size.
GRAPH_PAD_MULTIPLE = 128


def make_collator(tokenizer, data_args, for_graphs: bool = False):
    """Batches padded to their longest row. For CUDA graphs (`for_graphs`) a step must have one of a few shapes
    and no attention_mask: packed rows are padded to --model_max_length (one shape), unpacked rows to a
    multiple of GRAPH_PAD_MULTIPLE, their padding laid out as a sequence of its own (PackedCollator)."""
    if data_args.packing:
        return PackedCollator(pad_id=tokenizer.eod_id,
                              pad_to_multiple_of=data_args.model_max_length if for_graphs else None)
    if for_graphs:
        return PackedCollator(pad_id=tokenizer.eod_id,
                              pad_to_multiple_of=min(GRAPH_PAD_MULTIPLE, data_args.model_max_length))
    return ChatCollator(pad_id=tokenizer.eod_id)


class QwenTrainer(Trainer):
    def __init__(self, *a, precision=None, plan=None, graphs=None, **kw):
        super().__init__(*a, **kw)
        self.graphs = graphs  # a training.graphs.TrainGraphs: the training forwards replay as CUDA graphs
        self.meter = ThroughputMeter(pad_id=getattr(self.processing_class, "eod_id", None))
        self.add_callback(self.meter)
        self.precision = precision  # training.precision.Precision, decided once in train.py
        self.plan = plan
        self._staging_dir = None
        self._lora_layers = None  # PEFT tuner layers, found on first use
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss (--on_nonfinite_loss skip)
        self._nonfinite = None  # the first non-finite micro-batch loss of the current step, if any

    # -- precision --------------------------------------------------------------------------------------
    def _autocast(self):
        # Adapters (fp32) on a bf16 base: run the forward under autocast so their matmuls use bf16 too.
        # Full fine-tuning and fp16 use transformers' own mixed precision instead (training/precision.py).
        if self.precision is not None and self.precision.trainer_autocast:
            stack = contextlib.ExitStack()
            stack.enter_context(torch.autocast(device_type=self.args.device.type, dtype=torch.bfloat16))
            stack.enter_context(self._no_lora_input_casts())
            return stack
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _no_lora_input_casts(self):
        """PEFT would cast each LoRA input up to the fp32 adapter dtype: two needless full-size copies a layer,
        since autocast runs the adapter matmuls in bf16 anyway. Off for the forward, back on afterwards (the
        model must still work outside autocast). The layers are found once, not on every step."""
        if self._lora_layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._lora_layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        saved = [m.cast_input_dtype_enabled for m in self._lora_layers]
        for m in self._lora_layers:
            m.cast_input_dtype_enabled = False
        try:
            yield
        finally:
            for m, flag in zip(self._lora_layers, saved):
                m.cast_input_dtype_enabled = flag

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self._autocast():
            if self.graphs is not None and not return_outputs and self.graphs.applies(inputs):
                return self.graphs(model, inputs, num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def release_graphs(self) -> dict | None:
        """Free the captured step's memory and put the LoRA dropout modules back; what the graphs did (None
        when the run trained without them)."""
        if self.graphs is None:
            return None
        self.graphs.close()
        stats, self.graphs = self.graphs.stats(), None
        return stats

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with self._autocast():
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    # -- a non-finite loss stops the run (or, with skip, its step) before any optimizer step uses it --------
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.meter.count(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            if self.args.on_nonfinite_loss != "skip":
                raise NonFiniteLossError(
                    f"the loss is {loss.item()} at step {self.state.global_step + 1} (epoch {self.state.epoch:.2f}); "
                    "stopping before the optimizer applies it. Lower --learning_rate, use --bf16 instead of --fp16, "
                    "or check the data (--on_nonfinite_loss skip skips such steps); the last checkpoint is intact")
            if self._nonfinite is None:
                self._nonfinite = loss.item()
        if self.args.on_nonfinite_loss == "skip":
            self._guard_optimizer()
        return loss

    def _guard_optimizer(self):
        """Wrap the (accelerate-prepared) optimizer's step once: a step whose gradients come from a non-finite
        loss on any process is not applied; the gradients are then zeroed by the loop as after every step."""
        opt = self.optimizer
        if getattr(opt, "_skips_nonfinite", False):
            return
        step = opt.step

        @functools.wraps(step)  # keeps the marks torch's LR scheduler puts on the step it wraps
        def guarded_step(*a, **k):
            bad = self._nonfinite is not None
            if self.args.world_size > 1:  # every process skips together, or none does
                import torch.distributed as dist

                flag = torch.tensor(float(bad), device=self.args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                bad = bool(flag.item())
            loss, self._nonfinite = self._nonfinite, None
            if bad:
                self.skipped_steps += 1
                logger.warning("step %d: the loss is %s; the optimizer step is skipped (%d skipped so far)",
                               self.state.global_step + 1, loss if loss is not None else "non-finite on another process",
                               self.skipped_steps)
                if getattr(self.accelerator, "scaler", None) is not None:
                    # fp16's GradScaler has unscaled these gradients: its step sees them non-finite, skips the
                    # update itself and lowers the scale (bypassing it would leave the scaler mid-step)
                    return step(*a, **k)
                return None
            return step(*a, **k)

        opt.step = guarded_step
        opt._skips_nonfinite = True

    # -- atomic checkpoints ------------------------------------------------------------------------------
    def _get_output_dir(self, trial):
        if self._staging_dir is not None:
            return self._staging_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """Write checkpoint-N into a staging dir, then rename it into place: a run killed mid-save leaves no
        half-written checkpoint-N for a resume to pick up."""
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, ".staging")
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every rank has written its shards and RNG state
        final = os.path.join(run_dir, name)
        if self.args.should_save:
            if self.plan is not None and self.plan.identity:  # a resume checks that it continues this run
                with open(os.path.join(staging, name, CHECKPOINT_RUN), "w") as f:
                    json.dump(self.plan.identity, f, indent=2)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
                self.state.best_model_checkpoint = run_dir + self.state.best_model_checkpoint[len(staging):]
                self.state.save_to_json(os.path.join(final, "trainer_state.json"))
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()
