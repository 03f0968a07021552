"""A seeded structural fuzzer of the artifacts users bring: a valid tiny model dir (float and Int4/GPTQ) and a LoRA
adapter dir are built once; each case copies one and corrupts one thing (config.json, generation_config.json, the
GPTQ settings, the vocabulary, the weight files, adapter_config.json, the adapter's tensors) and runs what
`qwen-ft chat` runs (in-process, one greedy token). Each case either loads (a benign variation) or stops with the
project's own one-line error naming the file and the field or tensor; a traceback is a failure."""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import finetune  # noqa: F401  (installs the PEFT hooks)

from _helpers import random_adapter

SEED = 20240611
OK = "ok"
GREEDY = ["--greedy"]


# -- building the valid artifacts once ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    from finetune.demo import make_demo_model

    root = tmp_path_factory.mktemp("fuzz")
    d = {"root": root, "float": make_demo_model(root / "float"), "int4": make_demo_model(root / "int4", int4=True)}
    qc = json.loads((d["int4"] / "config.json").read_text())["quantization_config"]
    (d["int4"] / "quantize_config.json").write_text(json.dumps(  # as auto-gptq (and Qwen's Int4 releases) ship it
        {k: qc[k] for k in ("bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym",
                            "true_sequential", "model_name_or_path", "model_file_base_name")}, indent=2))
    d["lora"] = random_adapter(d["float"], root / "lora")
    d["qlora"] = random_adapter(d["int4"], root / "qlora", targets=("c_attn", "w1"))
    return d


# -- corruptions ------------------------------------------------------------------------------------------------


def edit_json(name, change):
    def mutate(d: Path):
        data = json.loads((d / name).read_text())
        change(data)
        (d / name).write_text(json.dumps(data))
    return mutate


def set_key(name, key, value):
    def change(data):
        node = data
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return edit_json(name, change)


def drop_key(name, key):
    def change(data):
        node = data
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        del node[last]
    return edit_json(name, change)


