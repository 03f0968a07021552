"""LoRA on GPTQLinear through PEFT: get_peft_model, training, save / load with no extra arguments, merge."""

import json

import pytest
import torch
import torch.nn as nn

import finetune.quant  # noqa: F401  (registers LoRA for GPTQLinear with PEFT)
from finetune.quant import GPTQLinear
from finetune.quant.peft_lora import GPTQLoraLinear

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TARGETS = ["c_attn", "c_proj", "w1", "w2"]


def _q(linear, group_size=32, desc_act=False):
    return GPTQLinear.from_linear(linear, bits=4, group_size=group_size, desc_act=desc_act)


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(3 * d, d, bias=False)


class MLP(nn.Module):
    def __init__(self, d, ff):
        super().__init__()
        self.w1 = nn.Linear(d, ff, bias=False)
        self.w2 = nn.Linear(d, ff, bias=False)
        self.c_proj = nn.Linear(ff, d, bias=False)


class Toy(nn.Module):
    """A Qwen-block-shaped toy: attn.c_attn (bias), attn.c_proj, mlp.w1/w2/c_proj, all GPTQ."""

    def __init__(self, d=64, ff=128, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.attn, self.mlp = Attn(d), MLP(d, ff)
        self.head = nn.Linear(d, 8)
        for parent, names in ((self.attn, ["c_attn", "c_proj"]), (self.mlp, ["w1", "w2", "c_proj"])):
            for n in names:
                setattr(parent, n, _q(getattr(parent, n), desc_act=(n == "w2")))
        self.head.requires_grad_(False)

    def forward(self, x):
        h = x + self.attn.c_proj(self.attn.c_attn(x))
        h = h + self.mlp.c_proj(self.mlp.w1(h) * torch.nn.functional.silu(self.mlp.w2(h)))
        return self.head(h)


def _buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def _lora(model, **kw):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, **kw)
    return get_peft_model(model, cfg)


def test_every_lora_config_carries_the_mapping():
    assert GPTQLinear in LoraConfig(r=2)._custom_modules
    # and it is not serialized
    assert "_custom_modules" not in LoraConfig(r=2).to_dict()


def test_get_peft_model_wraps_all_five_and_lora_is_fp32():
    pm = _lora(Toy())
    wrapped = {n for n, m in pm.named_modules() if isinstance(m, GPTQLoraLinear)}
    assert {w.split("base_model.model.")[-1] for w in wrapped} == {
        "attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"}
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    # starts as the identity (B = 0)
    x = torch.randn(3, 64)
    with pm.disable_adapter():
        base = pm(x)
    assert torch.equal(pm(x), base)


