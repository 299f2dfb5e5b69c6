"""Engine rows to response objects: logprobs in both formats, raw output, usage, perf.

Pure functions over the engine's `TokenLog`s, shared by whole responses and stream chunks
(a chunk is the same construction over a slice of tokens).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from .captures import encode_activation, encode_routing
from .engine.sequence import Job, Sequence, TokenLog
from .schema import (CompletionRequest, LegacyLogprobs, LogprobsContent, NewLogprobs,
                     PromptTokensDetails, RawOutput, TopLogprob, Usage)


class TokenText:
    """Display strings of token ids. A token holding part of a character is shown as
    OpenAI shows it, `bytes:\\xe2\\x80`, so distinct partial tokens keep distinct names
    (the legacy format keys alternatives by name); `bytes` always has the true bytes."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def __call__(self, token: int) -> str:
        piece = self.pieces[token]
        try:
            return piece.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


@dataclass
class ChoiceDetails:
    """What the frames know of a choice's tokens beyond the wire: where they sit in the
    sequence the model saw, each token's rank and the entropy of its distribution, and the
    router weights of its routing matrix."""

    prompt_index: int
    prompt_tokens: int                 # length of the prompt the model saw
    start: int                         # position of the first token in the content
    ranks: list[Optional[int]]
    entropies: list[Optional[float]]
    router_weights: list[Optional[list[list[float]]]]
    layer_ids: tuple[int, ...] = ()    # `activation_layers`, as non-negative indices
    num_layers: int = 0
    layers: list[Optional[np.ndarray]] = field(default_factory=list)   # [taps, hidden]


def details(prompt_index: int, prompt_tokens: int, logs: list[tuple[TokenLog, int, int]],
            start: int, layer_ids: tuple[int, ...] = (), num_layers: int = 0
            ) -> ChoiceDetails:
    """Details of the tokens [a, b) of each log, in order."""
    weights = lambda w: None if w is None else w.tolist()
    array = lambda t: None if t is None else t.to("cpu", torch.float32).numpy()
    return ChoiceDetails(prompt_index, prompt_tokens, start,
                         [r for log, a, b in logs for r in log.ranks[a:b]],
                         [e for log, a, b in logs for e in log.entropies[a:b]],
                         [weights(w) for log, a, b in logs for w in log.weights[a:b]],
                         layer_ids, num_layers,
                         [array(t) for log, a, b in logs for t in log.layers[a:b]])


def content_entries(log: TokenLog, start: int, end: int, offset_shift: int,
                    names: TokenText, with_sampling: bool) -> list[LogprobsContent]:
    """New-format entries for tokens [start, end) of a log; offsets shifted into the
    choice's text (echoed text comes first)."""
    out = []
    for k in range(start, end):
        out.append(LogprobsContent(
            token=names(log.ids[k]), bytes=list(log.pieces[k]), token_id=log.ids[k],
            text_offset=log.offsets[k] + offset_shift, logprob=log.logprobs[k],
            sampling_logprob=log.sampling_logprobs[k] if with_sampling else None,
            top_logprobs=[TopLogprob(token=names(t), logprob=lp, token_id=t,
                                     bytes=list(names.pieces[t]))
                          for t, lp in zip(log.top_ids[k], log.top_logprobs[k])],
            last_activation=None if log.hidden[k] is None else encode_activation(log.hidden[k]),
            routing_matrix=None if log.experts[k] is None else encode_routing(log.experts[k])))
    return out


def legacy_logprobs(entries: list[LogprobsContent]) -> LegacyLogprobs:
    """The legacy format: alternatives as {token: logprob}, the chosen token always among
    them; the first prompt token (no context) has nulls."""
    tops: list[Optional[dict[str, float]]] = []
    for e in entries:
        if e.logprob is None:
            tops.append(None)
            continue
        top = {t.token: t.logprob for t in e.top_logprobs or []}
        top.setdefault(e.token, e.logprob)
        tops.append(top)
    return LegacyLogprobs(tokens=[e.token for e in entries],
                          token_logprobs=[e.logprob for e in entries], top_logprobs=tops,
                          text_offset=[e.text_offset for e in entries],
                          token_ids=[e.token_id for e in entries])


def choice_logprobs(req: CompletionRequest, entries: list[LogprobsContent]) -> Any:
    if req.logprobs_format == "legacy":
        return legacy_logprobs(entries)
    return NewLogprobs(content=entries)


def wants_content(req: CompletionRequest) -> bool:
    """Per-token entries are built when logprobs or captures ask for them; captures alone
    come back in the new format, the only one with room for them."""
    return bool(req.logprobs_format or req.include_last_activation
                or req.include_routing_matrix)


def raw_output(req: CompletionRequest, job: Job, seq: Sequence, echo: TokenLog,
               entries: Optional[list[LogprobsContent]]) -> RawOutput:
    prompt = req.prompts[seq.prompt_index]
    return RawOutput(prompt_fragments=[prompt] if isinstance(prompt, str) else list(prompt),
                     prompt_token_ids=job.prompts[seq.prompt_index],
                     completion=seq.out.text.text,
                     completion_token_ids=echo.ids + seq.out.ids,
                     completion_logprobs=None if entries is None else
                     NewLogprobs(content=entries))


def usage(job: Job, seqs: list[Sequence]) -> Usage:
    prompt = sum(len(p) for p in job.prompts)
    completion = sum(len(s.out) for s in seqs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(job.cached_tokens)))


def perf_metrics(job: Job, model: str, started: float, tokenized: float, concurrent: int,
                 seqs: list[Sequence]) -> dict[str, Any]:
    """The hosted API's perf metric keys, in seconds, measured on this request."""
    t = job.timings
    end = t.get("end", t.get("prefill_end", tokenized))
    return {
        "prompt-tokens": sum(len(p) for p in job.prompts),
        "cached-prompt-tokens": sum(job.cached_tokens),
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
    }