def write_text(name, text: str | bytes):
    def mutate(d: Path):
        (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return mutate


def remove(name):
    return lambda d: (d / name).unlink()


def with_bom(name):
    return lambda d: (d / name).write_bytes(b"\xef\xbb\xbf" + (d / name).read_bytes())


def tensors(name, change):
    def mutate(d: Path):
        sd = load_file(str(d / name))
        change(sd)
        save_file(sd, str(d / name), metadata={"format": "pt"})
    return mutate


def first(sd, part):
    return next(k for k in sorted(sd) if part in k)


def vocab_lines(change):
    def mutate(d: Path):
        lines = (d / "qwen.tiktoken").read_bytes().splitlines(keepends=True)
        (d / "qwen.tiktoken").write_bytes(b"".join(change(lines)))
    return mutate


def lying_header(d: Path):
    """The first tensor's data_offsets shifted by 4 bytes (same length): a header that lies about where it is."""
    path = d / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b + 4, e + 4]
    text = json.dumps(header).encode().ljust(n)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def overlapping_header(d: Path):
    """Two tensors of one size whose offsets name the same bytes: every length checks out, the data is mixed."""
    path = d / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    names = sorted(k for k in header if k.endswith("ln_1.weight"))
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
    text = json.dumps(header).encode().ljust(n)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def index_naming_missing_shard(d: Path):
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[: len(keys) // 2]}, str(d / "model-00001-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" if i < len(keys) // 2 else "model-00002-of-00002.safetensors"
                  for i, k in enumerate(keys)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def both(*mutations):
    def mutate(d: Path):
        for m in mutations:
            m(d)
    return mutate


def truncate(name, keep=0.6):
    def mutate(d: Path):
        raw = (d / name).read_bytes()
        (d / name).write_bytes(raw[: int(len(raw) * keep)])
    return mutate


# Each case: (id, which artifact is corrupted: float | int4 | lora | qlora, mutate, expect): expect OK (loads and
# answers) or the words the one error line must hold (the file and the field / tensor).
CFG, GEN, QC, TOK = "config.json", "generation_config.json", "quantize_config.json", "qwen.tiktoken"
AC, AW, MW = "adapter_config.json", "adapter_model.safetensors", "model.safetensors"

CASES = [
    # config.json
    ("cfg-missing-hidden", "float", drop_key(CFG, "hidden_size"), (CFG,)),
    ("cfg-missing-model-type", "float", drop_key(CFG, "model_type"), (CFG, "model_type")),
    ("cfg-unknown-model-type", "float", set_key(CFG, "model_type", "llama"), (CFG, "model_type")),
    ("cfg-string-layers", "float", set_key(CFG, "num_hidden_layers", "2"), (CFG, "num_hidden_layers")),
    ("cfg-float-integral-layers", "float", set_key(CFG, "num_hidden_layers", 2.0), OK),
    ("cfg-float-heads", "float", set_key(CFG, "num_attention_heads", 4.5), (CFG, "num_attention_heads")),
    ("cfg-zero-vocab", "float", set_key(CFG, "vocab_size", 0), (CFG, "vocab_size")),
    ("cfg-negative-inter", "float", set_key(CFG, "intermediate_size", -256), (CFG, "intermediate_size")),
    ("cfg-null-kv", "float", set_key(CFG, "kv_channels", None), (CFG, "kv_channels")),
    ("cfg-list-hidden", "float", set_key(CFG, "hidden_size", [64]), (CFG, "hidden_size")),
    ("cfg-heads-not-dividing", "float", set_key(CFG, "num_attention_heads", 3), (CFG, "c_attn.weight")),
    ("cfg-eps-string", "float", set_key(CFG, "layer_norm_epsilon", "1e-6"), (CFG, "layer_norm_epsilon")),
    ("cfg-eps-negative", "float", set_key(CFG, "layer_norm_epsilon", -1e-6), (CFG, "layer_norm_epsilon")),
    ("cfg-rope-zero", "float", set_key(CFG, "rotary_emb_base", 0), (CFG, "rotary_emb_base")),
    ("cfg-seq-length-string", "float", set_key(CFG, "seq_length", "256"), (CFG, "seq_length")),
    ("cfg-max-pos-negative", "float", set_key(CFG, "max_position_embeddings", -1), (CFG, "max_position_embeddings")),
    ("cfg-no-bias-string", "float", set_key(CFG, "no_bias", "false"), (CFG, "no_bias")),
    ("cfg-tied", "float", set_key(CFG, "tie_word_embeddings", True), (CFG, "tie_word_embeddings")),
    ("cfg-not-object", "float", write_text(CFG, "[1, 2]"), (CFG, "JSON object")),
    ("cfg-invalid-json", "float", write_text(CFG, '{"model_type": "qwen",'), (CFG, "JSON")),
    ("cfg-bom", "float", with_bom(CFG), (CFG, "BOM")),  # transformers refuses it too
    ("cfg-missing", "float", remove(CFG), (CFG,)),
    # generation_config.json
    ("gen-top-p-0", "float", set_key(GEN, "top_p", 0), (GEN, "top_p")),
    ("gen-top-p-2", "float", set_key(GEN, "top_p", 2), (GEN, "top_p")),
    ("gen-top-k-negative", "float", set_key(GEN, "top_k", -1), (GEN, "top_k")),
    ("gen-temperature-0", "float", set_key(GEN, "temperature", 0), (GEN, "temperature", "do_sample")),
    ("gen-temperature-0-greedy", "float", edit_json(GEN, lambda g: g.update(temperature=0, do_sample=False)), OK),
    ("gen-chat-format-raw", "float", set_key(GEN, "chat_format", "raw"), (GEN, "chat_format")),
    ("gen-do-sample-string", "float", set_key(GEN, "do_sample", "false"), (GEN, "do_sample")),
    ("gen-window-string", "float", set_key(GEN, "max_window_size", "6144"), (GEN, "max_window_size")),
    ("gen-window-negative", "float", set_key(GEN, "max_window_size", -5), (GEN, "max_window_size")),
    ("gen-stop-words-flat", "float", set_key(GEN, "stop_words_ids", [1, 2]), (GEN, "stop_words_ids")),
    ("gen-stop-words-nested", "float", set_key(GEN, "stop_words_ids", [[1, 2], [3]]), OK),
    ("gen-eos-list", "float", set_key(GEN, "eos_token_id", [2047, 2048]), OK),
    ("gen-eos-out-of-vocab", "float", set_key(GEN, "eos_token_id", 99999), (GEN, "eos_token_id")),
    ("gen-eos-string", "float", set_key(GEN, "eos_token_id", "<|endoftext|>"), (GEN, "eos_token_id")),
    ("gen-rep-penalty-0", "float", set_key(GEN, "repetition_penalty", 0), (GEN, "repetition_penalty")),
    ("gen-max-new-tokens-0", "float", set_key(GEN, "max_new_tokens", 0), (GEN, "max_new_tokens")),
    ("gen-max-new-tokens-string", "float", set_key(GEN, "max_new_tokens", "512"), (GEN, "max_new_tokens")),
    ("gen-min-new-tokens-negative", "float", set_key(GEN, "min_new_tokens", -1), (GEN, "min_new_tokens")),
    ("gen-max-length-beside-max-new-tokens", "float", set_key(GEN, "max_length", 10), OK),
    ("gen-bom", "float", with_bom(GEN), (GEN, "BOM")),
    ("gen-missing", "float", remove(GEN), OK),
    # GPTQ settings: config.json's quantization_config (what transformers reads) and quantize_config.json
    ("qc-bits-3", "int4", set_key(CFG, "quantization_config.bits", 3), (CFG, "bits")),
    ("qc-bits-8", "int4", both(set_key(CFG, "quantization_config.bits", 8), set_key(QC, "bits", 8)), (MW, "qweight")),
    ("qc-bits-string", "int4", set_key(CFG, "quantization_config.bits", "four"), (CFG, "bits")),
    ("qc-bits-null", "int4", set_key(CFG, "quantization_config.bits", None), (CFG, "bits")),
    ("qc-group-minus-1", "int4",
     both(set_key(CFG, "quantization_config.group_size", -1), set_key(QC, "group_size", -1)),
     (MW, "qzeros", "group_size -1")),
    ("qc-group-contradicts", "int4", set_key(CFG, "quantization_config.group_size", -1), (QC, CFG, "group_size")),
    ("qc-group-0", "int4", set_key(CFG, "quantization_config.group_size", 0), (CFG, "group_size")),
    ("qc-group-minus-2", "int4", set_key(CFG, "quantization_config.group_size", -2), (CFG, "group_size")),
    ("qc-group-not-dividing", "int4", both(set_key(CFG, "quantization_config.group_size", 48), remove(QC)),
     (MW, "group_size 48")),
    ("qc-group-string", "int4", set_key(CFG, "quantization_config.group_size", "x"), (CFG, "group_size")),
    ("qc-desc-act-string", "int4", set_key(CFG, "quantization_config.desc_act", "false"), (CFG, "desc_act")),
    ("qc-sym-false", "int4", set_key(CFG, "quantization_config.sym", False), OK),
    ("qc-format-unknown", "int4", set_key(CFG, "quantization_config.checkpoint_format", "marlin"),
     (CFG, "checkpoint_format")),
    ("qc-method-awq", "int4", set_key(CFG, "quantization_config.quant_method", "awq"), (CFG, "quant_method")),
    ("qc-not-object", "int4", set_key(CFG, "quantization_config", [4]), (CFG, "quantization_config")),
    ("qcf-bits-8", "int4", set_key(QC, "bits", 8), (QC, "bits")),
    ("qcf-group-64", "int4", set_key(QC, "group_size", 64), (QC, "group_size")),
    ("qcf-desc-act", "int4", set_key(QC, "desc_act", True), (QC, "desc_act")),
    ("qcf-sym-false", "int4", set_key(QC, "sym", False), OK),
    ("qcf-invalid-json", "int4", write_text(QC, "{"), (QC, "JSON")),
    ("qcf-only", "int4", drop_key(CFG, "quantization_config"), (CFG, QC)),
    # the vocabulary
    ("tok-truncated", "float", truncate(TOK, 0.5), (TOK,)),
    ("tok-cut-mid-line", "float", truncate(TOK, 0.9999), (TOK,)),
    ("tok-no-rank", "float", vocab_lines(lambda ls: ls[:10] + [ls[10].split()[0] + b"\n"] + ls[11:]), (TOK, "line 11")),
    ("tok-duplicate-rank", "float", vocab_lines(lambda ls: ls[:10] + [ls[10].split()[0] + b" 9\n"] + ls[11:]),
     (TOK, "rank")),
    ("tok-duplicate-token", "float", vocab_lines(lambda ls: ls[:10] + [ls[9].split()[0] + b" 10\n"] + ls[11:]),
     (TOK, "line 11")),
    ("tok-not-base64", "float", vocab_lines(lambda ls: ls[:10] + [b"!!notb64!! 10\n"] + ls[11:]), (TOK, "line 11")),
    ("tok-not-utf8-rank", "float", vocab_lines(lambda ls: ls[:10] + [ls[10].split()[0] + b" \xff\n"] + ls[11:]),
     (TOK, "line 11")),
    ("tok-missing", "float", remove(TOK), (TOK,)),
    ("tok-config-missing", "float", remove("tokenizer_config.json"), OK),
    # weight files
    ("st-truncated", "float", truncate(MW), (MW,)),
    ("st-lying-offsets", "float", lying_header, (MW, "offsets")),
    ("gptq-lying-offsets", "int4", lying_header, (MW, "offsets")),
    ("st-overlapping-offsets", "float", overlapping_header, (MW, "ln_1.weight")),
    ("st-int-dtype", "float", tensors(MW, lambda sd: sd.update(
        {first(sd, "ln_f"): sd[first(sd, "ln_f")].to(torch.int32)})), (MW, "ln_f.weight")),
    ("st-fp16-dtype", "float", tensors(MW, lambda sd: sd.update({k: v.half() for k, v in sd.items()})), OK),
    ("st-wrong-shape", "float", tensors(MW, lambda sd: sd.update(
        {first(sd, "w1.weight"): sd[first(sd, "w1.weight")][:-1]})), ("w1.weight",)),
    ("st-missing-tensor", "float", tensors(MW, lambda sd: sd.pop(first(sd, "ln_2"))), ("ln_2.weight",)),
    ("st-extra-tensor", "float", tensors(MW, lambda sd: sd.update({"transformer.h.0.extra.weight": torch.ones(2)})),
     ("transformer.h.0.extra.weight",)),
    ("st-nan-weight", "float", tensors(MW, lambda sd: sd[first(sd, "ln_f")].fill_(float("nan"))),
     (MW, "ln_f.weight")),
    ("st-index-missing-shard", "float", index_naming_missing_shard, ("model-00002-of-00002.safetensors",)),
    ("gptq-qweight-float", "int4", tensors(MW, lambda sd: sd.update(
        {first(sd, "qweight"): sd[first(sd, "qweight")].float()})), (MW, "qweight")),
    ("gptq-scales-int", "int4", tensors(MW, lambda sd: sd.update(
        {first(sd, "scales"): sd[first(sd, "scales")].to(torch.int32)})), (MW, "scales")),
    ("gptq-scales-fp32", "int4", tensors(MW, lambda sd: sd.update(
        {k: v.float() for k, v in sd.items() if k.endswith("scales")})), OK),
    ("gptq-missing-qzeros", "int4", tensors(MW, lambda sd: sd.pop(first(sd, "qzeros"))), ("qzeros",)),
    ("gptq-g-idx-missing", "int4", tensors(MW, lambda sd: [sd.pop(k) for k in list(sd) if k.endswith("g_idx")]), OK),
    ("gptq-truncated", "int4", truncate(MW), (MW,)),
    # adapter_config.json
    ("ac-r-0", "lora", set_key(AC, "r", 0), (AC, "r")),
    ("ac-r-negative", "lora", set_key(AC, "r", -4), (AC, "r")),
    ("ac-r-float-integral", "lora", set_key(AC, "r", 4.0), OK),
    ("ac-r-other", "lora", set_key(AC, "r", 8), ("lora_A", "r=8")),
    ("ac-alpha-0", "lora", set_key(AC, "lora_alpha", 0), (AC, "lora_alpha")),
    ("ac-alpha-string", "lora", set_key(AC, "lora_alpha", "8"), (AC, "lora_alpha")),
    ("ac-targets-none-match", "lora", set_key(AC, "target_modules", ["q_proj", "v_proj"]), (AC, "q_proj")),
    ("ac-targets-partial", "lora", set_key(AC, "target_modules", ["c_attn", "q_proj"]),
     ("c_proj.lora_A", AC, "q_proj")),
    ("ac-base-elsewhere", "lora", set_key(AC, "base_model_name_or_path", "/nonexistent/base"), OK),  # -m given
    ("ac-fan-in-fan-out", "lora", set_key(AC, "fan_in_fan_out", True), OK),  # PEFT: nn.Linear, so ignored (a warning)
    ("qac-fan-in-fan-out", "qlora", set_key(AC, "fan_in_fan_out", True), OK),
    ("ac-rslora", "lora", set_key(AC, "use_rslora", True), OK),
    ("ac-layers-to-transform", "lora", set_key(AC, "layers_to_transform", [0]),
     ("transformer.h.1", "layers_to_transform")),
    ("ac-layers-to-transform-string", "lora", set_key(AC, "layers_to_transform", "0"), (AC, "layers_to_transform")),
    ("ac-layers-to-transform-out", "lora", set_key(AC, "layers_to_transform", [7]), (AC, "layers_to_transform")),
    ("ac-rank-pattern", "lora", set_key(AC, "rank_pattern", {"c_attn": 2}), ("c_attn.lora_A", "rank_pattern")),
    ("ac-alpha-pattern", "lora", set_key(AC, "alpha_pattern", {"c_attn": 2}), OK),
    ("ac-dropout-string", "lora", set_key(AC, "lora_dropout", "0.1"), (AC, "lora_dropout")),
    ("ac-bias-unknown", "lora", set_key(AC, "bias", "some"), (AC, "bias")),
    ("ac-task-type-unknown", "lora", set_key(AC, "task_type", "SEQ_2_SEQ_LMX"), (AC, "task type")),
    ("ac-not-object", "lora", write_text(AC, "[]"), (AC, "JSON object")),
    ("ac-invalid-json", "lora", write_text(AC, "{"), (AC, "JSON")),
    ("ac-bom", "lora", with_bom(AC), (AC, "BOM")),  # PEFT refuses it too
    ("ac-modules-to-save-bogus", "lora", set_key(AC, "modules_to_save", ["nonexistent"]), (AC, "modules_to_save")),
    # adapter weights
    ("aw-other-r", "lora", tensors(AW, lambda sd: sd.update(
        {k: torch.cat([v, v], dim=0 if "lora_A" in k else 1) for k, v in sd.items()})), ("lora_A", "r=4")),
    ("aw-missing-lora-b", "lora", tensors(AW, lambda sd: sd.pop(first(sd, "lora_B"))), ("lora_B",)),
    ("aw-nan", "lora", tensors(AW, lambda sd: sd[first(sd, "lora_B")].view(-1)[0].fill_(float("nan"))),
     (AW, "lora_B")),
    ("aw-fp16", "lora", tensors(AW, lambda sd: sd.update({k: v.half() for k, v in sd.items()})), OK),
    ("aw-bf16", "lora", tensors(AW, lambda sd: sd.update({k: v.bfloat16() for k, v in sd.items()})), OK),
    ("aw-mixed-dtypes", "lora", tensors(AW, lambda sd: sd.update(
        {k: v.half() if "lora_A" in k else v.bfloat16() for k, v in sd.items()})), OK),
    ("aw-fp64", "lora", tensors(AW, lambda sd: sd.update({k: v.double() for k, v in sd.items()})), OK),
    ("aw-truncated", "lora", truncate(AW), (AW,)),
    ("aw-missing", "lora", remove(AW), ("adapter_model",)),
    ("aw-extra-key", "lora", tensors(AW, lambda sd: sd.update(
        {"base_model.model.transformer.h.0.attn.q_proj.lora_A.weight": torch.ones(4, 64)})), ("q_proj",)),
    ("qaw-fp16", "qlora", tensors(AW, lambda sd: sd.update({k: v.half() for k, v in sd.items()})), OK),
    ("qaw-other-r", "qlora", set_key(AC, "r", 8), ("lora_A", "r=8")),
    ("qaw-rslora", "qlora", set_key(AC, "use_rslora", True), OK),
]

# the seeded part: random config.json fields of both kinds, each given a random ill-typed value
_BAD_VALUES = ["12", 1.5, -3, 0, None, [1], {"a": 1}, True]
_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
           "kv_channels", "seq_length", "max_position_embeddings", "layer_norm_epsilon", "rotary_emb_base",
           "rotary_pct", "emb_dropout_prob", "attn_dropout_prob", "use_dynamic_ntk", "use_logn_attn",
           "initializer_range", "scale_attn_weights"]
