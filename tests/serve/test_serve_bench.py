"""benchmarks/serve_bench.py --tiny on the CPU: the load benchmark runs end to end through the HTTP server
(random adapters spread over the streams) and writes its report."""

from __future__ import annotations

import json
import sys

from _helpers import ROOT


def test_serve_bench_tiny(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_bench

    out = tmp_path / "serve.json"
    assert serve_bench.main(["--tiny", "--streams", "1,3", "--adapters", "2", "--engine-log", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [lv["streams"] for lv in report["levels"]] == [1, 3]
    for lv in report["levels"]:
        # min_tokens = max_tokens: every stream gives exactly new_tokens tokens
        assert lv["completion_tokens"] == lv["streams"] * report["new_tokens"]
        assert lv["aggregate_tok_s"] > 0 and lv["ttft_ms_p50"] > 0 and lv["itl_ms_p50"] is not None
        assert lv["prompt_tokens_max"] <= report["prompt_tokens"]
        assert lv["mode"] == "mixed" and lv["streams_timed"] == lv["streams"]
        assert [s["model"] for s in lv["per_stream"]] == ["lora0", "lora1", "lora0"][: lv["streams"]]
        assert all(s["tokens"] == report["new_tokens"] and s["ttft_ms"] > 0 for s in lv["per_stream"])
        # --engine-log: the measured round's submits (one a stream) and prefills, timed from the round's start
        log = lv["engine_log"]
        assert sum(e["kind"] == "submit" for e in log) == lv["streams"]
        assert sum(e["rows"] for e in log if e["kind"] == "prefill") == lv["streams"]
        assert all(e["at"] >= 0 for e in log) and [e["at"] for e in log] == sorted(e["at"] for e in log)


def test_serve_bench_compares_adapter_loads_and_refuses_bad_flags(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_bench

    out = tmp_path / "serve.json"
    assert serve_bench.main(["--tiny", "--streams", "2", "--adapters", "2", "--modes", "single,grouped",
                             "--out", str(out)]) == 0
    levels = json.loads(out.read_text())["levels"]
    assert [(lv["mode"], lv["streams"]) for lv in levels] == [("single", 2), ("grouped", 2)]
    assert [s["model"] for s in levels[0]["per_stream"]] == ["lora0", "lora0"]
    assert [s["model"] for s in levels[1]["per_stream"]] == ["lora0", "lora1"]  # one group after the other
    for lv in levels:
        assert lv["completion_tokens"] == 2 * 8 and lv["ttft_ms_p50"] > 0
    capsys.readouterr()
    for argv, message in ((["--modes", "mixed"], "needs --adapters"), (["--modes", "nope"], "unknown mode"),
                          (["--streams", "1,x"], "comma-separated integers")):
        assert serve_bench.main(["--tiny", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
