"""Adapters for chat: the recorded base, a moved base, official finetune.py adapters (.bin, peft 0.5 config),
mismatches as clear errors, PEFT's AutoPeftModelForCausalLM on an Int4 base, and a trained adapter answering
through model.chat after a reload in a fresh process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune  # noqa: F401  (registrations)
from finetune import load_model, load_tokenizer
from finetune.adapters import AdapterError, check_adapter, read_adapter_weights
from finetune.demo import make_demo_model

from _helpers import MEMORISE, write_memorise, train_adapter, subprocess_env

IDS = torch.tensor([[1841, 872, 198, 100, 200, 300, 17, 5]])










@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    fl = make_demo_model(root / "float")
    i4 = make_demo_model(root / "int4", int4=True)
    data = root / "mem.json"
    write_memorise(data)
    lora = train_adapter(fl, data, root / "lora", 50)
    qlora = train_adapter(i4, data, root / "qlora", 50, "--q_lora", "True")
    return {"root": root, "float": fl, "int4": i4, "data": data, "lora": lora, "qlora": qlora}


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_recorded_base_and_moved_base(setup, tmp_path):
    a = load_model(None, adapter=setup["lora"])  # the base recorded in adapter_config.json
    ref = logits(a)
    moved_base = tmp_path / "moved_base"
    shutil.copytree(setup["float"], moved_base)
    adapter = tmp_path / "adapter"
    shutil.copytree(setup["lora"], adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone" / "Qwen-7B-Chat")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"gone.*--model"):
        load_model(None, adapter=adapter)
    b = load_model(moved_base, adapter=adapter)
    assert torch.equal(logits(b), ref)


OFFICIAL_CONFIG_2023 = {
    "auto_mapping": None,
    "base_model_name_or_path": "Qwen/Qwen-7B-Chat",
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "layers_pattern": None,
    "layers_to_transform": None,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "modules_to_save": None,
    "peft_type": "LORA",
    "r": 8,
    "revision": None,
    "target_modules": ["c_attn", "c_proj", "w1", "w2"],
    "task_type": "CAUSAL_LM",
    "enable_lora": None,
}
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


def write_official_adapter(base_dir, out, r=8, alpha=16, modules_to_save=False, seed=1):
    """An adapter as the official Qwen finetune.py (peft 0.5, 2023) wrote it, built by hand."""
    from safetensors.torch import load_file

    base = load_file(str(Path(base_dir) / "model.safetensors"))
    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for layer in range(cfg["num_hidden_layers"]):
        for t in TARGETS:
            name = f"transformer.h.{layer}.{t}"
            out_f, in_f = base[f"{name}.weight"].shape
            A = torch.randn(r, in_f, generator=g) * 0.2
            B = torch.randn(out_f, r, generator=g) * 0.2
            sd[f"base_model.model.{name}.lora_A.weight"] = A
            sd[f"base_model.model.{name}.lora_B.weight"] = B
            deltas[f"{name}.weight"] = B @ A * (alpha / r)
    config = dict(OFFICIAL_CONFIG_2023, r=r, lora_alpha=alpha)
    replaced = {}
    if modules_to_save:
        config["modules_to_save"] = ["wte", "lm_head"]
        for key in ("transformer.wte.weight", "lm_head.weight"):
            new = base[key] + torch.randn(base[key].shape, generator=g) * 0.05
            sd[f"base_model.model.{key}"] = new
            replaced[key] = new
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    torch.save(sd, out / "adapter_model.bin")
    return out, deltas, replaced


@pytest.mark.parametrize("modules_to_save", [False, True])
def test_official_finetune_py_adapter_loads_and_matches_hand_merge(setup, tmp_path, monkeypatch, modules_to_save):
    adapter, deltas, replaced = write_official_adapter(setup["float"], tmp_path / "official",
                                                       modules_to_save=modules_to_save)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = load_model(setup["float"], adapter=adapter, dtype=torch.float32, device="cpu")
    monkeypatch.setattr(torch, "load", real_load)
    assert calls and all(c is True for c in calls), calls

    base = load_model(setup["float"], dtype=torch.float32, device="cpu")
    with torch.no_grad():
        sd = base.state_dict()
        for k, d in deltas.items():
            sd[k] += d
        for k, v in replaced.items():
            sd[k].copy_(v)
    diff = (logits(model) - logits(base)).abs().max()
    assert diff < 1e-4, diff
    # and it really changes the output
    plain = load_model(setup["float"], dtype=torch.float32, device="cpu")
    assert (logits(model) - logits(plain)).abs().max() > 1e-2


def test_legacy_bin_is_never_unpickled(setup, tmp_path):
    adapter, _, _ = write_official_adapter(setup["float"], tmp_path / "evil")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(8, 64), "x": Evil()},
               adapter / "adapter_model.bin")
    with pytest.raises(AdapterError, match="weights_only"):
        read_adapter_weights(adapter)
    assert not (tmp_path / "pwned").exists()


def test_mismatched_adapters_are_clear_errors(setup, tmp_path):
    adapter = setup["lora"]
    other = make_demo_model(tmp_path / "wider", hidden_size=128, num_attention_heads=4, kv_channels=32)
    with pytest.raises(AdapterError) as e:
        load_model(other, adapter=adapter)
    msg = str(e.value)
    assert str(adapter) in msg and "transformer.h.0.attn.c_attn.lora_A.weight" in msg and "shape" in msg

    shallow = make_demo_model(tmp_path / "shallow", num_hidden_layers=1)
    with pytest.raises(AdapterError, match=r"transformer\.h\.1\..*has no place"):
        load_model(shallow, adapter=adapter)

    # rank layout: config says r=8, the tensors are r=16
    bad_rank = tmp_path / "bad_rank"
    shutil.copytree(adapter, bad_rank)
    cfg = json.loads((bad_rank / "adapter_config.json").read_text())
    cfg["r"] = 8
    (bad_rank / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"lora_A\.weight.*\[16, 64\].*needs \[8, 64\]"):
        load_model(setup["float"], adapter=bad_rank)

    # another architecture's target modules
    llama = tmp_path / "llama_adapter"
    shutil.copytree(adapter, llama)
    cfg["r"], cfg["target_modules"] = 16, ["q_proj", "v_proj"]
    (llama / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"none of its target modules.*q_proj"):
        load_model(setup["float"], adapter=llama)

    # a full model dir passed as an adapter
    with pytest.raises(AdapterError, match="not a PEFT adapter"):
        load_model(setup["float"], adapter=setup["float"])


@pytest.mark.parametrize("config, expect", [
    ([], "must be a JSON object, got list"),
    ({"peft_type": "LORA", "r": "16", "lora_alpha": 16}, "r must be a positive integer, got '16'"),
    ({"peft_type": "LORA", "r": 0}, "r must be a positive integer, got 0"),
    ({"peft_type": "LORA", "r": 16, "lora_alpha": "x"}, "lora_alpha must be a positive number, got 'x'"),
    ({"peft_type": "LORA", "r": 16, "target_modules": 5}, "target_modules must be .* got 5"),
    ({"peft_type": "LORA", "r": 16, "base_model_name_or_path": ["a"]}, "base_model_name_or_path must be a path"),
])
def test_adapter_config_of_the_wrong_shape_is_one_error(tmp_path, config, expect):
    # a hand-edited adapter_config.json: a line naming the file and the field, before PEFT builds a layer from it
    # (a string rank or alpha used to end in a TypeError inside the layer's construction)
    from finetune.adapters import read_adapter_config

    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=f"adapter_config.json.*{expect}"):
        read_adapter_config(tmp_path)


def test_check_adapter_finds_missing_tensors(setup, tmp_path):
    model = load_model(setup["float"], device="cpu")
    sd = read_adapter_weights(setup["lora"])
    sd.pop("base_model.model.transformer.h.1.mlp.w2.lora_B.weight")
    with pytest.raises(AdapterError, match=r"missing.*h\.1\.mlp\.w2\.lora_B"):
        check_adapter(model, setup["lora"], state_dict=sd)


def test_auto_peft_model_on_int4_base(setup):
    from peft import AutoPeftModelForCausalLM

    from finetune.quant.peft_lora import GPTQLoraLinear

    model = AutoPeftModelForCausalLM.from_pretrained(str(setup["qlora"]))
    assert any(isinstance(m, GPTQLoraLinear) for m in model.modules())
    ref = load_model(setup["int4"], adapter=setup["qlora"], dtype=torch.float32, device="cpu")
    model.eval()
    assert torch.allclose(logits(model), logits(ref), atol=1e-5)
    tok = load_tokenizer(setup["int4"])
    reply, _ = model.chat(tok, MEMORISE[1][0], do_sample=False, max_new_tokens=20)
    assert reply == MEMORISE[1][1]

    float_model = AutoPeftModelForCausalLM.from_pretrained(str(setup["lora"]))
    assert float_model.chat(tok, MEMORISE[0][0], do_sample=False, max_new_tokens=20)[0] == MEMORISE[0][1]


def test_trained_adapters_answer_after_reload_in_fresh_process(setup):
    """LoRA (float base) and Q-LoRA (Int4 base), each loaded from its dir alone in a new interpreter."""
    code = (
        "import json, sys\n"
        "from finetune import load_model, load_tokenizer\n"
        "qs = json.loads(sys.argv[1])\n"
        "out = {}\n"
        "for kind, adapter in json.loads(sys.argv[2]).items():\n"
        "    m = load_model(None, adapter=adapter)\n"
        "    tok = load_tokenizer(adapter)\n"
        "    out[kind] = [m.chat(tok, q, do_sample=False, max_new_tokens=24)[0] for q in qs]\n"
        "print(json.dumps(out))\n"
    )
    adapters = {k: str(setup[k]) for k in ("lora", "qlora")}
    r = subprocess.run([sys.executable, "-c", code, json.dumps([q for q, _ in MEMORISE]), json.dumps(adapters)],
                       capture_output=True, text=True, env=subprocess_env(), timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    answers = json.loads(r.stdout.strip().splitlines()[-1])
    for kind in adapters:
        assert answers[kind] == [a for _, a in MEMORISE], kind


def _edited(adapter, out, **changes) -> Path:
    """A copy of ``adapter`` with adapter_config.json values changed (no fingerprint: as if brought from elsewhere)."""
    shutil.copytree(adapter, out)
    (out / "base_model.json").unlink(missing_ok=True)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("key, value, what", [
    ("use_dora", True, "DoRA"),
    ("lora_bias", True, "a bias on lora_B"),
    ("layer_replication", [[0, 2], [1, 2]], "layers duplicated"),
    ("trainable_token_indices", [5, 6], "trained rows of the embedding"),
])
def test_adapter_variants_applied_otherwise_are_refused_in_one_line(setup, tmp_path, capsys, key, value, what):
    # a DoRA adapter was refused as "another architecture or layer count?" (its magnitude vectors had no place); a
    # lora_bias adapter loaded, and the engine and the Int4 merge left its bias out
    from peft import PeftModel

    from finetune.chat import main as chat_main
    from finetune.evaluate import main as eval_main
    from finetune.merge import main as merge_main

    adapter = _edited(setup["lora"], tmp_path / "variant", **{key: value})
    expect = rf"adapter_config\.json sets {key}: .*\({what}.*only plain LoRA"
    with pytest.raises(AdapterError, match=expect):
        load_model(setup["float"], adapter=adapter, device="cpu")
    with pytest.raises(AdapterError, match=expect):
        PeftModel.from_pretrained(load_model(setup["float"], device="cpu"), str(adapter))
    for main, args in ((chat_main, ["--adapter", str(adapter), "--query", "hi", "--max_new_tokens", "2"]),
                       (merge_main, ["--adapter", str(adapter), "-o", str(tmp_path / "merged")]),
                       (eval_main, ["--adapter", str(adapter), "--data", str(setup["data"]), "--no-generate"])):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and f"sets {key}" in lines[0], err


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_adapters_whose_load_rewrites_the_base_are_refused_in_one_line(setup, tmp_path, capsys, init):
    # PEFT saves PiSSA / OLoRA / CorDA adapters unconverted and, loading one, rewrites the base weights to the
    # residual: on an Int4 base a traceback ('GPTQLinear' object has no attribute 'weight'), on a float one the base
    # beside the adapter (eval's base column, the engine's rows without it, other adapters) silently was not the base
    # (LoRA-GA rewrote the base when its adapter started, which a load does not redo: on the float base it loaded
    # and answered otherwise than trained, off by the initial adapter's product)
    from peft import PeftModel

    from finetune.chat import main as chat_main

    changes = {"init_lora_weights": init}
    if init == "loftq":
        changes["loftq_config"] = {"loftq_bits": 4, "loftq_iter": 1}
    expect = rf"adapter_config\.json sets init_lora_weights: '{init}' \(.*rewrites the base weights"
    for base, adapter in (("int4", "qlora"), ("float", "lora")):
        edited = _edited(setup[adapter], tmp_path / base, **changes)
        with pytest.raises(AdapterError, match=expect):
            load_model(setup[base], adapter=edited, device="cpu")
        with pytest.raises(AdapterError, match=expect):
            PeftModel.from_pretrained(load_model(setup[base], device="cpu"), str(edited))
        capsys.readouterr()
        assert chat_main(["--adapter", str(edited), "--query", "hi", "--max_new_tokens", "2"]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        if init != "loftq":
            assert "path_initial_model_for_weight_conversion" in lines[0], lines


@pytest.mark.parametrize("init", ["orthogonal", "mica"])
def test_adapters_of_inits_that_read_the_base_weight_load_on_int4_and_float(setup, tmp_path, init):
    # these inits read the base layer's float weight only to choose A and B's starting values (which a load
    # overwrites): on an Int4 base PEFT stopped in them with "'GPTQLinear' object has no attribute 'weight'"
    from peft import PeftModel

    from finetune.adapters import load_adapter

    for base, adapter in (("int4", "qlora"), ("float", "lora")):
        edited = _edited(setup[adapter], tmp_path / base, init_lora_weights=init)
        want = logits(load_model(setup[base], adapter=setup[adapter], dtype=torch.float32, device="cpu"))
        got = logits(load_model(setup[base], adapter=edited, dtype=torch.float32, device="cpu"))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        pm = PeftModel.from_pretrained(load_model(setup[base], dtype=torch.float32, device="cpu"), str(edited))
        torch.testing.assert_close(logits(pm), want, rtol=0, atol=0)
        trainable = load_adapter(load_model(setup[base], dtype=torch.float32, device="cpu"), edited,
                                 is_trainable=True)
        grads = {name.split(".lora_")[1].split(".")[0]: p.requires_grad for name, p in trainable.named_parameters()
                 if ".lora_" in name}
        # MiCA trains A alone, its B frozen, as PEFT's MiCA variant keeps it on a float base
        assert grads == {"A": True, "B": init != "mica"}, (base, grads)


def test_a_mica_adapter_continued_on_int4_trains_a_alone(setup, tmp_path):
    edited = _edited(setup["qlora"], tmp_path / "mica", init_lora_weights="mica")
    out = train_adapter(setup["int4"], setup["data"], tmp_path / "more", 3, "--q_lora", "True", "--lora_weight_path",
                        str(edited))
    before, after = read_adapter_weights(edited), read_adapter_weights(out)
    assert before.keys() == after.keys()
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same == (".lora_B." in key), key
    assert json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] == "mica"


def test_a_pissa_adapter_converted_as_the_refusal_says_loads_and_gives_its_outputs(setup, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(load_model(setup["float"], dtype=torch.float32, device="cpu"),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "w1"], init_lora_weights="pissa",
                                   task_type="CAUSAL_LM"))
    pm.peft_config["default"].init_lora_weights = True  # (PEFT's recipe: the initial adapter saved as a plain one)
    pm.save_pretrained(tmp_path / "init")
    pm.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # "training"
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    want = logits(pm.eval())
    pm.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    got = logits(load_model(setup["float"], adapter=tmp_path / "converted", dtype=torch.float32, device="cpu"))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _bias_adapter(base_dir, out) -> Path:
    """An adapter saved by PEFT with bias "all": the c_attn biases trained (moved) with it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_model(base_dir, dtype=torch.float32, device="cpu")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "w1", "w2"],
                                          bias="all", init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith("base_layer.bias"):
                p.add_(0.5)
    pm.save_pretrained(out)
    return Path(out)


