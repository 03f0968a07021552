"""The example data shipped in data/ is valid and shows every accepted form."""

from finetune.data import encode_conversation, load_records

from _helpers import ROOT

DATA = ROOT / "data"


def test_demo_memorize_set(data_small_tokenizer):
    recs = load_records(DATA / "demo_memorize.json")
    assert 10 <= len(recs) <= 16 and recs.report.skipped == 0
    assert len({r["id"] for r in recs}) == len(recs)
    assert any(len(r["messages"]) > 2 for r in recs)  # multi-turn
    assert any(r["system"] != "You are a helpful assistant." for r in recs)  # a custom system prompt
    replies = [m["content"] for r in recs for m in r["messages"] if m["role"] == "assistant"]
    assert len(set(replies)) == len(replies) and all(len(a.split()) < 15 for a in replies)
    for r in recs:
        assert len(encode_conversation(data_small_tokenizer, r)["input_ids"]) < 256


def test_example_chat_forms():
    recs = load_records(DATA / "example_chat.jsonl")
    assert len(recs) == 8 and recs.report.skipped == 0
    raw = (DATA / "example_chat.jsonl").read_text()
    assert '"messages"' in raw and '"human"' in raw and '"gpt"' in raw and '"conversations"' in raw
    assert '"weight": 0' in raw and '"type": "text"' in raw and '"instruction"' in raw  # OpenAI fine-tuning, Alpaca
    assert any(m.get("weight") == 0 for r in recs for m in r["messages"])
    assert '"completion"' in raw  # TRL's prompt-completion
    trl = next(r for r in recs if r.get("id") == "trl-1")
    assert [m["role"] for m in trl["messages"]] == ["user", "assistant"]
