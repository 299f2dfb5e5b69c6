"""Request and response models of `/v1/completions`, field for field.

The request model accepts exactly the fields of the hosted API's reference page, with the
same names, types, defaults and ranges, plus the toolkit's own extensions (last activation,
routing matrix, extra activation layers). Validation is strict (no `"5"` for 5, no `True`
for 1) because a notebook typo should fail loudly, not sample with a surprising value.
`validate_request` turns every failure into `InvalidRequestError` naming the field.

The response models dump (`model_dump(exclude_none=True)`) to the JSON the hosted API sends,
so the official SDK types parse them.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_serializer, model_validator)

from .errors import InvalidRequestError, brief

TokenId = Annotated[int, Field(ge=0)]
Prob = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
MAX_STOP_SEQUENCES = 4
DEFAULT_MAX_TOKENS = 2048
REASONING_EFFORTS = ("low", "medium", "high", "none")


class _Request(BaseModel):
    # NaN and infinities are not JSON, and no knob means anything at them.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ResponseFormat(_Request):
    """`response_format`: which output the grammar engine forces."""

    model_config = ConfigDict(serialize_by_alias=True)

    type: Literal["json_object", "json_schema", "grammar", "text"]
    grammar: Optional[str] = None
    json_schema: Union[str, dict[str, Any], None] = None
    # `schema` shadows a BaseModel attribute name, so it lives under an alias.
    schema_: Union[str, dict[str, Any], None] = Field(default=None, alias="schema")

    @model_validator(mode="after")
    def _needs_its_payload(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None and self.schema_ is None:
            raise InvalidRequestError("response_format of type 'json_schema' needs a "
                                      "'json_schema' (or 'schema') key", "response_format")
        if self.type == "grammar" and not self.grammar:
            raise InvalidRequestError("response_format of type 'grammar' needs a 'grammar' "
                                      "key holding a GBNF grammar", "response_format")
        return self


class PredictionTextPart(_Request):
    type: Literal["text"]
    text: str


class PredictedOutput(_Request):
    """OpenAI's `prediction` object; normalised into `speculation`."""

    type: Literal["content"] = "content"
    content: Union[str, list[PredictionTextPart]]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class CompletionRequest(_Request):
    """Every request field of `/v1/completions`, plus the toolkit extensions."""

    # `model` is required by the hosted API; in-process it defaults to the loaded model.
    model: Optional[str] = None
    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]]
    user: Optional[str] = None
    prompt_cache_max_len: Optional[Annotated[int, Field(ge=0)]] = None
    prompt_cache_isolation_key: Optional[str] = None
    raw_output: Optional[bool] = False
    perf_metrics_in_response: Optional[bool] = False
    stream: Optional[bool] = False
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stop: Union[str, list[str], None] = None
    max_tokens: Optional[Annotated[int, Field(ge=0)]] = None
    max_completion_tokens: Optional[Annotated[int, Field(ge=0)]] = None
    temperature: Optional[Annotated[float, Field(ge=0, le=2)]] = None
    top_k: Optional[Annotated[int, Field(ge=0, le=100)]] = None
    top_p: Optional[Prob] = None
    min_p: Optional[Prob] = None
    typical_p: Optional[Prob] = None
    frequency_penalty: Optional[Penalty] = None
    presence_penalty: Optional[Penalty] = None
    repetition_penalty: Optional[Annotated[float, Field(ge=0, le=2)]] = None
    mirostat_target: Optional[Annotated[float, Field(gt=0)]] = None
    mirostat_lr: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    seed: Optional[Annotated[int, Field(ge=-(2**63), lt=2**64)]] = None
    logprobs: Union[bool, Annotated[int, Field(ge=0, le=5)], None] = None
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=5)]] = None
    echo: Optional[bool] = False
    echo_last: Optional[Annotated[int, Field(ge=0)]] = None
    ignore_eos: bool = False
    context_length_exceeded_behavior: Literal["error", "truncate"] = "truncate"
    response_format: Optional[ResponseFormat] = None
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100, le=100)]]] = None
    speculation: Union[str, list[TokenId], None] = None
    prediction: Union[PredictedOutput, str, None] = None
    metadata: Optional[dict[str, str]] = None
    reasoning_effort: Union[Literal["low", "medium", "high", "none"], bool,
                            Annotated[int, Field(ge=0)], None] = None
    return_token_ids: Optional[bool] = False
    images: Optional[list[str]] = None
    # toolkit extensions
    include_last_activation: bool = False
    include_routing_matrix: bool = False
    activation_layers: Optional[list[int]] = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, list) and not p
                                                           for p in prompt)):
            raise InvalidRequestError("prompt must not be an empty list", "prompt")
        return prompt

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: Any) -> Any:
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None:
            if len(stops) > MAX_STOP_SEQUENCES:
                raise InvalidRequestError(f"stop takes at most {MAX_STOP_SEQUENCES} sequences, "
                                          f"got {len(stops)}", "stop")
            if any(s == "" for s in stops):
                raise InvalidRequestError("stop sequences must not be empty strings", "stop")
        return stop

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _token_id_keys(cls, bias: Any) -> Any:
        # JSON keys are strings; Python callers naturally write {50256: -100}. Accept both,
        # keep the wire form (decimal strings).
        if not isinstance(bias, dict):
            return bias
        out = {}
        for key, value in bias.items():
            if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < 2**63:
                key = str(key)
            if not (isinstance(key, str) and re.fullmatch(r"\d{1,18}", key)):
                raise InvalidRequestError(f"logit_bias keys must be token ids, got "
                                          f"{brief(key)}",
                                          "logit_bias")
            out[key] = value
        return out

    @field_validator("images")
    @classmethod
    def _data_urls(cls, images: Any) -> Any:
        for url in images or []:
            if not re.fullmatch(r"data:[\w.+-]+/[\w.+-]+;base64,[A-Za-z0-9+/=\s]+", url):
                raise InvalidRequestError("images must be data URLs of the form "
                                          "'data:MIME_TYPE;base64,DATA'", "images")
        return images

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "CompletionRequest":
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise InvalidRequestError("max_tokens and max_completion_tokens are aliases; "
                                      "pass only one", "max_completion_tokens")
        if self.prediction is not None:
            if self.speculation is not None:
                raise InvalidRequestError("pass either prediction or speculation, not both",
                                          "prediction")
            pred = self.prediction
            self.speculation = pred if isinstance(pred, str) else pred.text
        if self.top_logprobs and self.logprobs_format is None:
            raise InvalidRequestError("top_logprobs needs logprobs to be set", "top_logprobs")
        return self

    # Resolved views of fields whose meaning depends on other fields.
    @property
    def max_new_tokens(self) -> int:
        """`max_tokens` or its alias, before clipping to the context window."""
        for value in (self.max_tokens, self.max_completion_tokens):
            if value is not None:
                return value
        return DEFAULT_MAX_TOKENS

    @property
    def logprobs_format(self) -> Optional[Literal["new", "legacy"]]:
        """`True` asks for the OpenAI `content` format, an integer for the legacy one."""
        if self.logprobs is True:
            return "new"
        if self.logprobs is False or self.logprobs is None:
            return None
        return "legacy"

    @property
    def num_top_logprobs(self) -> int:
        """How many alternatives to return per position."""
        if self.top_logprobs is not None:
            return self.top_logprobs
        return self.logprobs if self.logprobs_format == "legacy" else 0

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt as a list of prompts (a string or a token-id list each)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


