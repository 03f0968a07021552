"""Host time of a JSON-schema row's token mask (finetune/inference/constraints.py) for Qwen's real vocabulary.

Each decode step of a row held to a schema computes, on the host, the tokens its llguidance matcher allows next
(``Constraints.allowed``: llguidance's bitmask, then unpacked on the device); the engine overlaps it with the
forward on CUDA. This walks the tokens of a few documents (as a model would write them) through one matcher per
document and times each step's mask (CPU here: the unpacking too); prints one JSON line.

    python benchmarks/json_mask_cost.py [--vocab ../shared/qwen/qwen.tiktoken] [--rows 1 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from finetune.inference.constraints import Constraints
from finetune.tokenization import QWenTokenizer

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "year": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]}}, "required": ["name", "year", "tags", "address"]}
DOCS = [{"name": "Blue Falcon", "year": 2024, "tags": ["aurora", "project", "codename"],
         "address": {"city": "Zürich", "zip": "8001"}},
        {"name": "一个很长的名字，用来测试多字节字符", "year": -7, "tags": [],
         "address": {"city": "New York", "zip": "10001"}},
        {"name": "x" * 200, "year": 123456789, "tags": ["a"] * 20, "address": {"city": "", "zip": "0"}}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", default=str(ROOT.parent / "shared" / "qwen" / "qwen.tiktoken"))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="matchers masked together a step")
    args = ap.parse_args()
    tok = QWenTokenizer(args.vocab)
    vocab = (tok.vocab_size + 127) // 128 * 128  # (Qwen-14B's lm_head: 151,936 rows)
    start = time.perf_counter()
    constraints = Constraints(tok.tokenizer, vocab, tok.im_end_id)
    constraints.matcher("json_schema", SCHEMA)
    setup = time.perf_counter() - start
    out = {"vocab": vocab, "setup_s": round(setup, 3), "torch_threads": torch.get_num_threads()}
    for rows in args.rows:
        times = []
        for doc in DOCS:
            ids = tok.encode(json.dumps(doc, ensure_ascii=False)) + [tok.im_end_id]
            matchers = [constraints.matcher("json_schema", SCHEMA) for _ in range(rows)]
            for t in ids:
                t0 = time.perf_counter()
                allowed = constraints.allowed(matchers, torch.device("cpu"))
                times.append(time.perf_counter() - t0)
                assert bool(allowed[0, t]), f"token {t} ({tok.decode([t])!r}) not allowed"
                for m in matchers:
                    assert m.consume_token(t)
        times.sort()
        out[f"rows{rows}"] = {"steps": len(times), "p50_ms": round(statistics.median(times) * 1e3, 3),
                              "p90_ms": round(times[int(0.9 * len(times))] * 1e3, 3),
                              "max_ms": round(times[-1] * 1e3, 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
