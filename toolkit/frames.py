"""Responses to tidy DataFrames. Pure functions of a response, of the list of chunks a stream
produced, or of JSON parsed back into a response; no model access.

Everything on the wire lands in a frame. A response made in-process also carries details
the wire has no room for (`ChoiceDetails`: each token's rank and the entropy of its
distribution, the router weights, prompt positions, tapped layers); from a response without
them (one parsed from JSON) the frames take what the wire gives: ranks from the top
alternatives where the token is among them, NaN elsewhere. Local responses have the frame
functions as methods too (`resp.tokens()`), through the `FrameMethods` mixin.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import pandas as pd

from .captures import decode_activation, decode_routing
from .schema import Completion, CompletionChunk, LegacyLogprobs, LogprobsContent

Response = Union[Completion, CompletionChunk, Sequence[CompletionChunk]]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


class EmptyFrameWarning(UserWarning):
    """A frame came out empty because the response lacks what it is made of."""


_ASK = {"logprobs": "logprobs=True (or an integer, for the legacy format)",
        "top logprobs": "logprobs=True with top_logprobs=1..5",
        "last activations": "include_last_activation=True",
        "routing matrices": "include_routing_matrix=True, on a mixture-of-experts model",
        "tracked token logprobs": "logprobs_for_tokens=[token ids or one-token strings]",
        "residual streams": "logprobs=True and activation_layers=[...] (a local response)"}


def _missing(what: str) -> None:
    """Warn, pointing at the caller's line outside toolkit (plots and sweeps call frames)."""
    frame, level = sys._getframe(), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"the response carries no {what}: request it with {_ASK[what]}",
                  EmptyFrameWarning, stacklevel=level)


def _explain_empty(merged: list["_Choice"], what: str) -> None:
    """Warn that the response lacks `what`, unless it simply has no tokens (a chunk that
    only finishes a choice)."""
    if merged and (any(c.entries for c in merged) or not any(c.has_logprobs for c in merged)):
        _missing(what)


@dataclass
class ChoiceDetails:
    """What the frames know of a choice's tokens beyond the wire: where they sit in the
    sequence the model saw, each token's rank and the entropy of its distribution, the
    router weights of its routing matrix and the residual streams of tapped layers."""

    prompt_index: int
    prompt_tokens: int                 # length of the prompt the model saw
    start: int                         # position of the first token in the content
    ranks: list[Optional[int]]
    entropies: list[Optional[float]]
    router_weights: list[Optional[list[list[float]]]]
    layer_ids: tuple[int, ...] = ()    # `activation_layers`, as non-negative indices
    num_layers: int = 0
    layers: list[Optional[np.ndarray]] = field(default_factory=list)   # [taps, hidden]
    # per token: the proposer a generated token was accepted from ("model" if none; None
    # for prompt tokens), and on the token that ended a speculative step, its record
    sources: list[Optional[str]] = field(default_factory=list)
    steps: list[Optional[dict[str, Any]]] = field(default_factory=list)
    # per token: "prompt", "reasoning" (in a think block, tags included) or "completion"
    segments: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """These details as JSON values (arrays as nested lists): a toolkit server sends
        them to `toolkit.remote`, whose frames then equal the local ones."""
        out = asdict(self)
        out["layers"] = [None if a is None else a.tolist() for a in self.layers]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ChoiceDetails":
        """The inverse of `to_json`."""
        return cls(**{**data, "layer_ids": tuple(data["layer_ids"]),
                      "layers": [None if a is None else np.asarray(a, np.float32)
                                 for a in data["layers"]]})


class FrameMethods:
    """The frame functions as methods of a local response (or chunk), all but `choices`,
    the name of the wire's own field. Classes using it have a `details` mapping of choice
    index to `ChoiceDetails`."""

    details: dict[int, ChoiceDetails]

    def tokens(self) -> pd.DataFrame:
        """`toolkit.frames.tokens` of this response."""
        return tokens(self)

    def top_logprobs(self) -> pd.DataFrame:
        """`toolkit.frames.top_logprobs` of this response."""
        return top_logprobs(self)

    def token_logprobs(self) -> pd.DataFrame:
        """`toolkit.frames.token_logprobs` of this response."""
        return token_logprobs(self)

    def logit_lens(self, llm: Any) -> pd.DataFrame:
        """`toolkit.frames.logit_lens` of this response, read through `llm`."""
        return logit_lens(self, llm)

    def activations(self, layer: Optional[int] = None) -> pd.DataFrame:
        """`toolkit.frames.activations` of this response."""
        return activations(self, layer)

    def routing(self, experts_per_token: Optional[int] = None) -> pd.DataFrame:
        """`toolkit.frames.routing` of this response."""
        return routing(self, experts_per_token)

    def perf(self) -> pd.DataFrame:
        """`toolkit.frames.perf` of this response."""
        return perf(self)

    def speculation(self) -> pd.DataFrame:
        """`toolkit.frames.speculation` of this response."""
        return speculation(self)

    def acceptance(self) -> pd.DataFrame:
        """`toolkit.frames.acceptance` of this response."""
        return acceptance(self)


