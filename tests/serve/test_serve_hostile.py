"""`qwen-ft serve` against hostile and unusual client input, on the tiny demo model (no adapters) served in-process
on 127.0.0.1 (a free port): each test is a request that once gave a 500, a wrong status, a message naming no
field, a request that held its row after its client left, or a stalled event loop."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _helpers import demo_server  # noqa: E402

from finetune.serve.protocol import MAX_STOP  # noqa: E402

HI = [{"role": "user", "content": "hi"}]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with demo_server(tmp_path_factory, "serve_hostile", "--max-batch", "2", "--max-queue", "2",
                     "--max-model-len", "1024") as bg:
        yield bg


def _post(live, body=None, content=None, headers=None, timeout=60):
    return httpx.post(live.api_url + "/chat/completions", json=body, content=content, headers=headers,
                      timeout=timeout)


def _body(**kw):
    return {"model": "tiny-qwen", "messages": HI, "max_tokens": 2, **kw}  # (the base, by its dir name)


def _error(r, status=400):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"], err
    return err


def _health(live) -> dict:
    return httpx.get(live.url + "/health", timeout=10).json()


def _wait_idle(live) -> dict:
    for _ in range(600):  # bounded: 60 s
        h = _health(live)
        if h["in_flight"] == 0:
            return h
        time.sleep(0.1)
    raise AssertionError(f"requests still in flight: {h}")


def _wait_in_flight(live, n: int) -> None:
    for _ in range(600):
        if _health(live)["in_flight"] >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{n} request(s) never got in flight")


# -- sampling fields --------------------------------------------------------------------------------------------


def test_a_seed_beyond_64_bits_is_400_and_fails_no_other_request(live):
    """A seed torch.Generator cannot take failed the engine step: 500 for it and for every request in the batch."""
    out = {}
    victim = threading.Thread(target=lambda: out.update(r=_post(live, _body(
        max_tokens=1000, min_tokens=1000, temperature=1.0))))
    victim.start()
    try:
        _wait_in_flight(live, 1)
        for seed in (2**64, -(2**63) - 1, 10**30):
            err = _error(_post(live, _body(seed=seed, temperature=1.0)))
            assert err["param"] == "seed", err
    finally:
        victim.join(120)
    assert out["r"].status_code == 200, out["r"].text
    for seed in (2**64 - 1, -(2**63)):  # the ends of what a torch.Generator takes
        assert _post(live, _body(seed=seed, temperature=1.0)).status_code == 200


@pytest.mark.parametrize("raw", [b"1e30", b"-1e300", b"1" + b"0" * 40 + b".5"])
def test_a_number_too_large_for_an_integer_field_is_named_as_a_number(live, raw):
    """pydantic's words for 1e30 in an integer field were "Unable to parse input string as an integer"."""
    body = b'{"model": "tiny-qwen", "messages": [{"role": "user", "content": "hi"}], "seed": ' + raw + b"}"
    err = _error(_post(live, content=body, headers={"Content-Type": "application/json"}))
    assert err["param"] == "seed" and "string" not in err["message"] and "integer" in err["message"], err


@pytest.mark.parametrize("raw, param", [
    (b'"temperature": NaN', "temperature"), (b'"temperature": Infinity', "temperature"),
    (b'"top_p": NaN', "top_p"), (b'"top_p": -Infinity', "top_p"),
])
def test_nan_and_infinity_are_400_as_no_finite_number(live, raw, param):
    """Python's json reads NaN/Infinity; NaN was refused as "less than or equal to 2"."""
    body = b'{"model": "tiny-qwen", "messages": [{"role": "user", "content": "hi"}], ' + raw + b"}"
    err = _error(_post(live, content=body, headers=JSON))
    assert err["param"] == param and "finite number" in err["message"], err


