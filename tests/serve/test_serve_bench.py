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


def test_serve_bench_runs_qwen_ft_serve_as_its_own_process_by_default(tmp_path):
    """Without --adapters or --engine-log the rounds go to `qwen-ft serve` started as a process of its own (as a user
    runs it), which is stopped afterwards."""
    import psutil

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_bench

    out = tmp_path / "serve.json"
    assert serve_bench.main(["--tiny", "--streams", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["server"] == "process" and report["server_ready_s"] > 0
    (lv,) = report["levels"]
    assert lv["completion_tokens"] == 2 * report["new_tokens"] and lv["streams_timed"] == 2
    served = [p for p in psutil.process_iter(["cmdline"]) if report["model_dir"] in (p.info["cmdline"] or [])]
    assert served == []  # the server process was stopped


def test_serve_bench_says_in_one_line_when_the_server_process_does_not_come_up(tmp_path, capsys, monkeypatch):
    import contextlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_bench

    @contextlib.contextmanager
    def ended(*args, **kwargs):
        raise RuntimeError("qwen-ft serve ended (exit 1): error: --max-batch must be at least 1, got 0")
        yield

    monkeypatch.setattr(serve_bench, "served_process", ended)
    capsys.readouterr()
    assert serve_bench.main(["--tiny", "--streams", "1", "--out", str(tmp_path / "serve.json")]) == 2
    err = capsys.readouterr().err
    assert err == "error: qwen-ft serve ended (exit 1): error: --max-batch must be at least 1, got 0\n"
    assert not (tmp_path / "serve.json").exists()


def test_serve_bench_stagger_sends_a_rounds_streams_apart(tmp_path):
    """--stagger MS: stream i of a round is submitted no sooner than i x MS after the round starts (the engine log's
    submits, ms from the round's start), and every stream still gets its tokens."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_bench

    out = tmp_path / "serve.json"
    assert serve_bench.main(["--tiny", "--streams", "3", "--stagger", "150", "--engine-log", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (lv,) = report["levels"]
    assert report["stagger_ms"] == lv["stagger_ms"] == 150
    assert lv["completion_tokens"] == 3 * report["new_tokens"] and lv["streams_timed"] == 3
    submits = [e["at"] for e in lv["engine_log"] if e["kind"] == "submit"]
    # (asyncio's timers may fire up to its clock resolution early: a few ms of slack)
    assert len(submits) == 3 and all(at >= i * 150 - 5 for i, at in enumerate(submits))


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
                          (["--streams", "1,x"], "comma-separated integers"),
                          (["--adapters", "2", "--modes", "grouped", "--stagger", "10"], "not with the grouped mode"),
                          (["--server", "process", "--engine-log"], "need --server thread")):
        assert serve_bench.main(["--tiny", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_engine_log_names_each_capture_by_the_engines_own_arguments():
    """engine_stalls.timed_methods (serve_bench --engine-log) wraps Engine._capture whatever its arguments are (a
    fixed-arity wrapper broke both benchmarks on the GPU when _capture gained ``lora``): each capture is logged
    with the engine's own argument names and returns what the engine's capture returned."""
    import inspect

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import engine_stalls

    from finetune.inference.engine import Engine

    class Stub:
        def _prefill(self, reqs, touched):
            pass

        def submit(self, prompt_ids):
            pass

    stub = Stub()
    calls = []

    def capture(*args):
        calls.append(args)
        return "graph"

    own = list(inspect.signature(Engine._capture).parameters.values())[1:]  # without self
    capture.__signature__ = inspect.Signature(own)
    stub._capture = capture
    log = []
    engine_stalls.timed_methods(stub, log)
    args = (4, 1024, (True,), True, False)[: len(own)]
    assert stub._capture(*args) == "graph" and calls == [args]
    (entry,) = log
    assert entry["kind"] == "capture" and entry["rows"] == 4 and entry["kv_len"] == 1024
    assert {p.name for p in own} - {"b"} <= set(entry) and entry["ms"] >= 0


def test_serve_bench_json_share_sends_that_share_of_streams_with_a_json_schema(tmp_path, capsys):
    """--json-share: those streams ask for a JSON string too long to end early, so they too run to --new-tokens; the
    report splits the inter-token gaps by kind. A share outside [0, 1] is one line."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_bench

    out = tmp_path / "serve.json"
    assert serve_bench.main(["--tiny", "--streams", "3", "--json-share", "0.5", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (lv,) = report["levels"]
    assert report["json_share"] == 0.5 and lv["json_streams"] == 2
    assert [s["json"] for s in lv["per_stream"]] == [True, True, False]
    assert all(s["tokens"] == report["new_tokens"] for s in lv["per_stream"])
    assert lv["itl_ms_p50_json"] > 0 and lv["itl_ms_p50_plain"] > 0
    assert serve_bench.main(["--tiny", "--json-share", "1.5", "--out", str(out)]) == 2
    assert capsys.readouterr().err.endswith("error: --json-share 1.5: must be in [0, 1]\n")
