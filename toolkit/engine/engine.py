"""The engine: jobs from any thread, decoded together, driven by the callers themselves.

`submit(job)` returns a `Handle` at once; iterating it gives the job's `Update`s. A caller
that needs an update and finds none ready runs a round: one `Decoder.run` step of every
live job, its own and everyone else's, each update put in its job's handle. If another
thread is running a round, the caller waits for it instead. So jobs join and leave a
running loop as they come and go: a request made while a stream is open (in the same
thread or another) is served beside it, the stream's updates wait in its handle, and no
caller ever holds the model while it is not stepping it. Nothing runs while nobody waits.

Why callers and not a serving thread: on a CPU, torch's OpenMP runtime keeps one team of
worker threads per thread that runs parallel work, and once the teams outnumber the cores
it stops spin-waiting between kernels: a decode step on a second thread, beside a
notebook thread that has run any torch code, ran 4x slower. Stepping on the caller's
thread keeps one team.

A server, whose callers are many short-lived worker threads and whose clients read at their
own pace, runs the rounds on one thread of the engine's own instead (`driven()`): callers
then only wait for their updates, and decoding goes on while a client is slow to read.

Each job keeps its own batch: its numbers never depend on what else is running (a result is
bit-identical to the same request made alone), at the price of one forward per job per step.

A round is never cut short: on the main thread, a Ctrl-C that arrives during a round is
held back until the round ends, then raised, so the engine's state is always whole. The
interrupted caller then cancels its job; closing a handle (or dropping it) cancels too.
At exit, the rounds other threads are running are waited for and no new one starts (see
`_no_rounds_at_exit`).
"""
from __future__ import annotations

import atexit
import signal
import threading
import time
import weakref
from collections import deque
from concurrent.futures import CancelledError
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Optional, Union

import torch

from ..models import ModelInfo, input_device
from .collector import collector_held
from .decode import Decoder
from .grammar import Grammars
from .memory import keep_freed_memory
from .outputs import Update
from .prefix_cache import PrefixCache
from .runner import make_runner
from .sequence import Job
from .text import token_bytes_table

_POLL_S = 0.1     # a caller waiting for another thread's round wakes this often
# Plain decoding steps drawn between two host syncs. A GPU then runs ahead of the host
# instead of idling while Python walks each token; on a CPU, recording 8 steps' tokens in
# one go made batch-1 decoding of tiny-code ~20% faster (866 -> 1035 tok/s, 2 cores).
DRAW_AHEAD = 8
_EXIT_WAIT_S = 30.0   # the longest a process's exit waits for rounds in progress
_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _no_rounds_at_exit() -> None:
    """Let the rounds in progress end and start no other. Why: a daemon thread (the
    driver of a server, its workers, a user's own) still inside a torch kernel when the
    interpreter finalizes is ended from within C++ code, which aborts the whole process
    ('terminate called without an active exception'; every one of 16 exits in the middle
    of a driven request did). A thread that waits for a round instead waits on a Python
    lock, where ending it is harmless."""
    deadline = time.monotonic() + _EXIT_WAIT_S
    for engine in list(_engines):                           # (each lock never released)
        engine._stepping.acquire(timeout=max(deadline - time.monotonic(), 0))


class Handle:
    """A submitted job: an iterator of its updates (an error in the job is raised here);
    `close()` cancels it."""

    def __init__(self, engine: "Engine", job: Job) -> None:
        self.job = job
        self.submitted = time.perf_counter()
        self.concurrent = 0              # jobs in flight when this one was submitted
        self.cancelled = False
        self.finished = False            # its last update (or its error) has been taken
        self._engine = engine
        self._ready: deque[Union[Update, BaseException]] = deque()

    def __iter__(self) -> Iterator[Update]:
        return self

    def __next__(self) -> Update:
        if self.finished:
            raise StopIteration
        while not self._ready:
            self._engine._advance(self)
        item = self._ready.popleft()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.done
        return item

    def close(self) -> None:
        """Cancel the job (a no-op once it has finished). Safe from any thread and from a
        finalizer: it flags the job, and drops it at once unless a round is running (that
        round's end drops it)."""
        if not self.finished:
            self.cancelled = True
            self._engine._drop_cancelled()


