"""Proposers for speculative decoding: each guesses a row's next few tokens; the decode loop
feeds the row's pending token and the guesses to the target in one forward and keeps the
longest prefix the sampler accepts (`Sampler.sample` with `proposed`), so the output is what
plain decoding would give, in fewer target forwards.

- `PredictionProposer`: the request's `speculation`/`prediction` (an expected output, such as
  the old version of a file being edited). It follows the prediction while the output does,
  and after a divergence re-aligns on the latest generated tokens, so one edit in the middle
  of a file does not end the speculation.
- `NgramProposer` (prompt lookup): the continuation of the latest earlier occurrence of the
  row's last few tokens in its own prompt and output; free, and strong where text repeats.
- `DraftProposer`: a smaller model with the same tokenizer, sampled under the request's own
  knobs; it keeps a KV cache per row, and a rejection costs it nothing to undo (a row only
  ever attends to the positions before each token's own).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .runner import Runner

# How many tokens each proposer guesses per step unless `num_speculative_tokens` says: a
# prediction or a repeat is right for long runs, a draft errs sooner.
DEFAULT_TOKENS = {"prediction": 8, "ngram": 8, "draft": 4}
MAX_SPECULATIVE_TOKENS = 32    # a longer guess is never worth its verify forward
MAX_MATCH = 8            # longest suffix of the output looked up when (re-)aligning
NGRAM_MIN_MATCH = 2      # a single shared token is too weak a reason to guess


@dataclass
class Proposal:
    """Per row, the guessed tokens (none: that row decodes plainly this step); for a draft,
    its sampling distributions q [rows, depth, vocab] and the guesses' log q."""

    tokens: list[list[int]]
    q: Optional[torch.Tensor] = None
    draft_logprobs: Optional[list[list[float]]] = None


