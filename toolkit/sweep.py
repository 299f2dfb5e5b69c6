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
          **grids: Sequence[Any]) -> pd.DataFrame:
    """Run every combination of `grids` (e.g. temperature=[0.2, 1.0], top_p=[0.9, 1.0]) on
    `prompt` with `n` choices each; `fixed` holds other request fields for every run.

    Returns `frames.choices` rows (text, finish reason, tokens, summed logprob, perplexity)
    with the swept knobs as leading columns. Interrupting (Ctrl-C, the notebook's stop
    button) keeps the rows of the settings already finished.
    """
    names = list(grids)
    values = [v if isinstance(v, (list, tuple, range)) else [v] for v in grids.values()]
    combos = list(itertools.product(*values))
    parts = []
    with tqdm(total=len(combos), disable=not progress or len(combos) < 2,
              desc="sweep") as bar:
        try:
            for combo in combos:
                setting = dict(zip(names, combo))
                resp = llm.completions.create(prompt=prompt, n=n, seed=seed,
                                              max_tokens=max_tokens, logprobs=True,
                                              **(fixed or {}), **setting)
                part = frames.choices(resp)
                for name, value in reversed(setting.items()):
                    part.insert(0, name, value)
                parts.append(part)
                bar.update()
        except KeyboardInterrupt:
            warnings.warn(f"sweep interrupted: kept {len(parts)} of {len(combos)} settings")
    if not parts:
        return pd.DataFrame(columns=names + frames.CHOICE_COLUMNS)
    return pd.concat(parts, ignore_index=True)