@dataclass
class _Choice:
    """One choice, merged across chunks: its entries in the new format and its details."""

    index: int
    text: str = ""
    finish_reason: Optional[str] = None
    entries: list[LogprobsContent] = field(default_factory=list)
    details: Any = None
    ranks: list[Optional[int]] = field(default_factory=list)
    entropies: list[Optional[float]] = field(default_factory=list)
    router_weights: list[Any] = field(default_factory=list)
    layers: list[Any] = field(default_factory=list)
    sources: list[Optional[str]] = field(default_factory=list)
    steps: list[Optional[dict[str, Any]]] = field(default_factory=list)
    # per token: "prompt", "reasoning" (in a think block, tags included) or "completion"
    segments: list[str] = field(default_factory=list)
    has_logprobs: bool = False         # some chunk of it carried a logprobs object


def _entries(logprobs: Any) -> list[LogprobsContent]:
    """New-format entries; legacy logprobs are read into the same shape."""
    if logprobs is None:
        return []
    if not isinstance(logprobs, LegacyLogprobs):
        return list(logprobs.content)
    out = []
    for k, token in enumerate(logprobs.tokens):
        top = (logprobs.top_logprobs or [None] * len(logprobs.tokens))[k] or {}
        out.append(LogprobsContent(
            token=token, bytes=list(token.encode()), token_id=logprobs.token_ids[k],
            text_offset=logprobs.text_offset[k], logprob=logprobs.token_logprobs[k],
            top_logprobs=[{"token": t, "logprob": lp, "token_id": -1}
                          for t, lp in sorted(top.items(), key=lambda kv: -kv[1])]))
    return out


def _choices(resp: Response) -> list[_Choice]:
    chunks = [resp] if isinstance(resp, (Completion, CompletionChunk)) else list(resp)
    merged: dict[int, _Choice] = {}
    for chunk in chunks:
        extra = chunk.details if isinstance(chunk, FrameMethods) else {}
        for c in chunk.choices:
            m = merged.setdefault(c.index, _Choice(c.index))
            m.text += c.text
            m.finish_reason = c.finish_reason or m.finish_reason
            m.entries += _entries(c.logprobs)
            m.has_logprobs = m.has_logprobs or c.logprobs is not None
            d = extra.get(c.index)
            if d is not None:
                m.details = m.details or d
                m.ranks += d.ranks
                m.entropies += d.entropies
                m.router_weights += d.router_weights
                m.layers += d.layers
                m.sources += d.sources
                m.steps += d.steps
                m.segments += d.segments
    return [merged[i] for i in sorted(merged)]


def _segments(c: _Choice, positions: list[int]) -> list[str]:
    """prompt (echoed), reasoning (a <think> block, tags included), completion: as the
    engine marked them, else (a hosted response) from the think tags in the text."""
    if len(c.segments) == len(c.entries):
        return c.segments
    prompt_len = c.details.prompt_tokens if c.details else None
    # without details: echoed tokens are the new-format entries with no sampling logprob
    sampled = any(e.sampling_logprob is not None for e in c.entries)
    out, thinking = [], False
    for e, pos in zip(c.entries, positions):
        if pos < prompt_len if prompt_len is not None else sampled and \
                e.sampling_logprob is None:
            out.append("prompt")
            continue
        if e.token == THINK_OPEN:
            thinking = True
        out.append("reasoning" if thinking else "completion")
        if e.token == THINK_CLOSE:
            thinking = False
    return out


def _rank(c: _Choice, k: int) -> Optional[int]:
    if k < len(c.ranks) and c.ranks[k] is not None:
        return c.ranks[k]
    e = c.entries[k]
    for r, alt in enumerate(e.top_logprobs or [], start=1):
        if alt.token == e.token:
            return r
    return None


