"""GET /metrics (Prometheus' text format) on the tiny demo model: each request's end, tokens and times are counted
under its served model name, a client that leaves counts as cancelled, the gauges read the engine, and the key is
needed where --api-key is set; ServeMetrics alone for the adapters' names and the ends of failed requests."""

from __future__ import annotations

import asyncio
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from _helpers import demo_server  # noqa: E402

KEY = "metrics-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with demo_server(tmp_path_factory, "serve_metrics", "--max-batch", "2", "--api-key", KEY) as bg:
        yield bg


def scrape(live) -> dict:
    """{(sample name, (label pairs)): value} of one scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(live.url + "/metrics", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def _idle(live) -> None:
    for _ in range(500):  # (bounded: 10 s) until the engine dropped the rows that ended
        if httpx.get(live.url + "/health", timeout=10).json()["in_flight"] == 0:
            return
        time.sleep(0.02)
    raise AssertionError("the server did not go idle")


def _delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_a_request_is_counted_with_its_tokens_and_times(live):
    client = openai.OpenAI(base_url=live.api_url, api_key=KEY, timeout=60, max_retries=0)
    before = scrape(live)
    r = client.chat.completions.create(model="tiny-qwen", messages=[{"role": "user", "content": "Hi"}],
                                       temperature=0, max_tokens=5, extra_body={"ignore_eos": True})
    _idle(live)
    after = scrape(live)
    m = "tiny-qwen"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert _delta(before, after, "qwen_ft_requests_finished_total", model=m, finish_reason="length") == 1
    assert _delta(before, after, "qwen_ft_prompt_tokens_total", model=m) == r.usage.prompt_tokens
    assert _delta(before, after, "qwen_ft_generation_tokens_total", model=m) == 5
    for h in ("qwen_ft_time_to_first_token_seconds", "qwen_ft_e2e_request_latency_seconds"):
        assert _delta(before, after, h + "_count", model=m) == 1
        assert _delta(before, after, h + "_bucket", model=m, le="+Inf") == 1
        assert _delta(before, after, h + "_sum", model=m) > 0
    # n choices are n rows of the batch: each is counted, its prompt too
    r = client.chat.completions.create(model="tiny-qwen", messages=[{"role": "user", "content": "Hi"}],
                                       temperature=0, max_tokens=3, n=3, extra_body={"ignore_eos": True})
    _idle(live)
    again = scrape(live)
    assert _delta(after, again, "qwen_ft_requests_finished_total", model=m, finish_reason="length") == 3
    assert _delta(after, again, "qwen_ft_generation_tokens_total", model=m) == 9
    assert _delta(after, again, "qwen_ft_prompt_tokens_total", model=m) == 3 * r.usage.prompt_tokens
    assert again[("qwen_ft_engine_steps", ())] > before[("qwen_ft_engine_steps", ())]
    for g in ("running", "waiting", "in_flight"):
        assert again[(f"qwen_ft_requests_{g}", ())] == 0


def test_a_client_that_leaves_counts_as_cancelled(live):
    before = scrape(live)

    async def leave():
        body = {"model": "tiny-qwen", "messages": [{"role": "user", "content": "Hi"}], "stream": True,
                "max_tokens": 200, "min_tokens": 200, "temperature": 1.0}
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as h:
            async with h.stream("POST", live.api_url + "/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        return  # (leaves after its first chunk)

    asyncio.run(leave())
    _idle(live)
    after = scrape(live)
    assert _delta(before, after, "qwen_ft_requests_finished_total", model="tiny-qwen", finish_reason="cancelled") == 1
    assert 0 < _delta(before, after, "qwen_ft_generation_tokens_total", model="tiny-qwen") < 200


def test_the_key_is_needed(live):
    assert httpx.get(live.url + "/metrics", timeout=10).status_code == 401
    assert httpx.get(live.url + "/metrics", headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401


class _Req:
    def __init__(self, id, adapter, prompt=4):
        self.id, self.adapter, self.prompt_ids = id, adapter, [1] * prompt
        self.output_ids, self.finished, self.finish_reason = [], False, None


def test_adapters_are_named_as_served_and_a_failed_request_ends_once():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from finetune.serve.metrics import ServeMetrics

    m = ServeMetrics({None: "base", "support_v2": "support/v2"}, lambda: (1, 2), lambda: 3, lambda: 7)
    a, b = _Req(1, "support_v2"), _Req(2, None, prompt=6)
    m.submitted(a)
    m.submitted(b)
    a.output_ids = [5]
    m.updated(a)
    a.output_ids, a.finished, a.finish_reason = [5, 6], True, "stop"
    m.updated(a)
    m.updated(a)  # (reported again: counted once)
    b.output_ids = [9]
    m.ended(b)  # the engine failed
    m.ended(b)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(m.registry).decode()) for s in f.samples}
    assert samples[("qwen_ft_requests_finished_total", (("finish_reason", "stop"), ("model", "support/v2")))] == 1
    assert samples[("qwen_ft_requests_finished_total", (("finish_reason", "error"), ("model", "base")))] == 1
    assert samples[("qwen_ft_prompt_tokens_total", (("model", "support/v2"),))] == 4
    assert samples[("qwen_ft_prompt_tokens_total", (("model", "base"),))] == 6
    assert samples[("qwen_ft_generation_tokens_total", (("model", "support/v2"),))] == 2
    assert samples[("qwen_ft_generation_tokens_total", (("model", "base"),))] == 1
    assert samples[("qwen_ft_time_to_first_token_seconds_count", (("model", "support/v2"),))] == 1
    assert ("qwen_ft_e2e_request_latency_seconds_count", (("model", "base"),)) not in samples  # (no answer)
    assert (samples[("qwen_ft_requests_running", ())], samples[("qwen_ft_requests_waiting", ())],
            samples[("qwen_ft_requests_in_flight", ())], samples[("qwen_ft_engine_steps", ())]) == (1, 2, 3, 7)
