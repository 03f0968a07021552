"""POST /tokenize and POST /detokenize (vLLM's) on the tiny demo model: messages count as the chat route's prompt,
a prompt text as /v1/completions reads it, ids decode back to their text, and each refusal names its field."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _helpers import demo_server  # noqa: E402

KEY = "tok-key"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4."}, {"role": "user", "content": "And <|im_end|> 3 + 3?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with demo_server(tmp_path_factory, "serve_tokenizing", "--max-batch", "2", "--max-model-len", "512",
                     "--api-key", KEY) as bg:
        yield bg


def _post(live, path, body, key=KEY):
    return httpx.post(live.url + path, json=body, headers={"Authorization": f"Bearer {key}"} if key else {},
                      timeout=30)


def _ok(live, path, body) -> dict:
    r = _post(live, path, body)
    assert r.status_code == 200, r.text
    return r.json()


def _error(live, path, body, status=400, key=KEY) -> dict:
    r = _post(live, path, body, key)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert "\n" not in err["message"]
    return err


def _chat_usage(live, **kw) -> int:
    client = openai.OpenAI(base_url=live.api_url, api_key=KEY, timeout=60, max_retries=0)
    r = client.chat.completions.create(model="tiny-qwen", temperature=0, max_tokens=1, **kw)
    return r.usage.prompt_tokens


def test_messages_count_as_the_chat_routes_prompt(live):
    from finetune.serve.protocol import ChatCompletionRequest

    out = _ok(live, "/tokenize", {"model": "tiny-qwen", "messages": MESSAGES})
    ids, _ = live.server.prompt(ChatCompletionRequest(model="tiny-qwen", messages=MESSAGES))
    assert out["tokens"] == ids and out["count"] == len(ids) == _chat_usage(live, messages=MESSAGES)
    assert out["max_model_len"] == 512 and out["token_strs"] is None
    # the content's control-token text stays text: one <|im_end|> closes each of the four turns, none comes from it
    im_end = live.server.tokenizer.im_end_id
    assert out["tokens"].count(im_end) == 4


def test_tools_are_laid_out_as_the_chat_route_lays_them_out(live):
    plain = _ok(live, "/tokenize", {"messages": MESSAGES[1:2]})
    with_tools = _ok(live, "/tokenize", {"messages": MESSAGES[1:2], "tools": TOOLS})
    assert with_tools["count"] > plain["count"]  # (the ReAct instructions)
    assert with_tools["count"] == _chat_usage(live, messages=MESSAGES[1:2], tools=TOOLS)


def test_a_prompt_counts_as_completions_read_it_and_decodes_back(live):
    chatml = "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    out = _ok(live, "/tokenize", {"prompt": chatml, "return_token_strs": True})
    tok = live.server.tokenizer
    assert out["tokens"][0] == tok.im_start_id and out["tokens"].count(tok.im_end_id) == 1
    assert "".join(out["token_strs"]) == chatml
    client = openai.OpenAI(base_url=live.api_url, api_key=KEY, timeout=60, max_retries=0)
    r = client.completions.create(model="tiny-qwen", prompt=chatml, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == out["count"]
    assert _ok(live, "/detokenize", {"model": "tiny-qwen", "tokens": out["tokens"]}) == {"prompt": chatml}


@pytest.mark.parametrize("path, body, field", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "messages"),
    ("/tokenize", {"model": "tiny-qwen"}, "prompt"),
    ("/tokenize", {"prompt": "a", "tools": TOOLS}, "tools"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "b"}]}, "messages[0].role"),
    ("/tokenize", {"prompt": "a", "return_token_strs": "yes"}, "return_token_strs"),
    ("/tokenize", {"messages": [{"role": "user", "content": "b"}], "continue_final_message": True},
     "continue_final_message"),
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens"),
    ("/detokenize", {"tokens": "12"}, "tokens"),
    ("/detokenize", {"tokens": [5, "12"]}, "tokens[1]"),
    ("/detokenize", {"tokens": [True]}, "tokens[0]"),
])
def test_a_bad_body_is_a_400_naming_the_field(live, path, body, field):
    err = _error(live, path, body)
    assert err["param"] == field, err


def test_an_unknown_model_is_a_404_and_the_key_is_required(live):
    assert _error(live, "/tokenize", {"model": "gpt-4", "prompt": "a"}, 404)["code"] == "model_not_found"
    assert _error(live, "/detokenize", {"model": "gpt-4", "tokens": [1]}, 404)["code"] == "model_not_found"
    assert _error(live, "/tokenize", {"prompt": "a"}, 401, key=None)["code"] == "invalid_api_key"
    assert _error(live, "/detokenize", {"tokens": [1]}, 401, key="wrong")["code"] == "invalid_api_key"
