"""SeededDropout (``finetune/training/seeded_dropout.py``) through Triton's interpreter on the CPU: the mask is
a function of (seed, salt, element) only, so the backward and a recomputation reproduce the forward's mask.
Run with ``TRITON_INTERPRET=1 python -m pytest tests/training/test_seeded_dropout_interpret.py`` (without it these
skip; see tests/_helpers.load_interpreted). The compiled kernel runs in tests/training/test_graphs_cuda.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.settings import override

from _helpers import ROOT, load_interpreted

DROPOUT_PY = ROOT / "finetune" / "training" / "seeded_dropout.py"


@pytest.fixture(scope="module")
def sd():
    with pytest.MonkeyPatch.context() as mp:
        yield load_interpreted(DROPOUT_PY, "_seeded_dropout_interpreted", mp)


def _seed(v):
    return torch.tensor([v], dtype=torch.int64)


def test_same_seed_and_salt_give_the_same_mask_and_backward_uses_it(sd):
    x = torch.randn(3, 1000)
    drop = sd.SeededDropout(0.25, _seed(7), salt=3)
    a = drop(x)
    b = drop(x)
    assert torch.equal(a, b)
    kept = a != 0
    assert torch.allclose(a[kept], x[kept] / 0.75)  # survivors scaled by 1/(1-p)
    xr = x.clone().requires_grad_(True)
    drop(xr).backward(torch.ones_like(x))
    assert torch.equal(xr.grad != 0, kept)
    assert torch.allclose(xr.grad[kept], torch.full_like(xr.grad[kept], 1 / 0.75))


def test_masks_differ_between_salts_and_seeds(sd):
    x = torch.ones(4096)
    seed = _seed(11)
    m1 = sd.SeededDropout(0.5, seed, 0)(x) != 0
    m2 = sd.SeededDropout(0.5, seed, 1)(x) != 0
    seed.add_(1)  # a step later: the same site draws a new mask
    m3 = sd.SeededDropout(0.5, seed, 0)(x) != 0
    assert not torch.equal(m1, m2) and not torch.equal(m1, m3)
    # independent halves: about a quarter of the elements kept by both
    assert abs(float((m1 & m2).float().mean()) - 0.25) < 0.03


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_drop_rate_is_p(sd, p):
    y = sd.SeededDropout(p, _seed(5), 0)(torch.ones(200_000))
    assert abs(float((y == 0).float().mean()) - p) < 0.005


def test_each_of_the_eight_elements_a_philox_call_serves_draws_its_own_bits(sd):
    # one call's four words make the masks of eight adjacent elements (a word's low and high halves): each of the
    # eight positions drops at rate p, and neighbours independently of each other
    y = sd.SeededDropout(0.5, _seed(3), 2)(torch.ones(8 * 20_000)).view(-1, 8) == 0
    assert torch.all((y.float().mean(0) - 0.5).abs() < 0.02), y.float().mean(0)
    both = (y[:, :-1] & y[:, 1:]).float().mean(0)
    assert torch.all((both - 0.25).abs() < 0.02), both


def test_p_is_taken_to_the_nearest_65536th(sd):
    assert sd.drop_threshold(0.05) == 3277 and sd.drop_threshold(0.25) == 16384 and sd.drop_threshold(0.0) == 0
    # a size that is not a multiple of the block or of eight: every element is either dropped or scaled
    x = torch.rand(4096 + 13) + 1.0
    y = sd.SeededDropout(0.25, _seed(9), 1)(x)
    assert torch.all((y == 0) | torch.isclose(y, x / 0.75))
    assert (y[-13:] != 0).any()


def test_eval_and_p_zero_are_identity(sd):
    x = torch.randn(64)
    drop = sd.SeededDropout(0.3, _seed(1), 0)
    drop.eval()
    assert drop(x) is x
    assert sd.SeededDropout(0.0, _seed(1), 0)(x) is x


def test_half_precision_and_non_contiguous_input(sd):
    x = torch.randn(64, 48).half().t()  # non-contiguous
    y = sd.SeededDropout(0.2, _seed(2), 9)(x)
    assert y.dtype == torch.float16 and y.shape == x.shape
    kept = y != 0
    assert torch.allclose(y[kept].float(), (x[kept].float() / 0.8).half().float())


def test_bad_arguments(sd):
    with pytest.raises(ValueError, match="dropout probability"):
        sd.SeededDropout(1.0, _seed(1), 0)
    with pytest.raises(ValueError, match="salt"):
        sd.SeededDropout(0.1, _seed(1), sd.SALTS)


# -- lora_A(dropout(x)) in one kernel (SeededDropout.project). fp16: the interpreter's tl.dot multiplies bf16
# operands as raw bits (tests/quant/test_quant_gemv_interpret.py); the GPU tests run bf16.

def _keep_mask(sd, x, seed, salt, p):
    return sd.seeded_dropout_apply(torch.ones_like(x), seed, salt, p) != 0


@pytest.mark.parametrize("M,K,R", [(37, 136, 8), (64, 256, 64), (5, 64, 24)])
def test_fused_lora_a_uses_the_dropout_mask_forward_and_backward(sd, M, K, R):
    # M, K and r not multiples of the tiles; r padded to the dot's 16
    torch.manual_seed(M)
    x, a, g = torch.randn(M, K).half(), (torch.randn(R, K) / 8).half(), torch.randn(M, R).half()
    seed, salt, p = _seed(3), 5, 0.25
    keep = _keep_mask(sd, x, seed, salt, p)
    assert 0.6 < float(keep.float().mean()) < 0.9
    xm = torch.where(keep, x.float(), 0.0)
    out = sd.dropout_xa(x, a, seed, salt, p)
    assert out.dtype == torch.float16 and out.shape == (M, R)
    torch.testing.assert_close(out.float(), xm @ a.float().T / (1 - p), atol=2e-3, rtol=2e-3)
    gx, ga = sd.dropout_xa_backward(x, a, g, seed, salt, p)
    assert torch.equal(gx != 0, keep)  # the same elements as the forward's (and as SeededDropout's)
    torch.testing.assert_close(gx.float(), torch.where(keep, g.float() @ a.float(), 0.0) / (1 - p),
                               atol=2e-3, rtol=2e-3)
    assert ga.dtype == torch.float32
    torch.testing.assert_close(ga, g.float().T @ xm / (1 - p), atol=1e-4, rtol=1e-4)
    gx_none, ga2 = sd.dropout_xa_backward(x, a, g, seed, salt, p, need_gx=False)
    assert gx_none is None and torch.equal(ga2, ga)


def test_project_is_lora_a_of_the_dropped_input_through_autograd(sd):
    # fp32 master weight under fp16 autocast, as training runs the adapters (bf16 on the GPU)
    torch.manual_seed(0)
    drop = sd.SeededDropout(0.3, _seed(4), salt=7)
    lin = nn.Linear(72, 16, bias=False)
    x = torch.randn(3, 11, 72).half().requires_grad_(True)
    g = torch.randn(3, 11, 16).half()
    with torch.autocast("cpu", dtype=torch.float16):
        fused = drop.project(x, lin.weight)
    assert fused is not None and fused.dtype == torch.float16 and fused.shape == (3, 11, 16)
    gx, gw = torch.autograd.grad(fused, (x, lin.weight), g)
    # the reference in fp32 with the same mask (the two-module path rounds the scaled survivors to fp16 first)
    keep = _keep_mask(sd, x.detach(), drop.seed, drop.salt, drop.p)
    x2 = x.detach().float().requires_grad_(True)
    w2 = lin.weight.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(torch.where(keep, x2, 0.0) / 0.7, w2.half().float())
    rgx, rgw = torch.autograd.grad(ref, (x2, w2), g.float())
    torch.testing.assert_close(fused.float(), ref, atol=3e-3, rtol=3e-3)
    assert torch.equal(gx != 0, rgx != 0) and gw.dtype == torch.float32
    torch.testing.assert_close(gx.float(), rgx, atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(gw, rgw, atol=2e-3, rtol=2e-3)  # the interpreter's fp16 dot rounds its products


def test_project_declines_what_it_does_not_cover(sd):
    w = torch.randn(8, 64).half()
    x = torch.randn(4, 64).half()
    drop = sd.SeededDropout(0.2, _seed(1), 0)
    assert drop.project(x, w) is not None
    assert drop.project(x.float(), w.float()) is None  # fp32 input: the two modules
    assert drop.project(torch.randn(4, 60).half(), torch.randn(8, 60).half()) is None  # 60 not a multiple of 8
    assert drop.project(x, torch.randn(192, 64).half()) is None  # r past 128
    assert drop.project(x, w.float()) is None  # lora_A would answer in fp32 (no autocast)
    with override(fused_lora_dropout=False):
        assert drop.project(x, w) is None
    drop.eval()
    assert drop.project(x, w) is None
    assert sd.SeededDropout(0.0, _seed(1), 0).project(x, w) is None
