"""Model runners: the forward passes the decode loop calls, behind one small interface.

`LeanRunner` runs the Llama family through `lean.LeanModel` with one preallocated KV cache
for all rows of a request; its decode steps run through a faster `step` where it has one:
on a CPU `compiled.CompiledStep` (up to 16 rows), on a GPU `graphs.GraphStep` (CUDA graphs,
over caches leased from its pool).
`HFRunner` runs any other causal LM through its own HF forward, one `DynamicCache` per row:
slower, but correct for every architecture transformers knows.
Both return final-norm hidden states (the activations the API reports, and what the logits
are computed from), for MoE models the experts each position was routed to, and from a
decode step the logits. `Runner` is the interface the decode loop relies on; a new runner
(CUDA graphs, a draft model) implements it and nothing else changes.
"""
from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass, fields
from typing import Any, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
import torch.nn.functional as F

from ..models import ModelInfo, input_device, placements
from . import lean
from .compiled import CompiledStep
from .graphs import GraphStep


@dataclass
class Forward:
    """Output of a forward over some positions: hidden [N, H]; routing experts and router
    weights [N, moe_layers, k] for MoE models; residual streams of tapped layers
    [N, taps, H] when asked; float32 logits [N, V] from a decode step."""

    hidden: torch.Tensor
    experts: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    layers: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None

    def select(self, index: Any) -> "Forward":
        """The rows `index` (an int keeps a leading dimension of one; a tuple of index
        tensors picks along the leading dimensions)."""
        index = [index] if isinstance(index, int) else index
        return Forward(*(None if t is None else t[index] for t in self._tensors()))

    def column(self, j: int) -> "Forward":
        """Position j of every row of a forward over [rows, T] positions."""
        return Forward(*(None if t is None else t[:, j] for t in self._tensors()))

    def _tensors(self) -> list[Optional[torch.Tensor]]:
        return [getattr(self, f.name) for f in fields(self)]


def stack(parts: Sequence[Forward]) -> Forward:
    """Forward outputs of the same rows side by side: [len(parts), rows, ...]."""
    columns = zip(*(p._tensors() for p in parts))
    return Forward(*(None if col[0] is None else torch.stack(col) for col in columns))


def concat(parts: Sequence[Forward]) -> Forward:
    """Forward outputs one after the other, along positions."""
    if len(parts) == 1:
        return parts[0]
    columns = zip(*(p._tensors() for p in parts))
    return Forward(*(None if col[0] is None else torch.cat(col) for col in columns))


class Runner(Protocol):
    """The forward passes of one model, over a per-job state (its KV cache) from `start`.
    Rows are a job's choices; a row's positions fill from 0 without gaps."""

    step: Union[CompiledStep, GraphStep, None]    # the faster decode step, where there is one

    def start(self, rows: int, capacity: int) -> Any:
        """A fresh state for `rows` rows, sized for about `capacity` positions."""

    def prefill(self, state: Any, row: int, ids: list[int], start: int,
                taps: tuple[int, ...] = (), images: Optional[dict[str, Any]] = None
                ) -> Forward:
        """Tokens `ids` at positions start.. of one row (its earlier positions filled);
        `images`: a vision-language model's image inputs for a whole prompt."""

    def fork(self, state: Any, src: int, dst: list[int], length: int) -> None:
        """Copy the first `length` positions of row `src` to the rows `dst`."""

    def decode(self, state: Any, tokens: torch.Tensor, positions: Sequence[int],
               active: torch.Tensor, taps: tuple[int, ...] = ()) -> Forward:
        """One token per row at `positions` (host integers: the step needs no device
        round trip to learn them); returns logits too. Inactive rows may be computed (and
        ignored) so that the batch keeps its shape."""

    def extend(self, state: Any, tokens: torch.Tensor, starts: Sequence[int],
               active: torch.Tensor, taps: tuple[int, ...] = ()) -> Forward:
        """T tokens per row [rows, T] at positions starts.. (the first token's), dropping
        whatever the row held from there on (rejected speculation); tensors come back as
        [rows, T, ...], logits too. Inactive rows may be computed and ignored."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of final-norm hidden states."""

    def lens(self, streams: torch.Tensor) -> torch.Tensor:
        """Float32 logits of residual streams read through the final norm and the head,
        as if the model ended at their layer (the logit lens)."""


@runtime_checkable
class MovesKV(Protocol):
    """A runner whose KV can be copied out of a job and into another: the prefix cache
    works with it."""

    def read_kv(self, state: Any, row: int, start: int, end: int) -> torch.Tensor:
        """Keys and values of positions [start, end) of a row."""

    def write_kv(self, state: Any, row: int, kv: torch.Tensor) -> None:
        """Fill a row's first positions with keys and values from `read_kv`."""


