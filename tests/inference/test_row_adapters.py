"""The engine's per-row adapter hooks (finetune/inference/row_adapters.py) on one LoRA Linear: each row gets its
own adapter's output, and a layer's adapters are computed together, so the ops a forward runs do not grow with
the number of adapters (a decode step runs the hook for every Linear of every layer: each extra kernel costs
~200 launches a step)."""

from __future__ import annotations

import collections

import pytest

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.inference import row_adapters
from finetune.inference.row_adapters import RowAdapters

from _helpers import tiny_model as tiny
from test_inference_engine import _peft


class _Ops(TorchDispatchMode):
    """Counts the aten ops run inside (views and metadata ops included)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _layer_ops(pm, layer, names, x):
    """(output, compute ops of the second forward) of ``layer`` with row i using names[i] (None: the base)."""
    adapters = RowAdapters(pm)
    select = torch.zeros(len(adapters.names), x.shape[0])
    for row, name in enumerate(names):
        if name is not None:
            select[adapters.index(name), row] = 1.0
    with torch.no_grad(), adapters.applied(select):
        layer(x)  # the first forward also stacks the adapters' weights
    ops = _Ops()
    with torch.no_grad(), adapters.applied(select), ops:
        got = layer(x)
    skip = ("view", "t", "_unsafe_view", "unsqueeze", "expand", "select", "reshape", "alias", "detach")
    return got, {k: n for k, n in ops.ops.items() if k not in skip}


def test_each_row_gets_its_adapter_and_the_ops_do_not_grow_with_the_adapters():
    pm = _peft(tiny(seed=2), ["first", "second"])
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 1, layer.in_features)
    got, two = _layer_ops(pm, layer, ["first", None, "second"], x)
    with torch.no_grad():
        want = []
        for row, name in zip(x, ["first", None, "second"]):
            if name is None:
                with pm.disable_adapter():
                    want.append(layer(row[None]))
            else:
                pm.set_adapter(name)
                want.append(layer(row[None]))
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-6)
    one_pm = _peft(tiny(seed=2), ["first"])
    one_layer = one_pm.base_model.model.transformer.h[0].attn.c_attn
    _, one = _layer_ops(one_pm, one_layer, ["first", None, "first"], x)
    assert two == one, (one, two)  # two adapters: the same kernels as one
    # the base Linear, then per layer: x @ A_all, the rows' selection, one matmul-add with B_all
    assert sum(one.values()) <= 5, one


def test_a_forward_gathers_the_rows_selection_once_for_all_layers_of_a_layout():
    """Every LoRA layer with the same adapters and ranks shares one column layout: the rows' 0/1 selection is
    gathered and cast once per forward, not once per layer (a 14B decode step had 200 of each); a layer with
    another layout gets its own."""
    pm = _peft(tiny(seed=2), ["first", "second"])
    model = pm.base_model.model
    adapters = RowAdapters(pm)
    select = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    ids = torch.tensor([[5, 6], [7, 8], [9, 10]])
    with torch.no_grad(), adapters.applied(select):
        model(ids[:, :1])  # stacks every layer's weights
    ops = _Ops()
    with torch.no_grad(), adapters.applied(select), ops:
        model(ids[:, :1])
    assert len(adapters.layers) > 2
    assert ops.ops["index_select"] == 1, ops.ops
    assert len({id(held[3]) for held in adapters._stacks.values()}) == 1
    other = _peft(tiny(seed=2), ["first"])
    mixed = RowAdapters(other)
    with torch.no_grad(), mixed.applied(select[:1]):
        other.base_model.model(ids[:, :1])
    assert next(iter(mixed._stacks.values()))[3] is not next(iter(adapters._stacks.values()))[3]


def test_prepare_makes_every_stack_the_first_adapter_forward_would_and_counts_the_x_a_operands_to_come():
    """The engine counts the device's free memory for its KV cache after ``prepare``: it stacks every LoRA layer's
    adapters in the forward's dtype (a later forward with adapter rows makes no copy of its own), and returns the
    bytes the kernels' x A operands may still take (every layer's A once), less those made since."""
    pm = _peft(tiny(seed=2), ["first", "second"])
    model = pm.base_model.model
    adapters = RowAdapters(pm)
    a_bytes = sum(layer.lora_A[n].weight.numel() * 4 for layer in adapters.layers for n in ("first", "second"))
    assert not adapters._stacks
    assert adapters.prepare(torch.float32) == a_bytes
    assert set(adapters._stacks) == {id(layer) for layer in adapters.layers}
    held = {k: (v[1].data_ptr(), v[2].data_ptr()) for k, v in adapters._stacks.items()}
    with torch.no_grad(), adapters.applied(torch.tensor([[1.0, 0.0], [0.0, 1.0]])):
        model(torch.tensor([[5, 6], [7, 8]]))
    assert {k: (v[1].data_ptr(), v[2].data_ptr()) for k, v in adapters._stacks.items()} == held
    layer = adapters.layers[0]
    adapters._stacked_transposed((id(layer),), [adapters._stacks[id(layer)][:2]])  # one operand made
    assert adapters.prepare(torch.float32) == a_bytes - sum(layer.lora_A[n].weight.numel() * 4
                                                            for n in ("first", "second"))
    assert RowAdapters(tiny(seed=2)).prepare(torch.float32) == 0  # no adapter, nothing kept back


def _gptq_peft_model():
    """The tiny model on a bf16 GPTQ base (CPU) with two r=8 LoRA adapters of random init, "first" and "second"."""
    from peft import LoraConfig, get_peft_model

    from finetune.demo import TINY_CONFIG
    from finetune.modeling import QWenConfig
    from finetune.quant.loading import build_gptq_model_on_device

    values = {k: v for k, v in TINY_CONFIG.items() if k not in ("architectures", "auto_map", "model_type")}
    values["quantization_config"] = {"bits": 4, "group_size": 32, "quant_method": "gptq", "desc_act": False}
    model = build_gptq_model_on_device(QWenConfig(**values), device="cpu", dtype=torch.bfloat16, seed=0).eval()
    cfg = dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "w1", "w2"], init_lora_weights=False)
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(**cfg), adapter_name="first")
    pm.add_adapter("second", LoraConfig(**cfg))
    pm.eval()
    return pm


def _taking(real, offers: list):
    """A stand-in for the tensor-core GEMV's LoRA build around GPTQLinear.forward ``real``: it takes an offered
    (a, sel, bt[, h]) (recorded in ``offers``), adds (h * sel) @ bt.T with h given or x a, and clears the offer."""
    def taking(self, x):
        low_rank = self.__dict__.get("low_rank_epilogue")
        y = real(self, x)
        if low_rank is not None:
            offers.append(low_rank)
            a, sel, bt, h = low_rank if len(low_rank) == 4 else (*low_rank, None)
            if h is None:
                h = x.reshape(-1, a.shape[0]) @ a  # the kernel's h: x a rounded to bf16
            y = (y.float() + ((h.float() * sel.float()) @ bt.float().t()).view(y.shape)).to(y.dtype)
            self.low_rank_epilogue = None
        return y

    return taking


def test_a_gptq_base_that_adds_the_product_in_its_kernel_gets_it_once(switches):
    """bf16 decode rows on a GPTQ base: the pre-hook offers (h, selection, bt) to the base layer; a base whose
    kernel adds it (the tensor-core GEMV on CUDA; here a stand-in) sets it back to None and the forward hook adds
    nothing, one that does not leaves it and the hook adds it. Prefill rows (several tokens) are not offered, and
    nothing is left on the layers afterwards, even after a forward that raised."""
    from finetune.quant.linear import GPTQLinear

    pm = _gptq_peft_model()
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    adapters = RowAdapters(pm)
    select = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # rows: first, none, second
    x = torch.randn(3, 1, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad(), adapters.applied(select):
        plain = layer(x)  # the base leaves the offer: the hook adds it
    offers = []
    real = GPTQLinear.forward
    GPTQLinear.forward = _taking(real, offers)
    try:
        switches(gptq_lora_epilogue=False)
        with torch.no_grad(), adapters.applied(select):
            layer(x)
        assert offers == []  # FINETUNE_GPTQ_LORA_EPILOGUE=0: nothing is offered
        switches(gptq_lora_epilogue=True)  # (the default)
        with torch.no_grad(), adapters.applied(select):
            fused = layer(x)
            prefill = layer(torch.randn(3, 2, layer.in_features, dtype=torch.bfloat16))
        assert [o[0].shape for o in offers] == [(layer.in_features, 16)] and prefill.shape == (3, 2, layer.out_features)
        torch.testing.assert_close(fused, plain, rtol=2e-2, atol=2e-2)  # once, not twice (nor zero times)
        base_only = layer.base_layer(x)
        assert (plain - base_only).abs().max() > 10 * (fused - plain).abs().max()

        def failing(self, x):
            raise RuntimeError("kernel failed")

        GPTQLinear.forward = failing
        with pytest.raises(RuntimeError), torch.no_grad(), adapters.applied(select):
            layer(x)
    finally:
        GPTQLinear.forward = real
    assert layer.base_layer.__dict__.get("low_rank_epilogue") is None and "_row_low_rank" not in layer.__dict__


def test_the_kernel_before_computes_x_a_for_the_linears_that_read_it(switches):
    """One bf16 decode row on a GPTQ base: ``xa_operand`` stacks A.T of the Linears that read one kernel (c_attn
    alone; w1 and w2 together, in that order; SwiGLU's reader mlp.c_proj), ``give_h`` hands each its columns of x A,
    and the pre-hook offers them with (a, sel, bt) to the base, which then reads h instead of computing x A (or,
    where the base does not take it, the forward hook adds the product with that h); where they do not fit (outside
    applied(), more rows than XA_IN_NORM_MAX_ROWS, fp32, the epilogue switched off, a Linear without LoRA) nothing
    is stacked. The stack follows a LoRA weight changed in place, in the same buffer (captured graphs read it), at
    refresh()."""
    from finetune.quant.linear import GPTQLinear

    pm = _gptq_peft_model()
    block = pm.base_model.model.transformer.h[0]
    c_attn, w1, w2 = block.attn.c_attn, block.mlp.w1, block.mlp.w2
    adapters = RowAdapters(pm)
    select = torch.tensor([[0.0], [1.0]])  # one row, the second adapter
    bf = torch.bfloat16

    def stacked_t(m):
        return torch.cat([m.lora_A[n].weight for n in ("first", "second")], 0).to(bf)

    assert adapters.xa_operand((c_attn,), 1, bf) is None  # outside applied()
    offers = []
    real = GPTQLinear.forward
    GPTQLinear.forward = _taking(real, offers)
    try:
        x = torch.randn(1, 1, c_attn.in_features, dtype=bf)
        with torch.no_grad(), adapters.applied(select):
            at = adapters.xa_operand((c_attn,), 1, bf)
            assert torch.equal(at, stacked_t(c_attn))
            at12 = adapters.xa_operand((w1, w2), 1, bf)
            assert torch.equal(at12, torch.cat([stacked_t(w1), stacked_t(w2)], 0))
            assert torch.equal(adapters.xa_operand((block.mlp.c_proj,), 1, bf), stacked_t(block.mlp.c_proj))
            assert adapters.xa_operand((c_attn,), row_adapters.XA_IN_NORM_MAX_ROWS + 1, bf) is None
            assert adapters.xa_operand((c_attn,), 1, torch.float32) is None
            assert adapters.xa_operand((c_attn.base_layer,), 1, bf) is None
            switches(gptq_lora_epilogue=False)
            assert adapters.xa_operand((c_attn,), 1, bf) is None
            switches(gptq_lora_epilogue=True)
            computed = c_attn(x)
            h = (x.reshape(1, -1) @ at.t()).to(bf)
            adapters.give_h((c_attn,), h)
            given = c_attn(x)
            assert "_row_h" not in c_attn.__dict__
            h12 = (x.reshape(1, -1) @ at12.t()).to(bf)
            adapters.give_h((w1, w2), h12)
            assert torch.equal(w2.__dict__["_row_h"], h12[:, 16:])
            w1(x), w2(x)
        assert [len(o) for o in offers] == [3, 4, 4, 4]
        torch.testing.assert_close(given, computed, rtol=2e-2, atol=2e-2)
    finally:
        GPTQLinear.forward = real
    with torch.no_grad(), adapters.applied(select):  # a base that does not take it (the GEMM): the hook adds it
        at = adapters.xa_operand((c_attn,), 1, bf)
        adapters.give_h((c_attn,), (x.reshape(1, -1) @ at.t()).to(bf))
        hooked = c_attn(x)
        adapters.give_h((c_attn,), torch.zeros(1, at.shape[0], dtype=bf))
        zero_h = c_attn(x)  # the given h is what the hook uses: zero adds nothing
        base = c_attn.base_layer(x)
    torch.testing.assert_close(hooked, computed, rtol=2e-2, atol=2e-2)
    assert torch.equal(zero_h, base) and not torch.equal(hooked, base)
    with torch.no_grad():
        c_attn.lora_A["second"].weight.mul_(2)
    adapters.refresh()
    with torch.no_grad(), adapters.applied(select):
        again = adapters.xa_operand((c_attn,), 1, bf)
    assert again is at and torch.equal(again, stacked_t(c_attn))
