"""The loss chunk's NLL-and-gradient kernel (``finetune/modeling/nll_grad.py``) through Triton's interpreter on the
CPU, against torch's log-softmax. Run with ``TRITON_INTERPRET=1 python -m pytest tests/modeling/test_nll_grad_interpret.py``
(without it these skip; see tests/_helpers.load_interpreted). The compiled kernel runs in tests/modeling/test_modeling.py
(-m cuda)."""

from __future__ import annotations

import pytest
import torch

from _helpers import ROOT, load_interpreted

NLL_GRAD_PY = ROOT / "finetune" / "modeling" / "nll_grad.py"


@pytest.fixture(scope="module")
def ng():
    with pytest.MonkeyPatch.context() as mp:
        yield load_interpreted(NLL_GRAD_PY, "_nll_grad_interpreted", mp)


def _reference(logits, y):
    logp = torch.log_softmax(logits.float(), -1)
    trained = y != -100
    t = y.clamp(min=0)
    nll = torch.where(trained, -logp[torch.arange(len(y)), t], 0.0)
    grad = logp.exp()
    grad[torch.arange(len(y)), t] -= 1
    return nll, grad * trained[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nll_and_gradient_equal_log_softmax(ng, dtype, monkeypatch):
    monkeypatch.setattr(ng, "_BLOCK", 64)  # several blocks a row, the last one partial (V = 150)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 150, generator=g) * 4).to(dtype)
    y = torch.tensor([3, -100, 149, 0, 77, -100, 64])
    nll_ref, grad_ref = _reference(logits, y)
    work = logits.clone()
    nll = ng.nll_and_grad_(work, y, -100)
    assert nll.dtype == torch.float32 and work.dtype == dtype
    assert torch.allclose(nll, nll_ref, atol=1e-5, rtol=1e-5)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=4e-3, rtol=1e-2)
    assert torch.allclose(work.float(), grad_ref, **tol)
    assert torch.count_nonzero(work[1]) == 0 and torch.count_nonzero(work[5]) == 0  # ignored rows
    assert nll[1] == 0 and nll[5] == 0
    assert torch.allclose(work.float().sum(-1)[[0, 2, 3, 4, 6]], torch.zeros(5), atol=1e-2)  # softmax - onehot


def test_rows_with_a_stride_and_bad_layouts(ng):
    big = torch.randn(4, 40) * 3
    view = big[:, :33]  # rows 40 apart: the kernel follows the row stride and leaves the rest alone
    y = torch.tensor([0, 32, -100, 5])
    nll_ref, grad_ref = _reference(view.clone(), y)
    rest = big[:, 33:].clone()
    nll = ng.nll_and_grad_(view, y, -100)
    assert torch.allclose(nll, nll_ref, atol=1e-5) and torch.allclose(view, grad_ref, atol=1e-6)
    assert torch.equal(big[:, 33:], rest)
    with pytest.raises(ValueError, match="contiguous rows"):
        ng.nll_and_grad_(torch.randn(8, 4).t(), torch.zeros(4, dtype=torch.long), -100)


def test_a_label_outside_the_vocabulary_gives_nan_not_a_stray_read(ng):
    logits = torch.randn(3, 20)
    nll = ng.nll_and_grad_(logits, torch.tensor([20, -1, 4]), -100)
    assert torch.isnan(nll[0]) and torch.isnan(nll[1]) and torch.isfinite(nll[2])
