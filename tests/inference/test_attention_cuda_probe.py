"""benchmarks/attention_cuda_probe.py (NOTES step 98), a CUDA C split-KV decode attention, without a GPU: its torch
reference of the parts against the Triton split kernel under the interpreter (the layout the unchanged combine
kernel reads), the passes' online rescale against one pass, and (where an NVRTC library and Triton's ptxas are at
hand) every variant compiled for sm_90 with all of a pass's loads ahead of its math. On the GPU machine
(``pytest -m cuda``): two variants' parts and outputs against the Triton path and the fp64 softmax."""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import pytest
import torch

from _helpers import ROOT, probe_check_lines

sys.path.insert(0, str(ROOT / "benchmarks"))
import attention_cuda_probe as A  # noqa: E402

NO_TRITON = importlib.util.find_spec("triton") is None


@pytest.mark.skipif(NO_TRITON or torch.cuda.is_available(), reason="needs triton, and no GPU (the interpreter)")
def test_reference_parts_are_the_triton_split_kernels_and_combine_to_softmax():
    lines = probe_check_lines("attention_cuda_probe.py", "positions=")
    assert len(lines) == 7 and all(line.endswith(": ok") for line in lines), lines


@pytest.mark.parametrize("split,pass_len", [(64, 16), (128, 64), (256, 128)])
def test_passes_rescaled_online_give_one_pass_parts(split, pass_len):
    q, k, v, pos = A.make_inputs([0, 37, 200, 700], 512, 3, A.D, torch.float32, "cpu", seed=split)
    one, S = A.reference_parts(q, k[0], v[0], pos, A.D ** -0.5, 512, split)
    passes, S2 = A.reference_parts(q, k[0], v[0], pos, A.D ** -0.5, 512, split, pass_len)
    assert S == S2 == 512 // split
    torch.testing.assert_close(passes, one, rtol=1e-5, atol=1e-5)  # (acc ~ l ~ 1-100: fp32 sums in another order)
    parts = one.view(4, 3, S, A.D + 2)
    # row 0 (key 0 only): its first split holds one key (l = 1, acc = v_0), the others are empty
    assert torch.equal(parts[0, :, 1:, A.D], torch.full((3, S - 1), float("-inf")))
    assert (parts[0, :, 1:, A.D + 1] == 0).all() and (parts[0, :, 1:, :A.D] == 0).all()
    torch.testing.assert_close(parts[0, :, 0, A.D + 1], torch.ones(3))
    torch.testing.assert_close(parts[0, :, 0, :A.D], v[0, 0, :, 0])
    # row 3's position is past kv_len: every split holds keys
    assert (parts[3, :, :, A.D] > float("-inf")).all()
    out = A.reference_combine(one, 4, 3, A.D, S)
    exact = A.reference_attention(q, k[0], v[0], pos, A.D ** -0.5, 512)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", A.VARIANTS, ids=lambda v: A.variant_name(*v))
def test_variant_shapes(variant):
    for elem in (2, 4):
        src = A.kernel_source(*variant, elem)
        assert re.search(r"__[A-Z0-9_]+__", src) is None  # every placeholder filled
        keys = A.pass_keys(*variant, elem)
        assert variant[1] % keys == 0 and keys >= A.THREADS[0] // A.lanes_a_key(elem)
        assert A.shared_bytes(*variant, elem) <= A.STAGE_BYTES
    with pytest.raises(ValueError):
        A.kernel_source("reg", 96, 128)


def test_every_variant_compiles_with_its_loads_ahead_of_the_math(capsys):
    from mma_sass import find_nvrtc

    nvrtc = os.environ.get("NVRTC_LIB") or find_nvrtc()
    if NO_TRITON or not nvrtc:
        pytest.skip("needs triton's ptxas and an NVRTC library (NVRTC_LIB, or the nvidia-cuda-nvrtc wheel)")
    assert A.ptx_only(nvrtc) == 0, capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", [("reg", 128, 128), ("cpa", 128, 256)], ids=lambda v: A.variant_name(*v))
def test_variant_matches_triton_and_softmax_on_the_gpu(variant):
    rows = A.check_variant(variant)
    assert len(rows) == 2 * len(A.CHECKS)
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
