"""The decode loop of one job: prefill each prompt once, fork its KV to its n choices, then
step until every row has finished.

A step feeds each row's pending token (the last it emitted) and, when a proposer
(`speculation`) guessed how the row goes on, the guesses after it, all in one forward. That
gives a column of logits per fed token; the *walk* then emits from the columns in order,
moving to the next column only while the row's token equals its guess there. Without
guesses a step is plain decoding: one column, one token per row.

`Decoder.run(job)` is a generator of `Update`s, one after the prefill and one per step, so
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
from typing import Any, Iterator, Optional

import torch

from .outputs import Capture, RowUpdate, Token, Update, Verify
from .prefix_cache import PrefixCache
from .runner import Forward, MovesKV, Runner, concat
from .sampler import Sampler
from .sequence import Job, Sequence
from .speculation import (DEFAULT_TOKENS, DraftProposer, NgramProposer, PredictionProposer,
                          Proposal)
from .text import StopStrings


class Decoder:
    def __init__(self, runner: Runner, pieces: list[bytes], prefix_cache: PrefixCache,
                 device: torch.device, context: int, draft: Optional[Runner] = None,
                 ngram: bool = False, speculative_tokens: Optional[int] = None) -> None:
        self.runner = runner
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

        sampler = Sampler(job.params, job.row_prompts, job.seeds, logits.shape[-1],
                          self.device)
        proposer = self._proposer(job, sampler, logits.shape[-1])
        stops = StopStrings(job.stops)
        # Position of the token each row's next column of logits scores.
        scoring = [len(p) for p in job.row_prompts]
        columns, proposal = [(logits, fwd)], None
        while not done:
            changed = self._walk(job, seqs, sampler, stops, columns, proposal, proposer,
                                 scoring)
            timings.setdefault("first_token", time.perf_counter())
            done = all(s.finished for s in seqs)
            if done:
                timings["end"] = time.perf_counter()
            yield Update(changed, dict(timings), done=done)
            if not done:
                columns, proposal = self._feed(job, seqs, proposer, scoring, state)

    # ------------------------------------------------------------------- a step, and a walk

    def _feed(self, job: Job, seqs: list[Sequence], proposer: Any, scoring: list[int],
              state: Any) -> tuple[list[tuple[torch.Tensor, Forward]], Optional[Proposal]]:
        """Run each row's pending token (its last), after it the proposer's guesses if
        any: the columns of logits (and forward outputs) the next walk emits from."""
        going = [r for r, s in enumerate(seqs) if not s.finished]
        pending = [s.ids[-1] if s.ids else 0 for s in seqs]
        at = [scoring[r] - 1 for r in range(len(seqs))]      # the pending tokens' positions
        active = torch.tensor([not s.finished for s in seqs], device=self.device)
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
            fwd = self.runner.decode(state, torch.tensor(pending, device=self.device), at,
                                     active, job.capture.layers)
            return [(fwd.logits, fwd)], None
        fed = [[pending[r]] + g + [0] * (width - len(g)) if not seqs[r].finished
               else [0] * (width + 1) for r, g in enumerate(proposal.tokens)]
        starts = [a if not s.finished else 0 for a, s in zip(at, seqs)]
        fwd = self.runner.extend(state, torch.tensor(fed, device=self.device), starts, active,
                                 job.capture.layers)
        return [(fwd.logits[:, j], fwd.column(j)) for j in range(width + 1)], proposal

    def _walk(self, job: Job, seqs: list[Sequence], sampler: Sampler, stops: StopStrings,
              columns: list[tuple[torch.Tensor, Forward]], proposal: Optional[Proposal],
              proposer: Any, scoring: list[int]) -> tuple[RowUpdate, ...]:
        """Emit tokens from the columns: every unfinished row takes a token from the first;
        a row whose token equals its guess for that column takes one from the next too,
        and so on. So each row emits its accepted guesses and one token more: with guesses
        from a prediction or n-grams, the very tokens plain decoding draws from those logits
        with those random numbers; with a draft's, tokens of the same distribution (the
        sampler's accept rule). The step's record goes on its last token.

        Choosing is column by column (the sampler's state moves with each token); what is
        recorded of the chosen tokens (`_score`) is computed once for the whole step."""
        guesses = proposal.tokens if proposal else [[] for _ in seqs]
        chosen: dict[int, list[int]] = {r: [] for r, s in enumerate(seqs) if not s.finished}
        going, drawn = set(chosen), []
        for j, (logits, _) in enumerate(columns):
            rows = sorted(going)
            if not rows:
                break
            active = torch.zeros(len(seqs), dtype=torch.bool, device=self.device)
            active[rows] = True
            proposed = q = None
            if proposal is not None and j < len(columns) - 1:
                proposed = torch.tensor([g[j] if j < len(g) else 0 for g in guesses],
                                        device=self.device)
                q = None if proposal.q is None else proposal.q[:, j]
            tokens, sampling_lp = sampler.sample(logits, active, proposed, q)
            sampler.update(tokens, active)
            drawn.append((tokens, sampling_lp))
            ids = tokens.tolist()
            for r in rows:
                s, g = seqs[r], guesses[r]
                if self._append(job, s, stops, Token(ids[r], self.pieces[ids[r]])):
                    chosen[r].append(j)
                if not (j < len(g) and ids[r] == g[j]) or s.finished:
                    going.discard(r)
        scored = self._score_chosen(job.capture, columns, drawn, chosen)
        target_lp = self._guess_logprobs(job.capture, columns, guesses)
        for r, tokens in scored.items():
            g = guesses[r]
            accepted = sum(1 for j in chosen[r] if j < len(g) and tokens[j].id == g[j])
            for j in chosen[r][:accepted]:
                tokens[j] = dataclasses.replace(tokens[j], source=proposer.source)
            if g and chosen[r]:         # the step's record, on the last token it emitted
                last = chosen[r][-1]
                tokens[last] = dataclasses.replace(tokens[last], verify=Verify(
                    proposer.source, scoring[r], tuple(g), accepted,
                    accepted < len(chosen[r]) and last < len(g),
                    tuple(target_lp[r][:len(g)]) if target_lp else (),
                    tuple(proposal.draft_logprobs[r]) if proposal.draft_logprobs else ()))
            scoring[r] += len(chosen[r])
        return tuple(RowUpdate(r, tuple(scored[r][j] for j in chosen[r]),
                               seqs[r].finish_reason, seqs[r].stop_at) for r in chosen)

    def _score_chosen(self, capture: Capture, columns: list[tuple[torch.Tensor, Forward]],
                      drawn: list[tuple[torch.Tensor, torch.Tensor]],
                      chosen: dict[int, list[int]]) -> dict[int, dict[int, Token]]:
        """Each row's chosen tokens, by column, scored in one `_score` call."""
        picks = [(j, r) for r in chosen for j in chosen[r]]
        picks.sort()
        logits, tokens, lps, fwds = [], [], [], []
        for j in sorted({j for j, _ in picks}):
            rows = [r for k, r in picks if k == j]
            index = torch.tensor(rows, device=self.device)
            logits.append(columns[j][0][index])
            tokens.append(drawn[j][0][index])
            lps.append(drawn[j][1][index])
            fwds.append(columns[j][1].select(rows))
        out: dict[int, dict[int, Token]] = {r: {} for r in chosen}
        if not picks:
            return out
        new = self._score(capture, torch.cat(logits), torch.cat(tokens), torch.cat(lps),
                          concat(fwds))
        for (j, r), token in zip(picks, new):
            out[r][j] = token
        return out

    @staticmethod
    def _guess_logprobs(capture: Capture, columns: list[tuple[torch.Tensor, Forward]],
                        guesses: list[list[int]]) -> Optional[list[list[float]]]:
        """Each guess's raw logprob at its column, when the request asks for scores."""
        width = len(columns) - 1
        if not capture.scores or width == 0:
            return None
        logp = torch.stack([c[0] for c in columns[:width]], 1).log_softmax(-1)
        padded = torch.tensor([g + [0] * (width - len(g)) for g in guesses],
                              device=logp.device)
        return logp.gather(2, padded[..., None])[..., 0].tolist()

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
        fwd = self._forward_chunks(state, row, ids, cached, job.capture.layers)
        if self.reuses_prefix and job.cache_max_len != 0:
            upto = len(ids) if job.cache_max_len is None else min(len(ids), job.cache_max_len)
            self.prefix_cache.store(job.cache_key, ids, upto,
                                    lambda a, b: self.runner.read_kv(state, row, a, b))
        # positions whose logits are needed: those that score echoed tokens, and the last
        first = max(echo_from - 1, 0) if job.echo[i] else len(ids) - 1
        logits = self.runner.logits(fwd.hidden[first - cached:])
        echo = self._score_echo(job.capture, ids, echo_from, first, cached, fwd, logits)
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

    def _score_echo(self, capture: Capture, ids: tuple[int, ...], echo_from: int, first: int,
                    cached: int, fwd: Forward, logits: torch.Tensor) -> tuple[Token, ...]:
        """Echoed prompt tokens with their raw logprobs (and captures); position 0 has no
        context to be scored in."""
        if echo_from >= len(ids):
            return ()
        head = (Token(ids[0], self.pieces[ids[0]]),) if echo_from == 0 else ()
        scored = range(max(echo_from, 1), len(ids))
        if not scored:
            return head
        # row k of `logits` scores ids[first + k + 1]; fwd row j - 1 - cached produced it
        rows = [j - 1 - first for j in scored]
        tokens = torch.tensor(ids[scored.start:], device=logits.device)
        at = fwd.select([j - 1 - cached for j in scored])
        return head + tuple(self._score(capture, logits[rows], tokens, None, at))

    # ---------------------------------------------------------------------------- a step

    def _score(self, capture: Capture, logits: torch.Tensor, tokens: torch.Tensor,
               sampling_lp: Optional[torch.Tensor], fwd: Forward) -> list[Token]:
        """Tokens [N] scored by logits [N, vocab] from the forward rows `fwd` that produced
        them: only what `capture` asks for, brought to the host in one transfer."""
        ids = tokens.tolist()
        if not (capture.scores or capture.top_n or capture.hidden or capture.routing
                or capture.layers):
            return [Token(t, self.pieces[t]) for t in ids]
        raw = logits.log_softmax(-1)
        token_lp = raw.gather(1, tokens[:, None])[:, 0]
        columns = [token_lp, (raw > token_lp[:, None]).sum(-1).to(raw.dtype) + 1,
                   -(raw.exp() * raw).nan_to_num().sum(-1)]
        if sampling_lp is not None:
            columns.append(sampling_lp)
        top = raw.topk(capture.top_n, dim=-1) if capture.top_n else None
        if top is not None:
            columns += [top.values.T, top.indices.T.to(raw.dtype)]
        host = torch.cat([c.reshape(-1, len(ids)) for c in columns]).T.tolist()
        out = []
        for k, (t, row) in enumerate(zip(ids, host)):
            tops = row[4:] if sampling_lp is not None else row[3:]
            out.append(Token(
                t, self.pieces[t], logprob=row[0],
                sampling_logprob=row[3] if sampling_lp is not None else None,
                top_ids=tuple(int(x) for x in tops[capture.top_n:]),
                top_logprobs=tuple(tops[:capture.top_n]), rank=int(row[1]), entropy=row[2],
                hidden=fwd.hidden[k] if capture.hidden else None,
                experts=fwd.experts[k] if capture.routing and fwd.experts is not None
                else None,
                weights=fwd.weights[k] if capture.routing and fwd.weights is not None
                else None,
                layers=fwd.layers[k] if fwd.layers is not None else None))
        return out

    def _append(self, job: Job, s: Sequence, stops: StopStrings, token: Token) -> bool:
        """Add a row's new token; finish the row on EOS, a stop string or its length.
        False for an EOS that finishes the row: it is not part of the choice."""
        if token.id in job.eos_ids and not job.ignore_eos:
            s.finish_reason = "stop"
            return False
        s.ids.append(token.id)
        before = len(s.text.text)
        s.text.add(token.piece)
        hit = stops.find(s.text.text, before)
        if hit is not None:
            s.stop_at, s.finish_reason = hit, "stop"
        elif s.generated >= s.max_new:
            s.finish_reason = "length"
        return True