def test_trained_biases_under_peft_0_5_names_load(setup, tmp_path):
    # PEFT 0.5 (the official finetune.py's) saved a targeted module's trained bias as '<module>.bias'; today's PEFT
    # loads only '<module>.base_layer.bias' and dropped the others without a word
    from peft import PeftModel
    from safetensors.torch import load_file

    new = _bias_adapter(setup["float"], tmp_path / "new")
    sd = load_file(str(new / "adapter_model.safetensors"))
    assert any(k.endswith(".c_attn.base_layer.bias") for k in sd)
    legacy = _edited(new, tmp_path / "legacy")
    (legacy / "adapter_model.safetensors").unlink()
    torch.save({k.replace(".base_layer.bias", ".bias"): v for k, v in sd.items()}, legacy / "adapter_model.bin")
    want = logits(load_model(setup["float"], adapter=new, dtype=torch.float32, device="cpu"))
    got = logits(load_model(setup["float"], adapter=legacy, dtype=torch.float32, device="cpu"))
    assert torch.equal(got, want)
    peft_route = PeftModel.from_pretrained(load_model(setup["float"], dtype=torch.float32, device="cpu"), str(legacy))
    assert torch.equal(logits(peft_route.eval()), want)
    # the biases matter: without them the outputs differ
    without = _edited(legacy, tmp_path / "without")
    torch.save({k: v for k, v in torch.load(legacy / "adapter_model.bin").items() if not k.endswith(".bias")},
               without / "adapter_model.bin")
    assert (logits(load_model(setup["float"], adapter=without, dtype=torch.float32, device="cpu")) - want).abs().max() > 1e-2


