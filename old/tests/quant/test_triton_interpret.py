"""The Triton kernels (Int4 GEMV / small-M GEMM, seeded dropout) on the CPU through Triton's interpreter, inside
the normal test run: the interpreter must be chosen before triton is first imported, which a pytest session
has already done (torch._dynamo imports it), so a subset of tests/quant/test_quant_gemv_interpret.py and
tests/training/test_seeded_dropout_interpret.py runs in a child process with TRITON_INTERPRET=1. (Those files run whole
with `TRITON_INTERPRET=1 python -m pytest tests/quant/test_quant_gemv_interpret.py tests/training/test_seeded_dropout_interpret.py`.)
Skipped where triton is not installed or a GPU is present (the GPU tests run the compiled kernels)."""

import importlib.util
import re
import subprocess
import sys

import pytest
import torch

from _helpers import ROOT, subprocess_env

# the small odd shape (136 -> 8: N and K not multiples of the blocks) in every bits/group/desc_act layout, for the
# default, dot and per-iteration-reduction configs, plus the routing, input checks and dropout tests
SUBSET = "(136-8 and (default or True)) or rejects or even_n or not interpreted_gemv_equals"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the compiled kernels are tested there")
def test_triton_kernels_through_the_interpreter():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", SUBSET,
         "tests/quant/test_quant_gemv_interpret.py", "tests/training/test_seeded_dropout_interpret.py"],
        cwd=ROOT, env=subprocess_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=1200)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 20 and "skipped" not in proc.stdout.splitlines()[-1], tail
