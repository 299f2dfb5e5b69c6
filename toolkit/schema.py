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
import textwrap
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

    model: Optional[str] = Field(
        None, description="Name of the model to use. In-process it defaults to the loaded "
        "model; the engine answers to its own name and to the `aliases` given to "
        "`toolkit.load`, any other name is a 404.")
    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]] = Field(
        description="The prompt(s): a string, a list of strings, a list of token ids, or a "
        "list of token-id lists. Each prompt yields `n` choices; choice index = prompt "
        "index * n + j.")
    user: Optional[str] = Field(
        None, description="An identifier of your end user, kept with the request in "
        "`llm.request_log`.")
    prompt_cache_max_len: Optional[Annotated[int, Field(ge=0)]] = Field(
        None, description="Reuse at most this many cached prompt tokens (whole 64-token "
        "blocks); 0 disables the prefix cache for this request.")
    prompt_cache_isolation_key: Optional[str] = Field(
        None, description="Requests share cached prompt blocks only when their keys are "
        "equal.")
    raw_output: Optional[bool] = Field(
        False, description="Also return the raw output: prompt fragments, prompt token ids "
        "(BOS included), the whole completion before stop trimming, and its logprobs.")
    perf_metrics_in_response: Optional[bool] = Field(
        False, description="Include `perf_metrics` (timings, token counts) in the response "
        "body; when streaming, on the last chunk (the one that sets a finish_reason).")
    stream: Optional[bool] = Field(
        False, description="Return an iterator of `CompletionChunk`s as tokens are "
        "produced.")
    n: Annotated[int, Field(ge=1, le=128)] = Field(
        1, description="How many completions to generate for each prompt; 1 to 128.")
    stop: Union[str, list[str], None] = Field(
        None, description="Up to 4 strings that end a completion, matched on text across "
        "token boundaries; the returned text excludes them.")
    max_tokens: Optional[Annotated[int, Field(ge=0)]] = Field(
        None, description="Maximum number of tokens to generate (default 2048), lowered to "
        "fit the context window unless `context_length_exceeded_behavior='error'`.")
    max_completion_tokens: Optional[Annotated[int, Field(ge=0)]] = Field(
        None, description="Alias of `max_tokens`; give one or the other.")
    temperature: Optional[Annotated[float, Field(ge=0, le=2)]] = Field(
        None, description="Sampling temperature, 0 to 2 (default 1); 0 decodes greedily.")
    top_k: Optional[Annotated[int, Field(ge=0, le=100)]] = Field(
        None, description="Sample from the k most likely tokens only, 0 to 100; 0 (the "
        "default) is off.")
    top_p: Optional[Prob] = Field(
        None, description="Nucleus sampling: the smallest set of most likely tokens whose "
        "probability reaches top_p, 0 to 1 (default 1, off).")
    min_p: Optional[Prob] = Field(
        None, description="Keep tokens at least min_p times as likely as the most likely "
        "one, 0 to 1 (default 0, off).")
    typical_p: Optional[Prob] = Field(
        None, description="Locally typical sampling: the tokens whose surprise is closest "
        "to the entropy, up to this mass, 0 to 1 (default 1, off).")
    frequency_penalty: Optional[Penalty] = Field(
        None, description="Subtract this times a token's count in the output from its "
        "logit, -2 to 2 (default 0).")
    presence_penalty: Optional[Penalty] = Field(
        None, description="Subtract this from the logit of every token already in the "
        "output, -2 to 2 (default 0).")
    repetition_penalty: Optional[Annotated[float, Field(ge=0, le=2)]] = Field(
        None, description="Divide positive (multiply negative) logits of tokens seen in "
        "the prompt or output by this, 0 to 2 (default 1, off).")
    mirostat_target: Optional[Annotated[float, Field(gt=0)]] = Field(
        None, description="Mirostat v2: target surprise in bits; when set, it replaces "
        "top-k/top-p/min-p/typical-p.")
    mirostat_lr: Optional[Annotated[float, Field(gt=0, le=1)]] = Field(
        None, description="Mirostat's learning rate, above 0 up to 1 (default 0.1).")
    seed: Optional[Annotated[int, Field(ge=-(2**63), lt=2**64)]] = Field(
        None, description="Seed for sampling: choice j of prompt i draws from its own "
        "stream derived from (seed, i, j), so results do not depend on the batch.")
    logprobs: Union[bool, Annotated[int, Field(ge=0, le=5)], None] = Field(
        None, description="True: logprobs in the OpenAI format (`content` entries, "
        "alternatives by `top_logprobs`); an integer N (0 to 5): the legacy format with N "
        "alternatives.")
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=5)]] = Field(
        None, description="How many alternatives per token, 0 to 5; needs `logprobs`.")
    echo: Optional[bool] = Field(
        False, description="Prepend the prompt to the text, and its tokens (with logprobs) "
        "to the logprobs.")
    echo_last: Optional[Annotated[int, Field(ge=0)]] = Field(
        None, description="Echo only the last N prompt tokens.")
    ignore_eos: bool = Field(
        False, description="Keep generating past the end-of-sequence token.")
    context_length_exceeded_behavior: Literal["error", "truncate"] = Field(
        "truncate", description="'truncate' (default) lowers max_tokens to fit the context "
        "window; 'error' refuses the request.")
    response_format: Optional[ResponseFormat] = Field(
        None, description="Force the output's format: {'type': 'json_object'} (any JSON "
        "object), {'type': 'json_schema', 'json_schema': SCHEMA} (or under 'schema'; an "
        "object or JSON text; OpenAI's {'name': ..., 'schema': ...} wrapper too), {'type': "
        "'grammar', 'grammar': GBNF}, or {'type': 'text'} (the default). Enforced by token "
        "masks while decoding: output that ends by 'stop' parses and validates (JSON comes "
        "without free whitespace); output cut by 'length' may be incomplete.")
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100, le=100)]]] = Field(
        None, description="Token id (as a string or an int) to a bias from -100 to 100, "
        "added to that token's logit before sampling.")
    speculation: Union[str, list[TokenId], None] = Field(
        None, description="A predicted continuation (text or token ids) for speculative "
        "decoding: checked several tokens per forward pass; the output is what it would "
        "be without it.")
    prediction: Union[PredictedOutput, str, None] = Field(
        None, description="OpenAI's predicted output ({'type': 'content', 'content': ...} "
        "or a string), turned into `speculation`.")
    metadata: Optional[dict[str, str]] = Field(
        None, description="String keys and values kept with the request in "
        "`llm.request_log`.")
    reasoning_effort: Union[Literal["low", "medium", "high", "none"], bool,
                            Annotated[int, Field(ge=0)], None] = Field(
        None, description="For models whose card declares think tokens: the thinking "
        "tokens allowed per <think> block, as a number, or 'low', 'medium', 'high' (the "
        "card's budgets; true is 'medium'); 'none', false and 0 close an open block at "
        "once. The end-of-think token is forced when the budget is spent.")
    return_token_ids: Optional[bool] = Field(
        False, description="Return the prompt's and each completion's token ids.")
    images: Optional[list[str]] = Field(
        None, description="Data URLs ('data:image/png;base64,...') of images for a "
        "vision-language model: they fill the prompts' image placeholders in order (as many "
        "images as placeholders), which its processor expands into image tokens.")
    # toolkit extensions
    include_last_activation: bool = Field(
        False, description="toolkit extension: each token's `last_activation`, base64 "
        "float32 of the final-norm hidden state that scored it (needs logprobs=True or "
        "nothing else).")
    include_routing_matrix: bool = Field(
        False, description="Each token's `routing_matrix` on mixture-of-experts models: "
        "base64 uint8 [moe_layers, experts_per_token].")
    activation_layers: Optional[list[int]] = Field(
        None, description="toolkit extension: also keep the residual stream after these "
        "layers, for `frames.activations(layer=...)` (not on the wire).")
    logprobs_for_tokens: Optional[Annotated[list[Union[TokenId, str]],
                                            Field(min_length=1, max_length=64)]] = Field(
        None, description="toolkit extension: token ids or single-token strings whose raw "
        "logprobs every content entry carries (`logprobs_for_tokens`), whatever their rank: "
        "label probabilities from one request (with `echo`, at prompt positions too).")

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


def field_docs(first: Optional[str] = None) -> str:
    """Every request field with its description, for docstrings (`first` listed first)."""
    names = list(CompletionRequest.model_fields)
    if first is not None:
        names.remove(first)
        names.insert(0, first)
    out = []
    for name in names:
        text = CompletionRequest.model_fields[name].description or ""
        out.append(textwrap.fill(text, 88, initial_indent=f"{name}: ",
                                 subsequent_indent="    "))
    return "\n".join(out) + "\n"


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
    logprobs_for_tokens: Optional[list[TopLogprob]] = None

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
