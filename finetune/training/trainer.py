"""transformers' Trainer with what fine-tuning here needs on top: autocast for fp32 adapters on a
half-precision base, a stop on (or a skip of) a non-finite loss, and checkpoints that appear only once complete
and record the run that wrote them."""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
import json
import logging
import os
import shutil
import time

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data import ChatCollator, PackedCollator
from ..data.collator import padded_len
from ..file_modes import weights_readable
from ..checkpoint import checkpoints
from .checks import CHECKPOINT_RUN, STAGING
from .host_read import HostRead
from .nonfinite import FoundInfHooks, NonFiniteGuard, NonFiniteLossError, takes_found_inf, unwrap_optimizer  # noqa: F401  (NonFiniteLossError: re-exported for train.py)
from .throughput import ThroughputMeter

logger = logging.getLogger(__name__)


# Unpacked rows under CUDA graphs are padded to a multiple of this: a few shapes (one graph each), at most
# 127 padding tokens a row, and FlexAttention's block size.
GRAPH_PAD_MULTIPLE = 128


def make_collator(tokenizer, data_args, for_graphs: bool = False):
    """Batches padded to their longest row. For CUDA graphs (`for_graphs`) a step must have one of a few shapes
    and no attention_mask: packed rows are padded to --model_max_length (one shape), unpacked rows to a
    multiple of GRAPH_PAD_MULTIPLE, their padding laid out as a sequence of its own (PackedCollator)."""
    if for_graphs:
        return PackedCollator(pad_id=tokenizer.eod_id, pad_to_multiple_of=_graph_pad_multiple(data_args))
    if data_args.packing:
        return PackedCollator(pad_id=tokenizer.eod_id)
    return ChatCollator(pad_id=tokenizer.eod_id)


def _graph_pad_multiple(data_args) -> int:
    """What graphed batches pad their rows to a multiple of: the row length for packed rows (one shape),
    GRAPH_PAD_MULTIPLE for unpacked ones."""
    return data_args.model_max_length if data_args.packing else min(GRAPH_PAD_MULTIPLE, data_args.model_max_length)