def test_bias_tensors_that_do_not_fit_name_the_tensor(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = _bias_adapter(setup["float"], tmp_path / "bias")
    key = "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias"
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    sd[key] = torch.zeros(7)
    save_file(sd, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=rf"'{key}' has shape \[7\], the model needs \[192\]"):
        load_model(setup["float"], adapter=adapter, device="cpu")
    sd[key] = torch.zeros(192)
    sd["base_model.model.transformer.h.7.attn.c_attn.base_layer.bias"] = torch.zeros(192)  # a layer it lacks
    save_file(sd, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"'base_model\.model\.transformer\.h\.7\.attn\.c_attn\.base_layer\.bias' "
                                           r"\[192\] has no place"):
        load_model(setup["float"], adapter=adapter, device="cpu")
    # biases in an adapter whose config says bias "none" would change the base unannounced
    plain = _edited(adapter, tmp_path / "none", bias="none")
    with pytest.raises(AdapterError, match=r"base_layer\.bias' \[192\] has no place .*a bias, but adapter_config\.json "
                                           r"says bias 'none'"):
        load_model(setup["float"], adapter=plain, device="cpu")


@pytest.mark.parametrize("targets, suggested", [("c_attn|w1", '["c_attn", "w1"]'), ("c_attn", '["c_attn"]'),
                                               (r".*\.q_proj", '["c_attn", "c_proj", "w1", "w2"]')])
def test_a_target_modules_regex_is_named_as_one(setup, tmp_path, targets, suggested):
    # PEFT takes a string as one regex over whole module names: the message listed its letters, then said the adapter
    # was made for another architecture where a name meant as a list's ("c_attn") matched nothing
    adapter = _edited(setup["lora"], tmp_path / "regex", target_modules=targets)
    with pytest.raises(AdapterError) as e:
        load_model(setup["float"], adapter=adapter, device="cpu")
    assert str(e.value) == (
        f"adapter {adapter}: none of its target modules (regex) {targets!r} exist in this model (QWenLMHeadModel; "
        f"target_modules of adapter_config.json): a string is one regex that must match a module's whole name (as "
        f"'transformer.h.0.attn.c_attn'); a list, such as {suggested}, matches modules by the last parts of their "
        f"names")


def test_a_lora_on_lm_head_saves_and_loads_without_the_base_weight(setup, tmp_path):
    """PEFT saves a whole copy of lm_head's frozen base weight with a LoRA on lm_head (save_embedding_layers
    "auto"), which the adapter check refused as not fitting the model: every such trained adapter failed to load.
    Saved without it, the adapter loads and gives its own outputs; a file that holds the copy is refused saying so."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = load_model(setup["int4"], dtype=torch.float32, device="cpu")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "lm_head"],
                                          init_lora_weights=False, task_type="CAUSAL_LM"))
    want = logits(pm.eval())
    pm.save_pretrained(tmp_path / "a")
    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert not [k for k in sd if "base_layer" in k] and any(".lm_head.lora_A" in k for k in sd)
    got = logits(load_model(setup["int4"], adapter=tmp_path / "a", dtype=torch.float32, device="cpu"))
    torch.testing.assert_close(got, want)
    copy = _edited(tmp_path / "a", tmp_path / "copy")
    head = model.get_output_embeddings().weight.detach().clone()
    save_file({**sd, "base_model.model.lm_head.base_layer.weight": head}, str(copy / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="a whole copy of that base layer's weight.*save_embedding_layers=False"):
        check_adapter(load_model(setup["int4"], dtype=torch.float32, device="cpu"), copy)


def test_rank_and_alpha_patterns_with_alternation_match_as_peft_matches(setup, tmp_path):
    # PEFT matches a rank_pattern / alpha_pattern key as (.*\.)?(KEY)$; the adapter check's rank lookup left the key
    # ungrouped, so 'c_attn|w1' matched only c_attn and every w1 was refused as a shape mismatch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(load_model(setup["float"], dtype=torch.float32, device="cpu"),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "w1", "w2"],
                                   rank_pattern={"c_attn|w1": 8}, alpha_pattern={"c_proj|w1": 32},
                                   init_lora_weights=False, task_type="CAUSAL_LM"))
    want = logits(pm.eval())
    pm.save_pretrained(tmp_path / "alt")
    loaded = load_model(setup["float"], adapter=tmp_path / "alt", dtype=torch.float32, device="cpu")

    def layout(model):
        return {n: (m.r["default"], m.scaling["default"]) for n, m in model.named_modules()
                if isinstance(getattr(m, "r", None), dict) and "default" in m.r}

    assert layout(loaded) == layout(pm)
    assert layout(pm)["base_model.model.transformer.h.0.mlp.w1"] == (8, 4.0)  # both patterns matched w1
    assert layout(pm)["base_model.model.transformer.h.0.mlp.w2"] == (4, 2.0)
    torch.testing.assert_close(logits(loaded), want)


def _tensors_changed(adapter, out, change) -> Path:
    from safetensors.torch import load_file, save_file

    out = _edited(adapter, out)
    save_file(change(load_file(str(out / "adapter_model.safetensors"))), str(out / "adapter_model.safetensors"))
    return out


def test_tensors_without_a_place_are_named_for_what_they_are(setup, tmp_path):
    # each was "the model has that module, but adapter_config.json's target_modules [...] do not name it", which
    # for a LoRA on wte was untrue (they named it) and for the others pointed at the wrong field
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(load_model(setup["float"], dtype=torch.float32, device="cpu"),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "wte"], init_lora_weights=False,
                                   task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "embedding")
    no_prefix = _tensors_changed(setup["lora"], tmp_path / "no_prefix",
                                 lambda sd: {k.removeprefix("base_model.model."): v for k, v in sd.items()})
    magnitudes = _tensors_changed(setup["lora"], tmp_path / "magnitudes", lambda sd: {
        **sd, **{k.replace("lora_B.weight", "lora_magnitude_vector"): torch.ones(v.shape[0])
                 for k, v in sd.items() if k.endswith("lora_B.weight")}})
    for adapter, expect in (
            (tmp_path / "embedding", r"'base_model\.model\.transformer\.wte\.lora_embedding_[AB]' \[\d+, \d+\] has no "
                                     r"place in QWenLMHeadModel; a LoRA on the embedding \(wte\), which is not "
                                     r"supported here; .*modules_to_save"),
            (no_prefix, r"'transformer\.h\.0\.attn\.c_attn\.lora_A\.weight' \[16, 64\] has no place in "
                        r"QWenLMHeadModel; its keys lack PEFT's 'base_model\.model\.' prefix"),
            (magnitudes, r"'base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_magnitude_vector' \[192\] has no "
                         r"place in QWenLMHeadModel; a DoRA magnitude vector, but adapter_config\.json says use_dora "
                         r"false")):
        with pytest.raises(AdapterError, match=expect) as e:
            load_model(setup["float"], adapter=adapter, device="cpu")
        assert "do not name it" not in str(e.value)


def test_a_run_dir_without_an_adapter_names_its_newest_checkpoint(setup, tmp_path, capsys):
    # a run stopped before its end holds checkpoint-N dirs only: "not a PEFT adapter dir" left the user to guess
    from finetune.chat import main as chat_main

    run = tmp_path / "run"
    for step in (5, 20, 100):  # (100 is the newest, though "20" sorts after it as text)
        shutil.copytree(setup["lora"], run / f"checkpoint-{step}")
    (run / "checkpoint-150").mkdir()  # a save cut short: no adapter in it
    assert chat_main(["--adapter", str(run), "--query", "hi", "--max_new_tokens", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: adapter {run} has no adapter_config.json: not a PEFT adapter dir; it holds a run's checkpoints, the "
        f"newest with an adapter being {run / 'checkpoint-100'} (pass that: the adapter at step 100)"]
    shutil.rmtree(run / "checkpoint-150")
    for step in (5, 20, 100):
        (run / f"checkpoint-{step}" / "adapter_config.json").unlink()
    with pytest.raises(AdapterError) as e:
        load_model(setup["float"], adapter=run, device="cpu")
    assert str(e.value).endswith("not a PEFT adapter dir; its checkpoint-N dirs hold no adapter_config.json either")



def test_the_dir_of_a_run_that_has_saved_nothing_yet_says_so(setup, tmp_path, capsys):
    # `qwen-ft chat -a output/run` while the run trains (run_args.json, train.log, no adapter or checkpoint yet) was
    # "not a PEFT adapter dir" alone, as for a dir of anything else
    from finetune.chat import main as chat_main

    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("")
    args = ["-m", str(setup["float"]), "--adapter", str(run), "--query", "hi"]
    assert chat_main(args) == 2
    assert capsys.readouterr().err == f"error: adapter {run} has no adapter_config.json: not a PEFT adapter dir\n"
    (run / "run_args.json").write_text("{}")
    assert chat_main(args) == 2
    assert capsys.readouterr().err == (
        f"error: adapter {run} has no adapter_config.json: not a PEFT adapter dir; it is a training run's output dir "
        "with nothing saved yet (the adapter is written when the run ends, a checkpoint-N at each save, "
        "--save_steps): the run is still going or stopped before a save\n")