@pytest.mark.parametrize("kw, param", [
    (dict(stream="yes"), "stream"), (dict(stream=1), "stream"), (dict(max_tokens="4"), "max_tokens"),
    (dict(temperature="0.5"), "temperature"), (dict(temperature=True), "temperature"), (dict(n="1"), "n"),
    (dict(seed="7"), "seed"), (dict(logprobs="no"), "logprobs"),
    (dict(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
])
def test_strings_and_booleans_for_numbers_or_booleans_are_400(live, kw, param):
    """pydantic's lax mode took "yes" as true and "4" as 4 (OpenAI refuses both)."""
    err = _error(_post(live, _body(**kw)))
    assert err["param"] == param, err


def test_null_stream_is_openais_default(live):
    r = _post(live, _body(stream=None))
    assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text


@pytest.mark.parametrize("stop", [5, [5], [None], {"a": "b"}, ["a", ""], ["a"] * (MAX_STOP + 1)])
def test_a_bad_stop_is_400_naming_stop(live, stop):
    """A number was a 500 (list(5)); a list of numbers named the field "stop.str"."""
    err = _error(_post(live, _body(stop=stop)))
    assert err["param"] == "stop", err


# -- the body as a whole ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, headers, words", [
    (b"", JSON, "the request body is empty"),
    (b"[1, 2]", JSON, "must be a JSON object, got an array"),
    (b'"hi"', JSON, "must be a JSON object, got a string"),
    (b"null", JSON, "must be a JSON object, got null"),
    (json.dumps({"model": "tiny-qwen", "messages": HI}).encode(), {"Content-Type": "text/plain"},
     "Content-Type: application/json' (got 'text/plain')"),
    (json.dumps({"model": "tiny-qwen", "messages": HI}).encode(), {"Content-Type": "application/x-www-form-urlencoded"},
     "Content-Type: application/json"),
    (b'{"model": "tiny-qwen", "messages": [{"role": "user", "content": "\xff"}]}', JSON, "not valid UTF-8"),
    (b'{"model": ' + b"[" * 100000 + b"]" * 100000 + b"}", JSON, "nests too deeply"),
    (b'{"model": "tiny-qwen",', JSON, "not valid JSON: Expecting property name enclosed in double quotes at character"),
    (b'{"model": "tiny-qwen", "seed": 1' + b"0" * 5000 + b"}", JSON, "a number of more than 4300 digits"),
    (b'{"model": "tiny-qwen", "max_tokens": 4, "messages": [], "max_tokens": 400}', JSON,
     "names the key 'max_tokens' twice in one object"),
    (b'{"model": "tiny-qwen", "messages": [{"role": "user", "content": "a", "content": "b"}]}', JSON,
     "names the key 'content' twice in one object"),
], ids=["empty", "array", "string", "null", "text/plain", "form", "bad-utf8", "deep", "truncated", "digits",
        "repeated-key", "repeated-key-in-a-message"])
def test_a_body_that_is_no_json_object_says_why(live, content, headers, words):
    """These were "Field required" or "Input should be a valid dictionary" (no field named), or "There was an
    error parsing the body"; a repeated key ran with its last value, the client's other one dropped unsaid."""
    err = _error(_post(live, content=content, headers=headers))
    assert words in err["message"] and err["param"] is None, err


def test_a_compressed_body_is_415_naming_its_content_encoding(live):
    """A gzip body (Content-Encoding: gzip) was a 400 "the request body is not valid UTF-8 (invalid start byte at
    byte 1)", which named neither the encoding nor the fix."""
    import gzip

    body = json.dumps(_body()).encode()
    err = _error(_post(live, content=gzip.compress(body), headers={**JSON, "Content-Encoding": "gzip"}), 415)
    assert "'gzip'" in err["message"] and "uncompressed" in err["message"], err
    assert _post(live, content=body, headers={**JSON, "Content-Encoding": "identity"}).status_code == 200


def test_a_body_over_the_limit_is_413_and_the_server_goes_on(live):
    from finetune.serve.app import MAX_BODY_BYTES

    text = "x" * (MAX_BODY_BYTES + 1)
    err = _error(_post(live, {"model": "tiny-qwen", "messages": [{"role": "user", "content": text}]}), 413)
    assert err["code"] == "request_too_large", err

    def chunked():  # no Content-Length: refused once the chunks pass the limit
        yield b'{"model": "tiny-qwen", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY_BYTES // 2**20 + 1):
            yield b"x" * 2**20
        yield b'"}]}'

    assert _error(_post(live, content=chunked(), headers=JSON), 413)["code"] == "request_too_large"
    assert _post(live, _body()).status_code == 200


def test_head_answers_on_get_routes_and_405_names_the_allowed_methods(live):
    assert httpx.head(live.url + "/health", timeout=10).status_code == 200
    assert httpx.head(live.api_url + "/models", timeout=10).status_code == 200
    r = httpx.get(live.api_url + "/chat/completions", timeout=10)
    _error(r, 405)
    assert r.headers["allow"] == "POST"


