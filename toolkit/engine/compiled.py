"""The one-row decode step of the lean family, compiled by inductor.

Why: at batch 1 a decode step of a small model is ~200 tensor ops, and on a CPU dispatching
them costs more than their arithmetic; inductor fuses them into a few dozen C++ loops. Each
matrix-vector product is written as a multiply-and-sum instead of a matmul so that inductor
fuses the widening of the weight into its loop: weights are kept in the narrowest float
type that holds every value exactly (the zoo ships float16), half the bytes stream from
memory per token, and the arithmetic is float32 all the same. Results match the eager
forward to float32 rounding.

Batches of rows stay on the eager forward: there a matmul reads each weight once for all
rows and the dispatch cost is shared, so compiling would buy little for its compile time.

The step is a pure function of its inputs (weights are arguments, not captured), so models
of the same shape share one compiled graph, compiled in the background while requests
decode eagerly. It reads the cache, returns the new token's keys and values, and the
caller writes them; the cache's capacity and the attended length are dynamic sizes, so one
graph serves every length.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .lean import KVCache, LeanModel, rope

log = logging.getLogger("toolkit")


def narrowest(w: torch.Tensor) -> torch.Tensor:
    """`w` as float16 or bfloat16 when that holds every value exactly, else `w` itself."""
    for dtype in (torch.float16, torch.bfloat16):
        if w.dtype.itemsize > dtype.itemsize:
            narrow = w.to(dtype)
            if torch.equal(narrow.to(w.dtype), w):
                return narrow
    return w


def _mv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] float32 times w [out, in] in any float type: [..., out] float32."""
    return (x[..., None, :] * w.float()).sum(-1)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight.float(), eps)