class TokenIndex:
    """A token sequence with the positions of each token id, for suffix lookups."""

    def __init__(self, tokens: Sequence[int] = ()) -> None:
        self.tokens: list[int] = []
        self.where: dict[int, list[int]] = {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.where.setdefault(t, []).append(len(self.tokens))
            self.tokens.append(t)

    def follow(self, history: Sequence[int], min_n: int = 1, before: Optional[int] = None,
               hint: Optional[int] = None) -> Optional[int]:
        """Where the sequence goes on after the longest match (up to `MAX_MATCH` tokens, at
        least `min_n`) of the end of `history`, among matches ending before index `before`.
        Of equally long matches: the first that goes on at or after `hint`, else the latest."""
        if not history:
            return None
        best, best_len = None, min_n - 1
        limit = len(self.tokens) if before is None else before
        for end in self.where.get(history[-1], ()):
            if end >= limit:
                break
            n = 1
            while (n < MAX_MATCH and n < len(history) and n <= end
                   and self.tokens[end - n] == history[-1 - n]):
                n += 1
            settled = best is not None and hint is not None and best >= hint
            if n > best_len or (n == best_len and not settled):
                best, best_len = end + 1, n
        return best


class PredictionProposer:
    """The request's predicted output, shared by every row; each row keeps its own place."""

    source = "prediction"

    def __init__(self, prediction: Sequence[int], rows: int, depth: int) -> None:
        self.index = TokenIndex(prediction)
        self.depth = depth
        self.next = [0] * rows          # where each row is expected to be in the prediction

    def propose(self, rows: Sequence[int], outputs: Sequence[Sequence[int]],
                limits: Sequence[int]) -> Proposal:
        """Guesses for `rows` (their generated tokens so far in `outputs`), each at most
        its `limits` long; empty for rows not listed."""
        guesses: list[list[int]] = [[] for _ in self.next]
        tokens = self.index.tokens
        for r, limit in zip(rows, limits):
            out = outputs[r]
            at = self.index.follow(out, hint=self.next[r])
            if at is None:
                continue
            self.next[r] = at
            guesses[r] = tokens[at:at + min(self.depth, limit)]
        return Proposal(guesses)


class NgramProposer:
    """Prompt lookup: the continuation of the latest earlier occurrence of a row's last
    tokens in its prompt and output."""

    source = "ngram"

    def __init__(self, prompts: Sequence[Sequence[int]], depth: int) -> None:
        self.indexes = [TokenIndex(p) for p in prompts]
        self.prompt_lengths = [len(p) for p in prompts]
        self.depth = depth

    def propose(self, rows: Sequence[int], outputs: Sequence[Sequence[int]],
                limits: Sequence[int]) -> Proposal:
        guesses: list[list[int]] = [[] for _ in self.indexes]
        for r, limit in zip(rows, limits):
            index = self.indexes[r]
            index.extend(outputs[r][len(index.tokens) - self.prompt_lengths[r]:])
            at = index.follow(index.tokens, NGRAM_MIN_MATCH, before=len(index.tokens) - 1)
            if at is not None:
                guesses[r] = index.tokens[at:at + min(self.depth, limit)]
        return Proposal(guesses)


class DraftProposer:
    """A draft model's guesses: `depth` tokens sampled one after the other from its
    distributions, processed by the request's own knobs (the target's sampler), so that
    the accept rule can compare the two models' sampling distributions.

    The draft feeds each guess it makes, the last one too, so after a step its cache holds
    every token the target kept; it only ever needs the one token it has not seen (the
    step's last), and each feed is a single-token step (compiled, on a CPU).
    """

    source = "draft"

    def __init__(self, runner: Runner, sampler: Any, prompts: Sequence[Sequence[int]],
                 n: int, depth: int, vocab_size: int) -> None:
        self.runner, self.sampler, self.depth = runner, sampler, depth
        self.prompts = [tuple(prompts[r // n]) for r in range(len(prompts) * n)]
        self.vocab_size = vocab_size
        self.held = [list(p) for p in self.prompts]   # the tokens in each row's draft cache
        self.agreed = [len(p) for p in self.prompts]  # ... of which this many are certain
        self.state = runner.start(len(self.prompts), max(map(len, prompts)) + 64)
        for i, ids in enumerate(prompts):
            runner.prefill(self.state, i * n, list(ids), 0)
            runner.fork(self.state, i * n, list(range(i * n + 1, (i + 1) * n)), len(ids))

    def propose(self, rows: Sequence[int], outputs: Sequence[Sequence[int]],
                limits: Sequence[int]) -> Proposal:
        count = len(self.prompts)
        depth = min(self.depth, max(limits, default=0))
        if depth == 0:
            return Proposal([[] for _ in range(count)])
        device = self.sampler.seeds.device
        live = torch.zeros(count, dtype=torch.bool, device=device)
        live[list(rows)] = True
        seqs = {r: list(self.prompts[r]) + list(outputs[r]) for r in rows}
        logits = self._catch_up(seqs, live)
        lengths = [len(seqs[r]) if r in seqs else 1 for r in range(count)]
        guesses, qs = [], []
        for k in range(depth):
            token, q = self.sampler.propose(self._fit(logits), k)
            guesses.append(token)
            qs.append(q)
            logits = self.runner.decode(self.state, token, [n + k for n in lengths],
                                        live).logits
        tokens, q = torch.stack(guesses, 1), torch.stack(qs, 1)
        logq = q.gather(2, tokens[..., None])[..., 0].log()
        out, lps = [[] for _ in range(count)], [[] for _ in range(count)]
        host_tokens, host_lp = tokens.tolist(), logq.tolist()
        for r, limit in zip(rows, limits):
            self.held[r], self.agreed[r] = seqs[r] + host_tokens[r], len(seqs[r])
            take = min(depth, limit)
            out[r], lps[r] = host_tokens[r][:take], host_lp[r][:take]
        return Proposal(out, q, lps)

    def _catch_up(self, seqs: dict[int, list[int]], live: torch.Tensor) -> torch.Tensor:
        """Feed each live row the tokens its draft cache lacks (after a step: the one the
        target chose last), and return the logits after each row's last token."""
        count, device = len(self.prompts), live.device
        missing = {}
        for r, seq in seqs.items():
            common, held = self.agreed[r], self.held[r]
            while common < min(len(held), len(seq)) and held[common] == seq[common]:
                common += 1
            missing[r] = max(len(seq) - common, 1)    # the last, for its logits
        width = max(missing.values())
        fed = [seqs[r][-width:] if r in seqs else [0] * width for r in range(count)]
        starts = [len(seqs[r]) - width if r in seqs else 0 for r in range(count)]
        tokens = torch.tensor(fed, device=device)
        if width == 1:
            return self.runner.decode(self.state, tokens[:, 0], starts, live).logits
        return self.runner.extend(self.state, tokens, starts, live).logits[:, -1]

    def _fit(self, logits: torch.Tensor) -> torch.Tensor:
        """The draft's logits over the target's vocabulary (the same tokenizer; the output
        layers may be padded to different widths)."""
        width = logits.shape[-1]
        if width >= self.vocab_size:
            return logits[:, :self.vocab_size]
        return torch.nn.functional.pad(logits, (0, self.vocab_size - width),
                                       value=float("-inf"))
