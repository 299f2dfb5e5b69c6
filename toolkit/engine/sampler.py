"""Sampling: each knob a small step on a [rows, vocab] tensor of logits, with per-row values.

The steps run in the order of the hosted API (DESIGN §3): logit bias, repetition penalty,
frequency/presence penalties, temperature, then truncation (top-k, top-p, min-p, typical-p,
or Mirostat v2). Every step has a neutral value (bias 0, penalty 1, top_p 1, ...) that leaves
a row untouched, so rows with different settings share one batch, and a step no row uses is
skipped. `SamplingParams` holds those neutral values: the one place each default is written.

Randomness is counter-based: the uniform number a row draws for its k-th token is a hash of
(its seed, k), computed on the device for the whole batch at once. No generator state, no
host round trip per row, and a choice never depends on what else is in the batch, on the
device, or on a step being retried.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """One row's knobs, with the hosted API's neutral defaults."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    mirostat_target: Optional[float] = None
    mirostat_lr: float = 0.1
    logit_bias: dict[int, float] = field(default_factory=dict)

    @classmethod
    def from_fields(cls, values: dict[str, Any]) -> "SamplingParams":
        """From request fields, where None means "not set": the neutral default."""
        return cls(**{f.name: values[f.name] for f in fields(cls)
                      if values.get(f.name) is not None})


def default(knob: str) -> Any:
    """The neutral value of a knob."""
    return SamplingParams.__dataclass_fields__[knob].default


