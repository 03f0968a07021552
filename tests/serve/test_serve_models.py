"""finetune/serve/models.py: the served model, its base and adapters loaded under the names `--adapter NAME=DIR`
gives them, through `qwen-ft serve`'s own build_server and the HTTP API."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _helpers import random_adapter  # noqa: E402


def test_an_adapter_name_with_a_dot_serves_that_adapter(tmp_path):
    """NAME may hold "." (qwen-v1.5), which PyTorch refuses in the module names PEFT makes of it: the load was a
    KeyError traceback after the base had loaded. It answers as the adapter loaded the usual way."""
    import torch

    from finetune import load_model, load_tokenizer
    from finetune.demo import make_demo_model
    from finetune.serve.background import serve_in_background
    from finetune.serve.cli import _parser, build_server

    base = make_demo_model(tmp_path / "tiny-qwen", seed=0)
    adapter = random_adapter(base, tmp_path / "ad")
    args = _parser().parse_args(["-m", str(base), "--adapter", f"support-v1.5={adapter}",
                                 "--adapter", f"org/a.b:c={adapter}", "--max-batch", "2"])
    question = "What is the codename of project Aurora?"
    with serve_in_background(build_server(args), start_timeout=30) as live:
        client = openai.OpenAI(base_url=live.api_url, api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["tiny-qwen", "support-v1.5", "org/a.b:c"]
        assert client.models.retrieve("support-v1.5").id == "support-v1.5"
        replies = {name: client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=12,
        ).choices[0].message.content for name in ("tiny-qwen", "support-v1.5", "org/a.b:c")}
        with pytest.raises(openai.NotFoundError):  # the name as loaded is no second name of it
            client.chat.completions.create(model="support-v1\u20245", messages=[{"role": "user", "content": "x"}])
    tok = load_tokenizer(base)
    model = load_model(base, adapter=adapter, dtype=torch.float32, device="cpu")
    expected = model.chat(tok, question, do_sample=False, max_new_tokens=13)[0]  # (chat drops a cut reply's last)
    assert replies["support-v1.5"].startswith(expected) and replies["org/a.b:c"] == replies["support-v1.5"]
    assert replies["tiny-qwen"] != replies["support-v1.5"]


@pytest.mark.parametrize("given", [".", "./", "../tiny-qwen", "../tiny-qwen/", "{dir}", "{dir}/"])
def test_the_base_is_served_under_its_dir_name_however_the_dir_is_written(tmp_path, monkeypatch, given):
    """`qwen-ft serve -m .` in the model dir served the base as "" (/v1/models listed id "", and a request naming
    the model by its dir name was a 404 "served: ")."""
    from finetune.serve.models import base_name

    (tmp_path / "tiny-qwen").mkdir()
    monkeypatch.chdir(tmp_path / "tiny-qwen")
    assert base_name(given.format(dir=tmp_path / "tiny-qwen")) == "tiny-qwen"
    assert base_name("Qwen/Qwen-14B-Chat-Int4") == "Qwen-14B-Chat-Int4"  # a hub id: its last part
