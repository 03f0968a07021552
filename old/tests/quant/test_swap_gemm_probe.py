"""benchmarks/swap_gemm_probe.py's Triton kernel (the swapped-operand Int4 GEMM of NOTES step 28) against the exact
dequantized product, on the CPU through Triton's interpreter in a child process (its own TRITON_INTERPRET=1, so the
test session's compiled triton is untouched). The probe's timing part needs a GPU and is not run here."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from _helpers import ROOT, subprocess_env

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or torch.cuda.is_available(),
                                reason="needs triton, and a machine without a GPU (the interpreter)")


def test_swap_gemm_probe_kernel_equals_the_dequantized_product():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "swap_gemm_probe.py"), "--check"], cwd=ROOT,
                          env=subprocess_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("K=")]
    assert len(lines) == 4 and all(line.endswith(": ok") for line in lines), proc.stdout
