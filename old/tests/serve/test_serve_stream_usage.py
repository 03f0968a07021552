"""Streams timed by tokens, not text: with `stream_options.continuous_usage_stats` every chunk carries the usage
so far and every decode step with tokens sends one, even when the tokens decode to no visible text (as a
random model's do); the load benchmark's per-stream timing (TTFT, ITL, token count) reads those."""

from __future__ import annotations

import asyncio
import sys

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import torch  # noqa: E402

from _helpers import ROOT, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def invisible():
    """A server over a tiny random model whose every pick is past the tokenizer's vocabulary: each token it
    generates decodes to nothing."""
    from finetune.serve.app import Server
    from finetune.serve.background import serve_in_background
    from finetune.tokenization import SMALL_VOCAB, QWenTokenizer

    tok = QWenTokenizer(str(SMALL_VOCAB))
    model = tiny_model(seed=4, vocab_size=2 * len(tok))
    with torch.no_grad():  # the ids the tokenizer knows (the stops included) score 0, the others +-random
        model.lm_head.weight[: len(tok)] = 0
    server = Server(model, tok, base_name="rand", max_batch=4, max_model_len=256)
    with serve_in_background(server, start_timeout=30) as live:
        yield live


def _stream(live, **options):
    client = openai.OpenAI(base_url=live.api_url, api_key="x", timeout=60, max_retries=0)
    return list(client.chat.completions.create(model="rand", messages=[{"role": "user", "content": "hi"}],
                                               stream=True, max_tokens=5, temperature=0, stream_options=options))


def test_continuous_usage_sends_a_chunk_per_token_even_without_text(invisible):
    chunks = _stream(invisible, include_usage=True, continuous_usage_stats=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""  # no text at all
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks if c.choices and c.choices[0].finish_reason is None]
    assert counts[0] == 0  # the role chunk carries no token
    # then a chunk for every decode step (the first step prefills and decodes, so its chunk may carry 2) ...
    tokens = [n for n in counts if n]
    assert tokens == sorted(set(tokens)) and tokens[-1] == 5 and len(tokens) >= 4
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].usage.completion_tokens == 5
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5  # ... and the final usage


def test_without_continuous_usage_a_stream_sends_text_chunks_only(invisible):
    chunks = _stream(invisible, include_usage=True)
    assert [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].finish_reason is None] == [""]
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].usage.completion_tokens == 5


def test_the_load_bench_times_tokens_that_carry_no_text(invisible):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_bench

    async def run():
        async with openai.AsyncOpenAI(base_url=invisible.api_url, api_key="x", timeout=60, max_retries=0) as c:
            return await serve_bench.one_stream(c, "rand", "hello", 6)

    r = asyncio.run(run())
    assert r["tokens"] == 6 and r["ttft_ms"] is not None and r["ttft_ms"] > 0
    assert len(r["itl_ms"]) == 6 - r["first_chunk_tokens"]  # one gap per token after the first chunk's
