"""How an error message quotes a value (finetune/errors.py): the data's, the ReAct checks' and the server's
messages, each in its own form, never a huge value whole."""

from finetune.errors import quoted


def test_a_value_up_to_the_limit_is_its_repr():
    assert quoted("role", 40) == "'role'"
    assert quoted(3.5, 40) == "3.5" and quoted(None, 40) == "None" and quoted(["a"], 40) == "['a']"
    exact = "x" * 38  # a repr of 40 characters, quotes included
    assert quoted(exact, 40) == repr(exact)
    assert quoted("y" * 198, 200, length=True) == repr("y" * 198)


def test_a_longer_one_is_cut_to_the_limit_ending_in_dots():
    # the data's and the ReAct checks' form: the limit is the whole quote's length
    assert quoted("x" * 39, 40) == "'" + "x" * 36 + "..."
    assert quoted(list(range(100)), 60) == repr(list(range(100)))[:57] + "..."
    assert len(quoted("z" * 10 ** 6, 60)) == 60


def test_the_servers_form_says_the_length_and_keeps_a_strings_quotes_whole():
    assert quoted("y" * 20_000, 200, length=True) == repr("y" * 200) + "... (20,000 characters)"
    value = ["z" * 300]
    assert quoted(value, 200, length=True) == repr(value)[:200] + "... (304 characters)"


def test_the_servers_form_quotes_a_string_within_the_limit_whole():
    # its repr ran past the limit by its quotes (or escapes): it was cut inside the quotes and counted as 202
    assert quoted("y" * 200, 200, length=True) == repr("y" * 200)
    assert quoted("\n" * 150, 200, length=True) == repr("\n" * 150)
    assert quoted("\n" * 201, 200, length=True) == repr("\n" * 200) + "... (201 characters)"
