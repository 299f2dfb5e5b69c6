"""What the engine hands back: scored tokens, and one `Update` per step of a request.

The engine never shares a mutable object with the API layer: each update holds new,
immutable `Token`s (plus a row's finish), so the thread that decodes and the thread that
builds responses or chunks never read what the other is writing. `TokenLog` is how the
API layer accumulates them into a choice's tokens and text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .text import TextBuilder


@dataclass(frozen=True)
class Capture:
    """What a request asks to record for each token beyond its id. Nothing is computed
    that nobody asked for: a request without logprobs gets bare token ids."""

    scores: bool = False              # raw logprob, rank and entropy of the distribution
    top_n: int = 0                    # alternatives from the raw distribution
    hidden: bool = False              # final-norm hidden state that scored the token
    routing: bool = False             # experts (and router weights) at that position
    layers: tuple[int, ...] = ()      # residual streams after these layers
    tracked: tuple[int, ...] = ()     # tokens whose raw logprobs every position records

    @property
    def any(self) -> bool:
        """Whether anything beyond the token ids is recorded."""
        return bool(self.scores or self.top_n or self.hidden or self.routing or self.layers
                    or self.tracked)


@dataclass(frozen=True)
class Verify:
    """One speculative step of a row, recorded on the token that ended it: `proposed`
    tokens were fed to the target after the row's pending token (the first at
    `position`), the first `accepted` of them were kept, and the step's last token was
    either sampled in place of a rejected proposal (`resampled`) or, with every proposal
    accepted, a bonus sampled after them. `target_logprobs` are the proposed tokens' raw
    logprobs at their positions (when scores were asked for); `draft_logprobs` their
    log-probabilities under the draft's sampling distribution (draft proposals only)."""

    source: str                       # "prediction", "ngram" or "draft"
    position: int
    proposed: tuple[int, ...]
    accepted: int
    resampled: bool
    target_logprobs: tuple[float, ...] = ()
    draft_logprobs: tuple[float, ...] = ()

    @property
    def rejected(self) -> tuple[int, ...]:
        """The proposed tokens the step threw away."""
        return self.proposed[self.accepted:]


@dataclass(frozen=True)
class Token:
    """One token and what was recorded for it. `logprob` is under the raw model
    distribution (None for the first prompt token, which has no context, and when no
    scores were asked); `sampling_logprob` under the final sampling distribution (None for
    echoed prompt tokens)."""

    id: int
    piece: bytes
    logprob: Optional[float] = None
    sampling_logprob: Optional[float] = None
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()
    rank: Optional[int] = None        # 1 = most likely under the raw distribution
    entropy: Optional[float] = None   # of the raw distribution, in nats
    hidden: Optional[torch.Tensor] = None
    experts: Optional[torch.Tensor] = None     # [moe_layers, k]
    weights: Optional[torch.Tensor] = None     # [moe_layers, k], router weights
    layers: Optional[torch.Tensor] = None      # [taps, hidden]
    source: Optional[str] = None      # the proposer it was accepted from; None: the model
    verify: Optional[Verify] = None   # on the last token of a speculative step
    reasoning: bool = False           # in a think block (its tags included)
    tracked: tuple[float, ...] = ()   # raw logprobs of `Capture.tracked`, in its order


@dataclass
class TokenLog:
    """A run of tokens (a choice's output, or a prompt's echo) with its text: each token's
    `text_offset` is the length of the text decoded before it."""

    tokens: list[Token] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    text: TextBuilder = field(default_factory=TextBuilder)

    def add(self, token: Token) -> None:
        self.tokens.append(token)
        self.offsets.append(self.text.add(token.piece))

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class RowUpdate:
    """A row's new tokens since the previous update, and its finish once finished.
    `stop_at` is where a stop string begins in the row's text (the returned text ends
    there); the tokens that completed it are part of the row all the same."""

    index: int
    tokens: tuple[Token, ...] = ()
    finish_reason: Optional[str] = None
    stop_at: Optional[int] = None


@dataclass(frozen=True)
class Update:
    """One step of a request. The first update follows the prefill and carries each
    prompt's echoed tokens and how many of its tokens came from the prefix cache; the last
    has `done` set. `timings` are the engine's clock readings so far (perf_counter)."""

    rows: tuple[RowUpdate, ...]
    timings: dict[str, float]
    echoes: Optional[tuple[tuple[Token, ...], ...]] = None
    cached_tokens: Optional[tuple[int, ...]] = None
    done: bool = False
