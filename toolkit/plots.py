"""Matplotlib figures from frames. Each function takes a response (or the frame it needs)
and returns the `Figure`, drawing nothing globally, so notebooks show it and tests save it.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Union

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from . import frames
from .display import visible

Frameable = Union[pd.DataFrame, Any]


def _frame(data: Frameable, make: Any, what: str) -> pd.DataFrame:
    """The frame a plot draws; an empty one is an error naming what to ask for, rather
    than a blank figure."""
    with warnings.catch_warnings():       # the error below says it, once
        warnings.simplefilter("ignore", frames.EmptyFrameWarning)
        frame = data if isinstance(data, pd.DataFrame) else make(data)
    if frame.empty:
        raise ValueError(f"nothing to plot: the response has no {what}")
    return frame


def _ink(image: Any, value: float) -> str:
    """Black text on the bright end of a colour map, white on the dark end."""
    low, high = image.get_clim()
    return "k" if high > low and (value - low) / (high - low) > 0.6 else "w"


def logprob_strip(data: Frameable, choice: int = 0, per_row: int = 16) -> Figure:
    """The tokens of a choice in reading order, each cell coloured by its logprob."""
    tok = _frame(data, frames.tokens, "logprobs (ask for logprobs=True)")
    tok = tok[tok.choice == choice].reset_index(drop=True)
    rows = max(1, -(-len(tok) // per_row))
    grid = np.full((rows, per_row), np.nan)
    grid.flat[:len(tok)] = tok.logprob.to_numpy(dtype=float)
    fig = Figure(figsize=(per_row * 0.75, rows * 0.5 + 0.8))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=min(-8.0, np.nanmin(grid, initial=0)), vmax=0,
                      aspect="auto")
    for k, token in enumerate(tok.token):
        ax.text(k % per_row, k // per_row, visible(token)[:8], ha="center", va="center",
                fontsize=7)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(f"choice {choice}: logprob of each token")
    fig.colorbar(image, ax=ax, label="logprob", fraction=0.03)
    return fig


def top_k_heatmap(data: Frameable, choice: int = 0) -> Figure:
    """Positions x rank: the logprob of each top alternative, labelled with its token."""
    top = _frame(data, frames.top_logprobs,
                 "top logprobs (ask for logprobs=True and top_logprobs=1..5)")
    top = top[top.choice == choice]
    table = top.pivot(index="rank", columns="position", values="logprob")
    labels = top.pivot(index="rank", columns="position", values="token")
    fig = Figure(figsize=(max(4, 0.95 * table.shape[1]), 0.5 * len(table) + 1.2))
    ax = fig.add_subplot()
    image = ax.imshow(table.to_numpy(dtype=float), cmap="viridis", aspect="auto")
    values = table.to_numpy(dtype=float)
    for (r, p), token in np.ndenumerate(labels.to_numpy()):
        if isinstance(token, str):
            shown = visible(token)
            ax.text(p, r, shown if len(shown) <= 9 else shown[:8] + "…", ha="center",
                    va="center", fontsize=6.5, family="monospace",
                    color=_ink(image, values[r, p]))
    ax.set_xticks(range(table.shape[1]), table.columns)
    ax.set_yticks(range(len(table)), table.index)
    ax.set_xlabel("position"), ax.set_ylabel("rank")
    ax.set_title(f"choice {choice}: top alternatives")
    fig.colorbar(image, ax=ax, label="logprob", fraction=0.03)
    return fig


def entropy_curve(data: Frameable, max_labels: int = 48) -> Figure:
    """Entropy of the next-token distribution along each choice, with the chosen token's
    surprise (-logprob) for comparison. Positions are whole numbers; for one choice of up
    to `max_labels` tokens, each is labelled with its token."""
    tok = _frame(data, frames.tokens, "logprobs (ask for logprobs=True)")
    fig = Figure(figsize=(max(7.0, 0.22 * len(tok)), 3.4))
    ax = fig.add_subplot()
    for choice, rows in tok.groupby("choice"):
        line, = ax.plot(rows.position, rows.entropy, label=f"entropy, choice {choice}")
        ax.plot(rows.position, -rows.logprob, ":", color=line.get_color(),
                label=f"surprise, choice {choice}")
    if tok.choice.nunique() == 1 and len(tok) <= max_labels:
        ax.set_xticks(tok.position, [visible(t)[:10] for t in tok.token], rotation=90,
                      fontsize=7, family="monospace")
        ax.set_xlabel("token (by position)")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("position")
    ax.set_ylabel("nats")
    ax.legend(fontsize=7, ncol=2)
    return fig


def acceptance(resp: Any, choice: int = 0, per_row: int = 16, max_rows: int = 12) -> Figure:
    """Speculation at a glance: above, the acceptance rate by proposal position (of the
    steps that proposed a token there, the share that kept it; and given every earlier
    proposal was kept); below, the first `max_rows` rows of a choice's tokens in reading
    order, green where accepted from a proposal, orange where the model replaced a
    rejected proposal, grey where it chose alone (a step's bonus token, or no proposal)."""
    steps = _frame(resp, frames.speculation, "speculative steps (give a prediction, or load "
                   "with draft_model= or ngram_speculation=True)")
    rates = frames.acceptance(steps)
    tok = _frame(resp, frames.tokens, "logprobs (ask for logprobs=True)")
    tok = tok[(tok.choice == choice) & (tok.segment != "prompt")].reset_index(drop=True)
    tok = tok.iloc[:per_row * max_rows]
    ours = steps[steps.choice == choice]
    replaced = set((ours.position + ours.accepted)[ours.resampled])
    rows = max(1, -(-len(tok) // per_row))
    fig = Figure(figsize=(per_row * 0.62, 2.6 + rows * 0.34))
    top, bottom = fig.subplots(2, 1, height_ratios=[2.2, rows * 0.34 + 0.3])
    x = rates.position.to_numpy()
    top.bar(x - 0.2, rates.rate, 0.4, label="accepted / proposed", color="#4c9a2a")
    top.bar(x + 0.2, rates.conditional_rate, 0.4, label="given all before it accepted",
            color="#9ccc65")
    top.set_xticks(x), top.set_ylim(0, 1.3)
    top.set_xlabel("proposal position in a step"), top.set_ylabel("acceptance")
    mean = steps.accepted.mean()
    top.set_title(f"{len(steps)} steps, {mean:.2f} tokens accepted per step on average")
    top.legend(fontsize=7, loc="upper center", ncol=2)
    colour = {True: "#a5d6a7", False: "#eeeeee"}
    for k, t in enumerate(tok.itertuples()):
        r, c = divmod(k, per_row)
        face = "#ffcc80" if t.position in replaced else colour[bool(t.speculated)]
        bottom.add_patch(Rectangle((c, r), 0.96, 0.9, color=face))
        bottom.text(c + 0.48, r + 0.45, visible(t.token)[:7], ha="center", va="center",
                    fontsize=6.5, family="monospace")
    bottom.set_xlim(0, per_row), bottom.set_ylim(rows, 0)
    bottom.set_axis_off()
    bottom.set_title(f"choice {choice}: green accepted from a proposal, orange replaced a "
                     f"rejected one, grey the model's own", fontsize=8)
    fig.tight_layout()
    return fig


def logit_lens(resp: Any, llm: Any, choice: int = 0, max_positions: int = 32) -> Figure:
    """Layer x position heatmap of the logit lens (`frames.logit_lens`): each cell the
    logprob that layer gives the token finally at that position, labelled with the
    layer's own top token (up to `max_positions` positions, the last ones)."""
    lens = _frame(resp, lambda r: frames.logit_lens(r, llm), "residual streams (ask for "
                  "logprobs=True and activation_layers=[...])")
    lens = lens[lens.choice == choice]
    positions = sorted(lens.position.unique())[-max_positions:]
    lens = lens[lens.position.isin(positions)]
    grid = lens.pivot(index="layer", columns="position", values="logprob")
    tops = lens.pivot(index="layer", columns="position", values="top_token")
    tokens = lens.drop_duplicates("position").set_index("position").token.reindex(grid.columns)
    fig = Figure(figsize=(0.55 * len(grid.columns) + 2.5, 0.45 * len(grid) + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(grid.to_numpy(), cmap="viridis", aspect="auto", origin="lower")
    for (y, x), top in np.ndenumerate(tops.to_numpy()):
        ax.text(x, y, visible(top)[:6], ha="center", va="center", fontsize=7,
                color=_ink(image, grid.to_numpy()[y, x]))
    ax.set_xticks(range(len(grid.columns)), [visible(t) for t in tokens], rotation=90,
                  fontsize=8)
    ax.set_yticks(range(len(grid)), grid.index)
    ax.set_xlabel("token at the position"), ax.set_ylabel("layer")
    ax.set_title("logit lens: each layer's logprob of the final token (text: its top token)")
    fig.colorbar(image, ax=ax, label="logprob", fraction=0.03)
    return fig


def disagreement(frame: pd.DataFrame, max_labels: int = 48) -> Figure:
    """KL(a ‖ b) along the text from `tk.compare`, positions where the two models' greedy
    choices differ in red."""
    if frame.empty:
        raise ValueError("nothing to plot: the comparison is empty")
    fig = Figure(figsize=(min(0.3 * len(frame) + 2, 16), 3.2))
    ax = fig.add_subplot()
    colours = np.where(frame.agree, "tab:blue", "tab:red")
    ax.bar(range(len(frame)), frame.kl, color=colours)
    if len(frame) <= max_labels:
        ax.set_xticks(range(len(frame)), [visible(t) for t in frame.token], rotation=90,
                      fontsize=8)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("position")
    ax.set_ylabel("KL(a ‖ b), nats")
    ax.set_title("where the two models differ (red: different greedy choices)")
    return fig


def expert_usage(data: Frameable, num_experts: Optional[int] = None) -> Figure:
    """Layer x expert heatmap of how many tokens each expert received."""
    route = _frame(data, frames.routing, "routing matrices (ask for "
                   "include_routing_matrix=True, on a mixture-of-experts model)")
    experts = num_experts or int(route.expert.max()) + 1
    counts = pd.crosstab(route.layer, route.expert).reindex(columns=range(experts),
                                                            fill_value=0)
    fig = Figure(figsize=(0.6 * experts + 2, 0.5 * len(counts) + 1.2))
    ax = fig.add_subplot()
    image = ax.imshow(counts.to_numpy(), cmap="magma", aspect="auto")
    ax.set_xticks(range(experts)), ax.set_yticks(range(len(counts)), counts.index)
    ax.set_xlabel("expert"), ax.set_ylabel("MoE layer")
    ax.set_title("tokens routed to each expert")
    fig.colorbar(image, ax=ax, label="tokens", fraction=0.03)
    return fig


def sweep_grid(frame: pd.DataFrame, x: str, y: str, value: str = "distinct",
               agg: str = "mean") -> Figure:
    """A sweep metric over two swept parameters. `value` is a column of the sweep frame,
    or "distinct": the number of distinct completions per cell."""
    if value == "distinct":
        table = frame.groupby([y, x]).text.nunique().unstack(x)
        title = f"distinct completions (of {frame.groupby([y, x]).size().max()})"
    else:
        table = frame.groupby([y, x])[value].agg(agg).unstack(x)
        title = f"{agg} {value}"
    fig = Figure(figsize=(1.1 * table.shape[1] + 2, 0.7 * table.shape[0] + 1.2))
    ax = fig.add_subplot()
    image = ax.imshow(table.to_numpy(dtype=float), cmap="cividis", aspect="auto",
                      origin="lower")
    for (r, c), v in np.ndenumerate(table.to_numpy(dtype=float)):
        ax.text(c, r, f"{v:.3g}", ha="center", va="center", fontsize=8,
                color=_ink(image, v))
    ax.set_xticks(range(table.shape[1]), table.columns)
    ax.set_yticks(range(table.shape[0]), table.index)
    ax.set_xlabel(x), ax.set_ylabel(y)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.03)
    return fig
