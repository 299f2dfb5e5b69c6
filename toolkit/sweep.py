"""Parameter sweeps: the cartesian product of knob grids, run through `completions.create`,
gathered into one DataFrame with a column per swept knob and a row per choice, here or on a
Ray cluster (`toolkit.cluster`)."""
from __future__ import annotations

import itertools
import warnings
from functools import partial
from typing import Any, Sequence, Union

import pandas as pd
from tqdm.auto import tqdm

from . import frames
from .cluster import each


def sweep(llm: Any, prompt: Any, *, n: int = 4, seed: int = 0, max_tokens: int = 32,
          progress: bool = True, fixed: dict[str, Any] | None = None,
          batch: int | None = None, executor: Union[str, Any, None] = None,
          **grids: Sequence[Any]) -> pd.DataFrame:
    """Run every combination of `grids` (e.g. temperature=[0.2, 1.0], top_p=[0.9, 1.0]) on
    `prompt` with `n` choices each; `fixed` holds other request fields for every run.

    Returns `frames.choices` rows (text, finish reason, tokens, summed logprob, perplexity)
    with the swept knobs as leading columns. Settings run `batch` at a time (by default as
    many as fill about 64 rows) through `create_batch`, so those differing only in
    sampling knobs share a decode loop. `executor="ray"` (or a
    `toolkit.cluster.RayExecutor`, whose engines stay up for its next sweep) runs the
    batches on engine actors of a Ray cluster instead, with the same result.
    Interrupting (Ctrl-C, the notebook's stop button) keeps the rows of the batches
    already finished.
    """
    names = list(grids)
    values = [v if isinstance(v, (list, tuple, range)) else [v] for v in grids.values()]
    settings = [dict(zip(names, combo)) for combo in itertools.product(*values)]
    size = batch or max(1, 64 // n)
    batches = [settings[start:start + size] for start in range(0, len(settings), size)]
    tasks = [partial(_run, prompt=prompt, settings=b, n=n, seed=seed, max_tokens=max_tokens,
                     fixed=fixed or {}) for b in batches]
    parts: dict[int, pd.DataFrame] = {}
    results = each(llm, tasks, executor)
    with tqdm(total=len(settings), disable=not progress or len(settings) < 2,
              desc="sweep") as bar:
        try:
            for k, part in results:
                parts[k] = part
                bar.update(len(batches[k]))
        except KeyboardInterrupt:
            warnings.warn(f"sweep interrupted: kept {sum(len(batches[k]) for k in parts)} of "
                          f"{len(settings)} settings")
        finally:
            results.close()
    if not parts:
        return pd.DataFrame(columns=names + frames.CHOICE_COLUMNS)
    return pd.concat([parts[k] for k in sorted(parts)], ignore_index=True)


def _run(llm: Any, prompt: Any, settings: list[dict[str, Any]], n: int, seed: int,
         max_tokens: int, fixed: dict[str, Any]) -> pd.DataFrame:
    """One batch of settings as one `create_batch`: their rows, knobs as leading columns."""
    responses = llm.completions.create_batch([
        dict(prompt=prompt, n=n, seed=seed, max_tokens=max_tokens, logprobs=True, **fixed,
             **setting) for setting in settings], progress=False)   # the sweep's bar says it
    parts = []
    for setting, resp in zip(settings, responses):
        part = frames.choices(resp)
        for name, value in reversed(setting.items()):
            part.insert(0, name, value)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)
