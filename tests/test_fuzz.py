"""Whole request dicts, fuzzed: every outcome is a valid response (whole or streamed) or an
API error naming a real field, and the engine serves the next request all the same; and
valid requests of every shape stream exactly as their whole responses."""
from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire import check_chunk, check_completion

from toolkit.errors import InvalidRequestError, NotFoundError, brief
from toolkit.schema import CompletionRequest

FIELDS = list(CompletionRequest.model_fields)

strings = st.text(alphabet=st.one_of(
    st.characters(codec="utf-8"), st.sampled_from(["\x00", "\ud800", "\udfff", "\n", "é"])),
    max_size=12)
HUGE = [10**5000, -(10**5000), 2**63, 2**64, -(2**63) - 1]


def huge(k: int) -> int:
    """Integers at and past the 64-bit edges, and too long to print (Python refuses to
    format ints of over 4300 digits). Drawn by index: a strategy holding one would fail
    to print itself."""
    return HUGE[k]


numbers = st.one_of(
    st.integers(-3, 300), st.integers(), st.integers(0, len(HUGE) - 1).map(huge),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3))
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
junk = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(strings, numbers), inner,
                                                 max_size=3)), max_leaves=8)

# values a caller might plausibly send, valid or nearly so
PLAUSIBLE = {
    "prompt": st.one_of(strings, st.lists(strings, min_size=1, max_size=3),
                        st.lists(st.integers(0, 400), min_size=1, max_size=8),
                        st.lists(st.lists(st.integers(0, 299), min_size=1, max_size=4),
                                 min_size=1, max_size=2)),
    "max_tokens": st.integers(-1, 6),
    "n": st.integers(0, 4),
    "stop": st.one_of(strings, st.lists(strings, max_size=5)),
    "logprobs": st.one_of(st.booleans(), st.integers(-1, 6)),
    "top_logprobs": st.integers(-1, 6),
    "logit_bias": st.dictionaries(st.one_of(st.integers(-1, 400).map(str), st.integers(0, 400),
                                            strings), st.floats(-150, 150), max_size=3),
    "echo_last": st.integers(-1, 40),
    "activation_layers": st.lists(st.integers(-3, 3), max_size=3),
    "metadata": st.dictionaries(strings, st.one_of(strings, numbers), max_size=2),
    "response_format": st.one_of(st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
                                 st.dictionaries(strings, junk, max_size=2)),
}
BOOLEAN = ["raw_output", "perf_metrics_in_response", "stream", "echo", "ignore_eos",
           "return_token_ids", "include_last_activation", "include_routing_matrix"]
UNIT = ["temperature", "top_p", "min_p", "typical_p", "frequency_penalty", "presence_penalty",
        "repetition_penalty", "mirostat_target", "mirostat_lr", "seed", "top_k",
        "prompt_cache_max_len"]


@st.composite
def value_for(draw, name):
    """Mostly a plausible value for the field (valid or nearly), else anything."""
    options = []
    if name in PLAUSIBLE:
        options.append(PLAUSIBLE[name])
    if name in BOOLEAN:
        options.append(st.booleans())
    if name in UNIT:
        options.append(st.one_of(st.floats(-0.5, 2.5), st.integers(-1, 120)))
    if not options or draw(st.integers(0, 4)) == 4:
        return draw(junk)
    return draw(st.one_of(*options))


@st.composite
def requests(draw):
    fields = {"prompt": draw(value_for("prompt")), "max_tokens": draw(value_for("max_tokens"))}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=6, unique=True)):
        fields[name] = draw(value_for(name))
    if draw(st.integers(0, 19)) == 19:
        fields[draw(st.one_of(strings, st.sampled_from(["self", "fields", "model_config"])))] = \
            draw(junk)
    return fields


