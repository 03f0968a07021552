"""The engine's decode thread and the asyncio side of each request.

One background thread loops `engine.step()` while the engine has work (requests join and leave the
running batch between steps) and otherwise sleeps until a request is submitted. After each step it hands
every updated request's progress (token count, finished, finish reason) to that request's asyncio queue
through `loop.call_soon_threadsafe`, so the event loop never blocks on decoding. A request whose client
went away is cancelled (`Request.cancel()`), and the engine frees its row at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    n_tokens: int  # len(request.output_ids) after the step
    finished: bool
    finish_reason: str | None
    error: str | None = None  # the engine failed: the request ends with a server error


class EngineWorker:
    def __init__(self, engine, capacity: int):
        self.engine = engine
        self.capacity = capacity  # requests in flight (running + waiting) before a 429
        self._streams: dict = {}  # request id -> (request, loop, queue)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.steps = 0
        self.finished: Counter = Counter()  # finish reasons of the requests that left the engine
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    def submit(self, prompt_ids: list[int], params, adapter: str | None):
        """Start a request -> (request, asyncio.Queue of Progress), or None when at capacity."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if len(self._streams) >= self.capacity:
                return None
            req = self.engine.submit(prompt_ids, params, adapter=adapter)
            self._streams[req.id] = (req, loop, queue)
        self._wake.set()
        return req, queue

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()  # cleared before looking, so a submit after the look wakes the wait below
            if not self.engine.has_work():
                self._wake.wait(0.5)
                continue
            try:
                updated = self.engine.step()
            except Exception as e:  # the step failed: every request in flight ends with the error
                logger.exception("engine step failed")
                with self._lock:
                    streams, self._streams = list(self._streams.values()), {}
                for req, loop, queue in streams:
                    req.cancel()
                    loop.call_soon_threadsafe(queue.put_nowait, Progress(len(req.output_ids), True, None,
                                                                         f"{type(e).__name__}: {e}"))
                continue
            self.steps += 1
            for req in updated:
                with self._lock:
                    entry = self._streams.get(req.id)
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
