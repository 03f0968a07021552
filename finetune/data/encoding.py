"""One conversation -> ChatML token ids and labels, with turn-aware truncation.

Layout, token for token what the official `make_context` / finetune.py build (role, "\\n" and content are
encoded separately; control tokens are inserted by id, message text is plain text, so a literal
"<|im_end|>" in data never becomes the control token):

    <|im_start|> system \\n {system} <|im_end|> \\n
    <|im_start|> user \\n {q} <|im_end|> \\n <|im_start|> assistant \\n {a} <|im_end|> \\n ...

Labels are -100 except each assistant reply and the <|im_end|> closing it. With `train_on_prompt` the
system and user contents and their <|im_end|> are trained too; the "<|im_start|>role\\n" headers and the
"\\n" after <|im_end|> never are (they are fixed by the format, nothing to learn).

Truncation to `max_len`: the system block and whole turns are kept from the start while they fit; the first
user/assistant pair that does not fit and all after it are dropped. If even the first pair does not fit,
the sequence is cut at `max_len` inside that pair's reply, which keeps its labels (its <|im_end|> is lost
only because the reply itself does not fit). Replies of weight 0 are context: while the kept pairs hold no trained
reply, the first trained reply is the one cut. If the prompt alone does not fit, nothing is trainable:
`n_trained` is 0 and the dataset builder reports the record instead of training on it.
"""

from __future__ import annotations

import unicodedata
import weakref
from dataclasses import dataclass

from .records import normalize_record, trained_reply

IGNORE = -100
# the shortest row length (--model_max_length, eval's --max-len) worth a run: a turn's ChatML headers and
# <|im_end|> alone take several tokens, so below this no conversation keeps a trained token
MIN_MAX_LEN = 16


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool  # some of the conversation did not fit in max_len
    full_length: int  # the length before truncation
    n_trained: int  # labels != -100

    def as_dict(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels}