# What each union-typed field accepts, for error messages clearer than pydantic's
# one-line-per-union-member output.
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "a string or a list of at most 4 strings",
    "logprobs": "a boolean or an integer from 0 to 5",
    "speculation": "a string or a list of token ids",
    "prediction": "a string or {'type': 'content', 'content': ...}",
    "reasoning_effort": "'low', 'medium', 'high', 'none', a boolean, or a non-negative integer",
}


# Fields of neighbouring APIs that people pass here by habit, and what to say about them.
_OTHER_API = {
    "messages": "this is the completions API (/v1/completions), which takes a 'prompt'; "
                "chat completions (messages) are not mirrored: format the conversation into "
                "a prompt string",
}


def validate_request(fields: Any) -> CompletionRequest:
    """Validate request fields; raise `InvalidRequestError` naming the first bad one."""
    if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
        raise InvalidRequestError("a request is a mapping of field names to values, got "
                                  f"{brief(fields)}", "request")
    for name, value in fields.items():
        if name in _OTHER_API:
            raise InvalidRequestError(f"'{name}' is not a field of this API: "
                                      f"{_OTHER_API[name]}", name)
        if name not in CompletionRequest.model_fields:
            shown = name.encode("utf-8", "backslashreplace").decode("utf-8")[:80]
            raise InvalidRequestError(f"Unrecognized request argument supplied: {shown}",
                                      name)
        where = _lone_surrogate(value)
        if where is not None:
            raise InvalidRequestError(f"'{name}' holds a string that is not valid Unicode (a "
                                      f"lone surrogate, {where}); it cannot be encoded as "
                                      f"UTF-8", name)
    try:
        return CompletionRequest.model_validate(fields)
    except ValidationError as exc:
        raise _as_invalid_request(exc) from None


