"""Write a random Qwen v1 model dir (Qwen-14B shape or the tiny demo shape), GPTQ Int4 or bf16, in the official
layout (config.json, sharded safetensors with an index, tokenizer over the project's small vocabulary), for
runs that go through the real scripts (benchmarks/multi_gpu.py). The weights are made on --device (the GPU
for 14B: about 9 GiB Int4, 28 GiB bf16) and written shard by shard.

  python benchmarks/make_model_dir.py --shape 14b --int4 --out /tmp/mg/int4
  python benchmarks/make_model_dir.py --shape tiny --out /tmp/mg/float --device cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.demo import TINY_CONFIG, write_model_files  # noqa: E402
from finetune.modeling import QWenConfig  # noqa: E402
from finetune.quant.loading import build_gptq_model_on_device  # noqa: E402

SHAPES = {
    "14b": dict(vocab_size=152064, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, kv_channels=128,
                intermediate_size=27392, seq_length=2048, max_position_embeddings=8192),
    "tiny": {},
}
INT4 = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "quant_method": "gptq",
        "static_groups": False, "true_sequential": True, "damp_percent": 0.01}
SHARD_BYTES = 4 * 2**30


def make_model_dir(out: Path, shape: str, int4: bool, device: str, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    if (out / "config.json").is_file():
        return out  # made before (the caller picks a dir per shape and kind)
    values = {k: v for k, v in TINY_CONFIG.items() if k not in ("architectures", "auto_map", "model_type")}
    values.update(SHAPES[shape])
    if int4:
        # the tiny shape's 64-wide inputs hold two groups of 32
        values["quantization_config"] = dict(INT4, group_size=128 if shape == "14b" else 32)
    config = QWenConfig(**values)
    suffixes = {} if int4 else {"suffixes": ()}  # no suffixes: every Linear a float one
    model = build_gptq_model_on_device(config, device=device, dtype=torch.bfloat16, seed=seed, **suffixes)

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = model.state_dict()
    shards, current, size = [], {}, 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if current and size + n > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += n
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in shard.items()}, str(tmp / fname),
                  metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    del model, state, shards, current

    cfg = dict(TINY_CONFIG, **SHAPES[shape], torch_dtype="bfloat16")
    if int4:
        cfg["quantization_config"] = values["quantization_config"]
    write_model_files(tmp, cfg)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # complete or absent: a killed run leaves only the .partial dir
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="14b")
    ap.add_argument("--int4", action="store_true", help="GPTQ Int4 (else bf16 float weights)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = make_model_dir(Path(args.out), args.shape, args.int4, args.device, args.seed)
    print(f"model dir: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
