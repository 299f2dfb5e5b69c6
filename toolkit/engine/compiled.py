"""The decode step of the lean family (one token for each of a few rows), compiled by
inductor.

Why: at batch 1 a decode step of a small model is ~200 tensor ops, and on a CPU dispatching
them costs more than their arithmetic; inductor fuses them into a few dozen C++ loops. Each
matrix-vector product is written as a multiply-and-sum instead of a matmul so that inductor
fuses the widening of the weight into its loop: weights are kept in the narrowest float
type that holds every value exactly (the zoo ships float16), half the bytes stream from
memory per token, and the arithmetic is float32 all the same. Results match the eager
forward to float32 rounding.

Large batches stay on the eager forward (`CompiledStep.max_rows`): a multiply-and-sum
reads the weights once per row, a matmul once for all rows, and the dispatch cost that
compiling saves is shared by the rows anyway.

The step is a pure function of its inputs (weights are arguments, not captured), so models
of the same shape share one compiled package, built ahead of time by AOTInductor in a child
process while requests decode eagerly, and kept on disk for later processes. It reads the
cache, returns the new tokens' keys and values, and the caller writes them; the number of
rows, the cache's capacity and the attended length are dynamic sizes, so one package serves
every batch and length.
"""
from __future__ import annotations

import atexit
import hashlib
import inspect
import json
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Optional, Sequence

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


def _step(weights: tuple, shape: tuple, tokens: torch.Tensor, positions: torch.Tensor,
          keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor) -> tuple:
    """Decode `tokens` [B] at `positions` [B], one per cache row, attending to the cached
    `keys`/`values` [layers, B, kv, capacity, dim] before them; `length` [B, S] marks which
    of each row's first S cached positions are real. Returns (hidden [B, H], logits [B, V],
    residual stream after each layer [B, layers, H], new keys and values [B, layers, kv,
    dim], routing ([B, layers, k] experts and weights) or None)."""
    embed, norm, head, cos_table, sin_table, layers = weights
    heads, kv, dim, eps, per_token = shape
    B, S = length.shape
    cos = cos_table[positions].float()[:, None]                     # [B, 1, dim]
    sin = sin_table[positions].float()[:, None]
    x = F.embedding(tokens, embed).float()                          # [B, H]
    hide = ~length[:, None, None, :]
    streams, new_k, new_v, experts, routed = [], [], [], [], []
    for i, (ln_in, qkv, qkv_bias, o, ln_post, mlp) in enumerate(layers):
        h = _norm(x, ln_in, eps)
        a = _mv(h, qkv)
        if qkv_bias is not None:
            a = a + qkv_bias.float()
        a = a.view(B, heads + 2 * kv, dim)
        qk = rope(a[:, :heads + kv], cos, sin)
        q, k, v = qk[:, :heads].view(B, kv, heads // kv, dim), qk[:, heads:], a[:, heads + kv:]
        new_k.append(k)
        new_v.append(v)
        old_k, old_v = keys[i, :, :, :S].float(), values[i, :, :, :S].float()  # [B, kv, S, d]
        scores = torch.cat([torch.einsum("bkgd,bksd->bkgs", q, old_k).masked_fill(
                            hide, float("-inf")),
                            (q * k[:, :, None]).sum(-1, keepdim=True)], -1) * dim ** -0.5
        p = scores.softmax(-1)
        att = (torch.einsum("bkgs,bksd->bkgd", p[..., :-1], old_v)
               + p[..., -1:] * v[:, :, None])
        x = x + _mv(att.reshape(B, -1), o)
        h = _norm(x, ln_post, eps)
        if len(mlp) == 2:                          # dense: gate_up [2I, H], down [H, I]
            gate, up = _mv(h, mlp[0]).chunk(2, -1)
            x = x + _mv(F.silu(gate) * up, mlp[1])
        else:                                      # Mixtral: router, experts' gate_up, down
            router, gate_up, down = mlp
            w, e = _mv(h, router).softmax(-1).topk(per_token)          # [B, k]
            w = w / w.sum(-1, keepdim=True)
            gate, up = _mv(h[:, None], gate_up[e]).chunk(2, -1)      # [B, k, I] each
            x = x + (_mv(F.silu(gate) * up, down[e]) * w[..., None]).sum(1)
            experts.append(e)
            routed.append(w)
        streams.append(x)
    hidden = _norm(x, norm, eps)
    route = (torch.stack(experts, 1), torch.stack(routed, 1)) if experts else None
    return (hidden, _mv(hidden, head), torch.stack(streams, 1), torch.stack(new_k, 1),
            torch.stack(new_v, 1), route)


class _Step(torch.nn.Module):
    """`_step` with the model's shape constants bound, as `torch.export` takes it."""

    def __init__(self, shape: tuple) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, weights: tuple, tokens: torch.Tensor, positions: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor) -> tuple:
        return _step(weights, self.shape, tokens, positions, keys, values, length)


