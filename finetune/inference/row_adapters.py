"""LoRA per row of a batch, unmerged: every row chooses one of the adapters loaded in a PeftModel, or none.

How: while the engine runs a forward, PEFT's adapters are switched off (as ``disable_adapter()`` does: every
LoRA layer returns its base layer's output) and a forward hook on each LoRA layer adds, for each loaded adapter,
``lora_B(lora_A(x)) * scaling`` times a per-row 0/1 weight read from a tensor the engine owns. The hooks exist
only during the engine's forward (nothing is left on the model).

All adapters of a layer are computed together, in the forward's dtype: their A matrices side by side [in, R]
(R = the sum of their ranks) and their B matrices, scaling folded in, as bt [out, R], made once and remade when
a LoRA weight changes. A step is then one matmul (h = x A_all), one multiply by each column's row selection and
one matmul-add per layer, whatever the number of adapters (PEFT's own forward: ~7 kernels per adapter and layer,
in the LoRA weights' fp32). In bf16 the LoRA product is thus computed in bf16, as inference servers do; in fp32
it is PEFT's computation up to the summation order.

On a GPTQ base that decodes through the tensor-core GEMV (``quant/mma_gemv.py``, 1-8 rows), none of the three is a
kernel of its own: a pre-hook hands (A_all, selection, bt) to the base layer (``low_rank_epilogue``), whose kernel
computes h = x A_all in CTAs of its own and adds (h * selection) @ bt.T to each output before rounding it; the
forward hook then adds nothing. One kernel a Linear instead of four (a decode step of a 40-layer model: 200
launches instead of 800). Where the base runs another kernel (the small-M GEMM from 9 rows, or the rank sum is over
128) it leaves the tensors, and the forward hook computes and adds them as above.
``FINETUNE_GPTQ_LORA_EPILOGUE=0`` always leaves them to the hook (settings.py).

At up to 32 rows (XA_IN_NORM_MAX_ROWS) the fused decode step goes one further for the Linears that read a norm's
output (c_attn; w1 and w2, which share theirs): the norm kernel computes x A for them (``xa_operand``: their
A matrices transposed and stacked, cached like the rest) and hands each its columns (``give_h``), so their GEMVs
start with h instead of computing it in producer CTAs and waiting for it after their main loop (NOTES step 43);
from 9 rows the forward hook adds the product with that h instead of a cuBLAS x A (step 45). At 3-8 rows the
SwiGLU kernel does the same for mlp.c_proj, which reads its output (XA_IN_SWIGLU_ROWS, NOTES step 87).

Why not PEFT's mixed-batch ``adapter_names=`` forward: it splits the batch by adapter with index lists built
on the host at every call, which a CUDA graph cannot capture (one graph would be needed per mix of
adapters), and the project's GPTQ LoRA layer does not implement it. Here the selection is data in a static
tensor, so one captured graph per batch size serves any mix of adapters; the cost is that each loaded adapter
is computed for every row (an r=64 adapter is ~2.5% of a 14B layer's weight bytes per adapter).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..settings import settings

# Rows up to which the norm kernels compute x A for c_attn, w1 and w2, and SwiGLU's for mlp.c_proj (``xa_operand``).
# Measured for the norms on the H200 with an r=64 adapter (NOTES steps 43-45): a decode step 11% shorter at 1 row,
# 17% at 4, 23% at 8 (the GEMV takes h); 5% at 16 and 1.5% at 32 rows (the GEMM runs and the hook adds the product
# with h: one cuBLAS x A fewer a Linear)
XA_IN_NORM_MAX_ROWS = 32
# Rows at which the SwiGLU kernel computes x A for mlp.c_proj (``xa_operand``). On the H200 with an r=64 adapter, the
# decode step's replay against mlp.c_proj's own producers (NOTES step 87): 1 row +3.9%, 2 rows +1.4%, 3 -3.1%, 4
# -4.0%, 8 -11.0%, 16 +0.9%, 32 +3.3% (from 9 rows the GEMM runs, and h from SwiGLU spares the hook only one cuBLAS
# x A, which costs less than the SwiGLU kernel's extra time)
XA_IN_SWIGLU_ROWS = range(3, 9)
# Rows up to which an adapter's w1 and w2 decode as one launch (``paired``). On the H200 with an r=64 adapter: a one-row
# step 1.1% shorter, an 8-row step 1.5% longer (the block-diagonal B's zeros read by every row block; NOTES step 77)
PAIRED_LORA_MAX_ROWS = 1


def _same_layout(held: torch.Tensor, fresh: torch.Tensor) -> bool:
    return held.shape == fresh.shape and held.dtype == fresh.dtype and held.device == fresh.device


def lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def saved_modules(model) -> list:
    """PEFT's modules_to_save wrappers of ``model`` (each holds the original module and a trained copy per adapter)."""
    from peft.utils import ModulesToSaveWrapper

    return [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]