_BOOL_FIELDS = ("use_dynamic_ntk", "use_logn_attn", "scale_attn_weights")


def _random_cases(n=16):
    rng = random.Random(SEED)
    out = []
    for i in range(n):
        kind = rng.choice(["float", "int4"])
        field, value = rng.choice(_FIELDS), rng.choice(_BAD_VALUES)
        # a value of the field's type may be in range and load; any other must be refused naming the field
        plausible = isinstance(value, bool) if field in _BOOL_FIELDS else \
            isinstance(value, (int, float)) and not isinstance(value, bool)
        out.append((f"rnd{i}-{kind}-{field}={json.dumps(value)}", kind, set_key(CFG, field, value),
                    None if plausible else (CFG, field)))
    return out


# -- running the command ----------------------------------------------------------------------------------------


def run_chat(model_dir, adapter=None) -> tuple[int, str, str]:
    """`qwen-ft chat -m MODEL [--adapter A] -q ... --greedy` in-process: (exit code, stdout, stderr). An exception
    escaping main is a traceback the user would see: it propagates."""
    from finetune.chat import main

    argv = ["-m", str(model_dir), "-q", "hello", *GREEDY, "--max_new_tokens", "2", "--device", "cpu"]
    if adapter is not None:
        argv += ["--adapter", str(adapter)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def prepare(valid, tmp_path, kind, mutate):
    """A copy of the valid artifact of ``kind``, corrupted; -> (model dir, adapter dir or None)."""
    if kind in ("float", "int4"):
        d = tmp_path / kind
        shutil.copytree(valid[kind], d)
        mutate(d)
        return d, None
    a = tmp_path / kind
    shutil.copytree(valid[kind], a)
    mutate(a)
    return valid["float" if kind == "lora" else "int4"], a


def outcome(valid, tmp_path, kind, mutate):
    model, adapter = prepare(valid, tmp_path, kind, mutate)
    rc, out, err = run_chat(model, adapter)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    return rc, out, err, errors


@pytest.mark.parametrize("case_id, kind, mutate, expect", CASES + _random_cases(), ids=lambda v: v if isinstance(
    v, str) else "")
def test_a_corrupted_artifact_loads_or_is_one_line_naming_where(valid, tmp_path, case_id, kind, mutate, expect):
    rc, out, err, errors = outcome(valid, tmp_path, kind, mutate)  # an exception here is the finding: a traceback
    if expect == OK or expect is None and rc == 0:  # (None: a seeded value of the field's type, maybe in range)
        assert rc == 0 and out.strip(), (case_id, err)
        return
    assert rc == 2 and len(errors) == 1, (case_id, rc, err)
    line = errors[0]
    if expect is None:  # refused: it names the file and the field
        expect = (CFG, case_id.split("-", 2)[2].split("=")[0])
    missing = [w for w in expect if w not in line]
    assert not missing, (case_id, missing, line)


# -- the findings, one explicit test each --------------------------------------------------------------------------

IDS = torch.tensor([[1841, 872, 198, 100, 200, 300, 17, 5]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def copy_of(valid, tmp_path, kind, *mutations) -> Path:
    d = tmp_path / kind
    shutil.copytree(valid[kind], d)
    for m in mutations:
        m(d)
    return d


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_use_rslora_is_applied_not_ignored(valid, tmp_path, kind):
    from finetune import load_model

    base = valid["float" if kind == "lora" else "int4"]
    adapter = copy_of(valid, tmp_path, kind, set_key(AC, "use_rslora", True))
    model = load_model(base, adapter=adapter, dtype=torch.float32, device="cpu")
    cfg = json.loads((adapter / AC).read_text())
    scalings = {m.scaling["default"] for m in model.modules() if hasattr(m, "scaling") and "default" in m.scaling}
    assert scalings == {cfg["lora_alpha"] / cfg["r"] ** 0.5}  # rsLoRA: alpha / sqrt(r), not alpha / r
    plain = load_model(base, adapter=valid[kind], dtype=torch.float32, device="cpu")
    bare = load_model(base, dtype=torch.float32, device="cpu")
    # the delta is the plain adapter's times sqrt(r) (r=4: twice), to first order; at least not the plain one
    assert not torch.allclose(logits(model), logits(plain), atol=1e-4)
    assert not torch.allclose(logits(model), logits(bare), atol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "qlora"])
@pytest.mark.parametrize("change", [set_key(AC, "fan_in_fan_out", True),  # PEFT: nn.Linear is not Conv1D, ignored
                                    set_key(AC, "r", 4.0), set_key(AC, "lora_alpha", 8.0),  # integral floats
                                    tensors(AW, lambda sd: sd.update({k: v.double() for k, v in sd.items()}))])
def test_benign_variations_give_the_same_model(valid, tmp_path, kind, change):
    from finetune import load_model

    base = valid["float" if kind == "lora" else "int4"]
    want = logits(load_model(base, adapter=valid[kind], dtype=torch.float32, device="cpu"))
    got = logits(load_model(base, adapter=copy_of(valid, tmp_path, kind, change), dtype=torch.float32, device="cpu"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_integral_floats_in_config_json_are_the_integers(valid, tmp_path):
    from finetune import load_model

    d = copy_of(valid, tmp_path, "float", edit_json(CFG, lambda c: c.update(num_hidden_layers=2.0, hidden_size=64.0)))
    model = load_model(d, dtype=torch.float32, device="cpu")
    assert model.config.num_hidden_layers == 2 and isinstance(model.config.hidden_size, int)
    torch.testing.assert_close(logits(model), logits(load_model(valid["float"], dtype=torch.float32, device="cpu")))


@pytest.mark.parametrize("kind, mutate, expect", [
    # a NaN base weight ran, every reply garbage, no word why
    ("float", tensors(MW, lambda sd: sd[first(sd, "ln_f")].fill_(float("nan"))),
     r"model\.safetensors: tensor 'transformer\.ln_f\.weight' has 64 of 64 values NaN or infinite"),
    ("int4", tensors(MW, lambda sd: sd[first(sd, "scales")].view(-1)[0].fill_(float("inf"))),
     r"model\.safetensors: tensor '.*scales' has 1 of \d+ values NaN or infinite"),
    # a header whose offsets lie: the library's message named no file (float), a traceback from safe_open (int4)
    ("float", lying_header, r"model\.safetensors: tensor '.*' starts at byte \d+ .* overlap or leave a gap"),
    ("int4", overlapping_header, r"model\.safetensors: tensor '.*ln_1\.weight' starts at byte"),
    # "false" is truthy: it switched the feature on silently
    ("float", set_key(CFG, "no_bias", "false"), r"config\.json: no_bias must be true or false, got 'false'"),
    ("int4", set_key(CFG, "quantization_config.desc_act", "false"), r"config\.json: quantization_config desc_act must"),
    # tracebacks at the first forward or from int()
    ("float", set_key(CFG, "layer_norm_epsilon", "1e-6"), r"config\.json: layer_norm_epsilon must be a positive"),
    ("int4", set_key(CFG, "quantization_config.bits", "four"), r"config\.json: quantization_config bits must be"),
    ("int4", set_key(CFG, "quantization_config", [4]), r"config\.json: quantization_config must be an object"),
    # silently read as something else
    ("int4", set_key(CFG, "quantization_config.checkpoint_format", "marlin"), r"checkpoint_format 'marlin' is not"),
    ("int4", set_key(CFG, "quantization_config.group_size", 0), r"group_size must be a positive integer or -1"),
    ("int4", set_key(QC, "bits", 8), r"quantize_config\.json: bits 8 contradicts .*config\.json's quantization"),
    ("int4", drop_key(CFG, "quantization_config"), r"GPTQ-packed \(qweight\) but config\.json has no quantization_"
                                                   r"config \(the settings are in quantize_config\.json"),
    # generation_config.json values that broke the first reply
    ("float", set_key(GEN, "max_window_size", "6144"), r"generation_config\.json: max_window_size must be an int"),
    ("float", set_key(GEN, "stop_words_ids", [1, 2]), r"generation_config\.json: stop_words_ids must be a list of"),
    ("float", set_key(GEN, "top_k", -1), r"generation_config\.json: top_k must be an integer >= 0"),
    ("float", set_key(GEN, "temperature", 0), r"generation_config\.json: temperature 0 with do_sample true"),
    # every served request failed with a 500 on it (the engine refused it per request)
    ("float", set_key(GEN, "min_new_tokens", -1), r"generation_config\.json: min_new_tokens must be an integer >= 0"),
    ("float", set_key(GEN, "max_new_tokens", "512"), r"generation_config\.json: max_new_tokens must be an integer"),
])
def test_model_dir_findings_are_one_line(valid, tmp_path, kind, mutate, expect):
    from finetune import load_model
    from finetune.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=expect) as e:
        load_model(copy_of(valid, tmp_path, kind, mutate), device="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, expect", [
    (set_key(AC, "lora_dropout", "0.1"), r"adapter_config\.json: lora_dropout must be a number in \[0, 1\)"),
    (set_key(AC, "bias", "some"), r"adapter_config\.json: bias must be 'none', 'all' or 'lora_only'"),
    (set_key(AC, "modules_to_save", ["embed_tokens"]), r"modules_to_save names 'embed_tokens', which is no module"),
    (set_key(AC, "layers_to_transform", [7]), r"layers_to_transform names layer 7, but the model has 2"),
    (set_key(AC, "layers_to_transform", [0]), r"h\.1\..* has no place .*layer 1 is not in adapter_config\.json's "
                                              r"layers_to_transform \[0\]"),
    (set_key(AC, "rank_pattern", {"c_attn": 2}), r"a rank other than 2 \(rank_pattern 'c_attn'\)"),
    (set_key(AC, "target_modules", ["c_attn", "w1", "w2"]), r"c_proj\.lora_A\.weight' .* has no place .*the model has "
                                                            r"that module, but adapter_config\.json's target_modules"),
])
def test_adapter_findings_are_one_line(valid, tmp_path, change, expect):
    from finetune import load_model
    from finetune.adapters import AdapterError

    with pytest.raises(AdapterError, match=expect):
        load_model(valid["float"], adapter=copy_of(valid, tmp_path, "lora", change), device="cpu")


@pytest.mark.parametrize("change, expect", [
    (lambda ls: ls[:10] + [ls[9].split()[0] + b" 10\n"] + ls[11:], r"line 11 gives token .* again \(rank 9 on line 10"),
    (lambda ls: ls[:10] + [ls[10].split()[0] + b" 9\n"] + ls[11:], r"line 11 gives rank 9 again \(first on line 10\)"),
    (lambda ls: ls[:10] + ls[11:], r"ranks are not a contiguous 0\.\.1838 range \(no line gives rank 10\)"),
])
def test_vocabulary_duplicates_name_the_line(valid, tmp_path, change, expect):
    from finetune.tokenization import TokenizerError, load_tokenizer

    with pytest.raises(TokenizerError, match=r"qwen\.tiktoken: " + expect):
        load_tokenizer(copy_of(valid, tmp_path, "float", vocab_lines(change)))


def test_chat_on_a_raw_chat_format_model_is_one_line(valid, tmp_path):
    rc, _, err = run_chat(copy_of(valid, tmp_path, "float", set_key(GEN, "chat_format", "raw")))
    assert rc == 2 and "generation_config.json: chat_format 'raw': chat needs a chat model" in err, err
