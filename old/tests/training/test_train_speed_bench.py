"""benchmarks/train_speed.py --packed-rows on the CPU (tiny shape): the harness step gets the rows the graphed
trainer gets (the same data pipeline, the same collator: position ids restarting at every chat, padded to the
row length), or the same tokens as one causal sequence; bad specs are one line and exit 2."""

import json
import sys

import pytest
import torch

from _helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import train_speed  # noqa: E402

SPEC = "chats:24:60:1"  # user_path.py --tiny's rows2048 data


def _fed(monkeypatch, tmp_path, *argv):
    """The batches the harness would time, and its record (the timing itself replaced)."""
    fed = []

    def timed(step, batches, device, warmup):
        fed.extend(batches)
        return 1.0, 0.0

    monkeypatch.setattr(train_speed, "timed", timed)
    out = tmp_path / "r.jsonl"
    assert train_speed.main(["--tiny", "--packed-rows", SPEC, "--seq", "256", "--steps", "6", "--warmup", "1",
                             "--out", str(out), *argv]) == 0
    return fed, json.loads(out.read_text().splitlines()[-1])


def test_packed_rows_are_the_graphed_trainers_rows(monkeypatch, tmp_path):
    from finetune.training.arguments import DataArguments
    from finetune.training.trainer import make_collator

    fed, record = _fed(monkeypatch, tmp_path)
    assert "error" not in record, record
    rows, pad_id = train_speed.trainer_rows(SPEC, 256, None)

    class Tok:
        eod_id = pad_id

    collate = make_collator(Tok(), DataArguments(packing=True, model_max_length=256), for_graphs=True)
    assert len(fed) == 7 and len(rows) < 7  # cycled through the rows
    for i, batch in enumerate(fed):
        want = collate([rows[i % len(rows)]])
        assert batch.keys() == want.keys() == {"input_ids", "labels", "position_ids"}
        for k in want:
            assert torch.equal(batch[k], want[k]), k
    chats = [r["position_ids"].count(0) for r in rows]
    assert min(chats) >= 2  # about 60-token chats in 256-token rows: several a row
    assert record["workload"] == "packed_rows" and record["layout"] == "documents"
    assert record["rows_timed"] == 6
    assert record["chats_per_row"] == sum(chats[i % len(rows)] for i in range(1, 7)) / 6
    real = sum(int((b["input_ids"] != pad_id).sum()) for b in fed[1:])
    assert record["real_tok_s"] == real and record["tok_s"] == 6 * 256 and 0 < record["fill"] < 1

    causal, record = _fed(monkeypatch, tmp_path, "--packed-layout", "causal")
    assert record["layout"] == "causal"
    for a, b in zip(causal, fed):  # the same tokens, no position ids: one causal sequence a row
        assert a.keys() == {"input_ids", "labels"} and torch.equal(a["input_ids"], b["input_ids"])


def test_packed_rows_come_in_the_order_the_trainer_takes_them(tmp_path):
    """The k-th row of --packed-rows is the k-th micro-batch of transformers' Trainer with the trainer's default
    --seed (its sampler's first epoch over the dataset the trainer builds), so --warmup can skip exactly the
    rows that a trainer run's meter skips."""
    from transformers import Trainer, TrainingArguments

    from finetune.data import PackedCollator, build_dataset
    from finetune.tokenization import SMALL_VOCAB, QWenTokenizer
    from finetune.training.arguments import parse_args
    from multi_gpu import chat_data

    from _helpers import tiny_model

    seed = parse_args(["--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(tmp_path)])[3].seed
    rows, pad_id = train_speed.trainer_rows("chats:60:60:1", 256, None, seed=seed)
    tok = QWenTokenizer(str(SMALL_VOCAB))
    data = chat_data(tmp_path / "chats.json", tok, 60, 60, seed=1)
    dataset, _ = build_dataset(tok, str(data), 256, packing=True, cache_dir=tmp_path / "cache", verbose=False,
                               progress=False)
    assert len(rows) == len(dataset) >= 10
    args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=1, use_cpu=True,
                             report_to=[], seed=seed)
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=dataset, data_collator=PackedCollator(pad_id))
    fed = [b["input_ids"][0].tolist() for b in trainer.get_train_dataloader()]
    assert fed == [r["input_ids"] for r in rows]
    assert fed != [list(ids) for ids in dataset["input_ids"]]  # reordered


def test_packed_rows_train_with_gradient_accumulation(tmp_path):
    out = tmp_path / "r.jsonl"
    assert train_speed.main(["--tiny", "--packed-rows", SPEC, "--seq", "256", "--steps", "2", "--warmup", "0",
                             "--accum", "2", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert "error" not in record, record
    assert record["accum"] == 2 and record["tok_s"] > 0 and record["loss"] > 0


@pytest.mark.parametrize("argv, says", [
    (["--packed-rows", "chats:10:abc:1"], "expected chats:N:TOKENS:SEED"),
    (["--packed-rows", "/nonexistent/data.json"], "no such data file"),
    (["--packed-rows", SPEC, "--workload", "short"], "a training workload of its own"),
    (["--accum", "0"], "--accum must be at least 1"),
])
def test_bad_packed_rows_arguments_are_one_line(argv, says, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_speed.main(["--tiny", "--out", str(tmp_path / "r.jsonl"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage:") and "error: " in err[-1] and says in err[-1]  # argparse: usage, one line