def _step(weights: tuple, shape: tuple, token: torch.Tensor, position: torch.Tensor,
          keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor) -> tuple:
    """Decode `token` [1] at `position` [1] attending to the cached `keys`/`values`
    [layers, kv, capacity, dim] before it; `length` [S] marks which of the first S cached
    positions are real. Returns (hidden [H], logits [V], residual stream after each layer
    [layers, H], new keys and values [layers, kv, dim], routing or None)."""
    embed, norm, head, cos_table, sin_table, layers = weights
    heads, kv, dim, eps, per_token = shape
    S = length.shape[0]
    cos, sin = cos_table[position].float(), sin_table[position].float()     # [1, dim]
    x = F.embedding(token, embed)[0].float()
    streams, new_k, new_v, experts, routed = [], [], [], [], []
    for i, (ln_in, qkv, qkv_bias, o, ln_post, mlp) in enumerate(layers):
        h = _norm(x, ln_in, eps)
        a = _mv(h, qkv)
        if qkv_bias is not None:
            a = a + qkv_bias.float()
        a = a.view(heads + 2 * kv, dim)
        qk = rope(a[:heads + kv], cos, sin)
        q, k, v = qk[:heads].view(kv, heads // kv, dim), qk[heads:], a[heads + kv:]
        new_k.append(k)
        new_v.append(v)
        old_k, old_v = keys[i, :, :S].float(), values[i, :, :S].float()    # [kv, S, dim]
        scores = torch.cat([torch.einsum("kgd,ksd->kgs", q, old_k)
                            .masked_fill(~length, float("-inf")),
                            (q * k[:, None]).sum(-1, keepdim=True)], -1) * dim ** -0.5
        p = scores.softmax(-1)
        att = torch.einsum("kgs,ksd->kgd", p[..., :-1], old_v) + p[..., -1:] * v[:, None]
        x = x + _mv(att.reshape(-1), o)
        h = _norm(x, ln_post, eps)
        if len(mlp) == 2:                          # dense: gate_up [2I, H], down [H, I]
            gate, up = _mv(h, mlp[0]).chunk(2)
            x = x + _mv(F.silu(gate) * up, mlp[1])
        else:                                      # Mixtral: router, experts' gate_up, down
            router, gate_up, down = mlp
            w, e = _mv(h, router).softmax(-1).topk(per_token)
            w = w / w.sum()
            gate, up = _mv(h, gate_up[e]).chunk(2, -1)            # [k, I] each
            x = x + (_mv(F.silu(gate) * up, down[e]) * w[:, None]).sum(0)
            experts.append(e)
            routed.append(w)
        streams.append(x)
    hidden = _norm(x, norm, eps)
    route = (torch.stack(experts), torch.stack(routed)) if experts else None
    return (hidden, _mv(hidden, head), torch.stack(streams), torch.stack(new_k),
            torch.stack(new_v), route)


def _allow_recompiles() -> None:
    """Every model shape loaded in this process is one more graph of `_step`; dynamo's
    default limit (8) would quietly turn the ninth back to eager. (Its config is per
    thread, hence a call on each thread that compiles.)"""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


class CompiledStep:
    """`_step` compiled for one `LeanModel`, in a background thread from construction on.

    Compiling takes seconds (tens of them on a small CPU with a cold inductor cache), so no
    request waits for it: until it is ready, or if it fails (no C++ compiler, say), calls
    return None and the caller runs the eager forward; a failure is reported once, as a
    warning, on the next call.
    """

    def __init__(self, lean: LeanModel) -> None:
        self.lean = lean
        layers = []
        for layer in lean.layers:
            mlp = ((layer.gate_up, layer.down) if layer.router is None else
                   (layer.router, layer.experts_gate_up, layer.experts_down))
            layers.append((layer.ln_in, narrowest(layer.qkv), layer.qkv_bias,
                           narrowest(layer.o), layer.ln_post, tuple(map(narrowest, mlp))))
        self.weights = (lean.embed, lean.norm, narrowest(lean.lm_head), lean.cos, lean.sin,
                        tuple(layers))
        self.shape = (lean.num_heads, lean.kv_heads, lean.head_dim, lean.eps,
                      lean.experts_per_token)
        self.fn = torch.compile(_step, fullgraph=True, dynamic=False)
        self.error: Optional[BaseException] = None
        self._warned = False
        self._done = threading.Event()
        # Not a daemon: a process that ends mid-compile waits for it rather than abort.
        threading.Thread(target=self._warm_up, name="toolkit-compile").start()

    @property
    def ready(self) -> bool:
        """Whether calls now run the compiled graph."""
        return self._done.is_set() and self.error is None

    @property
    def state(self) -> str:
        """'compiling', 'compiled', or 'unavailable' (it failed; decoding stays eager)."""
        if not self._done.is_set():
            return "compiling"
        return "compiled" if self.error is None else "unavailable"

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the background compile has finished; returns `ready`."""
        self._done.wait(timeout)
        return self.ready

    def _warm_up(self) -> None:
        """Compile by stepping a throwaway one-row cache (its sizes are marked dynamic, so
        the graph it leaves behind serves every real cache). At low priority: requests
        decoding eagerly meanwhile keep the cores first (the C++ compiler processes this
        thread starts inherit its niceness). Without it, a first request of 200 tokens
        took 12.4 s during a cold compile on 2 cores; with it, 1.0 s (0.8 s eager alone)."""
        _allow_recompiles()
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
        except (AttributeError, OSError):      # not Linux, or not allowed: full priority
            pass
        started = time.perf_counter()
        log.info("toolkit: compiling the decode step in the background")
        try:
            with torch.inference_mode():
                token = torch.zeros(1, dtype=torch.long, device=self.lean.device)
                self._run(self.lean.new_cache(rows=1, capacity=4), token, 2)
        except Exception as err:
            self.error = err
        log.info("toolkit: decode step %s in %.1f s",
                 "unavailable" if self.error else "compiled", time.perf_counter() - started)
        self._done.set()

    def __call__(self, cache: KVCache, token: torch.Tensor, position: int
                 ) -> Optional[tuple]:
        """(hidden [1, H], logits [1, V], streams [1, layers, H], routing) for the token at
        `position` of the cache's only row, its keys and values written; None while the
        step is compiling or if it could not be compiled."""
        if not self._done.is_set():
            return None
        if self.error is not None:
            if not self._warned:
                self._warned = True
                warnings.warn(f"toolkit: the compiled decode step is unavailable "
                              f"({self.error!s:.200}); decoding with the eager forward",
                              RuntimeWarning, stacklevel=3)
            return None
        return self._run(cache, token, position)

    @torch.inference_mode()
    def _run(self, cache: KVCache, token: torch.Tensor, position: int) -> tuple:
        _allow_recompiles()
        token = token.clone()   # an inference tensor, as the graph was traced with
        # Never attend over fewer than 2 slots (sizes 0 and 1 would each compile a graph),
        # and keep the cache longer than the attended slots (equal sizes would too).
        attended = max(position, 2)
        cache.ensure(attended + 1)
        keys, values = cache.k[:, 0], cache.v[:, 0]
        length = torch.arange(attended, device=token.device) < position
        for t in (keys, values):
            torch._dynamo.mark_dynamic(t, 2)
        torch._dynamo.mark_dynamic(length, 0)
        pos = torch.tensor([position], device=token.device)
        hidden, logits, streams, k, v, route = self.fn(self.weights, self.shape, token, pos,
                                                       keys, values, length)
        keys[:, :, position] = k.to(keys.dtype)
        values[:, :, position] = v.to(values.dtype)
        dtype = self.lean.dtype
        route = None if route is None else (route[0][None], route[1][None])
        return hidden[None].to(dtype), logits[None], streams[None].to(dtype), route
