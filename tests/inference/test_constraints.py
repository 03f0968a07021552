"""Replies held to a constraint (finetune/inference/constraints.py: SamplingParams.json_schema, regex, choice) on CPU
in fp32: the reply is a text the constraint accepts, the rows beside it decode exactly as alone, a reply cut by
max_new_tokens ends with "length", and bad constraints are refused at submit with the problem named."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import finetune  # noqa: F401
from finetune.inference import Engine, SamplingParams
from finetune.inference.constraints import Constraints, constraint_problem
from finetune.tokenization import SMALL_VOCAB, QWenTokenizer

from _helpers import tiny_model as tiny

pytest.importorskip("llguidance")

YES_NO = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["answer", "count"], "additionalProperties": False}
NUMBERS = {"type": "array", "items": {"type": "integer", "minimum": -99, "maximum": 99}, "maxItems": 3}


@pytest.fixture(scope="module")
def tok():
    return QWenTokenizer(str(SMALL_VOCAB))


@pytest.fixture(scope="module")
def model():
    return tiny(seed=1)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1700, (int(L),), generator=g).tolist() for L in torch.randint(2, 30, (n,), generator=g)]


def run(engine, reqs):
    while engine.has_work():
        engine.step()
    return [(r.output_ids, r.finish_reason) for r in reqs]


def test_greedy_and_sampled_replies_are_documents_of_the_schema(tok, model):
    engine = Engine(model, tok, max_batch=8)
    kinds = [SamplingParams(max_new_tokens=40, json_schema=YES_NO),
             SamplingParams(max_new_tokens=40, json_schema=NUMBERS, do_sample=True, seed=1, temperature=1.5),
             SamplingParams(max_new_tokens=40, json_schema=YES_NO, do_sample=True, top_p=0.9, top_k=50),
             SamplingParams(max_new_tokens=40, json_schema=NUMBERS, repetition_penalty=1.3)]
    for p in prompts(6, seed=2):
        reqs = [engine.submit(p, params) for params in kinds]
        for (ids, reason), params in zip(run(engine, reqs), kinds):
            text = tok.decode(ids)
            assert reason == "stop", (text, params)
            value = json.loads(text)
            assert text == json.dumps(value)  # json.dumps' separators and nothing else
            if params.json_schema is YES_NO:
                assert set(value) == {"answer", "count"} and value["answer"] in ("yes", "no")
                assert 0 <= value["count"] <= 99
            else:
                assert isinstance(value, list) and len(value) <= 3
                assert all(isinstance(v, int) and -99 <= v <= 99 for v in value)


def test_rows_beside_a_constrained_row_decode_as_alone_and_it_as_alone(tok, model):
    """Greedy fp32: a batch of plain rows and constrained ones (one joining while the others run) gives every row
    the tokens it gets alone: the masks reach only their own rows, and no row's tokens are read a step late."""
    batch = prompts(4, seed=3)
    plain = SamplingParams(max_new_tokens=12)
    held = SamplingParams(max_new_tokens=30, json_schema={"type": "object"})
    alone = [Engine(model, tok, max_batch=1).generate([p], params)[0]
             for p, params in zip(batch, [plain, held, plain, held])]
    engine = Engine(model, tok, max_batch=4)
    reqs = [engine.submit(batch[0], plain), engine.submit(batch[1], held), engine.submit(batch[2], plain)]
    for _ in range(3):
        engine.step()
    reqs.append(engine.submit(batch[3], held))
    assert [ids for ids, _ in run(engine, reqs)] == alone
    assert tok.decode(alone[1]).startswith("{")


def test_a_reply_cut_by_max_new_tokens_ends_with_length(tok, model):
    engine = Engine(model, tok, max_batch=1)
    (req,) = [engine.submit(prompts(1, seed=5)[0], SamplingParams(max_new_tokens=3, json_schema={"type": "object"}))]
    ((ids, reason),) = run(engine, [req])
    assert reason == "length" and len(ids) == 3 and tok.decode(ids).startswith("{")


