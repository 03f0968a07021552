"""benchmarks/swap_gemm_probe.py's Triton kernel (the swapped-operand Int4 GEMM of NOTES step 28) against the exact
dequantized product, on the CPU through Triton's interpreter in a child process (its own TRITON_INTERPRET=1, so the
test session's compiled triton is untouched). The probe's timing part needs a GPU and is not run here."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from _helpers import probe_check_lines

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or torch.cuda.is_available(),
                                reason="needs triton, and a machine without a GPU (the interpreter)")


def test_swap_gemm_probe_kernel_equals_the_dequantized_product():
    lines = probe_check_lines("swap_gemm_probe.py", "K=")
    assert len(lines) == 4 and all(line.endswith(": ok") for line in lines), lines
