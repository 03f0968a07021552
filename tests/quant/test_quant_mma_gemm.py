"""The small-M tensor-core GEMM's host side (finetune/quant/mma_gemm.py), on the CPU: how a product is cut into
CTAs and K splits, and the source it compiles. The kernel itself runs in tests/quant/test_quant_cuda.py."""

import re

import pytest

from finetune.quant import mma_gemm as MG


@pytest.mark.parametrize("N,K", [(15360, 5120), (5120, 5120), (13696, 5120), (5120, 13696), (1040, 1024), (528, 256),
                                 (16, 128)])
@pytest.mark.parametrize("config", [(8, 1, 2, 1), (8, 2, 2, 2), (4, 2, 3, 4), (4, 1, 1, 8)])
@pytest.mark.parametrize("rows", [1, 9, 33, 64])
def test_every_tile_has_one_warp_and_every_split_two_chunks(N, K, config, rows):
    T, C = N // 16, K // 128
    mb, warps, tpw, depth, ctas, splits = MG.plan(rows, T, C, config, sms=132)
    assert mb == MG.row_blocks(rows) and (warps, depth) == (config[0], config[2])
    assert tpw == (config[1] if T % config[1] == 0 else 1)  # an odd tile count: one tile a warp
    tiles = warps * tpw  # a CTA's tiles
    assert (ctas - 1) * tiles < T <= ctas * tiles  # no CTA without a tile
    assert 1 <= splits and (splits == 1 or C // splits >= 2)


def test_rows_and_sources():
    assert [MG.row_blocks(r) for r in (1, 8, 9, 16, 17, 32, 33, 64)] == [1, 1, 2, 2, 4, 4, 8, 8]
    for bad in (0, 65):
        with pytest.raises(ValueError, match=f"1 to 64 rows, got {bad}"):
            MG.row_blocks(bad)
    src = MG.kernel_source(8, 8, 1, 2, 256)
    assert re.search(r"__[A-Z]+__", src) is None  # every placeholder filled
    assert "#define GCHUNKS 2" in src and "#define MB 8" in src
    assert MG.shared_bytes(8) <= 48 * 1024  # static shared memory, no opt-in attribute needed
    assert "#define MINB 2" in MG.kernel_source(8, 8, 1, 2, 128, min_blocks=2)
    with pytest.raises(ValueError, match="group size 64"):
        MG.kernel_source(8, 8, 1, 2, 64)