@pytest.mark.parametrize("schema, message", [
    ({"type": "foo"}, "json_schema: Invalid type: foo"),
    ({"type": "string", "pattern": "(("}, "json_schema: regex parse error"),
    ({"not": {"type": "string"}}, "json_schema: Unimplemented keys"),  # refused, not ignored
])
def test_a_bad_schema_is_refused_at_submit(tok, model, schema, message):
    engine = Engine(model, tok, max_batch=1)
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        engine.submit([5, 6], SamplingParams(json_schema=schema))
    assert not engine.has_work()
    assert constraint_problem("json_schema", schema).startswith(message.removeprefix("json_schema: "))


@pytest.mark.parametrize("kw, message", [
    (dict(json_schema="{}"), "json_schema must be a JSON schema"),
    (dict(json_schema=[]), "json_schema must be a JSON schema"),
    (dict(json_schema={}, min_new_tokens=2), "min_new_tokens cannot be combined with json_schema"),
])
def test_sampling_params_check_the_schema_field(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


def test_any_json_and_true_are_schemas(tok, model):
    engine = Engine(model, tok, max_batch=2)
    reqs = [engine.submit([7, 8, 9], SamplingParams(max_new_tokens=6, json_schema=s)) for s in (True, {})]
    for ids, reason in run(engine, reqs):
        assert reason in ("stop", "length") and ids


def test_a_failed_matcher_allows_only_im_end(tok):
    """llguidance's matcher fails only past its resource limits (the masks keep rows inside the grammar); then its
    row may take nothing but <|im_end|>, so it ends."""
    constraints = Constraints(tok.tokenizer, 2048, tok.im_end_id)
    m = constraints.matcher("json_schema", {"type": "object"})
    assert not m.consume_token(tok.encode("]")[0]) and m.is_error()
    ok = constraints.matcher("json_schema", {"type": "object"})
    allowed = constraints.allowed([m, ok], torch.device("cpu"))
    assert allowed.shape == (2, 2048) and allowed[0].nonzero().flatten().tolist() == [tok.im_end_id]
    assert allowed[1, tok.encode("{")[0]] and not allowed[1, tok.im_end_id]


def test_without_llguidance_the_error_says_how_to_install_it(tok, model, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    engine = Engine(model, tok, max_batch=1)
    with pytest.raises(ImportError, match=r"needs the llguidance package: pip install llguidance"):
        engine.submit([5], SamplingParams(json_schema={}))


def test_each_row_gets_its_own_copy_and_the_compiled_schemas_are_bounded(tok, monkeypatch):
    """A schema compiles once (its matcher at the start, copied for each row: one row's tokens never move
    another's), and an engine keeps only the last KEPT of them: distinct schemas from clients do not grow its memory
    without bound."""
    from finetune.inference import constraints as module

    monkeypatch.setattr(module, "KEPT", 3)
    constraints = Constraints(tok.tokenizer, 2048, tok.im_end_id)
    a, b = constraints.matcher("json_schema", YES_NO), constraints.matcher("json_schema", YES_NO)
    assert a.consume_token(tok.encode("{")[0])
    fresh = constraints.allowed([a, b, constraints.matcher("json_schema", YES_NO)], torch.device("cpu"))
    assert torch.equal(fresh[1], fresh[2]) and not torch.equal(fresh[0], fresh[1])
    schemas = [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}} for i in range(5)]
    for s in schemas:
        constraints.check("json_schema", s)
    assert len(constraints._compiled) == 3
    assert json.dumps(["json_schema", schemas[0]], sort_keys=True) not in constraints._compiled
    assert constraints.matcher("json_schema", schemas[0]).consume_token(tok.encode("{")[0])  # compiled again


