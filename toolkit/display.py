"""How a response or a chunk shows itself in a notebook or a console: a few lines, whatever
its size. A response with 64 choices, top logprobs and activations is megabytes of JSON;
what a person wants at a glance is its choices' texts and finish reasons, the usage, and
for logprobs a few tokens. The full data stays one call away (`model_dump()`, the frames).
"""
from __future__ import annotations

import html
from typing import Any, Optional

MAX_CHOICES = 8        # choices listed before "... n more"
MAX_TEXT = 70          # characters of each choice's text in a repr
MAX_HTML_TEXT = 300    # ... in an HTML table
MAX_TOKENS = 12        # tokens of choice 0 in the HTML token table


def visible(text: str) -> str:
    """Text with whitespace and control characters shown: `·` for a space, `↵` for a
    newline, `⇥` for a tab, escapes for the rest, so " x" and "x" look different."""
    text = text.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _usage(resp: Any) -> str:
    u = resp.usage
    if u is None:
        return ""
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
    return (f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens"
            + (f" ({cached} prompt tokens cached)" if cached else ""))


def text_repr(resp: Any) -> str:
    """A few lines: the kind, id, model and usage, then a line per choice."""
    kind = type(resp).__name__
    head = f"{kind}(id={resp.id!r}, model={resp.model!r}, {len(resp.choices)} choice" \
           f"{'' if len(resp.choices) == 1 else 's'}"
    usage = _usage(resp)
    lines = [head + (f", {usage})" if usage else ")")]
    for c in resp.choices[:MAX_CHOICES]:
        lines.append(f"  [{c.index}] {c.finish_reason or '…':6} {_cut(repr(c.text), MAX_TEXT)}")
    if len(resp.choices) > MAX_CHOICES:
        lines.append(f"  ... {len(resp.choices) - MAX_CHOICES} more choices")
    return "\n".join(lines)


def _entries(choice: Any) -> Optional[list[tuple[str, Optional[float], str]]]:
    """(token, logprob, alternatives) of a choice's logprobs in either format, or None."""
    lp = choice.logprobs
    if lp is None:
        return None
    if hasattr(lp, "content"):
        return [(e.token, e.logprob, "  ".join(f"{visible(t.token)} {t.logprob:.2f}"
                                               for t in e.top_logprobs or []))
                for e in lp.content]
    tops = lp.top_logprobs or [None] * len(lp.tokens)
    return [(t, p, "  ".join(f"{visible(k)} {v:.2f}" for k, v in (top or {}).items()))
            for t, p, top in zip(lp.tokens, lp.token_logprobs, tops)]


def html_repr(resp: Any) -> str:
    """A table of choices (finish reason, text), the usage, and the first tokens of
    choice 0 with their logprobs when the response has them."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{c.index}</td><td>{esc(c.finish_reason or '…')}</td>"
        f"<td style='text-align:left;font-family:monospace;white-space:pre-wrap'>"
        f"{esc(_cut(c.text, MAX_HTML_TEXT))}</td></tr>"
        for c in resp.choices[:MAX_CHOICES])
    more = f"<p>… {len(resp.choices) - MAX_CHOICES} more choices</p>" \
        if len(resp.choices) > MAX_CHOICES else ""
    out = [f"<b>{esc(type(resp).__name__)}</b> <code>{esc(resp.id)}</code> · "
           f"{esc(resp.model)} · {esc(_usage(resp))}",
           "<table><tr><th>choice</th><th>finish</th><th>text</th></tr>" + rows + "</table>",
           more]
    entries = _entries(resp.choices[0]) if resp.choices else None
    if entries:
        token_rows = "".join(
            f"<tr><td style='font-family:monospace'>{esc(visible(t))}</td>"
            f"<td>{'' if p is None else f'{p:.3f}'}</td>"
            f"<td style='text-align:left;font-family:monospace'>{esc(alts)}</td></tr>"
            for t, p, alts in entries[:MAX_TOKENS])
        rest = len(entries) - MAX_TOKENS
        out.append(f"<p>choice {resp.choices[0].index}, first tokens"
                   f"{f' ({rest} more: resp.tokens())' if rest > 0 else ''}:</p>"
                   "<table><tr><th>token</th><th>logprob</th><th>top alternatives</th></tr>"
                   + token_rows + "</table>")
    return "".join(out)
