"""The data preparation a `qwen-ft train` walks before its first step, at a real dataset's size.

Usage: python benchmarks/data_scale.py [--n 200000] [--forms jsonl,json] [--workers 1,2]
           [--stages read,validate,encode,build,hit] [--max-len 8192] [--dir /tmp/data_scale] [--out FILE]

Synthetic chat data (deterministic seed), written once into --dir and reused: conversations of 100-2,000
tokens of the real Qwen vocabulary (English, Chinese, Japanese, Russian, German, code, markdown, emoji,
literal control-token text), 1-4 turn pairs, replies about three times longer than the questions, one in ten
with its own system prompt, one in fifty a tool-call record; as JSONL and as one JSON array (indent 2, the way
`json.dump` writes one). Each stage runs in a fresh process (as a user's run does) and reports its wall time
and the peak RSS of its process tree (sampled every 20 ms, workers included), also without shared pages
(memory-mapped Arrow files count in RSS while they are read):

  read      the file parsed record by record (records._iter_raw), nothing else
  validate  read + normalize_record (iter_records)
  encode    validate + ChatEncoder.encode (tokenize, labels, truncation), one process, nothing written
  build     build_dataset as train.py calls it (packing, --model_max_length, --preprocessing_num_workers W)
            into a fresh cache: everything before the trainer sees the dataset
  hit       the same build_dataset in a new process, the cache written by `build` present (a second run)

`import` seconds (finetune.data, datasets) are reported apart and not in the stage's time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from synthetic_text import CODE as CODE_BASE  # noqa: E402
from synthetic_text import EN, NAMES, draw_text  # noqa: E402
from synthetic_text import ZH as ZH_BASE  # noqa: E402

VOCAB = ROOT.parent / "shared" / "qwen" / "qwen.tiktoken"

ZH = ZH_BASE + ['数据集', '包含', '二十万', '条', '对话', '，', '每', '条', '对话', '都', '经过', '清洗', '和', '去重', '。']
JA = "これは 日本語 の 文章 です 。 モデル は データ から 学習 し ます 。 東京 の 天気 は 晴れ です 。".split()
RU = ("модель учится на примерах и каждый ответ должен быть коротким ясным и правильным данные "
      "проходят проверку перед обучением").split()
DE = "das Modell lernt aus Beispielen und jede Antwort sollte kurz und richtig sein über große Datenmengen".split()
CODE = CODE_BASE + [
    'fn {f}({a}: &[u32]) -> u64 {{\n    {a}.iter().map(|x| *x as u64 * {n}).sum()\n}}\n',
]
EXTRA = ["<|im_end|>", "<|endoftext|>", "<|im_start|>assistant", "🙂", "👍🏽", "e\u0301", "\t", "—", "½"]
SYSTEMS = ["You are a careful assistant who answers in Chinese.", "你是一个乐于助人的助手。",
           "You are a senior Python reviewer. Be terse."]


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.38:
        words = rng.choices(EN, k=rng.randint(6, 24))
        return " ".join(words).capitalize() + rng.choice([".", "?", "!", ".", ":"])
    if kind < 0.63:
        return "".join(rng.choices(ZH, k=rng.randint(8, 30)))
    if kind < 0.68:
        return "".join(rng.choices(JA, k=rng.randint(6, 20)))
    if kind < 0.73:
        return " ".join(rng.choices(RU, k=rng.randint(6, 18))).capitalize() + "."
    if kind < 0.77:
        return " ".join(rng.choices(DE, k=rng.randint(6, 18))).capitalize() + "."
    if kind < 0.80:
        return "- " + " ".join(rng.choices(EN, k=rng.randint(3, 8))) + " " + rng.choice(EXTRA) + "\n"
    t = rng.choice(CODE)
    return f"```{rng.choice(['python', 'js', 'sql', 'rust'])}\n" + t.format(
        f=rng.choice(NAMES), F=rng.choice(NAMES).title(), a=rng.choice(NAMES), b=rng.choice(NAMES),
        n=rng.randint(0, 99999)) + "```\n"


def _tool_record(rng: random.Random, i: int, pool, pool_len) -> dict:
    city = rng.choice(["Paris", "北京", "Tokyo", "Berlin"])
    weather = {"name": "get_weather", "description": "Weather of a city.",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    return {"id": f"tool-{i}", "tools": [{"type": "function", "function": weather}], "messages": [
        {"role": "user", "content": f"Weather in {city}? " + pool[rng.randrange(len(pool))]},
        {"role": "assistant", "content": "I need the weather.", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": city}, ensure_ascii=False)}}]},
        {"role": "tool", "tool_call_id": "c1", "content": f"sunny, {rng.randint(-5, 35)}C"},
        {"role": "assistant", "content": " ".join(pool[rng.randrange(len(pool))] for _ in range(3))},
    ]}


def make_conversations(n: int, encoding, seed: int = 1234, lo: int = 100, hi: int = 2000):
    """n records (generator): 1 in 50 a tool call, else `lo`-`hi` content tokens in 1-4 pairs, replies ~3x
    the questions."""
    rng = random.Random(seed)
    pool = [_sentence(rng) for _ in range(6000)]
    pool_len = [len(encoding.encode_ordinary(s)) for s in pool]
    for i in range(n):
        if i % 50 == 49:
            yield _tool_record(rng, i, pool, pool_len)
            continue
        budget = rng.randint(lo, hi)
        pairs = rng.randint(1, 4)
        turns = []
        for t in range(2 * pairs):
            share = budget // (4 * pairs) * (3 if t % 2 else 1)
            turns.append({"from": "user" if t % 2 == 0 else "assistant",
                          "value": draw_text(rng, pool, pool_len, share)})
        rec = {"id": f"bench-{i}", "conversations": turns}
        if i % 10 == 3:
            rec["system"] = rng.choice(SYSTEMS)
        yield rec


def write_data(n: int, out_dir: Path, seed: int = 1234) -> dict[str, Path]:
    """The JSONL and JSON-array files of n records (written once per n and seed, then reused)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": out_dir / f"chat-{n}-{seed}.jsonl", "json": out_dir / f"chat-{n}-{seed}.json"}
    if all(p.exists() for p in paths.values()):
        return paths
    sys.path.insert(0, str(ROOT))
    from finetune.tokenization import build_encoding

    enc = build_encoding(str(VOCAB))
    tmp = {k: p.with_suffix(p.suffix + ".tmp") for k, p in paths.items()}
    with open(tmp["jsonl"], "w", encoding="utf-8") as fl, open(tmp["json"], "w", encoding="utf-8") as fa:
        fa.write("[\n")
        for i, rec in enumerate(make_conversations(n, enc, seed)):
            fl.write(json.dumps(rec, ensure_ascii=False) + "\n")
            body = json.dumps(rec, ensure_ascii=False, indent=2)
            fa.write(("" if i == 0 else ",\n") + "  " + body.replace("\n", "\n  "))
        fa.write("\n]\n")
    for k in paths:
        os.replace(tmp[k], paths[k])
    return paths


