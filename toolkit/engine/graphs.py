"""The lean decode step replayed as CUDA graphs, over KV caches of fixed sizes.

Why: a decode step of a 16-layer model is a few hundred small kernels, and launching them one
by one from Python takes longer than the GPU needs to run them (on an H200, 5.9 ms a token
for a 1B model whose weights stream in 0.5 ms). A CUDA graph launches the whole step at
once. A graph holds the addresses of everything it touches, so it is captured on a `Slot`:
a KV cache of fixed rows and capacity (each rounded up to a power of two, so few sizes
exist) with fixed input and output buffers. Jobs lease slots from a pool and hand them back
when they end, so the graphs outlive the jobs that captured them; a job whose rows outgrow
their capacity moves to a slot twice as long.

The step inside the graph is the eager lean forward in its static form (every position of
the cache attended under a mask, MoE layers run densely): the same code, and on a CPU, where
there is nothing to capture, the same code runs eagerly over the same slots (tests check the
bookkeeping there). Every layer's residual stream is an output, so one graph serves every
request's `activation_layers`.

Inside a graph each kernel still costs a few microseconds, and the eager step is some 25
kernels per layer (norms, rotary embedding, cache writes, attention, activations): on an
H200 the graphed step of a 1B model took 1.8 ms against 0.47 ms of weight reads. With
`fuse`, the static step is first compiled by inductor (as gpt-fast does), which fuses the
elementwise work around the matrix products into a few kernels per layer, and the compiled
step is what the graph captures. It compiles once per model and process (and again once
for the first slot of another size, after which sizes are dynamic); should it fail, the
step warns and runs uncompiled. (Opt-in, `TOOLKIT_FUSED_GRAPHS=1`, until it is measured
on a GPU: see benchmarks/README.md.)
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Optional, Sequence

import torch

from .lean import KVCache, LeanModel
from .transfer import to_device

MIN_CAPACITY = 256      # the shortest cache a slot holds: short requests share one size
IDLE_SLOTS = 2          # slots of one size kept for later jobs once handed back


def bucket(n: int, least: int = 1) -> int:
    """The power of two at or above max(n, least)."""
    return 1 << (max(n, least) - 1).bit_length()


class Slot:
    """A KV cache of one size, its step's input and output buffers, and its graph."""

    def __init__(self, lean: LeanModel, rows: int, capacity: int) -> None:
        # (normal tensors, though made inside the engine's inference mode: a compiled step
        # runs outside it, and cannot write inference tensors there)
        with torch.inference_mode(False):
            self.cache = lean.new_cache(rows, capacity)
            self.tokens = torch.zeros(rows, dtype=torch.long, device=lean.device)
            self.positions = torch.zeros(rows, dtype=torch.long, device=lean.device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.outputs: Optional[tuple] = None

    @property
    def size(self) -> tuple[int, int]:
        return self.cache.k.shape[1], self.cache.capacity


class PooledCache(KVCache):
    """A job's KV cache: the first `rows` rows of a leased slot. Growing past its capacity
    moves it to a longer slot; collecting it hands its slot back."""

    def __init__(self, step: "GraphStep", rows: int, capacity: int) -> None:
        self.step, self.rows = step, rows
        self.slot = step.lease(rows, capacity)

    @property
    def k(self) -> torch.Tensor:
        return self.slot.cache.k[:, :self.rows]

    @property
    def v(self) -> torch.Tensor:
        return self.slot.cache.v[:, :self.rows]

    @property
    def capacity(self) -> int:
        return self.slot.cache.capacity

    def ensure(self, length: int) -> None:
        if length > self.capacity:
            old = self.slot
            self.slot = self.step.lease(self.rows, length)
            held = old.cache.capacity
            self.slot.cache.k[:, :self.rows, :, :held] = old.cache.k[:, :self.rows]
            self.slot.cache.v[:, :self.rows, :, :held] = old.cache.v[:, :self.rows]
            self.step.give_back(old)

    def __del__(self) -> None:
        self.step.give_back(self.slot)


class GraphStep:
    """Decode steps of one `LeanModel` as CUDA graphs, one per slot, captured on the slot's
    first step (`capture=False` runs the same static step without graphs: on a CPU).
    `fuse` compiles the static step with inductor first (see the module's docstring)."""

    max_rows = 1024     # a batch larger than this decodes eagerly

    def __init__(self, lean: LeanModel, capture: bool, fuse: bool = False) -> None:
        self.lean = lean
        self.capture = capture
        self.error: Optional[BaseException] = None   # a capture failed: eager from then on
        self.fused = torch.compile(self._static, fullgraph=True) if fuse else None
        self.taps = tuple(range(len(lean.layers)))
        self.idle: dict[tuple[int, int], list[Slot]] = defaultdict(list)

    @property
    def state(self) -> str:
        if self.error is not None:
            return "unavailable"
        kind = "CUDA graphs" if self.capture else "static, not captured"
        return kind + (", fused" if self.fused is not None else "")

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Ready unless a capture failed: graphs are captured on each slot's first step."""
        return self.error is None

    def new_cache(self, rows: int, capacity: int) -> PooledCache:
        return PooledCache(self, rows, capacity)

    def lease(self, rows: int, capacity: int) -> Slot:
        size = (bucket(rows), bucket(capacity, MIN_CAPACITY))
        idle = self.idle[size]
        return idle.pop() if idle else Slot(self.lean, *size)

    def give_back(self, slot: Slot) -> None:
        idle = self.idle[slot.size]
        if len(idle) < IDLE_SLOTS:
            idle.append(slot)

    def __call__(self, cache: PooledCache, tokens: torch.Tensor, positions: Sequence[int]
                 ) -> Optional[tuple]:
        """(hidden [B, H], logits [B, V], streams [B, layers, H], routing or None) for one
        token per row of the job at `positions`, their keys and values written; None if
        graphs are unavailable (a capture failed: the caller runs the eager forward, and the
        failure is reported once, as a warning)."""
        if self.error is not None:
            return None
        cache.ensure(max(positions) + 1)
        slot, n = cache.slot, len(positions)
        slot.tokens[:n].copy_(tokens)
        slot.positions[:n].copy_(to_device(positions, slot.positions.device))
        if not self.capture:
            outputs = self._step(slot)
        else:
            if slot.graph is None:
                try:
                    self._capture(slot)
                except Exception as err:            # an op the graph cannot hold
                    self.error = err
                    warnings.warn(f"toolkit: CUDA graphs are unavailable for this model "
                                  f"({err!s:.200}); decoding with the eager forward",
                                  RuntimeWarning, stacklevel=3)
                    return None
            slot.graph.replay()
            outputs = slot.outputs
        hidden, logits, streams, route = outputs
        keep = lambda t: t[:n].clone()      # the next replay overwrites the outputs
        return (keep(hidden), keep(logits), keep(streams),
                None if route is None else tuple(map(keep, route)))

    def _step(self, slot: Slot) -> tuple:
        if self.fused is not None:
            try:
                with torch.inference_mode(False):       # (see `Slot`)
                    return self.fused(slot)
            except Exception as err:                    # inductor could not compile it
                self.fused = None
                warnings.warn(f"toolkit: the fused decode step is unavailable "
                              f"({err!s:.200}); stepping with the uncompiled one",
                              RuntimeWarning, stacklevel=4)
        return self._static(slot)

    def _static(self, slot: Slot) -> tuple:
        """The static step over a slot's cache and buffers: what a graph captures."""
        hidden, route, layers = self.lean.forward(
            slot.tokens[:, None], slot.positions[:, None], slot.cache, slice(None),
            self.taps, span=slot.cache.capacity, static=True)
        hidden = hidden[:, 0]
        route = None if route is None else (route[0][:, 0], route[1][:, 0])
        return hidden, self.lean.logits(hidden), layers[:, 0], route

    def _capture(self, slot: Slot) -> None:
        """Warm up on a side stream (as CUDA graphs require), then capture. Both run the
        step the caller asked for: it writes the same keys and values each time."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(slot)
        torch.cuda.current_stream().wait_stream(side)
        slot.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(slot.graph, capture_error_mode="thread_local"):
            slot.outputs = self._step(slot)
