"""Structured output (`response_format`): JSON objects, JSON schemas and GBNF grammars,
enforced by token masks during decoding, checked independently of the grammar engine
(`jsonschema`, regular expressions, a direct forward pass)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
from conftest import forward_logprobs

import toolkit as tk
from toolkit.errors import InvalidRequestError

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "kind": {"enum": ["file", "dir", "link"]},
                                      "sizes": {"type": "array", "items": {"type": "integer"},
                                                "maxItems": 3}},
     "required": ["ok", "kind", "sizes"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {
        "type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
        "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
]
YES_NO = r'root ::= ("yes" | "no") ", " [0-9] [0-9]? [0-9]?'


@pytest.fixture(scope="module")
def zoo():
    return tk.load("tiny-code", dtype="float32", progress=False)


def test_thousands_of_constrained_samples_parse_and_validate(zoo):
    """Every sample that ends by `stop` parses and validates against its schema; almost
    all of them end so (the JSON has no free whitespace to wander in)."""
    ended = 0
    for k, schema in enumerate(SCHEMAS):
        for seed in range(6):
            resp = zoo.completions.create(
                prompt="record = ", n=64, max_tokens=48, seed=seed, temperature=1.0,
                response_format={"type": "json_schema", "json_schema": schema})
            for c in resp.choices:
                if c.finish_reason == "stop":
                    jsonschema.validate(json.loads(c.text), schema)
                    ended += 1
    assert ended >= 1000


@pytest.mark.parametrize("fmt", [
    {"type": "json_object"},
    {"type": "json_schema", "schema": json.dumps(SCHEMAS[0])},            # as a string
    {"type": "json_schema", "json_schema": {"name": "person", "strict": True,
                                            "schema": SCHEMAS[0]}},       # OpenAI's form
])
def test_every_way_of_giving_a_schema(zoo, fmt):
    resp = zoo.completions.create(prompt="x = ", n=16, max_tokens=64, seed=1,
                                  response_format=fmt)
    done = [c for c in resp.choices if c.finish_reason == "stop"]
    assert len(done) >= 8
    for c in done:
        value = json.loads(c.text)
        assert isinstance(value, dict)
        if fmt["type"] == "json_schema":
            jsonschema.validate(value, SCHEMAS[0])


def test_gbnf_grammars_are_obeyed(zoo):
    resp = zoo.completions.create(prompt="answer: ", n=64, max_tokens=12, seed=3,
                                  response_format={"type": "grammar", "grammar": YES_NO})
    pattern = re.compile(r"(yes|no), [0-9]{1,3}")
    for c in resp.choices:
        assert c.finish_reason == "stop" and pattern.fullmatch(c.text), c.text
    assert {c.text.split(",")[0] for c in resp.choices} == {"yes", "no"}


def test_the_mask_never_removes_the_only_legal_token(zoo):
    """A grammar with one path is followed to its end, greedy or hot, even against a
    logit_bias of -100 on the tokens it needs."""
    grammar = 'root ::= "def main():"'
    needed = zoo.tokenizer("def main():", add_special_tokens=False)["input_ids"]
    for knobs in (dict(temperature=0), dict(temperature=2.0, seed=0, n=8),
                  dict(logit_bias={str(t): -100 for t in needed}, seed=1, n=8)):
        resp = zoo.completions.create(prompt="x", max_tokens=20, **knobs,
                                      response_format={"type": "grammar", "grammar": grammar})
        assert {(c.text, c.finish_reason) for c in resp.choices} == {("def main():", "stop")}


def test_raw_logprobs_stay_unmasked_and_sampling_logprobs_see_the_mask(zoo):
    """The raw logprob is the model's (a direct forward pass); the sampling logprob is
    that of the distribution renormalised over the tokens the grammar allowed."""
    resp = zoo.completions.create(prompt="answer: ", max_tokens=1, seed=0, logprobs=True,
                                  response_format={"type": "grammar", "grammar": YES_NO},
                                  return_token_ids=True)
    entry = resp.choices[0].logprobs.content[0]
    ids = zoo.tokenizer("answer: ")["input_ids"]
    raw = forward_logprobs(zoo, ids)[-1]
    assert entry.logprob == pytest.approx(raw[entry.token_id].item(), abs=1e-4)
    legal = [t for t in range(len(raw)) if re.fullmatch(
        r"(y|ye|yes|n|no)", zoo.tokenizer.decode([t]))]
    assert entry.token_id in legal
    expected = raw[entry.token_id] - raw[legal].logsumexp(0)
    assert entry.sampling_logprob == pytest.approx(expected.item(), abs=1e-4)
    assert entry.sampling_logprob > entry.logprob


def test_streaming_n_and_a_prediction_that_breaks_the_grammar(zoo):
    """Streams give the same choices; each row keeps its own grammar state; a predicted
    output that breaks the grammar is never emitted (speculation stays exact)."""
    kw = dict(prompt="answer: ", n=4, max_tokens=12, seed=5, logprobs=True,
              response_format={"type": "grammar", "grammar": YES_NO})
    whole = zoo.completions.create(**kw)
    text = {}
    for chunk in zoo.completions.create(**kw, stream=True):
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + c.text
    assert [text[i] for i in range(4)] == [c.text for c in whole.choices]
    greedy = dict(kw, n=1, temperature=0)
    plain = zoo.completions.create(**greedy)
    for prediction in ("maybe, 1000", plain.choices[0].text + "!!"):
        spec = zoo.completions.create(**greedy, prediction=prediction)
        assert spec.choices[0].text == plain.choices[0].text
        assert [e.sampling_logprob for e in spec.choices[0].logprobs.content] == \
            pytest.approx([e.sampling_logprob for e in plain.choices[0].logprobs.content],
                          abs=1e-4)


@pytest.mark.parametrize("fmt", [
    {"type": "grammar", "grammar": "root ::= missing"},
    {"type": "grammar", "grammar": "root ::= ("},
    {"type": "json_schema", "json_schema": "{not json"},
    {"type": "json_schema", "json_schema": [1, 2]},
    {"type": "json_schema", "json_schema": {"type": "object", "properties": {"a": {
        "type": "string", "pattern": "(?<=x)"}}}},
])
def test_a_schema_that_cannot_compile_is_an_invalid_request(zoo, fmt):
    with pytest.raises(InvalidRequestError) as info:
        zoo.completions.create(prompt="x", max_tokens=4, response_format=fmt)
    assert info.value.param == "response_format"
    assert zoo.completions.create(prompt="x", max_tokens=3, ignore_eos=True
                                  ).usage.completion_tokens == 3
