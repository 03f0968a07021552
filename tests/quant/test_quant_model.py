"""Int4 Qwen models: RTN writer -> loader -> logits equal the float model of the dequantized weights;
Auto classes and PEFT load Int4 dirs and adapters with no extra arguments; Q-LoRA keeps buffers frozen."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("finetune.modeling")

import finetune  # noqa: E402,F401
import finetune.quant  # noqa: E402,F401
from finetune.quant import GPTQLinear  # noqa: E402
from finetune.quant.loading import GPTQLoadError, load_gptq_model, replace_with_gptq_linears  # noqa: E402
from finetune.quant.rtn import quantize_model_dir  # noqa: E402

QWEN_14B_CONFIG = dict(
    model_type="qwen", vocab_size=152064, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
    kv_channels=128, intermediate_size=27392, seq_length=2048, max_position_embeddings=8192, no_bias=True,
    rotary_emb_base=10000, rotary_pct=1.0, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
    quantization_config={"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False,
                         "static_groups": False, "sym": True, "true_sequential": True, "model_name_or_path": None,
                         "model_file_base_name": "model", "quant_method": "gptq"},
)


@pytest.fixture(scope="session")
def int4_dir(tiny_model_dir, tmp_path_factory):
    """The tiny demo model, RTN-quantized to Int4 (group 32, v1, desc_act false). Read-only."""
    return quantize_model_dir(tiny_model_dir, tmp_path_factory.mktemp("tiny_int4"), bits=4, group_size=32)


def _float_twin(qmodel, float_dir):
    """The float model whose Linears hold the quantized model's dequantized weights (fp32)."""
    from finetune.modeling import QWenLMHeadModel

    f = QWenLMHeadModel.from_pretrained(str(float_dir), dtype=torch.float32)
    qparams = dict(qmodel.named_parameters())
    with torch.no_grad():
        for name, mod in qmodel.named_modules():
            if isinstance(mod, GPTQLinear):
                lin = f.get_submodule(name)
                lin.weight.copy_(mod.dequantize(torch.float32))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias.float())
        for name, p in f.named_parameters():
            if name in qparams:
                p.copy_(qparams[name].float())
    return f.eval()


