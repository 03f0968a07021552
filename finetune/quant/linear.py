"""GPTQLinear: a frozen GPTQ-quantized Linear that trains LoRA on top of it.

- The packed tensors are buffers: qweight/qzeros/g_idx int32 and scales fp16 never change and never get
  gradients. ``model.to(torch.bfloat16)`` / ``.half()`` / DeepSpeed's casts move them between devices but
  never change their dtype (``_apply`` is overridden for that). The optional ``bias`` buffer is a frozen
  float weight and *does* follow dtype casts (the precision policy: frozen float weights are cast once to
  the compute dtype); forward adds it in the activation dtype in any case.
- Forward runs in the activation dtype (or the autocast dtype when autocast is on): dequantize to that
  dtype, then matmul. On CUDA the dequantization is a Triton kernel (``triton_dequant.py``, imported only
  then); elsewhere plain torch.
- Decoding (at most ``GEMV_MAX_ROWS`` = 64 rows, no autograd graph needed, CUDA with Triton): a fused GEMV /
  small-M GEMM kernel (``triton_gemv.py``) reads the packed buffers directly and never writes the float
  weight; same numerics up to the summation order.
- Decoding one to four rows of bf16 on CUDA: PyTorch's built-in int4 kernel (``aten._weight_int4pack_mm``) on a
  copy of the weight converted once to its layout (``int4pack.py``; on an H200 1.6-1.8x the Triton GEMV's speed
  at one row, 1.1-1.5x at four, slower from 8 rows). The copy costs as much memory again as the packed weight;
  it is made on the first such call and dropped when the packed buffers change.
- Decoding 1 to 64 rows of bf16 on CUDA (compute capability 8.0+), first choice: tensor-core kernels compiled at
  run time on a copy of the weight repacked once into their layout (same memory again, like the int4pack copy,
  which is then not made): the GEMV (``mma_gemv.py``) below ``mma_gemm.MIN_ROWS`` (9) rows, the small-M GEMM
  (``mma_gemm.py``, x staged in shared memory) from there to 64 rows. Layers they cannot take (not 4-bit, N not a
  multiple of 16, a group size not a multiple of 128) use the kernels above. Both copies are made by the first
  decoding call (one position per row), not by a short training or evaluation forward.
- The inference engine's unmerged LoRA (``inference/row_adapters.py``) may set ``low_rank_epilogue`` = (a, sel,
  bt) or (a, sel, bt, h) on the layer just before a forward: when the tensor-core GEMV runs (1-8 rows), it
  computes h = x a (or takes h) and adds (h * sel) @ bt.T in the same kernel, and the forward sets the attribute
  back to None; any other kernel leaves it for the engine to add.
- Autograd: ``GPTQMatmul`` keeps only references to the packed buffers (no activations, no float weight,
  no saved tensors) and recomputes the dequantized weight in backward; it returns a gradient for the input
  only.

Environment switches: ``FINETUNE_GPTQ_BACKEND`` = ``auto`` (default: Triton on CUDA when importable),
``torch`` (plain torch everywhere) or ``triton`` (fail if Triton is missing); ``FINETUNE_GPTQ_GEMV=0`` turns
the fused decode GEMV off (dequantize + matmul for every row count); ``FINETUNE_GPTQ_TUNE=0`` skips the
Triton kernels' one-time config timing; ``FINETUNE_GPTQ_INT4PACK=0`` keeps one- to four-row decoding on the
Triton GEMV (no second copy of the weights); ``FINETUNE_GPTQ_MMA=0`` turns the tensor-core kernels off.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from .packing import (
    check_bits,
    default_g_idx,
    dequantize_t,
    num_groups,
    values_per_word,
)

from ..settings import settings
from .mma_gemm import MIN_ROWS as MMA_GEMM_MIN_ROWS  # from here to 64 rows: the tensor-core GEMM (measured)

GEMV_MAX_ROWS = 64  # = triton_gemv.MAX_ROWS (batched decoding up to 64 rows)
INT4PACK_MAX_ROWS = 4  # measured faster than the Triton GEMV at 1, 2 and 4 rows, slower at 8 (benchmarks/NOTES.md)
_GEMV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


_TRITON_IMPORTABLE: bool | None = None


def _use_triton(device: torch.device) -> bool:
    global _TRITON_IMPORTABLE
    if device.type != "cuda":
        return False
    backend = settings().gptq_backend
    if backend == "torch":
        return False
    if _TRITON_IMPORTABLE is None:
        try:
            from . import triton_dequant  # noqa: F401  (lazy: CPU never imports triton)

            _TRITON_IMPORTABLE = True
        except ImportError:
            _TRITON_IMPORTABLE = False
    if not _TRITON_IMPORTABLE and backend == "triton":
        raise ImportError("FINETUNE_GPTQ_BACKEND=triton but triton is not importable")
    return _TRITON_IMPORTABLE


def dequantize_weight_t(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    v2: bool,
    dtype: torch.dtype,
    group_size: int | None = None,
    trivial_g_idx: bool | None = None,
) -> torch.Tensor:
    """W.T [in, out] contiguous in ``dtype``, on the buffers' device (Triton on CUDA, torch elsewhere).

    ``trivial_g_idx``: whether g_idx[k] == k // group_size (lets the kernel load one row of scales per
    block); None = find out (the kernel wrapper caches it per g_idx tensor).
    """
    if _use_triton(qweight.device):
        from .triton_dequant import triton_dequantize_t

        return triton_dequantize_t(qweight, qzeros, scales, g_idx, bits, v2=v2, dtype=dtype, group_size=group_size,
                                   trivial_g_idx=trivial_g_idx)
    return dequantize_t(qweight, qzeros, scales, g_idx, bits, v2=v2, dtype=dtype)


def gptq_gemv(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    v2: bool,
    group_size: int | None = None,
    trivial_g_idx: bool | None = None,
) -> torch.Tensor:
    """x2d [M, in] @ W.T -> [M, out] in x2d's dtype for 1 <= M <= GEMV_MAX_ROWS, straight from the packed
    buffers (Triton, CUDA only; no autograd)."""
    from .triton_gemv import triton_gemv

    return triton_gemv(x2d, qweight, qzeros, scales, g_idx, bits, v2=v2, group_size=group_size,
                       trivial_g_idx=trivial_g_idx)


# Weights dequantized by a checkpointed segment's recomputation, kept for the backward of the same op, which runs
# later in the same segment (its input gradient needs W again): {id of the packed weight: (backward pass, W.T)}.
# An entry lives from the recomputation to that backward (at most a segment's input projections: c_attn, or w1
# and w2, ~0.3 GB on the 14B shape), so a checkpointed step dequantizes 10 weights a layer instead of 13.
_RECOMPUTED: dict[int, tuple[int, torch.Tensor]] = {}


def _keep_recomputed(qweight: torch.Tensor, wt: torch.Tensor) -> None:
    """Keep W.T when this forward is a recomputation (it runs inside a backward pass: only checkpointing does
    that), for the backward of the same op in the same pass."""
    task = torch._C._current_graph_task_id()
    if task == -1:
        return
    if any(t != task for t, _ in _RECOMPUTED.values()):
        _RECOMPUTED.clear()  # left by an earlier pass whose backward did not come (never used across passes)
    _RECOMPUTED[id(qweight)] = (task, wt)


def _take_recomputed(qweight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    held = _RECOMPUTED.pop(id(qweight), None)
    if held is None or held[0] != torch._C._current_graph_task_id() or held[1].dtype != dtype:
        return None
    return held[1]


class GPTQMatmul(torch.autograd.Function):
    """y = x @ W.T with W dequantized on the fly; the weight is never saved: backward dequantizes it again, or,
    under checkpointing, takes the copy the segment's recomputation just made (``_RECOMPUTED``)."""

    @staticmethod
    def forward(ctx, x, qweight, qzeros, scales, g_idx, bits, v2, group_size, trivial_g_idx=None, bias=None):
        wt = dequantize_weight_t(qweight, qzeros, scales, g_idx, bits, v2, x.dtype, group_size, trivial_g_idx)
        if bias is None:
            y = torch.matmul(x, wt)
        else:
            # the bias added in the product's epilogue: a separate broadcast add read and wrote c_attn's whole
            # [tokens x 15360] output once more (84 us at 2048 tokens on an H200, forward and recomputation)
            # (into y's own storage: a view would not take LoRA's product in place, see peft_lora._AddLoraB)
            y = torch.empty(*x.shape[:-1], wt.shape[1], device=x.device, dtype=x.dtype)
            torch.addmm(bias, x.reshape(-1, x.shape[-1]), wt, out=y.view(-1, wt.shape[1]))
        if ctx.needs_input_grad[0]:
            _keep_recomputed(qweight, wt)
        ctx.bits, ctx.v2, ctx.group_size, ctx.trivial_g_idx = bits, v2, group_size, trivial_g_idx
        ctx.x_dtype = x.dtype
        # The packed buffers are frozen module buffers, kept as plain references rather than saved tensors:
        # nothing goes through saved-tensor hooks, so under non-reentrant checkpointing a Linear whose output
        # no later op saves ends the recomputation early (its matmul is never redone), and an activation
        # offload hook never copies weights. The activations are not needed for grad_x.
        ctx.packed = (qweight, qzeros, scales, g_idx)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = None
        if ctx.needs_input_grad[0]:
            qweight, qzeros, scales, g_idx = ctx.packed
            wt = _take_recomputed(qweight, grad_y.dtype)
            if wt is None:
                wt = dequantize_weight_t(qweight, qzeros, scales, g_idx, ctx.bits, ctx.v2, grad_y.dtype,
                                         ctx.group_size, ctx.trivial_g_idx)
            grad_x = torch.matmul(grad_y, wt.t())
            if grad_x.dtype != ctx.x_dtype:
                grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, None, None, None, None, None, None, None, None, None


