"""The engine's per-row adapter hooks (finetune/inference/row_adapters.py) on one LoRA Linear: each row gets its
own adapter's output, and a layer's adapters are computed together, so the ops a forward runs do not grow with
the number of adapters (a decode step runs the hook for every Linear of every layer: each extra kernel costs
~200 launches a step)."""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
