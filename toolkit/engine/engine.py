"""The engine: jobs from any thread, decoded together by one serving thread.

`submit(job)` returns a `Handle` at once; iterating it gives the job's `Update`s as the
serving thread produces them, and closing it (or dropping it) cancels the job. The serving
thread steps every live job in turn, one `Decoder.run` step each, so jobs join and leave a
running loop as they come and go: a request made while a stream is open (in the same
thread or another) is served beside it, and no caller ever holds the model while it waits.

Each job keeps its own batch: its numbers never depend on what else is running (a result is
bit-identical to the same request made alone), at the price of one forward per job per step.

Only the serving thread touches the model, the KV caches and the sampler; other threads
only put jobs in and take updates out. A `KeyboardInterrupt` therefore lands in a caller
waiting for updates, never half-way through a step: the caller cancels its job and the
serving thread drops it at the next step boundary. The thread exists only while there is
work, and jobs still running when the interpreter exits are cancelled, not waited for.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import CancelledError
import time
import weakref
from typing import Any, Iterator, Optional, Union

import torch

from ..models import ModelInfo
from .decode import Decoder
from .outputs import Update
from .prefix_cache import PrefixCache
from .runner import make_runner
from .sequence import Job
from .text import token_bytes_table

_POLL_S = 0.1     # a waiting caller wakes this often, so a pending Ctrl-C is seen


class Handle:
    """A submitted job: an iterator of its updates (an error in the job is raised here);
    `close()` cancels it."""

    def __init__(self, engine: "Engine", job: Job) -> None:
        self.job = job
        self.submitted = time.perf_counter()
        self.concurrent = 0              # jobs in flight when this one was submitted
        self.cancelled = False
        self.finished = False
        self._engine = engine
        self._updates: queue.SimpleQueue[Union[Update, BaseException]] = queue.SimpleQueue()

    def __iter__(self) -> Iterator[Update]:
        return self

    def __next__(self) -> Update:
        if self.finished:
            raise StopIteration
        while True:
            try:
                item = self._updates.get(timeout=_POLL_S)
                break
            except queue.Empty:
                continue
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.done
        return item

    def close(self) -> None:
        """Cancel the job (a no-op once it has finished). Safe from any thread, and from a
        finalizer: it only flags the job and wakes the serving thread."""
        if not self.finished:
            self.cancelled = True
            self._engine._wake()

    def _put(self, item: Union[Update, BaseException]) -> None:
        self._updates.put(item)


class Engine:
    def __init__(self, model: Any, tokenizer: Any, info: ModelInfo,
                 prefix_cache_bytes: int = 256 * 2**20, lean_forward: bool = True,
                 compile: Optional[bool] = None) -> None:
        self.info = info
        self.runner = make_runner(model, info, lean_forward, compile)
        self.pieces = token_bytes_table(tokenizer)
        self.device = next(model.parameters()).device
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.decoder = Decoder(self.runner, self.pieces, self.prefix_cache, self.device)
        self._cv = threading.Condition(threading.RLock())
        self._incoming: list[Handle] = []
        self._live: list[tuple[Handle, Iterator[Update]]] = []
        self._thread: Optional[threading.Thread] = None
        _ENGINES.add(self)

    @property
    def in_flight(self) -> int:
        """Jobs submitted and not yet finished or dropped."""
        with self._cv:
            return len(self._incoming) + len(self._live)

    def submit(self, job: Job) -> Handle:
        handle = Handle(self, job)
        with self._cv:
            handle.concurrent = self.in_flight + 1
            self._incoming.append(handle)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="toolkit-engine")
                self._thread.start()
            self._cv.notify_all()
        return handle

    def cancel_all(self) -> None:
        with self._cv:
            for handle in self._incoming + [h for h, _ in self._live]:
                handle.cancelled = True
            self._cv.notify_all()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # ------------------------------------------------------------------ the serving thread

    def _serve(self) -> None:
        try:
            with torch.inference_mode():
                while self._admit():
                    for handle, steps in list(self._live):
                        if not handle.cancelled:
                            self._step(handle, steps)
        except BaseException as err:       # a bug here must not leave callers waiting
            with self._cv:
                for handle in self._incoming + [h for h, _ in self._live]:
                    handle._put(err)
                self._incoming.clear()
                self._live.clear()
                self._thread = None
            raise

    def _admit(self) -> bool:
        """Start the jobs submitted since the last round and drop the cancelled ones;
        False (and the thread ends) when nothing is left."""
        with self._cv:
            for handle in self._incoming:
                self._live.append((handle, self.decoder.run(handle.job, handle.submitted)))
            self._incoming.clear()
            for handle, steps in [x for x in self._live if x[0].cancelled]:
                handle._put(CancelledError("the request was cancelled"))
                self._drop(handle, steps)
            if not self._live:
                self._thread = None
                return False
            return True

    def _step(self, handle: Handle, steps: Iterator[Update]) -> None:
        try:
            update = next(steps)
        except BaseException as err:       # the job failed: its caller gets the error
            handle._put(err)
            self._drop(handle, steps)
            return
        handle._put(update)
        if update.done:
            self._drop(handle, steps)

    def _drop(self, handle: Handle, steps: Iterator[Update]) -> None:
        with self._cv:
            steps.close()                  # frees the job's KV cache and sampler state
            self._live.remove((handle, steps))


_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def _cancel_everything() -> None:
    """At interpreter exit, before non-daemon threads are joined: cancel what runs, so an
    abandoned stream does not keep the process alive."""
    for engine in list(_ENGINES):
        engine.cancel_all()


# `threading._register_atexit` runs before the interpreter joins non-daemon threads (the
# `atexit` module runs after); concurrent.futures relies on it the same way.
getattr(threading, "_register_atexit", lambda fn: None)(_cancel_everything)
