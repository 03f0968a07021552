"""Stop strings on a row's generated text (``SamplingParams.stop``): the engine ends a row at the token whose text
completes one of them, so the row leaves the batch at once rather than running on to max_new_tokens.

The text is decoded as it grows, a token at a time; a token that ends inside a multi-byte character waits for the
bytes that complete it (at most a few tokens: a character has at most 4 bytes), so a stop string is matched in the
same text a client sees. Only the last ``longest - 1`` characters are kept between tokens: enough for a stop string
that begins in an earlier token's text.
"""

from __future__ import annotations

_MAX_PENDING = 4  # tokens of one character at most (every token is at least one byte)


class StopStrings:
    __slots__ = ("tokenizer", "stops", "keep", "pending", "tail")

    def __init__(self, tokenizer, stops):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.keep = max(len(s) for s in self.stops) - 1
        self.pending: list[int] = []  # generated ids not decoded yet (an incomplete character)
        self.tail = ""  # the last `keep` characters of the text decoded so far

    def add(self, token: int) -> str | None:
        """One more generated token; returns the stop string its text completes (the first of ``stops`` found),
        else None."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < _MAX_PENDING:
            return None
        self.pending = []
        window = self.tail + text
        # a stop string that ends in this token's text: one the tail holds whole was met at an earlier token (and not
        # counted there, before min_new_tokens), which reported it again at every token while the tail held it
        hit = next((s for s in self.stops if window.find(s, max(0, len(self.tail) - len(s) + 1)) >= 0), None)
        self.tail = window[len(window) - self.keep:] if self.keep else ""
        return hit


__all__ = ["StopStrings"]