class GPTQLinear(nn.Module):
    """A Linear whose weight is stored GPTQ-packed (see ``packing.py`` for the layout).

    Buffers: ``qweight`` int32 [in*bits/32, out], ``qzeros`` int32 [groups, out*bits/32], ``scales`` fp16
    [groups, out], ``g_idx`` int32 [in], ``bias`` [out] or None. Freshly built buffers are zeros (a valid
    all-zero weight: q = 0, v1 zero point 1 would give -scale; scales are zero so W = 0) until a checkpoint
    is loaded into them.
    """

    # gptqmodel/PEFT-style names some tools look for
    QUANT_TYPE = "finetune-gptq"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        bits: int = 4,
        group_size: int = 128,
        v2: bool = False,
        desc_act: bool = False,
        device=None,
        bias_dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        check_bits(bits)
        per = values_per_word(bits)
        if in_features % per or out_features % per:
            raise ValueError(
                f"GPTQLinear({in_features}, {out_features}, bits={bits}): in_features and out_features must be "
                f"multiples of {per} (values per int32 word)"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size if group_size and group_size > 0 else -1
        self.v2 = bool(v2)
        self.desc_act = bool(desc_act)
        groups = num_groups(in_features, self.group_size)
        self.register_buffer(
            "qweight", torch.zeros(in_features // per, out_features, dtype=torch.int32, device=device)
        )
        self.register_buffer("qzeros", torch.zeros(groups, out_features // per, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        if device is not None and torch.device(device).type == "meta":
            g_idx = torch.empty(in_features, dtype=torch.int32, device=device)
        else:
            g_idx = default_g_idx(in_features, self.group_size, device=device)
        self.register_buffer("g_idx", g_idx)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @property
    def num_groups(self) -> int:
        return self.scales.shape[0]

    # -- dtype policy -------------------------------------------------------------------------------
    _NEVER_CAST = ("qweight", "qzeros", "scales", "g_idx")

    def _apply(self, fn, recurse=True):
        """Apply ``fn`` (device moves, dtype casts) but keep the packed buffers' dtypes."""
        kept = {}
        for name in self._NEVER_CAST:
            buf = self._buffers.get(name)
            if buf is not None:
                kept[name] = buf
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                if new.device.type == "meta" or old.device.type == "meta":
                    self._buffers[name] = new.to(old.dtype)
                else:
                    self._buffers[name] = old.to(new.device)
        return self

    # -- math ---------------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The exact float weight W [out, in] (computed in fp32, rounded once to ``dtype``)."""
        wt = dequantize_weight_t(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.v2, dtype, self.group_size
        )
        return wt.t().contiguous()

    def _derived(self, name: str, sources: tuple, make=None):
        """A value computed from the buffers ``sources``, kept in ``self.__dict__[name]`` until one of them is
        replaced or changed in place (tracked by weak reference and version). ``make`` None: the kept value only
        if it is current, else None."""
        held = self.__dict__.get(name)
        if held is not None and all(r() is t and v == t._version for r, v, t in zip(held[0], held[1], sources)):
            return held[2]
        if make is None:
            return None
        value = make()
        self.__dict__[name] = (tuple(weakref.ref(t) for t in sources), tuple(t._version for t in sources), value)
        return value

    def _trivial_g_idx(self) -> bool | None:
        """Whether g_idx is the plain ``k // group_size`` order; checked once per g_idx tensor (one host sync)
        and cached on the module, so the training loop never syncs. Only needed by the Triton path."""
        def check():
            g = self.g_idx
            expected = torch.arange(self.in_features, device=g.device, dtype=torch.int32) // self._group()
            return bool(torch.equal(g.to(torch.int32), expected))

        return self._derived("_trivial_ref", (self.g_idx,), check)

    def _group(self) -> int:
        """The group size in input rows (one group of all of them when group_size is -1)."""
        return self.group_size if self.group_size > 0 else self.in_features

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_trivial_ref", None)  # a weakref: not picklable, recomputed on demand
        state.pop("_int4pack", None)  # derived copies of the weight, remade on demand
        state.pop("_mma", None)
        state.pop("_mma_pair", None)
        state.pop("low_rank_epilogue", None)  # one forward's tensors
        return state

    def _int4pack_weight(self, build: bool = True):
        """(packed, scales_and_zeros, group size, perm): this layer in PyTorch's int4 layout, the arguments of
        ``int4pack.int4pack_mm`` after x, made on first use and remade when a packed buffer changes; None when
        the layer cannot use that kernel, or when there is no current copy and ``build`` is False (inside a CUDA
        graph capture: making one syncs)."""
        def make():
            from . import int4pack

            gs = self._group()
            if int4pack.unsupported(self.in_features, self.out_features, self.bits, gs, self.g_idx) is not None:
                return None
            qn, sz, perm = int4pack.gptq_to_int4pack(self.qweight, self.qzeros, self.scales, self.g_idx, self.v2, gs)
            return int4pack.pack_for_cuda(qn), sz, gs, perm

        return self._derived("_int4pack", (self.qweight, self.qzeros, self.scales, self.g_idx),
                             make if build else None)

    def _mma_weight(self, build: bool = True):
        """(wpack, scales, qzeros, zero_add, group size, perm): this layer repacked for ``mma_gemv.mma_gemv``
        (the arguments after x), made on first use and remade when a packed buffer changes; None when the layer
        or the device cannot use that kernel, or when there is no current copy and ``build`` is False."""
        def make():
            from . import mma_gemv

            gs = self._group()
            if (mma_gemv.available() is not None
                    or mma_gemv.unsupported(self.in_features, self.out_features, self.bits, gs, self.g_idx) is not None
                    or mma_gemv.compile_error(self.qweight.device, gs) is not None):
                return None
            wpack, scales, qzeros, zero_add, perm = mma_gemv.repack(self.qweight, self.qzeros, self.scales,
                                                                    self.g_idx, self.v2, gs)
            return wpack, scales, qzeros, zero_add, gs, perm

        return self._derived("_mma", (self.qweight, self.qzeros, self.scales, self.g_idx), make if build else None)

    def _share_mma_weight(self, wpack: torch.Tensor) -> None:
        """Make this layer's repacked weight ``wpack`` (a view of a pair's, equal to it): the copy it held is freed."""
        refs, versions, value = self.__dict__["_mma"]
        self.__dict__["_mma"] = (refs, versions, (wpack,) + tuple(value[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        if not dtype.is_floating_point:
            raise TypeError(f"GPTQLinear expects a floating point input, got {x.dtype}")
        if x.dtype != dtype:
            x = x.to(dtype)
        use_triton = _use_triton(self.qweight.device)
        trivial = self._trivial_g_idx() if use_triton else None
        rows = x.numel() // self.in_features if self.in_features else 0
        bias = None if self.bias is None else self.bias.to(dtype)
        if (use_triton and 0 < rows <= GEMV_MAX_ROWS and x.shape[-1] == self.in_features and dtype in _GEMV_DTYPES
                and not (torch.is_grad_enabled() and x.requires_grad) and settings().gptq_gemv):
            # decoding: the fused GEMV reads the packed weight once and writes no float weight
            x2d = x.reshape(rows, self.in_features)
            y = None
            fast_bf16 = dtype == torch.bfloat16 and self.bits == 4 and device_type == "cuda"
            capturing = torch.cuda.is_current_stream_capturing() if device_type == "cuda" else False
            # the weight copies below (6.3 GB for 14B) are made by decoding calls (one position per row), not by
            # a short training or evaluation forward; once made, any small call uses them
            build = not capturing and (x.dim() < 3 or x.shape[-2] == 1)
            if fast_bf16 and settings().gptq_mma:
                mm = self._mma_weight(build=build)
                low_rank = self.__dict__.get("low_rank_epilogue")
                # 9+ rows: the GEMM, also where a LoRA product is offered (the GEMM has no epilogue for it: the
                # engine's hook adds it); the GEMV's LoRA build at 16 and 32 rows took 2-3x the GEMM's step with
                # separate LoRA kernels (NOTES step 44)
                if mm is not None and MMA_GEMM_MIN_ROWS <= rows:
                    from .mma_gemm import mma_gemm

                    y = mma_gemm(x2d, *mm, bias=bias)  # None: no split-K workspace yet inside a capture
                elif mm is not None:  # (fewer rows than the GEMM takes)
                    from .mma_gemv import mma_gemv

                    y = mma_gemv(x2d, *mm, low_rank=low_rank, bias=bias)
                    if y is not None and low_rank is not None:
                        self.low_rank_epilogue = None  # added: the engine's hook must not add it again
                if y is not None:
                    bias = None  # added in the tensor-core kernel's epilogue (one kernel less a call)
            if y is None and fast_bf16 and rows <= INT4PACK_MAX_ROWS and settings().gptq_int4pack:
                packed = self._int4pack_weight(build=build)
                if packed is not None:
                    from .int4pack import int4pack_mm

                    y = int4pack_mm(x2d.contiguous(), *packed)
            if y is None:
                y = gptq_gemv(x2d, self.qweight, self.qzeros, self.scales, self.g_idx,
                              self.bits, self.v2, self.group_size, trivial)
            y = y.reshape(*x.shape[:-1], self.out_features)
            if bias is not None:
                y = y + bias
        else:
            args = (x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.v2, self.group_size,
                    trivial, bias)
            if autocast:
                with torch.autocast(device_type=device_type, enabled=False):
                    y = GPTQMatmul.apply(*args)
            else:
                y = GPTQMatmul.apply(*args)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, desc_act={self.desc_act}, v2={self.v2}"
        )

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qweight, qzeros, scales, g_idx, bias=None, bits=4, group_size=128, v2=False,
                       desc_act=False) -> "GPTQLinear":
        """Wrap existing packed tensors (shapes checked)."""
        per = values_per_word(bits)
        in_features = g_idx.shape[0]
        out_features = scales.shape[1]
        layer = cls(in_features, out_features, bias=bias is not None, bits=bits, group_size=group_size, v2=v2,
                    desc_act=desc_act, device="meta")
        expected = {
            "qweight": (in_features // per, out_features),
            "qzeros": (scales.shape[0], out_features // per),
            "scales": (scales.shape[0], out_features),
            "g_idx": (in_features,),
        }
        given = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
        for name, t in given.items():
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected[name]}")
        layer.qweight = qweight.to(torch.int32)
        layer.qzeros = qzeros.to(torch.int32)
        layer.scales = scales.to(torch.float16)
        layer.g_idx = g_idx.to(torch.int32)
        if bias is not None:
            layer.bias = bias
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits=4, group_size=128, desc_act=False, v2=False,
                    sym=True) -> "GPTQLinear":
        """Round-to-nearest quantize an nn.Linear (see ``rtn.quantize_weight``)."""
        from .rtn import quantize_weight

        packed = quantize_weight(linear.weight.detach(), bits=bits, group_size=group_size, sym=sym,
                                 desc_act=desc_act, v2=v2)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_quantized(**packed, bias=bias, bits=bits, group_size=group_size, v2=v2, desc_act=desc_act)


def prepare_decode_weights(model, dtype: torch.dtype) -> int:
    """Make now, for every GPTQ Int4 layer of ``model`` on CUDA, the repacked copy that the tensor-core decode kernels
    read (``GPTQLinear._mma_weight``), as the first ``dtype`` decoding call would; returns the bytes made. The
    inference engine calls it before it sizes its KV cache to the free memory: the copies (the Int4 weights' size
    again, 6.3 GB for the 14B, and the repack's int64 temporaries, 600 MiB for its c_attn) were made by the first
    decode step, after the cache had taken that memory (64 rows of 1,000-token prompts ran an 80 GB card out of
    memory there, NOTES step 89)."""
    switches = settings()
    if dtype != torch.bfloat16 or not (switches.gptq_gemv and switches.gptq_mma):
        return 0
    made = 0
    for layer in model.modules():
        if (type(layer) is GPTQLinear and layer.bits == 4 and layer.qweight.is_cuda
                and _use_triton(layer.qweight.device) and layer._mma_weight(build=False) is None):
            mm = layer._mma_weight(build=True)
            made += mm[0].numel() * mm[0].element_size() if mm else 0
    return made


def paired_decode(first: GPTQLinear, second: GPTQLinear, x: torch.Tensor,
                  low_rank: tuple | None = None) -> tuple | None:
    """(first(x), second(x)) for two bias-free Int4 Linears that read the same decoding input, by one tensor-core
    launch over their weights side by side (the decode step's w1 and w2: a launch a layer less, at one row ~4 us of
    fixed cost each, NOTES step 52). Each layer's own repacked copy becomes a view of the pair's, so the weights
    are not held twice. None where this does not apply, and the caller calls the two layers: not bf16 CUDA
    decoding of 1-64 rows, a hook or a LoRA epilogue on either (an adapter's), a bias, layers the kernels or the
    pairing cannot take, no pair made yet inside a CUDA graph capture, or FINETUNE_PAIRED_DECODE=0. The results
    are the two halves (views) of one [..., N1 + N2] tensor.

    ``low_rank`` = (None, sel, bt, h) for both at once, as ``mma_gemv``'s epilogue takes it over the pair's N1 + N2
    outputs, bt as the pair (bt1, bt2) of each layer's own (the engine's adapters: ``RowAdapters.paired``): 1-8 rows
    only (the GEMV), else None.
    """
    K = first.in_features
    rows = x.numel() // K if K else 0
    if not (x.is_cuda and x.dtype == torch.bfloat16 and 0 < rows <= GEMV_MAX_ROWS and x.shape[-1] == K):
        return None
    switches = settings()
    if not (switches.paired_decode and switches.gptq_gemv and switches.gptq_mma):
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    for layer in (first, second):
        if (type(layer) is not GPTQLinear or layer.bias is not None or layer.bits != 4 or layer.in_features != K
                or layer._forward_hooks or layer._forward_pre_hooks
                or layer.__dict__.get("low_rank_epilogue") is not None):
            return None
    from . import mma_gemv

    def make():
        a, b = first._mma_weight(build=True), second._mma_weight(build=True)
        if a is None or b is None or a[4] != b[4]:
            return False  # cannot pair (kept, so that the check is not repeated every step)
        pair = mma_gemv.side_by_side(a[:4] + (a[5],), b[:4] + (b[5],))
        if pair is None:
            return False
        split = a[0].shape[0]
        first._share_mma_weight(pair[0][:split])
        second._share_mma_weight(pair[0][split:])
        return pair[:4] + (a[4], None)

    build = not torch.cuda.is_current_stream_capturing() and (x.dim() < 3 or x.shape[-2] == 1)
    sources = tuple(getattr(layer, name) for layer in (first, second)
                    for name in ("qweight", "qzeros", "scales", "g_idx"))
    mm = first._derived("_mma_pair", sources, make if build else None)
    if not mm:
        return None
    x2d = x.reshape(rows, K)
    if low_rank is not None and (rows >= MMA_GEMM_MIN_ROWS or not switches.gptq_lora_epilogue
                                 or mma_gemv.lora_unfit(low_rank, rows, K, mm[0].shape[0] * 16) is not None):
        return None
    if rows >= MMA_GEMM_MIN_ROWS:
        from .mma_gemm import mma_gemm

        y = mma_gemm(x2d, *mm)
    else:
        y = mma_gemv.mma_gemv(x2d, *mm, low_rank=low_rank)
    if y is None:
        return None
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y[..., :first.out_features], y[..., first.out_features:]