def graph_step_shapes(lengths, data_args, batch_size: int) -> list[tuple[int, int]]:
    """The (rows, tokens) shapes of the batches ``make_collator(for_graphs=True)`` makes from rows of these
    lengths, the most common first: one per padded length that some row has (a batch takes its longest row's; packed
    rows all pad to --model_max_length). A last, smaller batch is left out."""
    lengths = list(lengths)
    rows = min(batch_size, len(lengths))
    multiple = _graph_pad_multiple(data_args)
    counts = Counter(padded_len(n, multiple) for n in lengths)
    return [(rows, T) for T in sorted(counts, key=lambda t: (-counts[t], -t))]


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
        self.guard = NonFiniteGuard(self.args.on_nonfinite_loss)
        self._guard_route = None  # "device", "host" or "none": see _install_guard
        self._found_inf_hooks = None
        self._skip_this_step = False
        self.add_callback(_OptimizerStepHook(self))
        # transformers' filter of non-finite losses from the logged loss reads each loss on the host; done on the
        # device in training_step instead
        self._filter_logged_loss = self.args.logging_nan_inf_filter
        self._step_learning_rate = None  # under DeepSpeed: the LR of the step in progress, read as it begins
        self.args.logging_nan_inf_filter = False
        self._record = None  # the last optimizer step's values, staged for the host (see _maybe_log_save_evaluate)
        self._param_count = None
        if self.label_smoother is not None and self.compute_loss_func is None:
            # transformers shifts the labels for label smoothing only for models in its own causal-LM table, which
            # Qwen v1 is not in: each position was scored against its own token (QwenLM/Qwen issue 834)
            self.compute_loss_func = self._smoothed_next_token_loss

    def _smoothed_next_token_loss(self, outputs, labels, num_items_in_batch=None):
        return self.label_smoother(outputs, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)

    # -- precision --------------------------------------------------------------------------------------
    def _autocast(self):
        # Adapters (fp32) on a bf16 base: run the forward under autocast so their matmuls use bf16 too.
        # Full fine-tuning and fp16 use transformers' own mixed precision instead (training/precision.py).
        if self._own_autocast():
            stack = contextlib.ExitStack()
            stack.enter_context(torch.autocast(device_type=self.args.device.type, dtype=torch.bfloat16))
            stack.enter_context(self._no_lora_input_casts())
            return stack
        return contextlib.nullcontext()

    def _own_autocast(self) -> bool:
        """Whether the trainer runs the forwards under its own bf16 autocast (training/precision.py)."""
        return self.precision is not None and self.precision.trainer_autocast

    def _lora_input_casts_off(self):
        """_no_lora_input_casts where the forward runs under the trainer's autocast, else nothing."""
        return self._no_lora_input_casts() if self._own_autocast() else contextlib.nullcontext()

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

    def capture_graphs(self, shapes, pad_id: int) -> list[tuple[int, int]]:
        """Capture the training steps of these (rows, tokens) shapes before training (TrainGraphs.prepare), in the
        context the training forwards run in; the shapes captured."""
        if self.graphs is None:
            return []
        return self.graphs.prepare(shapes, pad_id, context=self._autocast)

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

    # -- the training step: no host read of a device value (see nonfinite.py and host_read.py) -------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.meter.count(inputs)
        # The backward pass of a checkpointed block runs its forward again: with the LoRA inputs uncast, as the
        # forward ran them (cast, the recomputed tensors were fp32 where the saved ones were bf16, and torch's
        # checkpoint stopped the run with a CheckpointError: --bf16 LoRA on a float model, every eager step)
        with self._lora_input_casts_off():
            loss = super().training_step(model, inputs, num_items_in_batch)
        finite = self.guard.observe(loss)
        if self._filter_logged_loss:
            # transformers' logging_nan_inf_filter (off in its loop: it reads every loss on the host), on the
            # device: a non-finite loss counts in the logged mean as the mean of the others since the last log
            loss = torch.where(finite, loss,
                               self._tr_loss / (1 + self.state.global_step - self._globalstep_last_logged))
        return loss

    def _note_step_learning_rate(self):
        """Under DeepSpeed, the LR this optimizer step applies, read before it runs. transformers logs the LR it
        reads after the optimizer step, before its own scheduler step; where DeepSpeed owns the scheduler (a config
        with an optimizer block, as ds_configs/zero2_offload.json) the engine has stepped it inside the backward
        pass by then, and each log line showed the next step's LR (0.0003 for a warmup step that applied 0)."""
        if self.is_deepspeed_enabled and self.lr_scheduler is not None:
            self._step_learning_rate = self._get_learning_rate()

    def _begin_optimizer_step(self):
        """Called before each optimizer step (callback below): the guard decides on the device whether it applies."""
        found_inf = self.guard.end_step(self.state.global_step + 1, self.args.world_size)
        if self._guard_route is None:
            self._guard_route = self._install_guard()
        if self._guard_route == "host" and found_inf is not None and bool(found_inf):  # a sync: other --optim only
            if self.guard.mode == "stop":
                self._read_now()  # raises, naming the step
            self._skip_this_step = True

    def _install_guard(self) -> str:
        """How a step the guard rejects is kept from being applied: "device" (the fused optimizer's found_inf),
        "host" (the step is not called; the flag is read at every step) or "none" (DeepSpeed applies the update
        inside the backward pass; the run stops at the next read)."""
        if self.is_deepspeed_enabled:
            return "none"
        inner = unwrap_optimizer(self.optimizer)
        if takes_found_inf(inner):
            self._found_inf_hooks = FoundInfHooks(inner, self.guard)
            return "device"
        opt = self.optimizer
        step = opt.step

        @functools.wraps(step)  # keeps the marks torch's LR scheduler puts on the step it wraps
        def guarded_step(*a, **k):
            skip, self._skip_this_step = self._skip_this_step, False
            if skip and getattr(self.accelerator, "scaler", None) is None:
                return None
            # fp16's GradScaler has unscaled these gradients: its step sees them non-finite, skips the update
            # itself and lowers the scale (bypassing it would leave the scaler mid-step)
            return step(*a, **k)

        opt.step = guarded_step
        return "host"

    def optimizer_record(self) -> dict | None:
        """For run_info.json: the optimizer that ran and how non-finite steps were kept from it."""
        if self.optimizer is None:
            return None
        inner = self.optimizer
        for _ in range(8):  # accelerate's wrapper, DeepSpeed's wrapper and ZeRO optimizer: the one that steps
            if getattr(inner, "optimizer", None) is None:
                break
            inner = inner.optimizer
        return {"optim": str(getattr(self.args.optim, "value", self.args.optim)), "class": type(inner).__name__,
                "fused": bool(getattr(inner, "defaults", {}).get("fused")),
                "deepspeed": self.is_deepspeed_enabled, "nonfinite_guard": self._guard_route}

    # -- logging one step late; the guard read with it ------------------------------------------------------
    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                 learning_rate=None):
        """transformers logs here after each optimizer step, reading the loss and gradient norm on the host (a
        sync per step with --logging_steps 1). Instead, this step's values are staged (host_read.py) and the
        previous step's are read and logged now, with that step's number and epoch: the log lines and their
        order are as before. Evaluation, a checkpoint and the end of training read at once (the guard is checked
        before anything is saved)."""
        if self._step_learning_rate is not None:
            learning_rate = self._step_learning_rate  # see _note_step_learning_rate
        want_log = self.control.should_log
        self._take_record()
        self.control.should_log = want_log  # logging the previous step resets it
        log = want_log and self.state.global_step > self._globalstep_last_logged
        self._stage_record(tr_loss, grad_norm, learning_rate, start_time, log)
        self.control.should_log = False
        if self.control.should_evaluate or self.control.should_save or self.control.should_training_stop:
            self._take_record()
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                         learning_rate=learning_rate)

    def _stage_record(self, tr_loss, grad_norm, learning_rate, start_time, log: bool):
        values = self.guard.snapshot()
        rec = {"step": self.state.global_step, "epoch": self.state.epoch, "log": None,
               "tokens": self.state.num_input_tokens_seen, "guard": values is not None}
        parts = [] if values is None else [values]
        if log:
            from transformers.trainer_pt_utils import nested_gather

            loss = nested_gather(tr_loss, self.args.parallel_mode).mean().detach().float().reshape(1)
            tr_loss -= tr_loss
            parts.append(loss.to(parts[0].device) if parts else loss)
            if isinstance(grad_norm, torch.Tensor):
                parts.append(grad_norm.detach().float().reshape(1).to(parts[0].device))
                grad_norm = "staged"
            rec["log"] = {"steps": self.state.global_step - self._globalstep_last_logged, "grad_norm": grad_norm,
                          "learning_rate": learning_rate if learning_rate is not None else self._get_learning_rate(),
                          "start_time": start_time}
            # total_flos: added up when a checkpoint or the end asks (store_flos), not here (a collective read)
            self._globalstep_last_logged = self.state.global_step
        rec["read"] = HostRead(torch.cat(parts)) if parts else None
        self._record = rec

    def _take_record(self):
        rec, self._record = self._record, None
        if rec is None:
            return
        values = rec["read"].values() if rec["read"] is not None else []
        if rec["guard"]:
            guard, values = values[:len(NonFiniteGuard.SNAPSHOT)], values[len(NonFiniteGuard.SNAPSHOT):]
            self.skipped_steps = int(guard[0]) if self.guard.mode == "skip" else 0
        if rec["log"] is not None:
            log = rec["log"]
            loss_sum, values = values[0], values[1:]
            logs = {"loss": loss_sum / log["steps"]}
            if log["grad_norm"] == "staged":
                logs["grad_norm"] = values[0]
            elif log["grad_norm"] is not None:
                logs["grad_norm"] = log["grad_norm"]
            logs["learning_rate"] = log["learning_rate"]
            self._total_loss_scalar += loss_sum
            now = self.state.global_step, self.state.epoch, self.state.num_input_tokens_seen
            self.state.global_step, self.state.epoch, self.state.num_input_tokens_seen = \
                rec["step"], rec["epoch"], rec["tokens"]
            try:
                self.log(logs, log["start_time"])
            finally:
                self.state.global_step, self.state.epoch, self.state.num_input_tokens_seen = now
        if rec["guard"]:
            warning = self.guard.verdict(guard, rec["epoch"])  # stop: raises
            if warning:
                logger.warning(warning)

    def _read_now(self):
        """Read whatever is staged, and the guard's state as it is now (raises for a stopped run)."""
        self._take_record()
        values = self.guard.snapshot()
        if values is not None:
            self._record = {"step": self.state.global_step, "epoch": self.state.epoch, "log": None,
                            "tokens": self.state.num_input_tokens_seen, "guard": True, "read": HostRead(values)}
            self._take_record()

    def train(self, *args, **kwargs):
        self._guard_route = None  # installed at the first optimizer step (the optimizer exists by then)
        try:
            out = super().train(*args, **kwargs)
            self._read_now()  # the end: nothing is saved after a stopped run
            return out
        finally:
            self._record = None
            if self._found_inf_hooks is not None:
                self._found_inf_hooks.remove()
                self._found_inf_hooks = None

    def floating_point_ops(self, inputs):
        """transformers counts the model's parameters (a walk over every module) on every micro-batch; they do
        not change during training, so the count is taken once."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._param_count is None:
            self._param_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main].numel() * self._param_count

    # -- the dropout seed of CUDA-graphed steps travels with the RNG state -----------------------------------
    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        if self.graphs is not None:
            self.graphs.save_seed(output_dir, self.args.process_index, self.args.world_size)

    def _load_rng_state(self, checkpoint):
        super()._load_rng_state(checkpoint)
        if checkpoint is not None and self.graphs is not None \
                and not self.graphs.load_seed(checkpoint, self.args.process_index, self.args.world_size):
            logger.warning("%s has no dropout seed (written without CUDA graphs): LoRA dropout continues with other "
                           "masks than an uninterrupted run would draw", checkpoint)

    # -- resuming with another --max_steps / --num_train_epochs ---------------------------------------------
    def _load_optimizer_and_scheduler(self, checkpoint):
        """The restored optimizer holds the LR the old run's schedule set for the next step, while the scheduler
        goes on with the schedule of this run's total steps: after a resume with another --max_steps (or epochs)
        the first step applied the old schedule's LR (0 from the last checkpoint of a finished linear or cosine
        run: a step that trained nothing) and the rest the new one. The first step now takes the new schedule's
        LR too (the same value where the total is unchanged: an exact resume stays exact)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        sched = self.lr_scheduler
        if checkpoint is None or not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            return  # (ReduceLROnPlateau and DeepSpeed's own schedulers carry no schedule of the total)
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        groups = self.optimizer.param_groups
        if len(groups) != len(lrs) or all(g["lr"] == lr for g, lr in zip(groups, lrs)):
            return
        if self.args.process_index == 0:
            logger.info("resumed at step %d with this run's LR schedule (%d steps): the next step applies LR %.4g "
                        "(the checkpoint's run had set %.4g)", sched.last_epoch, self.state.max_steps, lrs[0],
                        float(groups[0]["lr"]))
        for g, lr in zip(groups, lrs):
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        sched._last_lr = list(lrs)

    # -- atomic checkpoints ------------------------------------------------------------------------------
    def _get_output_dir(self, trial):
        if self._staging_dir is not None:
            return self._staging_dir
        return super()._get_output_dir(trial)

    def _save(self, output_dir=None, state_dict=None):
        """The model's files (the final save and each checkpoint's), its safetensors readable as the umask allows
        (transformers' save_pretrained left them owner-only under safetensors 0.8, file_modes.py)."""
        since = time.time()
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            out = output_dir if output_dir is not None else self.args.output_dir
            if self.plan is not None and self.plan.chat_generation is not None:
                # trained on a base model, what is saved chats in ChatML (a full model's own file replaced)
                with open(os.path.join(out, "generation_config.json"), "w", encoding="utf-8") as f:
                    json.dump(self.plan.chat_generation, f, indent=2, ensure_ascii=False)
                    f.write("\n")
            weights_readable(out, since)

    def _save_checkpoint(self, model, trial):
        """Write checkpoint-N into a staging dir, then rename it into place: a run killed mid-save leaves no
        half-written checkpoint-N for a resume to pick up. Never after a step the guard stopped the run at."""
        self._read_now()
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING)
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
            self._rotate_checkpoints_of_run(run_dir, final)
        self.accelerator.wait_for_everyone()

    def _rotate_checkpoints_of_run(self, run_dir, newest):
        """--save_total_limit over the run's own checkpoints: transformers' rotation counted and deleted every
        checkpoint-* dir, a user's own (no trainer_state.json, which --overwrite_output_dir and --resume leave in
        place) included. Oldest first as transformers orders them (mtime; the step where mtimes span under a second);
        the one just written and the best one stay."""
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        ours = [p for p in checkpoints(run_dir) if (p / "trainer_state.json").is_file()]
        if len(ours) <= limit:
            return
        by_step = ours[::-1]  # (checkpoints(): highest step first)
        mtimes = {p: p.stat().st_mtime for p in ours}
        order = by_step if max(mtimes.values()) - min(mtimes.values()) < 1.0 else sorted(by_step, key=mtimes.get)
        best = self.state.best_model_checkpoint
        keep = {os.path.abspath(newest)} | ({os.path.abspath(best)} if best else set())
        extra = len(ours) - max(limit, len(keep))
        for p in order:
            if extra <= 0:
                break
            if os.path.abspath(p) not in keep:
                logger.info("--save_total_limit %d: deleting %s", limit, p)
                shutil.rmtree(p, ignore_errors=True)
                extra -= 1


class _OptimizerStepHook(TrainerCallback):
    def __init__(self, trainer: QwenTrainer):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._note_step_learning_rate()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._begin_optimizer_step()
