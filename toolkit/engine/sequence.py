"""What the engine is asked to do (`Job`), and the state of each row as it decodes
(`Sequence`). A job is never written to: what the engine produces travels back as
`outputs.Update`s."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .outputs import Capture
from .sampler import SamplingParams
from .text import TextBuilder


@dataclass(frozen=True)
class Job:
    prompts: tuple[tuple[int, ...], ...]
    n: int
    params: tuple[SamplingParams, ...]    # per row: prompt i, choice j is row i*n + j
    seeds: tuple[int, ...]                # per row
    max_new: tuple[int, ...]              # per prompt, already clipped to the context
    echo: tuple[int, ...]                 # per prompt: how many trailing tokens to echo
    capture: Capture = Capture()
    stops: tuple[str, ...] = ()
    eos_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    cache_key: Optional[str] = None
    cache_max_len: Optional[int] = None   # None: whole prompt; 0: no reuse
    speculation: Optional[tuple[int, ...]] = None   # a predicted output, as token ids
    grammar: Optional[str] = None         # structured output (grammar.Grammars.compile)
    think_budget: Optional[int] = None    # thinking tokens allowed per block; None: any
    # per prompt, a vision-language model's image inputs (pixel values and the like)
    images: Optional[tuple[dict[str, Any], ...]] = field(default=None, compare=False)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def row_prompts(self) -> list[tuple[int, ...]]:
        """The prompt of each row (prompt i, choice j is row i*n + j)."""
        return [self.prompts[r // self.n] for r in range(self.rows)]

    @property
    def batch_key(self) -> tuple:
        """Jobs with equal keys differ only in per-row knobs and seeds: they can share one
        decode loop."""
        return (self.prompts, self.n, self.max_new, self.echo, self.capture, self.stops,
                self.eos_ids, self.ignore_eos, self.cache_key, self.cache_max_len,
                self.speculation, self.grammar, self.think_budget,
                None if self.images is None else id(self))   # images: never merged


@dataclass
class Sequence:
    """One row (one choice) as it decodes: how far it got, its text for matching stop
    strings, and why it finished."""

    index: int
    max_new: int
    ids: list[int] = field(default_factory=list)   # the tokens generated so far
    text: TextBuilder = field(default_factory=TextBuilder)
    finish_reason: Optional[str] = None
    stop_at: Optional[int] = None         # text index where a stop string begins

    @property
    def generated(self) -> int:
        return len(self.ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
