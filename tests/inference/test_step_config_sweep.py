"""benchmarks/step_config_sweep.py's candidates (CPU; the timing itself needs the GPU): an entry goes to the kernel
its config's length names, a settings switch is kept apart, each candidate lands on top of the shipped tables (or
on none, for "general") and runs only at the row counts its entries are for."""

import importlib.util
import sys

import pytest

from _helpers import ROOT


@pytest.fixture(scope="module")
def sweep():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # (its imports of decode_bench and provenance)
    spec = importlib.util.spec_from_file_location("step_config_sweep", ROOT / "benchmarks" / "step_config_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_entries_go_to_the_kernel_their_config_names(sweep):
    name, added = sweep.parse("X:1,5120,5120=4,1,4+8,5120,27392=4,2,1,1+paired_decode=0+lora,1,13696,5120=8,1,2")
    assert name == "X"
    assert added == {"gemv": {(1, 5120, 5120): (4, 1, 4)}, "gemv_lora": {(1, 13696, 5120): (8, 1, 2)},
                     "gemm": {(8, 5120, 27392): (4, 2, 1, 1)}, "settings": {"paired_decode": False}, "constants": {}}
    assert sweep.parse("base") == ("base", {"gemv": {}, "gemv_lora": {}, "gemm": {}, "settings": {},
                                            "constants": {}})
    with pytest.raises(SystemExit, match="is not \\[lora,\\]mb,K,N"):
        sweep.parse("bad:1,5120=4,1,4")
    with pytest.raises(SystemExit, match="is not"):  # the LoRA table is the GEMV's: 3-value configs only
        sweep.parse("bad:lora,8,5120,27392=4,2,1,1")


def test_a_candidate_runs_only_at_its_entries_row_counts(sweep):
    gemv = sweep.parse("A:1,5120,5120=4,1,4")[1]
    gemm64 = sweep.parse("P:8,5120,27392=4,2,1,1")[1]
    switch = sweep.parse("S:paired_decode=0")[1]
    assert [sweep.touches(gemv, r) for r in (1, 8, 9, 32, 64)] == [True, True, False, False, False]
    assert [sweep.touches(gemm64, r) for r in (1, 8, 32, 57, 64)] == [False, False, False, True, True]
    assert all(sweep.touches(switch, r) for r in (1, 8, 32, 64))
    lora = sweep.parse("L:lora,1,13696,5120=8,1,2")[1]
    assert [sweep.touches(lora, r) for r in (1, 8, 9, 64)] == [True, True, False, False]


def test_candidates_land_on_the_shipped_tables_and_general_empties_them(sweep):
    from finetune.quant import mma_gemm, mma_gemv

    tables = mma_gemv.SHAPE_CONFIGS, mma_gemv.LORA_SHAPE_CONFIGS, mma_gemm.SHAPE_CONFIGS
    shipped = tuple(dict(t) for t in tables)
    try:
        sweep.apply(*sweep.parse("A:1,5120,5120=4,1,4+lora,1,5120,5120=4,1,2"))
        assert mma_gemv.SHAPE_CONFIGS == {**shipped[0], (1, 5120, 5120): (4, 1, 4)}
        assert mma_gemv.LORA_SHAPE_CONFIGS == {**shipped[1], (1, 5120, 5120): (4, 1, 2)}
        assert mma_gemm.SHAPE_CONFIGS == shipped[2]
        sweep.apply(*sweep.parse("general"))
        assert tables == ({}, {}, {})
        sweep.apply(*sweep.parse("base"))
        assert tables == shipped
    finally:
        for table, entries in zip(tables, shipped):
            table.clear(), table.update(entries)


def test_a_constant_holds_for_its_candidate_only_and_the_shipped_value_comes_back(sweep):
    """module.NAME=N sets a constant of the package for a candidate's runs (read where it is used: the fused step
    reads row_adapters' value at each call), every row count; the next candidate finds the shipped value again."""
    from finetune.inference import row_adapters

    shipped = row_adapters.PAIRED_LORA_MAX_ROWS, row_adapters.XA_IN_SWIGLU_ROWS
    pair8 = sweep.parse("P8:row_adapters.PAIRED_LORA_MAX_ROWS=8+row_adapters.XA_IN_SWIGLU_ROWS=1-8")[1]
    assert pair8["constants"] == {("row_adapters", "PAIRED_LORA_MAX_ROWS"): 8,
                                  ("row_adapters", "XA_IN_SWIGLU_ROWS"): range(1, 9)}
    assert all(sweep.touches(pair8, r) for r in (1, 8, 32))
    try:
        sweep.apply("P8", pair8)
        assert (row_adapters.PAIRED_LORA_MAX_ROWS, row_adapters.XA_IN_SWIGLU_ROWS) == (8, range(1, 9))
        sweep.apply(*sweep.parse("base"))
        assert (row_adapters.PAIRED_LORA_MAX_ROWS, row_adapters.XA_IN_SWIGLU_ROWS) == shipped
    finally:
        row_adapters.PAIRED_LORA_MAX_ROWS, row_adapters.XA_IN_SWIGLU_ROWS = shipped
    with pytest.raises(SystemExit, match="no module nowhere"):
        sweep.parse("X:nowhere.N=1")
    with pytest.raises(SystemExit, match="not an integer or range"):
        sweep.parse("X:row_adapters.lora_layers=1")