def tokens(resp: Response) -> pd.DataFrame:
    """One row per (choice, position) of every token with logprobs."""
    rows = []
    merged = _choices(resp)
    if merged and not any(c.has_logprobs for c in merged):
        _missing("logprobs")
    for c in merged:
        start = c.details.start if c.details else 0
        positions = [start + k for k in range(len(c.entries))]
        for k, (e, pos, seg) in enumerate(zip(c.entries, positions, _segments(c, positions))):
            rows.append({
                "choice": c.index, "prompt_index": c.details.prompt_index if c.details else 0,
                "position": pos, "segment": seg, "token": e.token, "token_id": e.token_id,
                "text_offset": e.text_offset, "logprob": e.logprob,
                "sampling_logprob": e.sampling_logprob, "rank": _rank(c, k),
                "entropy": c.entropies[k] if k < len(c.entropies) else None,
                "speculated": _source(c, k) not in (None, "model"), "source": _source(c, k),
                "finish_reason": c.finish_reason})
    frame = pd.DataFrame(rows, columns=[
        "choice", "prompt_index", "position", "segment", "token", "token_id", "text_offset",
        "logprob", "sampling_logprob", "rank", "entropy", "speculated", "source",
        "finish_reason"])
    return frame.astype({"choice": "int64", "prompt_index": "int64", "position": "int64",
                         "segment": pd.CategoricalDtype(["prompt", "reasoning", "completion"]),
                         "token": "object", "token_id": "int64", "text_offset": "int64",
                         "logprob": "float64", "sampling_logprob": "float64",
                         "rank": "Int64", "entropy": "float64", "speculated": "bool",
                         "source": "object", "finish_reason": "object"})


def _source(c: _Choice, k: int) -> Optional[str]:
    """Where token k came from: a proposer it was accepted from, "model", or None (a
    prompt token, or a response without details)."""
    return c.sources[k] if k < len(c.sources) else None


SPECULATION_COLUMNS = ["choice", "step", "position", "source", "proposed", "proposed_ids",
                       "accepted", "resampled", "target_logprobs", "draft_logprobs"]


def speculation(resp: Response) -> pd.DataFrame:
    """One row per speculative step of each choice: where its proposals began
    (`position`, of the first proposed token), who proposed them (`source`), the proposed
    tokens and ids, how many the model `accepted`, whether the step's last token replaced
    a rejected proposal (`resampled`; else every proposal was kept and a bonus token
    followed), and the proposals' raw logprobs under the model and, for a draft, their
    log-probabilities under the draft's sampling distribution (lists, one per proposed
    token; empty without logprobs). Local responses only: the wire keeps just
    `extra_tokens`."""
    rows = []
    for c in _choices(resp):
        steps = [s for s in c.steps if s is not None]
        for n, step in enumerate(steps):
            rows.append({"choice": c.index, "step": n, **step})
    frame = pd.DataFrame(rows, columns=SPECULATION_COLUMNS)
    return frame.astype({"choice": "int64", "step": "int64", "position": "int64",
                         "accepted": "int64", "resampled": "bool"})


def acceptance(resp: Union[Response, pd.DataFrame]) -> pd.DataFrame:
    """Acceptance by proposal position (0 = the first token proposed in a step), over
    every step of every choice (or of a `speculation` frame): how many steps `proposed` a
    token there, how many `accepted` it, the unconditional `rate` (accepted / proposed)
    and the `conditional_rate` (accepted at k / accepted at k - 1: given that every
    earlier proposal was kept). The mean acceptance length is
    `speculation(resp).accepted.mean()`."""
    steps = resp if isinstance(resp, pd.DataFrame) else speculation(resp)
    width = int(steps.proposed_ids.map(len).max()) if len(steps) else 0
    rows = []
    for k in range(width):
        proposed = int((steps.proposed_ids.map(len) > k).sum())
        accepted = int((steps.accepted > k).sum())
        before = proposed if k == 0 else int(((steps.accepted >= k)
                                               & (steps.proposed_ids.map(len) > k)).sum())
        rows.append({"position": k, "proposed": proposed, "accepted": accepted,
                     "rate": accepted / proposed if proposed else math.nan,
                     "conditional_rate": accepted / before if before else math.nan})
    return pd.DataFrame(rows, columns=["position", "proposed", "accepted", "rate",
                                       "conditional_rate"])


def _alternatives(resp: Response, field: str, what: str
                  ) -> Iterator[tuple[_Choice, int, LogprobsContent, int, Any]]:
    """(choice, position, entry, rank from 1, alternative) for each alternative listed in
    the entries' `field` (`top_logprobs`, `logprobs_for_tokens`); a warning naming `what`
    when the response has none."""
    merged = _choices(resp)
    if not any(getattr(e, field) for c in merged for e in c.entries):
        _explain_empty(merged, what)
    for c in merged:
        start = c.details.start if c.details else 0
        for k, e in enumerate(c.entries):
            for r, alt in enumerate(getattr(e, field) or [], start=1):
                yield c, start + k, e, r, alt


