"""Learn a small byte-level BPE vocabulary in Qwen's `.tiktoken` format.

The project ships such a vocabulary (finetune/assets/qwen_small.tiktoken) so the tests and the demo run
with Qwen's tokenizer code, pre-tokenizer and special-token layout but without the 2.5 MB real vocabulary
and its 152k-row embedding. Rebuild it with `python -m finetune.bpe`.
"""

from __future__ import annotations

import argparse
import base64
from collections import Counter
from pathlib import Path

import regex

from .tokenization import PAT_STR, SMALL_VOCAB

CORPUS = Path(__file__).parent / "assets" / "vocab_corpus.txt"


def learn_bpe(text: str, n_ranks: int) -> dict[bytes, int]:
    """Ranks 0..255 are the single bytes; each later rank is the most frequent adjacent pair at that step
    (ties broken by the bytes themselves, so the result is deterministic)."""
    if n_ranks < 256:
        raise ValueError("a byte-level vocabulary needs at least 256 ranks")
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(regex.findall(PAT_STR, text))
    seqs = [[bytes([b]) for b in w.encode("utf-8")] for w in words]
    freqs = list(words.values())
    while len(ranks) < n_ranks:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for seq, f in zip(seqs, freqs):
            for a, b in zip(seq, seq[1:]):
                pairs[a, b] += f
        if not pairs:
            raise ValueError(f"the corpus supports only {len(ranks)} ranks, {n_ranks} were asked for")
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merged = best[0] + best[1]
        ranks[merged] = len(ranks)
        for seq in seqs:
            i = 0
            while i < len(seq) - 1:
                if seq[i] == best[0] and seq[i + 1] == best[1]:
                    seq[i : i + 2] = [merged]
                i += 1
    return ranks


def write_tiktoken(ranks: dict[bytes, int], path: str | Path) -> None:
    with open(path, "w") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--ranks", type=int, default=1840, help="BPE ranks; the 208 specials follow them")
    ap.add_argument("--out", default=str(SMALL_VOCAB))
    args = ap.parse_args(argv)
    ranks = learn_bpe(Path(args.corpus).read_text(encoding="utf-8"), args.ranks)
    write_tiktoken(ranks, args.out)
    print(f"wrote {len(ranks)} ranks to {args.out}")


if __name__ == "__main__":
    main()
