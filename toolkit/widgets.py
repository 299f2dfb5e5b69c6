"""Interactive explorers for notebooks, built on completions, frames and plots.

`explore(llm, prompt)` puts a slider on every sampling knob and re-samples once the controls
settle: a drag re-samples when let go (`continuous_update=False`), and a run of arrow-key
presses once the presses stop (`SETTLE_S`), not once per press. It shows
the completions with each token coloured by its logprob (hover for the alternatives), the
next-token distribution at a chosen position, and the tokens frame. `sweep_explorer` runs a
`sweep` over two knobs and plots it. Both render through plain widget values (HTML text,
PNG bytes), so their logic runs and is tested without a browser.
"""
from __future__ import annotations

import asyncio
import html
import io
from typing import Any, Optional

import ipywidgets as W
import numpy as np
from matplotlib.figure import Figure

from . import frames, plots
from .engine.sampler import default
from .schema import CompletionRequest
from .sweep import sweep

SETTLE_S = 0.4        # changes closer together than this (key presses) re-sample once
LABELS = {"description_width": "130px"}   # room for "repetition_penalty", not "repetit…"
WIDE = {"width": "420px"}                  # and a slider track of a usable length

# knob -> (widget class, min, max, step); each starts at its neutral value (`default`),
# except Mirostat's target, which has none (unset means off): its slider at 0 means off.
KNOBS = {
    "temperature": (W.FloatSlider, 0.0, 2.0, 0.05),
    "top_k": (W.IntSlider, 0, 100, 1),
    "top_p": (W.FloatSlider, 0.0, 1.0, 0.01),
    "min_p": (W.FloatSlider, 0.0, 1.0, 0.01),
    "typical_p": (W.FloatSlider, 0.0, 1.0, 0.01),
    "frequency_penalty": (W.FloatSlider, -2.0, 2.0, 0.1),
    "presence_penalty": (W.FloatSlider, -2.0, 2.0, 0.1),
    "repetition_penalty": (W.FloatSlider, 0.05, 2.0, 0.05),
    "mirostat_target": (W.FloatSlider, 0.0, 10.0, 0.5),
    "mirostat_lr": (W.FloatSlider, 0.01, 1.0, 0.01),
}


def _start(knob: str) -> float:
    value = default(knob)
    return 0.0 if value is None else value


def png(fig: Figure) -> bytes:
    """The figure as PNG at twice its on-screen resolution (crisp on high-density screens;
    `show` displays it at its true size)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=160, bbox_inches="tight")
    return buffer.getvalue()


def show(image: W.Image, fig: Figure) -> None:
    """Put a figure in an image widget at its own size: an image widget is otherwise
    stretched to the output's width, enlarged and blurred."""
    data = png(fig)
    width = int.from_bytes(data[16:20], "big")      # the PNG header's width, in pixels
    image.value = data
    image.layout.width = f"{width // 2}px"
    image.layout.display = ""


def token_html(tok: Any, top: Any, choice: int) -> str:
    """A choice's tokens as spans coloured from red (unlikely) to green (likely), with the
    top alternatives in each span's tooltip."""
    rows = tok[tok.choice == choice]
    spans = []
    for position, token, logprob in zip(rows.position, rows.token, rows.logprob):
        p = 0.0 if np.isnan(logprob) else float(np.exp(logprob))
        alts = top[(top.choice == choice) & (top.position == position)]
        tip = "\n".join(f"{t!r}: {lp:.2f}" for t, lp in zip(alts.token, alts.logprob))
        colour = f"hsl({int(120 * p)}, 70%, 80%)"
        spans.append(f'<span title="{html.escape(tip)}" style="background:{colour};'
                     f'white-space:pre">{html.escape(token)}</span>')
    return "<code>" + "".join(spans) + "</code>"


