"""LoRA on GPTQLinear through PEFT's custom module mapping.

``GPTQLoraLinear`` follows PEFT's own ``GPTQLoraLinear`` (peft/tuners/lora/gptq.py): the frozen base
layer's output plus ``lora_B(lora_A(dropout(x))) * scaling`` per active adapter, the LoRA weights fp32
master weights (PEFT keeps adapter weights in the base layer's dtype only when that is floating; the base
here reports int32 ``qweight``, so they stay fp32).

Registration, and why it is done this way: PEFT's supported extension point is
``LoraConfig._register_custom_module({GPTQLinear: GPTQLoraLinear})`` on a config instance, but the mapping
is not saved in adapter_config.json, so ``PeftModel.from_pretrained`` / ``AutoPeftModelForCausalLM``
build a fresh LoraConfig without it and would fail on GPTQLinear. ``register_peft()`` (run when PEFT is
imported after ``import finetune``: finetune/registry.py) wraps ``LoraConfig.__post_init__`` so that every LoraConfig created afterwards
carries the mapping, through that same public-ish API. This is the smallest patch that covers every path
(get_peft_model, PeftModel.from_pretrained, AutoPeftModel*, load_adapter, add_adapter): it touches no
dispatch internals, changes nothing for models without GPTQLinear (the mapping only matches GPTQLinear),
does not change what is serialized, and is idempotent. A LoraConfig created *before* ``import finetune``
can be fixed with ``register_peft(config)``.

Merging: ``merge()`` dequantizes the base weight exactly (``GPTQLinear.dequantize``), adds the LoRA delta in
fp32 and swaps in an ``nn.Linear`` holding the merged float weight (dtype: ``merge_dtype`` if set, else the
dtype of the base bias, else bf16 on CUDA / fp32 elsewhere); ``unmerge()`` restores the original packed
layer bit for bit. ``merge_and_unload()`` therefore yields a float model (`qwen-ft merge --format int4` re-quantizes).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
from peft.tuners.lora import LoraConfig, LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge

from .linear import GPTQLinear


def _plain_linear(module: nn.Module) -> bool:
    """lora_B as PEFT builds it (no bias, no hooks), whose product may be computed without calling it."""
    return (type(module) is nn.Linear and module.bias is None and not module._forward_hooks
            and not module._forward_pre_hooks)


class _AddLoraB(torch.autograd.Function):
    """base + scaling * low @ B.T accumulated into the base output by the product itself (cuBLAS's addmm_, beta 1).

    PEFT's way, lora_B(low) then torch.add(base, delta, alpha=scaling), writes the [tokens x out] delta, reads it
    back with the base, and in backward scales the whole output gradient once more: about six full-size passes a
    Linear (forward, recomputation, backward) that this does not make. Out of place, addmm would still copy the
    base output into a new tensor first (on the 14B shape ~9 copies a layer, 2% of a 2048-token step), so the base
    output, which nothing saves for backward, is updated in place (``mark_dirty``). Nothing is saved through
    autograd's saved tensors: `low` ([tokens x r], small) and the weight are kept as plain references, so when this
    Linear ends a checkpointed segment the recomputation still stops at lora_A, before the base matmul (see the
    GPTQMatmul docstring in linear.py)."""

    @staticmethod
    def forward(ctx, result, low, weight, scaling):
        ctx.low, ctx.weight, ctx.scaling = low, weight, scaling
        ctx.mark_dirty(result)
        return _addmm_lora_b_(result, low, weight, scaling)

    @staticmethod
    def backward(ctx, grad):
        low, weight, scaling = ctx.low, ctx.weight, ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        grad_low = grad_weight = None
        if ctx.needs_input_grad[1]:
            # the scaling folded into the small weight (one rounding), not applied to the full-size gradient
            grad_low = torch.mm(g, (weight.float() * scaling).to(g.dtype)).view(low.shape)
        if ctx.needs_input_grad[2]:
            grad_weight = torch.mm(g.t(), low.reshape(-1, low.shape[-1]).to(g.dtype)).to(weight.dtype)
            grad_weight.mul_(scaling)
        ctx.low = ctx.weight = None
        return grad, grad_low, grad_weight, None


def _addmm_lora_b_(result, low, weight, scaling):
    """result += scaling * low @ weight.T, in place (result contiguous)."""
    result.view(-1, result.shape[-1]).addmm_(low.reshape(-1, low.shape[-1]), weight.to(result.dtype).t(),
                                            alpha=scaling)
    return result


def _addmm_lora_b(result, low, weight, scaling):
    out = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]),
                      weight.to(result.dtype).t(), alpha=scaling)
    return out.view(result.shape)


def add_lora_b(result: torch.Tensor, low: torch.Tensor, weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """result + scaling * low @ weight.T (`low` = lora_A's output, `weight` = lora_B's), in result's dtype; into
    `result` itself where it is a fresh, contiguous, non-view output (the base layer's)."""
    in_place = result.is_contiguous() and not result._is_view() and not (result.is_leaf and result.requires_grad)
    if torch.is_grad_enabled() and (result.requires_grad or low.requires_grad or weight.requires_grad):
        if in_place:
            return _AddLoraB.apply(result, low, weight, scaling)
        return _AddLoraBCopy.apply(result, low, weight, scaling)
    return _addmm_lora_b_(result, low, weight, scaling) if in_place else _addmm_lora_b(result, low, weight, scaling)


class _AddLoraBCopy(_AddLoraB):
    """_AddLoraB into a new tensor, for a base output that cannot be updated in place (a view, a leaf)."""

    @staticmethod
    def forward(ctx, result, low, weight, scaling):
        ctx.low, ctx.weight, ctx.scaling = low, weight, scaling
        return _addmm_lora_b(result, low, weight, scaling)


# init_lora_weights values that read the base's float weight only to choose A and B's starting values
_FLOAT_WEIGHT_INITS = ("orthogonal", "mica", "lora_ga")
# set while PEFT builds an adapter that a load then fills (loading_adapter): its starting values do not matter
_LOADING = contextvars.ContextVar("finetune_loading_adapter", default=False)


@contextlib.contextmanager
def loading_adapter():
    """PEFT builds adapters here that a saved adapter's weights then overwrite (from_pretrained, load_adapter): an
    init that needs the float weight may then start from the default one (GPTQLoraLinear.update_layer)."""
    token = _LOADING.set(True)
    try:
        yield
    finally:
        _LOADING.reset(token)


class GPTQLoraLinear(nn.Module, LoraLayer):
    """LoRA adapter(s) around a frozen GPTQLinear."""

    def __init__(self, base_layer, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1,
                 **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise ValueError("LoRA on GPTQ (Int4) layers does not support DoRA; set use_dora=False")
        if getattr(config, "velora_config", None) is not None:
            raise ValueError("LoRA on GPTQ (Int4) layers does not support VeLoRA")
        self.fan_in_fan_out = False
        self.merge_dtype: torch.dtype | None = None
        self._gptq_base: GPTQLinear | None = None  # the packed layer while a merged float Linear stands in
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module):
        return module.in_features, module.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        # PEFT's orthogonal, MiCA and LoRA-GA inits read the base layer's float ``weight``, which a packed layer does
        # not have (AttributeError deep in PEFT). They only set the starting A and B, which a load overwrites, so an
        # adapter trained with one loads here with the default init (loading_adapter). MiCA also trains A alone: its B
        # stays frozen, as PEFT's MiCA variant freezes it on a float base (--lora_weight_path continues it as MiCA).
        # A new adapter cannot start so: the default init in their place would not be theirs (a MiCA B of zeros,
        # frozen, trains nothing); it needs the float weights (a dequantized model), as PiSSA's would.
        init = config.init_lora_weights
        if init in _FLOAT_WEIGHT_INITS:
            if not _LOADING.get():
                raise ValueError(f"init_lora_weights={init!r} reads the base layer's float weight, which a GPTQ "
                                 f"(Int4) layer does not have: start the adapter on a float (dequantized) model; an "
                                 f"adapter trained with it loads here")
            config = copy.copy(config)
            config.init_lora_weights = True
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        if init == "mica":  # (a PEFT that knows MiCA has this)
            from peft.tuners.lora.variants import _register_frozen_peft_weight

            _register_frozen_peft_weight(self, adapter_name, "lora_B")

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        return None  # vanilla LoRA only (DoRA etc. rejected above)

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            raise ValueError("mixed-adapter batches (adapter_names=...) are not supported on GPTQ layers")
        if self.disable_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        # Under autocast the adapter matmuls run in the compute dtype whatever their fp32 master weights are:
        # casting x up to fp32 first would only add two full-size copies per layer (measured: 14% of the
        # GPU time of a 14B step at 2048 tokens).
        autocast = torch.is_autocast_enabled(x.device.type)
        # The adapters run before the frozen base: the base matmul saves nothing for backward, so when this
        # Linear ends a checkpointed segment (attn.c_proj, mlp.c_proj) the recomputation stops after the
        # adapters and never redoes the base matmul.
        # lora_B's product is added inside its matmul after the base (_AddLoraB) where the dtypes allow; else it
        # is computed here, before the base (the base output has x's dtype)
        deltas, lows = [], []
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A.keys():
                continue
            lora_A = self.lora_A[active_adapter]
            lora_B = self.lora_B[active_adapter]
            dropout = self.lora_dropout[active_adapter]
            xa = x if autocast else self._cast_input_dtype(x, lora_A.weight.dtype)
            low = lora_A(dropout(xa))
            if _plain_linear(lora_B) and low.dtype == x.dtype and (autocast or lora_B.weight.dtype == x.dtype):
                lows.append((low, lora_B, self.scaling[active_adapter]))
            else:
                deltas.append((lora_B(low), self.scaling[active_adapter]))
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for low, lora_B, scaling in lows:
            if result_dtype == low.dtype:
                result = add_lora_b(result, low, lora_B.weight, scaling)
            else:  # a base layer with another output dtype than its input's
                deltas.append((lora_B(low), scaling))
        for delta, scaling in deltas:
            if delta.dtype == result_dtype:
                result = torch.add(result, delta, alpha=scaling)  # one kernel for scale and add
            else:
                result = result + (delta * scaling).to(result_dtype)
        return result

    # -- merging ------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The fp32 weight delta [out, in] of one adapter."""
        A = self.lora_A[adapter].weight.float()
        B = self.lora_B[adapter].weight.float()
        return (B @ A) * self.scaling[adapter]

    def _merged_dtype(self, base: GPTQLinear) -> torch.dtype:
        if self.merge_dtype is not None:
            return self.merge_dtype
        if base.bias is not None and base.bias.dtype.is_floating_point:
            return base.bias.dtype
        if base.qweight.is_cuda and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        if isinstance(base, GPTQLinear):
            packed = base
            weight = packed.dequantize(torch.float32)
            out_dtype = self._merged_dtype(packed)
        else:  # already merged once: a float Linear stands in for the packed layer
            packed = self._gptq_base
            weight = base.weight.detach().float()
            out_dtype = base.weight.dtype
        for name in adapter_names:
            if name in self.lora_A:
                weight = weight + self.get_delta_weight(name).to(weight.device)
                self.merged_adapters.append(name)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs/infs in the merged weight of adapter(s) {adapter_names}; merge aborted")
        merged = nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None,
                           device=weight.device, dtype=out_dtype)
        with torch.no_grad():
            merged.weight.copy_(weight)
            if packed.bias is not None:
                merged.bias.copy_(packed.bias)
        merged.requires_grad_(False)
        self._gptq_base = packed
        self.base_layer = merged

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        if self._gptq_base is not None:
            self.base_layer = self._gptq_base  # the packed weights were never touched
            self._gptq_base = None
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


CUSTOM_MODULE_MAPPING = {GPTQLinear: GPTQLoraLinear}

_ORIGINAL_POST_INIT = None


def register_peft(config: LoraConfig | None = None) -> None:
    """Make LoRA attach to GPTQLinear: for ``config`` if given, and (always, idempotently) for every
    LoraConfig created from now on (see the module docstring for why)."""
    global _ORIGINAL_POST_INIT
    if config is not None:
        config._register_custom_module(CUSTOM_MODULE_MAPPING)
    if _ORIGINAL_POST_INIT is not None:
        return
    original = LoraConfig.__post_init__
    _ORIGINAL_POST_INIT = original

    def __post_init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._register_custom_module(CUSTOM_MODULE_MAPPING)

    __post_init__.__wrapped__ = original
    __post_init__.__doc__ = original.__doc__
    LoraConfig.__post_init__ = __post_init__


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every GPTQLinear left in ``model`` by a float nn.Linear holding its exact weight in ``dtype``, and
    drop the config's quantization_config: the model is then a float model that saves and reloads as one.
    Returns how many layers were dequantized."""
    n = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, GPTQLinear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=module.qweight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(module.dequantize(torch.float32))
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        linear.requires_grad_(False)
        setattr(parent, child, linear)
        n += 1
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None
        config.torch_dtype = dtype
    drop_zero_biases(model)
    return n


def architecture_keys(model: nn.Module) -> set[str]:
    """The state-dict keys ``model``'s own architecture builds from its config (a copy made on the meta device):
    what a float model of it saves and loads, against what the loaded checkpoint brought besides."""
    with torch.device("meta"):
        return set(type(model)(model.config).state_dict())


def drop_zero_biases(model: nn.Module) -> int:
    """Remove the all-zero bias of each nn.Linear that the model's own architecture builds without one: auto-gptq
    stored a zero bias beside every quantized Linear (Qwen's Int4 releases: attn.c_proj, w1, w2, mlp.c_proj), which
    the dequantized layer kept, so a float model saved after a merge held keys its config's model has not (the
    loaders here refused the dir). A non-zero one stays: it changes the result. Returns how many went."""
    if getattr(model, "config", None) is None:
        return 0
    expected = architecture_keys(model)
    n = 0
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) and m.bias is not None and f"{name}.weight" in expected
                and f"{name}.bias" not in expected and not torch.count_nonzero(m.bias)):
            m.bias = None
            n += 1
    return n


register_peft()

__all__ = ["GPTQLoraLinear", "register_peft", "CUSTOM_MODULE_MAPPING", "dequantize_model", "drop_zero_biases",
           "architecture_keys"]
