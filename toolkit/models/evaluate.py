"""Held-out measurements of the embedded models, shared by the training script's model cards
and the tests that hold the shipped weights to their figures.

The held-out text is the Python standard library's own test suite (`Lib/test`), which the
training corpus never includes. Every figure is computed over the same predicted tokens:
documents are cut into windows of `window` tokens and each window predicts all but its first.
"""
from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch


def heldout_files(every: int = 10, offset: int = 0) -> list[Path]:
    """Every `every`-th file of the stdlib test suite (empty if this Python ships none)."""
    folder = Path(sysconfig.get_paths()["stdlib"]) / "test"
    return sorted(folder.glob("test_*.py"))[offset::every]


def encode_documents(tokenizer: Any, texts: Sequence[str], max_tokens: int | None = None
                     ) -> list[list[int]]:
    """Token ids of each text, BOS first (the tokenizer adds it), capped in total."""
    docs, total = [], 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if max_tokens is not None:
            ids = ids[:max_tokens - total]
        if len(ids) > 1:
            docs.append(ids)
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return docs


def windows(docs: Sequence[Sequence[int]], window: int) -> Iterator[torch.Tensor]:
    for doc in docs:
        for start in range(0, len(doc) - 1, window):
            chunk = doc[start:start + window]
            if len(chunk) > 1:
                yield torch.tensor([chunk])


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits[0, :-1].float().cpu()


@torch.inference_mode()
def perplexity(model: Any, docs: Sequence[Sequence[int]], window: int = 512) -> float:
    """exp(mean negative log-likelihood) per predicted token."""
    nll, count = 0.0, 0
    for ids in windows(docs, window):
        logp = torch.log_softmax(_logits(model, ids), dim=-1)
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def unigram_perplexity(docs: Sequence[Sequence[int]], window: int = 512) -> float:
    """Perplexity of a unigram model fitted by counting on the very tokens it scores: the
    floor any model that ignores context can reach on this text."""
    counts: dict[int, int] = {}
    for ids in windows(docs, window):
        for tok in ids[0, 1:].tolist():
            counts[tok] = counts.get(tok, 0) + 1
    total = sum(counts.values())
    nll = -sum(c * math.log(c / total) for c in counts.values())
    return math.exp(nll / total)


@torch.inference_mode()
def greedy_agreement(model: Any, other: Any, docs: Sequence[Sequence[int]],
                     window: int = 512) -> float:
    """Share of positions where both models' most likely next token is the same."""
    same, count = 0, 0
    for ids in windows(docs, window):
        same += (_logits(model, ids).argmax(-1) == _logits(other, ids).argmax(-1)).sum().item()
        count += ids.shape[1] - 1
    return same / count


@torch.inference_mode()
def expert_usage(model: Any, docs: Sequence[Sequence[int]], window: int = 512) -> torch.Tensor:
    """Tokens routed to each expert, as a [moe_layers, experts] count matrix."""
    k = model.config.num_experts_per_tok
    usage = None
    for ids in windows(docs, window):
        device = next(model.parameters()).device
        out = model(input_ids=ids.to(device), output_router_logits=True)
        layers = torch.stack([r.float().cpu() for r in out.router_logits])  # [L, T, E]
        chosen = layers.topk(k, dim=-1).indices                            # [L, T, k]
        counts = torch.zeros(layers.shape[0], layers.shape[-1], dtype=torch.long)
        counts.scatter_add_(1, chosen.flatten(1), torch.ones_like(chosen.flatten(1)))
        usage = counts if usage is None else usage + counts
    return usage


@torch.inference_mode()
def greedy_completion(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 48,
                      frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> str:
    """A greedy continuation, by a plain loop (the card's sample; not the engine). The
    penalties have OpenAI semantics: each output token's logit loses `frequency_penalty`
    per time it was already generated, and `presence_penalty` once if it was."""
    ids = tokenizer(prompt)["input_ids"]
    device = next(model.parameters()).device
    new: list[int] = []
    counts = torch.zeros(model.config.vocab_size, device=device)
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids + new], device=device)).logits[0, -1]
        logits = logits.float() - counts * frequency_penalty - (counts > 0) * presence_penalty
        tok = int(logits.argmax())
        if tok == tokenizer.eos_token_id:
            break
        new.append(tok)
        counts[tok] += 1
    return tokenizer.decode(new)


def longest_run(ids: Sequence[int]) -> int:
    """How many times in a row the most repeated token sequence occurs: 1 for text without
    a repeat, 3 for `import sys` on three lines running."""
    best = 1
    for size in range(1, len(ids) // 2 + 1):
        for start in range(len(ids) - size):
            count = 1
            while ids[start + count * size:start + (count + 1) * size] == ids[start:start + size]:
                count += 1
            best = max(best, count)
    return best


def has_body(prompt: str, completion: str) -> bool:
    """Whether a completion of a function's header and docstring goes on with its body:
    its first line of code is indented deeper than the `def` and is not another `def`."""
    indent = len(prompt) - len(prompt.lstrip())
    code = [line for line in completion.splitlines() if line.strip()]
    if not code:
        return False
    first = code[0]
    return len(first) - len(first.lstrip()) > indent and not first.lstrip().startswith(
        ("def ", "async def ", "class ", "@"))
