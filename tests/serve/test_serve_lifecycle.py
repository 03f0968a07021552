"""`qwen-ft serve` over time, on the tiny demo model with two random adapters, in-process on 127.0.0.1 (a free
port) and as a `qwen-ft serve` subprocess: bursts of concurrent streams, clients that leave, engine steps that
fail, stopping with streams open, and answers that do not depend on what else is in the batch."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _helpers import ROOT, free_port  # noqa: E402

MODELS = ("tiny-qwen", "ra", "rb")  # the base (by its dir name) and the two adapters
QUESTIONS = ("What is the codename of project Aurora?", "Who guards the north gate?", "Tell me a story.")
LONG = {"max_tokens": 900, "min_tokens": 900, "temperature": 1.0, "seed": 1}  # holds its row until cancelled


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model and two LoRA adapters with random (non-zero) weights: each of the three answers a question
    differently, so an answer that went to the wrong request shows."""
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune import load_model
    from finetune.demo import make_demo_model

    root = tmp_path_factory.mktemp("serve_lifecycle")
    model = make_demo_model(root / "tiny-qwen", seed=0, seq_length=1024, max_position_embeddings=1024)
    for name, seed in (("ra", 1), ("rb", 2)):
        torch.manual_seed(seed)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "w1", "w2"],
                            init_lora_weights=False, task_type="CAUSAL_LM")
        get_peft_model(load_model(model), config).save_pretrained(root / name)
    return root


def _build(model_dir, *flags):
    from finetune.serve.cli import _parser, build_server

    return build_server(_parser().parse_args(["-m", str(model_dir / "tiny-qwen"), "--adapter",
                                              f"ra={model_dir / 'ra'}", "--adapter", f"rb={model_dir / 'rb'}",
                                              *flags]))


@pytest.fixture(scope="module")
def live(model_dir):
    from finetune.serve.background import serve_in_background

    with serve_in_background(_build(model_dir, "--max-batch", "4", "--max-queue", "8"), start_timeout=30) as bg:
        yield bg


@pytest.fixture(scope="module")
def reference(live):
    """Each (model, question)'s greedy answer, asked alone."""
    client = _client(live)
    return {(m, q): _ask(client, m, q).choices[0].message.content for m in MODELS for q in QUESTIONS}


def _client(live, timeout=120.0):
    return openai.OpenAI(base_url=live.api_url, api_key="none", timeout=timeout, max_retries=0)


def _ask(client, model, q, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                          **{"temperature": 0, "max_tokens": 12, **kw})


def _health(live) -> dict:
    return httpx.get(live.url + "/health", timeout=10).json()


def _wait_idle(live) -> dict:
    """/health once no request is in flight and the engine holds no row and no waiting request (bounded: 60 s)."""
    for _ in range(600):
        h = _health(live)
        if (h["in_flight"], h["running"], h["waiting"]) == (0, 0, 0):
            return h
        time.sleep(0.1)
    raise AssertionError(f"the server did not become idle: {h}")


def _wait_until(predicate, what: str):
    for _ in range(600):  # bounded: 60 s
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(what)


def _events(lines) -> list:
    return [line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]


# -- bursts and clients that leave -------------------------------------------------------------------------------


