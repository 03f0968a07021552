"""Fine-tune a Qwen chat model: LoRA, Q-LoRA (Int4 base) or full, on one GPU, several (DeepSpeed) or CPU.

`qwen-ft train ...` and `python -m finetune.train ...` run `main`. The path, top to bottom:
parse the arguments -> check everything that can be checked before loading anything -> precision -> tokenizer ->
data (validated, encoded) -> claim the output dir (lock, console log; an overwrite clears the old run only now, so
bad data leaves it whole) -> data summary -> model -> adapters -> Trainer -> train -> evaluate (with an eval set) ->
save -> loss curve and model card.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import transformers

from .data import DataError, TooLongError, build_dataset
from .data.dataset import files_in_both, named_in_both
from .settings import SettingsError, settings, unknown_switches
from .settings import as_dict as settings_dict
from .training.arguments import (DataArguments, LoraArguments, ModelArguments, TrainingArguments, parse_args,
                                 resolve_sampling)
from .training import precision as precision_policy
from .training.allocator import allocator_settings, default_allocator_settings
from .training.checks import (DATA_KEY, FINISHED_MARKER, WEIGHTS_ONLY_NOTE, TrainConfigError, checkpoint_problem,
                              checkpoint_step, checkpoints, conflicts_error, deepspeed_config, graph_loss_changes,
                              identity_mismatch, last_complete_checkpoint, precision_conflicts, preflight,
                              start_from)
from .training.console import quiet_third_party_notices
from .training.launch import say_error
from .training.lora import attach_lora
from .training.model_card import write_model_card
from .training.plots import LossCurveCallback, plot_loss_curve
from .training.run_dir import LOG_FORMAT, EarlyConsole, claim_output_dir
from .training.trainer import NonFiniteLossError, QwenTrainer, make_collator

logger = logging.getLogger(__name__)


def train(model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments,
          args: TrainingArguments, argv: list[str] | None = None):
    """Run one training job; returns the finished Trainer. `argv` is the command line, for the records."""
    with EarlyConsole() as early:  # (what preflight and the data print, for train.log once it opens)
        resolve_sampling(data_args, args)
        plan = preflight(model_args, data_args, lora_args, args)  # raises before any heavy work
        argv = list(sys.argv[1:] if argv is None else argv)
        precision = precision_policy.decide(args, plan)
        if args.deepspeed and (conflicts := precision_conflicts(deepspeed_config(args.deepspeed), precision)):
            raise conflicts_error(f"--deepspeed {args.deepspeed}", conflicts)
        precision_policy.apply(args, precision)

        from .tokenization import load_tokenizer

        tokenizer = load_tokenizer(plan.model_dir)
        # before the output dir is claimed: a data error leaves it as it was (--overwrite_output_dir clears at the
        # claim)
        data = _datasets(tokenizer, data_args, args)
        if problem := _no_full_batch(data[1], args):  # (transformers' traceback, or 0 steps trained and "Done.")
            raise TrainConfigError(problem)
        if args.process_index != 0:  # rank 0 owns the output dir (and its log)
            early.stop()
            return _train(plan, precision, tokenizer, data, model_args, data_args, lora_args, args, argv)
        with claim_output_dir(args, plan.identity, early):
            def record_args():
                _write_run_args(args.output_dir, model_args, data_args, lora_args, args, plan, argv)

            # A resume in its own dir records its arguments once the data is known to be the run's: a refused resume
            # leaves the run's run_args.json as it was (any other run marks its dir as a run of this project now).
            resumes_here = (plan.resume_from
                            and Path(plan.resume_from).absolute().parent == Path(args.output_dir).absolute())
            if not resumes_here:
                record_args()
            try:
                return _train(plan, precision, tokenizer, data, model_args, data_args, lora_args, args, argv,
                              record_args=record_args if resumes_here else None)
            except KeyboardInterrupt as e:
                print(_interrupted(args), file=sys.stderr, flush=True)
                e.reported = True  # main says nothing more
                raise


def _train(plan, precision, tokenizer, data, model_args, data_args, lora_args, args, argv, record_args=None):
    train_set, summary, eval_set, eval_summary = data
    plan.identity[DATA_KEY] = summary.content  # recorded in each checkpoint (qwen_run.json)
    if plan.resume_from and (mismatch := identity_mismatch(Path(plan.resume_from), plan.identity)):
        raise TrainConfigError(f"{'--resume' if args.resume else '--resume_from_checkpoint'}: {plan.resume_from} "
                               f"was {mismatch}")
    if plan.resume_from and not args.max_steps > 0:  # (a --max_steps at or below the step is refused in preflight)
        # as there: transformers trains nothing from a checkpoint at or past the epochs' last step, saves, and marks
        # the run finished; the epochs' steps are known only now that the data is read
        done, total = checkpoint_step(plan.resume_from), batch_plan(summary, data_args, args)["total_steps"]
        if total <= done:
            raise TrainConfigError(
                f"--num_train_epochs {args.num_train_epochs:g}: the checkpoint {plan.resume_from} is at step {done} "
                f"already and {args.num_train_epochs:g} epoch(s) are {total} step(s), so nothing would train; give "
                f"more epochs or a --max_steps beyond {done} to train on from it")
    if record_args is not None:
        record_args()
    if summary.trained_tokens == 0:
        raise TrainConfigError(
            f"--model_max_length {data_args.model_max_length} leaves no assistant reply to train on "
            f"(the longest kept row is {summary.max} tokens); raise it")
    batches = batch_plan(summary, data_args, args)
    if args.process_index == 0:
        if not summary.records_skipped:  # (with skips, build_dataset printed it on stderr: once is enough)
            print(summary.format(), flush=True)
        print(batches["text"], flush=True)
        if eval_set is not None:
            print("eval " + eval_summary.format(), flush=True)
            if eval_summary.content == summary.content:
                logger.warning("--eval_data_path %s holds the same conversations as --data_path %s: its loss measures "
                               "how well the training data is fitted, not held-out data", data_args.eval_data_path,
                               data_args.data_path)
            elif both := files_in_both(data_args.data_path, data_args.eval_data_path):
                logger.warning("--eval_data_path %s: %s read by --data_path %s too (trained on): its loss is not a "
                               "held-out loss", data_args.eval_data_path, named_in_both(both), data_args.data_path)
        _warn_past_seq_length(train_set, summary, data_args, plan)

    from .loading import load_model

    transformers.set_seed(args.seed)  # adapters are initialised before the Trainer would seed
    if plan.zero_stage == 3:
        # transformers loads under deepspeed.zero.Init (each process keeps only its shard); that needs
        # DeepSpeed's communication up before the model is built.
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if plan.device.startswith("cuda") else "gloo")
    with _out_of_memory("while loading the model", plan, data_args, args, args.gradient_checkpointing):
        model = load_model(plan.model_dir, dtype=precision.load_dtype, device=plan.device)
    model.config.use_cache = False
    _state_special_tokens(model, tokenizer)
    if plan.mode == "full":
        model.requires_grad_(True)
    else:
        model = attach_lora(model, lora_args, plan, verbose=args.process_index == 0)
    checkpointing = bool(getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing)
    if checkpointing:
        # with the kwargs PEFT needs, under the name this transformers has (activation_* from 5.2x on); the
        # Trainer must not redo it
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for name in ("activation_checkpointing", "gradient_checkpointing"):
            if hasattr(args, name):
                setattr(args, name, False)
    restore_embedding = _compact_embedding(model, plan, train_set, eval_set, tokenizer)
    if checkpointing:
        freed = restore_embedding.freed_gib if restore_embedding is not None else 0.0
        kept = _keep_mlp_projections(model, data_args, args, precision, freed)
    else:
        kept = None
    graphs = _cuda_graphs(model, data_args, args, plan)

    trainer = QwenTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=make_collator(tokenizer, data_args, for_graphs=graphs is not None),
        processing_class=tokenizer, precision=precision, plan=plan, graphs=graphs,
        callbacks=[LossCurveCallback()],
    )
    if graphs is not None:
        with _out_of_memory("while capturing the training step's CUDA graphs", plan, data_args, args,
                            checkpointing):
            _capture_steps(trainer, train_set, data_args, args, tokenizer)
    if plan.resume_from and args.process_index == 0:
        step = checkpoint_step(plan.resume_from)
        print(f"resuming from {plan.resume_from} (step {step})", flush=True)
    with _out_of_memory(lambda: f"in optimizer step {trainer.state.global_step + 1}", plan, data_args, args,
                        checkpointing):
        trainer.train(resume_from_checkpoint=plan.resume_from)
    graph_stats = trainer.release_graphs()
    if restore_embedding is not None:
        restore_embedding()  # the whole table again: evaluation and saving see the model as loaded
    speed = trainer.meter.summary(trainer.accelerator)
    eval_metrics = trainer.evaluate() if eval_set is not None else None  # at the end, whatever --eval_strategy
    trainer.save_state()
    trainer.save_model(args.output_dir)
    info = run_info(trainer, graph_stats)
    info["throughput"] = speed
    info["batches"] = {k: v for k, v in batches.items() if k != "text"}
    info["checkpointing"] = kept
    info["input_embedding"] = ({"rows_on_gpu": restore_embedding.rows, "freed_gib": restore_embedding.freed_gib}
                               if restore_embedding is not None else None)
    info["eval_loss"] = eval_metrics["eval_loss"] if eval_metrics else None
    if args.process_index == 0:
        if trainer.skipped_steps:
            logger.warning("%d optimizer step(s) skipped for a non-finite loss (--on_nonfinite_loss skip)",
                           trainer.skipped_steps)
        if eval_metrics:
            print(f"eval loss: {eval_metrics['eval_loss']:.4f} ({data_args.eval_data_path})", flush=True)
            plot_loss_curve(trainer.state.log_history, os.path.join(args.output_dir, "loss_curve.png"))
        tokenizer.save_pretrained(args.output_dir)
        Path(args.output_dir, "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        write_model_card(args.output_dir, plan=plan, lora_args=lora_args, summary=summary,
                         eval_summary=eval_summary, command=_command(argv), info=info,
                         log_history=trainer.state.log_history, logging_steps=args.logging_steps)
        _mark_finished(args.output_dir)
        _print_next_steps(plan, args.output_dir)
    return trainer


@contextlib.contextmanager
def _out_of_memory(where, plan, data_args, args, checkpointing: bool):
    """A device out-of-memory error inside becomes one line (TrainConfigError) saying where, what the device
    held and which flags lower the need; ``where``: a text, or a function giving it when the error comes."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        from .training.memory import out_of_memory

        text = where() if callable(where) else where
        raise TrainConfigError(out_of_memory(text, plan.device, data_args, args, checkpointing)) from None


