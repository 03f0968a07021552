"""The engine's per-row adapter hooks (finetune/inference/row_adapters.py) on one LoRA Linear: each row gets its
own adapter's output, and a hook adds an adapter with its two matmuls and one fused multiply-add (a decode step
runs it for every Linear of every layer, so each extra elementwise kernel costs ~200 launches a step)."""

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


def test_each_row_gets_its_adapter_with_one_multiply_add_per_adapter():
    pm = _peft(tiny(seed=2), ["first", "second"])
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    adapters = RowAdapters(pm)
    x = torch.randn(3, 1, layer.in_features)
    select = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # row 0: first, row 1: none, row 2: second
    ops = _Ops()
    with torch.no_grad(), adapters.applied(select), ops:
        got = layer(x)
    with torch.no_grad():
        want = []
        for row, name in zip(x, ["first", None, "second"]):
            if name is None:
                with pm.disable_adapter():
                    want.append(layer(row[None]))
            else:
                pm.set_adapter(name)
                want.append(layer(row[None]))
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-6, atol=1e-6)
    compute = {k: n for k, n in ops.ops.items() if k not in ("view", "t", "_unsafe_view", "unsqueeze", "expand", "select")}
    # the base addmm, per adapter two matmuls and one addcmul_, and each adapter's row weights once (mul)
    assert compute == {"addmm": 1, "mm": 4, "addcmul_": 2, "mul": 2}, compute
