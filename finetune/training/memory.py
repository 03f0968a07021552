"""Will the run fit? The memory a training run needs on its device, estimated before anything is loaded, from the
model's config and its safetensors headers (shapes and dtypes only; no weight is read).

The estimate is deliberately plain: weights as they are loaded (float tensors in the compute dtype, GPTQ buffers
as stored), the LoRA adapters (fp32), their gradients and AdamW's two moments (partitioned over the processes
under ZeRO, moved off the GPU by DeepSpeed's optimizer offload), and the activations of one micro-batch of
rows at --model_max_length. It leaves out allocator slack and framework buffers, so a run is stopped only when
the estimate is clearly above what the device has free (FIT_MARGIN).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import checkpoint_tensors
from ..model_dir import gptq_of
from .checkpointing import DEFAULT_KEEP_GIB, keep_budget_gib, kept_values_per_token

FIT_MARGIN = 1.2  # stop only when the estimate exceeds the available memory by this factor
GIB = 1024**3

_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_GPTQ_BUFFERS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass
class MemoryEstimate:
    weights: int
    adapters: int
    optimizer: int  # gradients and optimizer states of the trained parameters, on this device
    activations: int
    trainable_params: int
    tokens: int  # per micro-batch

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.optimizer + self.activations

    def describe(self) -> str:
        def g(n):
            return f"{n / GIB:.1f}"
        return (f"weights {g(self.weights)}, adapters {g(self.adapters)}, gradients and optimizer "
                f"{g(self.optimizer)}, activations {g(self.activations)} GiB for {self.tokens} tokens a micro-batch")


def tensor_shapes(model_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, safetensors dtype)} of the model's weights, from their headers (finetune/checkpoint.py)."""
    return {name: (info.shape, info.dtype) for name, info in checkpoint_tensors(model_dir).items()}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _linear_shapes(tensors, bits: int) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every Linear, float (`.weight` [out, in]) or GPTQ
    (`.qweight` [in * bits / 32, out])."""
    shapes = {}
    for name, (shape, _) in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "qweight" and len(shape) == 2:
            shapes[module] = (shape[0] * 32 // bits, shape[1])
        elif leaf == "weight" and len(shape) == 2 and f"{module}.qweight" not in tensors and "wte" not in module:
            shapes[module] = (shape[1], shape[0])
    return shapes


def _matches(module: str, targets) -> bool:
    # PEFT's rule for a list of names: the module's name is the target or ends with "." + target
    return any(module == t or module.endswith("." + t) for t in targets)


def estimate_memory(cfg: dict, tensors: dict, mode: str, lora_args, data_args, args, device: str,
                    ds: dict | None) -> MemoryEstimate:
    on_gpu = device.startswith("cuda")
    half = on_gpu or args.bf16 or args.fp16
    compute_bytes = 4 if mode == "full" or not half else 2  # full fine-tuning loads fp32 master weights
    bits = (gptq_of(cfg) or {"bits": 4})["bits"]

    weights = 0
    for name, (shape, dtype) in tensors.items():
        stored = _SAFETENSORS_BYTES.get(dtype, 4)
        if name.rpartition(".")[2] in _GPTQ_BUFFERS:
            weights += _numel(shape) * stored  # never cast
        else:
            weights += _numel(shape) * compute_bytes

    if mode == "full":
        trainable = sum(_numel(s) for n, (s, _) in tensors.items() if n.rpartition(".")[2] not in _GPTQ_BUFFERS)
        adapters = 0
    else:
        r = lora_args.lora_r
        trainable = sum(r * (i + o) for m, (i, o) in _linear_shapes(tensors, bits).items()
                        if _matches(m, lora_args.lora_target_modules))
        for extra in lora_args.modules_to_save or []:  # trained in full, as fp32 copies
            trainable += sum(_numel(s) for n, (s, _) in tensors.items() if _matches(n.rpartition(".")[0], [extra]))
        adapters = 4 * trainable

    stateful = not str(args.optim).lower().replace("optimizernames.", "").startswith("sgd")
    per_param = 4 + (8 if stateful else 0)  # fp32 gradient + AdamW's two moments
    zero = int(((ds or {}).get("zero_optimization") or {}).get("stage", 0)) if ds else 0
    world = max(1, int(getattr(args, "world_size", 1) or 1))
    optimizer = per_param * trainable
    if zero >= 1:
        optimizer //= world
        offload = (((ds or {}).get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
        if on_gpu and offload not in (None, "none"):
            optimizer = 4 * trainable // world  # states on the CPU; the gradient partition stays
    if zero == 3:
        weights //= world
        adapters //= world

    h = int(cfg.get("hidden_size", 0))
    layers = int(cfg.get("num_hidden_layers", 0))
    mlp = int(cfg.get("intermediate_size", 0)) // 2  # Qwen v1: w1/w2 are half the configured width
    tokens = int(args.per_device_train_batch_size) * int(data_args.model_max_length)
    act_bytes = 2 if half else 4
    one_layer = 10 * h + 4 * mlp  # norms, q|k|v, attention out, projections, the SwiGLU halves
    if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
        per_token = layers * 2 * h + one_layer  # each block's two halves keep their input; one is recomputed
        keep = keep_budget_gib(args) * GIB  # what the kept blocks hold (the compact embedding's share not counted:
        # the whole input embedding is counted in the weights)
        per_token += min(layers * kept_values_per_token(h, mlp), int(keep) // max(1, tokens * act_bytes))
    else:
        per_token = layers * one_layer
    activations = tokens * per_token * act_bytes
    return MemoryEstimate(weights=weights, adapters=adapters, optimizer=optimizer, activations=activations,
                          trainable_params=trainable, tokens=tokens)


def available_bytes(device: str) -> int:
    """Free memory on the device: the GPU's free memory, or the RAM the system can still give."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    import psutil

    return psutil.virtual_memory().available


