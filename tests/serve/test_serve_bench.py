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
    assert serve_bench.main(["--tiny", "--streams", "1,3", "--adapters", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [lv["streams"] for lv in report["levels"]] == [1, 3]
    for lv in report["levels"]:
        # min_tokens = max_tokens: every stream gives exactly new_tokens tokens
        assert lv["completion_tokens"] == lv["streams"] * report["new_tokens"]
        assert lv["aggregate_tok_s"] > 0 and lv["ttft_ms_p50"] > 0 and lv["itl_ms_p50"] is not None
        assert lv["prompt_tokens_max"] <= report["prompt_tokens"]
