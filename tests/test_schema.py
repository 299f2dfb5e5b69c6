"""The request mirror: every field of the reference page, its type, default and range."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.errors import InvalidRequestError
from toolkit.schema import CompletionRequest, validate_request

# field -> (values the page allows, values it does not)
FIELDS = {
    "model": (["tiny-code", None], [3, ["a"]]),
    "prompt": (["", "def f():", ["a", "b"], [1, 2, 3], [[1], [2, 3]]],
               [None, 3, [], [[]], [1, "a"], [-1], [True], {"a": 1}, [[1], "a"]]),
    "user": (["alice", None], [1, ["alice"]]),
    "prompt_cache_max_len": ([0, 100, None], [-1, 1.5, "10"]),
    "prompt_cache_isolation_key": (["k", None], [1]),
    "raw_output": ([True, False, None], [1, "yes"]),
    "perf_metrics_in_response": ([True, False, None], [0, "true"]),
    "stream": ([True, False, None], [1, "no"]),
    "n": ([1, 64, 128], [0, 129, -1, 1.0, None, True, "2"]),
    "stop": (["\n", ["a", "b", "c", "d"], [], None], [["a"] * 5, "", [""], 3, [1]]),
    "max_tokens": ([0, 1, 4096, None], [-1, 1.5, "10", True]),
    "max_completion_tokens": ([0, 16, None], [-1, 2.5]),
    "temperature": ([0, 0.7, 2, 1, None], [-0.1, 2.01, "1", True]),
    "top_k": ([0, 50, 100, None], [-1, 101, 1.5]),
    "top_p": ([0, 0.5, 1, None], [-0.01, 1.01, "0.9"]),
    "min_p": ([0, 0.05, 1, None], [-0.5, 1.5]),
    "typical_p": ([0, 0.9, 1, None], [-1, 2]),
    "frequency_penalty": ([-2, 0, 1.5, 2, None], [-2.5, 2.1, "1"]),
    "presence_penalty": ([-2, 0.3, 2, None], [-3, 3]),
    "repetition_penalty": ([0, 1, 1.2, 2, None], [-0.1, 2.5]),
    "mirostat_target": ([5.0, 0.5, None], [0, -1, "5"]),
    "mirostat_lr": ([0.1, 1, None], [0, -0.1, 1.5]),
    "seed": ([0, 42, -1, 2**63, None], [1.5, "1", 2**64]),
    "logprobs": ([True, False, 0, 3, 5, None], [6, -1, "true", 1.5]),
    "top_logprobs": ([None, 0, 3, 5], [-1, 6, 2.0]),
    "echo": ([True, False, None], [1, "yes"]),
    "echo_last": ([0, 5, None], [-1, 1.5]),
    "ignore_eos": ([True, False], [None, 1]),
    "context_length_exceeded_behavior": (["error", "truncate"], ["drop", None, 1]),
    "response_format": ([None, {"type": "text"}, {"type": "json_object"},
                         {"type": "json_schema", "json_schema": {"type": "object"}},
                         {"type": "json_schema", "schema": '{"type": "object"}'},
                         {"type": "grammar", "grammar": 'root ::= "a"'}],
                        [{"type": "xml"}, {"type": "json_schema"}, {"type": "grammar"},
                         {"type": "text", "extra": 1}, "json_object"]),
    "logit_bias": ([None, {}, {"5": -100, "17": 100}, {5: 2.5}],
                   [{"a": 1}, {"5": 101}, {"5": -100.5}, {-1: 1}, {"5": "x"}, [1, 2]]),
    "speculation": ([None, "return x", [1, 2, 3]], [3, [-1], ["a"]]),
    "prediction": ([None, "x = 1", {"type": "content", "content": "x"},
                    {"content": [{"type": "text", "text": "x"}]}],
                   [3, {"type": "image", "content": "x"}, {"content": 3}]),
    "metadata": ([None, {"run": "7"}], [{"run": 7}, ["a"]]),
    "reasoning_effort": ([None, "low", "medium", "high", "none", True, False, 0, 512],
                         ["max", -1, 1.5]),
    "return_token_ids": ([True, False, None], [1]),
    "images": ([None, [], ["data:image/png;base64,iVBORw0KGgo="]],
               ["data:image/png;base64,AAAA", ["http://example.com/a.png"], [1]]),
    "include_last_activation": ([True, False], [None, 1]),
    "include_routing_matrix": ([True, False], [None, "yes"]),
    "activation_layers": ([None, [], [0, -1]], [[1.5], 3]),
    "logprobs_for_tokens": ([None, [1], ["Yes", 2]], [[], [1.5], "Yes", [None]]),
}


def test_every_reference_field_is_mirrored():
    expected = {"model", "prompt", "user", "prompt_cache_max_len", "prompt_cache_isolation_key",
                "raw_output", "perf_metrics_in_response", "stream", "n", "stop", "max_tokens",
                "max_completion_tokens", "temperature", "top_k", "top_p", "min_p",
                "typical_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
                "mirostat_target", "mirostat_lr", "seed", "logprobs", "top_logprobs", "echo",
                "echo_last", "ignore_eos", "context_length_exceeded_behavior",
                "response_format", "logit_bias", "speculation", "prediction", "metadata",
                "reasoning_effort", "return_token_ids", "images"}
    extensions = {"include_last_activation", "include_routing_matrix", "activation_layers",
                  "logprobs_for_tokens"}
    assert set(CompletionRequest.model_fields) == expected | extensions
    assert set(FIELDS) == expected | extensions


def test_defaults_match_the_reference():
    req = validate_request({"prompt": "x"})
    assert (req.n, req.echo, req.stream, req.raw_output, req.ignore_eos) == (1, False, False,
                                                                           False, False)
    assert req.perf_metrics_in_response is False and req.return_token_ids is False
    assert req.context_length_exceeded_behavior == "truncate"
    assert req.max_new_tokens == 2048
    # unset sampling knobs stay unset: the engine treats None as neutral
    assert all(getattr(req, f) is None for f in ("temperature", "top_k", "top_p", "min_p",
                                                 "typical_p", "frequency_penalty",
                                                 "presence_penalty", "repetition_penalty",
                                                 "mirostat_target", "seed", "logprobs"))


@pytest.mark.parametrize("field,value",
                         [(f, v) for f, (good, _) in FIELDS.items() for v in good])
def test_allowed_values_are_accepted(field, value):
    fields = {"prompt": "x", field: value}
    if field == "top_logprobs":
        fields["logprobs"] = True
    req = validate_request(fields)
    assert field in req.model_fields_set


@pytest.mark.parametrize("field,value",
                         [(f, v) for f, (_, bad) in FIELDS.items() for v in bad])
def test_refused_values_name_their_field(field, value):
    fields = {"prompt": "x", "logprobs": True, field: value}
    with pytest.raises(InvalidRequestError) as info:
        validate_request(fields)
    err = info.value
    assert err.param == field
    assert err.status_code == 400
    assert err.body == {"error": {"object": "error", "type": "invalid_request_error",
                                  "code": "BAD_REQUEST", "param": field,
                                  "message": err.message}}
    assert field in err.message or field in str(err)


def test_unknown_field_is_refused_by_name():
    with pytest.raises(InvalidRequestError, match="frobnicate") as info:
        validate_request({"prompt": "x", "frobnicate": 1})
    assert info.value.param == "frobnicate"


def test_missing_prompt():
    with pytest.raises(InvalidRequestError, match="prompt") as info:
        validate_request({"max_tokens": 3})
    assert info.value.param == "prompt"


def test_max_completion_tokens_is_an_alias():
    assert validate_request({"prompt": "x", "max_completion_tokens": 7}).max_new_tokens == 7
    assert validate_request({"prompt": "x", "max_tokens": 0}).max_new_tokens == 0
    with pytest.raises(InvalidRequestError) as info:
        validate_request({"prompt": "x", "max_tokens": 3, "max_completion_tokens": 3})
    assert info.value.param == "max_completion_tokens"


def test_prediction_normalises_into_speculation():
    assert validate_request({"prompt": "x", "prediction": "abc"}).speculation == "abc"
    parts = {"type": "content", "content": [{"type": "text", "text": "ab"},
                                            {"type": "text", "text": "c"}]}
    assert validate_request({"prompt": "x", "prediction": parts}).speculation == "abc"
    assert validate_request({"prompt": "x", "speculation": [4, 5]}).speculation == [4, 5]
    with pytest.raises(InvalidRequestError) as info:
        validate_request({"prompt": "x", "prediction": "a", "speculation": "a"})
    assert info.value.param == "prediction"


def test_logprobs_formats():
    req = validate_request({"prompt": "x", "logprobs": True, "top_logprobs": 3})
    assert (req.logprobs_format, req.num_top_logprobs) == ("new", 3)
    req = validate_request({"prompt": "x", "logprobs": 2})
    assert (req.logprobs_format, req.num_top_logprobs) == ("legacy", 2)
    req = validate_request({"prompt": "x", "logprobs": 0})
    assert (req.logprobs_format, req.num_top_logprobs) == ("legacy", 0)
    req = validate_request({"prompt": "x", "logprobs": 1, "top_logprobs": 4})
    assert req.num_top_logprobs == 4
    assert validate_request({"prompt": "x", "logprobs": False}).logprobs_format is None
    with pytest.raises(InvalidRequestError) as info:
        validate_request({"prompt": "x", "top_logprobs": 2})
    assert info.value.param == "top_logprobs"


def test_prompt_shapes_and_stop_list():
    assert validate_request({"prompt": "a"}).prompts == ["a"]
    assert validate_request({"prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert validate_request({"prompt": [1, 2]}).prompts == [[1, 2]]
    assert validate_request({"prompt": [[1], [2]]}).prompts == [[1], [2]]
    assert validate_request({"prompt": "a", "stop": "\n"}).stop_sequences == ["\n"]
    assert validate_request({"prompt": "a", "logit_bias": {7: 1}}).logit_bias == {"7": 1.0}


# -------------------------------------------------------------- property: random bad requests

def _valid_fields() -> st.SearchStrategy[dict]:
    """Random valid requests: a few fields other than prompt, each with an allowed value."""
    optional = [f for f in FIELDS if f not in ("prompt", "top_logprobs", "prediction",
                                                "max_completion_tokens")]
    return st.fixed_dictionaries(
        {"prompt": st.sampled_from(FIELDS["prompt"][0])},
        optional={f: st.sampled_from(FIELDS[f][0]) for f in optional})


@settings(max_examples=300, deadline=None)
@given(base=_valid_fields(), data=st.data())
def test_random_invalid_requests_name_the_bad_field(base, data):
    field = data.draw(st.sampled_from([f for f in FIELDS if f != "top_logprobs"]))
    bad = data.draw(st.sampled_from(FIELDS[field][1]))
    fields = {**base, field: bad}
    with pytest.raises(InvalidRequestError) as info:
        validate_request(fields)
    assert info.value.param == field


@settings(max_examples=200, deadline=None)
@given(base=_valid_fields(),
       name=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1)
       .filter(lambda s: s not in FIELDS))
def test_random_unknown_fields_are_refused(base, name):
    with pytest.raises(InvalidRequestError) as info:
        validate_request({**base, name: 1})
    assert info.value.param == name


@settings(max_examples=200, deadline=None)
@given(base=_valid_fields())
def test_random_valid_requests_are_accepted(base):
    assert validate_request(base).prompt == base["prompt"]


def test_create_has_the_schemas_signature_and_documents_every_field(llm):
    import inspect
    import pydoc

    from toolkit.completions import REQUIRED

    create = llm.completions.create
    params = {p.name: p for p in inspect.signature(create).parameters.values()
              if p.kind is p.KEYWORD_ONLY}
    fields = CompletionRequest.model_fields
    assert list(params) == ["prompt"] + [name for name in fields if name != "prompt"]
    doc = " ".join(create.__doc__.split())
    for name, info in fields.items():
        if info.is_required():
            assert params[name].default is REQUIRED
        else:
            assert params[name].default == info.default, name
        assert info.description and f"{name}: {' '.join(info.description.split())}" in doc
    page = pydoc.render_doc(create)
    assert "temperature: 'Optional[float]' = None" in page and "0 to 2" in page


def test_leaving_out_the_prompt_is_the_apis_error(llm):
    with pytest.raises(InvalidRequestError, match="Missing required field 'prompt'"):
        llm.completions.create(max_tokens=1)
