"""modeling/attention.py: which SDPA kernels a forward without gradients may use (inference_sdpa)."""

from __future__ import annotations

import torch

from finetune.modeling.attention import inference_sdpa
from finetune.settings import override


def _flags():
    b = torch.backends.cuda
    return dict(cudnn=b.cudnn_sdp_enabled(), flash=b.flash_sdp_enabled(), efficient=b.mem_efficient_sdp_enabled(),
                math=b.math_sdp_enabled())


def test_inference_on_cuda_never_picks_cudnn_and_restores_the_flags():
    before = _flags()
    assert before["cudnn"], "the test needs SDPA's defaults (cuDNN allowed) to start from"
    with torch.no_grad(), inference_sdpa("cuda"):
        inside = _flags()
    assert inside == dict(cudnn=False, flash=True, efficient=True, math=True)
    assert _flags() == before


def test_training_cpu_and_the_switch_keep_sdpa_s_own_choice():
    before = _flags()
    with inference_sdpa("cuda"):  # gradients on: a training forward
        assert _flags() == before
    with torch.no_grad(), inference_sdpa("cpu"):
        assert _flags() == before
    with torch.no_grad(), override(sdpa_flash=False), inference_sdpa(torch.device("cuda", 0)):
        assert _flags() == before
