"""Per-request and per-row state of a generation.

A `Job` is what the engine is asked to do (prompts as token ids, knobs, what to capture);
a `Sequence` is one row, i.e. one choice, as it grows; a `TokenLog` holds what was
recorded for each token (echoed prompt tokens or generated ones): raw logprob, sampling
logprob, alternatives, text offset and, when asked, activation and routing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .sampler import SamplingParams
from .text import TextBuilder


@dataclass
class Job:
    prompts: list[list[int]]
    n: int
    params: list[SamplingParams]          # per row: prompt i, choice j is row i*n + j
    seeds: list[int]                      # per row
    max_new: list[int]                    # per prompt, already clipped to the context
    echo: list[int]                       # per prompt: how many trailing tokens to echo
    top_n: int = 0
    capture_hidden: bool = False
    capture_routing: bool = False
    activation_layers: tuple[int, ...] = ()   # residual streams to keep, by layer index
    stops: list[str] = field(default_factory=list)
    eos_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    cache_key: Optional[str] = None
    cache_max_len: Optional[int] = None   # None: whole prompt; 0: no reuse
    # filled in by the engine
    cached_tokens: list[int] = field(default_factory=list)
    echoes: list["TokenLog"] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def batch_key(self) -> tuple:
        """Jobs with equal keys differ only in per-row knobs and seeds: they can share one
        decode loop."""
        return (tuple(map(tuple, self.prompts)), self.n, tuple(self.max_new), tuple(self.echo),
                self.top_n, self.capture_hidden, self.capture_routing,
                self.activation_layers, tuple(self.stops),
                self.eos_ids, self.ignore_eos, self.cache_key, self.cache_max_len)


@dataclass
class TokenLog:
    """What was recorded for a run of tokens; parallel lists, one entry per token."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[Optional[float]] = field(default_factory=list)
    sampling_logprobs: list[Optional[float]] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)
    ranks: list[Optional[int]] = field(default_factory=list)         # 1 = most likely
    entropies: list[Optional[float]] = field(default_factory=list)   # of the raw distribution
    offsets: list[int] = field(default_factory=list)
    pieces: list[bytes] = field(default_factory=list)
    hidden: list[Optional[torch.Tensor]] = field(default_factory=list)
    experts: list[Optional[torch.Tensor]] = field(default_factory=list)
    weights: list[Optional[torch.Tensor]] = field(default_factory=list)
    layers: list[Optional[torch.Tensor]] = field(default_factory=list)
    text: TextBuilder = field(default_factory=TextBuilder)

    def add(self, token: int, piece: bytes, logprob: Optional[float],
            sampling_logprob: Optional[float], top: tuple[list[int], list[float]],
            rank: Optional[int] = None, entropy: Optional[float] = None,
            hidden: Optional[torch.Tensor] = None, experts: Optional[torch.Tensor] = None,
            weights: Optional[torch.Tensor] = None,
            layers: Optional[torch.Tensor] = None) -> None:
        self.ids.append(token)
        self.pieces.append(piece)
        self.offsets.append(self.text.add(piece))
        self.logprobs.append(logprob)
        self.sampling_logprobs.append(sampling_logprob)
        self.top_ids.append(top[0])
        self.top_logprobs.append(top[1])
        self.ranks.append(rank)
        self.entropies.append(entropy)
        self.hidden.append(hidden)
        self.experts.append(experts)
        self.weights.append(weights)
        self.layers.append(layers)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Sequence:
    """One choice: prompt `prompt_index`, choice `choice`, response index `index`."""

    index: int
    prompt_index: int
    choice: int
    max_new: int
    out: TokenLog = field(default_factory=TokenLog)
    finish_reason: Optional[str] = None
    stop_at: Optional[int] = None         # text index where a stop string begins
    streamed_text: int = 0                # characters already sent in chunks
    streamed_tokens: int = 0              # tokens already sent in chunks

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The returned text: generated text up to any stop string."""
        text = self.out.text.text
        return text if self.stop_at is None else text[:self.stop_at]
