"""Reasoning budgets (`reasoning_effort`): how long each row may think.

A model whose card declares think tokens thinks between `<think>` and `</think>` (a prompt
may end inside an open block, as reasoning models' chat templates do). `Thinking` follows
each row in and out of its blocks, marks the tokens there as reasoning (the tags
included), and says which rows have spent their budget: the decode loop then allows those
rows nothing but the end-of-think token, so a budget of N yields at most N thinking tokens
per block, and 0 closes an open block at once.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union


def budget(effort: Union[str, bool, int, None], budgets: dict[str, int]) -> Optional[int]:
    """The token budget of a `reasoning_effort`, 'low'/'medium'/'high' from the model
    card's `budgets`: None (not set) leaves thinking alone; True is 'medium'; False,
    'none' and 0 allow no thinking at all."""
    if effort is None:
        return None
    if effort is True:
        effort = "medium"
    if effort is False or effort == "none":
        return 0
    if isinstance(effort, str):
        return budgets[effort]
    return int(effort)


def open_at_end(ids: Sequence[int], start: int, end: int) -> bool:
    """Whether a prompt ends inside a think block."""
    for token in reversed(ids):
        if token in (start, end):
            return token == start
    return False


class Thinking:
    """Each row's think block: whether it is in one and how many tokens it spent there."""

    def __init__(self, prompts: Sequence[Sequence[int]], tokens: tuple[int, int],
                 limit: Optional[int]) -> None:
        self.start, self.end = tokens
        self.limit = limit
        self.inside = [open_at_end(p, self.start, self.end) for p in prompts]
        self.spent = [0] * len(prompts)

    def forced(self, rows: Sequence[int]) -> list[int]:
        """Those of `rows` whose next token must close their block."""
        if self.limit is None:
            return []
        return [r for r in rows if self.inside[r] and self.spent[r] >= self.limit]

    def take(self, row: int, token: int) -> bool:
        """Follow a row's new token; True if it is reasoning (inside a block, or a tag)."""
        if self.inside[row]:
            if token == self.end:
                self.inside[row] = False
            else:
                self.spent[row] += 1
            return True
        if token == self.start:
            self.inside[row], self.spent[row] = True, 0
            return True
        return False

