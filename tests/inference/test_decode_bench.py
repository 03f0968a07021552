"""benchmarks/decode_bench.py --tiny: the decode benchmark's code path end to end on the tiny Int4 model (CPU),
so the GPU run finds no bug in it: every workload writes its entry with the fields the issue asks for."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from _helpers import ROOT, subprocess_env


def test_decode_bench_tiny_writes_every_workload(tmp_path):
    out = tmp_path / "decode.json"
    out.write_text(json.dumps([{"workload": "b1_512", "tiny": True, "tokens_per_s": -1},
                               {"workload": "other", "tokens_per_s": 1}]))  # replaced / kept
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_bench.py"), "--tiny", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    entries = json.loads(out.read_text())
    by = {e["workload"]: e for e in entries}
    assert set(by) == {"other", "b1_512", "b1_ctx2000", "b64_mixed", "b1_512_adapter", "b64_mixed_adapters",
                       "eval_256", "eval_32_generate"}
    for name, e in by.items():
        if name == "other":
            continue
        for key in ("command", "tokens_per_s", "commit", "date", "device"):
            assert key in e, (name, key)
        assert e["tokens_per_s"] > 0 and e["tiny"] is True and "error" not in e
    assert by["b1_512"]["agrees_with_generate"] and by["b1_512_adapter"]["agrees_with_generate"]
    assert by["b64_mixed"]["rows"] == 5 and by["b64_mixed"]["prefill_s"] > 0
    assert by["b64_mixed"]["rows_in_first_step"] == 5  # (no memory limit on the CPU: every row joins at once)
    assert by["b64_mixed_adapters"]["adapters"] == 3 and by["b64_mixed_adapters"]["rows_in_first_step"] == 5
    # eval's figures come from the generated token ids it reports, not from re-encoded reply text
    for name in ("eval_256", "eval_32_generate"):
        assert by[name]["generated_tokens"] > 0 and by[name]["generation_s"] > 0


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the GEMV part times the compiled kernels there")
def test_decode_bench_gemv_part_checks_every_config_in_the_interpreter(tmp_path):
    """--part gemv on the CPU with TRITON_INTERPRET=1: every candidate config of the row counts asked for runs on a
    small layer and matches the dequantized matmul (the GPU sweep then finds valid config lists)."""
    out = tmp_path / "gemv.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_bench.py"), "--part", "gemv",
                           "--gemv-rows", "1", "3", "--out", str(out)], cwd=ROOT,
                          env=subprocess_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    entries = json.loads(out.read_text())
    from finetune.quant.triton_gemv import configs_for  # triton imported without the interpreter: only the lists

    for rows in (1, 3):
        mine = [e for e in entries if e["workload"] == "gemv" and e["rows"] == rows]
        # every config the interpreter can run (the third design's inline PTX needs a GPU)
        assert [e["config"] for e in mine] == [str(c) for c in configs_for(rows, mma=False)]
        for e in mine:
            assert "error" not in e and e["rel_err"] < 5e-3, e


def test_decode_bench_rejects_gemv_rows_out_of_range(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_bench.py"), "--part", "gemv",
                           "--gemv-rows", "1", "65", "--out", str(tmp_path / "x.json")], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error: --gemv-rows: 65 is outside 1..64" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_engine_host_cost_measures_every_case(tmp_path):
    """benchmarks/engine_host_cost.py (the engine's host time per step, graphs replaced by no-ops) runs on the CPU
    and writes one entry per engine, case and batch size; a revision git does not know is one error line."""
    out = tmp_path / "host.json"
    script = str(ROOT / "benchmarks" / "engine_host_cost.py")
    proc = subprocess.run([sys.executable, script, "--rows", "1", "3", "--steps", "3", "--out", str(out)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    entries = json.loads(out.read_text())
    assert len(entries) == 4 * 2 and {e["rows"] for e in entries} == {1, 3}
    for e in entries:
        assert e["engine"] == "working tree" and e["host_us_median"] > 0 and e["torch_ops_per_step"] > 0
    greedy = [e for e in entries if e["case"] == "greedy"]
    assert greedy[0]["torch_ops_per_step"] == greedy[1]["torch_ops_per_step"]  # no per-row host ops
    bad = subprocess.run([sys.executable, script, "--rev", "no-such-revision-x"], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --rev no-such-revision-x")
