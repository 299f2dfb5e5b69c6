"""Parameter sweeps: the cartesian product of knob grids, run through `completions.create`,
gathered into one DataFrame with a column per swept knob and a row per choice."""
from __future__ import annotations

import itertools
import warnings
from typing import Any, Sequence

import pandas as pd
from tqdm.auto import tqdm

from . import frames


def sweep(llm: Any, prompt: Any, *, n: int = 4, seed: int = 0, max_tokens: int = 32,
          progress: bool = True, fixed: dict[str, Any] | None = None,
          batch: int | None = None, **grids: Sequence[Any]) -> pd.DataFrame:
    """Run every combination of `grids` (e.g. temperature=[0.2, 1.0], top_p=[0.9, 1.0]) on
    `prompt` with `n` choices each; `fixed` holds other request fields for every run.

    Returns `frames.choices` rows (text, finish reason, tokens, summed logprob, perplexity)
    with the swept knobs as leading columns. Settings run `batch` at a time (by default as
    many as fill about 64 rows) through `create_batch`, so those differing only in
    sampling knobs share a decode loop. Interrupting (Ctrl-C, the notebook's stop button)
    keeps the rows of the batches already finished.
    """
    names = list(grids)
    values = [v if isinstance(v, (list, tuple, range)) else [v] for v in grids.values()]
    settings = [dict(zip(names, combo)) for combo in itertools.product(*values)]
    parts: list[pd.DataFrame] = []
    size = batch or max(1, 64 // n)
    with tqdm(total=len(settings), disable=not progress or len(settings) < 2,
              desc="sweep") as bar:
        try:
            for start in range(0, len(settings), size):
                batch = settings[start:start + size]
                responses = llm.completions.create_batch([
                    dict(prompt=prompt, n=n, seed=seed, max_tokens=max_tokens,
                         logprobs=True, **(fixed or {}), **setting) for setting in batch],
                    progress=False)                  # the sweep's own bar says it
                for setting, resp in zip(batch, responses):
                    part = frames.choices(resp)
                    for name, value in reversed(setting.items()):
                        part.insert(0, name, value)
                    parts.append(part)
                bar.update(len(batch))
        except KeyboardInterrupt:
            warnings.warn(f"sweep interrupted: kept {len(parts)} of {len(settings)} "
                          f"settings")
    if not parts:
        return pd.DataFrame(columns=names + frames.CHOICE_COLUMNS)
    return pd.concat(parts, ignore_index=True)