@pytest.mark.parametrize("bits,group_size,desc_act,v2", [(4, 32, False, False), (4, -1, True, True), (8, 64, True, False)])
def test_int4_logits_equal_float_model_of_dequantized_weights(tiny_model_dir, tmp_path, bits, group_size, desc_act, v2):
    qdir = quantize_model_dir(tiny_model_dir, tmp_path / "q", bits=bits, group_size=group_size, desc_act=desc_act, v2=v2)
    cfg = json.loads((qdir / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == bits and cfg["quantization_config"]["quant_method"] == "gptq"
    assert (qdir / "qwen.tiktoken").is_file() and (qdir / "generation_config.json").is_file()
    q = load_gptq_model(qdir, device="cpu")
    assert q.transformer.wte.weight.dtype == torch.float32  # compute dtype on CPU
    c_attn = q.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, GPTQLinear) and c_attn.scales.dtype == torch.float16 and c_attn.v2 == v2
    assert c_attn.bias is not None and c_attn.bias.dtype == torch.float32
    assert not any(isinstance(m, GPTQLinear) for m in (q.lm_head, q.transformer.wte))
    f = _float_twin(q, tiny_model_dir)
    ids = torch.randint(0, q.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, f(ids).logits, rtol=1e-5, atol=1e-5)


def test_load_model_and_automodel_load_int4_dir(int4_dir):
    from transformers import AutoModelForCausalLM

    from finetune import load_model

    a = load_model(int4_dir, device="cpu")
    b = AutoModelForCausalLM.from_pretrained(str(int4_dir))
    assert isinstance(b.transformer.h[1].mlp.w2, GPTQLinear)
    assert b.generation_config.top_p == 0.8
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_qlora_trains_only_lora_and_buffers_stay_bit_identical(int4_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = load_gptq_model(int4_dir, device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a no-grad forward and a generate() first
        model(ids)
        model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    frozen = {k: v.detach().clone() for k, v in model.named_parameters()}
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "w1", "w2"],
                                          lora_dropout=0.0, task_type="CAUSAL_LM"))
    n_wrapped = sum(1 for m in pm.modules() if type(m).__name__ == "GPTQLoraLinear")
    assert n_wrapped == 5 * model.config.num_hidden_layers
    for p in model.parameters():
        p.requires_grad_(False)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
            assert p.dtype == torch.float32
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(8):
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k, v in pm.base_model.model.named_buffers():
        key = k.replace(".base_layer", "")
        assert torch.equal(v, buffers[key]) and v.dtype == buffers[key].dtype, k
        assert v.grad is None
    for k, v in pm.base_model.model.named_parameters():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k.replace(".base_layer", "")]), k
    pm.eval()
    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    with torch.no_grad():
        expected = pm(ids).logits
    again = PeftModel.from_pretrained(load_gptq_model(int4_dir, device="cpu"), str(adapter))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=0)
    # a fresh interpreter: only `import finetune`, then the Auto classes, no extra arguments
    script = textwrap.dedent(f"""
        import torch, finetune
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoModelForCausalLM
        ids = torch.tensor({ids.tolist()})
        m = AutoPeftModelForCausalLM.from_pretrained({str(adapter)!r})
        ref = finetune.load_model({str(int4_dir)!r}, adapter={str(adapter)!r}, device="cpu")
        with torch.no_grad():
            a, b = m(ids).logits, ref(ids).logits
        assert torch.equal(a, b), (a - b).abs().max()
        torch.save(a, {str(tmp_path / "auto_logits.pt")!r})
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "auto_logits.pt"), expected, rtol=0, atol=0)


def test_qwen14b_int4_on_meta_has_official_buffer_shapes():
    from finetune.modeling import QWenConfig, QWenLMHeadModel

    config = QWenConfig(**QWEN_14B_CONFIG)
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.split(".")[-2:] in (["attn", "c_attn"], ["attn", "c_proj"],
                                                                        ["mlp", "w1"], ["mlp", "w2"], ["mlp", "c_proj"])]
    assert len(names) == 200
    replace_with_gptq_linears(model, names, {"bits": 4, "group_size": 128, "v2": False, "desc_act": False})
    c_attn = model.transformer.h[0].attn.c_attn
    assert c_attn.qweight.shape == (640, 15360) and c_attn.qzeros.shape == (40, 1920)
    assert c_attn.scales.shape == (40, 15360) and c_attn.g_idx.shape == (5120,) and c_attn.bias.shape == (15360,)
    mlp = model.transformer.h[39].mlp
    assert mlp.w1.qweight.shape == (640, 13696) and mlp.w2.scales.shape == (40, 13696)
    assert mlp.c_proj.qweight.shape == (1712, 5120) and mlp.c_proj.qzeros.shape == (107, 640)
    assert model.transformer.h[0].attn.c_proj.qweight.shape == (640, 5120)
    assert model.lm_head.weight.shape == (152064, 5120) and not isinstance(model.lm_head, GPTQLinear)
    packed = sum(b.numel() * b.element_size() for b in model.buffers())
    floats = sum(p.numel() * 2 for p in model.parameters())  # bf16
    assert 9e9 < packed + floats < 11e9  # "about 10 GB"


def test_unsupported_bits_and_key_mismatch_errors(int4_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(int4_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GPTQLoadError, match=r"bits=3 is not supported.*\(4, 8\)"):
        load_gptq_model(bad, device="cpu")
    cfg["quantization_config"]["bits"] = 4
    (bad / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(bad / "model.safetensors"))
    sd.pop("transformer.h.1.mlp.w1.scales")
    sd["transformer.h.0.extra.weight"] = torch.zeros(2)
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(GPTQLoadError, match=r"first 'transformer.h.1.mlp.w1.scales'.*first 'transformer.h.0.extra.weight'"):
        load_gptq_model(bad, device="cpu")


def test_checkpoint_without_g_idx_and_with_zero_bias_everywhere(int4_dir, tmp_path):
    """Other GPTQ writers: no g_idx (desc_act false) and a bias stored for every quantized layer."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "variant"
    shutil.copytree(int4_dir, d)
    sd = load_file(str(d / "model.safetensors"))
    for k in [k for k in sd if k.endswith(".g_idx")]:
        del sd[k]
    for k in [k for k in sd if k.endswith(".qweight")]:
        b = k.replace(".qweight", ".bias")
        if b not in sd:
            sd[b] = torch.zeros(sd[k.replace(".qweight", ".scales")].shape[1], dtype=torch.float16)
    save_file(sd, str(d / "model.safetensors"))
    a, b = load_gptq_model(int4_dir, device="cpu"), load_gptq_model(d, device="cpu")
    assert b.transformer.h[0].mlp.w1.bias is not None
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_recomputes_only_the_input_projections(int4_dir, monkeypatch, dropout):
    """Each block is checkpointed as two halves; the recomputation ends after the adapters of attn.c_proj
    and mlp.c_proj, so backward redoes c_attn, w1 and w2 (3 of the 5 Int4 matmuls) and still gives the
    gradients of an uncheckpointed step (same dropout masks: the RNG state is replayed)."""
    from peft import LoraConfig, get_peft_model

    from finetune.quant import linear as qlinear

    pm = get_peft_model(load_gptq_model(int4_dir, device="cpu"),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "w1", "w2"],
                                   lora_dropout=dropout, init_lora_weights=False, task_type="CAUSAL_LM"))
    pm.train()
    ids = torch.randint(0, pm.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    calls = []
    forward = qlinear.GPTQMatmul.forward

    def counting(ctx, x, qweight, *rest):
        calls.append(tuple(qweight.shape))
        return forward(ctx, x, qweight, *rest)

    monkeypatch.setattr(qlinear.GPTQMatmul, "forward", staticmethod(counting))
    dequantized = []
    dequantize = qlinear.dequantize_weight_t

    def counting_dequantize(qweight, *rest):
        dequantized.append(tuple(qweight.shape))
        return dequantize(qweight, *rest)

    monkeypatch.setattr(qlinear, "dequantize_weight_t", counting_dequantize)

    def step():
        pm.zero_grad()
        calls.clear()
        dequantized.clear()
        torch.manual_seed(0)
        loss = pm(input_ids=ids, labels=ids).loss
        n_forward = len(calls)
        loss.backward()
        assert not qlinear._RECOMPUTED  # every weight a recomputation kept went to its backward
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
        return n_forward, calls[n_forward:], grads, len(dequantized) - n_forward

    layers = pm.config.num_hidden_layers
    n_fwd, recomputed, plain, backward_dequantized = step()
    # backward dequantizes each weight whose input needs a gradient: all but the first block's c_attn (its input,
    # the frozen embedding's normalised output, needs none)
    assert n_fwd == 5 * layers and recomputed == [] and backward_dequantized == 5 * layers - 1
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_fwd, recomputed, ckpt, backward_dequantized = step()
    block = pm.base_model.model.transformer.h[0]
    shapes = {tuple(m.base_layer.qweight.shape) for m in (block.attn.c_attn, block.mlp.w1, block.mlp.w2)}
    assert n_fwd == 5 * layers and len(recomputed) == 3 * layers
    # the recomputation dequantizes c_attn, w1 and w2 once, and their backward uses those copies: only the two
    # c_proj's are dequantized again (5 a layer, not 8)
    assert backward_dequantized == 5 * layers
    assert set(recomputed) == shapes
    for name, g in plain.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(ckpt[name], g, rtol=1e-5, atol=1e-6, msg=name)
    # the last block keeping its MLP projections (--gradient_checkpointing_keep_gib): its w1 and w2 are not
    # recomputed (their backward dequantizes them instead), and the gradients stay the uncheckpointed step's
    last = pm.base_model.model.transformer.h[-1]
    last.keep_mlp_projections = True
    n_fwd, recomputed, kept, backward_dequantized = step()
    assert n_fwd == 5 * layers and len(recomputed) == 3 * layers - 2 and backward_dequantized == 5 * layers
    for name, g in plain.items():
        torch.testing.assert_close(kept[name], g, rtol=1e-5, atol=1e-6, msg=name)
