"""benchmarks/decode_variant.py's CPU part: each named change reaches the kernel source mma_gemv compiles."""

from __future__ import annotations

import sys

from _helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import decode_variant as DV  # noqa: E402
from finetune.quant import mma_gemv as G  # noqa: E402


def test_variants_change_the_compiled_source(monkeypatch):
    monkeypatch.setattr(G, "LORA_GATHER_MAX", G.LORA_GATHER_MAX)
    monkeypatch.setattr(G, "_SOURCE", G._SOURCE)
    assert DV.apply(None, None) == ""
    assert "__nanosleep(32);" in G.kernel_source(8, 1, 1, 128, lora=True)
    assert DV.apply(0, 256) == "LORA_GATHER_MAX=0, poll 256 ns"
    src = G.kernel_source(8, 1, 1, 128, lora=True)
    assert "#define GATHER_MAX 0 " in src and "__nanosleep(256);\n          v[j] = ld_slot(" in src
