"""CUDA graph capture as the engine and the trainer do it: thread-local capture mode, with Python's cyclic garbage
collector held off for the capture's duration."""

from __future__ import annotations

import contextlib
import gc

import torch


@contextlib.contextmanager
def capture(graph: torch.cuda.CUDAGraph, pool=None):
    """``torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local")`` with garbage collection paused.

    Thread-local: in torch's default (global) mode an allocation or a module load by any other thread of the process
    (a server's, a compile pool's) during the capture invalidates it.
    No collection: torch no longer collects before a capture, so a collection could start inside one, and freeing an
    unreachable CUDAGraph (an earlier engine's, a finished run's) calls cudaGraphExecDestroy, which is not permitted
    while this thread captures and invalidates the capture. That failed one GPU test on each fresh machine, a
    different one each time (benchmarks/NOTES.md, step 84)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            yield graph
    finally:
        if was_enabled:
            gc.enable()
