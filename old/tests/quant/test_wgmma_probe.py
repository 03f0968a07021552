"""benchmarks/wgmma_probe.py without a GPU: the generated asm operands line up with the accumulator count, the
candidates cover both placements of B's core matrices with both readings of the descriptor's offsets, and (where an
NVRTC library and Triton's ptxas are at hand) every variant compiles and assembles for sm_90a."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from _helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import wgmma_probe as W  # noqa: E402


@pytest.mark.parametrize("n", W.ROWS)
def test_asm_operands_match_the_accumulators(n):
    src = W.kernel_source(n)
    asm = src[src.index("wgmma.mma_async"):src.index("\\n}\\n")]
    d_regs, a_regs = re.findall(r"\{([^}]*)\}", asm)[:2]
    assert d_regs.split(",") == [f"%{i}" for i in range(n // 2)]
    assert a_regs.split(",") == [f"%{n // 2 + i}" for i in range(4)]
    assert f"%{n // 2 + 4}, p, 1, 1, 0" in asm and f"setp.ne.b32 p, %{n // 2 + 5}, 0" in src
    assert src.count('"+f"(d[') == n // 2 and f"m64n{n}k16" in asm


def test_candidates_cover_every_placement_and_both_readings():
    cands = W.candidates(32)
    placements = ("k_adjacent", "n_adjacent", "padded")
    assert {(c["placement"], c["k_is_leading"]) for c in cands} == {(a, b) for a in placements for b in (True, False)}
    for c in cands:
        assert {c["lbo"], c["sbo"]} == {c["k_stride"], c["n_stride"]}
        assert (c["lbo"] == c["k_stride"]) == c["k_is_leading"] or c["k_stride"] == c["n_stride"]
    with pytest.raises(ValueError):
        W.kernel_source(24)


def test_every_variant_assembles_for_sm90a(capsys):
    from mma_sass import find_nvrtc

    if importlib.util.find_spec("triton") is None or not find_nvrtc():
        pytest.skip("needs triton's ptxas and an NVRTC library (the nvidia-cuda-nvrtc wheel)")
    assert W.ptx_only(None) == 0, capsys.readouterr().out