class ChatEncoder:
    """The per-tokenizer constants of the layout, so each message costs one `encode_ordinary` call.

    Picklable cheaply when the tokenizer came from a vocab file (workers rebuild it from the path), so
    `datasets.map(num_proc=...)` and its fingerprinting do not ship the 150k-entry vocabulary around.
    """

    def __init__(self, tokenizer):
        self.vocab_file = getattr(tokenizer, "vocab_file", None)
        if self.vocab_file:  # forked workers find it here instead of rebuilding it from the file
            _BY_VOCAB.setdefault(self.vocab_file, tokenizer.encoding)
            self.vocab_digest = _file_digest(self.vocab_file)
        self._setup(tokenizer.encoding, tokenizer.im_start_id, tokenizer.im_end_id)

    def _setup(self, encoding, im_start: int, im_end: int):
        self.encoding, self.im_start_id, self.im_end_id = encoding, im_start, im_end
        self.encode_text = encoding.encode_ordinary
        nl = self.encode_text("\n")
        self.header = {r: [im_start] + self.encode_text(r) + nl for r in ("system", "user", "assistant")}
        self.header_mask = {r: [IGNORE] * len(h) for r, h in self.header.items()}
        self.end = [im_end] + nl  # closes every turn
        self.nl_mask = [IGNORE] * len(nl)

    def __getstate__(self):
        if self.vocab_file:
            # The digest makes the datasets fingerprint change when the vocabulary changes (its content: a
            # copy that keeps size and mtime is still a different vocabulary).
            return {"vocab_file": self.vocab_file, "digest": self.vocab_digest,
                    "ids": (self.im_start_id, self.im_end_id)}
        return {"vocab_file": None, "encoding": self.encoding, "ids": (self.im_start_id, self.im_end_id)}

    def __setstate__(self, state):
        self.vocab_file = state["vocab_file"]
        if self.vocab_file:
            self.vocab_digest = state["digest"]
            encoding = _shared_encoding(self.vocab_file)
        else:
            encoding = state["encoding"]
        self._setup(encoding, *state["ids"])

    def encode(self, record: dict, max_len: int | None = None, train_on_prompt: bool = False,
               normalized: bool = False) -> Encoded:
        """Encode one record (any accepted form; `normalized=True` skips validation for trusted input)."""
        if not normalized:
            record = normalize_record(record)
        enc, nfc = self.encode_text, unicodedata.normalize
        header, header_mask, end, nl_mask = self.header, self.header_mask, self.end, self.nl_mask
        im_end = self.im_end_id

        # Each message is encoded once; the layout around it comes from cached token lists.
        turns = [("system", enc(nfc("NFC", record["system"])) if record["system"] else [])]
        turns += [(m["role"], enc(nfc("NFC", m["content"]))) for m in record["messages"]]
        # tool conversations: labels only on the assistant's trained segments (not on observations)
        masks = {} if train_on_prompt else {k + 1: self._segment_labels(turns[k + 1][1], m["segments"])
                                            for k, m in enumerate(record["messages"]) if "segments" in m}
        # assistant turns with weight 0 (OpenAI's fine-tuning format) are context: never trained; so is one whose
        # segments are all untrained (its <|im_end|> too), unless train_on_prompt trains those as prompt text
        context = {k + 1 for k, m in enumerate(record["messages"])
                   if m.get("weight") == 0 or not (train_on_prompt or trained_reply(m))}
        sizes = [len(header[r]) + len(c) + len(end) for r, c in turns]
        full_length = sum(sizes)
        if max_len is None or full_length <= max_len:
            keep, cut = len(turns), None
        else:
            first_trained = next((k for k, (role, _) in enumerate(turns)
                                  if (role == "assistant" or train_on_prompt) and k not in context), len(turns))
            keep, cut = self._truncate(sizes, max_len, first_trained)

        # ids and labels with list arithmetic (no per-token Python work)
        input_ids: list[int] = []
        labels: list[int] = []
        n_trained = 0
        for k, ((role, c), size) in enumerate(zip(turns[:keep], sizes)):
            input_ids += header[role]
            input_ids += c
            input_ids += end
            if (role == "assistant" or train_on_prompt) and k not in context:
                labels += header_mask[role]
                content_labels = masks.get(k, c)
                labels += content_labels
                labels.append(im_end)
                labels += nl_mask
                n_trained += len(content_labels) - content_labels.count(IGNORE) + 1
            else:
                labels += [IGNORE] * size
        if cut is not None:  # the first (trained) pair does not fit: cut inside its reply
            del input_ids[cut:], labels[cut:]
            n_trained = len(labels) - labels.count(IGNORE)
        return Encoded(input_ids, labels, len(input_ids) < full_length, full_length, n_trained)

    def _segment_labels(self, ids: list[int], segments: list) -> list[int]:
        """Labels for one message's tokens: a token is trained when its first character lies in a trained
        segment (the message is encoded whole, as at inference, so tokens may straddle a boundary)."""
        _, offsets = self.encoding.decode_with_offsets(ids)
        spans, pos = [], 0
        for text, trained in segments:
            n = len(unicodedata.normalize("NFC", text))
            if trained:
                spans.append((pos, pos + n))
            pos += n
        return [t if any(a <= o < b for a, b in spans) else IGNORE for t, o in zip(ids, offsets)]

    @staticmethod
    def _truncate(sizes: list[int], max_len: int, first_trained: int) -> tuple[int, int | None]:
        """(number of turns kept, cut position or None): whole user/assistant pairs while they fit, as long as
        they hold a trained turn (``first_trained``, its index in ``sizes``); else the turns up to and including
        the first trained one, cut at max_len inside it (after weight-0 replies, the first trained pair is what
        "the first pair" is for a plain conversation: whole pairs of context alone trained nothing, and the
        record was dropped as if its prompt did not fit)."""
        used = sizes[0]  # the system block
        i = 1
        while i < len(sizes):
            pair = 2 if i + 1 < len(sizes) else 1  # a trailing user turn without reply is its own "pair"
            size = sum(sizes[i:i + pair])
            if used + size > max_len:
                break
            used += size
            i += pair
        if i > 1 and i > first_trained:
            return i, None
        if i > 1:  # the kept pairs are context alone: cut inside the first trained reply (if its prompt fits)
            return first_trained + 1, max_len
        # Not even the first pair fits: keep it, cut at max_len (inside the reply, if the prompt fits).
        return min(3, len(sizes)), max_len


def _file_digest(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:  # a vocabulary is a few MB: read whole
        return hashlib.blake2b(f.read(), digest_size=16).hexdigest()


_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_BY_VOCAB: dict[str, object] = {}


def _shared_encoding(vocab_file: str):
    """One tiktoken Encoding per vocab file per process (building one for 150k ranks takes ~1 s)."""
    if vocab_file not in _BY_VOCAB:
        from ..tokenization import build_encoding

        _BY_VOCAB[vocab_file] = build_encoding(vocab_file)
    return _BY_VOCAB[vocab_file]


def chat_encoder(tokenizer) -> ChatEncoder:
    """The (cached) ChatEncoder of a tokenizer; a ChatEncoder is returned as is."""
    if isinstance(tokenizer, ChatEncoder):
        return tokenizer
    try:
        enc = _ENCODERS.get(tokenizer)
    except TypeError:  # not weak-referenceable / hashable: build one each time
        return ChatEncoder(tokenizer)
    if enc is None:
        enc = _ENCODERS[tokenizer] = ChatEncoder(tokenizer)
    return enc


def encode_conversation_info(tokenizer, record: dict, max_len: int | None = None,
                             train_on_prompt: bool = False) -> Encoded:
    """`encode_conversation` plus whether the record was truncated, its full length and trained tokens."""
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    return chat_encoder(tokenizer).encode(record, max_len, train_on_prompt)


def encode_conversation(tokenizer, record: dict, max_len: int | None = None,
                        train_on_prompt: bool = False) -> dict:
    """One record in any accepted form -> {"input_ids": [...], "labels": [...]} (see the module doc)."""
    return encode_conversation_info(tokenizer, record, max_len, train_on_prompt).as_dict()