def fit_problem(model_dir, mode: str, lora_args, data_args, args, device: str, ds: dict | None) -> str | None:
    """Why the run clearly cannot fit on its device, with the estimate (None when it may fit)."""
    tensors = tensor_shapes(Path(model_dir))
    if not tensors:
        return None
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    est = estimate_memory(cfg, tensors, mode, lora_args, data_args, args, device, ds)
    free = available_bytes(device)
    if est.total <= FIT_MARGIN * free:
        return None
    return (f"this run needs about {est.total / GIB:.1f} GiB on {device} ({est.describe()}), and "
            f"{free / GIB:.1f} GiB is free there. Lower --per_device_train_batch_size or --model_max_length, "
            "turn on --gradient_checkpointing, train Q-LoRA on the Int4 model, or use a DeepSpeed config with "
            "offload (--deepspeed zero2_offload)")


def out_of_memory(where: str, device: str, data_args, args, checkpointing: bool) -> str:
    """One line for a run that ran out of device memory ``where`` (loading, capturing, a training step), with what
    the device held and the flags that lower the need, the ones this run can still change first
    (``checkpointing``: whether the run checkpoints activations)."""
    ways = []
    batch = args.per_device_train_batch_size
    if batch > 1:
        ways.append(f"--per_device_train_batch_size {batch // 2} --gradient_accumulation_steps "
                    f"{2 * args.gradient_accumulation_steps} (the same optimizer step)")
    if not checkpointing:
        ways.append("--gradient_checkpointing True")
    elif keep_budget_gib(args) > 0:
        now = args.gradient_checkpointing_keep_gib
        ways.append("--gradient_checkpointing_keep_gib 0 (now "
                    + (f"{now:g}" if now is not None else f"{DEFAULT_KEEP_GIB:g} plus what the compact input "
                       "embedding freed") + ": memory spent keeping MLP projections)")
    ways.append(f"a lower --model_max_length (now {data_args.model_max_length}"
                + (", the length of every packed row)" if data_args.packing else ")"))
    ways.append("a DeepSpeed config with offload (--deepspeed zero2_offload)")
    return f"out of memory {where}{held_on(device)}; try " + ", or ".join(ways)


def held_on(device: str) -> str:
    """The " (X GiB reserved by this process of Y GiB on DEVICE)" for a CUDA device, "" elsewhere: what an
    out-of-memory line says the process held."""
    if not device.startswith("cuda"):
        return ""
    import torch

    dev = torch.device(device)
    total = torch.cuda.get_device_properties(dev).total_memory
    return (f" ({torch.cuda.memory_reserved(dev) / GIB:.1f} GiB reserved by this process of {total / GIB:.1f} GiB "
            f"on {device})")


def gpu_memory_now() -> str:
    """This process's GPU memory now and at its peak, for a progress line: reserved (held from the driver, what
    another process cannot use) and allocated (what tensors use of it)."""
    import torch

    return (f"GPU memory {torch.cuda.memory_reserved() / GIB:.2f} GiB reserved "
            f"({torch.cuda.memory_allocated() / GIB:.2f} allocated), peak so far "
            f"{torch.cuda.max_memory_reserved() / GIB:.2f} ({torch.cuda.max_memory_allocated() / GIB:.2f})")