class AdapterMixError(ValueError):
    """Rows that the loaded adapters cannot compute side by side (one of them changed the base model itself)."""


class RowAdapters:
    """The adapters of ``model`` (a PeftModel with LoRA adapters, or a plain model: none)."""

    def __init__(self, model):
        self.layers = lora_layers(model) if hasattr(model, "peft_config") else []
        self._stacks: dict = {}  # id(layer) -> (key, A_all [in, R], B_all [R, out], column -> adapter [R])
        # one column -> adapter tensor per layout (adapter, rank) of the layers: the rows' selection is then gathered
        # once per forward and layout, not once per layer (200 gathers and casts a 14B step: ~0.5 ms on the H200)
        self._cols: dict = {}
        self._stacked_t: dict = {}  # consumers' ids -> (their stacks' keys, A.T of all of them [sum R, in])
        self._prepared = (None, 0)  # (dtype, bytes of every layer's A) once prepare() stacked them all
        self._active = False  # within applied() with a selection: the hooks are on
        self._base_only = False  # within applied() without one: every LoRA layer returns its base layer's output
        self._select = self._by_cols = None  # applied()'s selection, and its gathers by column layout
        names: set[str] = set()
        for layer in self.layers:
            names.update(layer.lora_A.keys())
            if getattr(layer, "merged", False):
                raise ValueError(f"adapter(s) {layer.merged_adapters} are merged into the base weights; the engine "
                                 "applies adapters unmerged: unmerge them (model.unmerge_adapter()) or pass the "
                                 "merged model without PEFT")
        # modules_to_save (the official finetune.py's LoRA saves wte and lm_head): whole copies of a module per
        # adapter; the original module runs for every row and a forward hook puts each adapter's copy's output into
        # its rows
        self.saved = saved_modules(model) if hasattr(model, "peft_config") else []
        for wrapper in self.saved:
            names.update(wrapper.modules_to_save.keys())
        self.names = sorted(names)
        self._ids = {id(layer) for layer in self.layers}
        # adapters that trained base-layer biases: PEFT loaded those into the base layers themselves, so no row
        # without that adapter (the base's, another adapter's) can be computed beside it
        configs = getattr(model, "peft_config", None) or {}
        # (finetune.adapters.changes_base: PEFT's bias "all" / "lora_only")
        self.base_changed = sorted(n for n in self.names if getattr(configs.get(n), "bias", "none") != "none")

    def index(self, name: str | None) -> int | None:
        if name is not None and name not in self.names:
            known = ", ".join(self.names) if self.names else "none (the model has no LoRA adapters)"
            raise ValueError(f"unknown adapter {name!r}; loaded adapters: {known}")
        other = [n for n in self.base_changed if n != name]
        if other:
            who = "the base model" if name is None else f"adapter {name!r}"
            raise AdapterMixError(f"adapter {other[0]!r} trained base-layer biases (bias {'all'!r} or "
                                  f"{'lora_only'!r} in its adapter_config.json), which PEFT loads into the base model "
                                  f"itself: {who} cannot run beside it; load that adapter alone, or merge it (qwen-ft "
                                  f"merge) and load the merged model")
        return None if name is None else self.names.index(name)

    @contextmanager
    def applied(self, select: torch.Tensor | None):
        """Within: the model computes base + sum_a select[a, row] * adapter_a for every row; ``select`` [A, rows]
        (fp32 0/1; rows = the forward's batch size). None: no row uses an adapter, the base alone runs (no
        adapter is computed at all)."""
        if not self.layers and not self.saved:
            yield
            return
        hooks = []
        if select is not None:
            # the row selection of each column layout, [rows, R]: gathered once per forward (``_selection``)
            self._select, self._by_cols = select, {}
            for layer in self.layers:
                hooks.append(layer.register_forward_pre_hook(self._pre_hook()))
                hooks.append(layer.register_forward_hook(self._hook()))
            for wrapper in self.saved:
                hooks.append(wrapper.register_forward_hook(self._saved_hook(select)))
            self._active = True
        # PEFT's own path off (each layer returns its base layer's output), as its disable_adapter() does, but
        # set on the layers directly: the engine may hold the wrapped model (peft_model.chat() passes that),
        # and enable_adapters() would also change requires_grad
        switched = self.layers + self.saved
        before = [m._disable_adapters for m in switched]
        try:
            for m in switched:
                m._disable_adapters = True  # a modules_to_save wrapper then runs its original module
            self._base_only = select is None
            yield
        finally:
            self._active = self._base_only = False
            self._select = self._by_cols = None
            for m, flag in zip(switched, before):
                m._disable_adapters = flag
            for layer in self.layers:
                layer.__dict__.pop("_row_low_rank", None)
                layer.__dict__.pop("_row_h", None)
                if getattr(layer.base_layer, "low_rank_epilogue", None) is not None:
                    layer.base_layer.low_rank_epilogue = None  # a forward that raised midway
            for h in hooks:
                h.remove()

    def _stacked(self, module, dtype):
        """(A_all [in, R], bt [out, R] (B_all with the scaling folded in, transposed), the adapter index of each of
        the R columns) of one LoRA layer in ``dtype``, cached until one of its LoRA weights changes (or the dtype /
        device does)."""
        parts = [(a, module.lora_A[n].weight, module.lora_B[n].weight, module.scaling[n])
                 for a, n in enumerate(self.names) if n in module.lora_A]
        key = (dtype, tuple((a, id(A), A._version, id(B), B._version, s) for a, A, B, s in parts))
        held = self._stacks.get(id(module))
        if held is not None and held[0] == key:
            return held[1:]
        with torch.no_grad():
            a_all = torch.cat([A for _, A, _, _ in parts], 0).t().to(dtype).contiguous()
            b_all = torch.cat([B.float() * s for _, _, B, s in parts], 1).to(dtype).contiguous()  # bt [out, R]
        if held is not None and _same_layout(held[1], a_all) and _same_layout(held[2], b_all):
            # new values, same layout: into the same buffers, which CUDA graphs captured earlier read
            held[1].copy_(a_all)
            held[2].copy_(b_all)
            self._stacks[id(module)] = (key,) + held[1:]
            return held[1:]
        layout = (a_all.device, tuple((a, A.shape[0]) for a, A, _, _ in parts))
        cols = self._cols.get(layout)
        if cols is None:
            cols = self._cols[layout] = torch.tensor([a for a, A, _, _ in parts for _ in range(A.shape[0])],
                                                     device=a_all.device)
        self._stacks[id(module)] = (key, a_all, b_all, cols)
        return a_all, b_all, cols

    def prepare(self, dtype) -> int:
        """Every LoRA layer's stacked copy in ``dtype`` made now, as the first forward with an adapter row would make
        it: the engine counts the device's free memory after them (at r=64 on the 14B they are ~0.45 GB an adapter).
        Returns the bytes that copies made later may still take: the x A operands of the kernels before the Linears
        (``xa_operand``: their A matrices transposed, made by the first decode step that asks), at most every layer's
        A once, less those made already."""
        if self._prepared[0] != dtype:  # (once: the engine asks at every join; refresh() keeps them up to date)
            total = 0
            for layer in self.layers:
                a_all, _, _ = self._stacked(layer, dtype)
                total += a_all.numel() * a_all.element_size()
            self._prepared = (dtype, total)
        made = sum(at.numel() * at.element_size() for _, at in self._stacked_t.values())
        return max(self._prepared[1] - made, 0)

    def xa_operand(self, consumers, rows: int, dtype) -> torch.Tensor | None:
        """A.T of the adapters of ``consumers`` (Linears that read one kernel's output: a norm's, SwiGLU's), stacked
        [sum R, in] in their order, for that kernel to compute h = x A for all of them (``give_h``); None where their
        GEMVs would not take h that way: outside ``applied`` with a selection, a consumer without LoRA, more rows than
        XA_IN_NORM_MAX_ROWS, not bf16, not a GPTQ base on the tensor-core kernel, an epilogue it cannot take, or the
        epilogue switched off (the fused step checks its own switches, FINETUNE_LORA_XA_IN_NORM / _IN_SWIGLU, before
        asking). Cached until a LoRA weight changes (new values of the same layout go into the same buffer: captured
        graphs read it)."""
        if not (self._active and rows <= XA_IN_NORM_MAX_ROWS and dtype == torch.bfloat16
                and settings().gptq_lora_epilogue):
            return None
        from ..quant.mma_gemv import LORA_MAX_RANK

        stacks = []
        for m in consumers:
            if not (hasattr(m, "lora_A") and id(m) in self._ids and hasattr(m.base_layer, "_mma_weight")):
                return None
            a_all, _, _ = self._stacked(m, dtype)
            if a_all.shape[1] % 8 or a_all.shape[1] > LORA_MAX_RANK:
                return None
            stacks.append((self._stacks[id(m)][0], a_all))
        return self._stacked_transposed(tuple(id(m) for m in consumers), stacks)

    def _stacked_transposed(self, ids: tuple, stacks: list) -> torch.Tensor:
        key = tuple(k for k, _ in stacks)
        held = self._stacked_t.get(ids)
        if held is not None and held[0] == key:
            return held[1]
        with torch.no_grad():
            at = torch.cat([a.t() for _, a in stacks], 0).contiguous()
        if held is not None and _same_layout(held[1], at):  # into the buffer captured graphs read, as _stacked
            held[1].copy_(at)
            at = held[1]
        self._stacked_t[ids] = (key, at)
        return at

    def _selection(self, cols: torch.Tensor, dtype) -> torch.Tensor:
        """[rows, R]: 1 where a row uses the adapter of a column of layout ``cols`` (gathered once per forward)."""
        sel = self._by_cols.get((id(cols), dtype))
        if sel is None:
            sel = self._select.t().index_select(1, cols).to(dtype).contiguous()
            self._by_cols[(id(cols), dtype)] = sel
        return sel

    def paired(self, first, second, x: torch.Tensor) -> tuple | None:
        """(first(x), second(x)) of two LoRA Linears that read the same norm output (the fused step's w1 and w2) as
        one tensor-core launch over both base weights (quant/linear.py ``paired_decode``), each row's adapters added
        in its epilogue; None where that does not apply (the caller calls the two layers). Inside ``applied``
        without a selection the two base layers are paired alone. With a selection, only up to
        PAIRED_LORA_MAX_ROWS rows (the GEMV's epilogue takes 1-8) with x A given by the norm kernel (``give_h``)
        for both: the epilogue then takes h of both side by side (one tensor, as the norm wrote it), their
        selections side by side, and each layer's own bt (the kernel takes bt1's rows with h's first columns, bt2's
        with the rest: the block-diagonal product without its zero blocks)."""
        from ..quant.linear import paired_decode

        if not all(hasattr(m, "lora_A") and id(m) in self._ids for m in (first, second)):
            return None
        if self._base_only:
            return paired_decode(first.base_layer, second.base_layer, x)
        # (checked before the operands are built, which would otherwise cost kernels a layer for nothing)
        if not (self._active and x.is_cuda and x.numel() // x.shape[-1] <= PAIRED_LORA_MAX_ROWS):
            return None
        h1, h2 = first.__dict__.get("_row_h"), second.__dict__.get("_row_h")
        if h1 is None or h2 is None:
            return None
        r1 = h1.shape[1]
        # the norm's x A for both: h2 follows h1 in one tensor (give_h's slices) when they are read side by side
        if not (h2.data_ptr() == h1.data_ptr() + r1 * h1.element_size() and h1.stride() == h2.stride()):
            return None
        h = h1.as_strided((h1.shape[0], r1 + h2.shape[1]), h1.stride())
        dtype = x.dtype
        (_, bt1, cols1), (_, bt2, cols2) = self._stacked(first, dtype), self._stacked(second, dtype)
        sel = self._by_cols.get(("pair", id(cols1), id(cols2), dtype))
        if sel is None:
            sel = torch.cat([self._selection(cols1, dtype), self._selection(cols2, dtype)], 1)
            self._by_cols[("pair", id(cols1), id(cols2), dtype)] = sel
        out = paired_decode(first.base_layer, second.base_layer, x, low_rank=(None, sel, (bt1, bt2), h))
        if out is not None:
            first.__dict__.pop("_row_h", None)
            second.__dict__.pop("_row_h", None)
        return out

    def give_h(self, consumers, h: torch.Tensor) -> None:
        """Hand each of ``consumers`` its columns of h = x A [rows, sum R] (``xa_operand``'s order) for its next
        forward: its pre-hook offers them to the GEMV with (sel, bt), and the GEMV reads them instead of x A."""
        start = 0
        for m in consumers:
            r = self._stacks[id(m)][1].shape[1]
            m.__dict__["_row_h"] = h[:, start:start + r]
            start += r

    def refresh(self) -> bool:
        """Bring every stacked copy up to date with the LoRA weights (changed in place since, e.g. by more
        training). A replayed CUDA graph never runs the hooks, so the engine calls this when a new batch starts.
        Returns True if a layout changed (new buffers: graphs captured before must be dropped)."""
        changed = False
        with torch.no_grad():
            for layer in self.layers:
                held = self._stacks.get(id(layer))
                if held is not None:
                    fresh = self._stacked(layer, held[0][0])
                    changed |= fresh[0] is not held[1]
            for ids, (key, at) in list(self._stacked_t.items()):
                stacks = [(self._stacks[i][0], self._stacks[i][1]) for i in ids]
                changed |= self._stacked_transposed(ids, stacks) is not at
        return changed

    def _pre_hook(self):
        def pre_hook(module, args):
            x = args[0]
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            a_all, bt, cols = self._stacked(module, dtype)
            sel = self._selection(cols, dtype)
            x2 = x.reshape(sel.shape[0], -1, x.shape[-1]).to(dtype)  # [rows, tokens, in]
            given = module.__dict__.pop("_row_h", None)  # x A from the norm kernel (give_h)
            offered = None
            if (x2.shape[1] == 1 and dtype == torch.bfloat16 and hasattr(module.base_layer, "_mma_weight")
                    and settings().gptq_lora_epilogue):
                from ..quant.mma_gemv import lora_unfit

                if given is not None and lora_unfit((a_all, sel, bt, given), x2.shape[0], a_all.shape[0],
                                                    bt.shape[0]) is None:
                    offered = (a_all, sel, bt, given)  # the GEMV starts with h: no producers, no wait
                elif lora_unfit((a_all, sel, bt), x2.shape[0], a_all.shape[0], bt.shape[0]) is None:
                    offered = (a_all, sel, bt)  # one token a row (a decode step): the base may compute it all
                if offered is not None:
                    module.base_layer.low_rank_epilogue = offered
            module.__dict__["_row_low_rank"] = (x2, a_all, sel, bt, offered)

        return pre_hook

    def _saved_hook(self, select):
        def hook(module, args, output):
            # rows (the first dim of the input ids or hidden states) that use an adapter with its own copy of this
            # module take that copy's output: exact, whatever the mix of rows
            for a, name in enumerate(self.names):
                if name in module.modules_to_save:
                    rows = select[a].to(device=output.device).view(-1, *([1] * (output.dim() - 1))) > 0
                    output = torch.where(rows, module.modules_to_save[name](*args).to(output.dtype), output)
            return output

        return hook

    def _hook(self):
        def hook(module, args, output):
            x2, a_all, sel, bt, offered = module.__dict__.pop("_row_low_rank")
            if offered is not None:
                taken = module.base_layer.low_rank_epilogue is None
                module.base_layer.low_rank_epilogue = None
                if taken:
                    return output
            if offered is not None and len(offered) == 4:
                h = offered[3][:, None, :]  # x A from the norm kernel (9+ rows: the base ran the GEMM)
            else:
                h = torch.matmul(x2, a_all)  # [rows, tokens, R]
            h = (h * sel[:, None, :]).reshape(-1, h.shape[-1])
            out = output.reshape(-1, output.shape[-1])
            if out.dtype == h.dtype:
                return torch.addmm(out, h, bt.t()).view(output.shape)
            return (out + torch.matmul(h, bt.t()).to(out.dtype)).view(output.shape)

        return hook


__all__ = ["AdapterMixError", "RowAdapters", "lora_layers", "saved_modules"]