def batch_plan(summary, data_args, args) -> dict:
    """What an optimizer step holds and how many an epoch has, as the Trainer will batch the rows (a packed
    row holds several conversations, so packed runs take fewer, larger steps). Printed before training and
    kept in run_info.json."""
    import math

    rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    rows = max(summary.rows, 1)
    # (--dataloader_drop_last: the last, incomplete round of batches is not trained)
    rounding = math.floor if getattr(args, "dataloader_drop_last", False) else math.ceil
    batches_per_epoch = rounding(rows / (args.per_device_train_batch_size * args.world_size))
    steps_per_epoch = max(math.ceil(batches_per_epoch / args.gradient_accumulation_steps), 1)
    # Over several processes accelerate's sampler (even_batches, its default) completes the epoch's last round of
    # batches (processes x per-device batch) with rows from the epoch's start, so that every process gets a full
    # batch: those rows are drawn again (with --dataloader_drop_last the round is dropped instead).
    padded = (args.world_size > 1 and not getattr(args, "dataloader_drop_last", False)
              and getattr(getattr(args, "accelerator_config", None), "even_batches", True))
    repeated = batches_per_epoch * args.per_device_train_batch_size * args.world_size - rows if padded else 0
    per_row = summary.records_used / rows
    conversations_per_step = min(rows_per_step, rows) * per_row
    total = args.max_steps if args.max_steps and args.max_steps > 0 else math.ceil(steps_per_epoch * args.num_train_epochs)
    layout = (f"{args.per_device_train_batch_size} a device x {args.gradient_accumulation_steps} accumulated x "
              f"{args.world_size} process{'es' if args.world_size > 1 else ''}")
    if rows < rows_per_step:  # the whole epoch is one step, smaller than the step the flags allow
        trained = batches_per_epoch * args.per_device_train_batch_size * args.world_size  # (drop_last: fewer)
        text = (f"batches: an optimizer step holds the epoch's {_count(min(rows, trained), 'row')} (of up to "
                f"{rows_per_step}: {layout})")
        conversations = _count(summary.records_used, "conversation")
    else:
        text = f"batches: an optimizer step holds {_count(rows_per_step, 'row')} ({layout})"
        conversations = f"about {conversations_per_step:,.0f} conversations"
    if repeated:
        text += (f", and {_count(repeated, 'repeated row')} an epoch (the sampler completes the last round of "
                 f"{args.world_size} processes x {args.per_device_train_batch_size} a device with rows from the "
                 "epoch's start, so that every process gets a full batch)")
    if data_args.packing:
        text += (f", {conversations} (packed: {per_row:.1f} a row; --packing False for one a row, as the official "
                 "recipe)")
    elif args.train_sampling_strategy == "group_by_length":
        text += " of similar length (--train_sampling_strategy random for the official order)"
    text += f"; {_count(steps_per_epoch, 'optimizer step')} an epoch, {total:,} in this run"
    text += (" (--max_steps)" if args.max_steps and args.max_steps > 0
             else f" ({args.num_train_epochs:g} epoch{'' if args.num_train_epochs == 1 else 's'})")
    # rows_per_step: what the flags allow a step; rows_per_epoch: what the data has (a step holds the fewer)
    # repeated_rows_per_epoch: rows the sampler draws again each epoch to give every process a full batch
    return {"rows_per_step": rows_per_step, "rows_per_epoch": summary.rows, "repeated_rows_per_epoch": repeated,
            "conversations_per_step": round(conversations_per_step, 1),
            "conversations_per_row": round(per_row, 2), "steps_per_epoch": steps_per_epoch, "total_steps": total,
            "packing": bool(data_args.packing), "text": text}


