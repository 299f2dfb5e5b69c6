"""The decode loop of one job: prefill each prompt once, fork its KV to its n choices, then
step until every row has finished.

A step feeds each row's pending token (the last it emitted) and, when a proposer
(`speculation`) guessed how the row goes on, the guesses after it, all in one forward. That
gives a column of logits per fed token; the *walk* then emits from the columns in order,
moving to the next column only while the row's token equals its guess there. Without
guesses a step is plain decoding: one column, one token per row.

Plain decoding draws runs of steps on the device without waiting for it (`_draw`: each
step's tokens fed to the next there, EOS and lengths checked there), then the host walks
the run: stop strings, text, the tokens' records. With `overlap` (on a GPU), the next run
is queued before the host walks this one, so the device computes while the host works; a
row that meets a stop string in the run being walked has drawn one run too many, which the
next walk skips (as a walk skips a run's tokens after a stop string).

`Decoder.run(job)` is a generator of `Update`s, one after the prefill and one per walk, so
the engine can interleave the steps of several jobs. Everything a job allocates
(KV cache, sampler state) lives in the generator's frame: closing it frees the job. Only
the prefix cache outlives a job, and it only ever holds complete prompt blocks.

Prompts are prefilled in chunks aligned to the prefix cache's blocks, cached or not: a
forward over the same tokens in the same shapes gives the same bits, so a job that reuses
a cached prefix computes exactly what it would have computed without it.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from .grammar import Constraint, Grammars
from .outputs import RowUpdate, Token, Update, Verify
from .prefix_cache import PrefixCache
from .reasoning import Thinking
from .runner import Forward, MovesKV, Runner, concat
from .scoring import Scores, guess_logprobs, score_chosen, score_echo
from .sampler import Sampler
from .sequence import Job, Sequence
from .speculation import (DEFAULT_TOKENS, DraftProposer, NgramProposer, PredictionProposer,
                          Proposal)
from .text import StopStrings
from .transfer import to_device


@dataclass
class _Loop:
    """What one job's decode loop keeps between steps (it lives in `Decoder.run`'s frame,
    so closing the generator frees it)."""

    job: Job
    seqs: list[Sequence]
    state: Any                      # the runner's KV cache
    sampler: Sampler
    stops: StopStrings
    scoring: list[int]              # position of the token each row's next column scores
    proposer: Any = None            # what guesses tokens, if anything
    constraint: Optional[Constraint] = None     # structured output's matchers
    thinking: Optional[Thinking] = None         # think blocks, for models that have them


@dataclass
class _Draw:
    """A run of plain decoding steps queued on the device, and what the host reads of it."""

    steps: int
    scores: Scores                  # the tokens drawn, [steps * rows], and their records
    active: torch.Tensor            # the rows still drawing after the last step
    next: Optional[tuple[torch.Tensor, Forward]] = None   # its tokens' column, if fed


class Decoder:
    def __init__(self, runner: Runner, pieces: list[bytes], prefix_cache: PrefixCache,
                 device: torch.device, context: int, grammars: Grammars,
                 think: Optional[tuple[int, int]] = None, draft: Optional[Runner] = None,
                 ngram: bool = False, speculative_tokens: Optional[int] = None,
                 chunk: int = 1, overlap: bool = False) -> None:
        self.runner = runner
        self.overlap = overlap              # queue a run before walking the one before it
        self.grammars = grammars
        self.think = think                  # the model's think tokens (start, end)
        self.chunk = chunk                  # plain decoding steps drawn between host syncs
        self.context = context
        self.draft = draft                  # speculation, when a request brings no
        self.ngram = ngram                  # prediction of its own
        self.speculative_tokens = speculative_tokens
        self.pieces = pieces
        self.prefix_cache = prefix_cache
        self.device = device
        self.reuses_prefix = isinstance(runner, MovesKV)

    def run(self, job: Job, submitted: float) -> Iterator[Update]:
        n, rows = job.n, job.rows
        timings = {"queue": time.perf_counter() - submitted,
                   "prefill_start": time.perf_counter()}
        seqs = [Sequence(index=r, max_new=job.max_new[r // n]) for r in range(rows)]
        longest = max(len(p) + m for p, m in zip(job.prompts, job.max_new))
        state = self.runner.start(rows, min(longest, max(map(len, job.prompts)) + 64))
        # What scores each row's next token: logits, and the forward output (hidden state,
        # routing, tapped layers) of the position that produced them.
        scored: list[Forward] = []
        logits, echoes, cached = [], [], []
        for i, ids in enumerate(job.prompts):
            fwd, first_logits, echo, reused = self._prefill(job, state, i, ids)
            self.runner.fork(state, i * n, list(range(i * n + 1, (i + 1) * n)), len(ids))
            scored += [fwd] * n
            logits += [first_logits] * n
            echoes.append(echo)
            cached.append(reused)
        logits, fwd = torch.stack(logits), concat(scored)
        for s in seqs:
            if s.max_new == 0:
                s.finish_reason = "length"
        timings["prefill_end"] = timings["decode_start"] = time.perf_counter()
        done = all(s.finished for s in seqs)
        if done:
            timings["end"] = timings["prefill_end"]
        yield Update(tuple(RowUpdate(s.index, finish_reason=s.finish_reason)
                           for s in seqs if s.finished), dict(timings), tuple(echoes),
                     tuple(cached), done)
        if done:
            return

        sampler = Sampler(job.params, job.row_prompts, job.seeds, logits.shape[-1],
                          self.device)
        loop = _Loop(job, seqs, state, sampler, StopStrings(job.stops),
                     [len(p) for p in job.row_prompts],
                     self._proposer(job, sampler, logits.shape[-1]),
                     None if job.grammar is None else
                     self.grammars.constraint(job.grammar, rows, self.device),
                     None if self.think is None else
                     Thinking(job.row_prompts, self.think, job.think_budget))
        steps = (self._plain(loop, (logits, fwd)) if loop.proposer is None
                 else self._speculative(loop, (logits, fwd)))
        for changed in steps:
            timings.setdefault("first_token", time.perf_counter())
            done = all(s.finished for s in seqs)
            if done:
                timings["end"] = time.perf_counter()
            yield Update(changed, dict(timings), done=done)

    # --------------------------------------------------------- plain decoding: runs of steps

    def _plain(self, loop: _Loop, first: tuple[torch.Tensor, Forward]
               ) -> Iterator[tuple[RowUpdate, ...]]:
        """Plain decoding, one walk per run of steps: runs of 1, 2, 4 .. `chunk` steps,
        so the first token comes at once. A grammar or a thinking budget masks each step
        by the tokens before it: runs of 1, never queued ahead of the walk."""
        masked = loop.constraint is not None or loop.job.think_budget is not None
        overlap = self.overlap and not masked
        ahead = 1
        run = self._draw(loop, first, ahead, feed_last=overlap)
        while True:
            ahead = 1 if masked else min(2 * ahead, self.chunk)
            queued = None
            if run.next is not None and max(self._left(loop, run.steps)) > 0:
                queued = self._draw(loop, run.next, ahead, run.active, behind=run.steps,
                                    feed_last=True)
            yield self._walk_run(loop, run)
            if all(s.finished for s in loop.seqs):
                return
            run = queued or self._draw(loop, self._feed(loop)[0][0], ahead,
                                       feed_last=overlap)

    def _left(self, loop: _Loop, behind: int = 0) -> list[int]:
        """Tokens each row may still draw, `behind` steps after those walked."""
        return [0 if s.finished else max(s.max_new - s.generated - behind, 0)
                for s in loop.seqs]

    def _draw(self, loop: _Loop, first: tuple[torch.Tensor, Forward], steps: int,
              active: Optional[torch.Tensor] = None, behind: int = 0,
              feed_last: bool = False) -> _Draw:
        """Queue up to `steps` steps of plain decoding from the column `first` without
        waiting for the device: each step's tokens are fed to the next on the device, and
        a row stops drawing there once it drew an EOS or reached its length. Stop strings
        are only seen when the host walks the tokens: a row that met one drew a few tokens
        too many, which the walk drops. `behind` steps were drawn before these and not yet
        walked (`active`: the rows still drawing after them). With `feed_last`, the last
        step's tokens are fed too, and their column can start the next run."""
        job, sampler, scoring = loop.job, loop.sampler, loop.scoring
        left = self._left(loop, behind)
        steps = max(1, min(steps, max(left)))
        eos = None if job.ignore_eos or not job.eos_ids else to_device(
            sorted(job.eos_ids), self.device)
        alive = to_device([[j < n for n in left] for j in range(steps + 1)], self.device)
        active = alive[0] if active is None else active & alive[0]
        allowed = self._allowed(loop, [r for r, n in enumerate(left) if n])
        columns, drawn, column = [], [], first
        for j in range(steps):
            tokens, sampling_lp = sampler.sample(column[0], active, allowed=allowed)
            sampler.update(tokens, active)
            columns.append(column)
            drawn.append((tokens, sampling_lp))
            if eos is not None:
                active = active & ~(tokens[:, None] == eos).any(-1)
            active = active & alive[j + 1]
            column = None
            if (j == steps - 1 and not feed_last) or (
                    self.device.type == "cpu" and not active.any()):
                break   # (a CPU has the answer at once; a GPU would have to stop and wait)
            # each row feeds the token just drawn (at its position: `scoring` is that of
            # the first token drawn after the walked ones); one past its length feeds
            # again at its last position, a finished row at its pending one, and what
            # they compute is dropped
            at = [p + behind + min(j, n - 1) if n else p - 1 for p, n in zip(scoring, left)]
            fwd = self.runner.decode(loop.state, tokens, at, active, job.capture.layers)
            column = (fwd.logits, fwd)
        return _Draw(len(drawn), Scores.of_run(job.capture, columns, drawn), active, column)

    def _walk_run(self, loop: _Loop, run: _Draw) -> tuple[RowUpdate, ...]:
        """Emit a run's tokens: each unfinished row takes one from each step until it
        finishes. What is recorded of the tokens was computed when they were drawn."""
        seqs, rows = loop.seqs, len(loop.seqs)
        ids = run.scores.ids()
        chosen: dict[int, list[int]] = {r: [] for r, s in enumerate(seqs) if not s.finished}
        thought: set[tuple[int, int]] = set()
        going = set(chosen)
        for j in range(run.steps):
            for r in sorted(going):
                kept = self._take(loop, r, ids[j * rows + r])
                if kept is not None:
                    chosen[r].append(j)
                    if kept:
                        thought.add((j, r))
                if seqs[r].finished:
                    going.discard(r)
        picks = [(r, j) for r in chosen for j in chosen[r]]
        tokens = run.scores.tokens(self.pieces, [j * rows + r for r, j in picks])
        scored: dict[int, dict[int, Token]] = {r: {} for r in chosen}
        for (r, j), token in zip(picks, tokens):
            scored[r][j] = (dataclasses.replace(token, reasoning=True) if (j, r) in thought
                            else token)
        return self._updates(loop, chosen, scored)

    def _take(self, loop: _Loop, r: int, token: int) -> Optional[bool]:
        """Add a drawn token to row r. None: it is not part of the choice (an EOS that
        finished the row); else whether it is reasoning (in a think block). A row whose
        grammar is complete finishes here."""
        s, constraint = loop.seqs[r], loop.constraint
        if not self._append(loop.job, s, loop.stops, token):
            return None
        if loop.thinking is not None and loop.thinking.take(r, token):
            return True
        if constraint is not None and constraint.advance(r, token) and not s.finished:
            s.finish_reason = "stop"
        return False

    def _updates(self, loop: _Loop, chosen: dict[int, list[int]],
                 scored: dict[int, dict[int, Token]]) -> tuple[RowUpdate, ...]:
        """Each walked row's new tokens (by column) and finish; its scoring moves on."""
        seqs = loop.seqs
        for r in chosen:
            loop.scoring[r] += len(chosen[r])
        return tuple(RowUpdate(r, tuple(scored[r][j] for j in chosen[r]),
                               seqs[r].finish_reason, seqs[r].stop_at) for r in chosen)

    # ------------------------------------------------------------------- speculative steps

    def _speculative(self, loop: _Loop, first: tuple[torch.Tensor, Forward]
                     ) -> Iterator[tuple[RowUpdate, ...]]:
        """Decoding with a proposer: one walk per step, each step's guesses made from the
        tokens before it (the first token, before any guess, drawn plainly)."""
        columns, proposal = [first], None
        while True:
            yield self._walk(loop, columns, proposal)
            if all(s.finished for s in loop.seqs):
                return
            columns, proposal = self._feed(loop)

    def _feed(self, loop: _Loop
              ) -> tuple[list[tuple[torch.Tensor, Forward]], Optional[Proposal]]:
        """Run each row's pending token (its last), after it the proposer's guesses if
        any: the columns of logits (and forward outputs) the next walk emits from."""
        job, seqs, proposer, scoring, state = (loop.job, loop.seqs, loop.proposer,
                                               loop.scoring, loop.state)
        going = [r for r, s in enumerate(seqs) if not s.finished]
        pending = [s.ids[-1] if s.ids else 0 for s in seqs]
        at = [scoring[r] - 1 for r in range(len(seqs))]      # the pending tokens' positions
        active = to_device([not s.finished for s in seqs], self.device)
        proposal = None
        if proposer is not None:
            # guesses fit in the row's remaining tokens (the step adds one of its own) and,
            # padded to the longest, in the context window
            room = min(self.context - 1 - at[r] for r in going)
            limits = [max(min(seqs[r].max_new - seqs[r].generated - 1, room), 0)
                      for r in going]
            proposal = proposer.propose(going, [s.ids for s in seqs], limits)
            width = max(map(len, proposal.tokens))
            if width == 0:
                proposal = None
        if proposal is None:
            fwd = self.runner.decode(state, to_device(pending, self.device), at,
                                     active, job.capture.layers)
            return [(fwd.logits, fwd)], None
        fed = [[pending[r]] + g + [0] * (width - len(g)) if not seqs[r].finished
               else [0] * (width + 1) for r, g in enumerate(proposal.tokens)]
        starts = [a if not s.finished else 0 for a, s in zip(at, seqs)]
        fwd = self.runner.extend(state, torch.tensor(fed, device=self.device), starts, active,
                                 job.capture.layers)
        return [(fwd.logits[:, j], fwd.column(j)) for j in range(width + 1)], proposal

    def _walk(self, loop: _Loop, columns: list[tuple[torch.Tensor, Forward]],
              proposal: Optional[Proposal]) -> tuple[RowUpdate, ...]:
        """Emit tokens from the columns of a speculative step: every unfinished row takes
        a token from the first; a row whose token equals its guess for that column takes
        one from the next too, and so on. So each row emits its accepted guesses and one
        token more: with guesses from a prediction or n-grams, the very tokens plain
        decoding draws from those logits with those random numbers; with a draft's,
        tokens of the same distribution (the sampler's accept rule). The step's record
        goes on its last token.

        Choosing is column by column (the sampler's state moves with each token); what is
        recorded of the chosen tokens (`scoring`) is computed once for the whole walk."""
        job, seqs, scoring = loop.job, loop.seqs, loop.scoring
        guesses = proposal.tokens if proposal else [[] for _ in seqs]
        chosen: dict[int, list[int]] = {r: [] for r, s in enumerate(seqs) if not s.finished}
        thought: set[tuple[int, int]] = set()      # (column, row) of reasoning tokens
        going, drawn, ids = set(chosen), [], []
        for j in range(len(columns)):
            rows = sorted(going)
            if not rows:
                break
            tokens, sampling_lp = self._sample_column(loop, rows, columns, j, proposal)
            drawn.append((tokens, sampling_lp))
            ids.append(tokens.tolist())
            for r in rows:
                g, token = guesses[r], ids[j][r]
                kept = self._take(loop, r, token)
                if kept is not None:
                    chosen[r].append(j)
                    if kept:
                        thought.add((j, r))
                if seqs[r].finished or not (j < len(g) and token == g[j]):
                    going.discard(r)
        scored = score_chosen(self.pieces, self.device, job.capture, columns, drawn, ids,
                              chosen)
        target_lp = guess_logprobs(job.capture, columns, guesses) if proposal else None
        for r, tokens in scored.items():
            g = guesses[r]
            accepted = sum(1 for j in chosen[r] if j < len(g) and tokens[j].id == g[j])
            for j in chosen[r][:accepted]:
                tokens[j] = dataclasses.replace(tokens[j], source=loop.proposer.source)
            for j in chosen[r]:
                if (j, r) in thought:
                    tokens[j] = dataclasses.replace(tokens[j], reasoning=True)
            if g and chosen[r]:         # the step's record, on the last token it emitted
                last = chosen[r][-1]
                tokens[last] = dataclasses.replace(tokens[last], verify=Verify(
                    loop.proposer.source, scoring[r], tuple(g), accepted,
                    accepted < len(chosen[r]) and last < len(g),
                    tuple(target_lp[r][:len(g)]) if target_lp else (),
                    tuple(proposal.draft_logprobs[r]) if proposal.draft_logprobs else ()))
        return self._updates(loop, chosen, scored)

    def _sample_column(self, loop: _Loop, rows: list[int],
                       columns: list[tuple[torch.Tensor, Forward]], j: int,
                       proposal: Optional[Proposal]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens for the rows still walking at column j of a speculative step."""
        sampler = loop.sampler
        active = torch.zeros(len(loop.seqs), dtype=torch.bool, device=self.device)
        active[rows] = True
        proposed = q = None
        if j < len(columns) - 1:
            proposed = torch.tensor([g[j] if j < len(g) else 0 for g in proposal.tokens],
                                    device=self.device)
            q = None if proposal.q is None else proposal.q[:, j]
        allowed = self._allowed(loop, rows)
        tokens, sampling_lp = sampler.sample(columns[j][0], active, proposed, q, allowed)
        sampler.update(tokens, active)
        return tokens, sampling_lp

    def _allowed(self, loop: _Loop, rows: list[int]) -> Optional[torch.Tensor]:
        """The tokens each of `rows` may take next ([rows, vocab], None: any): only the
        end of its think block once its budget is spent; else, outside a think block,
        what its grammar allows."""
        thinking = loop.thinking
        free = [r for r in rows if thinking is None or not thinking.inside[r]]
        mask = None
        if loop.constraint is not None and free:
            mask = loop.constraint.allowed(free)
        forced = [] if thinking is None else thinking.forced(rows)
        if forced:
            if mask is None:
                mask = torch.ones(len(loop.seqs), loop.sampler.vocab_size, dtype=torch.bool,
                                  device=self.device)
            index = to_device(forced, self.device)
            mask[index] = False
            mask[index, thinking.end] = True
        return mask

    def _proposer(self, job: Job, sampler: Sampler, vocab_size: int) -> Any:
        """What guesses this job's tokens: its prediction, else the engine's draft model
        or n-gram lookup, else nothing."""
        depth = lambda source: self.speculative_tokens or DEFAULT_TOKENS[source]
        if job.speculation is not None:
            return PredictionProposer(job.speculation, job.rows, depth("prediction"))
        if self.draft is not None:
            return DraftProposer(self.draft, sampler, job.prompts, job.n, depth("draft"),
                                 vocab_size)
        if self.ngram:
            return NgramProposer(job.row_prompts, depth("ngram"))
        return None

    # ------------------------------------------------------------------------ the prefill

    def _prefill(self, job: Job, state: Any, i: int, ids: tuple[int, ...]
                 ) -> tuple[Forward, torch.Tensor, tuple[Token, ...], int]:
        """Prefill prompt i into its first row and score its echoed tokens. Returns the
        last position's forward output and logits (which pick the first generated token),
        the echoed tokens, and how many prompt tokens came from the prefix cache."""
        row, echo_from = i * job.n, len(ids) - job.echo[i]
        cached = self._reuse_prefix(job, state, row, ids, echo_from)
        if job.images and job.images[i]:        # with its images, in one piece
            fwd = self.runner.prefill(state, row, list(ids), 0, job.capture.layers,
                                      job.images[i])
        else:
            fwd = self._forward_chunks(state, row, ids, cached, job.capture.layers)
        if self.reuses_prefix and job.cache_max_len != 0:
            upto = len(ids) if job.cache_max_len is None else min(len(ids), job.cache_max_len)
            self.prefix_cache.store(job.cache_key, ids, upto,
                                    lambda a, b: self.runner.read_kv(state, row, a, b))
        # positions whose logits are needed: those that score echoed tokens, and the last
        first = max(echo_from - 1, 0) if job.echo[i] else len(ids) - 1
        logits = self.runner.logits(fwd.hidden[first - cached:])
        echo = score_echo(self.pieces, job.capture, ids, echo_from, first, cached, fwd, logits)
        return fwd.select(-1), logits[-1], echo, cached

    def _forward_chunks(self, state: Any, row: int, ids: tuple[int, ...], start: int,
                        taps: tuple[int, ...]) -> Forward:
        """Run prompt tokens start.. in chunks that begin on the prefix cache's block
        boundaries (`start` is one), so every prefill of a prompt has the same shapes."""
        size = self.prefix_cache.block_size if self.reuses_prefix else len(ids)
        return concat([self.runner.prefill(state, row, list(ids[a:a + size]), a, taps)
                       for a in range(start, len(ids), size)])

    def _reuse_prefix(self, job: Job, state: Any, row: int, ids: tuple[int, ...],
                      echo_from: int) -> int:
        """Load the longest cached prefix we may skip: never the last prompt token (its
        logits pick the first new token) nor a position that scores an echoed token."""
        if not self.reuses_prefix or job.cache_max_len == 0:
            return 0
        limit = len(ids) - 1
        if echo_from < len(ids):
            limit = min(limit, max(echo_from - 1, 0))
        if job.cache_max_len is not None:
            limit = min(limit, job.cache_max_len)
        cached, kv = self.prefix_cache.lookup(job.cache_key, ids, limit)
        if cached:
            self.runner.write_kv(state, row, kv)
        return cached

    def _append(self, job: Job, s: Sequence, stops: StopStrings, token: int) -> bool:
        """Add a row's new token; finish the row on EOS, a stop string or its length.
        False for an EOS that finishes the row: it is not part of the choice."""
        if token in job.eos_ids and not job.ignore_eos:
            s.finish_reason = "stop"
            return False
        s.ids.append(token)
        before = len(s.text.text)
        s.text.add(self.pieces[token])
        hit = stops.find(s.text.text, before)
        if hit is not None:
            s.stop_at, s.finish_reason = hit, "stop"
        elif s.generated >= s.max_new:
            s.finish_reason = "length"
        return True
