"""The project's switches, read once from the environment and then fixed for the process.

Each switch is for comparing paths or working around a problem; all are on by default. Code reads them through
`settings()` (a cached object, never `os.environ` in a hot path); a flag with the same meaning (`--cuda_graphs`)
takes its default from here. `train` records them in run_info.json. Tests and benchmarks change them with
`override(...)`, not by setting environment variables mid-process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os


class SettingsError(ValueError):
    """An environment switch holds a value it cannot take."""


@dataclasses.dataclass(frozen=True)
class Settings:
    cuda_graphs: bool = True    # FINETUNE_CUDA_GRAPHS: training steps replayed as CUDA graphs (--cuda_graphs)
    compile: bool = True        # FINETUNE_COMPILE: RMSNorm, rotary and SwiGLU through torch.compile on CUDA
    gptq_backend: str = "auto"  # FINETUNE_GPTQ_BACKEND: auto (Triton on CUDA when importable), triton, torch
    gptq_gemv: bool = True      # FINETUNE_GPTQ_GEMV: decoding through the fused Int4 GEMV
    gptq_int4pack: bool = True  # FINETUNE_GPTQ_INT4PACK: 1-4 row bf16 decoding through aten's int4 kernel
    gptq_mma: bool = True       # FINETUNE_GPTQ_MMA: 1-64 row bf16 decoding on tensor cores (mma_gemv.py, mma_gemm.py)
    gptq_tune: bool = True      # FINETUNE_GPTQ_TUNE: autotune the Triton kernels' block sizes (else the first)
    static_decode: bool = True  # FINETUNE_STATIC_DECODE: chat()/chat_stream() through the inference engine on CUDA
    fused_decode: bool = True   # FINETUNE_FUSED_DECODE: the engine's decode step through fused Triton kernels on CUDA
    # FINETUNE_GPTQ_LORA_EPILOGUE: the engine's unmerged LoRA computed (x A) and added inside the tensor-core GEMV
    # instead of by separate kernels (H200, one row, r=64: separate 145 tok/s against 162 for the first epilogue in
    # session 11, NOTES step 19; 192.6 with x A inside too, step 39)
    gptq_lora_epilogue: bool = True
    # FINETUNE_LORA_XA_IN_NORM: in the fused decode step (up to 32 rows), the RMSNorm kernels before c_attn and before
    # w1/w2 also compute their LoRA products' x A, so their GEMVs start with it (NOTES step 43); 0: the GEMV does it
    lora_xa_in_norm: bool = True
    # FINETUNE_LORA_XA_IN_SWIGLU: the same for mlp.c_proj at 3-8 rows, from the SwiGLU kernel before it (NOTES step 87);
    # 0: the GEMV does it
    lora_xa_in_swiglu: bool = True
    # FINETUNE_DECODE_ATTENTION: the fused decode step's attention through decode_kernels.decode_attention (each row
    # reads its own keys only, NOTES steps 18 and 65); 0: SDPA over the step's length bucket, under a mask
    decode_attention: bool = True
    # FINETUNE_ATTENTION_ONE_LAUNCH: with decode_attention, the rotary and cache write, the attention's key splits and
    # their combine as one launch a layer (decode_kernels.rotary_attention, NOTES step 79); 0: three launches
    attention_one_launch: bool = True
    # FINETUNE_ATTENTION_CUDA: those attention kernels in CUDA C (inference/attention_cuda.py: each key split's loads
    # all in flight before its math, NOTES step 99); 0: the Triton kernels of decode_kernels.py
    attention_cuda: bool = True
    # FINETUNE_PAIRED_DECODE: the fused decode step runs w1 and w2 as one tensor-core launch over their weights side
    # by side (quant.linear.paired_decode, NOTES step 52); 0: two launches
    paired_decode: bool = True
    # FINETUNE_COMPACT_EMBEDDING: during LoRA training the frozen input embedding keeps on the GPU only the rows of
    # the training data's tokens (training/compact_embedding.py); 0: the whole table
    compact_embedding: bool = True
    # FINETUNE_SDPA_FLASH: forwards without gradients on CUDA (the engine's prefill and eager steps, generate(), eval)
    # run SDPA through flash or memory-efficient attention, never cuDNN's, which builds a graph for each new shape
    # (40-70 ms a prompt length on the H200, NOTES step 60); 0: SDPA's own choice
    sdpa_flash: bool = True


ENV = {f.name: "FINETUNE_" + f.name.upper() for f in dataclasses.fields(Settings)}
_CHOICES = {"gptq_backend": ("auto", "triton", "torch")}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def yes_no(text: str) -> bool:
    """1/true/yes/on or 0/false/no/off (any case, spaces around) as a bool; ValueError otherwise."""
    value = text.strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ValueError(f"expected 1 or 0, got {text!r}")


def from_environ(environ=None) -> Settings:
    # os.environ as it is now: a default bound at import kept the object that something may since have replaced
    # (something in the test suite's process does), and a switch set after that went unread
    environ = os.environ if environ is None else environ
    values = {}
    for field in dataclasses.fields(Settings):
        raw = environ.get(ENV[field.name])
        if raw is None or raw == "":
            continue
        value = raw.strip().lower()
        if field.name in _CHOICES:
            if value not in _CHOICES[field.name]:
                raise SettingsError(f"{ENV[field.name]}={raw!r}: expected one of {', '.join(_CHOICES[field.name])}")
            values[field.name] = value
        else:
            try:
                values[field.name] = yes_no(value)
            except ValueError:
                raise SettingsError(f"{ENV[field.name]}={raw!r}: expected 1 or 0") from None
    return Settings(**values)


# Switches of earlier versions, now gone (their paths were taken back or became the only one): named as such
RETIRED = {"FINETUNE_PDL", "FINETUNE_GPTQ_WGMMA", "FINETUNE_GPTQ_BULK", "FINETUNE_FUSED_LORA_DROPOUT"}


def unknown_switches(environ=None) -> list[str]:
    """A line for each FINETUNE_* variable that is no switch (a misspelt name would otherwise be ignored without a
    word, and the run would take the path the user meant to switch off)."""
    import difflib

    environ = os.environ if environ is None else environ
    known = set(ENV.values())
    lines = []
    for name in sorted(k for k in environ if k.startswith("FINETUNE_") and k not in known):
        if name in RETIRED:
            lines.append(f"{name} is no longer a switch (removed); it is ignored")
            continue
        near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        hint = f" (did you mean {near[0]}?)" if near else f" (the switches: {', '.join(sorted(known))})"
        lines.append(f"{name} is not a qwen-finetune switch{hint}; it is ignored")
    return lines


_current: Settings | None = None


def settings() -> Settings:
    """The process's settings (read from the environment on first use)."""
    global _current
    if _current is None:
        _current = from_environ()
    return _current


@contextlib.contextmanager
def override(**changes):
    """Settings changed for the duration of a `with` block (tests, benchmarks' A/B runs)."""
    global _current
    saved = settings()
    _current = dataclasses.replace(saved, **changes)
    try:
        yield _current
    finally:
        _current = saved


def as_dict() -> dict:
    return dataclasses.asdict(settings())