# -- one stage, in a child process -----------------------------------------------------------------------


def child(stage: str, path: str, workers: int, cache: str, max_len: int) -> dict:
    t0 = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    import datasets  # noqa: F401  (a user's run imports it before the data too)

    from finetune.data import build_dataset, iter_records
    from finetune.data.encoding import chat_encoder
    from finetune.data.records import _iter_raw
    from finetune.tokenization import QWenTokenizer

    tok = QWenTokenizer(str(VOCAB))
    res = {"import_and_tokenizer_s": time.perf_counter() - t0}
    t = time.perf_counter()
    if stage == "read":
        res["records"] = sum(1 for _ in _iter_raw(path))
    elif stage == "validate":
        res["records"] = sum(1 for _ in iter_records(path))
    elif stage == "encode":
        enc = chat_encoder(tok)
        n = tokens = 0
        for rec, _ in iter_records(path):
            e = enc.encode(rec, max_len, normalized=True)
            n += 1
            tokens += len(e.input_ids)
        res["records"], res["tokens"] = n, tokens
    elif stage in ("build", "hit"):
        ds, summary = build_dataset(tok, path, max_len, packing=True, num_proc=workers, cache_dir=cache,
                                    progress=False)
        res["records"], res["tokens"], res["rows"] = summary.records_used, summary.total_tokens, len(ds)
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    res["seconds"] = time.perf_counter() - t
    return res


def _tree_rss(proc) -> tuple[int, int]:
    """(RSS, RSS less shared pages) of a process and its children: the second leaves out the pages of
    memory-mapped Arrow files (the page cache holds them; they are not the process's own memory)."""
    import psutil

    total = own = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            m = p.memory_info()
        except psutil.Error:
            continue
        total += m.rss
        own += m.rss - m.shared
    return total, own


def run_stage(stage: str, path: Path, workers: int, cache: Path, max_len: int) -> dict:
    import psutil

    cmd = [sys.executable, __file__, "--child", stage, "--path", str(path), "--workers", str(workers),
           "--cache", str(cache), "--max-len", str(max_len)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    ps = psutil.Process(proc.pid)
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            try:
                rss, own = _tree_rss(ps)
                peak[0], peak[1] = max(peak[0], rss), max(peak[1], own)
            except psutil.Error:
                break
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    th.join()
    if proc.returncode:
        raise SystemExit(f"stage {stage} failed (exit {proc.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = round(peak[0] / 2**20)
    res["peak_unshared_mb"] = round(peak[1] / 2**20)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200000)
    ap.add_argument("--forms", default="jsonl,json")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--stages", default="read,validate,encode,build,hit")
    ap.add_argument("--max-len", type=int, default=8192, help="--model_max_length (train.py's default)")
    ap.add_argument("--dir", default="/tmp/data_scale")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, int(args.workers), args.cache, args.max_len)))
        return

    paths = write_data(args.n, Path(args.dir))
    res = {"n": args.n, "max_len": args.max_len, "cpu_count": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
           "files_mb": {k: round(p.stat().st_size / 2**20, 1) for k, p in paths.items()}, "runs": []}
    print(f"{args.n} records: " + ", ".join(f"{k} {v} MB" for k, v in res["files_mb"].items()), flush=True)
    stages = args.stages.split(",")
    for form in args.forms.split(","):
        for w in (int(x) for x in args.workers.split(",")):
            cache = Path(args.dir) / f"cache-{form}-{w}"
            shutil.rmtree(cache, ignore_errors=True)
            for stage in stages:
                if stage in ("read", "validate", "encode") and w != 1:
                    continue  # one process by construction
                r = run_stage(stage, paths[form], w, cache, args.max_len)
                r.update(form=form, workers=w, stage=stage)
                res["runs"].append(r)
                rate = f"{r['tokens'] / r['seconds'] / 1e6:6.2f} M tok/s" if "tokens" in r else " " * 14
                print(f"{form:5s} w={w} {stage:9s} {r['seconds']:8.1f} s  {rate}  peak RSS {r['peak_rss_mb']:6d} MB "
                      f"({r['peak_unshared_mb']} unshared)  (imports+tokenizer {r['import_and_tokenizer_s']:.1f} s)",
                      flush=True)
            shutil.rmtree(cache, ignore_errors=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