def outcome(llm, fields):
    """Run a request; return the whole response or the list of chunks."""
    result = llm.completions.create(**fields)
    if fields.get("stream") is True:
        chunks = list(result)
        for chunk in chunks:
            check_chunk(chunk)
            json.dumps(chunk.model_dump(exclude_none=True), allow_nan=False)
        assert chunks and chunks[-1].usage is not None
        return chunks
    check_completion(result)
    json.dumps(result.model_dump(exclude_none=True), allow_nan=False)
    for choice in result.choices:
        for entry in (choice.logprobs.content if choice.logprobs is not None
                      and hasattr(choice.logprobs, "content") else []):
            assert entry.sampling_logprob is None or math.isfinite(entry.sampling_logprob)
    return result


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(fields=requests())
def test_any_request_dict_is_answered_or_refused_by_field(llm, fields):
    try:
        outcome(llm, fields)
    except InvalidRequestError as err:
        assert err.param in set(fields) | set(FIELDS), (err.param, brief(fields))
        assert err.status_code == 400
        json.dumps(err.body)
        err.body["error"]["message"].encode("utf-8")
    except NotFoundError as err:                  # a model name we do not serve
        assert err.param == "model" and "model" in fields
    assert llm.engine.in_flight == 0


def test_the_engine_serves_after_the_fuzz(llm):
    resp = llm.completions.create(prompt="def f(x):", max_tokens=3, temperature=0,
                                  ignore_eos=True)
    assert resp.usage.completion_tokens == 3


# ------------------------------------------------- valid requests: a stream is its response

STREAM_PROMPTS = ["def f(x):\n    ", "import os\n", "x = 'é😀'\n", "class A:\n", "#"]


@st.composite
def valid_requests(draw):
    """Requests the engine serves, across the knobs that shape a stream's chunks: stop
    strings, echo, several prompts and choices, both logprobs formats, predictions, JSON
    mode, reasoning, tracked tokens."""
    kw = dict(prompt=draw(st.one_of(st.sampled_from(STREAM_PROMPTS), st.lists(
                  st.sampled_from(STREAM_PROMPTS), min_size=1, max_size=2))),
              max_tokens=draw(st.integers(0, 12)), n=draw(st.integers(1, 3)),
              seed=draw(st.integers(0, 5)), return_token_ids=True,
              temperature=draw(st.sampled_from([0, 0.7, 1.0])),
              echo=draw(st.booleans()), ignore_eos=draw(st.booleans()))
    if draw(st.booleans()):
        kw["stop"] = draw(st.lists(st.text(alphabet="ef(): \n\t_os=é", min_size=1,
                                           max_size=3), min_size=1, max_size=3))
    legacy = draw(st.booleans())
    if legacy:
        kw["logprobs"] = draw(st.integers(0, 3))
    elif draw(st.booleans()):
        kw.update(logprobs=True, top_logprobs=draw(st.integers(0, 3)))
    extra = draw(st.sampled_from(["", "prediction", "json", "reasoning", "tracked"]))
    if extra == "prediction":
        kw["prediction"] = {"type": "content", "content": "    return x\n"}
    elif extra == "json" and not legacy:
        kw["response_format"] = {"type": "json_object"}
    elif extra == "reasoning":
        kw["reasoning_effort"] = draw(st.sampled_from(["low", "none", 3]))
    elif extra == "tracked" and not legacy:
        kw["logprobs_for_tokens"] = [5, 40]
    return kw


def _joined(chunks):
    """Per choice: text, token ids, logprobs (entries or legacy tokens), finish reason."""
    out = {}
    for chunk in chunks:
        check_chunk(chunk)
        for c in chunk.choices:
            text, ids, lps, finish = out.get(c.index, ("", [], [], None))
            if c.logprobs is not None:
                lps = lps + (c.logprobs.content if hasattr(c.logprobs, "content")
                             else c.logprobs.tokens)
            out[c.index] = (text + c.text, ids + (c.token_ids or []), lps,
                            c.finish_reason or finish)
    return out


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(fields=valid_requests())
def test_any_valid_request_streams_as_its_whole_response(llm, fields):
    whole = llm.completions.create(**fields)
    check_completion(whole)
    chunks = list(llm.completions.create(stream=True, **fields))
    joined = _joined(chunks)
    for choice in whole.choices:
        lps = [] if choice.logprobs is None else (
            choice.logprobs.content if hasattr(choice.logprobs, "content")
            else choice.logprobs.tokens)
        assert joined[choice.index] == (choice.text, choice.token_ids or [], lps,
                                        choice.finish_reason)
    assert chunks[-1].usage == whole.usage
