"""Exception types shared by the loaders, how an error message quotes a value or words a JSON error, and what makes
text invalid (a leaf module: it imports nothing from the package)."""

import re


def json_reason(e) -> str:
    """json's words for a JSONDecodeError without their trailing "at" (two of them end so: "Invalid control character
    at", "Unterminated string starting at"), for a message that says where itself (line and column)."""
    return e.msg.removesuffix(" at")


class ModelLoadError(ValueError):
    """A model dir (or a file in it) that cannot be loaded; the message says which and why."""


def quoted(value, limit: int, *, length: bool = False) -> str:
    """repr(value) as an error message quotes it, never a huge value whole: up to ``limit`` characters as it is, a
    longer one cut to ``limit`` characters ending in "...". ``length`` (the server's form for a client's value): the
    cut keeps ``limit`` characters before the "..." and says how long the whole was, and a string is measured and cut
    in its own characters before its repr (its quotes stay whole: a string of ``limit`` characters is quoted whole,
    its quotes and escapes beyond the limit)."""
    if length and isinstance(value, str):  # measured and cut in the string's own characters, never mid-quote
        return f"{value[:limit]!r}... ({len(value):,} characters)" if len(value) > limit else repr(value)
    text = repr(value)
    if len(text) <= limit:
        return text
    if length:
        return f"{text[:limit]}... ({len(text):,} characters)"
    return text[:limit - 3] + "..."


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> str | None:
    """Why ``text`` is not valid Unicode text ("holds U+D800 at character 3, ..."), or None: JSON lets a broken
    "\\ud800" escape through, and the tokenizer would replace it with U+FFFD silently (the data pipeline's records
    and the server's messages refuse it)."""
    m = None if text.isascii() else _SURROGATE.search(text)  # isascii is O(1) in CPython
    if m is None:
        return None
    return (f"holds U+{ord(m.group()):04X} at character {m.start() + 1}, half of a UTF-16 surrogate pair (a broken "
            "\\u escape): not valid Unicode text")