def test_training_changes_only_lora_and_buffers_stay_bit_identical():
    torch.manual_seed(0)
    pm = _lora(Toy())
    before = _buffers(pm)
    lora_before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    x, target = torch.randn(16, 64), torch.randn(16, 8)
    with torch.no_grad():  # a no-grad forward first
        pm(x)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(pm(x), target)
        opt.zero_grad()
        loss.backward()
        for n, b in pm.named_buffers():
            assert b.grad is None, n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = _buffers(pm)
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    changed = [n for n, p in pm.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert changed
    assert all(not p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)


def _train_a_bit(pm, steps=3):
    x, target = torch.randn(8, 64), torch.randn(8, 8)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(pm(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_save_and_load_roundtrip_without_extra_args(tmp_path):
    torch.manual_seed(1)
    pm = _lora(Toy(seed=3))
    _train_a_bit(pm)
    pm.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == set(TARGETS)
    x = torch.randn(5, 64)
    expected = pm(x)
    # a fresh base (same packed weights) + the saved adapter, no custom arguments
    loaded = PeftModel.from_pretrained(Toy(seed=3), tmp_path / "adapter")
    assert any(isinstance(m, GPTQLoraLinear) for m in loaded.modules())
    assert torch.equal(loaded(x), expected)


def test_merge_and_unmerge_through_dequantize():
    torch.manual_seed(2)
    pm = _lora(Toy(seed=4))
    _train_a_bit(pm)
    x = torch.randn(4, 64)
    with torch.no_grad():
        y = pm(x)
        packed_before = _buffers(pm)
        pm.merge_adapter()
        torch.testing.assert_close(pm(x), y, rtol=1e-4, atol=1e-4)
        pm.unmerge_adapter()
        assert torch.equal(pm(x), y)
        assert all(torch.equal(v, packed_before[k]) for k, v in _buffers(pm).items())
        merged = pm.merge_and_unload()
    assert not any(isinstance(m, (GPTQLoraLinear, GPTQLinear)) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["mica", "orthogonal"])
def test_an_init_that_reads_the_float_weight_starts_no_new_adapter_but_loads_a_trained_one(tmp_path, init):
    # a new one started with the default init silently: a MiCA B of zeros, frozen, so training changed nothing
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' reads the base layer's float weight"):
        _lora(Toy(), init_lora_weights=init)
    pm = _lora(Toy(seed=3))
    _train_a_bit(pm)
    pm.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": init}))
    x = torch.randn(5, 64)
    assert torch.equal(PeftModel.from_pretrained(Toy(seed=3), tmp_path / "adapter")(x), pm(x))


def test_dora_is_rejected_clearly():
    with pytest.raises(ValueError, match="DoRA"):
        _lora(Toy(), use_dora=True)


def _lora_toy(seed=0):
    model = get_peft_model(Toy(seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # trained-looking B (PEFT starts it at zero, which would hide a wrong B product)
            with torch.no_grad():
                p.normal_(0, 0.1, generator=g)
    return model


def _step(model, x, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().mean().backward()
    return out.float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("autocast", [False, True])
def test_lora_b_added_inside_the_matmul_equals_peft_s_separate_add(autocast):
    """The B product accumulated into the base output (_AddLoraB) against PEFT's lora_B(low) + torch.add, the
    path a hook on lora_B keeps (forward, every LoRA gradient): fp32 to 1e-6; under bf16 autocast the two round
    differently, so relative L2 errors (measured over seeds 0-11: output <= 0.0044, gradients <= 0.012)."""
    from finetune.quant.peft_lora import _AddLoraB

    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    if autocast:
        x = x.bfloat16()  # as the model's hidden states are (the base output takes its input's dtype)
    model = _lora_toy()
    calls = []
    real = _AddLoraB.forward

    def counted(ctx, *a):
        calls.append(1)
        return real(ctx, *a)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(_AddLoraB, "forward", staticmethod(counted))
        fused_out, fused = _step(model, x, autocast)
    assert len(calls) == 5  # every LoRA Linear took it
    hooks = [mod.register_forward_hook(lambda *a: None) for n, mod in model.named_modules()
             if n.endswith("lora_B.default")]
    plain_out, plain = _step(model, x, autocast)
    for h in hooks:
        h.remove()
    assert fused.keys() == plain.keys() and len(fused) == 10
    if not autocast:
        torch.testing.assert_close(fused_out, plain_out, rtol=1e-5, atol=1e-6)
        for n in fused:
            torch.testing.assert_close(fused[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)
        return
    assert (fused_out - plain_out).norm() <= 1e-2 * plain_out.norm()
    for n in fused:
        assert (fused[n] - plain[n]).norm() <= 3e-2 * plain[n].norm(), n


def test_lora_b_product_goes_into_the_base_output_in_place_unless_it_is_a_view():
    from finetune.quant.peft_lora import add_lora_b

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, generator=g, requires_grad=True)
    low = torch.randn(6, 4, generator=g, requires_grad=True)
    w = torch.randn(5, 4, generator=g, requires_grad=True)
    base_w = torch.randn(5, 8, generator=g)

    def run(make_result):
        for t in (x, low, w):
            t.grad = None
        result = make_result()
        before = result.detach().clone()
        out = add_lora_b(result, low, w, 0.5)
        torch.testing.assert_close(out, before + 0.5 * low @ w.t())
        out.square().sum().backward()
        return result, out, (x.grad.clone(), low.grad.clone(), w.grad.clone())

    # a fresh product (the base layer's output): updated in place, the gradients those of the plain sum
    result, out, grads = run(lambda: x @ base_w.t())
    assert out is result
    ref = (x @ base_w.t() + 0.5 * low @ w.t())
    for t in (x, low, w):
        t.grad = None
    ref.square().sum().backward()
    for got, want in zip(grads, (x.grad, low.grad, w.grad)):
        torch.testing.assert_close(got, want)
    # a view (here a transpose's) is left as it was: the sum goes to a new tensor
    result, out, grads2 = run(lambda: (base_w @ x.t()).t())
    assert out is not result and not torch.equal(out, result)
    for got, want in zip(grads2, grads):
        torch.testing.assert_close(got, want)
    # without autograd, in place as well
    with torch.no_grad():
        fresh = x @ base_w.t()
        assert add_lora_b(fresh, low, w, 0.5) is fresh