def test_a_404_names_every_route_served(live):
    # it named the /v1 routes only, not GET /health or GET / (the chat page)
    from fastapi.routing import APIRoute

    from finetune.serve.app import create_app

    r = httpx.get(live.url + "/nonexistent", timeout=10)
    err = _error(r, 404)
    assert err["message"] == ("Invalid URL (GET /nonexistent): this server serves POST /v1/chat/completions, "
                              "POST /v1/completions, POST /v1/responses, GET /v1/responses/{response_id}, "
                              "DELETE /v1/responses/{response_id}, GET /v1/responses/{response_id}/input_items, "
                              "POST /v1/responses/{response_id}/cancel, GET /v1/models, GET /v1/models/{model}, "
                              "POST /tokenize, POST /detokenize, GET /health (the server's state), GET /metrics "
                              "(Prometheus') and GET / (the chat page)")
    # each route the app has (as create_app builds it), by method and path
    named = {item.partition(" (")[0] for item in re.split(r", | and ", err["message"].partition("serves ")[2])}
    served = {f"{method} {route.path.rstrip('/').replace('{name:path}', '{model}') or '/'}"
              for route in create_app(live.server).routes if isinstance(route, APIRoute)
              for method in route.methods - {"HEAD"}}
    assert served == named


def test_a_trailing_slash_elsewhere_is_a_404_error_object_not_a_redirect(live):
    """GET /health/ was a 307 to /health (Starlette's slash redirect): an empty answer to curl without -L, where
    every path but the two served with a slash is a 404 naming the routes served."""
    for method in ("GET", "HEAD"):
        r = httpx.request(method, live.url + "/health/", timeout=10)
        assert r.status_code == 404 and "location" not in r.headers, (method, r.status_code, r.headers)
    assert "GET /health" in _error(httpx.get(live.url + "/health/", timeout=10), 404)["message"]


def test_a_bug_is_still_an_openai_error_object(live, monkeypatch):
    def broken(turns, stats=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(live.server, "prompt_ids", broken)
    err = _error(_post(live, _body()), 500)
    assert err["type"] == "server_error" and "RuntimeError" in err["message"], err


# -- tools -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("function, param", [
    ({"name": "f", "parameters": "nope"}, "tools[0].function.parameters"),
    ({"name": "f", "parameters": [1]}, "tools[0].function.parameters[0]"),  # (a list: Qwen's parameter objects)
    ({"name": "f", "description": {"a": 1}}, "tools[0].function.description"),
    ({"name": "f\nAction: g"}, "tools[0].function.name"),
])
def test_a_function_definition_the_prompt_cannot_hold_is_400(live, function, param):
    err = _error(_post(live, _body(tools=[{"type": "function", "function": function}])))
    assert err["param"] == param, err


def test_a_function_name_given_twice_is_400_naming_the_second(live):
    # both definitions went into the ReAct prompt
    tools = [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]
    err = _error(_post(live, _body(tools=tools)))
    assert err["param"] == "tools[1].function.name" and "'f' is given twice (first at index 0)" in err["message"]
    err = _error(_post(live, _body(functions=[{"name": "g"}, {"name": "g"}])))
    assert err["param"] == "functions[1].name", err


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None},
                                     {"role": "system", "content": None}])
def test_a_message_without_content_is_400_naming_it(live, message):
    # a user message with no content was answered as an empty prompt
    err = _error(_post(live, _body(messages=[message, *HI] if message["role"] == "system" else [message])))
    assert err["param"] == "messages[0].content" and "needs its 'content'" in err["message"], err


def test_the_same_checks_name_the_legacy_functions_field(live):
    err = _error(_post(live, _body(functions=[{"name": "f", "parameters": "nope"}])))
    assert err["param"] == "functions[0].parameters", err