class LeanRunner:
    def __init__(self, model: Any, compile: bool = False) -> None:
        self.lean = lean.LeanModel(model)
        self.step: Union[CompiledStep, GraphStep, None] = None
        if compile:
            fuse = os.environ.get("TOOLKIT_FUSED_GRAPHS", "") not in ("", "0")
            self.step = (GraphStep(self.lean, capture=True, fuse=fuse)
                         if self.lean.device.type == "cuda" else CompiledStep(self.lean))

    def start(self, rows: int, capacity: int) -> lean.KVCache:
        if isinstance(self.step, GraphStep):
            return self.step.new_cache(rows, capacity)
        return self.lean.new_cache(rows, capacity)

    def prefill(self, cache: lean.KVCache, row: int, ids: list[int], start: int,
                taps: tuple[int, ...] = (), images: Optional[dict[str, Any]] = None
                ) -> Forward:
        """Run prompt tokens `ids` at positions start.. for one row. (The lean family
        takes no images.)"""
        t = torch.tensor([ids], device=self.lean.device)
        pos = torch.arange(start, start + len(ids), device=t.device)[None]
        out = self.lean.forward(t, pos, cache, slice(row, row + 1), taps)
        return _forward(out, lambda x: x[0])

    def fork(self, cache: lean.KVCache, src: int, dst: list[int], length: int) -> None:
        cache.copy_row(src, dst, length)

    def decode(self, cache: lean.KVCache, tokens: torch.Tensor, positions: Sequence[int],
               active: torch.Tensor, taps: tuple[int, ...] = ()) -> Forward:
        """One token per row; every row runs (finished ones too) so the batch stays fixed."""
        if self.step is not None and len(tokens) <= self.step.max_rows:
            out = self.step(cache, tokens, positions)
            if out is not None:
                hidden, logits, streams, route = out
                experts, weights = route or (None, None)
                # (views stacked: a list index would be a transfer to the device)
                layers = torch.stack([streams[:, i] for i in taps], 1) if taps else None
                return Forward(hidden, experts, weights, layers, logits)
        at = torch.tensor(positions, device=tokens.device)[:, None]
        out = self.lean.forward(tokens[:, None], at, cache, slice(None), taps,
                                span=max(positions) + 1)
        fwd = _forward(out, lambda x: x[:, 0])
        fwd.logits = self.logits(fwd.hidden)
        return fwd

    def extend(self, cache: lean.KVCache, tokens: torch.Tensor, starts: Sequence[int],
               active: torch.Tensor, taps: tuple[int, ...] = ()) -> Forward:
        """Several tokens per row. Nothing to drop: a row attends only to the positions
        up to each token's own, so what lies beyond is never read."""
        width = tokens.shape[1]
        at = (torch.tensor(starts, device=tokens.device)[:, None]
              + torch.arange(width, device=tokens.device))
        out = self.lean.forward(tokens, at, cache, slice(None), taps,
                                span=max(starts) + width)
        fwd = _forward(out, lambda x: x)
        fwd.logits = self.logits(fwd.hidden)
        return fwd

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lean.logits(hidden)

    def lens(self, streams: torch.Tensor) -> torch.Tensor:
        x = streams.to(self.lean.device, self.lean.dtype)
        return self.logits(F.rms_norm(x, (x.shape[-1],), self.lean.norm, self.lean.eps))

    def read_kv(self, cache: lean.KVCache, row: int, start: int, end: int) -> torch.Tensor:
        return cache.read(row, start, end)

    def write_kv(self, cache: lean.KVCache, row: int, kv: torch.Tensor) -> None:
        cache.write(row, 0, kv)


