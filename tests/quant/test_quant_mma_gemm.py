"""The small-M tensor-core GEMM's host side (finetune/quant/mma_gemm.py), on the CPU: how a product is cut into
CTAs and K splits, and the source it compiles. The kernel itself runs in tests/quant/test_quant_cuda.py."""

import re

import pytest

from finetune.quant import mma_gemm as MG


@pytest.mark.parametrize("N,K", [(15360, 5120), (5120, 5120), (13696, 5120), (5120, 13696), (1040, 1024), (528, 256),
                                 (16, 128)])
@pytest.mark.parametrize("config", [(8, 1, 2, 1), (8, 2, 2, 2), (4, 2, 3, 4), (4, 1, 1, 8), (4, 1, 0, 2, 4),
                                    (8, 2, 0, 4, 5)])
@pytest.mark.parametrize("rows", [1, 9, 33, 64])
def test_every_tile_has_one_warp_and_every_split_fills_its_pipeline(N, K, config, rows):
    T, C = N // 16, K // 128
    mb, warps, tpw, depth, ctas, splits, stages = MG.plan(rows, T, C, config, sms=132)
    assert mb == MG.row_blocks(rows) and (warps, depth) == (config[0], config[2])
    assert stages == (config[4] if len(config) > 4 else MG.STAGES)
    assert tpw == (config[1] if T % config[1] == 0 else 1)  # an odd tile count: one tile a warp
    tiles = warps * tpw  # a CTA's tiles
    assert (ctas - 1) * tiles < T <= ctas * tiles  # no CTA without a tile
    assert 1 <= splits and (splits == 1 or C // splits >= max(2, stages - 1))


def test_rows_and_sources():
    assert [MG.row_blocks(r) for r in (1, 8, 9, 16, 17, 32, 33, 64)] == [1, 1, 2, 2, 4, 4, 8, 8]
    for bad in (0, 65):
        with pytest.raises(ValueError, match=f"1 to 64 rows, got {bad}"):
            MG.row_blocks(bad)
    src = MG.kernel_source(8, 8, 1, 2, 256)
    assert re.search(r"__[A-Z]+__", src) is None  # every placeholder filled
    assert "#define GCHUNKS 2" in src and "#define MB 8" in src
    # x alone: three 64-row stages are 48 KiB; with the weights (depth 0) a stage also holds each tile's 1 KiB
    # block, 16 scales and two zero words, and stays a 16-byte multiple
    assert MG.shared_bytes(8, 4, 1) == 48 * 1024
    assert MG.shared_bytes(8, 4, 0, stages=4) == 4 * (16384 + 4 * (1024 + 32 + 8))
    assert all(MG.stage_elems(mb, tiles, 0) % 8 == 0 for mb in (1, 2, 4, 8) for tiles in (1, 3, 4, 8))
    src0 = MG.kernel_source(4, 8, 1, 0, 128, stages=4)
    assert "#define STAGES 4" in src0 and f"#define STAGE_U16 {MG.stage_elems(8, 4, 0)}" in src0
    with pytest.raises(ValueError, match="1 shared stages"):
        MG.kernel_source(4, 8, 1, 0, 128, stages=1)
    assert "#define MINB 2" in MG.kernel_source(8, 8, 1, 2, 128, min_blocks=2)
    with pytest.raises(ValueError, match="group size 64"):
        MG.kernel_source(8, 8, 1, 2, 64)
