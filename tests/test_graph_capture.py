"""graph_capture.capture: the collector is off for exactly the capture's duration (the capture itself is exercised
on the GPU by tests/inference/test_inference_cuda.py and the trainer's graph tests)."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch

from finetune import graph_capture


@pytest.fixture
def fake_graph(monkeypatch):
    """torch.cuda.graph replaced by a recorder of its arguments and of the collector's state inside it."""
    seen = []

    @contextlib.contextmanager
    def graph(g, pool=None, capture_error_mode="global"):
        seen.append((g, pool, capture_error_mode, gc.isenabled()))
        yield

    monkeypatch.setattr(torch.cuda, "graph", graph)
    return seen


def test_collector_is_off_inside_and_back_on_after(fake_graph):
    assert gc.isenabled()
    g, pool = object(), (0, 1)
    with graph_capture.capture(g, pool) as got:
        assert got is g
        assert not gc.isenabled()
    assert gc.isenabled()
    assert fake_graph == [(g, pool, "thread_local", False)]


def test_collector_back_on_after_a_failed_capture(fake_graph):
    with pytest.raises(RuntimeError, match="boom"):
        with graph_capture.capture(object()):
            raise RuntimeError("boom")
    assert gc.isenabled()


def test_collector_left_off_where_the_caller_had_it_off(fake_graph):
    gc.disable()
    try:
        with graph_capture.capture(object()):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