class CancelScope:
    """Cancels, from any thread, the jobs submitted inside `with scope:` (on the thread
    that entered it; a job submitted after `cancel()` fails at once). How a server drops
    the request of a client that went away while its response was being made: the
    request's `create` then raises `CancelledError`."""

    def __init__(self) -> None:
        self._handles: list[Handle] = []
        self._cancelled = False
        self._lock = threading.Lock()
        self._token: Any = None

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            handles = list(self._handles)
        for handle in handles:
            handle.close()

    def add(self, handle: Handle) -> None:
        with self._lock:
            self._handles.append(handle)
            cancelled = self._cancelled
        if cancelled:
            handle.close()

    def __enter__(self) -> "CancelScope":
        self._token = _scope.set(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _scope.reset(self._token)


_scope: ContextVar[Optional[CancelScope]] = ContextVar("toolkit_cancel_scope", default=None)


class Engine:
    def __init__(self, model: Any, tokenizer: Any, info: ModelInfo,
                 prefix_cache_bytes: int = 256 * 2**20, lean_forward: bool = True,
                 compile: Optional[bool] = None, draft: Optional[tuple[Any, ModelInfo]] = None,
                 ngram: bool = False, speculative_tokens: Optional[int] = None) -> None:
        self.info = info
        self.runner = make_runner(model, info, lean_forward, compile)
        self.draft = None if draft is None else make_runner(*draft, lean_forward, compile)
        self.pieces = token_bytes_table(tokenizer)
        self.device = input_device(model)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.grammars = Grammars(tokenizer, info.vocab_size)
        # On a GPU, each run of steps is queued before the host walks the run before it,
        # so the host's work per token (text, stop strings, records, response objects)
        # overlaps the device's. Not on a CPU, whose cores the host and the "device" share:
        # there it would only compute a run too many for rows that met a stop string.
        self.decoder = Decoder(self.runner, self.pieces, self.prefix_cache, self.device,
                               info.context_length, self.grammars, info.think_token_ids,
                               self.draft, ngram, speculative_tokens, chunk=DRAW_AHEAD,
                               overlap=self.device.type == "cuda")
        self._stepping = threading.Lock()     # held by the thread running a round
        self._cv = threading.Condition(threading.RLock())   # guards the lists below
        self._live: list[tuple[Handle, Iterator[Update]]] = []
        self._driver: Optional[threading.Thread] = None    # see `driven`
        self._drivers_wanted = 0
        _engines.add(self)

    @property
    def in_flight(self) -> int:
        """Jobs submitted and not yet finished or dropped."""
        with self._cv:
            return len(self._live)

    def submit(self, job: Job) -> Handle:
        handle = Handle(self, job)
        with self._cv:
            handle.concurrent = len(self._live) + 1
            self._live.append((handle, self.decoder.run(job, handle.submitted)))
            self._cv.notify_all()              # a driver waiting for work wakes up
        scope = _scope.get()
        if scope is not None:
            scope.add(handle)
        return handle

    @contextmanager
    def driven(self) -> Iterator[None]:
        """Run every round on a thread of the engine's own while the block runs (blocks
        may nest, or overlap from several threads: one driver serves them all).

        For a server: its requests come from a pool of worker threads, and on a CPU each
        thread that runs a round grows its own OpenMP team (more teams than cores made a
        step ~3x slower); one driver keeps one team, and jobs advance whether or not
        their clients are reading. Callers meanwhile only wait for their updates. Should
        the driver fail, callers step the jobs themselves again."""
        with self._cv:
            self._drivers_wanted += 1
            if self._driver is None:
                self._driver = threading.Thread(target=self._drive, daemon=True,
                                                name="toolkit-engine")
                self._driver.start()
        try:
            yield
        finally:
            with self._cv:
                self._drivers_wanted -= 1     # the driver stops after its round
                self._cv.notify_all()

    def _drive(self) -> None:
        try:
            while True:
                with self._cv:
                    if not self._drivers_wanted:
                        self._driver = None   # decided under the lock that `driven` takes
                        self._cv.notify_all()
                        return
                    if not self._live:
                        self._cv.wait(_POLL_S)
                        continue
                with self._stepping:
                    self._round()
                with self._cv:
                    self._cv.notify_all()
        except BaseException:
            with self._cv:
                self._driver = None
                self._cv.notify_all()
            raise

    def _advance(self, handle: Handle) -> None:
        """Run a round, or wait for the thread that is running one."""
        if self._driver is None and self._stepping.acquire(blocking=False):
            try:
                with _interrupts_held_back():
                    self._round()
            finally:
                self._stepping.release()
                with self._cv:
                    self._cv.notify_all()
            return
        with self._cv:
            if not handle._ready:
                self._cv.wait(_POLL_S)

    def _round(self) -> None:
        """One step of every live job, under torch's inference mode."""
        self._drop_cancelled(stepping=True)
        with torch.inference_mode(), collector_held():
            for handle, steps in list(self._live):
                try:
                    update = next(steps)
                except BaseException as err:   # the job failed: its caller gets the error
                    self._finish(handle, steps, err)
                    continue
                if update.done:
                    self._finish(handle, steps, update)
                else:
                    with self._cv:
                        handle._ready.append(update)

    def _drop_cancelled(self, stepping: bool = False) -> None:
        """Drop cancelled jobs, if no round is running (or from within one)."""
        if not stepping and not self._stepping.acquire(blocking=False):
            return
        try:
            for handle, steps in [x for x in self._live if x[0].cancelled]:
                self._finish(handle, steps, CancelledError("the request was cancelled"))
        finally:
            if not stepping:
                self._stepping.release()

    def _finish(self, handle: Handle, steps: Iterator[Update],
                last: Union[Update, BaseException]) -> None:
        """Hand a job its last update (or error) and free it."""
        with self._cv:
            handle._ready.append(last)
            self._live.remove((handle, steps))
        steps.close()                      # frees the job's KV cache and sampler state


@contextmanager
def _interrupts_held_back() -> Iterator[None]:
    """On the main thread, hold a SIGINT (Ctrl-C, a notebook's stop button) that arrives
    inside the block until it ends, then deliver it to the handler that was installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        yield
        return
    held: list[tuple[int, Any]] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        if held:
            handler(*held[0])
