"""SeededDropout (``finetune/training/seeded_dropout.py``) through Triton's interpreter on the CPU: the mask is
a function of (seed, salt, element) only, so the backward and a recomputation reproduce the forward's mask.
Run with ``TRITON_INTERPRET=1 python -m pytest tests/training/test_seeded_dropout_interpret.py`` (without it these
skip; see tests/_helpers.load_interpreted). The compiled kernel runs in tests/training/test_graphs_cuda.py."""

from __future__ import annotations

import pytest
import torch

from _helpers import ROOT, load_interpreted

DROPOUT_PY = ROOT / "finetune" / "training" / "seeded_dropout.py"


@pytest.fixture(scope="module")
def sd():
    with pytest.MonkeyPatch.context() as mp:
        yield load_interpreted(DROPOUT_PY, "_seeded_dropout_interpreted", mp)


def _seed(v):
    return torch.tensor([v], dtype=torch.int64)


def test_same_seed_and_salt_give_the_same_mask_and_backward_uses_it(sd):
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))  # (an exact 0 would read as dropped)
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
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)).half().t()  # non-contiguous
    y = sd.SeededDropout(0.2, _seed(2), 9)(x)
    assert y.dtype == torch.float16 and y.shape == x.shape
    kept = y != 0
    # within one fp16 rounding: x * (1 / 0.8) and x / 0.8 can round to neighbouring halves
    assert torch.allclose(y[kept].float(), (x[kept].float() / 0.8).half().float(), rtol=2**-10, atol=0)


def test_bad_arguments(sd):
    with pytest.raises(ValueError, match="dropout probability"):
        sd.SeededDropout(1.0, _seed(1), 0)
    with pytest.raises(ValueError, match="salt"):
        sd.SeededDropout(0.1, _seed(1), sd.SALTS)