def _describe(t: Any) -> Any:
    """A pytree of tensors as JSON: lists for tuples, {shape, dtype} for tensors."""
    if isinstance(t, tuple):
        return [_describe(x) for x in t]
    return None if t is None else {"shape": list(t.shape),
                                   "dtype": str(t.dtype).removeprefix("torch.")}


def _zeros(spec: Any, device: str) -> Any:
    """Tensors of the described shapes and dtypes (values do not matter to a compile)."""
    if isinstance(spec, list):
        return tuple(_zeros(x, device) for x in spec)
    return None if spec is None else torch.zeros(spec["shape"],
                                                 dtype=getattr(torch, spec["dtype"]),
                                                 device=device)


def build(spec: dict, path: Path) -> None:
    """Export `_step` for the model `spec` describes and compile it with AOTInductor into
    a package at `path` (written whole or not at all)."""
    from torch.export import Dim, export

    device = spec["device"]
    weights = _zeros(spec["weights"], device)
    layers, kv, dim = spec["cache"]
    cache_dtype = getattr(torch, spec["cache_dtype"])
    keys = torch.zeros(layers, 3, kv, 8, dim, dtype=cache_dtype, device=device)
    length = torch.arange(6, device=device)[None] < torch.tensor([[5], [3], [4]],
                                                                  device=device)
    token = torch.zeros(3, dtype=torch.long, device=device)
    position = torch.tensor([5, 3, 4], device=device)
    rows = Dim("rows", min=1, max=4096)
    capacity, attended = Dim("capacity", min=4, max=2**20), Dim("attended", min=2, max=2**20)
    dynamic = {"weights": torch.utils._pytree.tree_map(lambda _: None, weights),
               "tokens": {0: rows}, "positions": {0: rows}, "keys": {1: rows, 3: capacity},
               "values": {1: rows, 3: capacity}, "length": {0: rows, 1: attended}}
    with torch.inference_mode():
        program = export(_Step(tuple(spec["shape"])), (weights, token, position, keys,
                                                        keys.clone(), length),
                         dynamic_shapes=dynamic)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
        torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
    os.replace(partial, path)


def cache_dir() -> Path:
    """Where compiled steps are kept: `$TOOLKIT_CACHE_DIR`, else ~/.cache/toolkit."""
    root = os.environ.get("TOOLKIT_CACHE_DIR") or Path.home() / ".cache" / "toolkit"
    return Path(root) / "compiled-steps"


def _build_command(spec_file: Path, path: Path) -> list[str]:
    """The child: lowered in priority before its first import (the compiler processes it
    starts inherit that), then this module's `main`."""
    start = ("import os\ntry: os.nice(15)\nexcept OSError: pass\nimport runpy\n"
             "runpy.run_module('toolkit.engine.compiled', run_name='__main__')")
    return [sys.executable, "-c", start, str(spec_file), str(path)]


_builds: dict[Path, threading.Event] = {}     # packages being built by this process
_builds_lock = threading.Lock()
# One compile child at a time: on a small CPU, several would crowd out the requests
# decoding meanwhile (an OpenMP team stalls whenever one of its threads loses its core).
_one_child = threading.Semaphore(1)


def _build_in_child(spec: dict, path: Path) -> None:
    """Build the package in a child process at low priority, once per process however
    many models share the shape. A child, not a thread: compiling is seconds of Python
    that would hold the GIL against the requests decoding meanwhile."""
    with _builds_lock:
        running = _builds.get(path)
        mine = running is None
        if mine:
            running = _builds[path] = threading.Event()
    if not mine:
        running.wait()
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        spec_file = path.with_suffix(f".{os.getpid()}.json")
        spec_file.write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            with _one_child:
                done = subprocess.run(_build_command(spec_file, path), capture_output=True,
                                      text=True, env=env)
        finally:
            spec_file.unlink(missing_ok=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip()[-500:] or f"exit code {done.returncode}")
    finally:
        with _builds_lock:
            del _builds[path]
        running.set()


# Threads loading a package. A daemon thread that frees a tensor while the interpreter
# exits aborts the process ("terminate called without an active exception": the free
# takes the GIL, which makes the thread exit through a C++ destructor), as about one
# process in 35 did that dropped its model right after `toolkit.load`. So the thread
# never owns the model (it holds the step by a weak reference), and at exit the loads in
# progress are waited for and none starts. (A thread still waiting for its compile child
# is left as it is: it frees nothing, and the child finishes on its own.)
_loaders: set[threading.Thread] = set()
_loaders_lock = threading.Lock()
_exiting = False


@atexit.register
def _finish_loads() -> None:
    global _exiting
    with _loaders_lock:
        _exiting = True
        loading = list(_loaders)
    for thread in loading:
        thread.join(timeout=60)


