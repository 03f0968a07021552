"""Encode a chat data file into ChatML token rows (input_ids, labels) with this project's encoder, as JSON.

For the usual-stack benchmark (benchmarks/usual_stack.py --chats): it must train on exactly the token rows
our trainer trains on, but must not import `finetune` itself (importing the package registers the project's
LoRA layer with PEFT and its Qwen classes with transformers' Auto classes), so it runs this in a subprocess.

The rows are what `finetune.data` builds for `scripts/finetune_qlora.sh` without packing: the Qwen v1 ChatML
layout, the default system prompt when a record has none, labels only on assistant replies (-100
elsewhere), turn-aware truncation to --max-len (the script's --model_max_length, 2048). A record that
leaves nothing to train after truncation is an error here, as it is for the trainer.

  python benchmarks/chat_rows.py CHATS.json --tokenizer MODEL_DIR --out rows.json

Bad input (missing file, invalid record, no vocabulary) gets one `error: ...` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("chats", help="JSON / JSONL chat records ({id, conversations: [{from, value}...]}, optional system)")
    p.add_argument("--tokenizer", default=None,
                   help="a Qwen model dir (its qwen.tiktoken) or a .tiktoken file; default: the project's small "
                        "vocabulary, which benchmarks/make_model_dir.py writes into every model dir it makes")
    p.add_argument("--max-len", type=int, default=2048, help="truncation length (the scripts' --model_max_length)")
    p.add_argument("--out", required=True, help="where the JSON rows go")
    return p.parse_args(argv)


def load_tokenizer(path: str | None):
    from finetune.tokenization import SMALL_VOCAB, QWenTokenizer, load_tokenizer, resolve_vocab_file

    if path is None:
        return QWenTokenizer(str(SMALL_VOCAB))
    if Path(path).is_dir():
        return load_tokenizer(path)  # the model dir's tokenizer, checked against its config.json
    return QWenTokenizer(str(resolve_vocab_file(path)))


def encode_file(chats: str, tokenizer, max_len: int) -> dict:
    from finetune.data import DataError, load_records
    from finetune.data.encoding import chat_encoder

    encoder = chat_encoder(tokenizer)
    rows, truncated = [], 0
    records = load_records(chats)  # raises DataError naming the file, record and line
    for i, rec in enumerate(records):
        enc = encoder.encode(rec, max_len, normalized=True)
        if enc.n_trained == 0:
            raise DataError("too long", f"the prompt alone is longer than --max-len {max_len}: nothing to train",
                            path=chats, index=i)
        truncated += enc.truncated
        rows.append(enc.as_dict())
    return {"chats": str(chats), "tokenizer": tokenizer.vocab_file, "tokenizer_len": len(tokenizer),
            "pad_id": tokenizer.pad_token_id,
            "max_len": max_len, "truncated": truncated, "rows": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    from finetune.data import DataError
    from finetune.errors import ModelLoadError

    if args.max_len < 1:
        print(f"error: --max-len must be positive, got {args.max_len}", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        result = encode_file(args.chats, tokenizer, args.max_len)
    except (DataError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