def _no_full_batch(summary, args) -> str | None:
    """With --dataloader_drop_last, an epoch with fewer rows than one round of batches trains nothing: why, in one
    line (None otherwise)."""
    batch = args.per_device_train_batch_size * args.world_size
    if not getattr(args, "dataloader_drop_last", False) or summary.rows >= batch:
        return None
    layout = f"{args.per_device_train_batch_size} a device x {args.world_size} process{'es' * (args.world_size > 1)}"
    return (f"--dataloader_drop_last True drops every batch: the data makes {_count(summary.rows, 'row')} an epoch"
            f"{' (packed)' if summary.packed else ''}, fewer than one round of batches ({batch}: {layout}); lower "
            "--per_device_train_batch_size, or drop --dataloader_drop_last")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _warn_past_seq_length(train_set, summary, data_args, plan) -> None:
    """One warning when conversations are longer than the context the model was trained on (config.json's
    seq_length): positions past it are new to the model."""
    limit = plan.seq_length
    if not limit or data_args.model_max_length <= limit or summary.max <= limit:
        return
    import pyarrow.compute as pc

    table = train_set.data.table if hasattr(train_set.data, "table") else train_set.data
    if "position_ids" in train_set.column_names:  # packed: a conversation past the limit has position `limit`
        n = pc.sum(pc.equal(pc.list_flatten(table.column("position_ids")), limit)).as_py() or 0
    else:
        n = pc.sum(pc.greater(table.column("length"), limit)).as_py() or 0
    logger.warning("%d conversation(s) are longer than the model's seq_length %d (%s; the longest is %d tokens): "
                   "the model was not trained on positions past it; --model_max_length %d truncates them",
                   n, limit, Path(plan.model_dir, "config.json"), summary.max, limit)


