"""Two models on one token sequence (`tk.compare`): where they agree, and by how much their
next-token distributions differ. The view speculation needs of a draft and its target,
and interpretability of a model and its fine-tune."""
from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np
import pandas as pd
import torch

from . import frames
from .errors import InvalidRequestError

COMPARE_COLUMNS = ["position", "token", "token_id", "logprob_a", "logprob_b", "top_a", "top_b",
                   "kl", "agree"]


def compare(llm_a: Any, llm_b: Any, sequence: Union[str, Sequence[int], Any],
            choice: int = 0) -> pd.DataFrame:
    """Score one token sequence under two models that share a tokenizer. `sequence` is a
    text (tokenised by `llm_a`), token ids, or a response (its choice `choice`, prompt and
    completion, as `return_token_ids=True` gives them).

    One row per position from the second token on: the token, its logprob under each
    model, each model's top token, `kl` = KL(a ‖ b) of their next-token distributions there
    (in nats), and `agree`: whether their greedy choices are the same."""
    if llm_a.tokenizer.get_vocab() != llm_b.tokenizer.get_vocab():
        raise InvalidRequestError(f"compare: {llm_a.name!r} and {llm_b.name!r} do not share a "
                                  f"tokenizer", "llm_b")
    ids = _ids(llm_a, sequence, choice)
    a, b = _distributions(llm_a, ids), _distributions(llm_b, ids)
    target = torch.tensor(ids[1:])[:, None]
    kl = (a.exp() * (a - b)).nan_to_num().sum(-1)
    top_a, top_b = a.argmax(-1), b.argmax(-1)
    name = lambda t: llm_a.tokenizer.decode([int(t)])
    return pd.DataFrame({
        "position": np.arange(1, len(ids)), "token": [name(t) for t in ids[1:]],
        "token_id": ids[1:], "logprob_a": a.gather(1, target)[:, 0].numpy(),
        "logprob_b": b.gather(1, target)[:, 0].numpy(), "top_a": [name(t) for t in top_a],
        "top_b": [name(t) for t in top_b], "kl": kl.clamp_min(0).numpy(),
        "agree": (top_a == top_b).numpy()}, columns=COMPARE_COLUMNS)


def _ids(llm: Any, sequence: Any, choice: int) -> list[int]:
    if isinstance(sequence, str):
        ids = llm.tokenizer(sequence, verbose=False)["input_ids"]
    elif isinstance(sequence, (list, tuple)):
        ids = list(sequence)
    else:
        c = sequence.choices[choice]
        if c.prompt_token_ids is None or c.token_ids is None:
            raise InvalidRequestError("compare: a response needs its token ids: make it "
                                      "with return_token_ids=True", "sequence")
        ids = list(c.prompt_token_ids) + list(c.token_ids)
    if len(ids) < 2:
        raise InvalidRequestError("compare: the sequence has fewer than two tokens",
                                  "sequence")
    return ids


def _distributions(llm: Any, ids: list[int]) -> torch.Tensor:
    """Log-probs [len(ids) - 1, vocab] of each next token, from the final hidden states the
    engine records (`include_last_activation`): one prefill, through the engine."""
    resp = llm.completions.create(prompt=ids, max_tokens=0, echo=True,
                                  include_last_activation=True)
    _, hidden = frames.activation_matrix(resp)
    with torch.no_grad():
        logits = llm.engine.runner.logits(torch.from_numpy(hidden).to(llm.device, llm.dtype))
    return logits.float().log_softmax(-1).cpu()
