"""Check responses against the official SDK types, the independent reference for the wire."""
from __future__ import annotations

import copy
import json
from typing import Any

from fireworks.types import CompletionChunk as FwChunk
from fireworks.types import CompletionCreateResponse as FwCompletion
from fireworks.types.shared import LogProbs, NewLogProbs
from openai.types import Completion as OaCompletion


def _excuse_first_prompt_token(data: dict[str, Any]) -> dict[str, Any]:
    """The first echoed prompt token has a null logprob, which the hosted APIs send but the
    SDK types declare as float (SDKs build responses without validating). Replace exactly
    that entry's nulls; any other null still fails validation."""
    data = copy.deepcopy(data)
    for choice in data["choices"]:
        lp = choice.get("logprobs") or {}
        raw = (choice.get("raw_output") or {}).get("completion_logprobs") or {}
        for content in (lp.get("content"), raw.get("content")):
            if content and content[0]["logprob"] is None:
                content[0]["logprob"] = 0.0
        if lp.get("token_logprobs") and lp["token_logprobs"][0] is None:
            lp["token_logprobs"][0] = 0.0
            if lp.get("top_logprobs") and lp["top_logprobs"][0] is None:
                lp["top_logprobs"][0] = {}
    return data


def wire(resp: Any) -> dict[str, Any]:
    """The JSON the hosted API would send for this response object."""
    return json.loads(json.dumps(resp.model_dump(exclude_none=True)))


def assert_no_unknown_fields(obj: Any, path: str = "") -> None:
    """The SDK models allow extra keys (so a union like legacy|new logprobs accepts either
    shape); a key the SDK does not declare is a wire mistake of ours, so refuse it."""
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            assert_no_unknown_fields(item, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            assert_no_unknown_fields(value, f"{path}.{key}")
    elif hasattr(obj, "model_fields_set"):
        extra = getattr(obj, "__pydantic_extra__", None) or {}
        # our documented reading of the reference's content entries (DESIGN §4), and the
        # toolkit's own `logprobs_for_tokens`, there only when a request asks for it
        extra = {k: v for k, v in extra.items()
                 if k not in ("extra_tokens", "extra_logprobs", "logprobs_for_tokens")}
        assert not extra, f"fields the SDK does not know at {path or 'top'}: {sorted(extra)}"
        for name in type(obj).model_fields:
            assert_no_unknown_fields(getattr(obj, name), f"{path}.{name}")


def check_logprobs_shape(data: dict[str, Any]) -> None:
    """The SDK's `LogProbs | NewLogProbs` union accepts anything (every field optional,
    extras allowed), so validate each choice's logprobs against the format it claims."""
    for choice in data["choices"]:
        lp = choice.get("logprobs")
        if lp is not None:
            kind = NewLogProbs if "content" in lp else LogProbs
            assert_no_unknown_fields(kind.model_validate(lp))


def check_completion(resp: Any) -> dict[str, Any]:
    data = _excuse_first_prompt_token(wire(resp))
    assert_no_unknown_fields(FwCompletion.model_validate(data))
    OaCompletion.model_validate(data)
    check_logprobs_shape(data)
    return data


def check_chunk(chunk: Any) -> dict[str, Any]:
    data = _excuse_first_prompt_token(wire(chunk))
    assert_no_unknown_fields(FwChunk.model_validate(data))
    check_logprobs_shape(data)
    return data