def row_seed(seed: int, prompt_index: int, choice: int) -> int:
    """A 63-bit seed for choice `choice` of prompt `prompt_index`."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{choice}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ------------------------------------------------------------------ the steps, in order

def apply_logit_bias(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return logits + bias


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Drop the tokens a grammar does not allow next."""
    return logits.masked_fill(~allowed, NEG_INF)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: torch.Tensor) -> torch.Tensor:
    """HF/CTRL semantics over prompt and output: a seen token's logit is divided by the
    penalty when positive and multiplied by it when negative."""
    p = penalty.clamp_min(1e-6)[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence(logits: torch.Tensor, counts: torch.Tensor,
                             frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """OpenAI semantics over the output only: minus count*frequency, minus presence once."""
    return logits - counts * frequency[:, None] - (counts > 0) * presence[:, None]


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide by the temperature. The row's maximum is subtracted first (softmax does not
    change), so the largest logit stays 0 however small the temperature: as it falls to
    zero the distribution narrows to the argmax instead of overflowing into inf - inf.
    Greedy rows (temperature 0) are left as they are; they take the argmax later."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    shifted = logits - logits.max(-1, keepdim=True).values
    return torch.where((temperature > 0)[:, None], shifted / t[:, None], logits)


def top_k_filter(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the k highest logits of each row (ties with the k-th kept); k=0 keeps all."""
    k = torch.where(k > 0, k, torch.full_like(k, logits.shape[-1])).clamp_max(logits.shape[-1])
    kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    before = probs.cumsum(-1) - probs                 # mass of the tokens ranked above
    drop_sorted = before >= top_p[:, None]
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop & (top_p[:, None] < 1), NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep tokens at least min_p times as likely as the most likely token."""
    probs = logits.softmax(-1)
    threshold = probs.max(-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, NEG_INF)


def typical_filter(logits: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy,
    until their mass reaches typical_p."""
    logp = logits.log_softmax(-1)
    probs = logp.exp()
    entropy = -(probs * logp.nan_to_num(neginf=0.0)).sum(-1, keepdim=True)
    distance = (-logp - entropy).abs()
    order = distance.argsort(dim=-1)
    sorted_probs = probs.gather(1, order)
    before = sorted_probs.cumsum(-1) - sorted_probs
    drop_sorted = before >= typical_p[:, None]
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop & (typical_p[:, None] < 1), NEG_INF)


def mirostat_filter(logits: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Mirostat v2 truncation: drop tokens whose surprise (-log2 p) exceeds the row's mu
    (the most likely token always stays). Rows with mu = inf are untouched."""
    surprise = -logits.log_softmax(-1) / math.log(2)
    drop = surprise > mu[:, None]
    drop.scatter_(1, logits.argmax(-1, keepdim=True), False)
    return logits.masked_fill(drop, NEG_INF)


# ----------------------------------------------------------------------------- randomness

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 torch stores (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
                                             0x94D049BB133111EB))


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """A float32 in [0, 1) per row from its int64 seed and draw counter: SplitMix64's
    output for state seed + (counter + 1) * golden-ratio constant (int64 arithmetic wraps,
    as SplitMix64 wants), top 24 bits. The same numbers on every device."""
    x = seeds + (counters + 1) * _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    return _shift_right(x, 40).float() * 2.0 ** -24


_ACCEPT_SALT = _signed(0xD1B54A32D192ED03)   # keeps speculative accept tests apart


def _draft_salt(depth: int) -> int:
    """The seed offset of a draft's depth-th proposal in a step."""
    return _signed((0x8CB92BA72F3D8DD7 * (depth + 1)) & _MASK64)


def draw(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling of one token per row of log-probs [rows, vocab] with the
    uniform numbers u [rows]. Never a token of probability zero: a draw that rounding
    pushes past the total mass falls back to the last token with any."""
    cdf = logp.exp().cumsum(-1)
    total = cdf[:, -1:].contiguous()
    drawn = torch.searchsorted(cdf, u[:, None] * total, right=True)
    return torch.minimum(drawn, torch.searchsorted(cdf, total))[:, 0]


# --------------------------------------------------------------------------- the sampler

class Sampler:
    """Turns a step's logits into one token per row, tracking the state some knobs need
    (token counts for penalties, Mirostat's mu, each row's draw counter)."""

    def __init__(self, params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]],
                 seeds: Sequence[int], vocab_size: int, device: torch.device) -> None:
        rows = len(params)
        self.vocab_size = vocab_size
        vec = lambda name, dtype=torch.float32: torch.tensor(
            [getattr(p, name) for p in params], dtype=dtype, device=device)
        self.temperature = vec("temperature")
        self.greedy = self.temperature == 0
        self.all_greedy = all(p.temperature == 0 for p in params)
        self.any_greedy = any(p.temperature == 0 for p in params)
        # a temperature of 1 changes nothing (softmax ignores the shift): no step for it
        self.scales = any(p.temperature not in (0, 1) for p in params)
        mirostat = [p.mirostat_target is not None for p in params]
        self.tau = torch.tensor([p.mirostat_target or 0.0 for p in params], device=device)
        self.lr = vec("mirostat_lr")
        self.mu = torch.where(torch.tensor(mirostat, device=device), 2 * self.tau,
                              torch.full((rows,), math.inf, device=device))
        self.use_mirostat = any(mirostat)
        # Mirostat replaces the truncation knobs on its rows: neutralise them there.
        neutral = lambda name, dtype=torch.float32: torch.tensor(
            [default(name) if m else getattr(p, name) for p, m in zip(params, mirostat)],
            dtype=dtype, device=device)
        self.top_k = neutral("top_k", torch.long)
        self.top_p = neutral("top_p")
        self.min_p = neutral("min_p")
        self.typical_p = neutral("typical_p")
        # Which steps any row uses: decided once per job, from the host-side values, so a
        # step never waits on the device to learn it.
        used = lambda name, off: any(getattr(p, name) != off and not m
                                     for p, m in zip(params, mirostat))
        self.uses = {"top_k": used("top_k", 0), "top_p": used("top_p", 1.0),
                     "min_p": used("min_p", 0.0), "typical_p": used("typical_p", 1.0)}
        self.repetition = vec("repetition_penalty")
        self.frequency = vec("frequency_penalty")
        self.presence = vec("presence_penalty")
        self.bias = None
        if any(p.logit_bias for p in params):
            self.bias = torch.zeros(rows, vocab_size, device=device)
            for r, p in enumerate(params):
                for token, value in p.logit_bias.items():
                    self.bias[r, token] = value
        self.seen = None
        if any(p.repetition_penalty != 1 for p in params):
            self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
            for r, prompt in enumerate(prompts):
                self.seen[r, list(prompt)] = True
        self.counts = None
        if any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params):
            self.counts = torch.zeros(rows, vocab_size, device=device)
        self.seeds = torch.tensor([_signed(s & _MASK64) for s in seeds], dtype=torch.long,
                                  device=device)
        self.draws = torch.zeros(rows, dtype=torch.long, device=device)

    def process(self, logits: torch.Tensor, allowed: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """The logits of the final sampling distribution (greedy rows: before temperature).
        `allowed` [rows, vocab] is a structured-output mask: the other tokens are dropped."""
        x = logits.float()
        if self.bias is not None:
            x = apply_logit_bias(x, self.bias)
        if allowed is not None:
            x = apply_mask(x, allowed)
        if self.seen is not None:
            x = apply_repetition_penalty(x, self.seen, self.repetition)
        if self.counts is not None:
            x = apply_frequency_presence(x, self.counts, self.frequency, self.presence)
        if self.all_greedy:
            return x
        if self.scales:
            x = apply_temperature(x, self.temperature)
        if self.uses["top_k"]:
            x = top_k_filter(x, self.top_k)
        if self.uses["top_p"]:
            x = top_p_filter(x, self.top_p)
        if self.uses["min_p"]:
            x = min_p_filter(x, self.min_p)
        if self.uses["typical_p"]:
            x = typical_filter(x, self.typical_p)
        if self.use_mirostat:
            x = mirostat_filter(x, self.mu)
        return x

    def sample(self, logits: torch.Tensor, active: Optional[torch.Tensor] = None,
               proposed: Optional[torch.Tensor] = None, q: Optional[torch.Tensor] = None,
               allowed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [rows] and their log-probabilities under the sampling distribution
        (0.0 for greedy rows, which the distribution puts all its mass on). Only `active`
        rows (default: all) take a draw or move Mirostat's state.

        With `proposed` tokens [rows] drawn by a draft from its distributions `q` [rows,
        vocab], the standard speculative rule decides instead: keep the proposal with
        probability min(1, p/q), else draw from the normalised residual max(0, p - q); the
        token then follows p exactly. A proposal without `q` (a prediction, an n-gram) needs
        no rule: the draw from p is the same one plain decoding takes, and the proposal is
        accepted when it equals it, with probability p(proposal), as DESIGN §3 asks.
        `allowed` masks the tokens (structured output; see `process`)."""
        x = self.process(logits, allowed)
        active = torch.ones_like(self.greedy) if active is None else active
        if self.all_greedy:
            return x.argmax(-1), torch.zeros(len(x), device=x.device)
        logp = x.log_softmax(-1)
        u = uniform(self.seeds, self.draws)
        if q is None:
            drawn = draw(logp, u)
        else:
            p = logp.exp()
            p_d, q_d = p.gather(1, proposed[:, None])[:, 0], q.gather(1, proposed[:, None])[:, 0]
            keep = uniform(self.seeds ^ _ACCEPT_SALT, self.draws) * q_d < p_d
            residual = (p - q).clamp_min(0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
            drawn = torch.where(keep, proposed, draw(residual.log(), u))
        self.draws += active
        tokens = torch.where(self.greedy, x.argmax(-1), drawn) if self.any_greedy else drawn
        sampling_logprob = logp.gather(1, tokens[:, None])[:, 0]
        if self.any_greedy:
            sampling_logprob = sampling_logprob.where(~self.greedy, 0.0)
        if self.use_mirostat:
            surprise = -sampling_logprob / math.log(2)
            self.mu = torch.where(torch.isfinite(self.mu) & active,
                                  self.mu - self.lr * (surprise - self.tau), self.mu)
        return tokens, sampling_logprob

    def propose(self, logits: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A draft's proposal for each row from its logits [rows, vocab], processed by this
        sampler's knobs: (tokens [rows], their distributions q [rows, vocab]). Greedy rows
        propose their argmax. `depth` (the proposal's place in the step) keeps the draws of
        a step's proposals apart from each other and from the target's."""
        x = self.process(logits)
        argmax = x.argmax(-1)
        if self.all_greedy:
            return argmax, torch.zeros_like(x).scatter_(1, argmax[:, None], 1.0)
        logp = x.log_softmax(-1)
        drawn = draw(logp, uniform(self.seeds ^ _draft_salt(depth), self.draws))
        return torch.where(self.greedy, argmax, drawn), logp.exp()

    def update(self, tokens: torch.Tensor, active: Optional[torch.Tensor] = None) -> None:
        """Record the tokens just emitted by `active` rows (default: all), for the
        penalties of later steps. (Inactive rows are masked, not left out: picking them
        out would make the host wait for the device.)"""
        rows = torch.arange(len(tokens), device=tokens.device)
        if self.seen is not None:
            self.seen[rows, tokens] |= True if active is None else active
        if self.counts is not None:
            self.counts[rows, tokens] += 1.0 if active is None else active.float()