def _command(argv: list[str]) -> str:
    return "python -m finetune.train " + shlex.join(argv)


def _interrupted(args) -> str:
    """What an interrupted run tells the user: where its last checkpoint is and how to continue from it."""
    last = last_complete_checkpoint(args.output_dir)
    if last is None and (found := checkpoints(args.output_dir)) and checkpoint_problem(found[0]) == WEIGHTS_ONLY_NOTE:
        return f"interrupted: the newest checkpoint, {found[0]}, holds {WEIGHTS_ONLY_NOTE}: {start_from(found[0])}"
    if last is None:
        return (f"interrupted: no checkpoint was written in {args.output_dir} yet (--save_strategy "
                f"{getattr(args.save_strategy, 'value', args.save_strategy)}); run the command again to start over")
    step = checkpoint_step(last)
    how = "the same command with --resume True" + (" instead of --overwrite_output_dir"
                                                   if args.overwrite_output_dir else "")
    return f"interrupted: the last complete checkpoint is {last} (step {step}); continue with {how}"


def _state_special_tokens(model, tokenizer) -> None:
    """The tokenizer's special tokens (<|endoftext|> as eos and pad) in the model config, as the generation
    config has them: Qwen's config.json does not declare them, and the Trainer would otherwise set them itself
    with a console notice."""
    for name in ("eos_token_id", "pad_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None and getattr(model.config, name, None) is None:
            setattr(model.config, name, tid)


def _keep_mlp_projections(model, data_args, args, precision, freed_gib: float) -> dict:
    """--gradient_checkpointing_keep_gib (unset: 1 plus ``freed_gib``, what the compact input embedding freed): the
    last blocks it covers keep their w1/w2 outputs instead of recomputing them (training/checkpointing.py). Logged,
    and returned for run_info.json."""
    import torch

    from .modeling.model import qwen_lm
    from .training.checkpointing import DEFAULT_KEEP_GIB, GIB, keep_budget_gib, kept_block_bytes, keep_mlp_projections

    lm = qwen_lm(model)
    blocks = lm.transformer.h
    tokens = args.per_device_train_batch_size * data_args.model_max_length  # packed rows are exactly this long
    act_bytes = torch.finfo(precision.compute_dtype).bits // 8
    budget = keep_budget_gib(args, freed_gib)
    kept = keep_mlp_projections(blocks, lm.config, budget, tokens, act_bytes)
    kept_gib = kept * kept_block_bytes(lm.config, tokens, act_bytes) / GIB
    if args.process_index == 0:
        which = ("every block keeps its" if kept == len(blocks)
                 else f"the last {kept} of {len(blocks)} blocks keep their")
        given = args.gradient_checkpointing_keep_gib
        flag = (f"{given:g}" if given is not None
                else f"unset: {DEFAULT_KEEP_GIB:g} + {freed_gib:.3g} the compact embedding freed")
        logger.info("gradient checkpointing: %s MLP projections (%.3g GiB of --gradient_checkpointing_keep_gib "
                    "%s)%s", which, kept_gib, flag,
                    "" if kept == len(blocks) else "; the others recompute them")
    return {"blocks": len(blocks), "blocks_keeping_mlp_projections": kept,
            "kept_gib": round(kept_gib, 3), "budget_gib": round(budget, 3)}


def _compact_embedding(model, plan, train_set, eval_set, tokenizer):
    """The frozen input embedding cut to the rows of the data's tokens for training (training/compact_embedding.py);
    returns what puts the whole table back, or None where it stays whole."""
    from .modeling.model import qwen_lm
    from .training.compact_embedding import compact_input_embedding, data_token_ids

    why_not = ("full fine-tuning" if plan.mode == "full" else "ZeRO-3 partitions it" if plan.zero_stage == 3
               else "not on a GPU" if not str(plan.device).startswith("cuda") else None)
    # (every id is below the embedding's rows: preflight's load_tokenizer checked the tokenizer against vocab_size)
    ids = data_token_ids((train_set, eval_set), tokenizer.special_tokens.values()) if why_not is None else None
    return compact_input_embedding(qwen_lm(model), ids, why_not)


def _cuda_graphs(model, data_args, args, plan):
    """The TrainGraphs the trainer runs its steps through (finetune/training/graphs.py), or None. --cuda_graphs
    unset: one CUDA process, alone or under ZeRO-1/2; True: also several processes (their gradient hooks, like
    DeepSpeed's, get the replayed gradients through autograd). Says why when graphs are not used."""
    if args.cuda_graphs is False:
        return None
    if not plan.device.startswith("cuda"):
        if args.cuda_graphs and args.process_index == 0:  # (asked for, it was dropped without a word)
            logger.info("CUDA graphs off: this run trains on the CPU (--cuda_graphs applies to CUDA GPUs)")
        return None
    from .training.graphs import enable_train_graphs, graphs_unavailable

    several = args.world_size > 1
    if loss_changes := graph_loss_changes(args):
        why = f"{loss_changes}: the graphed step computes the plain loss"
    elif several and args.cuda_graphs is None:
        why = "several processes (graphs have not yet run on more than one GPU; --cuda_graphs True turns them on)"
    elif plan.zero_stage == 3:
        why = "ZeRO-3 gathers each layer's weights in module hooks, which a replayed step would skip"
    else:
        why = graphs_unavailable(model, several_processes=several)
    if why is not None:
        if args.process_index == 0:
            logger.info("CUDA graphs off: %s", why)
        return None
    hooked = plan.zero_stage is not None or several
    logger.info("CUDA graphs on: each step shape (%s) is captured %s, then replayed",
                "rows padded to --model_max_length" if data_args.packing else "rows padded to a multiple of 128",
                "after 2 eager steps" if hooked else "before training")
    return enable_train_graphs(model, hooked_grads=hooked)


def _capture_steps(trainer, train_set, data_args, args, tokenizer) -> None:
    """Capture the CUDA graphs of the step shapes the data gives before the first step, so the run replays from
    its first step in whatever order the shapes come (one GPU without DeepSpeed; otherwise each shape is captured
    when it first comes, after its eager warm-up steps)."""
    from .training.memory import gpu_memory_now
    from .training.trainer import graph_step_shapes

    shapes = graph_step_shapes(train_set["length"], data_args, args.per_device_train_batch_size)
    if shapes and args.process_index == 0 and not trainer.graphs.hooked_grads:  # hooked: captured as they come
        n = min(len(shapes), trainer.graphs.max_captures)
        print(f"CUDA graphs: capturing {n} step shape(s) before training (two warm-up steps and a capture each)",
              flush=True)
    done = trainer.capture_graphs(shapes, tokenizer.eod_id)
    if done and args.process_index == 0:
        lengths = sorted(T for _, T in done)
        span = f"{lengths[0]}" if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
        print(f"CUDA graphs: {len(done)} step shape(s) captured before training ({done[0][0]} rows of {span} "
              f"tokens) in {trainer.graphs.prepare_s:.1f} s; {gpu_memory_now()}", flush=True)
        if len(done) < len(shapes) and not trainer.graphs.failure:
            print(f"CUDA graphs: {len(shapes) - len(done)} rarer shape(s) past the {len(done)} captured run eagerly",
                  flush=True)


def _datasets(tokenizer, data_args, args):
    """Train (and eval) datasets, built once on the main process and read from its cache by the others."""
    kw = dict(packing=data_args.packing, train_on_prompt=data_args.train_on_prompt,
              skip_invalid=data_args.skip_invalid, num_proc=data_args.preprocessing_num_workers,
              progress=not args.disable_tqdm)
    flag = "--data_path"
    try:  # (an error names the flag that gave its file: the train and eval files' errors read alike)
        with args.main_process_first(desc="tokenizing"):
            train_set, summary = build_dataset(tokenizer, data_args.data_path, data_args.model_max_length,
                                               verbose=args.process_index == 0, **kw)
            eval_set = eval_summary = None
            if data_args.eval_data_path:
                flag = "--eval_data_path"
                eval_set, eval_summary = build_dataset(tokenizer, data_args.eval_data_path,
                                                       data_args.model_max_length, verbose=False, **kw)
    except TooLongError as e:
        raise TrainConfigError(f"{e.given_by(flag)}; raise --model_max_length (now {data_args.model_max_length})"
                               + ("" if data_args.skip_invalid else ", or pass --skip_invalid True to skip and "
                                  "count such records")) from None
    except DataError as e:
        raise e.given_by(flag) from None
    return train_set, summary, eval_set, eval_summary


def run_info(trainer, graphs: dict | None = None) -> dict:
    """What actually ran: processes, DeepSpeed's ZeRO stage, CUDA graphs (captures, replayed and eager steps;
    None when off), optimizer steps skipped for a non-finite loss, the optimizer (its class, fused or not, how
    the non-finite guard kept steps from it), and the dtypes of each kind of tensor as the
    (possibly DeepSpeed-wrapped) model holds them after training."""
    engine = trainer.model_wrapped
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
    module = getattr(engine, "module", engine)
    dtypes: dict[str, set] = {}
    for name, p in module.named_parameters():
        kind = "trainable" if p.requires_grad else "frozen"
        dtypes.setdefault(kind, set()).add(str(p.dtype).removeprefix("torch."))
    for name, b in module.named_buffers():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("qweight", "qzeros", "scales", "g_idx"):
            dtypes.setdefault(f"gptq.{leaf}", set()).add(str(b.dtype).removeprefix("torch."))
    return {
        "world_size": trainer.args.world_size, "deepspeed": stage is not None, "zero_stage": stage,
        "compute_dtype": str(trainer.precision.compute_dtype).removeprefix("torch."), "mode": trainer.plan.mode,
        "precision": trainer.precision.record(),
        "global_step": trainer.state.global_step, "cuda_graphs": graphs, "settings": settings_dict(),
        # the training data's content hash: merge checks that the file it scores (or calibrates on) still holds it
        "data_content": trainer.plan.identity.get(DATA_KEY),
        "cuda_alloc_conf": allocator_settings(),
        "nonfinite_skipped_steps": trainer.skipped_steps, "optimizer": trainer.optimizer_record(),
        "dtypes": {k: sorted(v) for k, v in sorted(dtypes.items())},
    }


def _write_run_args(output_dir, model_args, data_args, lora_args, args, plan, argv):
    """Written when the run takes the dir: it marks the dir as holding a run of this project."""
    os.makedirs(output_dir, exist_ok=True)
    record = {
        "model": asdict(model_args), "data": asdict(data_args), "lora": asdict(lora_args),
        "training": json.loads(args.to_json_string()), "mode": plan.mode, "model_dir": str(plan.model_dir),
        "argv": argv,
        "cwd": os.getcwd(),  # what the data flags' relative paths are relative to (merge reads them from elsewhere)
    }
    Path(output_dir, "run_args.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def _mark_finished(output_dir):
    Path(output_dir, FINISHED_MARKER).write_text(json.dumps({"finished": True}) + "\n")


def _print_next_steps(plan, output_dir):
    import shlex

    print(f"\nDone. The {'adapter' if plan.mode != 'full' else 'model'} is in {output_dir}", flush=True)
    if plan.mode == "full":
        cmd = ["qwen-ft", "chat", "-m", str(output_dir)]
    else:
        cmd = ["qwen-ft", "chat", "-m", str(plan.model_dir), "--adapter", str(output_dir)]
    print(f"Chat with it:  {shlex.join(cmd)}", flush=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, `timeout`, `kill`): the run ends as Ctrl-C ends it, saying where its last
    checkpoint is; Python's default ended the process without a word."""


_FORK_HOOK = []


def _default_sigterm_in_forks() -> None:
    """A forked child (the data's tokenizing pool) starts with SIGTERM's default action, not the run's handler: with
    the handler, a SIGTERM from the pool's terminate() that came just before the worker blocked on the pool's queue
    lock was only noted for Python and never acted on, and the run hung in the pool's join (seen in the tests)."""
    import signal

    def in_child():
        if getattr(signal.getsignal(signal.SIGTERM), "forked_default", False):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    if not _FORK_HOOK:  # (os.register_at_fork has no unregister: once a process)
        os.register_at_fork(after_in_child=in_child)
        _FORK_HOOK.append(in_child)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    import signal
    import threading

    # (a handler of the caller's own is left as it is; so is several processes' handling: torchrun's agent stops the
    # other ranks with SIGTERM when one fails, and a rank inside a collective would not run a Python handler)
    if (threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
            or os.environ.get("WORLD_SIZE", "1") != "1"):
        yield
        return
    installer = os.getpid()

    def terminated(signum, frame):
        if os.getpid() != installer:  # a forked worker (the data's tokenizing pool) ends as it did before
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated

    terminated.forked_default = True  # (_default_sigterm_in_forks: not in a forked child)
    _default_sigterm_in_forks()
    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    with _sigterm_as_interrupt():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    default_allocator_settings()  # before anything touches CUDA (training/allocator.py)
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    quiet_third_party_notices()
    try:
        settings()  # a bad FINETUNE_* switch stops the run now (run_info.json first read them, after training)
        if os.environ.get("RANK", "0") == "0":  # (once for a multi-process launch)
            for line in unknown_switches():
                logger.warning(line)
        argv = list(sys.argv[1:] if argv is None else argv)
        try:
            model_args, data_args, lora_args, args = parse_args(argv)
        except ValueError as e:  # transformers' own checks of its flags (TrainingArguments.__post_init__)
            raise TrainConfigError(" ".join(str(e).split())) from None
        with _log_level(args):
            train(model_args, data_args, lora_args, args, argv=argv)
    except (TrainConfigError, DataError, NonFiniteLossError, SettingsError) as e:
        say_error(f"error: {e}")  # (once for a multi-process launch: training/launch.py)
        return 2
    except KeyboardInterrupt as e:  # once the run has its output dir, rank 0 has said where the last checkpoint is
        if not getattr(e, "reported", False) and os.environ.get("RANK", "0") == "0":
            print("\ninterrupted before training began; nothing was written", file=sys.stderr, flush=True)
        return 143 if isinstance(e, Terminated) else 130  # (128 + the signal's number, as a shell reports it)
    _end_distributed()  # after success only: a failing rank must exit, not wait for the others
    return 0


@contextlib.contextmanager
def _log_level(args):
    """--log_level for the project's own log lines too on the process that logs (the Trainer sets transformers'
    from it); "passive" (the default) leaves them as they are. Restored after (main() also runs in-process)."""
    project = logging.getLogger("finetune")
    before = project.level
    if args.log_level != "passive" and args.should_log:
        project.setLevel(args.get_process_log_level())
    try:
        yield
    finally:
        project.setLevel(before)


def _end_distributed() -> None:
    # Leave the process group together: a rank that exits while another still holds it open (DeepSpeed's
    # CPU shared-memory communication threads, gloo) can abort at interpreter shutdown.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _exit_worker_rank(code: int) -> None:
    """A non-zero rank of a multi-process launch that finished cleanly leaves without interpreter teardown:
    after the process group is gone, C++ threads of the communication backends (gloo, DeepSpeed's CPU
    shared-memory ops) can still abort the process in their destructors ("terminate called without an active
    exception", seen in 2-process CPU runs after training had finished and everything was written). Rank 0,
    which writes the outputs and the reports, exits normally."""
    if code == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)


if __name__ == "__main__":
    _code = main()
    _exit_worker_rank(_code)
    sys.exit(_code)
