"""`toolkit.load` and the object it returns.

An `LLM` is one loaded model (plus an optional draft model for speculation) that answers
requests in-process. It is built from a handful of plain arguments, kept in `spec`, so the
same engine can be rebuilt elsewhere (another process, another GPU) from a picklable dict.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Optional, Sequence, Union

import torch

from .completions import Completions
from .engine.engine import Engine
from .engine.speculation import MAX_SPECULATIVE_TOKENS
from .errors import InvalidRequestError, NotFoundError
from .models import (DEFAULT_MODEL, LoadedModel, ModelInfo, input_device, load_pretrained,
                     placements, resolve_device, resolve_dtype)
from .request_log import RequestLog


class LLM:
    """A loaded model, answering to its own name and to any aliases."""

    def __init__(self, target: LoadedModel, *, device: torch.device, dtype: torch.dtype,
                 draft: Optional[LoadedModel] = None, aliases: Sequence[str] = (),
                 spec: Optional[dict[str, Any]] = None,
                 prefix_cache_bytes: int = 256 * 2**20, lean_forward: bool = True,
                 compile: Optional[bool] = None, progress: bool = True,
                 ngram_speculation: bool = False,
                 num_speculative_tokens: Optional[int] = None) -> None:
        self.target = target
        self.draft = draft
        self.device = device
        self.dtype = dtype
        self.aliases = tuple(aliases)
        self.spec = spec or {}
        self.progress = progress        # a bar for whole requests that run over 2 s
        self.engine = Engine(target.model, target.tokenizer, target.info,
                             prefix_cache_bytes=prefix_cache_bytes, lean_forward=lean_forward,
                             compile=compile,
                             draft=None if draft is None else (draft.model, draft.info),
                             ngram=ngram_speculation,
                             speculative_tokens=num_speculative_tokens)
        self.request_log = RequestLog()
        self.completions = Completions(self)

    @property
    def name(self) -> str:
        return self.target.info.name

    @property
    def info(self) -> ModelInfo:
        return self.target.info

    @property
    def model(self) -> Any:
        return self.target.model

    @property
    def tokenizer(self) -> Any:
        return self.target.tokenizer

    def resolve_model(self, requested: Optional[str]) -> str:
        """The name a response reports for a request's `model` field.

        Any name other than ours or an alias is a 404, never a silent substitution: code
        written for one model must not quietly run on another.
        """
        if requested is None:
            return self.name
        if requested == self.name or requested in self.aliases:
            return requested
        known = ", ".join(repr(n) for n in (self.name, *self.aliases))
        raise NotFoundError(f"Model not found: {requested!r}. This engine serves {known}; "
                            f"pass aliases=[...] to toolkit.load to answer to other names.",
                            "model")

    def __repr__(self) -> str:
        info = self.info
        moe = f", moe={info.num_experts}x{info.experts_per_token}" if info.is_moe else ""
        draft = f", draft={self.draft.info.name!r}" if self.draft else ""
        if self.engine.decoder.ngram:
            draft = ", ngram speculation"
        step = self.engine.runner.step
        compiled = f", decode step {step.state}" if step is not None else ""
        split = placements(self.model)
        if split:
            compiled += f", split over {'+'.join(split)} (HF forward)"
        return (f"LLM({info.name!r}, {info.architecture}, {info.num_parameters / 1e6:.1f}M "
                f"params, context={info.context_length}{moe}{draft}, device={self.device}, "
                f"dtype={str(self.dtype).removeprefix('torch.')}{compiled})")


def load(name_or_path: Union[str, os.PathLike] = DEFAULT_MODEL, *,
         device: Union[str, torch.device, None] = None,
         dtype: Union[str, torch.dtype, None] = None,
         draft_model: Union[str, os.PathLike, None] = None,
         aliases: Sequence[str] = (), prefix_cache_bytes: int = 256 * 2**20,
         lean_forward: bool = True, compile: Optional[bool] = None,
         progress: bool = True, ngram_speculation: bool = False,
         num_speculative_tokens: Optional[int] = None,
         device_map: Union[str, dict[str, Any], None] = None,
         max_memory: Optional[dict[Union[int, str], Union[int, str]]] = None) -> LLM:
    """Load a model by embedded name, local folder or hub id.

    `device=None` picks CUDA when present, else CPU; `dtype=None` picks bfloat16 on a GPU,
    float32 on a CPU. Speculative decoding, for requests that bring no prediction of their
    own: `draft_model` (a smaller model with the same tokenizer) or `ngram_speculation`
    (prompt lookup) proposes `num_speculative_tokens` tokens per step (default 4 for a
    draft, 8 for n-grams and predictions), which the model checks in one forward; outputs
    follow the model's own distribution exactly. `aliases` are extra names requests may
    use in `model`.
    `prefix_cache_bytes` bounds the prompt KV kept for reuse across requests;
    `lean_forward=False` runs the HF forward even where the lean one applies. `compile`
    decides whether the lean forward's decode step (up to 16 rows) is compiled by inductor:
    `None` compiles it on a CPU (once per model shape and machine, about 25 s in a child
    process, then kept on disk; decoding then runs several times faster), `False` keeps
    everything eager; its state shows in the `LLM`'s repr and is logged (logger
    "toolkit"). `device_map` ("auto", or a dict of module name to device) spreads a model
    too large for one device over several through accelerate (install `accelerate`):
    `max_memory` ({0: "20GiB", "cpu": "60GiB"}) caps each, and what does not fit is
    offloaded to disk; the engine then runs the HF forward, whose hooks move weights and
    activations (the repr says where the model lies), and `device` is ignored. `progress` shows a
    bar (tokens, tokens/s) for whole requests that run longer than 2 s (`llm.progress`
    switches it later); a stream shows its own progress.
    """
    spec = {"name_or_path": os.fspath(name_or_path), "device": device, "dtype": dtype,
            "draft_model": None if draft_model is None else os.fspath(draft_model),
            "aliases": list(aliases), "prefix_cache_bytes": prefix_cache_bytes,
            "lean_forward": lean_forward, "compile": compile, "progress": progress,
            "ngram_speculation": ngram_speculation,
            "num_speculative_tokens": num_speculative_tokens, "device_map": device_map,
            "max_memory": max_memory}
    if isinstance(aliases, str):
        raise InvalidRequestError("aliases must be a list of names, not a string", "aliases")
    if num_speculative_tokens is not None and (
            isinstance(num_speculative_tokens, bool) or not isinstance(num_speculative_tokens, int)
            or not 1 <= num_speculative_tokens <= MAX_SPECULATIVE_TOKENS):
        raise InvalidRequestError(f"num_speculative_tokens must be an integer from 1 to "
                                  f"{MAX_SPECULATIVE_TOKENS}, got {num_speculative_tokens!r}",
                                  "num_speculative_tokens")
    if draft_model is not None and ngram_speculation:
        raise InvalidRequestError("speculate with a draft_model or with ngram_speculation, "
                                  "not both", "ngram_speculation")
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise InvalidRequestError("device_map places a model through accelerate: pip install "
                                  "'toolkit[scale]'", "device_map")
    dev = resolve_device(None if device_map is not None else device)
    dt = resolve_dtype(dtype, dev)
    target = load_pretrained(name_or_path, dev, dt, device_map, max_memory)
    dev = input_device(target.model)
    draft = None
    if draft_model is not None:
        draft = load_pretrained(draft_model, dev, dt)
        if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
            raise InvalidRequestError(f"draft model {draft.info.name!r} does not share the "
                                      f"tokenizer of {target.info.name!r}", "draft_model")
    return LLM(target, device=dev, dtype=dt, draft=draft, aliases=aliases, spec=spec,
               prefix_cache_bytes=prefix_cache_bytes, lean_forward=lean_forward,
               compile=compile, progress=progress, ngram_speculation=ngram_speculation,
               num_speculative_tokens=num_speculative_tokens)
