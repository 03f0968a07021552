"""benchmarks/ncu_summary.py on the CPU: it reads Nsight Compute's CSV (``--csv --page details``, plain or gzipped)
with the profiled program's own output lines mixed in, keeps each kernel's chosen metrics (numbers with thousands
separators too) and its warp stall ratios, and says so when a file holds no profiled kernel."""

import gzip
import importlib.util

import pytest

from _helpers import ROOT

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def row(kid, kernel, section, name, unit, value, grid="(960, 1, 1)"):
    return (f'"{kid}","1","python3","h","{kernel}","1","7","(128, 1, 1)","{grid}","0","9.0","{section}",'
            f'"{name}","{unit}","{value}"')


@pytest.fixture(scope="module")
def summary():
    spec = importlib.util.spec_from_file_location("ncu_summary", ROOT / "benchmarks" / "ncu_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernels_their_metrics_and_stalls(summary, tmp_path, capsys):
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    lines = ["==PROF== Connected to process 1", "c_attn K=5120 N=15360 rows=1 config=(4, 1, 4)", HEADER,
             row(0, "gptq_mma_gemv", "GPU Speed Of Light Throughput", "Duration", "ns", "18,976"),
             row(0, "gptq_mma_gemv", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "67.53"),
             row(0, "gptq_mma_gemv", "Launch Statistics", "Registers Per Thread", "register/thread", "60"),
             row(0, "gptq_mma_gemv", "Command line profiler metrics", stall.format("long_scoreboard"), "", "9.83"),
             row(0, "gptq_mma_gemv", "Command line profiler metrics", stall.format("wait"), "", "2.45"),
             row(0, "gptq_mma_gemv", "Occupancy", "Block Limit Registers", "block", "8"),  # not a chosen one
             row(1, "gptq_mma_gemm", "Occupancy", "Achieved Occupancy", "%", "11.25", grid="(240, 1, 1)"),
             row(1, "gptq_mma_gemm", "Warp State Statistics", "Warp Cycles Per Issued Instruction", "cycle", "n/a",
                 grid="(240, 1, 1)")]  # a value that is not a number: left out
    path = tmp_path / "ncu.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    kernels = summary.read(str(path))
    assert [k["kernel"] for k in kernels] == ["gptq_mma_gemv", "gptq_mma_gemm"]
    first, second = kernels
    assert first["duration"] == "18976 ns" and first["dram_pct"] == "67.53 %" and first["grid"] == "(960, 1, 1)"
    assert first["registers"] == "60 register/thread" and "Block Limit Registers" not in str(first)
    assert first["stalls"] == {"long_scoreboard": 9.83, "wait": 2.45}
    assert second["occupancy_pct"] == "11.25 %" and "cycles_per_issue" not in second and second["stalls"] == {}
    assert summary.main([str(path), "--stalls", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[0] gptq_mma_gemv grid=(960, 1, 1)") and out[1].endswith("long_scoreboard 9.83")


def test_a_file_without_kernels_says_so(summary, tmp_path, capsys):
    path = tmp_path / "empty.csv"
    path.write_text("==PROF== No kernels were profiled.\n")
    assert summary.main([str(path)]) == 1
    assert "no profiled kernels" in capsys.readouterr().err