def _lone_surrogate(value: Any) -> Optional[str]:
    """Where a string in `value` (at any depth, keys included) holds a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return f"at index {err.start}"
        return None
    if isinstance(value, dict):
        parts: Any = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple)):
        parts = value
    else:
        return None
    return next((w for w in map(_lone_surrogate, parts) if w is not None), None)


def _as_invalid_request(exc: ValidationError) -> InvalidRequestError:
    err = exc.errors()[0]
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, InvalidRequestError):
        return cause
    param = str(err["loc"][0]) if err["loc"] else "request"
    if err["type"] == "extra_forbidden":
        where = "" if len(err["loc"]) == 1 else f" in '{param}'"
        return InvalidRequestError(
            f"Unrecognized request argument supplied{where}: {brief(err['loc'][-1])}", param)
    if err["type"] == "missing":
        return InvalidRequestError(f"Missing required field '{param}'", param)
    if param in _EXPECTED:
        return InvalidRequestError(f"'{param}' must be {_EXPECTED[param]}; "
                                   f"got {brief(err['input'])}", param)
    where = ".".join(str(part) for part in err["loc"])
    return InvalidRequestError(f"Invalid value for '{where}': {err['msg']}; "
                               f"got {brief(err['input'])}", param)


# ----------------------------------------------------------------------------- responses

class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TopLogprob(_Response):
    token: str
    logprob: float
    token_id: int
    bytes: Optional[list[int]] = None


class LogprobsContent(_Response):
    """One token of the new (OpenAI) logprobs format, with the toolkit's captures."""

    token: str
    bytes: list[int]
    # null only for the first echoed prompt token, which has no context to be scored in.
    logprob: Optional[float]
    sampling_logprob: Optional[float] = None
    text_offset: int
    token_id: int
    top_logprobs: Optional[list[TopLogprob]] = None
    last_activation: Optional[str] = None
    routing_matrix: Optional[str] = None
    extra_tokens: Optional[list[int]] = None
    extra_logprobs: Optional[list[float]] = None

    @model_serializer(mode="wrap")
    def _keep_null_logprob(self, handler: Any) -> dict[str, Any]:
        # The hosted API sends `"logprob": null` for the first prompt token even though
        # clients ask for exclude_none dumps; keep the key so the wire shape matches.
        data = handler(self)
        data.setdefault("logprob", self.logprob)
        return data


class NewLogprobs(_Response):
    content: list[LogprobsContent]


class LegacyLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: Optional[list[Optional[dict[str, float]]]] = None
    text_offset: list[int]
    token_ids: list[int]


class RawOutput(_Response):
    prompt_fragments: list[Union[str, int]]
    prompt_token_ids: list[int]
    completion: str
    completion_token_ids: Optional[list[int]] = None
    completion_logprobs: Optional[NewLogprobs] = None


FinishReason = Literal["stop", "length", "error"]


class Choice(_Response):
    index: int
    text: str
    logprobs: Union[NewLogprobs, LegacyLogprobs, None] = None
    finish_reason: Optional[FinishReason] = None
    raw_output: Optional[RawOutput] = None
    prompt_token_ids: Optional[list[int]] = None
    token_ids: Optional[list[int]] = None


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


PerfMetrics = dict[str, Union[int, float, str]]


class Completion(_Response):
    """The response of a non-streaming request."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    perf_metrics: Optional[PerfMetrics] = None


class CompletionChunk(_Response):
    """One server-sent event of a streaming request; `choices` hold only new text."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Optional[Usage] = None
    perf_metrics: Optional[PerfMetrics] = None
