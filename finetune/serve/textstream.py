"""Generated token ids -> the text deltas a client sees.

- Incremental decoding that never splits a multi-byte character: the ids not yet turned into text are
  decoded together, and their text is taken once it no longer ends in U+FFFD (an incomplete UTF-8
  sequence); a byte-level BPE text is the concatenation of its tokens' bytes, so cutting there is exact.
- Stop strings are honoured across chunk boundaries: a tail of the text that could be the start of a stop
  string is held back until the next tokens decide; the text is cut where a stop string begins. With
  ``min_ids`` (the request's min_tokens) a stop string completed by one of the first ``min_ids - 1`` tokens
  does not count, as the engine treats its own stop strings and stop tokens (and vLLM its stop strings).
- The deltas join to exactly what `model.chat` returns: the reply stripped of leading and trailing
  whitespace (leading whitespace is never sent; trailing whitespace is held back until text follows it).
  A reply cut at a stop string is what the official openai_api.py makes of chat()'s reply: stripped first,
  then cut before the first stop string (``trim_stop_words``). So a stop string is looked for only after the
  leading whitespace, and the whitespace just before it stays in the reply.
  With ``strip=False`` (the reply continues the client's own assistant message, as the official server's
  text completion) the text is sent as generated: a leading space is part of the continuation.
- ``kept``: stop strings that stay in the text when they end it (vLLM's include_stop_str_in_output): the text
  is cut after them instead of before.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None, strip: bool = True, min_ids: int = 0,
                 kept=()):
        self.tokenizer = tokenizer
        self.strip = strip
        self.stop = [s for s in (stop or []) if s]
        self.kept = set(kept)
        self.min_ids = min_ids
        self._floor: int | None = None  # a stop string counts where it ends past text[:_floor] (min_ids)
        self._longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # decoded text of ids[:_decoded]
        self._decoded = 0
        self._searched = 0  # text[:_searched] holds no stop string start that could still complete
        self._sent = 0  # text[:_sent] has been handed out (after the leading-whitespace skip)
        self.stopped = False  # a stop string was found: the text ends before it

    def feed(self, new_ids: list[int]) -> str:
        """Add generated ids; return the new text that is safe to send ("" when nothing is)."""
        if self.stopped:
            return ""
        self.ids += new_ids
        tail = self.tokenizer.decode(self.ids[self._decoded:])
        if tail and not tail.endswith("\ufffd"):
            self.text += tail
            self._decoded = len(self.ids)
            self._find_stop()
        return self._emit(final=False)

    def finish(self) -> str:
        """Generation ended: the rest of the text (an incomplete last character decodes as U+FFFD, as in
        chat())."""
        if not self.stopped and self._decoded < len(self.ids):
            self.text += self.tokenizer.decode(self.ids[self._decoded:])
            self._decoded = len(self.ids)
            self._find_stop()
        return self._emit(final=True)

    @property
    def final_text(self) -> str:
        if not self.strip:
            return self.text
        return self.text.lstrip() if self.stopped else self.text.strip()

    def _find_stop(self) -> None:
        if not self.stop or len(self.ids) < self.min_ids:
            return  # (no stop string completes before the min_ids-th token)
        if self._floor is None:
            # (without a character the min_ids-1-th token leaves incomplete: it ends with the token after, which
            # completes a stop string ending in it, as the engine counts it)
            before = self.tokenizer.decode(self.ids[:self.min_ids - 1]) if self.min_ids > 1 else ""
            self._floor = len(before.rstrip("\ufffd"))
        # a stop string never starts in text already sent (see _held): a long one need not rescan it all
        start = max(0, self._searched - self._longest + 1, self._sent)
        if self.strip and not self._sent:  # (the official server strips the reply before it looks for a stop string;
            # once text is sent, the leading whitespace lies before _sent, which start already passes)
            start = max(start, len(self.text) - len(self.text.lstrip()))
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, max(start, self._floor - len(s) + 1))) >= 0]
        if hits:
            # the first to start; at one place the shortest, which a token-by-token feed completes first
            i, s = min(hits, key=lambda hit: (hit[0], len(hit[1])))
            self.text = self.text[:i + len(s) if s in self.kept else i]
            self.stopped = True
        self._searched = len(self.text)

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string.

        Only the unsent text is tried: a tail reaching into sent text was a prefix of a stop string when it
        was sent too, so it would have been held then. (Trying every tail up to the longest stop string cost
        a hostile 1M-character stop string seconds of the event loop per token.)"""
        for k in range(min(self._longest - 1, len(self.text) - self._sent), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _emit(self, final: bool) -> str:
        stripped = self.text.lstrip() if self.strip else self.text
        if not stripped:
            return ""
        begin = max(self._sent, len(self.text) - len(stripped))
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held()
        if self.strip and not self.stopped:
            end = len(self.text[:end].rstrip())  # whitespace waits for what follows it (or for a stop string)
        if end <= begin:
            return ""
        self._sent = end
        return self.text[begin:end]