def top_logprobs(resp: Response) -> pd.DataFrame:
    """Long format: one row per (choice, position, rank) alternative."""
    rows = [{"choice": c.index, "position": position, "rank": r, "token": alt.token,
             "token_id": alt.token_id if alt.token_id >= 0 else None, "logprob": alt.logprob}
            for c, position, _, r, alt in _alternatives(resp, "top_logprobs", "top logprobs")]
    frame = pd.DataFrame(rows, columns=["choice", "position", "rank", "token", "token_id",
                                        "logprob"])
    return frame.astype({"choice": "int64", "position": "int64", "rank": "int64",
                         "token": "object", "token_id": "Int64", "logprob": "float64"})


def token_logprobs(resp: Response) -> pd.DataFrame:
    """Long format: one row per (choice, position, tracked token) of a request's
    `logprobs_for_tokens`: the raw logprob of that token at that position, whatever its
    rank. `token` is the token that stands at the position; `tracked_token` the one
    scored there."""
    rows = [{"choice": c.index, "position": position, "token": e.token,
             "tracked_token": alt.token, "tracked_token_id": alt.token_id,
             "logprob": alt.logprob}
            for c, position, e, _, alt in _alternatives(resp, "logprobs_for_tokens",
                                                        "tracked token logprobs")]
    frame = pd.DataFrame(rows, columns=["choice", "position", "token", "tracked_token",
                                        "tracked_token_id", "logprob"])
    return frame.astype({"choice": "int64", "position": "int64", "tracked_token_id": "int64",
                         "logprob": "float64"})


LENS_COLUMNS = ["choice", "position", "layer", "token", "top_token", "top_logprob",
                "logprob", "rank", "entropy"]


def logit_lens(resp: Response, llm: Any) -> pd.DataFrame:
    """The logit lens: the residual stream after each layer of `activation_layers`, read
    through `llm`'s final norm and output head as if the model ended there. One row per
    (choice, position, layer): that layer's top token and its logprob, and the logprob,
    rank and entropy it gives the token that stands at the position. The last layer's
    stream is the model's own: there the logprobs are the response's."""
    import torch

    rows = []
    for c in _choices(resp):
        taps = c.details.layer_ids if c.details else ()
        keep = [k for k in range(min(len(c.entries), len(c.layers)))
                if c.layers[k] is not None]
        if not taps or not keep:
            continue
        streams = torch.from_numpy(np.stack([c.layers[k] for k in keep]))   # [n, taps, H]
        with torch.no_grad():
            logp = llm.engine.runner.lens(streams).log_softmax(-1).cpu()    # [n, taps, V]
        ids = torch.tensor([c.entries[k].token_id for k in keep])
        chosen = logp.gather(2, ids[:, None, None].expand(-1, len(taps), 1))[..., 0]
        rank = (logp > chosen[..., None]).sum(-1) + 1
        entropy = -(logp.exp() * logp).nan_to_num().sum(-1)
        top_lp, top_id = logp.max(-1)
        for i, k in enumerate(keep):
            for t, layer in enumerate(taps):
                rows.append([c.index, c.details.start + k, layer, c.entries[k].token,
                             llm.tokenizer.decode([int(top_id[i, t])]), float(top_lp[i, t]),
                             float(chosen[i, t]), int(rank[i, t]), float(entropy[i, t])])
    if not rows:
        _missing("residual streams")
    return pd.DataFrame(rows, columns=LENS_COLUMNS)


def activation_matrix(resp: Response, layer: Optional[int] = None
                      ) -> tuple[pd.MultiIndex, np.ndarray]:
    """Activations as one float32 matrix [tokens, hidden] with its (choice, position)
    index: the wire's `last_activation` (final norm output) or, with `layer`, the residual
    stream after that decoder layer, asked for with `activation_layers` (not on the wire:
    local responses only). Tokens without one (the first prompt token) are left out."""
    index, vectors = [], []
    for c in _choices(resp):
        start = c.details.start if c.details else 0
        tap = _tap(c, layer)
        for k, e in enumerate(c.entries):
            if layer is not None:
                if k < len(c.layers) and c.layers[k] is not None:
                    index.append((c.index, start + k))
                    vectors.append(c.layers[k][tap])
            elif e.last_activation is not None:
                index.append((c.index, start + k))
                vectors.append(decode_activation(e.last_activation))
    if not vectors and layer is None:
        _explain_empty(_choices(resp), "last activations")
    matrix = np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)
    return pd.MultiIndex.from_tuples(index, names=["choice", "position"]), matrix


