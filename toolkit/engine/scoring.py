"""What is recorded of each token: its raw logprob, rank and entropy, the alternatives, the
tracked tokens' logprobs and the captured activations, computed on the device for a whole
run of steps (or a prompt's echo) at once and sent to the host in one transfer."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .outputs import Capture, Token
from .runner import Forward, stack
from .transfer import ToHost, to_device


class Scores:
    """What `capture` asks of N drawn tokens (ids [N], logits [N, vocab] and the forward
    rows `fwd` that produced them; the logits are needed only if it asks for any),
    computed on the device as soon as they are drawn and queued to the host in one
    transfer. Reading them (`ids`, `tokens`) waits for that transfer alone: a run of
    decode steps is scored before the next run is queued, and read while the device
    computes it."""

    def __init__(self, capture: Capture, logits: Optional[torch.Tensor],
                 tokens: torch.Tensor, sampling_lp: Optional[torch.Tensor],
                 fwd: Forward) -> None:
        self.capture = capture
        self.sampling = sampling_lp is not None
        packed = None
        if capture.any:
            raw = logits.log_softmax(-1)
            token_lp = raw.gather(1, tokens[:, None])[:, 0]
            # (entropy: a token of probability 0 adds 0 * finite, not 0 * -inf)
            columns = [token_lp, (raw > token_lp[:, None]).sum(-1).to(raw.dtype) + 1,
                       -(raw.exp() * raw.clamp_min(torch.finfo(raw.dtype).min)).sum(-1)]
            if sampling_lp is not None:
                columns.append(sampling_lp)
            if capture.top_n:
                top = raw.topk(capture.top_n, dim=-1)
                columns += [top.values.T, top.indices.T.to(raw.dtype)]
            if capture.tracked:
                columns.append(raw[:, to_device(capture.tracked, raw.device)].T)
            packed = torch.cat([c.reshape(-1, len(tokens)) for c in columns])
        wanted = lambda t, want: t if want else None
        self._host = ToHost([tokens, packed, wanted(fwd.hidden, capture.hidden),
                             wanted(fwd.layers, capture.layers),
                             wanted(fwd.experts, capture.routing),
                             wanted(fwd.weights, capture.routing)])
        self._ids: Optional[list[int]] = None
        self._rows: Optional[list[list[float]]] = None

    @classmethod
    def of_run(cls, capture: Capture, columns: list[tuple[torch.Tensor, Forward]],
               drawn: list[tuple[torch.Tensor, torch.Tensor]]) -> "Scores":
        """The scores of a run of steps, [steps * rows]: column j (logits, forward) scored
        the tokens drawn at step j (tokens, sampling logprobs). Only what `capture` asks
        for is gathered."""
        flat = lambda ts, want=True: torch.stack(ts).flatten(0, 1) if want else None
        part = lambda name, want: flat([getattr(c[1], name) for c in columns], want)
        fwd = Forward(part("hidden", capture.hidden), part("experts", capture.routing),
                      part("weights", capture.routing), part("layers", bool(capture.layers)))
        return cls(capture, flat([c[0] for c in columns], capture.any),
                   flat([d[0] for d in drawn]), flat([d[1] for d in drawn], capture.any), fwd)

    def ids(self) -> list[int]:
        """The tokens' ids."""
        if self._ids is None:
            self._ids = self._host.get()[0].tolist()
        return self._ids

    def tokens(self, pieces: list[bytes], picks: Optional[Sequence[int]] = None
               ) -> list[Token]:
        """The tokens at `picks` (default: all), with what was recorded of them."""
        ids = self.ids()
        picks = range(len(ids)) if picks is None else picks
        if not self.capture.any:
            return [Token(ids[k], pieces[ids[k]]) for k in picks]
        _, packed, hidden, layers, experts, weights = self._host.get()
        if self._rows is None:
            self._rows = packed.T.tolist()
        n, base = self.capture.top_n, 4 if self.sampling else 3
        tracked = base + 2 * n          # where the tracked tokens' logprobs begin
        out = []
        for k in picks:
            t, row = ids[k], self._rows[k]
            out.append(Token(
                t, pieces[t], logprob=row[0],
                sampling_logprob=row[3] if self.sampling else None,
                top_ids=tuple(map(int, row[base + n:tracked])),
                top_logprobs=tuple(row[base:base + n]), rank=int(row[1]), entropy=row[2],
                hidden=None if hidden is None else hidden[k],
                experts=None if experts is None else experts[k],
                weights=None if weights is None else weights[k],
                layers=None if layers is None else layers[k],
                tracked=tuple(row[tracked:])))
        return out


def score_chosen(pieces: list[bytes], device: torch.device, capture: Capture,
                 columns: list[tuple[torch.Tensor, Forward]],
                 drawn: list[tuple[torch.Tensor, torch.Tensor]], ids: list[list[int]],
                 chosen: dict[int, list[int]]) -> dict[int, dict[int, Token]]:
    """Each row's chosen tokens, by column, scored in one `score` call: the picks'
    places go to the device in one transfer. `ids` are the drawn tokens, by column,
    as the host has them. Without captures, the tokens are their ids alone: nothing goes
    to the device."""
    picks = sorted((j, r) for r in chosen for j in chosen[r])
    picked_ids = [ids[j][r] for j, r in picks]
    if not capture.any or not picks:
        new = [Token(t, pieces[t]) for t in picked_ids]
    else:
        width = picks[-1][0] + 1
        js, rs = to_device(picks, device).T
        pick = lambda ts: ts[0][rs] if width == 1 else torch.stack(ts[:width])[js, rs]
        fwd = (columns[0][1].select(rs) if width == 1 else
               stack([c[1] for c in columns[:width]]).select((js, rs)))
        new = Scores(capture, pick([c[0] for c in columns]), pick([d[0] for d in drawn]),
                     pick([d[1] for d in drawn]), fwd).tokens(pieces)
    out: dict[int, dict[int, Token]] = {r: {} for r in chosen}
    for (j, r), token in zip(picks, new):
        out[r][j] = token
    return out


def score_echo(pieces: list[bytes], capture: Capture, ids: tuple[int, ...], echo_from: int,
               first: int, cached: int, fwd: Forward, logits: torch.Tensor
               ) -> tuple[Token, ...]:
    """Echoed prompt tokens with their raw logprobs (and captures); position 0 has no
    context to be scored in."""
    if echo_from >= len(ids):
        return ()
    head = (Token(ids[0], pieces[ids[0]]),) if echo_from == 0 else ()
    scored = range(max(echo_from, 1), len(ids))
    if not scored:
        return head
    # row k of `logits` scores ids[first + k + 1]; fwd row j - 1 - cached produced it
    rows = [j - 1 - first for j in scored]
    tokens = torch.tensor(ids[scored.start:], device=logits.device)
    at = fwd.select([j - 1 - cached for j in scored])
    return head + tuple(Scores(capture, logits[rows], tokens, None, at).tokens(pieces))


def guess_logprobs(capture: Capture, columns: list[tuple[torch.Tensor, Forward]],
                   guesses: list[list[int]]) -> Optional[list[list[float]]]:
    """Each guess's raw logprob at its column, when the request asks for scores."""
    width = len(columns) - 1
    if not capture.scores or width == 0:
        return None
    logp = torch.stack([c[0] for c in columns[:width]], 1).log_softmax(-1)
    padded = torch.tensor([g + [0] * (width - len(g)) for g in guesses],
                          device=logp.device)
    return logp.gather(2, padded[..., None])[..., 0].tolist()
