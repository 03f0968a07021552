"""The fused decode step's choices that need no GPU (``finetune/inference/fused_decode.py``): which kernel computes x A
for mlp.c_proj's LoRA product."""

from __future__ import annotations

import types

import pytest
import torch

from finetune.inference import fused_decode
from finetune.inference.row_adapters import XA_IN_SWIGLU_ROWS


class _Adapters:
    """Stands in for RowAdapters: A.T for any consumer, and what it was handed."""

    def __init__(self):
        self.asked, self.given = [], []

    def xa_operand(self, consumers, rows, dtype):
        self.asked.append(rows)
        return torch.ones(8, 16, dtype=dtype)

    def give_h(self, consumers, h):
        self.given.append(h)


def _kernels(calls):
    def swiglu(up, gate):
        calls.append("swiglu")
        return up * gate

    def swiglu_low_rank(up, gate, at):
        calls.append("swiglu_low_rank")
        out = up * gate
        return out, out.reshape(-1, out.shape[-1]) @ at.t()

    return types.SimpleNamespace(swiglu=swiglu, swiglu_low_rank=swiglu_low_rank)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 9, 16, 32])
def test_swiglu_computes_x_a_for_c_proj_only_at_the_rows_where_it_pays(rows, switches):
    """3-8 rows (row_adapters.XA_IN_SWIGLU_ROWS, measured on the H200: NOTES step 87): SwiGLU's kernel computes x A and
    hands it to mlp.c_proj; at other row counts, without adapters or with FINETUNE_LORA_XA_IN_SWIGLU=0 the plain
    kernel runs and nothing is handed over."""
    up, gate = torch.randn(rows, 1, 16), torch.randn(rows, 1, 16)
    c_proj = torch.nn.Linear(16, 4)
    for on in (True, False):
        switches(lora_xa_in_swiglu=on)
        calls, adapters = [], _Adapters()
        out = fused_decode._swiglu(_kernels(calls), adapters, up, gate, c_proj)
        assert torch.equal(out, up * gate)
        takes = on and rows in XA_IN_SWIGLU_ROWS
        assert calls == ["swiglu_low_rank" if takes else "swiglu"], (rows, on)
        assert adapters.asked == ([rows] if takes else [])
        assert len(adapters.given) == int(takes)
        if takes:
            assert torch.allclose(adapters.given[0], (up * gate).reshape(rows, 16) @ torch.ones(16, 8))
    calls = []
    assert torch.equal(fused_decode._swiglu(_kernels(calls), None, up, gate, c_proj), up * gate)
    assert calls == ["swiglu"]


def test_a_block_module_an_adapter_keeps_its_own_copy_of_turns_the_fused_step_off(tmp_path, caplog, monkeypatch):
    """The fused kernels read a norm's weight directly, where an adapter's own copy of it (modules_to_save) reaches its
    rows only through the wrapper's forward: on the GPU such an adapter's rows decoded with the base's norms (their
    first token already another than PEFT's, by a logit gap of 0.53 on an H100: adapter_variants_gpu norms_saved)."""
    import logging

    from finetune import load_model
    from finetune.demo import make_demo_model

    from _helpers import random_adapter

    base = make_demo_model(tmp_path / "base")
    plain = load_model(base, adapter=random_adapter(base, tmp_path / "plain"), dtype=torch.float32, device="cpu")
    saving_wte = random_adapter(base, tmp_path / "wte", modules_to_save=["wte", "lm_head"])
    for plainer in (plain, load_model(base, adapter=saving_wte, dtype=torch.float32, device="cpu")):
        assert fused_decode.saved_in_blocks(plainer.base_model.model.transformer) == []  # (wte is called whole)
    adapter = random_adapter(base, tmp_path / "norms", targets=("c_attn",), modules_to_save=["ln_1", "ln_f", "w1"])
    model = load_model(base, adapter=adapter, dtype=torch.float32, device="cpu")
    tr = model.base_model.model.transformer
    layers = len(tr.h)
    want = [n for i in range(layers) for n in (f"h.{i}.ln_1", f"h.{i}.mlp.w1")] + ["ln_f"]
    assert fused_decode.saved_in_blocks(tr) == want
    # (asked for CUDA, so that the structural reason is the one that decides here)
    monkeypatch.setattr(fused_decode, "settings", lambda: types.SimpleNamespace(fused_decode=True))
    with caplog.at_level(logging.INFO, logger="finetune.inference.fused_decode"):
        assert fused_decode.fused_kernels(tr, torch.device("cuda"), torch.float32) is None
    assert "an adapter has its own h.0.ln_1 (modules_to_save)" in caplog.text
