"""Reply metrics for `qwen-ft eval`: exact match and ROUGE-L F1, written out (no extra dependency).

Both compare strings after the same normalisation: Unicode NFKC (full-width forms become ASCII, so "Ａ" and
"A" agree), then surrounding whitespace stripped and inner whitespace runs collapsed to one space. Case and
punctuation are kept: "Blue Falcon." and "blue falcon" differ.

ROUGE-L tokens: Latin (and any non-CJK) text is split on whitespace; every CJK character (Han ideographs,
kana, Hangul, CJK symbols and punctuation) is a token on its own, because Chinese and Japanese do not put
spaces between words. "Qwen模型 is good" -> ["Qwen", "模", "型", "is", "good"].

ROUGE-L F1 = 2 P R / (P + R) with LCS = the longest common subsequence of the two token lists,
P = LCS / len(prediction), R = LCS / len(reference) (Lin, 2004, with beta = 1). Two empty strings score 1,
one empty string scores 0.
"""

from __future__ import annotations

import re
import unicodedata

_CJK = (
    "\u2e80-\u2fdf"  # CJK radicals
    "\u3000-\u303f"  # CJK symbols and punctuation
    "\u3040-\u30ff"  # hiragana, katakana
    "\u3100-\u31ff"  # bopomofo, kanbun, katakana ext
    "\u3400-\u4dbf"  # CJK ext A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uac00-\ud7af"  # Hangul syllables
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\ufe30-\ufe4f"  # CJK compatibility forms
    "\U00020000-\U0003ffff"  # CJK ext B..F, I (plane 2) and ext G, H (plane 3)
)
_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


def normalize_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


def rouge_tokens(text: str) -> list[str]:
    """Whitespace tokens for Latin text, one token per CJK character (see the module doc)."""
    return _TOKEN.findall(normalize_text(text))


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between two strings (0..1)."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


__all__ = ["exact_match", "lcs_length", "normalize_text", "rouge_l", "rouge_tokens"]
