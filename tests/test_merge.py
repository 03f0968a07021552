"""Merging: LoRA into a float base, Q-LoRA into the float base, Q-LoRA into the dequantized Int4 base, Int4
export by RTN and by calibrated GPTQ (finetune/quant/gptq.py), the written layout, and error cases."""

import json
import os
from pathlib import Path

import pytest
import torch

import finetune  # noqa: F401
from finetune import load_model
from finetune.demo import make_demo_model
from finetune.merge import MergeError, merge

from _helpers import memorise_records, write_memorise, train_adapter

IDS = torch.tensor([[1841, 872, 198, 100, 200, 300, 17, 5], [3, 4, 5, 6, 7, 8, 9, 10]])








@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    fl = make_demo_model(root / "float")
    i4 = make_demo_model(root / "int4", int4=True)
    data = root / "mem.json"
    write_memorise(data)
    # held-out data for the tests: other content than the training file (the same conversations, in reverse order)
    heldout = root / "heldout.json"
    heldout.write_text(json.dumps(json.loads(data.read_text())[::-1]))
    lora = train_adapter(fl, data, root / "lora", 40)
    qlora = train_adapter(i4, data, root / "qlora", 40, "--q_lora", "True")
    return {"root": root, "float": fl, "int4": i4, "data": data, "heldout": heldout, "lora": lora, "qlora": qlora}


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def quiet(*a, **k):
    pass


