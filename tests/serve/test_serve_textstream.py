"""The server's token -> text stream: multi-byte characters never split, stop strings honoured across
chunks, and the deltas joining to exactly chat()'s stripped reply (cut at a stop string as the official server
cuts it)."""

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
    # (the "\n" before the stop string stays, as the official server's trim_stop_words leaves it)
    assert s.stopped and "".join(deltas) == "Thought: look it up\nAction: f\nAction Input: {}\n"
    assert not any("Obs" in d for d in deltas)
    # a prefix of a stop string that does not complete is sent once it is decided
    s, deltas = one_by_one(tok, "Observe this", ["Observation:"])
    assert not s.stopped and "".join(deltas) == "Observe this"


def test_kept_stop_strings_end_the_text_after_them(tok):
    """include_stop_str_in_output: a kept stop string stays at the end of the text (streamed one token at a time
    or not); the first stop string to start ends it (at one place the shortest, which completes first), kept or
    not; one not kept is still cut before."""
    text = "Thought: look it up\nAction: f\nObservation: made up"
    for stops, kept, want in [(["Observation:"], ["Observation:"], "Thought: look it up\nAction: f\nObservation:"),
                              (["Action:", "Observation:"], ["Observation:"], "Thought: look it up\n"),
                              (["Obs", "Observation:"], ["Observation:"], "Thought: look it up\nAction: f\n"),
                              (["Observation:", "Obs"], ["Observation:"], "Thought: look it up\nAction: f\n"),
                              (["Observation:", "Obs"], ["Obs"], "Thought: look it up\nAction: f\nObs"),
                              (["up\n"], ["up\n"], "Thought: look it up\n")]:
        s = TextStream(tok, stops, kept=kept)
        deltas = [s.feed([i]) for i in tok.encode(text)] + [s.finish()]
        assert s.stopped and "".join(deltas) == s.final_text == want, (stops, deltas)
        whole = TextStream(tok, stops, kept=kept)
        assert whole.feed(tok.encode(text)) + whole.finish() == want, stops


def test_a_stop_string_cuts_the_reply_as_the_official_server_trims_it(tok):
    """The official openai_api.py strips chat()'s reply, then cuts it before the first stop string: a stop string in
    the leading whitespace is not found there (it cut the whole reply away), and the whitespace before the stop
    string stays (it was stripped)."""
    s, deltas = one_by_one(tok, " Hello world", [" "])
    assert s.stopped and "".join(deltas) == s.final_text == "Hello"
    s, deltas = one_by_one(tok, "\n\nEND of it", ["END"])
    assert s.stopped and "".join(deltas) == s.final_text == ""
    s, deltas = one_by_one(tok, "Hi there.\nUser: more", ["User:"])
    assert s.stopped and "".join(deltas) == s.final_text == "Hi there.\n"
    # without a stop string the whole reply is stripped, as chat() strips it
    s, deltas = one_by_one(tok, "Hi there.\nUser: more  \n", ["END"])
    assert not s.stopped and "".join(deltas) == s.final_text == "Hi there.\nUser: more"


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


def test_random_replies_and_stop_strings_stream_to_the_whole_answer(real_vocab_file):
    """Replies of Chinese, emoji (several tokens a character), whitespace and stray bytes, fed a token at a time as
    the server does, with stop strings cut from anywhere in the reply (across characters and tokens): the deltas
    join to the whole answer, that answer is the text up to the first stop string as generation meets it, and no
    delta holds U+FFFD unless the reply decodes to it."""
    import random

    tok = QWenTokenizer(str(real_vocab_file))
    pieces = ["猫头鹰", "🦉", "👨‍👩‍👧", " ", "\n", "hello", "Observation:", "。", "Ａ", "é", "  ", "你好世界", "😀😀", "x"]
    rng = random.Random(0)
    for _ in range(3000):
        ids = tok.encode("".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))))
        if rng.random() < 0.3:
            ids += [rng.randrange(256) for _ in range(rng.randint(0, 3))]  # byte tokens: maybe no whole character
        full = tok.decode(ids)
        stops = []
        for _ in range(rng.randint(0, 2)):
            i = rng.randrange(len(full) or 1)
            stops.append(full[i:i + rng.randint(1, 6)] or rng.choice(pieces))
        strip = rng.random() < 0.7
        # generation stops once a stop string is in the text decoded so far (stripped reply: after its leading
        # whitespace, and the whitespace before the stop string kept, as the official server trims the reply)
        expected = full.strip() if strip else full
        for k in range(1, len(ids) + 1):
            text = tok.decode(ids[:k])
            if k < len(ids) and text.endswith("\ufffd"):
                continue  # (an incomplete character: not text yet)
            text = text.lstrip() if strip else text
            hits = [text.find(s) for s in stops if s in text]
            if hits:
                expected = text[:min(hits)]
                break
        s = TextStream(tok, stops, strip=strip)
        deltas = []
        for i in ids:
            deltas.append(s.feed([i]))
            if s.stopped:
                break
        deltas.append(s.finish())
        case = (ids, stops, strip, deltas)
        assert "".join(deltas) == s.final_text == expected, case
        assert "\ufffd" not in "".join(deltas) or "\ufffd" in expected, case


def test_a_stop_string_completed_before_min_ids_does_not_count(tok):
    """min_ids (the request's min_tokens): a stop string that one of the first min_ids - 1 tokens completes is
    text like any other, as the engine treats its stop strings; one that ends later cuts as before."""
    text = "ab STOP cd STOP ef"
    ids = tok.encode(text)
    done = [n for n in range(1, len(ids) + 1) if tok.decode(ids[:n]).count("STOP") > tok.decode(ids[:n - 1]).count(
        "STOP")]  # the token counts at which each "STOP" is complete
    assert len(done) == 2
    for min_ids, expected in ((0, "ab "), (done[0], "ab "), (done[0] + 1, "ab STOP cd "), (done[1], "ab STOP cd "),
                              (done[1] + 1, text)):
        s = TextStream(tok, ["STOP"], min_ids=min_ids)
        deltas = [s.feed([i]) for i in ids] + [s.finish()]
        assert "".join(deltas) == s.final_text == expected, min_ids
        assert s.stopped is (expected != text)


def test_min_ids_counts_a_stop_string_as_the_engine_does_at_every_length(tok):
    """The engine's rule: a stop string counts when the token that completes it is the min_ids-th or later. A stop
    ending in a character that token min_ids - 1 left incomplete (its U+FFFD counted in the floor) was missed."""
    text = "ab 猫头鹰 cd 头鹰 ef"
    ids = tok.encode(text)

    def completed_at(stop, k):  # the first token count whose complete text holds the stop string k times
        return next(n for n in range(1, len(ids) + 1) if tok.decode(ids[:n]).rstrip("\ufffd").count(stop) >= k)

    assert any(tok.decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))  # (a character split by tokens)
    stop = "头鹰"
    first, second = completed_at(stop, 1), completed_at(stop, 2)
    for min_ids in range(0, len(ids) + 2):
        s = TextStream(tok, [stop], min_ids=min_ids)
        out = "".join([s.feed([i]) for i in ids] + [s.finish()])
        expected = "ab 猫" if first >= min_ids else "ab 猫头鹰 cd " if second >= min_ids else text
        assert out == expected, (min_ids, out)
