"""The server's token -> text stream: multi-byte characters never split, stop strings honoured across
chunks, and the deltas joining to exactly chat()'s stripped reply."""

from __future__ import annotations

import pytest

from finetune.serve.textstream import TextStream
from finetune.tokenization import SMALL_VOCAB, QWenTokenizer


@pytest.fixture(scope="module")
def tok():
    return QWenTokenizer(str(SMALL_VOCAB))


def one_by_one(tok, text, stop=None):
    s = TextStream(tok, stop)
    deltas = [s.feed([i]) for i in tok.encode(text)]
    deltas.append(s.finish())
    return s, [d for d in deltas if d]


def test_multibyte_characters_are_never_split(tok):
    text = "owl 🦉 and 猫头鹰 done"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some token holds part of a character
    s, deltas = one_by_one(tok, text)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == s.final_text == text


def test_deltas_join_to_the_stripped_reply(tok):
    s, deltas = one_by_one(tok, "\n  Hello there.  \n")
    assert "".join(deltas) == "Hello there." == s.final_text
    s = TextStream(tok)
    assert s.feed(tok.encode("Hello ")) == "Hello"  # trailing whitespace waits for what follows
    assert s.feed(tok.encode("world")) == " world"
    assert s.finish() == ""


def test_a_stop_string_across_chunks_is_never_sent(tok):
    text = "Thought: look it up\nAction: f\nAction Input: {}\nObservation: made up"
    s, deltas = one_by_one(tok, text, ["Observation:"])
    assert s.stopped and "".join(deltas) == "Thought: look it up\nAction: f\nAction Input: {}"
    assert not any("Obs" in d for d in deltas)
    # a prefix of a stop string that does not complete is sent once it is decided
    s, deltas = one_by_one(tok, "Observe this", ["Observation:"])
    assert not s.stopped and "".join(deltas) == "Observe this"


def test_an_incomplete_last_character_ends_as_chat_decodes_it(tok):
    ids = tok.encode("猫")
    assert len(ids) > 1
    s = TextStream(tok)
    assert s.feed(ids[:-1]) == ""  # held: not a whole character yet
    assert s.finish() == tok.decode(ids[:-1]).strip()


def test_unstripped_text_is_sent_as_generated(tok):
    """strip=False (a reply continuing the client's assistant message): whitespace is text, sent at once;
    stop strings are still held back and cut."""
    s = TextStream(tok, ["END"], strip=False)
    assert s.feed(tok.encode(" Hello ")) == " Hello "
    assert s.feed(tok.encode("world EN")) == "world "  # "EN" may start the stop string
    assert s.feed(tok.encode("D more")) == "" and s.stopped
    assert s.finish() == "" and s.final_text == " Hello world "