def test_a_burst_of_50_streams_answers_each_its_own_text_or_429_and_leaves_the_engine_idle(live, reference):
    """50 streams at once over the base and two adapters, 12 taken (--max-batch 4 + --max-queue 8): each answers
    its own request's text or a 429 queue_full; afterwards no request is in flight and the engine holds no row (the
    step that finished the last rows left them, and a step in flight, in the engine until the next request)."""
    assert len({reference[m, QUESTIONS[0]] for m in MODELS}) == 3  # the three models answer differently
    client = openai.AsyncOpenAI(base_url=live.api_url, api_key="none", timeout=300, max_retries=0)
    jobs = [(MODELS[i % 3], QUESTIONS[i // 3 % 3]) for i in range(50)]

    async def one(model, q):
        try:
            stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                          temperature=0, max_tokens=12, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        except openai.RateLimitError as e:
            assert e.body["code"] == "queue_full" and e.response.headers["retry-after"] == "1", e.body
            return 429

    async def burst():
        try:
            return await asyncio.wait_for(asyncio.gather(*[one(m, q) for m, q in jobs]), 300)
        finally:
            await client.close()

    answers = asyncio.run(burst())
    served = [(job, a) for job, a in zip(jobs, answers) if a != 429]
    assert len(served) >= 12
    assert all(a == reference[job] for job, a in served), [(job, a) for job, a in served if a != reference[job]]
    h = _wait_idle(live)
    assert h["status"] == "ok"


def test_with_prefill_chunk_prompts_joining_running_streams_go_in_chunks_and_answer_as_alone(model_dir, reference):
    """`--prefill-chunk 8`: the chat prompts (~30 tokens) that join running streams are prefilled 8 positions a
    step; 12 streams sent 10 ms apart over the three models each answer what it answers alone. A long stream holds
    one row meanwhile, so that every one of them joins a running batch (without it a group that finished together
    left the next to join an empty batch, whole)."""
    from finetune.serve.background import serve_in_background

    server = _build(model_dir, "--max-batch", "4", "--prefill-chunk", "8")
    engine = server.engine
    assert engine.prefill_chunk == 8
    chunks, forward_chunk = [], engine._forward_chunk
    engine._forward_chunk = lambda row, slot, start, end: chunks.append(start) or forward_chunk(row, slot, start, end)
    jobs = [(MODELS[i % 3], QUESTIONS[i // 3 % 3]) for i in range(12)]
    with serve_in_background(server, start_timeout=30) as bg:
        client = openai.AsyncOpenAI(base_url=bg.api_url, api_key="none", timeout=120, max_retries=0)
        hold = {"model": "rb", "messages": [{"role": "user", "content": "Tell me a story."}], "stream": True, **LONG}

        async def one(i, model, q):
            await asyncio.sleep(0.01 * i)
            stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                          temperature=0, max_tokens=12, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def staggered():
            try:
                async with httpx.AsyncClient(timeout=60) as h, h.stream("POST", bg.api_url + "/chat/completions",
                                                                        json=hold) as held:
                    async for line in held.aiter_lines():  # its first token: it is running
                        if line.startswith("data: "):
                            break
                    return await asyncio.wait_for(asyncio.gather(*[one(i, m, q) for i, (m, q) in enumerate(jobs)]),
                                                  120)
            finally:
                await client.close()

        answers = asyncio.run(staggered())
    assert answers == [reference[job] for job in jobs]
    assert chunks.count(0) >= 1 and chunks.count(8) >= 1  # some prompts went in chunks


def test_a_client_that_leaves_while_its_prompt_is_prefilled_in_chunks_frees_its_slot(model_dir, reference):
    """`--prefill-chunk 4`: a ~500-token prompt joins a running stream and its client leaves once its chunks have
    begun, while the prompt is still going in chunks. It is cancelled before its last chunk, nothing else is, and the
    server then answers as alone."""
    from finetune.serve.background import serve_in_background

    server = _build(model_dir, "--max-batch", "4", "--prefill-chunk", "4")
    engine = server.engine
    long_prompt = "Tell me a story about the north gate. " * 60
    chunks, forward_chunk = [], engine._forward_chunk
    engine._forward_chunk = lambda row, slot, start, end: chunks.append(
        (len(row.req.prompt_ids), end)) or forward_chunk(row, slot, start, end)
    with serve_in_background(server, start_timeout=30) as bg:
        url = bg.api_url + "/chat/completions"
        before = _wait_idle(bg)["finished"]

        async def stream_until(h, body, lines: int, chunked: bool = False):
            async with h.stream("POST", url, json={**body, "stream": True}) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= lines:
                        for _ in range(1000 if chunked else 0):  # (bounded: 10 s) until its chunks have begun
                            if chunks:
                                break
                            await asyncio.sleep(0.01)
                        return

        async def scenario():
            async with httpx.AsyncClient(timeout=60) as h:
                hold = {"model": "ra", "messages": [{"role": "user", "content": "Tell me a story."}], **LONG}
                holder = asyncio.ensure_future(stream_until(h, hold, 1_000_000))
                await asyncio.sleep(0.3)  # (running: the long prompt joins beside it)
                leaver = {"model": "rb", "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 12,
                          "temperature": 0}
                await stream_until(h, leaver, 1, chunked=True)  # the role chunk and its first chunks, then gone
                _wait_until(lambda: not chunks or engine._chunked is None, "the chunked prompt was not dropped")
                holder.cancel()

        asyncio.run(asyncio.wait_for(scenario(), 120))
        after = _wait_idle(bg)["finished"]
        assert after.get("cancelled", 0) == before.get("cancelled", 0) + 2, (before, after)
        assert after.get("length", 0) == before.get("length", 0) and after.get("stop", 0) == before.get("stop", 0)
        client = openai.OpenAI(base_url=bg.api_url, api_key="none", timeout=60, max_retries=0)
        assert _ask(client, "rb", QUESTIONS[1]).choices[0].message.content == reference["rb", QUESTIONS[1]]
    length = max(n for n, _ in chunks)
    assert length > 400 and 0 < max(end for n, end in chunks if n == length) < length  # left before its last chunk


def test_clients_that_leave_free_their_rows_and_queue_slots(live, reference):
    """Streams closed mid-answer, streams closed while queued (before their first token), and non-streamed requests
    whose client timed out: each is cancelled, none runs to max_tokens, and then the whole capacity (12) is served
    again, without a 429."""
    before = _wait_idle(live)["finished"]
    url = live.api_url + "/chat/completions"

    async def leave_after(h, chunks: int):
        body = {"model": "ra", "messages": [{"role": "user", "content": "Tell me a story."}], "stream": True, **LONG}
        async with h.stream("POST", url, json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= chunks:
                    return

    async def time_out(h):
        body = {"model": "rb", "messages": [{"role": "user", "content": "Tell me a story."}], **LONG}
        with pytest.raises(httpx.ReadTimeout):
            await h.post(url, json=body, timeout=httpx.Timeout(30, read=1.0))

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as h:
            # 4 rows running (a token or more each), then 4 queued behind them that leave after the role chunk
            running = [asyncio.ensure_future(leave_after(h, 3)) for _ in range(4)]
            queued = [asyncio.ensure_future(leave_after(h, 1)) for _ in range(4)]
            await asyncio.wait_for(asyncio.gather(*running, *queued, time_out(h), time_out(h)), 120)

    asyncio.run(scenario())
    after = _wait_idle(live)["finished"]
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 10, (before, after)
    assert after.get("length", 0) == before.get("length", 0), (before, after)

    def ask(i):
        return _ask(_client(live), MODELS[i % 3], QUESTIONS[0]).choices[0].message.content

    threads, out = [], {}
    for i in range(12):
        threads.append(threading.Thread(target=lambda i=i: out.update({i: ask(i)})))
        threads[-1].start()
    for t in threads:
        t.join(120)
    assert out == {i: reference[MODELS[i % 3], QUESTIONS[0]] for i in range(12)}


def test_an_answer_does_not_depend_on_the_rest_of_the_batch(live, reference):
    """Greedy and seeded requests answer inside a busy batch (other adapters, other sampling) what they answer
    alone."""
    client = _client(live)
    cases = [("ra", {"temperature": 0}), ("tiny-qwen", {"temperature": 1.0, "seed": 7}),
             ("rb", {"temperature": 0.8, "top_p": 0.9, "seed": 11, "max_tokens": 20})]
    alone = [_ask(client, m, QUESTIONS[2], **kw).choices[0].message.content for m, kw in cases]
    out = {}

    def run(key, model, kw):
        out[key] = _ask(_client(live), model, QUESTIONS[2], **kw).choices[0].message.content

    threads = [threading.Thread(target=run, args=(("noise", i), MODELS[i % 3], {"temperature": 1.0, "max_tokens": 30}))
               for i in range(6)]
    threads += [threading.Thread(target=run, args=(i, m, kw)) for i, (m, kw) in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [out[i] for i in range(len(cases))] == alone


# -- the engine failing ------------------------------------------------------------------------------------------


def test_a_failed_step_ends_the_whole_batch_with_500_and_the_server_answers_after(live, reference, monkeypatch):
    """A step that raises ends every request in flight (which row caused it cannot be told): a stream with an
    engine_error event and [DONE], a non-streamed request with a 500. The next requests get their answers."""
    engine = live.server.engine
    real, calls = engine.step, []

    def failing():
        calls.append(1)
        if engine.occupancy()[0] == 3 and len(calls) > 3:  # the three rows are decoding
            raise RuntimeError("injected failure")
        return real()

    monkeypatch.setattr(engine, "step", failing)
    out = {}

    def stream(model):
        with httpx.stream("POST", live.api_url + "/chat/completions", timeout=60, json={
                "model": model, "messages": [{"role": "user", "content": "Tell me a story."}], "stream": True,
                **LONG}) as r:
            out[model] = _events(r.iter_lines())

    def whole():
        out["whole"] = httpx.post(live.api_url + "/chat/completions", timeout=60, json={
            "model": "ra", "messages": [{"role": "user", "content": "Tell me a story."}], **LONG})

    threads = [threading.Thread(target=stream, args=(m,)) for m in ("tiny-qwen", "rb")] + [threading.Thread(target=whole)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    monkeypatch.undo()
    for model in ("tiny-qwen", "rb"):
        *_, error, done = out[model]
        assert error["error"]["code"] == "engine_error" and "injected failure" in error["error"]["message"]
        assert done == "[DONE]"
    assert out["whole"].status_code == 500 and out["whole"].json()["error"]["code"] == "engine_error"
    assert _wait_idle(live)["status"] == "ok"
    client = _client(live)
    assert [_ask(client, m, QUESTIONS[1]).choices[0].message.content for m in MODELS] == \
        [reference[m, QUESTIONS[1]] for m in MODELS]


def test_a_step_that_keeps_failing_is_retried_with_growing_pauses_and_health_says_so(live, reference, monkeypatch,
                                                                                       caplog):
    """A device error that sticks made every step raise: the worker retried at once, forever (a busy loop writing a
    traceback each time), and /health said ok. Now the pause between tries doubles up to RETRY_MAX_S, the
    traceback is logged once, /health is 503 engine_error until a step succeeds, and then the server answers."""
    from finetune.serve import worker as worker_module

    worker = live.server.worker
    pauses = []
    real_halt = worker._halt

    class Halt:  # records the pauses instead of sleeping them
        def wait(self, timeout):
            pauses.append(timeout)
            return real_halt.wait(0)

        def __getattr__(self, name):
            return getattr(real_halt, name)

    def broken():
        raise RuntimeError("device lost")

    monkeypatch.setattr(worker, "_halt", Halt())
    monkeypatch.setattr(live.server.engine, "step", broken)
    caplog.set_level(logging.ERROR, logger=worker_module.__name__)
    r = httpx.post(live.api_url + "/chat/completions", timeout=60,
                   json={"model": "ra", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
    _wait_until(lambda: len(pauses) >= 10, "the failing step was not retried")
    h = httpx.get(live.url + "/health", timeout=10)
    assert h.status_code == 503 and h.json()["status"] == "engine_error" and "device lost" in h.json()["error"]
    monkeypatch.undo()
    assert pauses[:3] == [0.2, 0.4, 0.8] and max(pauses) == worker_module.RETRY_MAX_S
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 1 and len(caplog.records) > 10
    assert _wait_idle(live)["status"] == "ok"
    assert _ask(_client(live), "ra", QUESTIONS[0]).choices[0].message.content == reference["ra", QUESTIONS[0]]


# -- stopping ---------------------------------------------------------------------------------------------------


def _open_streams(url: str, n: int, out: dict) -> list:
    """n long streams in threads, each recording its events (or the exception that ended it) in out[i]."""

    def run(i):
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
                    "model": "tiny-qwen", "messages": [{"role": "user", "content": "Tell me a story."}],
                    "stream": True, **LONG}) as r:
                out[i] = _events(r.iter_lines())
        except httpx.HTTPError as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def _ended_by_shutdown(events) -> bool:
    return (isinstance(events, list) and events[-1] == "[DONE]"
            and events[-2].get("error", {}).get("code") == "server_shutting_down")


def test_stopping_the_server_ends_open_streams_at_once_with_an_error(model_dir):
    """uvicorn's graceful stop waited for every open stream to generate to max_tokens. Now the requests in flight
    (running, queued, non-streamed) end at once: a stream with a server_shutting_down event and [DONE], a
    non-streamed request with a 503; the server's thread ends."""
    from finetune.serve.background import serve_in_background

    server = _build(model_dir, "--max-batch", "2")
    out: dict = {}
    with serve_in_background(server, start_timeout=30, stop_timeout=60) as bg:
        threads = _open_streams(bg.url, 3, out)  # two running, one queued
        whole = threading.Thread(target=lambda: out.update(whole=httpx.post(
            bg.api_url + "/chat/completions", timeout=60,
            json={"model": "ra", "messages": [{"role": "user", "content": "Tell me a story."}], **LONG})))
        whole.start()
        _wait_until(lambda: server.worker.in_flight == 4 and server.engine.occupancy()[0] == 2,
                    "the requests did not start")
    for t in [*threads, whole]:
        t.join(60)
    assert all(_ended_by_shutdown(out[i]) for i in range(3)), out
    assert out["whole"].status_code == 503 and out["whole"].json()["error"]["code"] == "server_shutting_down"
    assert server.worker.in_flight == 0 and not server.worker._thread.is_alive()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)])
def test_ctrl_c_or_sigterm_of_qwen_ft_serve_with_open_streams(model_dir, sig, code):
    """`qwen-ft serve` stopped with streams open exits at once (not when the streams have generated to their
    end), saying how many requests it ended in one line; the clients get a server_shutting_down event and [DONE].
    Ctrl-C exits 130, as every qwen-ft command (it was 0, as uvicorn.run); after SIGTERM the process ends by the
    signal, as under uvicorn.run."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", "serve", "-m", str(model_dir / "tiny-qwen"),
                             "--port", str(port), "--max-batch", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    out: dict = {}
    try:
        def up():
            try:
                return httpx.get(url + "/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None  # (then the asserts below show why)

        _wait_until(up, "the server did not start")
        assert proc.poll() is None, proc.communicate()
        threads = _open_streams(url, 3, out)
        _wait_until(lambda: httpx.get(url + "/health", timeout=5).json()["in_flight"] == 3, "no streams opened")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    for t in threads:
        t.join(60)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == \
        "qwen-ft serve: stopping; 3 request(s) in flight ended with 503 server_shutting_down", stderr
    assert "Traceback" not in stderr
    assert all(_ended_by_shutdown(out[i]) for i in range(3)), out


def test_ctrl_c_pressed_twice_stops_qwen_ft_serve_without_a_traceback(model_dir):
    """Two SIGINTs a few ms apart (an impatient Ctrl-C, or `timeout` forwarding one beside the terminal's) ended
    the process with uvicorn's "ERROR: Traceback ... CancelledError" of the app's lifespan."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", "serve", "-m", str(model_dir / "tiny-qwen"),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        def up():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None

        _wait_until(up, "the server did not start")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    assert proc.returncode == 130, stderr
