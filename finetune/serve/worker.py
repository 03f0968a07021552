"""The engine's decode thread and the asyncio side of each request.

One background thread loops `engine.step()` while the engine has work (requests join and leave the
running batch between steps) and otherwise sleeps until a request is submitted. After each step it hands
every updated request's progress (token count, finished, finish reason) to that request's asyncio queue
through `loop.call_soon_threadsafe`, so the event loop never blocks on decoding. A request whose client
went away is cancelled (`Request.cancel()`), and the engine frees its row at its next step.

A step that raises ends every request in flight with a 500 (which row caused it cannot be told); the
thread then tries again, after a growing pause while steps keep failing (a device error that sticks), and
`failure` says what failed until a step succeeds. `close()` (the server stopping) ends every request in
flight with a 503 and refuses new ones.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from dataclasses import dataclass

from .protocol import APIError

logger = logging.getLogger(__name__)

RETRY_MAX_S = 5.0  # the longest pause between steps while they keep failing


class Closed(Exception):
    """The worker is closed (the server is stopping): no request is taken."""


@dataclass
class Progress:
    n_tokens: int  # len(request.output_ids) after the step
    finished: bool
    finish_reason: str | None
    error: APIError | None = None  # the request ended without an answer (the engine failed, the server stopped)


class EngineWorker:
    def __init__(self, engine, capacity: int, metrics=None):
        self.engine = engine
        self.metrics = metrics  # (metrics.ServeMetrics: told of each request's submit, progress and end)
        self.capacity = capacity  # requests in flight (running + waiting) before a 429
        self._streams: dict = {}  # request id -> (request, loop, queue)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._closed = False
        self._leftover = False  # the last step ran with work: it may have left finished rows in the engine
        self.steps = 0
        self.failures = 0  # engine steps that failed in a row
        self.failure: str | None = None  # what the last step raised, while steps keep failing
        self.finished: Counter = Counter()  # finish reasons of the requests that left the engine
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> int:
        """The server is stopping: end every request in flight with a 503 (their rows are freed) and refuse new
        ones (`submit` raises Closed). Returns how many requests were ended."""
        with self._lock:
            self._closed = True
        return self._end_all(lambda: APIError(503, "the server is shutting down: the request ended before its "
                                              "answer was complete", None, "server_shutting_down"))

    def stop(self, timeout: float = 10.0) -> None:
        self.close()
        self._halt.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    def submit(self, prompt_ids: list[int], params, adapter: str | None):
        """Start a request -> (request, asyncio.Queue of Progress), or None when at capacity; Closed once the
        worker is closed."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._closed:
                raise Closed
            if len(self._streams) >= self.capacity:
                return None
            req = self.engine.submit(prompt_ids, params, adapter=adapter)
            self._streams[req.id] = (req, loop, queue)
            if self.metrics is not None:  # (under the lock: before the engine's thread can report it)
                self.metrics.submitted(req)
        self._wake.set()
        return req, queue

    def _end_all(self, error) -> int:
        """Cancel every request in flight and end its stream with ``error()`` (one exception object each)."""
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for req, loop, queue in streams:
            req.cancel()
            if self.metrics is not None:
                self.metrics.ended(req)
            try:
                loop.call_soon_threadsafe(queue.put_nowait, Progress(len(req.output_ids), True, None, error()))
            except RuntimeError:  # the event loop closed: no one waits for it
                pass
        self._wake.set()  # the engine drops the cancelled rows at its next step
        return len(streams)

    def _failed(self, e: Exception) -> None:
        self.failures += 1
        self.failure = f"{type(e).__name__}: {e}"
        if self.failures == 1:
            logger.exception("engine step failed: the requests in flight end with a 500")
        else:
            logger.error("engine step failed again (%d in a row): %s", self.failures, self.failure)
        message = f"generation failed: {self.failure}"
        self._end_all(lambda: APIError(500, message, None, "engine_error"))
        # a step that keeps failing (a device error that sticks) was retried at once, forever: a busy loop writing
        # a traceback each time. The first retry is at once (it frees the cancelled rows), then the pause doubles
        if self.failures > 1:
            self._halt.wait(min(RETRY_MAX_S, 0.05 * 2 ** min(self.failures, 10)))

    def _run(self) -> None:
        while not self._halt.is_set():
            self._wake.clear()  # cleared before looking, so a submit after the look wakes the wait below
            busy = self.engine.has_work()
            if not busy and not self._leftover:
                self._wake.wait(0.5)
                continue
            # the step that finishes the last rows leaves them (and a step in flight) in the engine until a next
            # step: one more step, with no work, drops them, so an idle server holds no rows
            self._leftover = busy
            try:
                updated = self.engine.step()
            except Exception as e:
                self._failed(e)
                continue
            self.failures, self.failure = 0, None
            self.steps += busy
            for req in updated:
                with self._lock:
                    entry = self._streams.get(req.id)
                    if entry is not None and self.metrics is not None:
                        self.metrics.updated(req)
                    if entry is not None and req.finished:
                        del self._streams[req.id]
                        self.finished[req.finish_reason] += 1
                if entry is None:
                    continue
                _, loop, queue = entry
                try:
                    loop.call_soon_threadsafe(queue.put_nowait,
                                              Progress(len(req.output_ids), req.finished, req.finish_reason))
                except RuntimeError:  # the event loop closed (server shutting down)
                    req.cancel()