def test_regex_and_choice_replies_match_whole(tok, model):
    """A regex row's reply matches the regex whole, a choice row's is one of the choices exactly (each ends with
    "stop" once complete), greedy and sampled, beside a JSON row in the same batch."""
    import re

    engine = Engine(model, tok, max_batch=8)
    pattern = r"[A-Z][a-z]{2,5}-\d{2}"
    choices = ("positive", "negative", "neutral, mostly")
    kinds = [SamplingParams(max_new_tokens=20, regex=pattern),
             SamplingParams(max_new_tokens=20, regex=pattern, do_sample=True, seed=2, temperature=1.5),
             SamplingParams(max_new_tokens=20, choice=list(choices)),
             SamplingParams(max_new_tokens=20, choice=choices, do_sample=True, top_p=0.9),
             SamplingParams(max_new_tokens=40, json_schema=YES_NO)]
    for p in prompts(4, seed=9):
        reqs = [engine.submit(p, params) for params in kinds]
        got = [(tok.decode(ids), reason) for ids, reason in run(engine, reqs)]
        assert all(reason == "stop" for _, reason in got), got
        assert re.fullmatch(pattern, got[0][0]) and re.fullmatch(pattern, got[1][0])
        assert got[2][0] in choices and got[3][0] in choices
        assert set(json.loads(got[4][0])) == {"answer", "count"}


@pytest.mark.parametrize("kw, message", [
    (dict(regex="(("), "regex: .*unclosed group"),
    (dict(choice=["a", ""]), "choice must be a non-empty list of non-empty strings"),
    (dict(choice=[]), "choice must be a non-empty list"),
    (dict(regex=5), "regex must be a string"),
    (dict(regex="a", choice=["a"]), "regex and choice both constrain the reply"),
    (dict(regex="a", min_new_tokens=1), "min_new_tokens cannot be combined with regex"),
])
def test_bad_regexes_and_choices_are_refused_at_submit(tok, model, kw, message):
    engine = Engine(model, tok, max_batch=1)
    with pytest.raises(ValueError, match=message):
        engine.submit([5, 6], SamplingParams(**kw))
    assert not engine.has_work()


@pytest.mark.parametrize("grammar, accepts", [
    ('root ::= ("yes" | "no") " because " [a-z]{1,8}', r"(yes|no) because [a-z]{1,8}"),  # GBNF (llama.cpp's)
    ('start: NUM ("+" NUM)*\nNUM: /[0-9]{1,3}/', r"[0-9]{1,3}(\+[0-9]{1,3})*"),  # Lark
])
def test_grammar_replies_are_sentences_of_the_grammar(tok, model, grammar, accepts):
    """A grammar row's reply (GBNF or Lark, as vLLM's guidance backend takes guided_grammar) is a sentence of it
    where it ended with "stop" (some do), greedy and sampled."""
    import re

    engine = Engine(model, tok, max_batch=4)
    kinds = [SamplingParams(max_new_tokens=30, grammar=grammar),
             SamplingParams(max_new_tokens=30, grammar=grammar, do_sample=True, seed=5, temperature=1.5)]
    stops = 0
    for p in prompts(4, seed=11):
        reqs = [engine.submit(p, params) for params in kinds]
        for ids, reason in run(engine, reqs):
            text = tok.decode(ids)
            if reason == "stop":
                stops += 1
                assert re.fullmatch(accepts, text), text
            else:  # (a sentence cut by max_new_tokens)
                assert reason == "length", (reason, text)
    assert stops > 0


@pytest.mark.parametrize("grammar, message", [
    ("nonsense ::= ::=", "grammar: Failed to convert the grammar from GBNF to Lark"),
    ("start: foo", 'grammar: .*unknown name: "foo"'),
    ("  ", "grammar: a grammar must be a non-empty string"),
])
def test_a_bad_grammar_is_refused_at_submit(tok, model, grammar, message):
    engine = Engine(model, tok, max_batch=1)
    with pytest.raises(ValueError, match=message):
        engine.submit([5, 6], SamplingParams(grammar=grammar))