def test_thousands_of_tool_calls_are_matched_in_linear_time():
    """Each tool result rescanned and rebuilt the list of open calls: 30,000 calls in a 4 MB body cost 87 s of CPU.
    Counted, not timed: the id comparisons a result in reverse order costs."""
    from finetune import react

    compared = [0]

    class Id(str):
        def __eq__(self, other):
            compared[0] += 1
            return str.__eq__(self, other)

        __hash__ = str.__hash__

    n = 400
    calls = [{"id": Id(f"c{i}"), "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in range(n)]
    results = [{"role": "tool", "tool_call_id": Id(f"c{i}"), "content": f"r{i}"} for i in reversed(range(n))]
    msgs = react.canonical_messages([HI[0], {"role": "assistant", "content": "", "tool_calls": calls}, *results])
    assert compared[0] <= 2 * n, compared[0]
    # each call is followed by its own result
    assert [m.content for m in msgs[2::2]] == [f"r{i}" for i in range(n)]
    assert [m.function_call["name"] for m in msgs[1::2]] == ["f"] * n


def test_json_nested_past_pythons_recursion_limit_is_400(live):
    """Nesting the parser allowed could overflow the stack when the prompt wrote the JSON out again."""
    from finetune.serve.protocol import APIError, ChatCompletionRequest

    deep: dict = {}
    for _ in range(5000):
        deep = {"a": deep}
    body = ChatCompletionRequest(model="tiny-qwen", messages=HI,
                                 tools=[{"type": "function", "function": {"name": "f", "parameters": deep}}])
    with pytest.raises(APIError) as e:
        live.server.prepare(body)
    assert e.value.status == 400 and "too deeply" in e.value.message


# -- the API key -----------------------------------------------------------------------------------------------


def test_a_non_ascii_api_key_matches(live, monkeypatch):
    """Header values arrive decoded as Latin-1; the key was compared with its UTF-8 encoding and never matched."""
    monkeypatch.setattr(live.server, "api_key", "clé-ü")
    r = httpx.get(live.api_url + "/models", headers={"Authorization": "Bearer clé-ü".encode()}, timeout=10)
    assert r.status_code == 200, r.text
    r = httpx.get(live.api_url + "/models", headers={"Authorization": "Bearer cle-u"}, timeout=10)
    assert _error(r, 401)["code"] == "invalid_api_key"


@pytest.mark.parametrize("header, status, what", [
    # the scheme is case-insensitive (RFC 7235); blanks around the key do not count
    ("Bearer sk-KEY", 200, None), ("bearer sk-KEY", 200, None), ("BEARER sk-KEY", 200, None),
    ("Bearer   sk-KEY", 200, None), ("Bearer sk-KEY\t", 200, None),
    (None, 401, "missing"), ("Bearer", 401, "missing"), ("Bearer   ", 401, "missing"),
    # no scheme, another scheme, a tab for the space, two keys: as a wrong key
    ("sk-KEY", 401, "incorrect"), ("Basic c2stS0VZ", 401, "incorrect"), ("Bearer sk-KEYx", 401, "incorrect"),
    ("Bearer\tsk-KEY", 401, "incorrect"), ("Bearer sk-KEY, Bearer x", 401, "incorrect"),
    ("Token sk-KEY", 401, "incorrect"),
])
def test_authorization_header_forms(live, monkeypatch, header, status, what):
    """A "Bearer" with no key after it was an "incorrect API key" (it is missing: what OpenAI says too)."""
    import http.client

    monkeypatch.setattr(live.server, "api_key", "sk-KEY")
    conn = http.client.HTTPConnection(live.host, live.port, timeout=10)  # (httpx refuses a trailing blank)
    conn.putrequest("GET", "/v1/models")
    if header is not None:
        conn.putheader("Authorization", header)
    conn.endheaders()
    r = conn.getresponse()
    body = json.loads(r.read())
    conn.close()
    assert r.status == status, body
    if what:
        assert body["error"]["code"] == "invalid_api_key" and body["error"]["message"].startswith(what), body
        assert r.getheader("WWW-Authenticate") == "Bearer"


def test_the_key_is_checked_before_the_body_is_read(live, monkeypatch):
    """Without the key a body that is no JSON was a 400 and one over the limit a 413 (the body parsed or counted
    first): both are the 401, and the server answers the next request. With the key the body's own error stays."""
    from finetune.serve.app import MAX_BODY_BYTES

    monkeypatch.setattr(live.server, "api_key", "sk-KEY")
    for content in (b"{not json", b"x" * (MAX_BODY_BYTES + 1)):
        r = _post(live, content=content, headers=JSON)
        assert _error(r, 401)["code"] == "invalid_api_key" and r.headers["WWW-Authenticate"] == "Bearer"
    key = {**JSON, "Authorization": "Bearer sk-KEY"}
    assert "not valid JSON" in _error(_post(live, content=b"{not json", headers=key), 400)["message"]
    assert _post(live, _body(), headers=key).status_code == 200
    assert httpx.get(live.url + "/health", timeout=10).status_code == 200  # (no key needed outside /v1)


def _answer_before_the_body(live, headers: bytes) -> bytes:
    """What the server sends to a POST that declares a 20 MB body and waits for "100 Continue" before sending it
    (as curl does for a large upload): the bytes up to the end of the first response's head."""
    with socket.create_connection((live.host, live.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Expect: 100-continue\r\nContent-Length: 20000000\r\n" + headers + b"\r\n")
        got = b""
        while b"\r\n\r\n" not in got:
            piece = s.recv(4096)
            if not piece:
                break
            got += piece
    return got


def test_a_refused_upload_is_answered_without_asking_for_its_body(live, monkeypatch):
    """A client waiting for "100 Continue" got it, then uploaded up to 64 MiB, before its 401 or 413: the error is
    the first answer now, and the connection closes (the body was never sent)."""
    got = _answer_before_the_body(live, b"")  # no key needed here: over the size limit
    assert got.startswith(b"HTTP/1.1 413 ") and b"connection: close" in got.lower(), got[:300]
    monkeypatch.setattr(live.server, "api_key", "sk-KEY")
    got = _answer_before_the_body(live, b"")
    assert got.startswith(b"HTTP/1.1 401 ") and b"connection: close" in got.lower(), got[:300]
    assert _post(live, _body(), headers={**JSON, "Authorization": "Bearer sk-KEY"}).status_code == 200


@pytest.mark.parametrize("path, name", [
    ("tiny%2Fqwen", "tiny/qwen"), ("tiny-qwen%2F", "tiny-qwen/"), ("%2F", "/"), ("/tiny-qwen", "/tiny-qwen"),
    ("tiny-qwen/", "tiny-qwen/"), ("%C3%A9", "é"), ("%00", "\x00"), ("..%2F..%2Fetc", "../../etc"),
    ("%20tiny-qwen", " tiny-qwen"), ("x" * 20000, "x" * 200), ("%ED%A0%80", None), ("%FF", None),
])
def test_odd_model_ids_are_404_model_not_found(live, path, name):
    err = _error(httpx.get(live.api_url + "/models/" + path, timeout=10), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model", err
    if name is not None:
        assert repr(name) in err["message"], err
    if len(path) > 200:  # a long name is quoted by its start and its length
        assert "'... (20,000 characters) does not exist" in err["message"] and len(err["message"]) < 400, err
    assert httpx.get(live.api_url + "/models/tiny-qwen?x=%FF", timeout=10).json()["id"] == "tiny-qwen"


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"])
def test_unknown_methods_are_405_error_objects(live, method):
    r = httpx.request(method, live.api_url + "/chat/completions", timeout=10)
    assert _error(r, 405)["message"] == "Method Not Allowed" and r.headers["allow"] == "POST"
    r = httpx.request(method, live.api_url + "/models/tiny-qwen", timeout=10)
    assert _error(r, 405) and set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}


# -- the event loop and disconnects ----------------------------------------------------------------------------


def test_a_non_streamed_request_is_cancelled_when_its_client_disconnects(live):
    """Disconnects were only looked for when no token came for 0.5 s: a non-streamed request whose client left
    kept its row to max_tokens."""
    before = _wait_idle(live)["finished"]
    data = json.dumps(_body(max_tokens=1000, min_tokens=1000, temperature=1.0)).encode()
    with socket.create_connection((live.host, live.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        _wait_in_flight(live, 1)
    after = _wait_idle(live)["finished"]
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1, (before, after)
    assert after.get("length", 0) == before.get("length", 0), (before, after)


def test_a_queued_request_whose_client_disconnects_leaves_while_the_batch_stays_full(live):
    """A waiting request was dropped only when the batch changed: behind a full batch a queued client that had
    left kept its place (and its share of --max-queue, so new clients got 429) until a running request ended."""
    before = _wait_idle(live)["finished"]

    def send(body):
        data = json.dumps(body).encode()
        s = socket.create_connection((live.host, live.port), timeout=30)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        return s

    def wait_for(cond, what):
        for _ in range(1200):  # bounded: 60 s
            h = _health(live)
            if cond(h):
                return h
            time.sleep(0.05)
        raise AssertionError(f"{what} never came: {h}")

    runners = [send(_body(max_tokens=1000, min_tokens=1000, temperature=1.0)) for _ in range(2)]  # --max-batch 2
    try:
        wait_for(lambda h: h["running"] == 2, "two running requests")
        with send(_body()):
            wait_for(lambda h: h["waiting"] == 1, "a queued request")
        h = wait_for(lambda h: h["waiting"] == 0, "the queue's emptying")
        assert h["running"] == 2 and h["in_flight"] == 2, h  # the runners are still going
        assert h["finished"].get("cancelled", 0) == before.get("cancelled", 0) + 1, (before, h)
    finally:
        for s in runners:
            s.close()
    _wait_idle(live)


def test_building_a_prompt_does_not_block_the_event_loop(live, monkeypatch):
    """Tokenizing ran on the event loop: a big body stalled /health and every other client's stream meanwhile.
    Here the prompt building waits until /health has answered (bounded): on the event loop it never would."""
    entered, answered = threading.Event(), threading.Event()
    server = live.server
    build = server.prompt_ids

    def slow(turns, stats=None):
        entered.set()
        answered.wait(30)
        return build(turns, stats)

    monkeypatch.setattr(server, "prompt_ids", slow)
    out = {}
    t = threading.Thread(target=lambda: out.update(r=_post(live, _body())))
    t.start()
    try:
        assert entered.wait(30)
        assert _health(live)["status"] == "ok"
    finally:
        answered.set()
        t.join(60)
    assert out["r"].status_code == 200, out["r"].text


def test_a_long_stop_string_costs_nothing_per_token_while_nothing_matches():
    """Every token tried each tail of the text up to the longest stop string: a 1M-character stop string cost
    seconds of the event loop per token. Counted, not timed: the prefix tests per token."""
    from finetune.serve.textstream import TextStream
    from finetune.tokenization import SMALL_VOCAB, QWenTokenizer

    tested = [0]

    class Stop(str):
        def startswith(self, prefix, *args):
            tested[0] += 1
            return str.startswith(self, prefix, *args)

    tok = QWenTokenizer(str(SMALL_VOCAB))
    ids = tok.encode("hello world " * 100)
    stream = TextStream(tok, [Stop("z" * 100_000)])
    text = "".join(stream.feed([i]) for i in ids) + stream.finish()
    assert text == ("hello world " * 100).strip()
    assert tested[0] <= 4 * len(ids), tested[0]


# -- the engine failing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["_decode_forward", "step"])
def test_after_a_failed_engine_step_the_server_serves_again(live, where):
    """A step that raises (a bug, the GPU out of memory) ends the requests in flight with a 500 engine_error;
    the rows it held are freed and the next request decodes as before, with the same answer."""
    engine = live.server.worker.engine
    want = _post(live, _body(max_tokens=8, temperature=0)).json()["choices"][0]["message"]["content"]
    real = getattr(engine, where)
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # mid-request: after its prefill and a decode step
            raise RuntimeError("injected failure")
        return real(*a, **k)

    setattr(engine, where, failing)
    try:
        err = _error(_post(live, _body(max_tokens=50, min_tokens=50, temperature=0)), status=500)
        assert err["code"] == "engine_error" and "injected failure" in err["message"], err
    finally:
        delattr(engine, where)  # (the instance attribute set above; the class's method again)
    assert _wait_idle(live)["in_flight"] == 0
    again = _post(live, _body(max_tokens=8, temperature=0))
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == want


# -- browsers on other origins ---------------------------------------------------------------------------------


def test_cors_only_for_the_origins_given(live, tmp_path):
    """A web page on another origin calls the API only where --cors-origin allows it: the preflight (no key)
    and the request itself carry Access-Control-Allow-Origin for that origin, nothing for others; a server
    started without the flag sends none."""
    from finetune.demo import make_demo_model
    from finetune.serve.app import LEFT_OUT_HEADER
    from finetune.serve.background import serve_in_background
    from finetune.serve.cli import _parser, build_server

    page, other = "http://localhost:3000", "http://evil.example"
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(live.api_url + "/chat/completions", headers={"Origin": page, **preflight}, timeout=10)
    assert "access-control-allow-origin" not in r.headers  # (the module's server: no --cors-origin)
    model_dir = make_demo_model(tmp_path / "tiny-qwen", seed=1)
    args = _parser().parse_args(["-m", str(model_dir), "--cors-origin", page, "--api-key", "k"])
    with serve_in_background(build_server(args), start_timeout=30) as bg:
        r = httpx.options(bg.api_url + "/chat/completions", headers={"Origin": page, **preflight}, timeout=10)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = httpx.options(bg.api_url + "/chat/completions", headers={"Origin": other, **preflight}, timeout=10)
        assert r.headers.get("access-control-allow-origin") is None
        # refused as an OpenAI error object (it was Starlette's plain text "Disallowed CORS origin")
        assert _error(r, 400)["message"] == (f"CORS preflight from '{other}' refused: origin not allowed (allowed "
                                             f"origins: {page}; --cors-origin adds one)")
        r = httpx.post(bg.api_url + "/chat/completions", json=_body(), timeout=60,
                       headers={"Origin": page, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        # the headers a page may read: the history pairs a prompt left out among them (a page never saw it)
        assert {"retry-after", LEFT_OUT_HEADER.lower()} <= set(
            r.headers["access-control-expose-headers"].lower().split(", "))
        r = httpx.post(bg.api_url + "/chat/completions", json=_body(), timeout=60, headers={"Origin": page})
        assert r.status_code == 401  # the key is still required; CORS only lets the browser read the answer
        assert r.headers["access-control-allow-origin"] == page  # (errors are answers the page must read)

        def broken(turns, stats=None):
            raise RuntimeError("boom")

        bg.server.prompt_ids = broken  # a bug: its 500 came without the header, a network error to the page
        r = httpx.post(bg.api_url + "/chat/completions", json=_body(), timeout=60,
                       headers={"Origin": page, "Authorization": "Bearer k"})
        assert _error(r, 500)["type"] == "server_error" and r.headers["access-control-allow-origin"] == page


@pytest.mark.parametrize("raw", [b'"\\ud800model"', b'"x\xed\xa0\x80"'], ids=["escaped", "utf8-encoded"])
def test_a_field_name_with_a_lone_surrogate_is_400_naming_it(live, raw):
    """A top-level key holding a lone surrogate (as a JSON escape, or its UTF-8 bytes, which json.loads lets through
    alike) failed pydantic's validation at the body's root: the answer was "the request body must be a JSON object,
    got a string" (it is an object) and named no field."""
    content = b'{"model": "tiny-qwen", "messages": [{"role": "user", "content": "hi"}], ' + raw + b": 1}"
    err = _error(_post(live, content=content, headers=JSON))
    key = json.dumps(json.loads(b"{" + raw + b": 1}").popitem()[0])[1:-1]  # as JSON escapes it: "\\ud800model"
    assert err["param"] == key and "lone surrogate" in err["message"], err


@pytest.mark.parametrize("raw", [b'"hi \\ud800 there"', b'"hi \xed\xa0\x80"',
                                 b'[{"type": "text", "text": "a"}, {"type": "text", "text": "\\udfff"}]'],
                         ids=["escaped", "utf8-encoded", "in-a-part"])
def test_message_text_with_a_lone_surrogate_is_400_naming_the_message(live, raw):
    """A lone surrogate in a message's text (a broken \\u escape) was replaced with U+FFFD by the tokenizer and
    answered: the model was asked about text the client did not send. As the data pipeline refuses it in a record,
    the server answers 400 naming the message."""
    content = (b'{"model": "tiny-qwen", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": '
               + raw + b"}]}")
    err = _error(_post(live, content=content, headers=JSON))
    assert err["param"] == "messages[1].content" and "surrogate pair" in err["message"], err


@pytest.mark.parametrize("field, where", [
    ("model", "The model 'xxx"), ("tool_choice", "tool_choice 'xxx"), ("key", "\\ud800xxx"),
])
def test_errors_quote_a_long_client_value_by_its_start_and_length(live, field, where):
    """A 5 MB model name was a 5 MB 404: every value an error quotes is cut to its first 200 characters."""
    long = "x" * 1_000_000
    if field == "key":  # a field name with a lone surrogate is quoted as the JSON wrote it
        r = _post(live, content=b'{"\\ud800' + long.encode() + b'": 1}', headers=JSON)
    else:
        r = _post(live, _body(**{field: long}))
    err = _error(r, 404 if field == "model" else 400)
    assert where in err["message"] and "... (1,00" in err["message"], err["message"][:300]
    assert len(err["message"]) < 500 and len(err["param"]) < 300, err
