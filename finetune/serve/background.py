"""The app under uvicorn: `Uvicorn` (what `qwen-ft serve` runs in the foreground, with uvicorn's signal handling),
and the same in a background thread of this process, for tests and benchmarks:

    with serve_in_background(server) as live:     # a free port on 127.0.0.1
        openai.OpenAI(base_url=live.api_url, api_key=...)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import uvicorn


@dataclass
class Live:
    server: object  # the finetune.serve.app.Server being served
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return self.url + "/v1"


class Uvicorn(uvicorn.Server):
    """uvicorn's server for the app of `server`. When it stops (Ctrl-C, SIGTERM, ``should_exit``) the requests in
    flight end at once with a 503 server_shutting_down (a stream: that error event, then [DONE]): uvicorn's own
    graceful stop waited for every open stream to generate to its end (minutes at a long max_tokens), refusing
    nothing new meanwhile on open connections. ``on_stop(n)`` is called with how many requests were ended."""

    def __init__(self, config: uvicorn.Config, server, on_stop: Callable[[int], None] | None = None):
        super().__init__(config)
        self.app_server, self.on_stop = server, on_stop

    async def shutdown(self, sockets=None) -> None:
        ended = self.app_server.worker.close()
        if self.on_stop is not None:
            self.on_stop(ended)
        await super().shutdown(sockets)
        if self.force_exit:
            # a forced exit (Ctrl-C twice) skips the app's lifespan shutdown, and the lifespan task, cancelled as the
            # loop closed, was logged as an error traceback; the app's own shutdown is quick (the worker is closed)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.lifespan.shutdown(), 5)


@contextmanager
def serve_in_background(server, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                        start_timeout: float = 60.0, stop_timeout: float = 30.0) -> Iterator[Live]:
    """Serve ``create_app(server)`` with uvicorn in a daemon thread on ``host:port`` (port 0: a free one, bound
    here, so no other process can take it between choosing and listening); yields once uvicorn is ready, stops
    it on exit. Raises RuntimeError if it does not start within ``start_timeout`` seconds."""
    from .app import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    uv = Uvicorn(uvicorn.Config(create_app(server), log_level=log_level), server)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not uv.started:
            if not thread.is_alive():
                raise RuntimeError("the server thread ended while starting (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {start_timeout:g} s")
            time.sleep(0.05)
        yield Live(server, host, sock.getsockname()[1])
    finally:
        uv.should_exit = True
        thread.join(stop_timeout)
        sock.close()


__all__ = ["Live", "Uvicorn", "serve_in_background"]
