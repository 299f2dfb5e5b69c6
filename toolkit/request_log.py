"""The engine's request log: every request's parameters, `metadata`, `user`, id, usage and
timings, kept in memory for inspection (`frame()`) or export (`to_jsonl()`), as the hosted
API keeps them for tracing and distillation."""
from __future__ import annotations

import json
import os
from typing import Any, Union

import pandas as pd


class RequestLog:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def record(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)

    def frame(self) -> pd.DataFrame:
        """One row per request; nested fields (params, usage, timings) flattened."""
        return pd.json_normalize(self.entries) if self.entries else pd.DataFrame()

    def to_jsonl(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for entry in self.entries:
                f.write(json.dumps(entry) + "\n")

    def clear(self) -> None:
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)
