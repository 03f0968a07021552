"""The built-in demo: a tiny random Qwen v1 model dir in the official layout (and, later, its data and run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TINY_CONFIG = dict(
    architectures=["QWenLMHeadModel"],
    model_type="qwen",
    vocab_size=2048,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    kv_channels=16,
    intermediate_size=256,
    seq_length=256,
    max_position_embeddings=256,
    rotary_emb_base=10000,
    rotary_pct=1.0,
    layer_norm_epsilon=1e-6,
    initializer_range=0.02,
    emb_dropout_prob=0.0,
    attn_dropout_prob=0.0,
    use_dynamic_ntk=True,
    use_logn_attn=True,
    use_flash_attn="auto",
    no_bias=True,
    tie_word_embeddings=False,
    scale_attn_weights=True,
    use_cache=True,
    bf16=False,
    fp16=False,
    fp32=False,
    softmax_in_fp32=False,
    use_cache_quantization=False,
    use_cache_kernel=False,
    auto_map={
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    },
)


def randomize_weights(model, seed: int = 0, std: float = 0.15) -> None:
    """Wide random init (std 0.15 instead of 0.02), so greedy top-1 margins are clear in tests; norms stay 1,
    the c_attn bias gets a small random value so bias handling is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make_demo_model(out_dir, seed: int = 0, int4: bool = False, group_size: int = 32, **overrides) -> Path:
    """Write a tiny random Qwen v1 dir (config.json, generation_config.json, model.safetensors, qwen.tiktoken,
    tokenizer_config.json) over the project's small vocabulary; `overrides` change config values.

    With int4, the same float model is written first and then quantized round-to-nearest into the official
    GPTQ Int4 layout (group 32: the tiny model's 64-wide inputs hold two groups), as Qwen-*-Chat-Int4 ships.
    """
    if int4:
        import tempfile

        from .quant import quantize_model_dir

        with tempfile.TemporaryDirectory() as tmp:
            make_demo_model(tmp, seed=seed, **overrides)
            return quantize_model_dir(tmp, out_dir, bits=4, group_size=group_size)
    from .modeling import QWenConfig, QWenLMHeadModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    values = dict(TINY_CONFIG, **overrides)
    config = QWenConfig(**values)
    model = QWenLMHeadModel(config)
    randomize_weights(model, seed)

    from .file_modes import save_weights

    save_weights({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors",
                 metadata={"format": "pt"})
    write_model_files(out, dict({"torch_dtype": "float32"}, **values))
    return out


def write_model_files(out, config_values: dict) -> None:
    """What a model dir holds besides its weights: config.json (`config_values` as given), the tokenizer over
    the project's small vocabulary (qwen.tiktoken, tokenizer_config.json) and generation_config.json."""
    from .tokenization import SMALL_VOCAB, QWenTokenizer

    out = Path(out)
    shutil.copyfile(SMALL_VOCAB, out / "qwen.tiktoken")
    tok = QWenTokenizer(str(out / "qwen.tiktoken"))
    tok.save_pretrained(str(out))
    (out / "config.json").write_text(json.dumps(config_values, indent=2) + "\n")
    gen = {
        "chat_format": "chatml",
        "eos_token_id": tok.eod_id,
        "pad_token_id": tok.eod_id,
        "max_window_size": 6144,
        "max_new_tokens": 512,
        "do_sample": True,
        "top_k": 0,
        "top_p": 0.8,
        "repetition_penalty": 1.1,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def chat_hint(model_dir, adapter_dir, data_file, check: bool = False) -> str:
    """The command that reproduces a memorised answer of the demo run: greedy (sampling on a tiny random model
    gives other tokens), asking the first question of the data, every part shell-quoted. adapter_dir is the run's
    output: an adapter (LoRA, Q-LoRA), or a whole model (full fine-tuning), which is chatted with as the model.
    ``check``: decode that answer first, and say so where it is not the data's (flags given beside the demo's
    recipe, such as --max_steps 2, train too little: the line claimed a memorised answer all the same)."""
    import shlex

    from .adapters import is_adapter_dir
    from .data import load_records, normalize_record

    messages = normalize_record(load_records(data_file)[0])["messages"]
    question = next(m["content"] for m in messages if m["role"] == "user")
    answer = next(m["content"] for m in messages if m["role"] == "assistant")
    out = Path(adapter_dir)
    whole = (out / "config.json").is_file() and not is_adapter_dir(out)
    if whole:
        what, cmd = "model", ["qwen-ft", "chat", "-m", str(out)]
    else:
        what, cmd = "adapter", ["qwen-ft", "chat", "-m", str(model_dir), "--adapter", str(out)]
    cmd += ["--greedy", "--query", question]
    if check and _greedy_reply(out if whole else model_dir, None if whole else out, question, answer) != answer:
        return (f"The demo {what} has not memorised {data_file}: greedy decoding answers its first question "
                f"otherwise (the flags given beside the demo's recipe trained it less); to chat with it:\n"
                f"  {shlex.join(cmd)}")
    return (f"The demo {what} has memorised {data_file}; greedy decoding gives its answers back "
            f"(drop --query to chat):\n  {shlex.join(cmd)}")


def _greedy_reply(model_dir, adapter_dir, question: str, answer: str) -> str:
    """What `qwen-ft chat --greedy --query QUESTION` answers (a few tokens past the answer's length at most)."""
    import warnings

    from transformers.utils import logging as hf_logging

    from . import load_model, load_tokenizer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, adapter=adapter_dir)
    limit = len(tokenizer.encode(answer)) + 2  # (chat drops a cut reply's last token: a longer one still differs)
    return model.chat(tokenizer, question, do_sample=False, max_new_tokens=limit)[0]


def _parser():
    from .command_line import OneLineParser

    # (one line for a bad flag, as the other commands: argparse's usage text above the error was its reply)
    ap = OneLineParser(prog="qwen-ft demo", description="Make the tiny random demo model dir.",
                       examples="  qwen-ft demo --make-model /tmp/demo-int4 --int4\n"
                                "  qwen-ft train -m /tmp/demo-int4 -d data/demo_memorize.json -o output/demo")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--make-model", metavar="DIR", help="where to write it (kept if already there)")
    what.add_argument("--hint", nargs=3, metavar=("MODEL", "ADAPTER", "DATA"),
                      help="print the chat command that reproduces the demo run's memorised answers")
    ap.add_argument("--int4", action="store_true", help="GPTQ Int4 form, as Qwen-*-Chat-Int4")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    ap.add_argument("--force", action="store_true", help="rebuild even if DIR already holds the model")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.hint:
        print(chat_hint(*args.hint, check=True))
        return 0
    out = Path(args.make_model)
    done = out / "config.json"
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: {out} is a file, not a directory; pass another dir for the demo model")
    if done.is_file() and not args.force:
        from .errors import ModelLoadError
        from .model_dir import describe

        try:
            quantized = describe(out).quantized
        except ModelLoadError as e:  # a damaged cache: said, not rebuilt over silently
            raise SystemExit(f"error: {e}; remove {out} (or pass --force) to rebuild the demo model") from None
        if quantized == args.int4:
            print(f"demo model: {out} (cached)")
            return 0
        raise SystemExit(f"error: {out} holds a demo model of the other kind; pass another dir or --force")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise SystemExit(f"error: {out} exists and is not a demo model dir; refusing to write into it")
    make_demo_model(out, seed=args.seed, int4=args.int4)
    print(f"demo model: {out} ({'Int4' if args.int4 else 'fp32'}, tiny random Qwen v1)")
    return 0


__all__ = ["make_demo_model", "write_model_files", "randomize_weights", "chat_hint", "TINY_CONFIG", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
