"""GET /metrics: the server's load and latencies in Prometheus' text format (prometheus_client), as vLLM and TGI
expose theirs, so that a scraper (Prometheus, Grafana Agent, Datadog) sees this server as it sees those.

Per served model (the base under its dir name, each adapter under its NAME): requests finished by how they ended,
prompt and generated tokens, the time from the engine's submit to the first token and to the end; and the engine's
running and waiting rows, the requests in flight and the decode steps. Times are measured in the engine's thread
(``EngineWorker``) from its submit, so they leave out the HTTP read and the prompt's tokenization before it.

Each server has its own registry: several in one process (tests, benchmarks) do not share counts.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# First-token and whole-request times, in seconds: vLLM's buckets for the same two histograms, so that dashboards
# written for it read these
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
# Requests that ended without an answer: the engine step failed (500) or the server stopped (503)
ERROR = "error"


class ServeMetrics:
    """One server's metrics. The worker calls ``submitted`` / ``updated`` / ``ended`` from its threads;
    ``labels``: the engine's adapter name (None: the base) -> the served model name."""

    def __init__(self, labels: dict, occupancy, in_flight, steps):
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = labels
        r = self.registry
        self.finished = Counter("qwen_ft_requests_finished", "Requests ended, by how: stop (an end token, a stop "
                                "string or id), length (max_tokens), cancelled (the client left), error (the engine "
                                "failed or the server stopped)", ["model", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("qwen_ft_prompt_tokens", "Prompt tokens of the requests submitted", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("qwen_ft_generation_tokens", "Tokens generated, by ended requests",
                                         ["model"], registry=r)
        self.ttft = Histogram("qwen_ft_time_to_first_token_seconds", "From the engine's submit to a request's first "
                              "token", ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.e2e = Histogram("qwen_ft_e2e_request_latency_seconds", "From the engine's submit to a request's end",
                             ["model"], buckets=E2E_BUCKETS, registry=r)
        Gauge("qwen_ft_requests_running", "Rows in the engine's running batch", registry=r).set_function(
            lambda: occupancy()[0])
        Gauge("qwen_ft_requests_waiting", "Requests waiting to join the running batch", registry=r).set_function(
            lambda: occupancy()[1])
        Gauge("qwen_ft_requests_in_flight", "Requests taken: running or waiting", registry=r).set_function(in_flight)
        # (a count that only grows, read from the worker when scraped: a Counter cannot be set)
        Gauge("qwen_ft_engine_steps", "Decode steps the engine ran with work", registry=r).set_function(steps)
        self._started: dict[int, tuple[float, bool]] = {}  # request id -> (submit time, first token seen)

    def _model(self, req) -> str:
        return self.labels.get(req.adapter, str(req.adapter))

    def submitted(self, req) -> None:
        self._started[req.id] = (time.perf_counter(), False)
        self.prompt_tokens.labels(self._model(req)).inc(len(req.prompt_ids))

    def updated(self, req) -> None:
        """After an engine step that updated ``req`` (its first token and its end are timed here)."""
        start = self._started.get(req.id)
        if start is None:
            return
        t0, seen = start
        if not seen and req.output_ids:
            self.ttft.labels(self._model(req)).observe(time.perf_counter() - t0)
            self._started[req.id] = (t0, True)
        if req.finished:
            self._end(req, req.finish_reason or "stop")

    def ended(self, req) -> None:
        """``req`` ended without an answer (an engine failure, the server stopping)."""
        self._end(req, ERROR)

    def _end(self, req, reason: str) -> None:
        start = self._started.pop(req.id, None)  # (once: a failure's end and the engine's may race)
        if start is None:
            return
        model = self._model(req)
        self.finished.labels(model, reason).inc()
        self.generation_tokens.labels(model).inc(len(req.output_ids))
        if reason != ERROR:
            self.e2e.labels(model).observe(time.perf_counter() - start[0])

    def exposition(self) -> tuple[bytes, str]:
        """(the text a scraper reads, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
