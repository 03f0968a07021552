"""The fast paths of build_dataset (Arrow packing, batched encoding) give the rows the reference code gives:
encode_conversation record by record, then pack_batch block by block; and the same rows as before they came
(a digest of a varied corpus's rows, taken with the code before them)."""

import hashlib
import json
import random

import pytest

pytest.importorskip("datasets")

from finetune.data import IGNORE, build_dataset, encode_conversation, normalize_record  # noqa: E402
from finetune.data import dataset as dataset_mod  # noqa: E402
from finetune.data import packing  # noqa: E402
from finetune.data.packing import pack_batch  # noqa: E402

WEATHER = {"name": "get_weather", "description": "Weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TEXTS = ["Explain rotary embeddings briefly.", "请解释一下注意力机制是如何工作的。", "東京の天気は晴れです。",
         "Модель учится на примерах.", "```python\ndef f(x):\n    return x * 2\n```\n",
         "literal <|im_end|> and <|endoftext|> and <|im_start|>assistant in text", "emoji 🙂👍🏽 and e\u0301 (NFC)",
         "tabs\tand\r\nnewlines\n\n- a list\n- of items", "SELECT a, COUNT(*) FROM t GROUP BY a;"]


def varied_corpus(n: int, seed: int = 7) -> list:
    """Every record form the reader takes, several languages, control-token text, tool calls, weight 0,
    replies long enough to be truncated, prompts too long to train, and a few invalid records."""
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(TEXTS) for _ in range(k))

    out = []
    for i in range(n):
        kind = i % 9
        if kind == 0:
            out.append({"id": i, "conversations": [{"from": "user", "value": text(2)},
                                                   {"from": "assistant", "value": text(rng.randint(1, 30))}]})
        elif kind == 1:
            out.append({"messages": [{"role": "system", "content": "你是一个助手。"},
                                     {"role": "user", "content": text(1)}, {"role": "assistant", "content": text(3)},
                                     {"role": "user", "content": text(2)},
                                     {"role": "assistant", "content": text(rng.randint(1, 60))}]})
        elif kind == 2:
            out.append({"tools": [{"type": "function", "function": WEATHER}], "messages": [
                {"role": "user", "content": "Weather in 北京? " + text(1)},
                {"role": "assistant", "content": "I need the weather.", "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny <|im_end|> 21C"},
                {"role": "assistant", "content": text(2)}]})
        elif kind == 3:
            out.append({"instruction": text(1), "input": text(1), "output": text(rng.randint(1, 8)),
                        "history": [[text(1), text(1)]], "system": "Be terse."})
        elif kind == 4:
            out.append({"messages": [{"role": "user", "content": text(1)},
                                     {"role": "assistant", "content": text(2), "weight": 0},
                                     {"role": "user", "content": text(1)},
                                     {"role": "assistant", "content": text(4)}]})
        elif kind == 5:
            out.append({"messages": [{"role": "user", "content": text(rng.choice([1, 40]))},  # 40: too long
                                     {"role": "assistant", "content": text(2)}]})
        elif kind == 6 and i % 4 == 2:
            out.append({"messages": [{"role": "assistant", "content": "starts with a reply"}]})  # invalid
        else:
            turns = []
            for _ in range(rng.randint(1, 4)):
                turns += [{"from": "human", "value": text(rng.randint(1, 5))},
                          {"from": "gpt", "value": text(rng.randint(1, 12))}]
            out.append({"conversations": turns})
    return out


def reference_rows(tok, records, max_len, packed):
    """What the code before the fast paths gave: each valid record through encode_conversation, records with
    nothing to train dropped, then (packed) pack_batch over blocks of PACK_BLOCK."""
    ids, labels = [], []
    for r in records:
        try:
            normalize_record(r)
        except ValueError:
            continue
        e = encode_conversation(tok, r, max_len)
        if any(x != IGNORE for x in e["labels"]):
            ids.append(e["input_ids"])
            labels.append(e["labels"])
    if not packed:
        return {"input_ids": ids, "labels": labels, "length": [len(x) for x in ids]}
    out = {}
    for s in range(0, len(ids), packing.PACK_BLOCK):
        part = pack_batch({"input_ids": ids[s:s + packing.PACK_BLOCK], "labels": labels[s:s + packing.PACK_BLOCK]},
                          max_len)
        for k, v in part.items():
            out.setdefault(k, []).extend(v)
    return out


def rows_digest(ds) -> str:
    h = hashlib.sha256()
    for col in sorted(ds.column_names):
        h.update(json.dumps([col, ds[col][:]]).encode())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("procs", [None, 2])
@pytest.mark.parametrize("packed", [True, False])
def test_rows_equal_the_reference_path(data_real_tokenizer, tmp_path, monkeypatch, procs, packed):
    tok = data_real_tokenizer
    monkeypatch.setattr(packing, "PACK_BLOCK", 23)  # several blocks, one split between two worker shards
    monkeypatch.setattr(dataset_mod, "PACK_BLOCK", 23)
    records = varied_corpus(150)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    ds, summary = build_dataset(tok, path, 256, packing=packed, skip_invalid=True, num_proc=procs,
                                cache_dir=tmp_path / "c", verbose=False)
    want = reference_rows(tok, records, 256, packed)
    assert summary.records_skipped > 0 and summary.truncated > 0  # the corpus reaches those paths
    assert sorted(ds.column_names) == sorted(want)
    for col in want:
        assert ds[col][:] == want[col], col


# Digests of build_dataset's rows of varied_corpus(300) (real vocabulary, max_len 256, skip_invalid), taken
# with the code before the Arrow packing and the batched encoding (8e99379).
BEFORE = {True: "cedb45c06414ef9b", False: "5b2cc787a6d3b235"}


@pytest.mark.parametrize("packed", [True, False])
def test_rows_are_those_before(data_real_tokenizer, tmp_path, packed):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(varied_corpus(300), ensure_ascii=False), encoding="utf-8")
    ds, _ = build_dataset(data_real_tokenizer, path, 256, packing=packed, skip_invalid=True, cache_dir=tmp_path,
                          verbose=False)
    assert rows_digest(ds) == BEFORE[packed]
