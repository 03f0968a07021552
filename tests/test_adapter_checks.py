"""One checked path for every adapter load (issue 14 items 4, 17, 18): finetune.load_model, --lora_weight_path and
PEFT's own PeftModel / AutoPeftModelForCausalLM after `import finetune`; the base recorded with a fingerprint;
PEFT's merge_and_unload on an Int4 base writing a float model dir that loads."""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import finetune  # noqa: F401  (installs the PEFT hooks)
from finetune import load_model
from finetune.adapters import AdapterError, BASE_RECORD
from finetune.demo import make_demo_model

from _helpers import random_adapter, train_args, write_memorise

IDS = torch.tensor([[1841, 872, 198, 100, 200, 300, 17, 5]])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_checks")
    d = {"root": root, "data": write_memorise(root / "mem.json")}
    d["float"] = make_demo_model(root / "float")
    d["int4"] = make_demo_model(root / "int4", int4=True)
    d["float1"] = make_demo_model(root / "float1", num_hidden_layers=1)
    d["float3"] = make_demo_model(root / "float3", num_hidden_layers=3)
    d["lora"] = random_adapter(d["float"], root / "lora")
    d["lora1"] = random_adapter(d["float1"], root / "lora1")
    d["lora3"] = random_adapter(d["float3"], root / "lora3")
    d["qlora"] = random_adapter(d["int4"], root / "qlora", targets=("c_attn", "w1"))
    return d


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def retarget(adapter, base, out) -> Path:
    """A copy of ``adapter`` whose config says it belongs to ``base`` (as if trained there), no fingerprint."""
    shutil.copytree(adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    (out / BASE_RECORD).unlink()
    return out


def with_tensors(adapter, out, change) -> Path:
    shutil.copytree(adapter, out)
    sd = load_file(str(out / "adapter_model.safetensors"))
    change(sd)
    save_file(sd, str(out / "adapter_model.safetensors"))
    return out


# -- item 17: one checked path -----------------------------------------------------------------------------------


@pytest.mark.parametrize("other, first_bad", [("lora1", r"missing.*transformer\.h\.1\."),
                                              ("lora3", r"transformer\.h\.2\..*has no place")])
def test_adapter_of_another_layer_count_is_refused_everywhere(setup, tmp_path, capsys, other, first_bad):
    from peft import AutoPeftModelForCausalLM, PeftModel

    from finetune.train import main

    adapter = retarget(setup[other], setup["float"], tmp_path / "adapter")
    with pytest.raises(AdapterError, match=first_bad):
        load_model(setup["float"], adapter=adapter, device="cpu")
    with pytest.raises(AdapterError, match=first_bad):
        AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    with pytest.raises(AdapterError, match=first_bad):
        PeftModel.from_pretrained(load_model(setup["float"], device="cpu"), str(adapter))
    rc = main(train_args(setup["float"], setup["data"], tmp_path / "out", "--max_steps", "1", "--use_lora", "True",
                         "--lora_weight_path", str(adapter)))
    err = capsys.readouterr().err
    assert rc == 2 and "--lora_weight_path" in err and str(adapter) in err, err


@pytest.mark.parametrize("change, expect", [
    (lambda sd: sd.update({k: torch.full_like(v, float("nan")) for k, v in sd.items()}),
     r"tensor '.*lora_[AB]\.weight' has \d+ of \d+ values NaN or infinite"),
    (lambda sd: sd.update({k: v.to(torch.int64) for k, v in sd.items()}),
     r"tensor '.*lora_[AB]\.weight' in adapter_model\.safetensors is I64; LoRA weights are float"),
])
def test_nan_and_integer_adapters_are_refused(setup, tmp_path, change, expect):
    from peft import PeftModel

    adapter = with_tensors(setup["lora"], tmp_path / "bad", change)
    with pytest.raises(AdapterError, match=expect):
        load_model(setup["float"], adapter=adapter, device="cpu")
    with pytest.raises(AdapterError, match=expect):
        PeftModel.from_pretrained(load_model(setup["float"], device="cpu"), str(adapter))


def test_inflating_legacy_bin_is_refused_before_it_is_read(setup, tmp_path, monkeypatch):
    adapter = tmp_path / "bomb"
    shutil.copytree(setup["lora"], adapter)
    (adapter / "adapter_model.safetensors").unlink()
    plain = tmp_path / "plain.bin"
    torch.save({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4096, 4096)}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(adapter / "adapter_model.bin", "w",
                                                        compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert os.path.getsize(adapter / "adapter_model.bin") < 2**20 < 64 * 2**20
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.load was called"))
    with pytest.raises(AdapterError, match=r"adapter_model\.bin \(\d+ bytes\) inflates to \d+ bytes"):
        load_model(setup["float"], adapter=adapter, device="cpu")
    assert not calls


def test_truncated_adapter_file_names_the_tensor(setup, tmp_path):
    adapter = tmp_path / "cut"
    shutil.copytree(setup["lora"], adapter)
    f = adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: tensor '.*' ends at byte .*truncated"):
        load_model(setup["float"], adapter=adapter, device="cpu")


def test_lora_weight_path_continues_from_the_adapter(setup, tmp_path):
    """--lora_weight_path goes through finetune.adapters.load_adapter and trains that adapter's weights."""
    from finetune.train import main

    out = tmp_path / "continued"
    assert main(train_args(setup["float"], setup["data"], out, "--max_steps", "1", "--use_lora", "True",
                           # (0 is refused: it trains nothing; steps this small round away in fp32)
                           "--learning_rate", "1e-30", "--lora_weight_path", str(setup["lora"]),
                           "--lora_r", "4", "--lora_alpha", "8")) == 0  # (the adapter's: train_args' are refused)
    a = load_file(str(setup["lora"] / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_flags_the_adapter_overrides_are_refused(setup, tmp_path, capsys):
    """--lora_weight_path trains the adapter's own LoRA config: --lora_r 8 --lora_target_modules w1 beside it were
    silently not applied. Set to another value than the adapter's, they are one line before anything loads; at the
    adapter's values (target modules in any order) the run trains."""
    from finetune.train import main

    out = tmp_path / "refused"
    argv = train_args(setup["float"], setup["data"], out, "--max_steps", "1", "--use_lora", "True",
                      "--lora_weight_path", str(setup["lora"]), "--lora_r", "8", "--lora_dropout", "0.1",
                      "--lora_target_modules", "w1")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --lora_weight_path {setup['lora']} trains on with the adapter's own LoRA settings (its "
                   "adapter_config.json), so --lora_r 8 (the adapter's: 4), --lora_alpha 32 (the adapter's: 8), "
                   "--lora_dropout 0.1 (the adapter's: 0.0), --lora_target_modules w1 (the adapter's: c_attn c_proj "
                   "w1 w2) would not be applied: drop them, or train a new adapter without --lora_weight_path"], err
    assert not (out / "adapter_model.safetensors").exists()
    assert main(train_args(setup["float"], setup["data"], tmp_path / "same", "--max_steps", "1", "--use_lora", "True",
                           "--lora_weight_path", str(setup["lora"]), "--lora_r", "4", "--lora_alpha", "8",
                           "--lora_target_modules", "w2", "w1", "c_proj", "c_attn")) == 0


# -- item 18: the base, by absolute path and fingerprint ----------------------------------------------------------


def test_adapter_records_absolute_base_and_fingerprint(setup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(setup["float"], tmp_path / "models" / "fp")
    adapter = random_adapter("models/fp", tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((tmp_path / "models" / "fp").resolve())
    record = json.loads((adapter / BASE_RECORD).read_text())
    assert record["path"] == cfg["base_model_name_or_path"] and record["fingerprint"]["weights"]
    ref = logits(load_model(None, adapter=adapter, device="cpu"))

    # another directory holding a different model at the same relative path: the recorded base still loads
    elsewhere = tmp_path / "elsewhere"
    make_demo_model(elsewhere / "models" / "fp", seed=5)
    monkeypatch.chdir(elsewhere)
    assert torch.equal(logits(load_model(None, adapter=adapter, device="cpu")), ref)


def test_base_with_another_fingerprint_is_refused_naming_both(setup, tmp_path, caplog):
    from peft import AutoPeftModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(setup["float"], base)
    adapter = random_adapter(base, tmp_path / "adapter")
    shutil.rmtree(base)
    make_demo_model(base, seed=7, intermediate_size=512)  # same path, another model
    with pytest.raises(AdapterError, match=rf"trained on {base}.*{base} is not that model \(config\.json differs\)"):
        load_model(None, adapter=adapter, device="cpu")
    with pytest.raises(AdapterError, match=r"not that model"):
        AutoPeftModelForCausalLM.from_pretrained(str(adapter))

    # named explicitly (-m), a different dir: loaded, with a warning naming both
    other = make_demo_model(tmp_path / "other", seed=3)
    with caplog.at_level(logging.WARNING, logger="finetune.adapters"):
        load_model(other, adapter=adapter, device="cpu")
    assert any(str(base) in r.message and str(other) in r.message and "as asked" in r.message
               for r in caplog.records)


def test_a_named_base_that_is_not_the_recorded_one_warns_once(setup, tmp_path, caplog):
    # chat, eval and merge check the base when they resolve it and load_adapter checks it again: the same warning
    # was printed twice
    from finetune.chat import main

    adapter = random_adapter(setup["float"], tmp_path / "adapter")
    other = make_demo_model(tmp_path / "other", seed=3)
    with caplog.at_level(logging.WARNING, logger="finetune.adapters"):
        assert main(["-m", str(other), "--adapter", str(adapter), "--query", "hi", "--max_new_tokens", "2"]) == 0
    assert [r.message for r in caplog.records].count(
        f"adapter {adapter} was trained on {setup['float'].resolve()}, but the base {other.resolve()} is not that "
        f"model (its weight files differ (names, sizes or sampled contents)); loading it as asked") == 1


def test_served_adapters_after_the_first_are_checked_against_the_base_too(setup, caplog):
    # serve loads the first adapter through load_adapter and the rest through add_adapter, which skipped the base
    # check: a float-trained adapter second on an Int4 base was served without the warning the first one gets
    from finetune.serve.models import load_served_model

    with caplog.at_level(logging.WARNING, logger="finetune.adapters"):
        load_served_model(setup["int4"], [("q", str(setup["qlora"])), ("f", str(setup["lora"]))], device="cpu")
    assert [r.message for r in caplog.records if "trained on a float model" in r.message] == [
        f"adapter {setup['lora']} was trained on a float model ({setup['float'].resolve()}) and is being put on "
        f"the Int4 base {setup['int4']}: its deltas meet rounded weights it never saw; use the float base (-m) "
        f"unless this is what you want"]


def _legacy_bias_adapter(base, out) -> Path:
    """An adapter with bias "all" whose trained c_attn biases are saved under PEFT 0.5's names ('<module>.bias')."""
    adapter = random_adapter(base, out, bias="all")
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    sd = {k.replace(".base_layer.bias", ".bias"): v + 0.5 if k.endswith(".bias") else v for k, v in sd.items()}
    save_file(sd, str(adapter / "adapter_model.safetensors"))
    return adapter


def test_served_adapters_after_the_first_take_every_check_the_first_takes(setup, tmp_path):
    # the second adapter on went through serve's own add_adapter, which skipped the value check (a NaN adapter was
    # served, and since the engine computes every adapter for every row, weighted 0/1, it broke the other adapters'
    # replies too) and the renaming of PEFT 0.5's bias keys (PEFT dropped those biases unseen)
    from finetune.serve.models import load_served_model

    nan = with_tensors(setup["lora"], tmp_path / "nan", lambda sd: sd.update(
        {k: torch.full_like(v, float("nan")) for k, v in sd.items() if ".h.1.mlp.w2.lora_B" in k}))
    with pytest.raises(AdapterError, match=r"nan: tensor '.*\.h\.1\.mlp\.w2\.lora_B\.weight' has \d+ of \d+ values "
                                           r"NaN or infinite"):
        load_served_model(setup["float"], [("a", str(setup["lora"])), ("bad", str(nan))], device="cpu")
    legacy = _legacy_bias_adapter(setup["float"], tmp_path / "legacy")
    alone = load_model(setup["float"], adapter=legacy, dtype=torch.float32, device="cpu")
    served, _ = load_served_model(setup["float"], [("a", str(setup["lora"])), ("legacy", str(legacy))],
                                  dtype=torch.float32, device="cpu")
    served.set_adapter("legacy")
    torch.testing.assert_close(logits(served), logits(alone))


def test_load_adapter_adds_a_checked_adapter_to_a_peft_model(setup, tmp_path):
    # README's route to several adapters for the engine: load_adapter on the PeftModel load_model returned failed
    # with "PEFT did not load ..."
    from finetune.adapters import load_adapter

    second = random_adapter(setup["float"], tmp_path / "second", seed=5)
    model = load_model(setup["float"], adapter=setup["lora"], dtype=torch.float32, device="cpu")
    assert load_adapter(model, second, adapter_name="second") is model
    assert set(model.peft_config) == {"default", "second"} and model.active_adapter == "default"
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    model.set_adapter("second")
    torch.testing.assert_close(logits(model), logits(load_model(setup["float"], adapter=second, dtype=torch.float32,
                                                                device="cpu")))
    nan = with_tensors(second, tmp_path / "nan", lambda sd: sd.update(
        {k: torch.full_like(v, float("inf")) for k, v in sd.items()}))
    with pytest.raises(AdapterError, match="values NaN or infinite"):
        load_adapter(model, nan, adapter_name="nan")
    assert set(model.peft_config) == {"default", "second"}  # refused before PEFT added anything
    with pytest.raises(AdapterError, match="already holds an adapter named 'second'"):
        load_adapter(model, second, adapter_name="second")


def _config_changed(adapter, out, **changes) -> Path:
    shutil.copytree(adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("second, expect", [
    (lambda a, out: with_tensors(a, out, lambda sd: sd.update({k: v * float("nan") for k, v in sd.items()})),
     r"tensor '.*lora_[AB]\.weight' has \d+ of \d+ values NaN or infinite"),
    (lambda a, out: _config_changed(a, out, use_dora=True), r"adapter_config\.json sets use_dora: True \(DoRA"),
    (lambda a, out: with_tensors(a, out, lambda sd: [sd.pop(k) for k in list(sd) if ".h.1.mlp.w1.lora_B" in k]),
     r"does not fit this model: 1 tensor\(s\) the config targets are missing from its weights, first "
     r"'base_model\.model\.transformer\.h\.1\.mlp\.w1\.lora_B\.weight'"),
    (lambda a, out: _config_changed(a, out, r=8), r"does not fit this model: '.*lora_A\.weight' has shape \[4, 64\], "
                                                  r"the model needs \[8, 64\]"),
], ids=["nan", "dora", "missing", "rank"])
def test_peft_load_adapter_on_the_projects_model_takes_the_checks(setup, tmp_path, second, expect):
    # PeftModel.load_adapter on a model from load_model(adapter=...) bypassed every check: a NaN, a DoRA (on an Int4
    # base) or an incomplete adapter was loaded, a rank mismatch was PEFT's many-line size dump
    model = load_model(setup["int4"], adapter=setup["qlora"], dtype=torch.float32, device="cpu")
    bad = second(setup["qlora"], tmp_path / "second")
    with pytest.raises(AdapterError, match=expect) as e:
        model.load_adapter(str(bad), adapter_name="second")
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    assert set(model.peft_config) == {"default"}  # refused before PEFT built anything


def test_peft_load_adapter_on_the_projects_model_loads_what_the_checked_path_loads(setup, tmp_path):
    legacy = _legacy_bias_adapter(setup["float"], tmp_path / "legacy")  # PEFT itself drops its biases unseen
    model = load_model(setup["float"], adapter=setup["lora"], dtype=torch.float32, device="cpu")
    model.load_adapter(str(legacy), adapter_name="legacy")
    model.set_adapter("legacy")
    torch.testing.assert_close(logits(model), logits(load_model(setup["float"], adapter=legacy, dtype=torch.float32,
                                                                device="cpu")))


# -- item 4: PEFT's merge route on an Int4 base -------------------------------------------------------------------


def test_peft_merge_and_unload_on_int4_writes_a_float_model_dir(setup, tmp_path):
    from peft import AutoPeftModelForCausalLM

    ref = load_model(setup["int4"], adapter=setup["qlora"], dtype=torch.float32, device="cpu")
    merged = AutoPeftModelForCausalLM.from_pretrained(str(setup["qlora"])).merge_and_unload()
    out = tmp_path / "merged"
    merged.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert not [k for k in load_file(str(out / "model.safetensors")) if k.endswith((".qweight", ".g_idx"))]
    reloaded = load_model(out, dtype=torch.float32, device="cpu")
    diff = (logits(reloaded) - logits(ref)).abs().max()
    assert diff < 1e-4, diff
    from transformers import AutoModelForCausalLM

    auto = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert (logits(auto) - logits(ref)).abs().max() < 1e-4


@pytest.mark.parametrize("change, expect", [
    (lambda cfg: cfg.pop("target_modules"), "adapter_config.json: names no target_modules"),
    (lambda cfg: cfg.update(rank_pattern={"c_attn": "x"}), "rank_pattern must map module names to positive numbers"),
    (lambda cfg: cfg.update(alpha_pattern={"w1": 0}), "alpha_pattern must map module names to positive numbers"),
])
def test_adapter_configs_without_targets_or_with_bad_patterns_are_one_clear_error(setup, tmp_path, capsys, change,
                                                                                   expect):
    """PEFT's LoraConfig leaves target_modules None when the config omits it (PEFT has no default for Qwen) and
    takes rank_pattern's values as they are: the load ended in PEFT's TypeError / int()'s ValueError (a traceback
    from qwen-ft chat). Now an AdapterError naming the key, in chat as in PEFT's own load."""
    from peft import PeftModel

    from finetune.cli import main

    adapter = shutil.copytree(setup["lora"], tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    change(cfg)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=expect):
        PeftModel.from_pretrained(load_model(setup["float"], device="cpu"), str(adapter))
    assert main(["chat", "-m", str(setup["float"]), "-a", str(adapter), "--query", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: adapter {adapter}: adapter_config.json: {expect.split(': ')[-1]}"), err


@pytest.mark.parametrize("base, broken", [("float", "truncated"), ("int4", "truncated"), ("float", "rank")])
def test_an_adapter_that_cannot_fit_is_refused_before_the_base_weights_load(setup, tmp_path, monkeypatch, base,
                                                                             broken):
    # the whole base loaded (minutes and the GPU's memory on a 14B model) before the adapter's header was read
    import finetune.quant.loading
    from finetune.modeling import QWenLMHeadModel

    adapter = setup["qlora"] if base == "int4" else setup["lora"]
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    weights = bad / "adapter_model.safetensors"
    if broken == "truncated":
        weights.write_bytes(weights.read_bytes()[:-4096])
    else:  # rank 8 said, rank 16 stored
        cfg = json.loads((bad / "adapter_config.json").read_text())
        cfg["r"] = cfg["r"] // 2
        (bad / "adapter_config.json").write_text(json.dumps(cfg))

    def loaded(*a, **k):
        raise AssertionError("the base's weights were loaded first")

    monkeypatch.setattr(QWenLMHeadModel, "from_pretrained", loaded)
    monkeypatch.setattr(finetune.quant.loading, "load_gptq_model", loaded)
    with pytest.raises(AdapterError, match="truncated" if broken == "truncated" else "does not fit this model"):
        load_model(setup[base], adapter=bad, device="cpu")


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_legacy_bin_that_would_run_code_is_one_line_without_torchs_advice(setup, tmp_path, capsys):
    # torch's UnpicklingError ran over seven lines and advised weights_only=False: for this file, running its code
    bad = tmp_path / "pickle"
    shutil.copytree(setup["lora"], bad)
    (bad / "adapter_model.safetensors").unlink()
    torch.save({"x": _RunsCode()}, str(bad / "adapter_model.bin"))
    with pytest.raises(AdapterError) as e:
        load_model(setup["float"], adapter=bad, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "weights_only set to False" not in msg, msg
    assert "it holds objects other than tensors: loading it would run code from the file" in msg, msg
    assert "this ran" not in capsys.readouterr().out