def test_lora_merge_into_float_base_matches_unmerged(setup, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    monkeypatch.chdir(tmp_path)  # relative paths as typed; the report records them absolute (read from anywhere)
    report = merge(os.path.relpath(setup["lora"]), Path("merged"), dtype="fp32",
                   eval_data=os.path.relpath(setup["data"]), log=quiet)
    assert (report["adapter"], report["output"], report["eval_data"]) == (str(setup["lora"]), str(out),
                                                                          str(setup["data"]))
    assert report["base"] == str(setup["float"])
    ref = load_model(setup["float"], adapter=setup["lora"], dtype=torch.float32, device="cpu")
    merged = load_model(out, dtype=torch.float32, device="cpu")
    assert type(merged).__name__ == "QWenLMHeadModel"
    assert (logits(merged) - logits(ref)).abs().max() < 1e-4
    # the official layout
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "float32" and cfg["model_type"] == "qwen"
    for name in ("generation_config.json", "qwen.tiktoken", "tokenizer_config.json", "merge_report.json"):
        assert (out / name).is_file(), name
    assert report["route"].startswith("LoRA merged into the float base")
    assert abs(report["merged_loss"] - report["unmerged_loss"]) < 1e-4
    assert json.loads((out / "merge_report.json").read_text())["unmerged_loss"] == report["unmerged_loss"]



def test_a_merge_over_the_official_tokenizer_files_carries_a_chat_template(setup, tmp_path):
    """The releases' tokenizer_config.json has no chat template (the demo's has one): the merged dir gets the one
    an adapter dir has, for tools that build prompts from it, and keeps the official keys."""
    import shutil

    from finetune.tokenization import CHAT_TEMPLATE

    base = tmp_path / "base"
    shutil.copytree(setup["float"], base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    official = {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}
    (base / "tokenizer_config.json").write_text(json.dumps(official))
    out = tmp_path / "merged"
    merge(setup["lora"], out, model=str(base), log=quiet)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg == {**official, "chat_template": CHAT_TEMPLATE}
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE

def test_qlora_merge_into_dequantized_int4_base(setup, tmp_path):
    out = tmp_path / "q_float"
    report = merge(setup["qlora"], out, dtype="fp32", eval_data=setup["data"], log=quiet)
    assert report["route"].startswith("int4 base: dequantize + merge")
    ref = load_model(setup["int4"], adapter=setup["qlora"], dtype=torch.float32, device="cpu")  # GPTQ + LoRA
    merged = load_model(out, dtype=torch.float32, device="cpu")
    assert (logits(merged) - logits(ref)).abs().max() < 1e-4
    assert not any(n.endswith("qweight") for n, _ in merged.named_buffers())


def test_qlora_merge_into_matching_float_base(setup, tmp_path):
    out = tmp_path / "q_into_float"
    report = merge(setup["qlora"], out, model=setup["float"], dtype="fp32", eval_data=setup["heldout"], log=quiet,
                   max_shard_size="150KB")
    assert report["route"].startswith("Q-LoRA adapter merged into the float base")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    ref = load_model(setup["float"], adapter=setup["qlora"], dtype=torch.float32, device="cpu")
    merged = load_model(out, dtype=torch.float32, device="cpu")
    assert (logits(merged) - logits(ref)).abs().max() < 1e-4
    assert "warnings" not in report  # the float model the Int4 base was quantized from


def test_another_base_than_the_adapters_is_named_in_the_report(setup, tmp_path):
    """-m of a model the adapter was not trained on (same shapes, other weights) loads as asked, and the report
    says so (the console's warning was not in merge_report.json)."""
    other_i4 = make_demo_model(tmp_path / "other_i4", seed=1, int4=True)
    report = merge(setup["qlora"], tmp_path / "a", model=other_i4, dtype="fp32", n_eval=0, log=quiet)
    assert any("is not that model" in w and str(other_i4) in w for w in report["warnings"]), report
    assert json.loads((tmp_path / "a" / "merge_report.json").read_text())["warnings"] == report["warnings"]


def test_an_adapter_is_refused_on_a_model_it_was_merged_into(setup, tmp_path):
    """The merged model has the base's architecture without its quantization, so it passed as the Int4 base's float
    twin: -m MERGED --adapter A applied A's deltas twice, silently (chat, eval, merge, serve, --lora_weight_path).
    Refused, also with the adapter moved; another adapter on it warns naming the merged one, as another base does."""
    from finetune.adapters import AdapterError, check_base

    out = tmp_path / "merged"
    merge(setup["qlora"], out, dtype="fp32", n_eval=0, log=quiet)
    with pytest.raises(AdapterError, match="already merged into it .*applies its deltas twice"):
        load_model(out, adapter=setup["qlora"], dtype=torch.float32, device="cpu")
    with pytest.raises(AdapterError, match="already merged"):
        merge(setup["qlora"], tmp_path / "twice", model=out, n_eval=0, log=quiet)
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in setup["qlora"].iterdir():
        if f.is_file():
            (moved / f.name).write_bytes(f.read_bytes())
    with pytest.raises(AdapterError, match="already merged"):
        check_base(moved, out, explicit=True)
    other = check_base(setup["lora"], out, explicit=True)
    assert other and "a merged model" in other and str(setup["qlora"].resolve()) in other, other


def test_bf16_export_dtype(setup, tmp_path):
    out = tmp_path / "bf16"
    merge(setup["lora"], out, log=quiet)  # default dtype bf16, no eval data: the adapter's training data
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    report = json.loads((out / "merge_report.json").read_text())
    assert report["eval_records"] == 4 and abs(report["loss_delta"]) < 0.05


def test_int4_exports_rtn_and_gptq(setup, tmp_path):
    reports = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / f"int4_{method}"
        reports[method] = merge(setup["qlora"], out, fmt="int4", quant_method=method, eval_data=setup["data"],
                                calib_data=setup["data"] if method == "gptq" else None, log=quiet)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["quantization_config"]["quant_method"] == "gptq" and cfg["quantization_config"]["bits"] == 4
        qc = json.loads((out / "quantize_config.json").read_text())
        assert set(qc) == {"bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym",
                           "true_sequential", "model_name_or_path", "model_file_base_name"}
        model = load_model(out, dtype=torch.float32, device="cpu")
        assert any(type(m).__name__ == "GPTQLinear" for m in model.modules())
    # calibrated GPTQ costs less than round-to-nearest on the user's data
    assert reports["gptq"]["merged_loss"] < reports["rtn"]["merged_loss"], reports
    assert reports["gptq"]["quantization"]["calib_samples"] == 4


def _linear_inputs(model, samples):
    """Inputs X of every block Linear of the float model on the calibration samples."""
    xs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".h." in name:
            hooks.append(m.register_forward_hook(
                lambda mod, a, o, n=name: xs.setdefault(n, []).append(a[0].detach().reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for s in samples:
            model(input_ids=torch.tensor([s]))
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in xs.items()}


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_beats_rtn_on_calibration_inputs(setup, desc_act):
    from finetune.data import encode_conversation
    from finetune.quant.gptq import HessianAccumulator, gptq_quantize_weight, layer_output_error
    from finetune.quant.packing import dequantize
    from finetune.quant.rtn import quantize_weight
    from finetune.tokenization import load_tokenizer

    model = load_model(setup["float"], dtype=torch.float32, device="cpu")
    tok = load_tokenizer(setup["float"])
    records = json.loads(setup["data"].read_text())
    samples = [encode_conversation(tok, r)["input_ids"] for r in records]
    xs = _linear_inputs(model, samples)
    assert len(xs) == 10
    total_g = total_r = 0.0
    for name, X in xs.items():
        W = model.get_submodule(name).weight.detach()
        acc = HessianAccumulator(W.shape[1], "cpu")
        acc.add(X)
        assert torch.allclose(acc.H, 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-4)
        g = gptq_quantize_weight(W, acc.H, desc_act=desc_act)
        Qg = dequantize(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], 4)
        assert torch.equal(Qg, g["dequantized"])  # packed exactly what GPTQ chose
        r = quantize_weight(W)
        Qr = dequantize(r["qweight"], r["qzeros"], r["scales"], r["g_idx"], 4)
        eg, er = layer_output_error(W, Qg, X), layer_output_error(W, Qr, X)
        assert eg < er, (name, eg, er)
        total_g, total_r = total_g + eg, total_r + er
    assert total_g < 0.8 * total_r


def test_merge_errors(setup, tmp_path, capsys):
    other = make_demo_model(tmp_path / "wider", hidden_size=128, kv_channels=32)
    from finetune.cli import main

    rc = main(["merge", "--adapter", str(setup["lora"]), "--model", str(other), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(setup["lora"]) in err and "transformer.h.0.attn.c_attn.lora_A.weight" in err and "shape" in err

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        merge(setup["lora"], tmp_path / "full", log=quiet)
    for out, model in ((setup["float"], None), (setup["lora"], None), (setup["int4"], setup["float"])):
        # the base, the adapter, and the Int4 base a Q-LoRA adapter merged into the float twin is scored on
        with pytest.raises(MergeError, match="is an input of this merge"):
            merge(setup["qlora"] if model else setup["lora"], out, model=model, log=quiet, overwrite=True)
    assert (setup["int4"] / "model.safetensors").is_file() and (setup["lora"] / "adapter_config.json").is_file()


def test_an_adapters_vocabulary_is_checked_against_a_base_without_one(setup, tmp_path, monkeypatch):
    """A base dir without qwen.tiktoken merges with the adapter's copy, which is written into OUT: a copy that is not
    the base's vocabulary (cut to 1000 ranks: <|endoftext|> at 1000, the model's at 1840) scored the report as other
    ids and was written beside the weights, silently (a dir chat then refused). Now refused before loading."""
    import shutil

    import finetune.loading
    from finetune.tokenization import TokenizerError

    base = tmp_path / "int4"
    shutil.copytree(setup["int4"], base)
    (base / "qwen.tiktoken").unlink()
    lora = tmp_path / "qlora"
    shutil.copytree(setup["qlora"], lora)
    ranks = (lora / "qwen.tiktoken").read_text().splitlines()[:1000]
    (lora / "qwen.tiktoken").write_text("\n".join(ranks) + "\n")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the vocabulary was checked")

    monkeypatch.setattr(finetune.loading, "load_model", no_load)
    with pytest.raises(TokenizerError, match=r"qwen.tiktoken: <\|endoftext\|> gets id 1000 .* expects 1840"):
        merge(lora, tmp_path / "out", model=base, log=quiet)
    assert not (tmp_path / "out").exists()


def test_overwrite_leaves_nothing_of_the_earlier_merge(setup, tmp_path):
    # a sharded Int4 merge, then a one-file float merge over it: the stale index named the removed shards (the
    # merge's own reload failed on it) and the stale quantize_config.json called the float dir GPTQ
    out = tmp_path / "again"
    merge(setup["qlora"], out, fmt="int4", max_shard_size="100KB", n_eval=1, log=quiet)
    assert (out / "model.safetensors.index.json").is_file() and (out / "quantize_config.json").is_file()
    (out / "notes.txt").write_text("mine")
    lines = []
    report = merge(setup["qlora"], out, dtype="fp32", overwrite=True, eval_data=setup["data"], log=lines.append)
    assert report["files"] == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists() and not (out / "quantize_config.json").exists()
    assert not list(out.glob("model-*")) and (out / "notes.txt").read_text() == "mine"
    assert any("removing" in line and "quantize_config.json" in line for line in lines)
    assert abs(report["loss_delta"]) < 1e-4
    assert "qweight" not in "".join(n for n, _ in load_model(out, device="cpu").named_buffers())
    # an older model's PyTorch weights went too (loaders preferred the new safetensors, but 28 GB of another model
    # stayed beside it on a 14B)
    (out / "pytorch_model-00001-of-00002.bin").write_bytes(b"old")
    (out / "pytorch_model.bin.index.json").write_text("{}")
    lines.clear()
    merge(setup["qlora"], out, dtype="fp32", overwrite=True, n_eval=0, log=lines.append)
    assert not list(out.glob("pytorch_model*")) and (out / "notes.txt").read_text() == "mine"
    assert any("pytorch_model-00001-of-00002.bin" in line for line in lines if "removing" in line)


def test_an_int4_exports_group_size_is_the_int4_bases_unless_given(setup, tmp_path):
    """Every Int4 export wrote group size 128 whatever the base had (the demo's 32): its config was not the base's
    where it need not change, and its loss higher than at the base's own size."""
    base = json.loads((setup["int4"] / "config.json").read_text())["quantization_config"]["group_size"]
    assert base == 32
    for adapter, model in ((setup["qlora"], None), (setup["qlora"], setup["float"])):  # the Int4 base, its float twin
        out = tmp_path / f"i4_{model is None}"
        report = merge(adapter, out, model=model, fmt="int4", n_eval=0, log=quiet)
        assert report["quantization"]["group_size"] == 32
        assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32
    report = merge(setup["qlora"], tmp_path / "given", fmt="int4", group_size=16, n_eval=0, log=quiet)
    assert report["quantization"]["group_size"] == 16
    report = merge(setup["lora"], tmp_path / "float_base", fmt="int4", n_eval=0, log=quiet)  # a float base: 128
    assert report["quantization"]["group_size"] == 128


@pytest.mark.parametrize("flags, message", [
    # each was a traceback (random.sample's, parse_size's, GPTQ's, encode's, os.listdir's), most after the merge
    (["--eval-samples", "-1"], "--eval-samples must be 0 or more"),
    (["--max-shard-size", "abc"], "--max-shard-size 'abc': expected a positive size"),
    (["--format", "int4", "--group-size", "0"], "--group-size must be -1 (one group a row) or a positive"),
    (["--format", "int4", "--quant-method", "gptq", "--calib-samples", "0"], "--calib-samples must be at least 1"),
    (["--format", "int4", "--quant-method", "gptq", "--calib-max-len", "0"], "--calib-max-len 0 is too small"),
    (["--format", "int4", "--quant-method", "gptq", "--damp-percent", "-1"], "--damp-percent must be in (0, 1)"),
    # GPTQ asked for and silently not run: a float export is not quantized
    (["--quant-method", "gptq"], "--quant-method gptq calibrates an Int4 export: add --format int4"),
    (["--format", "int4", "--quant-method", "gptq", "--calib-data", "BAD"], "bad.jsonl, record 1, line 1"),
    (["--output", "FILE"], "is a file, not a directory"),
    (["--output", "DANGLING"], "is a link to"),  # the write failed on it after the whole merge had run
    # flags the route does not read: the export looked like what was asked (a float model for --bits 8, RTN for
    # --calib-data)
    (["--bits", "8"], "--bits applies to an Int4 export (--format int4)"),
    (["--desc-act", "--group-size", "64"], "--group-size, --desc-act apply to an Int4 export"),
    (["--format", "int4", "--calib-data", "BAD"], "--calib-data applies to calibrated GPTQ: add --quant-method gptq"),
    (["--format", "int4", "--calib-samples", "8", "--damp-percent", "0.1"],
     "--calib-samples, --damp-percent apply to calibrated GPTQ"),
    # conversations are cut to the model's seq_length (256): a longer --calib-max-len did nothing, and said nothing
    (["--format", "int4", "--quant-method", "gptq", "--calib-max-len", "1024"],
     "--calib-max-len 1024 is more than the model's seq_length 256"),
])
def test_merge_flags_are_checked_before_loading(setup, tmp_path, capsys, monkeypatch, flags, message):
    import finetune.loading
    from finetune.cli import main

    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "bad.jsonl").write_text('{"conversations": [{"from": "robot", "value": "x"}]}\n')
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    named = {"BAD": tmp_path / "bad.jsonl", "FILE": tmp_path / "file", "DANGLING": tmp_path / "dangling"}
    flags = [str(named[f]) if f in named else f for f in flags]
    argv = ["merge", "--adapter", str(setup["qlora"]), "--eval-data", str(setup["data"])]
    rc = main(argv + (flags if "--output" in flags else ["--output", str(tmp_path / "out"), *flags]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# -- issue 14, friction: merge's flags and reports say what they do ----------------------------------------------


def test_every_merge_flag_has_help_and_the_sampling_ones_say_their_defaults(capsys):
    """--eval-samples, --max-shard-size, --seed (and --overwrite) had no help: --help showed neither what they do
    nor their defaults (64, 2GB, 0), nor that --seed only matters where there are more records than are sampled."""
    from finetune.merge import _parser

    helps = {a.option_strings[-1]: a.help for a in _parser()._actions}
    assert [flag for flag, text in helps.items() if not text] == []
    assert "default 64" in helps["--eval-samples"] and "0: no loss report" in helps["--eval-samples"]
    assert "default 2GB" in helps["--max-shard-size"]
    assert all(s in helps["--seed"] for s in ("default 0", "more than --eval-samples", "more than --calib-samples"))
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    assert "sampled with --seed" in " ".join(capsys.readouterr().out.split())


def test_format_and_dtype_are_consistent(setup, tmp_path, capsys):
    from finetune.cli import main
    from finetune.merge import _parser

    helps = {a.dest: a.help for a in _parser()._actions}
    assert helps["format"] and "float" in helps["format"] and helps["quant_method"]
    for flags, expect in ((["--format", "bf16", "--dtype", "fp16"], "--format bf16 and --dtype fp16 contradict"),
                          (["--format", "int4", "--dtype", "fp16"], "--dtype fp16 applies to a float export"),
                          # (rtn was accepted on a float export where gptq was refused)
                          (["--quant-method", "rtn"],
                           "--quant-method rtn quantizes an Int4 export: add --format int4")):
        rc = main(["merge", "--adapter", str(setup["lora"]), "--output", str(tmp_path / "never"), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not (tmp_path / "never").exists()
    lines = []
    merge(setup["lora"], tmp_path / "fp16", fmt="float", dtype="fp16", log=lines.append)
    assert "-> float (fp16)" in lines[0]
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["torch_dtype"] == "float16"


def test_loss_is_named_for_the_data_it_is_computed_on(setup, tmp_path):
    lines = []
    report = merge(setup["lora"], tmp_path / "a", dtype="fp32", log=lines.append)  # the adapter's training data
    assert report["eval_data_kind"] == "training-data"
    assert not any("held-out" in line for line in lines) and any("not held out" in line for line in lines)
    lines.clear()
    report = merge(setup["lora"], tmp_path / "b", dtype="fp32", eval_data=setup["heldout"], log=lines.append)
    assert report["eval_data_kind"] == "held-out" and any("held-out loss" in line for line in lines)
    assert "warnings" not in report
    lines.clear()  # --calib-data's file was reported as the adapter's training data
    report = merge(setup["qlora"], tmp_path / "c", fmt="int4", quant_method="gptq", calib_data=setup["data"],
                   log=lines.append)
    assert report["eval_data_kind"] == "calibration-data"
    assert any("(the calibration data, not held out)" in line for line in lines)
    assert any("calibration-data loss of base+adapter" in line for line in lines), lines


def test_eval_data_the_adapter_trained_on_is_not_called_held_out(setup, tmp_path, capsys):
    """--eval-data naming the adapter's training data (the file, or a copy of it) was reported as a held-out loss
    (merge_report.json's eval_data_kind "held-out", "held-out loss" on the console): it is named training data and
    warned about, in the report too."""
    import shutil

    copy = tmp_path / "copy.json"
    shutil.copy2(setup["data"], copy)
    for i, data in enumerate((setup["data"], copy)):
        lines = []
        report = merge(setup["lora"], tmp_path / f"m{i}", dtype="fp32", eval_data=data, log=lines.append)
        assert report["eval_data_kind"] == "training-data", report
        assert any("training-data loss of base+adapter" in line for line in lines), lines
        assert not any("held-out" in line for line in lines), lines
        assert any("the adapter's training data" in w and "not a held-out loss" in w for w in report["warnings"])
        assert "not a held-out loss" in capsys.readouterr().err


def test_rtn_export_that_loses_the_fine_tune_warns(setup, tmp_path, monkeypatch, capsys):
    import finetune.merge as merge_module

    monkeypatch.setattr(merge_module, "INT4_WARN_DELTA", -1.0)  # any delta counts as a loss here
    report = merge(setup["qlora"], tmp_path / "rtn", fmt="int4", eval_data=setup["data"], log=quiet)
    assert any("--quant-method gptq" in w for w in report["warnings"])
    assert "warning: round-to-nearest Int4 raised the loss" in capsys.readouterr().err
    monkeypatch.setattr(merge_module, "INT4_WARN_DELTA", 1e9)
    report = merge(setup["qlora"], tmp_path / "rtn2", fmt="int4", eval_data=setup["heldout"], log=quiet)
    assert "warnings" not in report


def test_gptq_export_that_loses_the_fine_tune_warns_too(setup, tmp_path, monkeypatch, capsys):
    # only round-to-nearest was warned about: a calibrated export that lost as much said nothing (the demo's tiny
    # model loses ~0.5 nats to GPTQ)
    import finetune.merge as merge_module

    monkeypatch.setattr(merge_module, "INT4_WARN_DELTA", -1.0)
    report = merge(setup["qlora"], tmp_path / "gptq", fmt="int4", quant_method="gptq", calib_data=setup["data"],
                   eval_data=setup["data"], log=quiet)
    assert any("--format float" in w and "unmerged" in w for w in report["warnings"]), report.get("warnings")
    assert "warning: GPTQ Int4 raised the loss" in capsys.readouterr().err
    monkeypatch.setattr(merge_module, "INT4_WARN_DELTA", 1e9)
    report = merge(setup["qlora"], tmp_path / "gptq2", fmt="int4", quant_method="gptq", calib_data=setup["data"],
                   eval_data=setup["heldout"], log=quiet)
    assert "warnings" not in report


def test_float_adapter_on_int4_base_warns_naming_both(setup, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="finetune.adapters"):
        load_model(setup["int4"], adapter=setup["lora"], device="cpu")
    assert any("trained on a float model" in r.message and str(setup["int4"]) in r.message
               and str(setup["float"].resolve()) in r.message for r in caplog.records)
    caplog.clear()
    report = merge(setup["lora"], tmp_path / "f_on_i4", model=setup["int4"], dtype="fp32", log=quiet)
    assert any("trained on a float model" in w for w in report["warnings"])
    caplog.clear()
    # the documented direction (a Q-LoRA adapter into its float twin) stays quiet
    with caplog.at_level(logging.WARNING, logger="finetune.adapters"):
        load_model(setup["float"], adapter=setup["qlora"], device="cpu")
    assert not caplog.records


def test_a_float_model_of_the_architecture_but_not_the_twin_is_warned_about(setup, tmp_path, caplog):
    # any float model of the Int4 base's architecture passed as its float twin, quietly: an adapter trained on one
    # Int4 release ran on another model of the same shape (another fine-tune, another seed)
    import logging

    other = make_demo_model(tmp_path / "other-float", seed=7)
    with caplog.at_level(logging.WARNING, logger="finetune.adapters"):
        load_model(other, adapter=setup["qlora"], device="cpu")
    assert [r.message for r in caplog.records if "so it is not that model's float twin" in r.message
            and "transformer.wte.weight differs from the recorded base's" in r.message], caplog.text
    report = merge(setup["qlora"], tmp_path / "merged", model=other, dtype="fp32", log=quiet)
    assert any("not that model's float twin" in w for w in report["warnings"]), report.get("warnings")


def test_a_missing_data_file_names_the_flag_that_gave_it(setup, tmp_path, capsys):
    # was "error: X: file not found: no such file"; --calib-data is also the loss report's data without --eval-data
    from finetune.cli import main

    missing = tmp_path / "nonexist.json"
    for flags, flag in ((["--eval-data", str(missing)], "--eval-data"),
                        (["--format", "int4", "--quant-method", "gptq", "--calib-data", str(missing)], "--calib-data"),
                        (["--format", "int4", "--quant-method", "gptq", "--calib-data", str(missing),
                          "--eval-data", str(setup["data"])], "--calib-data")):
        rc = main(["merge", "--adapter", str(setup["lora"]), "--output", str(tmp_path / "never"), *flags])
        assert rc == 2 and capsys.readouterr().err == f"error: {flag} {missing}: no such file\n", flags
    assert not (tmp_path / "never").exists()


# -- a merge that stops while writing ----------------------------------------------------------------------------


def test_an_interrupted_merge_leaves_no_complete_looking_dir_and_no_mix(setup, tmp_path, monkeypatch):
    """The files are written into OUT/merge-incomplete and moved in when all are there. Before, a merge stopped
    after its weights (Ctrl-C, a full disk) left them beside the earlier merge's config.json, tokenizer and
    merge_report.json: a dir that looked complete and described other weights."""
    import finetune.merge as merge_module
    from finetune.merge import INCOMPLETE

    out = tmp_path / "m"
    first = merge(setup["lora"], out, dtype="fp32", n_eval=0, log=quiet)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_module, "write_float_config", stop)  # after the weights are written
    with pytest.raises(KeyboardInterrupt):
        merge(setup["qlora"], out, dtype="bf16", n_eval=0, overwrite=True, log=quiet)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier merge, whole
    with pytest.raises(KeyboardInterrupt):
        merge(setup["lora"], tmp_path / "fresh", n_eval=0, log=quiet)
    assert list((tmp_path / "fresh").iterdir()) == []  # nothing a loader would take for a model
    monkeypatch.undo()

    # a killed merge (no cleanup) leaves its stage: said, and replaced only with --overwrite
    (tmp_path / "killed" / INCOMPLETE).mkdir(parents=True)
    (tmp_path / "killed" / INCOMPLETE / "model.safetensors").write_bytes(b"half")
    with pytest.raises(MergeError, match="holds an interrupted merge"):
        merge(setup["lora"], tmp_path / "killed", n_eval=0, log=quiet)
    lines = []
    report = merge(setup["lora"], tmp_path / "killed", dtype="fp32", n_eval=0, overwrite=True, log=lines.append)
    assert not (tmp_path / "killed" / INCOMPLETE).exists() and any("interrupted merge" in line for line in lines)
    assert report["files"] == first["files"] and (tmp_path / "killed" / "config.json").is_file()
    merged = load_model(tmp_path / "killed", dtype=torch.float32, device="cpu")
    assert torch.equal(logits(merged), logits(load_model(out, dtype=torch.float32, device="cpu")))


def test_a_full_disk_is_one_line_and_leaves_the_earlier_merge(setup, tmp_path, monkeypatch, capsys):
    import errno

    import finetune.merge as merge_module
    from finetune.cli import main

    out = tmp_path / "m"
    merge(setup["lora"], out, n_eval=0, log=quiet)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(sd, d, *a, **k):
        (d / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(d / "model.safetensors"))

    monkeypatch.setattr(merge_module, "save_sharded", full)
    capsys.readouterr()
    rc = main(["merge", "--adapter", str(setup["lora"]), "--output", str(out), "--overwrite", "--eval-samples", "0"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: writing the merged model into"), err
    assert "No space left on device" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_int8_export_says_int8(setup, tmp_path):
    report = merge(setup["qlora"], tmp_path / "i8", fmt="int4", bits=8, eval_data=setup["data"], log=quiet)
    assert report["route"].endswith("-> int8 (rtn)") and report["quantization"]["bits"] == 8
    assert json.loads((tmp_path / "i8" / "quantize_config.json").read_text())["bits"] == 8
    assert abs(report["loss_delta"]) < 0.05


# -- hostile and unusual use ------------------------------------------------------------------------------------


class _Loaded(Exception):
    pass


def _main_rc(argv) -> int:
    from finetune.cli import main

    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors exit
        return e.code


@pytest.mark.parametrize("flags, message", [
    # argparse kept the last silently: the first adapter, or --eval-samples 0, was dropped
    (["-a", "QLORA"], "-a/--adapter given twice"),
    (["--eval-samples", "0", "--eval-samples", "3"], "--eval-samples given twice (0 and 3)"),
    # an unset shell variable: Path("") is the current dir (with --overwrite the merge went there)
    (["--output", "", "--overwrite"], "--output is empty"),
    (["-m", ""], "--model is empty"),
    # the merge ran, then failed to write (one line, but after the whole merge)
    (["--output", "/proc/merged"], "--output /proc/merged: cannot write in /proc"),
    # a model written into a dir that holds an adapter (a run dir above its checkpoint) mixes the two
    (["--output", "ADAPTER_DIR", "--overwrite"], "holds an adapter (adapter_config.json)"),
    (["--max-shard-size", "1" + "0" * 400], "--max-shard-size '1000"),  # OverflowError's traceback
    (["--group-size", "x"], "argument --group-size: invalid int value: 'x' (see qwen-ft merge --help)"),
])
def test_merge_flags_twice_empty_or_unwritable_are_one_line_before_loading(setup, tmp_path, capsys, monkeypatch,
                                                                           flags, message):
    import shutil

    import finetune.loading

    monkeypatch.setattr(finetune.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    if "/proc/merged" in flags and not (tmp_path.anchor == "/" and __import__("os").path.isdir("/proc/self")):
        pytest.skip("needs /proc")
    run = tmp_path / "run"
    shutil.copytree(setup["lora"], run)
    flags = [str(setup["qlora"]) if f == "QLORA" else str(run) if f == "ADAPTER_DIR" else f for f in flags]
    adapter = str(run / "checkpoint-3") if "ADAPTER_DIR" in flags or str(run) in flags else str(setup["lora"])
    if adapter != str(setup["lora"]):
        shutil.copytree(setup["lora"], adapter)
    argv = ["merge", "-a", adapter, "--eval-data", str(setup["data"])]
    rc = _main_rc(argv + (flags if "--output" in flags else ["--output", str(tmp_path / "out"), *flags]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, message", [("cuda", "--device: device 'cuda': "),
                                             ("tpu", "--device: unknown device 'tpu'")])
def test_a_device_that_is_not_here_is_one_line_before_the_data_is_read(setup, tmp_path, capsys, monkeypatch, device,
                                                                        message):
    """--device cuda without a GPU was refused by load_model, after the eval data (and the adapter's training data,
    hashed whole) had been read; chat and serve refuse it at once, through the same check."""
    import torch

    import finetune.evaluate
    import finetune.merge

    def read(*a, **k):
        raise AssertionError("data read before --device was checked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(finetune.evaluate, "load_eval_records", read)
    monkeypatch.setattr(finetune.merge, "training_data", read)
    rc = _main_rc(["merge", "-a", str(setup["lora"]), "--eval-data", str(setup["data"]), "-o", str(tmp_path / "out"),
                   "--device", device])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_merges_and_reports_the_loss_on_its_runs_training_data(setup, tmp_path):
    """A checkpoint-N dir holds the adapter as it was at step N (the README's --lora_weight_path OUT/checkpoint-N):
    it merges as the final adapter does. Its loss report was silently absent: run_args.json is in the run dir."""
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy2(setup["lora"] / "run_args.json", run / "run_args.json")
    ckpt = run / "checkpoint-3"
    shutil.copytree(setup["lora"], ckpt, ignore=shutil.ignore_patterns("run_args.json", "checkpoint-*"))
    report = merge(ckpt, tmp_path / "m", dtype="fp32", log=quiet)
    assert report["eval_data_kind"] == "training-data" and report["eval_records"] == 4
    assert report["eval_data"] == str(setup["data"]) and abs(report["loss_delta"]) < 1e-4
    # with no recorded data at all the report has no loss, and says why
    (run / "run_args.json").unlink()
    lines = []
    report = merge(ckpt, tmp_path / "m2", dtype="fp32", log=lines.append)
    assert "merged_loss" not in report and any("the report has no loss; pass --eval-data" in line for line in lines)


def test_training_data_edited_since_the_run_is_not_scored_as_its_training_data(setup, tmp_path):
    """Merge scored (and calibrated on) whatever the recorded training file held at merge time, as the run's
    training data: run_info.json now keeps the data's content hash, and a file that no longer holds it is said
    and left out. A copy of the same content under another name is the same data."""
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(setup["lora"], adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    assert json.loads((adapter / "run_info.json").read_text())["data_content"]
    data = tmp_path / "renamed copy.json"
    shutil.copy2(setup["data"], data)
    args = json.loads((adapter / "run_args.json").read_text())
    args["data"]["data_path"] = str(data)
    (adapter / "run_args.json").write_text(json.dumps(args))
    report = merge(adapter, tmp_path / "m", dtype="fp32", log=quiet)
    assert report["eval_data_kind"] == "training-data" and report["eval_data"] == str(data)
    records = json.loads(data.read_text())
    data.write_text(json.dumps(records[:1]))  # edited since: one record of the four
    lines = []
    report = merge(adapter, tmp_path / "m2", dtype="fp32", log=lines.append)
    assert "merged_loss" not in report, report
    assert any(f"{data} (the adapter's training data in run_args.json) has changed since the run trained on it" in line
               for line in lines), lines
    with pytest.raises(MergeError, match="--quant-method gptq needs calibration conversations"):
        merge(adapter, tmp_path / "m3", fmt="int4", quant_method="gptq", log=quiet)


def test_training_data_the_run_read_with_skip_invalid_is_read_so_again(setup, tmp_path, capsys):
    """A run with --skip_invalid True trained on a file with an invalid record (counted and skipped there); merging
    its adapter without --eval-data stopped on that record, in a file the user had not named. It is skipped and
    counted again; a file the user names is still checked whole."""
    import shutil

    from finetune.data import DataError
    from finetune.data.dataset import data_content

    adapter = tmp_path / "adapter"
    shutil.copytree(setup["lora"], adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    data = tmp_path / "train.json"
    records = json.loads(Path(setup["data"]).read_text())
    data.write_text(json.dumps(records[:2] + [{"conversations": [{"from": "user", "value": "hi"}]}] + records[2:]))
    args = json.loads((adapter / "run_args.json").read_text())
    args["data"].update(data_path=str(data), skip_invalid=True)
    (adapter / "run_args.json").write_text(json.dumps(args))
    info = json.loads((adapter / "run_info.json").read_text())
    info["data_content"] = data_content(str(data))
    (adapter / "run_info.json").write_text(json.dumps(info))
    report = merge(adapter, tmp_path / "m", fmt="int4", quant_method="gptq", log=quiet)
    assert report["eval_data_kind"] == "training-data" and report["eval_records"] == 4
    assert report["quantization"]["calib_samples"] == 4
    assert "1 skipped" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"--eval-data .*record 3.*no assistant turn"):
        merge(adapter, tmp_path / "m2", eval_data=str(data), log=quiet)
    args["data"]["skip_invalid"] = False  # a run that did not skip: the file is not what it read
    (adapter / "run_args.json").write_text(json.dumps(args))
    with pytest.raises(DataError, match="record 3.*no assistant turn"):
        merge(adapter, tmp_path / "m3", log=quiet)


@pytest.mark.parametrize("spec", ["{name}", "./{name},{name2}", "*.json"])
def test_training_data_named_relative_to_the_runs_dir_is_found_from_another(setup, tmp_path, monkeypatch, spec):
    """`-d data/train.json` typed in the checkout is recorded as typed: a merge run from another dir did not find
    it ("names no readable data file" for GPTQ's calibration, no loss in the report). run_args.json keeps the run's
    working dir, and the flag's relative paths (a list's, a pattern's) are read from there."""
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(setup["lora"], adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    where = tmp_path / "checkout"
    where.mkdir()
    shutil.copy2(setup["data"], where / "train.json")
    records = json.loads((where / "train.json").read_text())
    if "{name2}" in spec:  # two files the run read as one set: the run's content hash is of both
        (where / "train.json").write_text(json.dumps(records[:2]))
        (where / "train2.json").write_text(json.dumps(records[2:]))
    args = json.loads((adapter / "run_args.json").read_text())
    args["data"]["data_path"] = spec.format(name="train.json", name2="train2.json")
    args["cwd"] = str(where)
    (adapter / "run_args.json").write_text(json.dumps(args))
    info = json.loads((adapter / "run_info.json").read_text())
    from finetune.data.dataset import data_content

    monkeypatch.chdir(where)
    info["data_content"] = data_content(args["data"]["data_path"])  # (what the run recorded, read where it ran)
    (adapter / "run_info.json").write_text(json.dumps(info))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    report = merge(adapter, tmp_path / "m", dtype="fp32", log=quiet)
    assert report["eval_data_kind"] == "training-data" and report["eval_records"] == 4, report
    assert report["eval_data"].startswith(str(where))


def test_a_merge_report_with_no_scored_token_is_strict_json(setup, tmp_path, monkeypatch):
    # a NaN loss was written as NaN, which strict JSON parsers refuse
    import finetune.evaluate

    real = finetune.evaluate.eval_loss
    monkeypatch.setattr(finetune.evaluate, "eval_loss", lambda *a, **k: dict(real(*a, **k), loss=float("nan")))
    merge(setup["lora"], tmp_path / "m", eval_data=setup["data"], log=quiet)

    def refuse(word):
        raise ValueError(word)

    report = json.loads((tmp_path / "m" / "merge_report.json").read_text(), parse_constant=refuse)
    assert report["merged_loss"] is None and report["unmerged_loss"] is None


# -- what a merge writes: adapters of every layout, Int4 exactly as quantized, the report's numbers ------------


def _peft_adapter(base, out, **cfg):
    """An adapter of `cfg` on `base` with random B (and perturbed modules_to_save copies), saved as PEFT saves it."""
    import shutil

    from peft import LoraConfig, get_peft_model

    model = load_model(base, dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **cfg))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(out)
    for name in ("qwen.tiktoken", "tokenizer_config.json"):
        shutil.copy2(base / name, out / name)
    return out


ADAPTER_LAYOUTS = {
    "rank_and_alpha_patterns": dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "w1", "w2"],
                                    rank_pattern={"h.0.attn.c_attn": 4, "w2": 2},
                                    alpha_pattern={"h.1.mlp.c_proj": 64}),
    "rslora_on_two_linears": dict(r=8, lora_alpha=16, target_modules=["c_attn", "w1"], use_rslora=True),
    "one_linear": dict(r=4, lora_alpha=8, target_modules=["w2"]),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["c_attn"], modules_to_save=["wte", "lm_head"]),
}


@pytest.mark.parametrize("layout", sorted(ADAPTER_LAYOUTS))
@pytest.mark.parametrize("base", ["float", "int4"])
def test_every_adapter_layout_merges_to_what_the_unmerged_adapter_computes(setup, tmp_path, layout, base):
    from finetune.quant.packing import dequantize
    from finetune.quant.rtn import quantize_weight

    adapter = _peft_adapter(setup[base], tmp_path / "adapter", **ADAPTER_LAYOUTS[layout])
    unmerged = load_model(setup[base], adapter=adapter, dtype=torch.float32, device="cpu")
    ref = logits(unmerged)
    merge(adapter, tmp_path / "f", dtype="fp32", n_eval=0, log=quiet)
    merged = load_model(tmp_path / "f", dtype=torch.float32, device="cpu")
    assert (logits(merged) - ref).abs().max() < 1e-4
    # Int4 (round-to-nearest): every block Linear holds exactly the quantized merged weight; the rest (wte and lm_head
    # of modules_to_save included) the merged tensors in fp16
    merge(adapter, tmp_path / "q", fmt="int4", group_size=32, n_eval=0, log=quiet)
    int4 = load_model(tmp_path / "q", dtype=torch.float32, device="cpu")
    floats = dict(merged.named_parameters())
    for name, m in int4.named_modules():
        if type(m).__name__ == "GPTQLinear":
            q = quantize_weight(floats[f"{name}.weight"].detach(), group_size=32)
            want = dequantize(q["qweight"], q["qzeros"], q["scales"], q["g_idx"], 4)
            got = dequantize(m.qweight, m.qzeros, m.scales, m.g_idx, 4)
            assert torch.equal(got, want), name
    for key in ("transformer.wte.weight", "lm_head.weight"):
        assert torch.equal(dict(int4.named_parameters())[key], floats[key].half().float()), key


def test_gptq_act_order_export_holds_what_gptq_chose_and_the_report_is_its_loss(setup, tmp_path, monkeypatch):
    import finetune.quant.gptq as gptq
    from finetune.evaluate import eval_loss, load_eval_records
    from finetune.quant.packing import dequantize
    from finetune.tokenization import load_tokenizer

    chosen = []
    real = gptq.gptq_quantize_weight

    def spy(W, H, **k):
        packed = real(W, H, **k)
        chosen.append(packed["dequantized"].clone())
        return packed

    monkeypatch.setattr(gptq, "gptq_quantize_weight", spy)
    adapter = _peft_adapter(setup["float"], tmp_path / "adapter", **ADAPTER_LAYOUTS["rank_and_alpha_patterns"])
    out = tmp_path / "gptq"
    report = merge(adapter, out, fmt="int4", quant_method="gptq", desc_act=True, group_size=16,
                   calib_data=setup["data"], eval_data=setup["data"], log=quiet)
    model = load_model(out, dtype=torch.float32, device="cpu")
    layers = [m for m in model.modules() if type(m).__name__ == "GPTQLinear"]
    assert len(layers) == len(chosen) == 10
    for m, want in zip(layers, chosen):
        assert bool((m.g_idx[1:] < m.g_idx[:-1]).any())  # act-order: groups are not in column order
        assert torch.equal(dequantize(m.qweight, m.qzeros, m.scales, m.g_idx, 4), want)
    # the report's numbers are the written model's, over the records it names
    records = load_eval_records(setup["data"])
    got = eval_loss(model, load_tokenizer(out), records, max_len=model.config.seq_length)
    assert report["merged_loss"] == pytest.approx(got["loss"], rel=1e-6) and report["eval_records"] == len(records)
    assert report["loss_delta"] == pytest.approx(report["merged_loss"] - report["unmerged_loss"])
    assert report["quantization"] == {"method": "gptq", "bits": 4, "group_size": 16, "desc_act": True,
                                      "damp_percent": 0.01, "true_sequential": True, "calib_data": str(setup["data"]),
                                      "calib_samples": 4}


def test_an_adapters_hub_id_is_fetched_and_merged(setup, tmp_path, monkeypatch):
    """`qwen-ft merge --adapter org/name` (as chat takes one) was "adapter org/name does not exist"."""
    import huggingface_hub

    from finetune.cli import main

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda ref, **k: str(setup["lora"]))
    monkeypatch.chdir(tmp_path)
    assert main(["merge", "--adapter", "org/memorised", "-o", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


def test_a_loss_that_leaves_out_conversations_says_so(setup, tmp_path):
    # (with every prompt past seq_length the report read "loss ... nan", nothing said why)
    long = tmp_path / "long.json"
    long.write_text(json.dumps([{"messages": [{"role": "user", "content": "word " * 400},
                                              {"role": "assistant", "content": "x"}]}] + memorise_records()))
    lines = []
    merge(setup["lora"], tmp_path / "m", dtype="fp32", eval_data=long, log=lines.append)
    assert any("leaves out 1 of 5 conversations" in line for line in lines), lines


def test_a_loss_over_truncated_conversations_says_so(setup, tmp_path):
    # (a held-out reply past seq_length was scored up to it, as eval scores it, and nothing said so; eval's note did)
    long = tmp_path / "long.json"
    long.write_text(json.dumps(memorise_records() + [{"messages": [{"role": "user", "content": "tell me"},
                                                                    {"role": "assistant", "content": "word " * 400}]}]))
    lines = []
    merge(setup["lora"], tmp_path / "m", dtype="fp32", eval_data=long, log=lines.append)
    assert [line for line in lines if "note:" in line] == [
        "merge: note: the loss scores 1 of 5 conversations truncated to the model's seq_length 256, as training "
        "truncates them"]


def test_a_leading_tilde_in_the_output_flag_is_the_home_dir(setup, tmp_path, monkeypatch):
    # the shell leaves --output=~/x as it is: the merge went into a dir named "~" in the working dir, then its
    # reload (which expanded the ~) found nothing there and stopped
    import shutil

    from finetune.cli import main

    shutil.copytree(setup["lora"], tmp_path / "home" / "lora")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["merge", "--adapter=~/lora", "--output=~/merged", "--eval-data", str(setup["data"])]) == 0
    assert (tmp_path / "home" / "merged" / "config.json").is_file() and not (tmp_path / "~").exists()


# -- where users take a merged dir: the official remote code, vLLM, this project's loader --------------------------


def _int4_with_gptq_biases(path, value=0.0, nonzero_in=None):
    """A demo Int4 dir whose checkpoint holds a bias for every quantized Linear, as auto-gptq wrote Qwen's Int4
    releases (zeros for attn.c_proj and the MLP's three, which Qwen v1 builds without one); ``nonzero_in``: the one
    module whose bias is ``value``."""
    from safetensors.torch import load_file, save_file

    make_demo_model(path, int4=True)
    sd = load_file(path / "model.safetensors")
    for k in [k for k in sd if k.endswith(".qweight") and ".c_attn." not in k]:
        module = k[:-len(".qweight")]
        bias = torch.zeros(sd[f"{module}.scales"].shape[1], dtype=torch.float16)
        if module == nonzero_in:
            bias += value
        sd[f"{module}.bias"] = bias
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_a_float_merge_of_an_int4_base_with_auto_gptqs_zero_biases_loads(tmp_path):
    """The float export wrote the Int4 checkpoint's zero biases of attn.c_proj, w1, w2 and mlp.c_proj: keys the float
    Qwen v1 model does not have, so the merge's own reload (and every later load here) refused the dir it had
    written. They go (from the Int4 export too); the model computes the same. PEFT's own merge_and_unload +
    save_pretrained wrote them as well."""
    from peft import PeftModel

    from safetensors import safe_open

    from _helpers import random_adapter

    base = _int4_with_gptq_biases(tmp_path / "int4")
    adapter = random_adapter(base, tmp_path / "qlora")
    out = tmp_path / "float"
    merge(adapter, out, dtype="fp32", n_eval=0, log=quiet)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert sorted(k for k in f.keys() if k.endswith(".bias")) == [
            "transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"]
    ref = load_model(base, adapter=adapter, dtype=torch.float32, device="cpu")
    merged = load_model(out, dtype=torch.float32, device="cpu")
    assert (logits(merged) - logits(ref)).abs().max() < 1e-4
    merge(adapter, tmp_path / "int4_out", fmt="int4", n_eval=0, log=quiet)
    assert load_model(tmp_path / "int4_out", dtype=torch.float32, device="cpu").transformer.h[0].mlp.w1.bias is None
    peft_merged = PeftModel.from_pretrained(load_model(base, dtype=torch.float32, device="cpu"),
                                            str(adapter)).merge_and_unload()
    peft_merged.save_pretrained(tmp_path / "peft_saved")
    reloaded = load_model(tmp_path / "peft_saved", dtype=torch.float32, device="cpu")
    assert (logits(reloaded) - logits(ref)).abs().max() < 1e-4


def test_a_non_zero_bias_the_float_architecture_cannot_hold_is_refused_not_dropped(tmp_path):
    from _helpers import random_adapter

    base = _int4_with_gptq_biases(tmp_path / "int4", value=0.5, nonzero_in="transformer.h.1.mlp.w2")
    adapter = random_adapter(base, tmp_path / "qlora")
    with pytest.raises(MergeError, match=r"transformer\.h\.1\.mlp\.w2\.bias: the base stores a non-zero bias"):
        merge(adapter, tmp_path / "float", n_eval=0, log=quiet)
    assert not (tmp_path / "float" / "config.json").exists()


def _vllm_reads(sd: dict, module: str, qc: dict) -> dict:
    """W [out, in] of one GPTQ Linear as vLLM's kernels read the checkpoint, written here from its
    quantization/gptq.py and gptq_marlin.py (not imported): words unpacked lowest bits first (qweight along the
    inputs, qzeros along the outputs); "exllama" (gptq_gemm): zero = stored + 1 unless checkpoint_format is
    gptq_v2, the rows sorted by g_idx when desc_act (else g_idx is not read) and sorted row j in group j //
    group_size; "marlin" (sym only): qzeros are not read, the zero is 2^(bits-1) (uint4b8 / uint8b128)."""
    bits, gs = qc["bits"], qc["group_size"]
    qweight, qzeros, scales, g_idx = (sd[f"{module}.{a}"] for a in ("qweight", "qzeros", "scales", "g_idx"))
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    q = ((qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & (2**bits - 1)).reshape(-1, qweight.shape[1])
    z = ((qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & (2**bits - 1)).reshape(qzeros.shape[0], -1)
    rows = q.shape[0]
    gs = rows if gs == -1 else gs
    group = torch.arange(rows) // gs
    if qc["desc_act"]:
        group = torch.empty_like(group)
        group[torch.argsort(g_idx.long())] = torch.arange(rows) // gs
    zero = z + (0 if qc.get("checkpoint_format") == "gptq_v2" else 1)
    out = {"exllama": ((q - zero[group]).float() * scales.float()[group]).t()}
    if qc["sym"]:
        out["marlin"] = ((q - 2 ** (bits - 1)).float() * scales.float()[group]).t()
    return out


@pytest.mark.parametrize("method, extra", [("rtn", {}), ("gptq", {}), ("gptq", {"desc_act": True}),
                                           ("rtn", {"bits": 8, "group_size": 64})])
def test_an_int4_export_reads_the_same_under_vllms_gptq_and_marlin_conventions(tmp_path, method, extra):
    """What vLLM computes from the export (its GPTQ and Marlin layers, re-derived in _vllm_reads) is exactly what this
    project's GPTQ layer dequantizes, and the config carries what vLLM's configs read."""
    from safetensors import safe_open

    from _helpers import random_adapter

    base = make_demo_model(tmp_path / "int4", int4=True)
    adapter = random_adapter(base, tmp_path / "qlora")
    data = write_memorise(tmp_path / "calib.json")
    out = tmp_path / "out"
    merge(adapter, out, fmt="int4", quant_method=method, calib_data=data if method == "gptq" else None, n_eval=0,
          log=quiet, **extra)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    # GPTQConfig.from_config's required keys, v1 zeros (no checkpoint_format), an unquantized lm_head; Marlin's
    # conditions (quant_method gptq, sym, a group size it has kernels for)
    assert {"bits", "group_size", "desc_act"} <= set(qc) and "checkpoint_format" not in qc and not qc.get("lm_head")
    assert qc["quant_method"] == "gptq" and qc["sym"] is True and qc["group_size"] in (-1, 32, 64, 128)
    assert qc["desc_act"] is bool(extra.get("desc_act")) and qc["bits"] == extra.get("bits", 4)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    model = load_model(out, dtype=torch.float32, device="cpu")
    gptq = {n: m for n, m in model.named_modules() if type(m).__name__ == "GPTQLinear"}
    # vLLM takes the modules holding non-float tensors as the quantized ones: exactly the five Linears of each block
    assert {k.rpartition(".")[0] for k, v in sd.items() if not v.is_floating_point()} == set(gptq)
    assert len(gptq) == 10
    for name, layer in gptq.items():
        assert [sd[f"{name}.{a}"].dtype for a in ("qweight", "qzeros", "scales", "g_idx")] == [
            torch.int32, torch.int32, torch.float16, torch.int32]
        own = layer.dequantize(torch.float32)
        for kernel, w in _vllm_reads(sd, name, qc).items():
            assert torch.equal(w, own), (name, kernel)
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}  # wte, lm_head, norms: fp16


def test_a_group_size_that_does_not_divide_a_linears_inputs_is_warned_about_naming_vllm(tmp_path):
    from _helpers import random_adapter

    base = make_demo_model(tmp_path / "int4", int4=True)
    adapter = random_adapter(base, tmp_path / "qlora")
    report = merge(adapter, tmp_path / "g48", fmt="int4", group_size=48, n_eval=0, log=quiet)
    assert any("--group-size 48 does not divide the 64 inputs of transformer.h.0.attn.c_attn (nor those of 9 more"
               in w and "vLLM refuses" in w and "--group-size 64 divides" in w for w in report["warnings"]), report
    assert load_model(tmp_path / "g48", dtype=torch.float32, device="cpu") is not None  # (read here all the same)
    report = merge(adapter, tmp_path / "g32", fmt="int4", group_size=32, n_eval=0, log=quiet)
    assert "warnings" not in report


def test_the_merged_config_says_its_dtype_as_the_official_code_and_its_rotary_base_as_vllm_read_them(tmp_path):
    """The official modeling_qwen.py casts the model by config.json's bf16/fp16/fp32 flags (none true: bf16 where the
    GPU has it), so a base config without them gave an fp16 or fp32 merge loaded as bf16; vLLM's Qwen model reads
    the rotary base from rope_theta (default 10000), where Qwen's configs say rotary_emb_base."""
    from _helpers import random_adapter

    base = make_demo_model(tmp_path / "float", rotary_emb_base=50000)
    cfg = json.loads((base / "config.json").read_text())
    for flag in ("bf16", "fp16", "fp32"):
        del cfg[flag]
    (base / "config.json").write_text(json.dumps(cfg))
    adapter = random_adapter(base, tmp_path / "lora")
    for dtype, flag in (("fp16", "fp16"), ("fp32", "fp32"), ("bf16", "bf16")):
        out = tmp_path / dtype
        merge(adapter, out, dtype=dtype, n_eval=0, log=quiet)
        written = json.loads((out / "config.json").read_text())
        assert {f: written[f] for f in ("bf16", "fp16", "fp32")} == {f: f == flag for f in ("bf16", "fp16", "fp32")}
        assert written["rope_theta"] == written["rotary_emb_base"] == 50000
    merge(adapter, tmp_path / "int4", fmt="int4", n_eval=0, log=quiet)
    written = json.loads((tmp_path / "int4" / "config.json").read_text())
    assert (written["fp16"], written["bf16"], written["fp32"], written["rope_theta"]) == (True, False, False, 50000)
    merged = load_model(tmp_path / "fp32", dtype=torch.float32, device="cpu")
    ref = load_model(base, adapter=adapter, dtype=torch.float32, device="cpu")
    assert (logits(merged) - logits(ref)).abs().max() < 1e-4
    # Qwen-14B's base (10000, vLLM's default) adds nothing to the base's config
    other = make_demo_model(tmp_path / "b10k")
    merge(random_adapter(other, tmp_path / "lora10k"), tmp_path / "o10k", n_eval=0, log=quiet)
    assert "rope_theta" not in json.loads((tmp_path / "o10k" / "config.json").read_text())
