"""Engine tokens to response objects: logprobs in both formats, raw output, usage, perf,
and the local response types, which carry what the wire has no room for.

Pure functions over `TokenLog`s, shared by whole responses and stream chunks (a chunk is
the same construction over a slice of tokens).
"""
from __future__ import annotations

import socket
from typing import Any, Optional

import torch
from pydantic import Field

from .captures import encode_activation, encode_routing
from .display import html_repr, text_repr
from .engine.outputs import TokenLog
from .engine.sequence import Job
from .frames import ChoiceDetails, FrameMethods
from .schema import (Completion, CompletionChunk, CompletionRequest, LegacyLogprobs,
                     LogprobsContent, NewLogprobs, PromptTokensDetails, RawOutput,
                     TopLogprob, Usage)


# A toolkit server adds the frames' details of each choice to a response under this field
# when a request carries this header (as `toolkit.remote` does); the SDKs never see it.
DETAILS_HEADER, DETAILS_FIELD = "x-toolkit-details", "toolkit_details"


class _Shown:
    """A few lines in a console, a small table in a notebook (`toolkit.display`)."""

    def __repr__(self) -> str:
        return text_repr(self)

    __str__ = __repr__

    def _repr_html_(self) -> str:
        return html_repr(self)


class LocalCompletion(_Shown, Completion, FrameMethods):
    """A response made in-process: the wire object (what `model_dump` gives), plus
    `details` per choice for the frames, and the frame functions as methods."""

    details: dict[int, Any] = Field(default_factory=dict, exclude=True, repr=False)


class LocalChunk(_Shown, CompletionChunk, FrameMethods):
    """A stream chunk made in-process; see `LocalCompletion`."""

    details: dict[int, Any] = Field(default_factory=dict, exclude=True, repr=False)


class TokenText:
    """Display strings of token ids. A token holding part of a character is shown as
    OpenAI shows it, `bytes:\\xe2\\x80`, so distinct partial tokens keep distinct names
    (the legacy format keys alternatives by name); `bytes` always has the true bytes.

    One per model (the completions resource keeps it): each name is worked out once, the
    first time it is shown, since a response names every token and its alternatives."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self._names: list[Optional[str]] = [None] * len(pieces)

    def __call__(self, token: int) -> str:
        name = self._names[token]
        if name is None:
            piece = self.pieces[token]
            try:
                name = piece.decode("utf-8")
            except UnicodeDecodeError:
                name = "bytes:" + "".join(f"\\x{b:02x}" for b in piece)
            self._names[token] = name
        return name


def details(prompt_index: int, prompt_tokens: int, logs: list[tuple[TokenLog, int, int]],
            start: int, names: "TokenText", layer_ids: tuple[int, ...] = (),
            num_layers: int = 0) -> ChoiceDetails:
    """Details of the tokens [a, b) of each log, in order; tokens at positions from
    `prompt_tokens` on were generated."""
    tokens = [t for log, a, b in logs for t in log.tokens[a:b]]
    weights = lambda w: None if w is None else w.tolist()
    array = lambda t: None if t is None else t.to("cpu", torch.float32).numpy()
    sources = [None if start + k < prompt_tokens else t.source or "model"
               for k, t in enumerate(tokens)]
    segments = ["prompt" if start + k < prompt_tokens else
                "reasoning" if t.reasoning else "completion" for k, t in enumerate(tokens)]
    return ChoiceDetails(prompt_index, prompt_tokens, start, [t.rank for t in tokens],
                         [t.entropy for t in tokens], [weights(t.weights) for t in tokens],
                         layer_ids, num_layers, [array(t.layers) for t in tokens], sources,
                         [_step(t.verify, names) for t in tokens], segments)


def _step(v: Any, names: "TokenText") -> Optional[dict[str, Any]]:
    """A speculative step's record as `frames.speculation` shows it."""
    if v is None:
        return None
    return {"position": v.position, "source": v.source,
            "proposed": [names(t) for t in v.proposed], "proposed_ids": list(v.proposed),
            "accepted": v.accepted, "resampled": v.resampled,
            "target_logprobs": list(v.target_logprobs),
            "draft_logprobs": list(v.draft_logprobs)}


def content_entries(log: TokenLog, start: int, end: int, offset_shift: int,
                    names: TokenText, with_sampling: bool, tracked: tuple[int, ...] = ()
                    ) -> list[LogprobsContent]:
    """New-format entries for tokens [start, end) of a log; offsets shifted into the
    choice's text (echoed text comes first); `tracked` names the ids of each token's
    `tracked` logprobs."""
    out = []
    for k in range(start, end):
        t = log.tokens[k]
        out.append(LogprobsContent(
            token=names(t.id), bytes=list(t.piece), token_id=t.id,
            text_offset=log.offsets[k] + offset_shift, logprob=t.logprob,
            sampling_logprob=t.sampling_logprob if with_sampling else None,
            top_logprobs=[TopLogprob(token=names(i), logprob=lp, token_id=i,
                                     bytes=list(names.pieces[i]))
                          for i, lp in zip(t.top_ids, t.top_logprobs)],
            last_activation=None if t.hidden is None else encode_activation(t.hidden),
            routing_matrix=None if t.experts is None else encode_routing(t.experts),
            logprobs_for_tokens=[TopLogprob(token=names(i), logprob=lp, token_id=i,
                                            bytes=list(names.pieces[i]))
                                 for i, lp in zip(tracked, t.tracked)] or None,
            **_extras(t)))
    return out