class HFRunner:
    step: Optional[CompiledStep] = None       # nothing is compiled for the HF forward

    def __init__(self, model: Any, info: ModelInfo) -> None:
        self.model = model
        self.base = getattr(model, model.base_model_prefix)
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.info = info
        self.device = input_device(model)
        # transformers renamed `past_key_values` to `cache` during 5.x; speak either.
        params = inspect.signature(self.base.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def start(self, rows: int, capacity: int) -> list[Any]:
        return [None] * rows

    def _run(self, caches: list[Any], row: int, ids: list[int],
             taps: tuple[int, ...] = (), images: Optional[dict[str, Any]] = None) -> Forward:
        from transformers import DynamicCache

        if caches[row] is None:
            caches[row] = DynamicCache(config=self.model.config)
        kwargs = {"output_router_logits": True} if self.info.is_moe else {}
        kwargs[self.cache_arg] = caches[row]
        for name, value in (images or {}).items():
            kwargs[name] = value.to(self.device, self.model.dtype if value.is_floating_point()
                                    else value.dtype)
        # Tapped layers' outputs come from hooks: `output_hidden_states` would copy every
        # layer, and transformers puts the final norm's output in its last slot.
        tapped: dict[int, torch.Tensor] = {}
        # (a vision-language model's decoder layers sit in its language model)
        layers = getattr(self.base, "language_model", self.base).layers if taps else []
        hooks = [layers[i].register_forward_hook(
            lambda mod, args, out, i=i: tapped.__setitem__(
                i, out[0] if isinstance(out, tuple) else out)) for i in taps]
        try:
            out = self.base(input_ids=torch.tensor([ids], device=self.device), use_cache=True,
                            **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        # (on a split model, outputs come from wherever their layers ran)
        hidden = out.last_hidden_state[0].to(self.device)
        layers = torch.stack([tapped[i][0].to(self.device) for i in taps], 1) if taps \
            else None
        if not self.info.is_moe:
            return Forward(hidden, layers=layers)
        probs = torch.stack([r[-len(ids):].float().to(self.device) for r in out.router_logits],
                            1).softmax(-1)
        weights, experts = probs.topk(self.info.experts_per_token, dim=-1)
        if getattr(self.model.config, "norm_topk_prob", True):
            weights = weights / weights.sum(-1, keepdim=True)
        return Forward(hidden, experts, weights, layers)

    def prefill(self, caches: list[Any], row: int, ids: list[int], start: int,
                taps: tuple[int, ...] = (), images: Optional[dict[str, Any]] = None
                ) -> Forward:
        return self._run(caches, row, ids, taps, images)

    def fork(self, caches: list[Any], src: int, dst: list[int], length: int) -> None:
        for d in dst:
            caches[d] = copy.deepcopy(caches[src])

    def decode(self, caches: list[Any], tokens: torch.Tensor, positions: Sequence[int],
               active: torch.Tensor, taps: tuple[int, ...] = ()) -> Forward:
        fwd = self.extend(caches, tokens[:, None], positions, active, taps)
        return Forward(*(None if t is None else t[:, 0] for t in fwd._tensors()))

    def extend(self, caches: list[Any], tokens: torch.Tensor, starts: Sequence[int],
               active: torch.Tensor, taps: tuple[int, ...] = ()) -> Forward:
        """Each active row on its own: its cache cut back to `starts`, then its tokens."""
        outs = []
        for r, (ids, start, a) in enumerate(zip(tokens.tolist(), starts, active.tolist())):
            if a and caches[r] is not None:
                _crop(caches[r], start)
            outs.append(self._run(caches, r, ids, taps) if a else None)
        live = next(o for o in outs if o is not None)
        fill = lambda get: None if get(live) is None else torch.stack(
            [get(o) if o is not None else torch.zeros_like(get(live)) for o in outs])
        fwd = Forward(*(fill(lambda o, f=f: getattr(o, f))
                        for f in ("hidden", "experts", "weights", "layers")))
        fwd.logits = self.logits(fwd.hidden)
        return fwd

    def lens(self, streams: torch.Tensor) -> torch.Tensor:
        base = getattr(self.base, "language_model", self.base)
        norm = next(getattr(base, name) for name in ("norm", "ln_f", "final_layernorm")
                    if hasattr(base, name))
        return self.logits(norm(streams.to(self.device, self.head.weight.dtype)))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float().to(self.device)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits



def _crop(cache: Any, length: int) -> None:
    """Cut a `DynamicCache` back to its first `length` positions. (A negative argument
    removes that many tokens in every transformers version; a positive one meant the
    length to keep before 5.x and is refused since.)"""
    held = cache.get_seq_length()
    if held > length:
        cache.crop(length - held)


def _forward(out: tuple, pick: Any) -> Forward:
    """A lean forward's (hidden, routing, taps), with `pick` selecting the positions."""
    hidden, route, layers = out
    experts, weights = route or (None, None)
    return Forward(*(None if t is None else pick(t)
                     for t in (hidden, experts, weights, layers)))


def make_runner(model: Any, info: ModelInfo, lean_forward: bool = True,
                compile: Optional[bool] = None) -> Runner:
    """The lean runner where the architecture allows, else the HF forward (also for a model
    split across devices: accelerate's hooks move its weights and activations). `compile=None`
    compiles the decode step where we know how: on a GPU into CUDA graphs, on a CPU-only
    machine into a package. (Not for a CPU model on a machine with CUDA: loading a CPU
    package in a process using CUDA segfaulted in torch 2.11+cu130.)"""
    if lean_forward and lean.supports(model) and not placements(model):
        if compile is None:
            device = next(model.parameters()).device.type
            compile = device == "cuda" or (device == "cpu" and not torch.cuda.is_available())
        return LeanRunner(model, compile)
    return HFRunner(model, info)
