"""The small-M tensor-core GEMM's host side (finetune/quant/mma_gemm.py), on the CPU: how a product is cut into
CTAs and K splits, and the source it compiles. The kernel itself runs in tests/quant/test_quant_cuda.py."""

import re

import pytest

from finetune.quant import mma_gemm as MG


@pytest.mark.parametrize("N,K", [(15360, 5120), (5120, 5120), (13696, 5120), (5120, 13696), (1040, 1024), (528, 256),
                                 (16, 128)])
@pytest.mark.parametrize("config", [(8, 1, 2, 1), (8, 2, 2, 2), (4, 2, 3, 4), (4, 1, 1, 8), (4, 1, 1, 1, 2)])
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


def test_row_groups_split_the_row_blocks_and_fill_the_source():
    """MG groups of warps take the rows in turn: each group's warps hold MB / MG row blocks' sums (never fewer than
    one: more groups than row blocks is as many groups as blocks); the fifth config field, 1 when absent."""
    assert MG.row_groups(8, (4, 1, 1, 1)) == (1, 8)
    assert MG.row_groups(8, (4, 1, 1, 1, 2)) == (2, 4)
    assert MG.row_groups(4, (4, 1, 1, 1, 4)) == (4, 1)
    assert MG.row_groups(1, (4, 1, 1, 1, 2)) == (1, 1)  # 1-8 rows: one group
    for mb in (8, 2):  # (checked whatever the row count)
        with pytest.raises(ValueError, match="3 groups of warps along the rows"):
            MG.row_groups(mb, (4, 1, 1, 1, 3))
    src = MG.kernel_source(4, 4, 1, 1, 128, 2, mg=2)
    assert "#define MG 2" in src and "#define MB 4" in src and re.search(r"__[A-Z]+__", src) is None
    assert "#define MG 1" in MG.kernel_source(4, 8, 1, 1, 128)
    # the stages hold every group's rows: 48 KiB at 64 rows whatever the groups (static shared memory)
    assert MG.shared_bytes(8) == 48 * 1024


def test_a_shape_with_its_own_measured_config_gets_it_and_others_their_row_counts():
    for (mb, K, N), cfg in MG.SHAPE_CONFIGS.items():
        assert MG.config_for(8 * mb, K, N) == cfg and len(cfg) in (4, 5)
    assert MG.config_for(57, 5120, 2 * 13696) == (4, 2, 1, 1)  # the 14B's w1/w2 pair: two tiles a warp (step 75)
    assert MG.config_for(32, 5120, 2 * 13696) == (4, 2, 1, 1)  # and at 25-32 rows (step 77)
    assert MG.config_for(64, 5120, 5120)[4:] == (2,)  # the 14B's c_proj Linears at 33-64 rows: two row groups
    assert MG.config_for(32, 5120, 5120)[4:] == ()  # (step 85), not at 32
    assert MG.config_for(64, 4096, 11008) == MG.CONFIGS[8]  # a Qwen-7B shape: the row count's
    assert MG.config_for(9, 4096, 4096) == MG.CONFIGS[2]
    with pytest.raises(ValueError, match="1 to 64 rows, got 65"):
        MG.config_for(65, 5120, 5120)


def test_the_probes_apply_replaces_a_table_written_over_several_lines(tmp_path):
    """`mma_gemm_probe.py --apply` rewrites CONFIGS and SHAPE_CONFIGS in a copy of mma_gemm.py: the whole statement,
    continuation lines included (a dangling half of the old table would not compile)."""
    import ast
    import sys

    from _helpers import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mma_gemv_probe as P

    src = tmp_path / "mma_gemm.py"
    src.write_text((ROOT / "finetune" / "quant" / "mma_gemm.py").read_text())
    P.apply_lines(src, "CONFIGS = {8: (4, 1, 1, 1)}\nSHAPE_CONFIGS = {(8, 5120, 5120): (4, 1, 1, 2)}")
    tables = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(src.read_text()).body
              if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") in ("CONFIGS", "SHAPE_CONFIGS")}
    assert tables == {"CONFIGS": {8: (4, 1, 1, 1)}, "SHAPE_CONFIGS": {(8, 5120, 5120): (4, 1, 1, 2)}}
    assert src.read_text().count("(8, 5120, 27392)") == 0  # the old table's later lines went with it


def test_the_probe_keeps_a_shape_config_only_where_it_beats_the_general_one_by_the_margin():
    import sys

    from _helpers import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mma_gemm_probe as P

    def row(K, N, rows, cfg, us):
        return dict(layer="x", K=K, N=N, rows=rows, kernel=f"gemm{cfg}", us=us, rel_err=1e-3, repeat=True)

    general = {8: (4, 1, 1, 1)}
    results = [row(5120, 5120, 64, (4, 1, 1, 1), 44.0), row(5120, 5120, 64, (4, 1, 1, 2), 38.0),  # 14% faster
               row(5120, 15360, 64, (4, 1, 1, 1), 51.0), row(5120, 15360, 64, (4, 1, 2, 1), 50.0),  # 2%: noise
               row(5120, 13696, 64, (4, 1, 1, 1), 60.0), dict(row(5120, 13696, 64, (4, 1, 1, 2), 30.0), repeat=False)]
    assert P.pick_shapes(results, general) == {(8, 5120, 5120): (4, 1, 1, 2)}
