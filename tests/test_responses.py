"""Response models dump to the hosted API's wire JSON, which the official SDK types parse."""
from __future__ import annotations

import pydantic
import pytest
from fireworks.types import CompletionCreateResponse as FwCompletion
from wire import check_logprobs_shape, assert_no_unknown_fields, check_chunk, check_completion, wire

from toolkit.schema import (Choice, Completion, CompletionChunk, LegacyLogprobs,
                            LogprobsContent, NewLogprobs, PromptTokensDetails, RawOutput,
                            TopLogprob, Usage)


def _content(token: str, tid: int, offset: int, logprob: float | None, **extra):
    return LogprobsContent(token=token, bytes=list(token.encode()), token_id=tid,
                           text_offset=offset, logprob=logprob,
                           top_logprobs=[TopLogprob(token=token, logprob=logprob or 0.0,
                                                    token_id=tid, bytes=list(token.encode()))],
                           **extra)


def _completion(**choice_fields) -> Completion:
    return Completion(
        id="cmpl-1", created=1700000000, model="tiny-code",
        choices=[Choice(index=0, text="def f", finish_reason="length", **choice_fields)],
        usage=Usage(prompt_tokens=2, completion_tokens=2, total_tokens=4,
                    prompt_tokens_details=PromptTokensDetails(cached_tokens=0)),
        perf_metrics={"prompt-tokens": 2, "server-time-to-first-token": 0.01,
                      "backend-host": "localhost", "speculation-acceptance": "0:1/2"})


def test_new_format_with_echo_activation_and_raw_output():
    content = [_content("def", 5, 0, None),
               _content(" f", 9, 3, -1.5, sampling_logprob=-1.2, last_activation="AACAPw==",
                        routing_matrix="AQI=", extra_tokens=[4], extra_logprobs=[-3.0])]
    resp = _completion(logprobs=NewLogprobs(content=content), token_ids=[9],
                       prompt_token_ids=[0, 5],
                       raw_output=RawOutput(prompt_fragments=["def"], prompt_token_ids=[0, 5],
                                            completion=" f", completion_token_ids=[5, 9],
                                            completion_logprobs=NewLogprobs(content=content)))
    data = wire(resp)
    assert data["object"] == "text_completion"
    # the first echoed token keeps its explicit null, as the hosted API sends it
    assert data["choices"][0]["logprobs"]["content"][0]["logprob"] is None
    assert "sampling_logprob" not in data["choices"][0]["logprobs"]["content"][0]
    assert data["choices"][0]["raw_output"]["completion_logprobs"]["content"][0]["logprob"] \
        is None
    checked = check_completion(resp)
    assert checked["choices"][0]["logprobs"]["content"][1]["routing_matrix"] == "AQI="
    assert Completion.model_validate(data) == resp   # our own models read the wire back


def test_legacy_format():
    lp = LegacyLogprobs(tokens=["def", " f"], token_logprobs=[None, -1.5],
                        top_logprobs=[None, {" f": -1.5, " g": -2.0}], text_offset=[0, 3],
                        token_ids=[5, 9])
    data = check_completion(_completion(logprobs=lp))
    assert data["choices"][0]["logprobs"]["tokens"] == ["def", " f"]
    assert wire(_completion(logprobs=lp))["choices"][0]["logprobs"]["token_logprobs"][0] is None


def test_chunks():
    first = CompletionChunk(id="cmpl-1", created=1, model="m",
                            choices=[Choice(index=0, text="de", token_ids=[5],
                                            prompt_token_ids=[0])])
    last = CompletionChunk(id="cmpl-1", created=1, model="m",
                           choices=[Choice(index=0, text="f", finish_reason="stop")],
                           usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
                           perf_metrics={"prompt-tokens": 1})
    assert "finish_reason" not in check_chunk(first)["choices"][0]
    assert check_chunk(last)["usage"]["total_tokens"] == 3


def test_the_sdk_check_can_fail():
    """The reference is only useful if it rejects a malformed response."""
    data = wire(_completion())
    data["choices"][0]["logprobs"] = {"token_logprobs": [-1.0], "tokenz": ["a"]}
    with pytest.raises(AssertionError, match="tokenz"):
        assert_no_unknown_fields(FwCompletion.model_validate(data))
    data["choices"][0]["logprobs"] = {"content": [{"token": "a"}]}   # no token_id, ...
    with pytest.raises(pydantic.ValidationError):
        check_logprobs_shape(data)
    del data["usage"]
    with pytest.raises(pydantic.ValidationError):
        FwCompletion.model_validate(data)


def test_response_models_refuse_unknown_fields():
    with pytest.raises(pydantic.ValidationError):
        Choice(index=0, text="", finnish_reason="stop")