def _prepare(ref: "weakref.ref[CompiledStep]", spec: dict, path: Path) -> None:
    """A step's package, built if missing, then loaded and handed to the step if it is
    still alive. Everything after the build runs where the exit waits for it (`_loaders`):
    what the thread frees, it frees before the interpreter goes."""
    started = time.perf_counter()
    error: Optional[BaseException] = None
    if not path.exists():
        log.info("toolkit: compiling the decode step in the background")
        try:
            _build_in_child(spec, path)
            if not path.exists():
                raise RuntimeError("the compile process wrote no package")
        except Exception as err:
            error = err
    with _loaders_lock:
        if _exiting:
            return
        _loaders.add(threading.current_thread())
    try:
        fn = None
        if error is None:
            try:
                fn = torch._inductor.aoti_load_package(str(path))
            except Exception as err:
                error = err
        log.info("toolkit: decode step %s in %.1f s", "unavailable" if error else "ready",
                 time.perf_counter() - started)
        step = ref()
        if step is not None:
            step.fn, step.error = fn, error
            step._done.set()
        del step, fn
    finally:
        with _loaders_lock:
            _loaders.discard(threading.current_thread())


class CompiledStep:
    """`_step` compiled for one `LeanModel`, ready from a package on disk or built in the
    background from construction on.

    The package is compiled ahead of time by AOTInductor, in a child process at low
    priority, and kept under `cache_dir()`, keyed by the model's shapes and dtypes, the
    torch version and `_step`'s source: a model shape compiles once per machine, and a
    later process loads it in milliseconds. Until it is ready, or if it fails (no C++
    compiler, say), calls return None and the caller runs the eager forward; a failure is
    reported once, as a warning, on the next call. Requests decoding meanwhile run as fast
    as without it: the child shares no interpreter lock with them and yields the cores.
    """

    # A multiply-and-sum reads the weights once per row; a matmul once for all rows. On 2
    # cores, tiny-code: the compiled step ran n=2..8 at 2-3.4x the eager batch, n=16 even,
    # n=64 at 0.7x.
    max_rows = 16

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
        shape = (lean.num_heads, lean.kv_heads, lean.head_dim, lean.eps,
                 lean.experts_per_token)
        self.spec = {"weights": _describe(self.weights), "shape": list(shape),
                     "cache": [len(lean.layers), lean.kv_heads, lean.head_dim],
                     "cache_dtype": str(lean.dtype).removeprefix("torch."),
                     "device": lean.device.type}
        key = hashlib.sha256(json.dumps([self.spec, torch.__version__,
                                         inspect.getsource(_step)]).encode()).hexdigest()
        self.path = cache_dir() / f"{key[:24]}.pt2"
        self.fn: Any = None
        self.error: Optional[BaseException] = None
        self._warned = False
        self._done = threading.Event()
        threading.Thread(target=_prepare, args=(weakref.ref(self), self.spec, self.path),
                         name="toolkit-compile", daemon=True).start()

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

    def __call__(self, cache: KVCache, tokens: torch.Tensor, positions: Sequence[int]
                 ) -> Optional[tuple]:
        """(hidden [B, H], logits [B, V], streams [B, layers, H], routing) for one token per
        cache row at `positions`, its keys and values written; None while the step is
        compiling or if it could not be compiled."""
        if not self._done.is_set():
            return None
        if self.error is not None:
            if not self._warned:
                self._warned = True
                warnings.warn(f"toolkit: the compiled decode step is unavailable "
                              f"({self.error!s:.200}); decoding with the eager forward",
                              RuntimeWarning, stacklevel=3)
            return None
        return self._run(cache, tokens, positions)

    @torch.inference_mode()
    def _run(self, cache: KVCache, tokens: torch.Tensor, positions: Sequence[int]) -> tuple:
        # Never attend over fewer than 2 slots, and keep the cache longer than the attended
        # slots (the sizes the package was exported for).
        attended = max(max(positions), 2)
        cache.ensure(max(attended + 1, 4))
        device = tokens.device
        at = torch.tensor(positions, device=device)
        length = torch.arange(attended, device=device)[None] < at[:, None]
        hidden, logits, streams, k, v, route = self.fn(self.weights, tokens, at, cache.k,
                                                       cache.v, length)
        rows = torch.arange(len(positions), device=device)
        cache.k[:, rows, :, at] = k.to(cache.k.dtype)
        cache.v[:, rows, :, at] = v.to(cache.v.dtype)
        dtype = self.lean.dtype
        return hidden.to(dtype), logits, streams.to(dtype), route


def main() -> None:
    """The child process: `python -m toolkit.engine.compiled SPEC.json PACKAGE.pt2`."""
    spec_file, path = sys.argv[-2:]
    build(json.loads(Path(spec_file).read_text()), Path(path))


if __name__ == "__main__":
    main()
