"""Log-likelihoods of given text (`tk.score`), as evaluation harnesses ask them of a model:
how likely is this continuation after that context, was it the model's greedy choice, and
how likely is this whole document. Built on `echo` with `max_tokens=0`: the requests go
through `completions.create_batch` together, so a context shared by several continuations
is prefilled once and then read from the prefix cache.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional, Sequence, Union

import pandas as pd
from tqdm.auto import tqdm

from .cluster import each
from .errors import InvalidRequestError

SCORE_COLUMNS = ["prompt_index", "continuation", "tokens", "logprob", "mean_logprob",
                 "perplexity", "is_greedy"]


def score(llm: Any, prompts: Union[str, Sequence[str]],
          continuations: Union[str, Sequence[str], None] = None, *,
          detail: bool = False, executor: Union[str, Any, None] = None,
          chunk: int = 256, progress: bool = True) -> pd.DataFrame:
    """The log-likelihood of each continuation after its prompt, or of each whole text.

    With `continuations` (an evaluation harness's `loglikelihood`): `prompts` and
    `continuations` pair up, or one prompt (a string) is the context of every continuation
    (a multiple-choice question). They are tokenised as lm-evaluation-harness does, so that
    no token straddles the boundary: the prompt's trailing whitespace moves to the front of
    the continuation, then the prompt (with the model's BOS token, if it adds one) and the
    continuation (without special tokens) are tokenised apart and joined.

    Without `continuations` (`loglikelihood_rolling`): each text in `prompts` whole, every
    token after its first scored exactly once, in windows of the context length (each
    window's tokens see up to a full context of the tokens before them).

    One row per pair (or text): `prompt_index`, `continuation` (its text; None for whole
    texts), `tokens` scored, `logprob` (their sum), `mean_logprob`, `perplexity`
    (exp of minus the mean) and `is_greedy` (every scored token was the argmax of its
    distribution). `detail=True` adds `token_ids` and `token_logprobs`, one list per row.

    Large sets go `chunk` pairs (or texts) at a time, with a bar when there are several
    chunks (`progress`); `executor="ray"` (or a `toolkit.cluster.RayExecutor`) scores the
    chunks on a Ray cluster's engines. Every number is the same wherever a chunk runs:
    scoring is prefill only, and each prompt is prefilled on its own.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if continuations is None:
        items: list[Any] = list(enumerate(prompts))
        part: Any = partial(_rolling_rows, detail=detail)
    else:
        items, part = _pairs(prompts, continuations), partial(_pair_rows, detail=detail)
    columns = SCORE_COLUMNS + (["token_ids", "token_logprobs"] if detail else [])
    tasks = [partial(part, items=items[i:i + chunk]) for i in range(0, len(items), chunk)]
    parts: dict[int, pd.DataFrame] = {}
    results = each(llm, tasks, executor)
    try:
        for k, frame in tqdm(results, total=len(tasks), disable=not progress or len(tasks) < 2,
                             desc="score"):
            parts[k] = frame
    finally:
        results.close()
    frames = [parts[k] for k in sorted(parts)]
    return pd.concat(frames, ignore_index=True)[columns] if frames else \
        pd.DataFrame(columns=columns)


def _pair_rows(llm: Any, items: list[tuple[int, tuple[str, str]]], detail: bool
               ) -> pd.DataFrame:
    """Rows of (prompt index, (context, continuation)) pairs, as one `create_batch`."""
    requests = [_pair_request(llm, k, context, cont) for k, (context, cont) in items]
    responses = llm.completions.create_batch(requests, progress=False)
    return pd.DataFrame([_row(k, cont, [resp], detail)
                         for (k, (_, cont)), resp in zip(items, responses)])


def _rolling_rows(llm: Any, items: list[tuple[int, str]], detail: bool) -> pd.DataFrame:
    return pd.DataFrame([_rolling(llm, k, text, detail) for k, text in items])


def _pairs(prompts: Sequence[str], continuations: Union[str, Sequence[str]]
           ) -> list[tuple[int, tuple[str, str]]]:
    if isinstance(continuations, str):
        continuations = [continuations]
    if len(prompts) == 1:
        prompts = list(prompts) * len(continuations)
    if len(prompts) != len(continuations):
        raise InvalidRequestError(f"score: {len(prompts)} prompts for {len(continuations)} "
                                  f"continuations (pass one prompt, or one per "
                                  f"continuation)", "continuations")
    for k, cont in enumerate(continuations):
        if not isinstance(cont, str) or not cont:
            raise InvalidRequestError(f"score: continuation {k} is empty or not text",
                                      "continuations")
    index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    return [(index[p], (p, c)) for p, c in zip(prompts, continuations)]


def _pair_request(llm: Any, k: int, context: str, continuation: str) -> dict[str, Any]:
    """The request that scores one continuation: context and continuation token ids
    joined, the continuation's tokens echoed with their logprobs, nothing generated."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    tokenizer = llm.tokenizer
    ids = tokenizer(stripped)["input_ids"] if stripped else \
        ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InvalidRequestError(f"score: prompt {k} is empty and the model has no BOS "
                                  f"token to score the continuation after", "prompts")
    return dict(prompt=ids + cont, max_tokens=0, echo_last=len(cont), logprobs=True)


def _rolling(llm: Any, k: int, text: str, detail: bool) -> dict[str, Any]:
    """One whole text, scored window by window."""
    ids = llm.tokenizer(text, verbose=False)["input_ids"]      # (longer than the context)
    if len(ids) < 2:
        raise InvalidRequestError(f"score: text {k} has fewer than two tokens: nothing to "
                                  f"score", "prompts")
    size = llm.info.context_length
    requests = []
    for start in range(1, len(ids), size - 1):      # each window predicts [start, end)
        end = min(len(ids), start + size - 1)
        requests.append(dict(prompt=ids[max(0, end - size):end], max_tokens=0,
                             echo_last=end - start, logprobs=True))
    return _row(k, None, llm.completions.create_batch(requests, progress=False), detail)


def _row(k: int, continuation: Optional[str], responses: list[Any],
         detail: bool) -> dict[str, Any]:
    frames = [resp.tokens() for resp in responses]
    tokens = pd.concat(frames, ignore_index=True)
    total = float(tokens.logprob.sum())
    mean = total / len(tokens)
    row = {"prompt_index": k, "continuation": continuation, "tokens": len(tokens),
           "logprob": total, "mean_logprob": mean, "perplexity": math.exp(-mean),
           "is_greedy": bool((tokens["rank"] == 1).all())}
    if detail:
        row.update(token_ids=tokens.token_id.tolist(), token_logprobs=tokens.logprob.tolist())
    return row