def _extras(t: Any) -> dict[str, Any]:
    """`extra_tokens`/`extra_logprobs` of the token that ended a speculative step: the
    proposals it threw away, with their raw logprobs where they were proposed."""
    v = t.verify
    if v is None or not v.rejected:
        return {}
    return {"extra_tokens": list(v.rejected),
            "extra_logprobs": list(v.target_logprobs[v.accepted:]) or None}


def speculation_metrics(job: Job, logs: list[TokenLog]) -> dict[str, Any]:
    """The hosted API's speculation metrics over the choices' speculative steps; none
    when nothing was proposed. Acceptance by 0-based proposal position: of the steps that
    proposed a token there, how many kept it."""
    steps = [t.verify for log in logs for t in log.tokens if t.verify is not None]
    if job.speculation is None and not steps:
        return {}
    width = max((len(v.proposed) for v in steps), default=0)
    hits = [sum(v.accepted > k for v in steps) for k in range(width)]
    totals = [sum(len(v.proposed) > k for v in steps) for k in range(width)]
    out = {"speculation-generated-tokens": sum(v.accepted for v in steps),
           "speculation-acceptance": ",".join(f"{k}:{h}/{n}" for k, (h, n)
                                              in enumerate(zip(hits, totals)))}
    if job.speculation is not None:
        out = {"speculation-prompt-tokens": len(job.speculation),
               "speculation-prompt-matched-tokens": sum(
                   v.accepted for v in steps if v.source == "prediction"), **out}
    return out


def legacy_logprobs(spans: list[tuple[TokenLog, int, int, int]], names: TokenText
                    ) -> LegacyLogprobs:
    """The legacy format of tokens [a, b) of each log, offsets shifted into the choice's
    text (as `content_entries` takes them), built from the tokens without new-format
    entries first: alternatives as {token: logprob}, the chosen token always among them;
    the first prompt token (no context) has nulls."""
    tokens, logprobs, tops, offsets, ids = [], [], [], [], []
    for log, start, end, shift in spans:
        for k in range(start, end):
            t = log.tokens[k]
            name = names(t.id)
            tokens.append(name)
            logprobs.append(t.logprob)
            offsets.append(log.offsets[k] + shift)
            ids.append(t.id)
            if t.logprob is None:
                tops.append(None)
                continue
            top = {names(i): lp for i, lp in zip(t.top_ids, t.top_logprobs)}
            top.setdefault(name, t.logprob)
            tops.append(top)
    return LegacyLogprobs(tokens=tokens, token_logprobs=logprobs, top_logprobs=tops,
                          text_offset=offsets, token_ids=ids)


def wants_content(req: CompletionRequest) -> bool:
    """Per-token entries are built when logprobs or captures ask for them; captures alone
    come back in the new format, the only one with room for them."""
    return bool(req.logprobs_format or req.include_last_activation
                or req.include_routing_matrix or req.logprobs_for_tokens)


def raw_output(req: CompletionRequest, job: Job, prompt_index: int, out: TokenLog,
               echo: TokenLog, entries: Optional[list[LogprobsContent]]) -> RawOutput:
    prompt = req.prompts[prompt_index]
    return RawOutput(prompt_fragments=[prompt] if isinstance(prompt, str) else list(prompt),
                     prompt_token_ids=list(job.prompts[prompt_index]),
                     completion=out.text.text, completion_token_ids=echo.ids + out.ids,
                     completion_logprobs=None if entries is None else
                     NewLogprobs(content=entries))


def usage(job: Job, completion_tokens: int, cached_tokens: int) -> Usage:
    prompt = sum(len(p) for p in job.prompts)
    return Usage(prompt_tokens=prompt, completion_tokens=completion_tokens,
                 total_tokens=prompt + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def perf_metrics(job: Job, timings: dict[str, float], model: str, started: float,
                 tokenized: float, concurrent: int, cached_tokens: int,
                 logs: list[TokenLog] = ()) -> dict[str, Any]:
    """The hosted API's perf metric keys, in seconds, measured on this request. `timings`
    are the engine's clock readings (`Update.timings`)."""
    t = timings
    end = t.get("end", t.get("prefill_end", tokenized))
    return {
        "prompt-tokens": sum(len(p) for p in job.prompts),
        "cached-prompt-tokens": cached_tokens,
        "server-time-to-first-token": t.get("first_token", end) - started,
        "server-processing-time": end - started,
        "tokenizer-queue-duration": 0.0,
        "tokenizer-duration": tokenized - started,
        "prefill-queue-duration": t.get("queue", 0.0),
        "prefill-duration": t["prefill_end"] - t["prefill_start"],
        "generation-queue-duration": t.get("decode_start", t["prefill_end"]) - t["prefill_end"],
        "generation-duration": end - t["prefill_end"],
        "num-concurrent-requests": concurrent,
        "backend-host": socket.gethostname(),
        "deployment": model,
        **speculation_metrics(job, list(logs)),
    }