def _tap(c: _Choice, layer: Optional[int]) -> int:
    """Which of the tapped layers `layer` is (negative counts from the last layer)."""
    if layer is None:
        return -1
    if c.details and c.details.layer_ids and layer % c.details.num_layers in \
            c.details.layer_ids:
        return c.details.layer_ids.index(layer % c.details.num_layers)
    raise ValueError(f"layer {layer} was not captured: request it with "
                     f"activation_layers=[{layer}]")


def activations(resp: Response, layer: Optional[int] = None) -> pd.DataFrame:
    """(choice, position) index, one float32 column per hidden unit; see
    `activation_matrix` for `layer`."""
    index, matrix = activation_matrix(resp, layer)
    return pd.DataFrame(matrix, index=index, copy=False)


def routing(resp: Response, experts_per_token: Optional[int] = None) -> pd.DataFrame:
    """One row per (choice, position, layer, k): the expert chosen and its router weight
    (NaN where the response carries no weights). `experts_per_token` is needed only for a
    response without details."""
    rows = []
    for c in _choices(resp):
        start = c.details.start if c.details else 0
        for idx, e in enumerate(c.entries):
            if e.routing_matrix is None:
                continue
            weights = c.router_weights[idx] if idx < len(c.router_weights) else None
            k = experts_per_token or (len(weights[0]) if weights else None)
            if k is None:
                raise ValueError("routing(): pass experts_per_token for a response parsed "
                                 "from JSON")
            matrix = decode_routing(e.routing_matrix, k)
            for layer, row in enumerate(matrix):
                for slot, expert in enumerate(row):
                    rows.append({"choice": c.index, "position": start + idx, "layer": layer,
                                 "k": slot, "expert": int(expert),
                                 "weight": weights[layer][slot] if weights else math.nan})
    if not rows:
        _explain_empty(_choices(resp), "routing matrices")
    frame = pd.DataFrame(rows, columns=["choice", "position", "layer", "k", "expert",
                                        "weight"])
    return frame.astype({"choice": "int64", "position": "int64", "layer": "int64",
                         "k": "int64", "expert": "int64", "weight": "float64"})


CHOICE_COLUMNS = ["choice", "prompt_index", "text", "finish_reason", "tokens", "sum_logprob",
                  "perplexity"]


def choices(resp: Response) -> pd.DataFrame:
    """One row per choice: text, finish reason, completion token count, summed logprob
    and perplexity of the completion tokens (echoed prompt tokens excluded)."""
    rows = []
    tok = tokens(resp)
    for c in _choices(resp):
        done = tok[(tok.choice == c.index) & (tok.segment != "prompt")]
        total = float(done.logprob.sum()) if len(done) else math.nan
        rows.append({"choice": c.index,
                     "prompt_index": c.details.prompt_index if c.details else 0,
                     "text": c.text, "finish_reason": c.finish_reason, "tokens": len(done),
                     "sum_logprob": total,
                     "perplexity": math.exp(-total / len(done)) if len(done) else math.nan})
    return pd.DataFrame(rows, columns=CHOICE_COLUMNS)


def perf(resp: Union[Response, Iterable[Completion]]) -> pd.DataFrame:
    """One row per response: id, model, created, its usage and every perf metric it
    carries. Column names follow one rule, snake_case: usage fields by their wire names
    (the cached prompt tokens as `cached_prompt_tokens`), perf metrics with their hyphens
    as underscores (`server-time-to-first-token` -> `server_time_to_first_token`); a
    number both give (prompt tokens, cached prompt tokens) is one column. Durations are in
    seconds. For a stream, the last chunk carries them."""
    if isinstance(resp, (Completion, CompletionChunk)):
        responses = [resp]
    else:
        items = list(resp)
        responses = [items[-1]] if items and isinstance(items[0], CompletionChunk) else items
    rows = []
    for r in responses:
        row = {"id": r.id, "model": r.model, "created": r.created}
        if r.usage is not None:
            row.update(prompt_tokens=r.usage.prompt_tokens,
                       completion_tokens=r.usage.completion_tokens,
                       total_tokens=r.usage.total_tokens,
                       cached_prompt_tokens=(r.usage.prompt_tokens_details.cached_tokens
                                             if r.usage.prompt_tokens_details else 0))
        row.update({key.replace("-", "_"): value
                    for key, value in (r.perf_metrics or {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)
