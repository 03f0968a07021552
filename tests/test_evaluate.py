"""`qwen-ft eval`: metrics on hand examples, the loss with training masks, left-padded batched generation,
prompts built as make_context builds them (tool records as the server prompts them), and the base-vs-adapter
report."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import finetune  # noqa: F401
from finetune import load_model, load_tokenizer
from finetune.demo import make_demo_model
from finetune.evaluate import eval_loss, evaluate_model, generate_batch, generation_prompt
from finetune.metrics import exact_match, lcs_length, rouge_l, rouge_tokens

from _helpers import MEMORISE, memorise_records, write_memorise, train_adapter





# -- metrics on hand examples ---------------------------------------------------------------------------


def test_rouge_tokens():
    assert rouge_tokens("  the  cat\nsat ") == ["the", "cat", "sat"]
    assert rouge_tokens("Qwen模型 is good") == ["Qwen", "模", "型", "is", "good"]
    assert rouge_tokens("我喜欢猫。") == ["我", "喜", "欢", "猫", "。"]
    assert rouge_tokens("ＡＢＣ") == ["ABC"]  # NFKC: full-width -> ASCII
    # Han ideographs past plane 2 too (CJK ext G and H, plane 3): one token each (a run of them was one token)
    assert rouge_tokens("\U00030000\U00030001\U00031350") == ["\U00030000", "\U00030001", "\U00031350"]


def test_lcs_and_rouge_l_by_hand():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    # LCS("the cat sat on the mat", "the cat on the mat") = 5; P = 5/6, R = 5/5 -> F1 = 10/11
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    # CJK per character: 3 of 4 characters in order -> P = R = 3/4
    assert rouge_l("我喜欢猫", "我喜欢狗") == pytest.approx(0.75)
    # order matters (subsequence, not bag of words): LCS("a b c", "c b a") = 1 -> F1 = 1/3
    assert rouge_l("a b c", "c b a") == pytest.approx(1 / 3)
    assert rouge_l("Blue Falcon.", "Blue Falcon.") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0 and rouge_l("x", "y") == 0.0


def test_exact_match_by_hand():
    assert exact_match("  Blue   Falcon. ", "Blue Falcon.") == 1.0
    assert exact_match("blue falcon.", "Blue Falcon.") == 0.0  # case kept
    assert exact_match("Blue Falcon", "Blue Falcon.") == 0.0  # punctuation kept
    assert exact_match("你好", "你好") == 1.0


# -- model-level ------------------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    fl = make_demo_model(root / "float")
    data = root / "mem.json"
    records = memorise_records()
    write_memorise(data)
    lora = train_adapter(fl, data, root / "lora", 50)
    held = root / "held.json"  # not the training data (which eval warns about): three of its four records
    held.write_text(json.dumps(records[1:]))
    return {"root": root, "float": fl, "data": data, "lora": lora, "records": records, "held": held,
            "tok": load_tokenizer(fl)}


def test_loss_uses_training_masks(setup):
    from finetune.data import encode_conversation

    model = load_model(setup["float"], dtype=torch.float32, device="cpu")
    tok = setup["tok"]
    multi = {"system": "Be brief.", "conversations": [
        {"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello there"},
        {"from": "user", "value": "and?"}, {"from": "assistant", "value": "nothing more"}]}
    records = setup["records"] + [multi]
    got = eval_loss(model, tok, records, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:  # one row at a time, no padding, plain cross-entropy over the trained labels
            enc = encode_conversation(tok, r)
            ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor(enc["labels"])
            lg = model(input_ids=ids).logits[0, :-1].float()
            y = labels[1:]
            keep = y != -100
            total += float(F.cross_entropy(lg[keep], y[keep], reduction="sum"))
            count += int(keep.sum())
    assert got["tokens"] == count and got["records"] == 5
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_generation_prompt_is_make_context(setup):
    from finetune.modeling import make_context

    tok = setup["tok"]
    rec = {"system": "Be brief.", "conversations": [
        {"from": "user", "value": "q1"}, {"from": "assistant", "value": "a1"},
        {"from": "user", "value": "q2"}, {"from": "assistant", "value": "a2"}]}
    tokens, ref = generation_prompt(tok, rec)
    assert ref == "a2"
    assert tokens == make_context(tok, "q2", history=[("q1", "a1")], system="Be brief.")[1]


def test_left_padded_batch_equals_one_by_one(setup):
    model = load_model(setup["float"], adapter=setup["lora"], dtype=torch.float32, device="cpu")
    tok = setup["tok"]
    records = setup["records"] + [{"conversations": [{"from": "user", "value": "A much longer question, with "
                                                      "many more words than the others have, to pad them?"},
                                                     {"from": "assistant", "value": "x"}]}]
    contexts = [generation_prompt(tok, r)[0] for r in records]
    assert len({len(c) for c in contexts}) > 1
    batched = generate_batch(model, tok, contexts, max_new_tokens=12)
    single = [generate_batch(model, tok, [c], max_new_tokens=12)[0] for c in contexts]
    assert batched == single
    assert batched[:4] == [a for _, a in MEMORISE]


def test_base_vs_adapter_report(setup):
    model = load_model(setup["float"], adapter=setup["lora"], dtype=torch.float32, device="cpu")
    report = evaluate_model(model, setup["tok"], setup["records"], batch_size=3, max_new_tokens=16)
    base_only = evaluate_model(load_model(setup["float"], dtype=torch.float32, device="cpu"), setup["tok"],
                               setup["records"], batch_size=3, max_new_tokens=16)
    assert set(report) == {"base", "adapter", "samples"}
    for key in ("loss", "perplexity", "tokens", "records", "exact_match", "rouge_l", "generated"):
        assert key in report["base"] and key in report["adapter"], key
    assert report["adapter"]["exact_match"] == 1.0 and report["adapter"]["rouge_l"] == 1.0
    assert report["adapter"]["loss"] < report["base"]["loss"]
    # the base numbers under disable_adapter() are the plain base model's
    assert report["base"]["loss"] == pytest.approx(base_only["base"]["loss"], rel=1e-6)
    assert [s["base"] for s in report["samples"]] == [s["base"] for s in base_only["samples"]]
    assert report["samples"][0]["reference"] == MEMORISE[0][1] and report["samples"][0]["adapter"] == MEMORISE[0][1]


def test_eval_base_replies_are_the_base_models_and_both_generators_agree(setup):
    """The "base" column of an eval with an adapter: the replies of the model loaded WITHOUT the adapter (here
    through transformers' generate(), so the engine's per-row adapter switching is checked against an
    independent path); the adapter column is the same through the engine and through generate()."""
    from finetune.evaluate import generate_replies

    records = setup["records"] + [{"conversations": [{"from": "user", "value": "Tell me about the gates, please."},
                                                      {"from": "assistant", "value": "x"}]}]
    with_adapter = load_model(setup["float"], adapter=setup["lora"], dtype=torch.float32, device="cpu")
    report = evaluate_model(with_adapter, setup["tok"], records, batch_size=3, max_new_tokens=16, gen_batch_size=4)
    plain = load_model(setup["float"], dtype=torch.float32, device="cpu")
    contexts = [generation_prompt(setup["tok"], r)[0] for r in records]
    assert [s["base"] for s in report["samples"]] == generate_replies(plain, setup["tok"], contexts, 3, 16)
    assert [s["base"] for s in report["samples"]] != [s["adapter"] for s in report["samples"]]
    old = evaluate_model(with_adapter, setup["tok"], records, batch_size=3, max_new_tokens=16, generator="generate")
    assert [s["adapter"] for s in old["samples"]] == [s["adapter"] for s in report["samples"]]
    assert [s["base"] for s in old["samples"]] == [s["base"] for s in report["samples"]]


def test_eval_cli(setup, tmp_path, capsys):
    out = tmp_path / "report.json"
    from finetune.cli import main

    rc = main(["eval", "--adapter", str(setup["lora"]), "--data", str(setup["data"]), "--max-new-tokens", "16",
               "--batch-size", "2", "--max-samples", "3", "--output", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "ROUGE-L" in stdout and "adapter" in stdout and "perplexity" in stdout
    report = json.loads(out.read_text())
    assert report["records"] == 3 and report["settings"]["generator"] == "engine"
    assert report["adapter"]["exact_match"] == 1.0 and len(report["samples"]) == 3
    assert report["model"] == str(setup["float"])  # the base recorded in the adapter


def test_eval_says_which_records_the_loss_leaves_out_or_truncates(setup, tmp_path, capsys):
    """A record whose prompt fills --max-len was dropped from the loss, and a long one cut, without a word."""
    from finetune.cli import main

    data = tmp_path / "heldout.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 80}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report.json"
    assert main(["eval", "-m", str(setup["float"]), "--data", str(data), "--max-len", "48", "--no-generate",
                 "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert (f"note: the loss leaves out 1 of 3 records (no reply token within max_len 48: the prompt fills it; the "
            f"first: {data}, record 2, line 2) and scores 1 record truncated to max_len 48; --max-len sets "
            "max_len\n") in err
    # of several files, the file and the record's number in it (it was the list and the number in the whole set)
    other = tmp_path / "first.jsonl"
    other.write_text(json.dumps(rows[0]) + "\n")
    assert main(["eval", "-m", str(setup["float"]), "--data", f"{other},{data}", "--max-len", "48",
                 "--no-generate"]) == 0
    assert f"the first: {data}, record 2, line 2)" in capsys.readouterr().err
    base = json.loads(out.read_text())["base"]
    assert (base["records"], base["left_out"], base["first_left_out"], base["truncated"]) == (2, 1, 1, 1)
    assert main(["eval", "-m", str(setup["float"]), "--data", str(data), "--max-len", "4096", "--no-generate"]) == 0
    assert "note:" not in capsys.readouterr().err
    # a --max-len past seq_length (256) scored a 400-token record at positions the model never trained on, unsaid
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "word " * 400}]}) + "\n")
    assert main(["eval", "-m", str(setup["float"]), "--data", str(data), "--max-len", "1024", "--no-generate"]) == 0
    err = capsys.readouterr().err
    assert "note: the loss scores positions past the model's seq_length 256 (the longest scored record is " in err
    assert "which it was not trained on; --max-len 256 truncates them" in err


def test_eval_cli_prints_no_weight_loading_bar(setup, capsys):
    # chat and merge turned transformers' "Loading weights" bar off; eval printed it over its table
    from transformers.utils import logging as hf_logging

    from finetune.cli import main

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # another test's chat or merge may have turned it off in this process
    try:
        assert main(["eval", "--adapter", str(setup["lora"]), "--data", str(setup["data"]), "--no-generate"]) == 0
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
    assert "Loading weights" not in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--max-samples", "-1"], "--max-samples must be >= 1, got -1"),  # (was records[:-1]: the last one dropped)
    (["--max-samples", "0"], "--max-samples must be >= 1, got 0"),
    (["--max-len", "1"], "--max-len 1 is too small"),
    # the engine's SamplingParams refused these with a traceback, after the model had loaded
    (["--repetition-penalty", "nan"], "--repetition-penalty must be a finite number > 0, got nan"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be a finite number > 0, got 0.0"),
])
def test_eval_flags_out_of_range_are_one_line(setup, capsys, flags, message):
    from finetune.cli import main

    assert main(["eval", "--adapter", str(setup["lora"]), "--data", str(setup["data"]), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_eval_output_that_cannot_be_written_is_refused_before_loading(setup, tmp_path, capsys, monkeypatch):
    # was IsADirectoryError / FileExistsError from writing the report, after the whole evaluation
    import finetune.loading
    from finetune.cli import main

    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for output, message in ((tmp_path, "is a directory"), (a_file / "sub" / "r.json", f"{a_file} is a file")):
        assert main(["eval", "--adapter", str(setup["lora"]), "--data", str(setup["data"]),
                     "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --output {output}: ") and message in err and err.count("\n") == 1, err


def test_a_prompt_the_model_cannot_hold_is_refused_before_loading(setup, tmp_path, capsys, monkeypatch):
    # the engine was sized for the longest prompt and prefilled it whole: a held-out record of a few MB hung the CPU
    # (out of memory on a GPU) after the model loaded and the loss was computed
    import finetune.loading
    from finetune.cli import main

    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    data = tmp_path / "long.jsonl"
    long = {"conversations": [{"from": "user", "value": "word " * 2000}, {"from": "assistant", "value": "ok"}]}
    data.write_text("\n".join(json.dumps(r) for r in [*memorise_records(), long]) + "\n")
    assert main(["eval", "-m", str(setup["float"]), "--data", str(data), "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --data {data}, record 5, line 5: prompt too long: ") and err.count("\n") == 1, err
    assert "at most 1024" in err and "--max-new-tokens 4" in err


def _model_with_window(src, dst, window):
    """A copy of the model dir ``src`` whose generation_config.json sets max_window_size ``window``."""
    import shutil

    shutil.copytree(src, dst)
    gen = json.loads((dst / "generation_config.json").read_text())
    (dst / "generation_config.json").write_text(json.dumps({**gen, "max_window_size": window}))
    return dst


def test_each_records_generation_prompt_is_built_once_at_the_models_window(setup, tmp_path, capsys, monkeypatch):
    """The length check before loading and the generation after it read one prompt per record (each was built twice:
    the check read the window from generation_config.json itself, main from the loaded model's config)."""
    import finetune.evaluate
    from finetune.cli import main

    model = _model_with_window(setup["float"], tmp_path / "model", 4000)
    built = []
    real = finetune.evaluate.generation_prompt

    def counted(tokenizer, record, max_window_size=6144, **kwargs):
        built.append((record["messages"][-2]["content"], max_window_size))
        return real(tokenizer, record, max_window_size, **kwargs)

    monkeypatch.setattr(finetune.evaluate, "generation_prompt", counted)
    out = tmp_path / "report.json"
    assert main(["eval", "-m", str(model), "--data", str(setup["data"]), "--max-new-tokens", "4",
                 "--output", str(out)]) == 0
    queries = [q for q, _ in MEMORISE]
    assert sorted(built) == sorted((q, 4000) for q in queries)
    assert [s["query"] for s in json.loads(out.read_text())["samples"]] == queries


def test_prompts_that_leave_out_earlier_turns_over_the_window_are_said_and_counted(setup, tmp_path, capsys):
    """A record whose history is over the model's max_window_size is prompted without its oldest turns (as chat and
    the server prompt it): a note line names how many records and the first, and the report counts them. (Their
    replies were scored against the whole conversation's answer with nothing said.)"""
    from finetune.cli import main

    model = _model_with_window(setup["float"], tmp_path / "model", 40)
    long = {"conversations": [{"from": "user", "value": "word " * 40}, {"from": "assistant", "value": "ok"},
                              {"from": "user", "value": "and?"}, {"from": "assistant", "value": "done"}]}
    data = tmp_path / "held.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [*memorise_records()[:2], long]) + "\n")
    out = tmp_path / "report.json"
    for m, cut in ((model, 1), (setup["float"], 0)):
        assert main(["eval", "-m", str(m), "--data", str(data), "--max-new-tokens", "2", "--output", str(out)]) == 0
        notes = [line for line in capsys.readouterr().err.splitlines() if "leave out their oldest turns" in line]
        assert json.loads(out.read_text())["history_cut"] == cut
        if cut:
            assert notes == [f"note: the generation prompts of 1 of 3 records leave out their oldest turns (1 "
                             f"user/assistant pair; the first: {data}, record 3, line 3), over max_window_size 40 of "
                             "the model's generation config, as chat and the server leave them out: those replies "
                             "answer without them"]
        else:
            assert notes == []


def test_the_base_and_adapter_columns_score_one_encoding_of_each_record(setup, tmp_path, monkeypatch):
    """With an adapter the loss is computed twice (base and adapter); the records were encoded for each."""
    import finetune.data
    from finetune.cli import main

    encoded = []
    real = finetune.data.encode_conversation_info

    def counted(tokenizer, record, **k):
        encoded.append(record["messages"][-2]["content"])
        return real(tokenizer, record, **k)

    monkeypatch.setattr(finetune.data, "encode_conversation_info", counted)
    out = tmp_path / "report.json"
    assert main(["eval", "--adapter", str(setup["lora"]), "--data", str(setup["data"]), "--max-new-tokens", "2",
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert sorted(encoded) == sorted(q for q, _ in MEMORISE)
    assert report["base"]["records"] == report["adapter"]["records"] == len(MEMORISE)
    assert report["adapter"]["loss"] < report["base"]["loss"]


def test_the_loss_is_computed_without_gradients(setup):
    """eval_loss's forwards build no autograd graph (a trainable model's would keep every activation of a batch)."""
    model = load_model(str(setup["float"]), dtype="float32", device="cpu")
    model.requires_grad_(True)
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(torch.is_grad_enabled()))
    metrics = eval_loss(model, setup["tok"], setup["records"][:3], batch_size=2)
    assert modes == [False, False] and metrics["records"] == 3


def test_a_window_the_loader_refuses_is_one_line_before_any_prompt_is_built(setup, tmp_path, capsys, monkeypatch):
    # read unchecked before the load, max_window_size "6144" reached make_context: a TypeError traceback for a record
    # with history
    from finetune.cli import main

    _no_load(monkeypatch)
    model = _model_with_window(setup["float"], tmp_path / "model", "6144")
    data = tmp_path / "two_turns.json"
    data.write_text(json.dumps([{"conversations": [
        {"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"},
        {"from": "user", "value": "again?"}, {"from": "assistant", "value": "yes"}]}]))
    assert main(["eval", "-m", str(model), "--data", str(data)]) == 2
    assert _one_error_line(capsys) == (f"error: {model / 'generation_config.json'}: max_window_size must be an "
                                       "integer of at least 1 (tokens), got '6144'")


def test_eval_output_that_is_the_data_file_is_refused_before_loading(setup, tmp_path, capsys, monkeypatch):
    # the report replaced the held-out data it was computed on
    import finetune.loading
    from finetune.cli import main

    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    data = tmp_path / "heldout.json"
    data.write_text(setup["data"].read_text())
    assert main(["eval", "--adapter", str(setup["lora"]), "--data", str(data),
                 "--output", str(tmp_path / "." / "heldout.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output ") and "is the --data file" in err and err.count("\n") == 1, err
    assert data.read_text() == setup["data"].read_text()


@pytest.mark.parametrize("spec", ["dir", "glob"])
def test_eval_output_where_the_data_dir_or_glob_would_read_it_is_refused(setup, tmp_path, capsys, monkeypatch, spec):
    # --data DIR --output DIR/report.json wrote the report among the data: the same command run again stopped on it
    # as an invalid record (and a training run with that -d too)
    import finetune.loading
    from finetune.cli import main

    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    data_dir = tmp_path / "heldout"
    data_dir.mkdir()
    (data_dir / "a.json").write_text(setup["data"].read_text())
    data = str(data_dir) if spec == "dir" else str(data_dir / "*.json")
    out = data_dir / "report.json"
    assert main(["eval", "--adapter", str(setup["lora"]), "--data", data, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output {out} is where --data ") and err.count("\n") == 1, err
    assert not out.exists()


def test_eval_on_another_base_says_so_in_the_report_and_names_a_replaced_report(setup, tmp_path, capsys):
    """-a with -m of a model the adapter was not trained on (same shapes) evaluates as asked; the JSON report
    carries the console's warning (it had none), and writing over an earlier report is said."""
    from finetune.cli import main

    other = make_demo_model(tmp_path / "other", seed=1)
    out = tmp_path / "r.json"
    out.write_text("an earlier report")
    assert main(["eval", "-a", str(setup["lora"]), "-m", str(other), "--data", str(setup["held"]),
                 "--no-generate", "--output", str(out)]) == 0
    assert f"report: {out} (replaced the file that was there)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["model"] == str(other)
    assert len(report["warnings"]) == 1 and "is not that model" in report["warnings"][0]
    assert main(["eval", "-a", str(setup["lora"]), "--data", str(setup["held"]), "--no-generate", "--output",
                 "/dev/null"]) == 0  # (a device, not a file: it was "replaced")
    assert "report: /dev/null\n" in capsys.readouterr().out
    assert str(other) in report["warnings"][0] and str(setup["float"]) in report["warnings"][0]
    assert main(["eval", "-a", str(setup["lora"]), "--data", str(setup["held"]), "--no-generate",
                 "--output", str(out)]) == 0
    assert "warnings" not in json.loads(out.read_text())  # the recorded base


def test_eval_reads_the_models_vocabulary_and_checks_an_adapters_copy(setup, tmp_path, capsys, monkeypatch):
    """The adapter's qwen.tiktoken was preferred to the model's and not checked against it: a copy that is not the
    model's vocabulary (here cut to 1000 ranks: <|endoftext|> at 1000, the model's at 1840) scored the held-out
    data as other ids, silently (adapter loss 5.9 where it is 0.53). The model's own is read, as chat and merge
    read it; the adapter's only where the model dir has none, and then checked before loading."""
    import shutil

    import finetune.loading
    from finetune.cli import main

    lora = Path(shutil.copytree(setup["lora"], tmp_path / "lora"))
    ranks = (setup["lora"] / "qwen.tiktoken").read_text().splitlines()[:1000]
    (lora / "qwen.tiktoken").write_text("\n".join(ranks) + "\n")
    out = tmp_path / "r.json"
    assert main(["eval", "-a", str(lora), "--data", str(setup["data"]), "--no-generate", "--output", str(out)]) == 0
    assert main(["eval", "-a", str(setup["lora"]), "--data", str(setup["data"]), "--no-generate",
                 "--output", str(tmp_path / "good.json")]) == 0
    got, want = (json.loads(p.read_text())["adapter"] for p in (out, tmp_path / "good.json"))
    assert (got["loss"], got["tokens"]) == (want["loss"], want["tokens"])

    model = Path(shutil.copytree(setup["float"], tmp_path / "model"))
    (model / "qwen.tiktoken").unlink()

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the vocabulary was checked")

    monkeypatch.setattr(finetune.loading, "load_model", no_load)
    capsys.readouterr()
    assert main(["eval", "-a", str(lora), "-m", str(model), "--data", str(setup["data"]), "--no-generate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {lora / 'qwen.tiktoken'}: <|endoftext|> gets id 1000") and err.count("\n") == 1


def test_eval_cli_stops_on_bad_data_before_loading_the_model(setup, tmp_path, capsys, monkeypatch):
    import finetune.loading
    from finetune.cli import main

    bad = tmp_path / "heldout.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                   '{"messages": [oops}\n')

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(finetune.loading, "load_model", no_load)
    assert main(["eval", "--adapter", str(setup["lora"]), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "record 2, line 2" in err and err.count("\n") == 1


def test_an_adapter_that_trained_base_biases_is_refused_before_loading(setup, tmp_path, capsys, monkeypatch):
    # PEFT loads bias "all" / "lora_only" biases into the base layers, and its disable_adapter() keeps them: the base
    # column was the base plus the adapter's biases, reported as the base
    import json
    import shutil

    import finetune.loading
    from finetune.cli import main

    adapter = tmp_path / "bias_all"
    shutil.copytree(setup["lora"], adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(cfg, bias="all")))

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the adapter was checked")

    monkeypatch.setattr(finetune.loading, "load_model", no_load)
    assert main(["eval", "--adapter", str(adapter), "--data", str(setup["data"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: adapter {adapter} trained base-layer biases (bias 'all' ") and \
        "base column would not be the base model" in err and err.count("\n") == 1, err
    monkeypatch.undo()
    from finetune.adapters import AdapterError

    model = load_model(setup["float"], adapter=setup["lora"], device="cpu")
    model.peft_config["default"].bias = "lora_only"
    with pytest.raises(AdapterError, match=r"bias 'lora_only'"):
        evaluate_model(model, setup["tok"], setup["records"][:1], generate=False)


@pytest.mark.parametrize("generator", ["engine", "generate"])
def test_generated_tokens_are_counted_from_ids_even_when_they_decode_to_no_text(generator):
    """A random model's tokens may decode to nothing visible (here every token it picks is past the tokenizer's
    vocabulary, as with the random 14B-shaped model over the small vocabulary): eval still counts them, so
    tokens/s is the generated tokens' rate, not the visible text's."""
    from finetune.tokenization import SMALL_VOCAB, QWenTokenizer

    from _helpers import tiny_model

    tok = QWenTokenizer(str(SMALL_VOCAB))
    model = tiny_model(seed=3, vocab_size=2 * len(tok))
    with torch.no_grad():  # every id the tokenizer knows (the stops included) scores 0, the others +-random
        model.lm_head.weight[: len(tok)] = 0
    records = memorise_records()[:3]
    report = evaluate_model(model, tok, records, batch_size=2, max_new_tokens=6, generator=generator,
                            gen_batch_size=2)
    base = report["base"]
    assert [s["base"] for s in report["samples"]] == ["", "", ""]  # no visible text at all ...
    assert base["generated_tokens"] == 3 * 6  # ... yet every row generated its 6 tokens
    assert base["generation_seconds"] > 0 and base["tokens_per_s"] == pytest.approx(18 / base["generation_seconds"])


# -- tool / function-call records ---------------------------------------------------------------------------

WEATHER = {"name": "get_weather", "description": "Weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": WEATHER}]
# a request ending with a tool result: the server prompts the model to continue the open turn after it
CALL = [{"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "I need the weather.", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny and 21C"}]
# two turns, two calls answered in one assistant message
CALLS_2 = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
           {"role": "user", "content": "Paris and Rome?"},
           {"role": "assistant", "content": "Both cities.", "tool_calls": [
               {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
               {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
           {"role": "tool", "tool_call_id": "a", "content": "sun"},
           {"role": "tool", "tool_call_id": "b", "content": "rain"}]
AFTER_CALL = {"tools": TOOLS, "messages": CALL + [{"role": "assistant", "content": "It is sunny."}]}
AFTER_CALLS_2 = {"tools": TOOLS, "messages": CALLS_2 + [{"role": "assistant", "content": "Sun, then rain."}]}
# functions defined, no call in the last turn: the reference is the whole turn
NO_CALL = {"tools": TOOLS, "messages": [{"role": "user", "content": "Say hi."},
                                        {"role": "assistant", "content": "Hi!"}]}


@pytest.fixture(scope="module")
def small_tok():
    from finetune.tokenization import SMALL_VOCAB, QWenTokenizer

    return QWenTokenizer(str(SMALL_VOCAB))


@pytest.mark.parametrize("record, request_messages, answer", [
    (AFTER_CALL, CALL, "It is sunny."), (AFTER_CALLS_2, CALLS_2, "Sun, then rain.")])
def test_a_tool_record_is_prompted_after_its_last_tool_result_as_the_server_prompts_the_follow_up(
        small_tok, record, request_messages, answer):
    """The prompt ends with the last observation and the "\\nThought:" the server writes after it (the model's
    own text before it included), and its ids are the server's for the request that ends with that tool result;
    the reference is the trained text that follows, stripped as replies are. (It was the whole turn, tool results
    included, after a prompt that ended at "<|im_start|>assistant\\n".)"""
    from finetune import react
    from finetune.data import IGNORE, encode_conversation

    tok = small_tok
    tokens, ref = generation_prompt(tok, record)
    server = react.prompt_ids(tok, react.build_turns(request_messages, react.functions_from(tools=TOOLS)))
    assert tokens == server
    assert tok.decode(tokens).endswith(f"Observation: {request_messages[-1]['content']}\nThought:")
    assert ref == f"I now know the final answer.\nFinal Answer: {answer}"
    # the prompt is the training row's prefix, and what follows it is the trained reference and <|im_end|>
    enc = encode_conversation(tok, record)
    assert enc["input_ids"][:len(tokens)] == tokens
    rest = enc["labels"][len(tokens):]
    assert IGNORE not in rest[:-1] and tok.decode(rest[:-1]) == f" {ref}<|im_end|>"


def test_a_raw_tool_record_with_a_top_level_system_is_prompted_as_its_normalised_form(small_tok):
    """generation_prompt took a record with "messages" and "system" for a normalised one: an OpenAI tool record with
    a top-level system prompt was read as plain turns (a ValueError from make_context on the tool call's null
    content, or a prompt without the ReAct layout)."""
    from finetune.data import normalize_record

    raw = {"system": "Be brief.", **AFTER_CALL}
    assert generation_prompt(small_tok, raw) == generation_prompt(small_tok, normalize_record(raw))
    assert small_tok.decode(generation_prompt(small_tok, raw)[0]).endswith("Observation: sunny and 21C\nThought:")


def test_a_tool_record_without_a_call_in_its_last_turn_is_prompted_as_before(small_tok):
    from finetune.data import normalize_record
    from finetune.modeling import make_context

    tokens, ref = generation_prompt(small_tok, NO_CALL)
    msgs = normalize_record(NO_CALL)["messages"]
    assert tokens == make_context(small_tok, msgs[0]["content"], system="You are a helpful assistant.")[1]
    assert ref == "Thought: I now know the final answer.\nFinal Answer: Hi!"


def test_a_tool_record_ending_with_a_call_is_referenced_up_to_the_stop_as_its_reply_ends(small_tok):
    """A training record may end with a call and no result (OpenAI's fine-tuning form): its turn ends with the
    "\nObservation:" the server stops at, and a reply that makes the same call, cut at the stop, is the reference
    (it never matched: the reference kept the "\nObservation:" that replies are cut before)."""
    from finetune.data import normalize_record
    from finetune.evaluate import cut_reply, reply_stop

    call = 'Action: get_weather\nAction Input: {"city": "Paris"}'
    for record, ref in (({"tools": TOOLS, "messages": CALL[:2]}, f"Thought: I need the weather.\n{call}"),
                        ({"tools": TOOLS, "messages": CALL + [{**CALL[1], "content": "Once more.", "tool_calls": [
                            {**CALL[1]["tool_calls"][0], "id": "c2"}]}]}, f"Once more.\n{call}")):
        tokens, got = generation_prompt(small_tok, record)
        assert got == ref
        stop = reply_stop(normalize_record(record))
        assert stop == "Observation:" and cut_reply(f"{ref}\nObservation:", stop) == got


PLAIN = [
    {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": " a \n"}]},
    {"system": "Be brief.", "messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                         {"role": "user", "content": "\nq2 "}, {"role": "assistant", "content": "a2"}]},
    {"instruction": "Add.", "input": "1 + 1", "output": "2", "history": [["hi", "hello"]]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Observation: none"}]},
]


@pytest.mark.parametrize("record", PLAIN)
def test_plain_records_are_prompted_and_referenced_as_before(small_tok, record):
    """Records without tools: make_context over the turns before the last assistant one (the last user turn the
    query) and that turn's content, byte for byte."""
    from finetune.data import normalize_record
    from finetune.modeling import make_context

    rec = normalize_record(record)
    msgs = rec["messages"]
    history = [(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(0, len(msgs) - 2, 2)]
    tokens, ref = generation_prompt(small_tok, record)
    assert tokens == make_context(small_tok, msgs[-2]["content"], history=history, system=rec["system"])[1]
    assert ref == msgs[-1]["content"]


def test_a_last_reply_of_weight_0_is_no_reference(small_tok):
    """OpenAI's "weight": 0 marks a reply not to learn (and the loss skips it): the prompt and reference are those
    of the last trained reply. (The weight-0 reply was the reference.)"""
    from finetune.modeling import make_context

    record = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                           {"role": "user", "content": "q2"},
                           {"role": "assistant", "content": "not this", "weight": 0}]}
    tokens, ref = generation_prompt(small_tok, record)
    assert ref == "a1"
    assert tokens == make_context(small_tok, "q1", system="You are a helpful assistant.")[1]


def test_replies_to_tool_records_end_at_observation_as_the_servers(small_tok, monkeypatch):
    """With functions the server stops at "Observation:" (a reply that calls a tool ends there): eval cuts a
    tool record's reply there too; a plain record's reply is the whole text (no functions, no such stop)."""
    import finetune.evaluate

    from _helpers import tiny_model

    tok = small_tok
    call = 'Thought: Let me look.\nAction: get_weather\nAction Input: {"city": "Paris"}'
    answer = "Thought: I now know the final answer.\nFinal Answer: Hi!"
    records = [AFTER_CALL, NO_CALL, PLAIN[3]]
    replies = {tuple(generation_prompt(tok, AFTER_CALL)[0]): f" {call}\nObservation: rainy\nThought: x",
               tuple(generation_prompt(tok, NO_CALL)[0]): f"{answer}\nObservation: invented",
               tuple(generation_prompt(tok, PLAIN[3])[0]): "Observation: none\nObservation: more"}

    def scripted(model, tokenizer, contexts, *args, **kwargs):
        return [tokenizer.encode(replies[tuple(c)]) for c in contexts]

    monkeypatch.setattr(finetune.evaluate, "engine_reply_ids", scripted)
    report = evaluate_model(tiny_model(), tok, records, batch_size=3, max_new_tokens=8)
    s = report["samples"]
    assert [x["base"] for x in s] == [call, answer, "Observation: none\nObservation: more"]
    assert [x["base_exact_match"] for x in s] == [0.0, 1.0, 0.0]
    assert s[0]["reference"] == "I now know the final answer.\nFinal Answer: It is sunny."
    assert s[0]["continues"].endswith("\nObservation: sunny and 21C\nThought:") and s[0]["stop"] == "Observation:"
    assert "continues" not in s[1] and s[1]["stop"] == "Observation:"
    assert set(s[2]) == {"id", "query", "reference", "base", "base_exact_match", "base_rouge_l"}  # as before
    # the generated tokens are the engine's, all of them (the text is cut for scoring, not the count)
    assert report["base"]["generated_tokens"] == sum(len(tok.encode(r)) for r in replies.values())


def test_rows_end_at_their_stop_string_on_either_generator(small_tok):
    """A tool record's row ends where its text reaches "Observation:" (the server's stop), not at max_new_tokens:
    the reply is the same as cut afterwards, with fewer tokens generated."""
    from finetune.evaluate import _texts, engine_replies, engine_reply_ids

    from _helpers import tiny_model

    tok, model = small_tok, tiny_model(seed=3)
    contexts = [tok.encode("one two three"), tok.encode("four five six seven")]
    free = engine_reply_ids(model, tok, contexts, max_new_tokens=24)
    text = _texts(tok, [free[0]])[0]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop.strip()) == 3 and "\ufffd" not in stop
    ended = engine_reply_ids(model, tok, contexts, max_new_tokens=24, stops=[stop, None])
    assert ended[1] == free[1] and len(ended[0]) < len(free[0]) and ended[0] == free[0][:len(ended[0])]
    assert stop in tok.decode(ended[0]) and stop not in tok.decode(ended[0][:-1])
    assert engine_replies(model, tok, contexts, max_new_tokens=24, stops=[stop, None]) == [
        text.split(stop, 1)[0].strip(), _texts(tok, [free[1]])[0]]
    # generate()'s rows end at their stop string too, the same tokens (the engine answers as generate() does)
    from finetune.evaluate import generate_reply_ids

    assert generate_reply_ids(model, tok, contexts, batch_size=2, max_new_tokens=24) == free
    assert generate_reply_ids(model, tok, contexts, batch_size=2, max_new_tokens=24, stops=[stop, None]) == ended


def test_a_missing_data_file_is_one_line_naming_the_flag(tmp_path, capsys):
    # was "error: X: file not found: no such file" (the words twice, the flag not named); the data is read before
    # any model, so the model dir need not exist
    from finetune.cli import main

    missing = tmp_path / "nonexist.json"
    assert main(["eval", "-m", str(tmp_path / "no_model"), "--data", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: --data {missing}: no such file\n"


# -- hostile and unusual use: one line before the model loads; what the report says -------------------------------


class _Loaded(Exception):
    """Raised by a patched load_model: the command got past every check."""


def _no_load(monkeypatch):
    import finetune.loading

    def loaded(*a, **k):
        raise _Loaded

    monkeypatch.setattr(finetune.loading, "load_model", loaded)


def test_every_eval_flag_has_help_and_max_samples_says_it_limits_the_loss_too():
    """--max-samples and --device had no help; --max-samples cuts the records the loss is computed on, not only the
    generated ones."""
    from finetune.evaluate import _parser

    helps = {a.option_strings[-1]: a.help for a in _parser()._actions}
    assert [flag for flag, text in helps.items() if not text] == []
    assert "first N records" in helps["--max-samples"] and "loss" in helps["--max-samples"]
    assert "default 8" in helps["--batch-size"]


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("flags, message", [
    # argparse kept the last silently: the first adapter / data file was dropped
    (["-a", "LORA"], "-a/--adapter given twice"),
    (["--data", "DATA"], "--data given twice"),
    (["--max-new-tokens", "4", "--max-new-tokens", "8"], "--max-new-tokens given twice (4 and 8)"),
    # an unset shell variable: --output "" wrote no report, -a "" named "."
    (["--output", ""], "--output is empty"),
    (["-m", " "], "-m/--model is empty"),
    # the engine tried to allocate a cache for it after the model loaded (a traceback)
    (["--max-new-tokens", "99999999999"], "--max-new-tokens 99999999999 is more than"),
    # argparse's usage text above its error
    (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x' (see qwen-ft eval --help)"),
])
def test_eval_flags_given_twice_empty_or_too_big_are_one_line_before_loading(setup, capsys, monkeypatch, flags,
                                                                              message):
    from finetune.cli import main

    _no_load(monkeypatch)
    flags = [str(setup["lora"]) if f == "LORA" else str(setup["data"]) if f == "DATA" else f for f in flags]
    try:
        rc = main(["eval", "-a", str(setup["lora"]), "--data", str(setup["data"]), *flags])
    except SystemExit as e:  # argparse's own errors exit
        rc = e.code
    assert rc == 2 and message in _one_error_line(capsys)


@pytest.mark.parametrize("flags, message", [
    (["--device", "cuda"], "--device: device 'cuda': "),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--dtype", "int3"], "--dtype: unknown dtype 'int3'"),
])
def test_eval_device_or_dtype_refused_before_the_data_is_read(setup, capsys, monkeypatch, flags, message):
    # load_model refused them, after the data had been read (and every generation prompt built): merge, chat and serve
    # check them first, through the same check
    import torch

    import finetune.evaluate
    from finetune.cli import main

    def read(*a, **k):
        raise AssertionError("data read before --device / --dtype were checked")

    _no_load(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(finetune.evaluate, "load_eval_records", read)
    assert main(["eval", "-a", str(setup["lora"]), "--data", str(setup["data"]), *flags]) == 2
    assert _one_error_line(capsys).startswith(f"error: {message}")


def test_eval_output_that_is_a_file_of_the_adapter_is_refused_and_a_report_there_is_replaced(setup, tmp_path, capsys,
                                                                                              monkeypatch):
    # --output ADAPTER/adapter_config.json replaced the adapter's config with the report (the adapter was gone)
    import shutil

    from finetune.cli import main

    _no_load(monkeypatch)
    adapter = tmp_path / "adapter"
    shutil.copytree(setup["lora"], adapter)
    config = (adapter / "adapter_config.json").read_text()
    for target in (adapter / "adapter_config.json", setup["float"] / "config.json"):
        assert main(["eval", "-a", str(adapter), "-m", str(setup["float"]), "--data", str(setup["data"]),
                     "--output", str(target)]) == 2
        line = _one_error_line(capsys)
        assert f"--output {target} is a file of {target.parent}, an input of this evaluation" in line, line
    assert (adapter / "adapter_config.json").read_text() == config
    # a new file there, or an earlier report, is fine (the report is written after the evaluation)
    (adapter / "eval.json").write_text(json.dumps({"model": "m", "settings": {}, "base": {}}))
    for target in (adapter / "eval.json", adapter / "new.json"):
        with pytest.raises(_Loaded):
            main(["eval", "-a", str(adapter), "--data", str(setup["data"]), "--output", str(target)])


def test_eval_output_over_a_file_of_the_run_of_a_checkpoint_adapter_is_refused(setup, tmp_path, capsys, monkeypatch):
    # -a RUN/checkpoint-2 --output RUN/run_info.json replaced the run's record with the report
    import shutil

    from finetune.cli import main

    _no_load(monkeypatch)
    run = tmp_path / "run"
    shutil.copytree(setup["lora"], run / "checkpoint-2")
    (run / "run_info.json").write_text("{}")
    target = run / "run_info.json"
    assert main(["eval", "-a", str(run / "checkpoint-2"), "-m", str(setup["float"]), "--data", str(setup["data"]),
                 "--output", str(target)]) == 2
    assert f"--output {target} is a file of {run}, an input of this evaluation" in _one_error_line(capsys)
    assert target.read_text() == "{}"
    with pytest.raises(_Loaded):  # a new file in the run dir is fine
        main(["eval", "-a", str(run / "checkpoint-2"), "-m", str(setup["float"]), "--data", str(setup["data"]),
              "--output", str(run / "eval.json")])


def test_eval_output_in_a_place_that_cannot_be_written_is_refused_before_loading(setup, tmp_path, capsys,
                                                                                  monkeypatch):
    # was the report's FileNotFoundError / PermissionError traceback after the whole evaluation
    import os

    from finetune.cli import main

    _no_load(monkeypatch)
    if os.geteuid() == 0:  # root writes anywhere a mode says no; /proc takes no new file from anyone
        if not Path("/proc/self").is_dir():
            pytest.skip("needs /proc (or a non-root user)")
        place = Path("/proc")
    else:
        place = tmp_path / "ro"
        place.mkdir()
        place.chmod(0o500)
    output = place / "sub dir" / "r.json"
    assert main(["eval", "-a", str(setup["lora"]), "--data", str(setup["data"]), "--output", str(output)]) == 2
    assert _one_error_line(capsys).startswith(f"error: --output {output}: cannot write in {place}")


def test_no_generate_with_no_scored_token_is_one_line_before_loading(setup, tmp_path, capsys, monkeypatch):
    # every prompt fills --max-len: the report was a NaN loss over 0 tokens (and perplexity inf)
    from finetune.cli import main

    _no_load(monkeypatch)
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "word " * 80},
                                             {"role": "assistant", "content": "x"}]}) + "\n")
    assert main(["eval", "-m", str(setup["float"]), "--data", str(data), "--max-len", "48", "--no-generate"]) == 2
    assert _one_error_line(capsys) == (f"error: --data {data}: no record has a reply token within max_len 48 (each "
                                       f"prompt fills it), so --no-generate has nothing to score; --max-len sets "
                                       f"max_len")


def test_a_loss_over_no_token_is_null_in_a_strict_json_report(setup, tmp_path, capsys):
    # json.dumps wrote NaN and Infinity, which strict parsers (jq, JSON.parse) refuse; the perplexity of no token
    # was inf
    from finetune.cli import main

    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "word " * 80},
                                             {"role": "assistant", "content": "x"}]}) + "\n")
    out = tmp_path / "r.json"
    assert main(["eval", "-m", str(setup["float"]), "--data", str(data), "--max-len", "48", "--max-new-tokens", "2",
                 "--output", str(out)]) == 0

    def refuse(word):
        raise ValueError(f"not JSON: {word}")

    report = json.loads(out.read_text(), parse_constant=refuse)
    assert report["base"]["loss"] is None and report["base"]["perplexity"] is None
    assert report["base"]["tokens"] == 0 and report["base"]["left_out"] == 1 and report["base"]["generated"] == 1
    got = eval_loss(load_model(setup["float"], dtype=torch.float32, device="cpu"), setup["tok"],
                    [json.loads(data.read_text())], max_len=48)
    assert math.isnan(got["loss"]) and math.isnan(got["perplexity"]) and got["tokens"] == 0


def test_perplexity_in_the_report_is_exp_of_the_mean_loss_over_trained_tokens(setup, tmp_path):
    # by hand: each record alone, cross-entropy summed over its trained labels, divided by their count
    from finetune.cli import main
    from finetune.data import encode_conversation

    out = tmp_path / "r.json"
    assert main(["eval", "-a", str(setup["lora"]), "--data", str(setup["data"]), "--no-generate", "--batch-size", "3",
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    model = load_model(setup["float"], adapter=setup["lora"], dtype=torch.float32, device="cpu")
    for column, ctx in (("adapter", None), ("base", model.disable_adapter)):
        total, count = 0.0, 0
        with torch.no_grad(), (ctx() if ctx else torch.no_grad()):
            for r in setup["records"]:
                enc = encode_conversation(setup["tok"], r)
                lg = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0, :-1].float()
                y = torch.tensor(enc["labels"][1:])
                total += float(F.cross_entropy(lg[y != -100], y[y != -100], reduction="sum"))
                count += int((y != -100).sum())
        col = report[column]
        assert col["tokens"] == count and col["records"] == 4 and col["left_out"] == 0 and col["truncated"] == 0
        assert col["loss"] == pytest.approx(total / count, rel=1e-5)
        assert col["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert set(report) >= {"model", "adapter_dir", "data", "records", "settings", "base", "adapter"}
    assert report["adapter_dir"] == str(setup["lora"]) and report["records"] == 4


def test_exact_match_and_rouge_l_on_cjk_punctuation_and_whitespace_by_hand():
    # NFKC: the full-width comma and exclamation mark are ASCII ones; whitespace runs are one space, the ends
    # stripped; case and punctuation count (the official plugin eval compares action names strip().lower(), and
    # scores ROUGE-L over its BPE tokens: this project's README defines its own, words and CJK characters)
    assert exact_match(" 你好，世界！\n", "你好,世界!") == 1.0
    assert exact_match("你好 世界", "你好世界") == 0.0  # a space between CJK characters is a difference
    assert exact_match("Qwen  is\tgreat", "Qwen is great") == 1.0
    assert rouge_tokens("我爱 Qwen，真的！") == ["我", "爱", "Qwen,", "真", "的", "!"]
    # prediction 我/爱/Qwen,/真/的/! (6) vs reference 我/很/爱/Qwen,/的/! (6): LCS 我 爱 Qwen, 的 ! = 5
    assert rouge_l("我爱 Qwen，真的！", "我很爱Qwen, 的!") == pytest.approx(2 * (5 / 6) * (5 / 6) / (5 / 6 + 5 / 6))
    # 我很爱Qwen, -> 我/很/爱/Qwen, : the Latin run after CJK characters is its own token
    assert rouge_tokens("我很爱Qwen, 的!") == ["我", "很", "爱", "Qwen,", "的", "!"]
    # a space between CJK characters changes no token: ROUGE-L 1 where exact match is 0
    assert rouge_l("你好 世界", "你好世界") == 1.0


def test_a_last_reply_with_no_trained_segment_is_context_not_the_reference():
    """Such a reply is context in training (as weight 0): eval continued from it and scored an empty reference."""
    from finetune.data.records import normalize_record
    from finetune.evaluate import _last_assistant

    record = normalize_record({"messages": [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "It is 42."},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "Let me check.", "segments": [["Let me check.", False]]}]})
    assert _last_assistant(record["messages"]) == 1


def test_an_untrained_tail_of_the_last_reply_is_not_where_the_prompt_ends(small_tok):
    """A reply whose own segments leave its end untrained (["It is 42.", trained], [" (source: a book)", not]): eval
    cut the turn after that tail, so the prompt held the whole reply, answer included, and the reference was empty
    (a reply that ended at once scored exact match 1). The prompt ends where trained text follows untrained text,
    never after the last trained text."""
    from finetune.modeling import make_context

    tail = {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": "It is 42. (source: a book)",
                          "segments": [["It is 42.", True], [" (source: a book)", False]]}]}
    tokens, ref = generation_prompt(small_tok, tail)
    assert tokens == make_context(small_tok, "q", system="You are a helpful assistant.")[1]
    assert ref == "It is 42. (source: a book)"
    # untrained text before the trained text is still continued from, as after a tool result
    both = {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": "Let me see. It is 42. (source)",
                          "segments": [["Let me see.", False], [" It is 42.", True], [" (source)", False]]}]}
    tokens, ref = generation_prompt(small_tok, both)
    assert small_tok.decode(tokens).endswith("<|im_start|>assistant\nLet me see.") and ref == "It is 42. (source)"


def test_a_plain_record_with_its_own_segments_is_not_cut_at_observation(small_tok, monkeypatch):
    """A plain record (no tools) may mark its trained text with `segments`; eval took any record with segments for a
    tool record: its reference was cut at "Observation:", its reply stopped there and the sample said "stop", where
    the server, asked without tools, never stops there. Only a tool record ("react" in its normalised form) is."""
    import finetune.evaluate
    from finetune.data import normalize_record
    from finetune.evaluate import reply_stop, split_last_turn

    from _helpers import tiny_model

    text = "Observation: the sky is blue.\nConclusion: scattering."
    whole = {"messages": [{"role": "user", "content": "Write a lab note."},
                          {"role": "assistant", "content": text, "segments": [[text, True]]}]}
    lead = "Lab note."
    cont = {"messages": [{"role": "user", "content": "Write a lab note."},
                         {"role": "assistant", "content": f"{lead} {text}",
                          "segments": [[lead, False], [f" {text}", True]]}]}
    for record, continued in ((whole, ""), (cont, lead)):
        rec = normalize_record(record)
        assert "react" not in rec and reply_stop(rec) is None
        assert split_last_turn(rec["messages"][-1]) == (continued, text)
        assert generation_prompt(small_tok, record)[1] == text
    # a tool record is marked, and its reference still ends at its call's "Observation:"
    tool = normalize_record({"tools": TOOLS, "messages": CALL[:2]})
    assert tool["react"] is True and reply_stop(tool) == "Observation:" and normalize_record(tool) == tool
    assert not split_last_turn(tool["messages"][-1], True)[1].endswith("Observation:")
    # end to end: the plain rows are not stopped at "Observation:", their replies whole, no "stop" in the samples
    monkeypatch.setattr(finetune.evaluate, "engine_reply_ids",
                        lambda model, tok, contexts, *a, **kw: [tok.encode(f" {text}") for _ in contexts])
    report = evaluate_model(tiny_model(), small_tok, [whole, cont], batch_size=2, max_new_tokens=8)
    s = report["samples"]
    assert [x["base_exact_match"] for x in s] == [1.0, 1.0] and [x["reference"] for x in s] == [text, text]
    assert "stop" not in s[0] and "stop" not in s[1] and s[1]["continues"] == lead and "continues" not in s[0]


def test_the_report_carries_the_float_adapter_on_int4_warning(setup, tmp_path, capsys):
    """The console warned that a float-trained adapter meets rounded weights it never saw; the report (what a user
    keeps and compares) did not, where merge's report does."""
    from finetune.cli import main

    int4 = make_demo_model(tmp_path / "int4", int4=True)
    out = tmp_path / "report.json"
    assert main(["eval", "-m", str(int4), "--adapter", str(setup["lora"]), "--data", str(setup["held"]),
                 "--no-generate", "--max-samples", "2", "--output", str(out)]) == 0
    warnings = json.loads(out.read_text())["warnings"]
    assert any("trained on a float model" in w and str(int4) in w for w in warnings), warnings
    assert main(["eval", "--adapter", str(setup["lora"]), "--data", str(setup["held"]), "--no-generate",
                 "--max-samples", "2", "--output", str(out)]) == 0
    assert "warnings" not in json.loads(out.read_text())  # (its own float base: nothing to say)


def test_eval_on_the_adapters_training_data_says_it_is_not_held_out(setup, tmp_path, capsys):
    """--data naming the file the adapter's run trained on (or a copy): the report called its loss held-out."""
    import shutil

    from finetune.cli import main

    copy = tmp_path / "copy.json"
    shutil.copy2(setup["data"], copy)
    out = tmp_path / "report.json"
    for data in (setup["data"], copy):
        assert main(["eval", "-a", str(setup["lora"]), "--data", str(data), "--no-generate", "--max-samples", "2",
                     "--output", str(out)]) == 0
        warning = json.loads(out.read_text())["warnings"][0]
        assert f"--data {data}: {data}" in warning and "the adapter's training data" in warning, warning
        assert warning in capsys.readouterr().err
    assert main(["eval", "-a", str(setup["lora"]), "--data", str(setup["held"]), "--no-generate", "--output",
                 str(out)]) == 0
    assert "warnings" not in json.loads(out.read_text())


def test_eval_of_a_fully_fine_tuned_dir_on_its_training_data_says_so(setup, tmp_path, capsys):
    # a full fine-tune's output dir records its data in run_args.json as an adapter's run does
    import shutil

    from finetune.cli import main

    full = tmp_path / "full"
    shutil.copytree(setup["float"], full)
    (full / "run_args.json").write_text(json.dumps({"data": {"data_path": str(setup["data"])}}))
    out = tmp_path / "report.json"
    assert main(["eval", "-m", str(full), "--data", str(setup["data"]), "--no-generate", "--max-samples", "1",
                 "--output", str(out)]) == 0
    assert f"is {full}'s training data (in its run_args.json)" in json.loads(out.read_text())["warnings"][0]


def test_eval_takes_an_adapters_hub_id_as_chat_does(setup, tmp_path, capsys, monkeypatch):
    """`--adapter org/name` was "does not exist" in eval while chat fetched it."""
    import huggingface_hub

    from finetune.cli import main

    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda ref, **k: fetched.append(ref) or str(setup["lora"]))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "report.json"
    assert main(["eval", "--adapter", "org/memorised", "--data", str(setup["data"]), "--no-generate",
                 "--max-samples", "2", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert fetched == ["org/memorised"] and report["adapter_dir"] == str(setup["lora"]) and "adapter" in report


def test_eval_checks_a_base_models_hub_id_before_loading_as_a_local_dir(setup, capsys, monkeypatch):
    """`-m org/name` without an adapter skipped the pre-load checks (they read a local dir's config): a too-long
    --max-new-tokens was found only by the engine, after the model had loaded."""
    import huggingface_hub

    from finetune.cli import main

    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda ref, **k: fetched.append(ref) or str(setup["float"]))
    _no_load(monkeypatch)
    rc = main(["eval", "-m", "org/base", "--data", str(setup["data"]), "--max-new-tokens", "99999999999"])
    assert rc == 2 and fetched == ["org/base"]
    assert "--max-new-tokens 99999999999 is more than" in _one_error_line(capsys)


def test_a_leading_tilde_in_the_path_flags_is_the_home_dir(setup, tmp_path, monkeypatch, capsys):
    # the shell leaves --output=~/x as it is: the report went into a dir named "~" in the working dir
    import shutil

    from finetune.cli import main

    home = tmp_path / "home"
    shutil.copytree(setup["lora"], home / "lora")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--adapter=~/lora", "--data", str(setup["data"]), "--no-generate",
                 "--output=~/report.json"]) == 0
    assert (home / "report.json").is_file() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("flags, message", [
    (["--no-generate", "--max-new-tokens", "5", "--repetition-penalty", "1.3"],
     "--max-new-tokens, --repetition-penalty: apply to the generated replies, which --no-generate skips"),
    (["--no-generate", "--gen-batch-size", "3"], "--gen-batch-size: applies to the generated replies"),
    (["--generator", "generate", "--gen-batch-size", "4"], "--gen-batch-size applies to --generator engine"),
])
def test_generation_flags_a_run_would_not_apply_are_one_line(flags, message, tmp_path, capsys, monkeypatch):
    # each was accepted and ignored (exit 0, no note)
    import finetune.loading
    from finetune.evaluate import main

    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    data = tmp_path / "d.json"
    data.write_text("[]")
    assert main(["-m", str(tmp_path / "m"), "--data", str(data), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
