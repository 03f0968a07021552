"""The README.md written into a finished run's output dir: what was trained, on what, how, and how well.

It replaces PEFT's empty model card template (save_pretrained writes one with every adapter).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..hub import reference

_MODES = {"qlora": "Q-LoRA adapter (LoRA on the GPTQ Int4 base)", "lora": "LoRA adapter",
          "full": "fully fine-tuned model"}


def _lora_line(out: Path, lora_args) -> str:
    """The adapter's LoRA settings as saved (adapter_config.json): with --lora_weight_path they are the adapter's own,
    not the flags' (an r=1 adapter trained on was described as r 64)."""
    from ..adapters import AdapterError, read_adapter_config

    try:
        cfg = read_adapter_config(out)
        r, alpha, dropout, targets = cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["target_modules"]
    except (AdapterError, KeyError):
        r, alpha, dropout, targets = (lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout,
                                      lora_args.lora_target_modules)
    targets = sorted(targets) if isinstance(targets, (list, tuple, set)) else [str(targets)]
    return f"- LoRA: r {r}, alpha {alpha}, dropout {dropout}, target modules {' '.join(targets)}"


def write_model_card(output_dir, *, plan, lora_args, summary, eval_summary, command: str, info: dict,
                     log_history: list[dict], logging_steps: float | None = None) -> Path:
    out = Path(output_dir)
    adapter = plan.mode != "full"
    train_losses = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    final = train_losses[-1][1] if train_losses else None
    mean = next((h["train_loss"] for h in reversed(log_history) if "train_loss" in h), None)
    lines = ["---"]
    if adapter:
        lines += ["library_name: peft"]
    lines += [f"tags: [qwen, qwen-finetune, {plan.mode}]", "---", "",
              f"# {out.name}", "",
              f"A {_MODES[plan.mode]} trained with qwen-finetune.", "",
              f"- Base model: `{reference(plan.model_dir)}`"]
    if adapter:
        lines.append(_lora_line(out, lora_args))
    # what the weights carry besides this run's steps: the card read as if they were trained from scratch
    if getattr(lora_args, "lora_weight_path", None):
        lines.append(f"- Started from the adapter `{reference(lora_args.lora_weight_path)}` (--lora_weight_path: its "
                     "weights, a fresh optimizer and schedule)")
    if plan.resume_from:
        lines.append(f"- Resumed from `{reference(plan.resume_from)}`")
    lines.append(f"- Training data: {_data(summary)}")
    if eval_summary is not None:
        lines.append(f"- Eval data: {_data(eval_summary)}")
    lines += [f"- Steps: {info['global_step']} ({info['world_size']} process(es), "
              + f"compute dtype {info['compute_dtype']})",
              f"- Final train loss: {_num(final)} (last logged step; mean over the "
              + (f"steps since the resume from {Path(plan.resume_from).name} {_num(mean)})" if plan.resume_from
                 else f"run {_num(mean)})"),
              f"- Eval loss: {_num(info.get('eval_loss')) if info.get('eval_loss') is not None else 'no eval set'}"]
    if info.get("nonfinite_skipped_steps"):
        lines.append(f"- Optimizer steps skipped for a non-finite loss: {info['nonfinite_skipped_steps']}")
    lines += ["", "## Command", "", "```bash", command, "```", "", "## Loss curve", ""]
    if (out / "loss_curve.png").is_file():
        lines += ["![loss curve](loss_curve.png)", ""]
    if train_losses:
        lines += ["| step | train loss |", "| --- | --- |"]
        lines += [f"| {s} | {_num(v)} |" for s, v in _thin(train_losses)]
        lines.append("")
    else:
        # an empty section read as a bug: a run shorter than --logging_steps (transformers' default 500 when
        # `qwen-ft train` is run without the scripts' recipe) logs no step's loss
        steps = info.get("global_step")
        if logging_steps is not None and logging_steps >= 1 and isinstance(steps, int) and steps < logging_steps:
            lines.append(f"No train loss was logged: the run took {steps} optimizer step(s), and --logging_steps "
                         f"{logging_steps:g} logs every {logging_steps:g} (pass a smaller one for a curve).")
        else:
            lines.append("No train loss was logged.")
        lines.append("")
    lines += ["## Use", "", "```bash"]
    base, here = shlex.quote(reference(plan.model_dir)), shlex.quote(reference(out))
    lines.append(f"qwen-ft chat -m {base} --adapter {here}" if adapter else f"qwen-ft chat -m {here}")
    lines += ["```", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


def _data(s) -> str:
    skipped = f", {s.records_skipped} skipped" if s.records_skipped else ""
    return (f"`{s.source}`: {s.records_used} conversations used of {s.records_read} read{skipped}; "
            f"{s.total_tokens:,} tokens ({s.trained_tokens:,} trained); length p50 {s.p50}, max {s.max}; "
            f"{s.truncated} truncated")


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _thin(points: list, most: int = 12) -> list:
    """At most `most` points, evenly spread, always with the first and the last."""
    if len(points) <= most:
        return points
    idx = sorted({round(i * (len(points) - 1) / (most - 1)) for i in range(most)})
    return [points[i] for i in idx]
