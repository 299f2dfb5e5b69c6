"""What is recorded of each token: its raw logprob, rank and entropy, the alternatives, the
tracked tokens' logprobs and the captured activations, computed on the device for a whole
step (or a prompt's echo) at once and brought to the host in one transfer."""
from __future__ import annotations

from typing import Optional

import torch

from .outputs import Capture, Token
from .runner import Forward, stack
from .transfer import to_device


def score(pieces: list[bytes], capture: Capture, logits: torch.Tensor, tokens: torch.Tensor,
          sampling_lp: Optional[torch.Tensor], fwd: Forward,
          ids: Optional[list[int]] = None) -> list[Token]:
    """Tokens [N] scored by logits [N, vocab] from the forward rows `fwd` that produced
    them: only what `capture` asks for, brought to the host in one transfer (and one
    per kind of activation). `ids` are the tokens' ids where the host knows them."""
    ids = tokens.tolist() if ids is None else ids
    if not capture.any:
        return [Token(t, pieces[t]) for t in ids]
    raw = logits.log_softmax(-1)
    token_lp = raw.gather(1, tokens[:, None])[:, 0]
    # (entropy: a token of probability 0 adds 0 * finite, not 0 * -inf)
    columns = [token_lp, (raw > token_lp[:, None]).sum(-1).to(raw.dtype) + 1,
               -(raw.exp() * raw.clamp_min(torch.finfo(raw.dtype).min)).sum(-1)]
    if sampling_lp is not None:
        columns.append(sampling_lp)
    top = raw.topk(capture.top_n, dim=-1) if capture.top_n else None
    if top is not None:
        columns += [top.values.T, top.indices.T.to(raw.dtype)]
    tracked = len(capture.tracked)
    if tracked:
        columns.append(raw[:, list(capture.tracked)].T)
    host = torch.cat([c.reshape(-1, len(ids)) for c in columns]).T.tolist()
    on_host = lambda t, wanted: t.cpu() if wanted and t is not None else None
    hidden, layers = on_host(fwd.hidden, capture.hidden), on_host(fwd.layers, True)
    experts = on_host(fwd.experts, capture.routing)
    weights = on_host(fwd.weights, capture.routing)
    out = []
    for k, (t, row) in enumerate(zip(ids, host)):
        tops = row[4:len(row) - tracked] if sampling_lp is not None \
            else row[3:len(row) - tracked]
        out.append(Token(
            t, pieces[t], logprob=row[0],
            sampling_logprob=row[3] if sampling_lp is not None else None,
            top_ids=tuple(int(x) for x in tops[capture.top_n:]),
            top_logprobs=tuple(tops[:capture.top_n]), rank=int(row[1]), entropy=row[2],
            hidden=None if hidden is None else hidden[k],
            experts=None if experts is None else experts[k],
            weights=None if weights is None else weights[k],
            layers=None if layers is None else layers[k],
            tracked=tuple(row[len(row) - tracked:]) if tracked else ()))
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
        new = score(pieces, capture, pick([c[0] for c in columns]),
                    pick([d[0] for d in drawn]), pick([d[1] for d in drawn]), fwd, picked_ids)
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
    return head + tuple(score(pieces, capture, logits[rows], tokens, None, at))


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
