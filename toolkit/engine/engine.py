"""The decode loop: prefill each prompt once, fork its KV to its n choices, then one token
per row per step until every row has finished.

`Engine.run(job)` is a generator: it yields the rows that changed after each step, so the
same loop serves whole responses and streams. Everything a request allocates (KV cache,
sampler state) lives in the generator's frame, so closing it early — or an interrupt —
leaves nothing behind; only the prefix cache outlives a request, and it only ever holds
complete prompt blocks.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterator, Optional

import torch

from ..models import ModelInfo
from .prefix_cache import PrefixCache
from .runner import Forward, make_runner
from .sampler import Sampler
from .sequence import Job, Sequence, TokenLog
from .text import StopStrings, token_bytes_table


class Engine:
    def __init__(self, model: Any, tokenizer: Any, info: ModelInfo,
                 prefix_cache_bytes: int = 256 * 2**20, lean_forward: bool = True,
                 compile: Optional[bool] = None) -> None:
        self.info = info
        self.runner = make_runner(model, info, lean_forward, compile)
        self.pieces = token_bytes_table(tokenizer)
        self.device = next(model.parameters()).device
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.lock = threading.Lock()       # one request at a time runs the model
        self.waiting = 0                   # requests queued or running

    def run(self, job: Job) -> Iterator[list[Sequence]]:
        """Yield, after the prefill and after each decode step, the rows that changed."""
        self.waiting += 1
        try:
            arrived = time.perf_counter()
            with self.lock, torch.inference_mode():
                job.timings["queue"] = time.perf_counter() - arrived
                yield from self._run(job)
        finally:
            self.waiting -= 1

    def _run(self, job: Job) -> Iterator[list[Sequence]]:
        n, rows = job.n, job.rows
        seqs = [Sequence(index=r, prompt_index=r // n, choice=r % n,
                         max_new=job.max_new[r // n]) for r in range(rows)]
        longest = max(len(p) + m for p, m in zip(job.prompts, job.max_new))
        state = self.runner.start(rows, min(longest, max(map(len, job.prompts)) + 64))
        # What scored each row's next token: logits, and the hidden state and routing of
        # the position that produced them (reported with the token).
        last: list[Forward] = []
        logits = []
        job.timings["prefill_start"] = time.perf_counter()
        for i, ids in enumerate(job.prompts):
            fwd, first_logits = self._prefill(job, state, i, ids)
            self.runner.fork(state, i * n, list(range(i * n + 1, (i + 1) * n)), len(ids))
            last += [fwd] * n
            logits += [first_logits] * n
        logits = torch.stack(logits)
        scored = Forward(*(None if getattr(last[0], f) is None else
                           torch.stack([getattr(x, f) for x in last])
                           for f in ("hidden", "experts", "weights", "layers")))
        job.timings["prefill_end"] = time.perf_counter()

        for s in seqs:
            if s.max_new == 0:
                s.finish_reason = "length"
        yield seqs

        sampler = Sampler(job.params, [job.prompts[r // n] for r in range(rows)], job.seeds,
                          logits.shape[-1], self.device)
        stops = StopStrings(job.stops)
        positions = torch.tensor([len(job.prompts[r // n]) for r in range(rows)],
                                 device=self.device)
        job.timings["decode_start"] = time.perf_counter()
        while True:
            active = [s for s in seqs if not s.finished]
            if not active:
                break
            tokens, sampling_lp = sampler.sample(logits)
            sampler.update(tokens)
            host = self._to_host(logits.log_softmax(-1), tokens, sampling_lp, job.top_n)
            for s in active:
                self._append(job, s, stops, host, _captured(job, scored, s.index))
            job.timings.setdefault("first_token", time.perf_counter())
            yield active
            mask = torch.tensor([not s.finished for s in seqs], device=self.device)
            if not bool(mask.any()):
                break
            fwd = self.runner.decode(state, tokens, positions, mask, job.activation_layers)
            positions = positions + mask
            logits, scored = fwd.logits, fwd
        job.timings["end"] = time.perf_counter()

    def _prefill(self, job: Job, state: Any, i: int, ids: list[int]
                 ) -> tuple[Forward, torch.Tensor]:
        """Prefill prompt i into its first row; score its echoed tokens. Returns the last
        position's forward output and logits (which pick the first generated token)."""
        row, echo_from = i * job.n, len(ids) - job.echo[i]
        cached = self._reuse_prefix(job, state, row, ids, echo_from)
        fwd = self.runner.prefill(state, row, ids[cached:], cached, job.activation_layers)
        if self.runner.supports_prefix_cache and job.cache_max_len != 0:
            upto = len(ids) if job.cache_max_len is None else min(len(ids), job.cache_max_len)
            self.prefix_cache.store(job.cache_key, ids, upto,
                                    lambda a, b: self.runner.read_kv(state, row, a, b))
        job.cached_tokens.append(cached)
        # positions whose logits are needed: those that score echoed tokens, and the last
        first = max(echo_from - 1, 0) if job.echo[i] else len(ids) - 1
        logits = self.runner.logits(fwd.hidden[first - cached:])
        job.echoes.append(self._score_echo(job, ids, echo_from, first, cached, fwd, logits))
        at = lambda t: None if t is None else t[-1]
        return Forward(fwd.hidden[-1], at(fwd.experts), at(fwd.weights), at(fwd.layers)), \
            logits[-1]

    def _reuse_prefix(self, job: Job, state: Any, row: int, ids: list[int],
                      echo_from: int) -> int:
        """Load the longest cached prefix we may skip: never the last prompt token (its
        logits pick the first new token) nor a position that scores an echoed token."""
        if not self.runner.supports_prefix_cache or job.cache_max_len == 0:
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

    def _score_echo(self, job: Job, ids: list[int], echo_from: int, first: int, cached: int,
                    fwd: Forward, logits: torch.Tensor) -> TokenLog:
        """Raw logprobs (and captures) of echoed prompt tokens; position 0 has no context."""
        log = TokenLog()
        if echo_from >= len(ids):
            return log
        if echo_from == 0:
            log.add(ids[0], self.pieces[ids[0]], None, None, ([], []))
        scored = range(max(echo_from, 1), len(ids))
        if scored:
            # row k of `logits` scores ids[first + k + 1]
            raw = logits[[j - 1 - first for j in scored]].log_softmax(-1)
            host = self._to_host(raw, torch.tensor(ids[scored.start:], device=raw.device),
                                 None, job.top_n)
            for k, j in enumerate(scored):
                log.add(ids[j], self.pieces[ids[j]], host["logprob"][k], None,
                        (host["top_ids"][k], host["top_lp"][k]), host["rank"][k],
                        host["entropy"][k], *_captured(job, fwd, j - 1 - cached))
        return log

    @staticmethod
    def _to_host(raw: torch.Tensor, tokens: torch.Tensor, sampling_lp: Optional[torch.Tensor],
                 top_n: int) -> dict[str, list]:
        """Score `tokens` under raw log-probs [rows, vocab] (logprob, rank, entropy of the
        distribution, top alternatives) and bring it all to the host in one go."""
        token_lp = raw.gather(1, tokens[:, None])[:, 0]
        top = raw.topk(top_n, dim=-1) if top_n else None
        empty = [[] for _ in range(len(tokens))]
        return {"tokens": tokens.tolist(), "logprob": token_lp.tolist(),
                "sampling": None if sampling_lp is None else sampling_lp.tolist(),
                "rank": ((raw > token_lp[:, None]).sum(-1) + 1).tolist(),
                "entropy": (-(raw.exp() * raw).sum(-1)).tolist(),
                "top_ids": top.indices.tolist() if top is not None else empty,
                "top_lp": top.values.tolist() if top is not None else empty}

    def _append(self, job: Job, s: Sequence, stops: StopStrings, host: dict[str, list],
                captured: tuple) -> None:
        r = s.index
        token = host["tokens"][r]
        if token in job.eos_ids and not job.ignore_eos:
            s.finish_reason = "stop"        # EOS ends the choice; it is not part of it
            return
        before = len(s.out.text.text)
        s.out.add(token, self.pieces[token], host["logprob"][r], host["sampling"][r],
                  (host["top_ids"][r], host["top_lp"][r]), host["rank"][r],
                  host["entropy"][r], *captured)
        hit = stops.find(s.out.text.text, before)
        if hit is not None:
            s.stop_at, s.finish_reason = hit, "stop"
        elif len(s.out) >= s.max_new:
            s.finish_reason = "length"
        if s.finished:
            s.out.text.finish()


def _captured(job: Job, fwd: Forward, i: int) -> tuple[Optional[torch.Tensor], ...]:
    """(hidden, experts, router weights, tapped layers) at index i of a forward, where the
    job asks for them."""
    hidden = fwd.hidden[i] if job.capture_hidden else None
    layers = fwd.layers[i] if fwd.layers is not None else None
    if not job.capture_routing or fwd.experts is None:
        return hidden, None, None, layers
    return hidden, fwd.experts[i], fwd.weights[i], layers
