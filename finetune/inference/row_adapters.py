"""LoRA per row of a batch, unmerged: every row chooses one of the adapters loaded in a PeftModel, or none.

How: while the engine runs a forward, PEFT's adapters are switched off (as ``disable_adapter()`` does: every
LoRA layer returns its base layer's output) and a forward hook on each LoRA layer adds, for each loaded adapter,
``lora_B(lora_A(x)) * scaling`` times a per-row 0/1 weight read from a tensor the engine owns. The hooks exist
only during the engine's forward (nothing is left on the model).

Why not PEFT's mixed-batch ``adapter_names=`` forward: it splits the batch by adapter with index lists built
on the host at every call, which a CUDA graph cannot capture (one graph would be needed per mix of
adapters), and the project's GPTQ LoRA layer does not implement it. Here the selection is data in a static
tensor, so one captured graph per batch size serves any mix of adapters; the cost is that each loaded adapter
is computed for every row (an r=64 adapter is ~2.5% of a 14B layer's weight bytes per adapter).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


class RowAdapters:
    """The adapters of ``model`` (a PeftModel with LoRA adapters, or a plain model: none)."""

    def __init__(self, model):
        self.layers = lora_layers(model) if hasattr(model, "peft_config") else []
        names: set[str] = set()
        for layer in self.layers:
            names.update(layer.lora_A.keys())
            if getattr(layer, "merged", False):
                raise ValueError(f"adapter(s) {layer.merged_adapters} are merged into the base weights; the engine "
                                 "applies adapters unmerged: unmerge them (model.unmerge_adapter()) or pass the "
                                 "merged model without PEFT")
        self.names = sorted(names)

    def index(self, name: str | None) -> int | None:
        if name is None:
            return None
        if name not in self.names:
            known = ", ".join(self.names) if self.names else "none (the model has no LoRA adapters)"
            raise ValueError(f"unknown adapter {name!r}; loaded adapters: {known}")
        return self.names.index(name)

    @contextmanager
    def applied(self, select: torch.Tensor | None):
        """Within: the model computes base + sum_a select[a, row] * adapter_a for every row; ``select`` [A, rows]
        (fp32 0/1; rows = the forward's batch size)."""
        if not self.layers:
            yield
            return
        hooks = [layer.register_forward_hook(self._hook(select)) for layer in self.layers]
        # PEFT's own path off (each layer returns its base layer's output), as its disable_adapter() does, but
        # set on the layers directly: the engine may hold the wrapped model (peft_model.chat() passes that),
        # and enable_adapters() would also change requires_grad
        before = [layer._disable_adapters for layer in self.layers]
        try:
            for layer in self.layers:
                layer._disable_adapters = True
            yield
        finally:
            for layer, flag in zip(self.layers, before):
                layer._disable_adapters = flag
            for h in hooks:
                h.remove()

    def _hook(self, select):
        names = self.names
        weights: dict = {}  # (adapter, scaling) -> select[a] * scaling [rows], computed once per forward

        def hook(module, args, output):
            x = args[0]
            autocast = torch.is_autocast_enabled(x.device.type)
            for a, name in enumerate(names):
                if name not in module.lora_A:
                    continue
                lora_A, lora_B = module.lora_A[name], module.lora_B[name]
                xa = x if autocast else x.to(lora_A.weight.dtype)
                delta = lora_B(lora_A(module.lora_dropout[name](xa)))
                scaling = module.scaling[name]
                w = weights.get((a, scaling))
                if w is None:
                    w = weights[(a, scaling)] = select[a] * scaling
                # output += delta * scaling * row weight, one kernel (a decode step runs this for every Linear
                # and adapter) into the base layer's own fresh output, rounded once to its dtype
                output = output.addcmul_(delta, w.view(-1, *([1] * (delta.dim() - 1))))  # w: [rows, 1, ...]
            return output

        return hook


__all__ = ["RowAdapters", "lora_layers"]