class Explorer:
    """Sliders for every sampling knob over one prompt; see the module docstring."""

    def __init__(self, llm: Any, prompt: str, n: int = 3, max_tokens: int = 32,
                 seed: int = 0) -> None:
        self.llm = llm
        self.prompt = W.Textarea(value=prompt, description="prompt", continuous_update=False)
        self.knobs = {name: cls(value=_start(name), min=lo, max=hi, step=step,
                                description=name, continuous_update=False, style=LABELS,
                                layout=WIDE,
                                tooltip=CompletionRequest.model_fields[name].description)
                      for name, (cls, lo, hi, step) in KNOBS.items()}
        self.seed = W.IntText(value=seed, description="seed", style=LABELS,
                              tooltip="the sampling seed: the same seed, the same samples")
        self.n = W.IntSlider(value=n, min=1, max=16, description="n", style=LABELS,
                             layout=WIDE, continuous_update=False,
                             tooltip="completions to sample")
        self.max_tokens = W.IntSlider(value=max_tokens, min=1, max=256, style=LABELS,
                                      layout=WIDE, description="max_tokens",
                                      continuous_update=False,
                                      tooltip="tokens to generate per completion")
        self.position = W.IntSlider(value=0, min=0, max=max_tokens - 1, style=LABELS,
                                    layout=WIDE, description="position",
                                    continuous_update=False,
                                    tooltip="the position whose next-token distribution "
                                            "the chart shows (choice 0)")
        self.completions = W.HTML()
        self.distribution = W.Image(format="png", layout=W.Layout(display="none"))
        self.table = W.HTML()
        self.error = W.HTML()
        self._pending: Optional[asyncio.TimerHandle] = None
        for control in [self.prompt, self.seed, self.n, self.max_tokens, *self.knobs.values()]:
            control.observe(self._changed, names="value")
        self.position.observe(lambda _: self.show_distribution(), names="value")
        self.ui = W.VBox([self.prompt, W.HBox([
            W.VBox(list(self.knobs.values())),
            W.VBox([self.seed, self.n, self.max_tokens, self.position])]),
            self.error, self.completions, self.distribution, self.table])
        self.response = None
        self.update()

    def request(self) -> dict[str, Any]:
        fields = {name: w.value for name, w in self.knobs.items()}
        if fields["mirostat_target"] == 0:
            del fields["mirostat_target"], fields["mirostat_lr"]
        return dict(prompt=self.prompt.value, n=self.n.value, seed=self.seed.value,
                    max_tokens=self.max_tokens.value, logprobs=True, top_logprobs=5,
                    **fields)

    def _changed(self, change: Any = None) -> None:
        """Re-sample once the controls settle. In a kernel, widget changes arrive on its
        event loop: each one (an arrow-key press commits a value) restarts a short timer,
        and the request runs when it fires. Without a running loop, at once."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.update()
            return
        if self._pending is not None:
            self._pending.cancel()
        self._pending = loop.call_later(SETTLE_S, self.update)

    def update(self) -> None:
        self._pending = None
        try:
            self.response = self.llm.completions.create(**self.request())
        except ValueError as exc:              # InvalidRequestError: show it, keep going
            self.error.value = f"<b style='color:#b00'>{html.escape(str(exc))}</b>"
            return
        self.error.value = ""
        tok, top = frames.tokens(self.response), frames.top_logprobs(self.response)
        self.completions.value = '<div style="line-height:1.45">' + "".join(
            f"<div><b>{c.index}</b> {token_html(tok, top, c.index)}</div>"
            for c in self.response.choices) + "</div>"
        # in a box of its own height, so that a long frame does not push the rest away
        self.table.value = ('<div style="max-height:22em;overflow:auto">'
                            + tok.to_html(max_rows=200, float_format="%.3f") + "</div>")
        self.position.max = max(0, int(tok[tok.choice == 0].position.max()
                                       - tok[tok.choice == 0].position.min())) \
            if len(tok) else 0
        self.show_distribution()

    def show_distribution(self) -> None:
        """Bar chart of the top alternatives at the chosen position of choice 0."""
        top = frames.top_logprobs(self.response)
        top = top[top.choice == 0]
        if top.empty:
            return
        position = int(top.position.min()) + self.position.value
        rows = top[top.position == position]
        fig = Figure(figsize=(5, 2.2))
        ax = fig.add_subplot()
        ax.barh([repr(t) for t in rows.token][::-1], np.exp(rows.logprob.to_numpy())[::-1])
        ax.set_xlabel("probability (raw model distribution)")
        ax.set_title(f"next token at position {position}")
        show(self.distribution, fig)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.ui._repr_mimebundle_(**kwargs)


def explore(llm: Any, prompt: str, **kwargs: Any) -> Explorer:
    """An interactive sampling explorer for `prompt` (display it in a notebook cell)."""
    return Explorer(llm, prompt, **kwargs)


class SweepExplorer:
    """Pick two knobs and their ranges, run the sweep, see the grid."""

    def __init__(self, llm: Any, prompt: str, n: int = 8, max_tokens: int = 24) -> None:
        self.llm, self.prompt = llm, prompt
        names = list(KNOBS)
        self.x = W.Dropdown(options=names, value="temperature", description="x",
                            tooltip="the knob along the x axis")
        self.y = W.Dropdown(options=names, value="top_p", description="y",
                            tooltip="the knob along the y axis")
        self.x_values = W.Text(value="0.2, 0.7, 1.2", description="x values",
                               tooltip="values of x, separated by commas")
        self.y_values = W.Text(value="0.5, 0.9, 1.0", description="y values",
                               tooltip="values of y, separated by commas")
        self.metric = W.Dropdown(options=["distinct", "perplexity", "tokens", "sum_logprob"],
                                 value="distinct", description="metric",
                                 tooltip="what each cell of the grid shows")
        self.n = W.IntSlider(value=n, min=1, max=32, description="n",
                             tooltip="completions per setting")
        self.max_tokens = W.IntSlider(value=max_tokens, min=1, max=128,
                                      description="max_tokens", style=LABELS,
                                      tooltip="tokens to generate per completion")
        self.run = W.Button(description="run sweep", tooltip="run the sweep and plot it")
        self.run.on_click(lambda _: self.update())
        self.plot = W.Image(format="png", layout=W.Layout(display="none"))  # until a run
        self.error = W.HTML()
        self.ui = W.VBox([W.HBox([self.x, self.x_values]), W.HBox([self.y, self.y_values]),
                          W.HBox([self.metric, self.n, self.max_tokens]), self.run,
                          self.error, self.plot])
        self.frame = None

    def update(self) -> None:
        try:
            grids = {self.x.value: _numbers(self.x_values.value),
                     self.y.value: _numbers(self.y_values.value)}
            self.frame = sweep(self.llm, self.prompt, n=self.n.value,
                               max_tokens=self.max_tokens.value, progress=False, **grids)
        except ValueError as exc:
            self.error.value = f"<b style='color:#b00'>{html.escape(str(exc))}</b>"
            return
        self.error.value = ""
        show(self.plot, plots.sweep_grid(self.frame, self.x.value, self.y.value,
                                         self.metric.value))

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.ui._repr_mimebundle_(**kwargs)


def sweep_explorer(llm: Any, prompt: str, **kwargs: Any) -> SweepExplorer:
    """A sweep over two knobs with a plot of the result (display it in a notebook cell)."""
    return SweepExplorer(llm, prompt, **kwargs)


def _numbers(text: str) -> list[Any]:
    values = [float(v) for v in text.replace(",", " ").split()]
    if not values:
        raise ValueError("give at least one value")
    return [int(v) if v.is_integer() and "." not in text else v for v in values]
