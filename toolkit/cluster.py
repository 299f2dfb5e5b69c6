"""Sweeps on a Ray cluster: one engine actor per GPU (or per CPU worker), the grid as tasks.

`toolkit.sweep(llm, ..., executor="ray")` (or `executor=RayExecutor(workers=4)`) runs the
sweep's batches of settings on engine actors instead of `llm` itself (`toolkit.score`, its
chunks of texts likewise). Each actor loads the model from `llm.spec`, the small picklable
description `toolkit.load` keeps, so the same engine is rebuilt in every worker process.
The tasks are the batches the local sweep runs (settings that differ only in sampling
knobs, sharing one decode loop), so the frame equals the local sweep's, row for row, in
the same order.

Ray does the fault tolerance (no scheduler of ours): an actor whose process dies is
restarted, model and all, and its unfinished tasks are retried on it (`max_restarts`,
`max_task_retries`), as is a task that failed in a way another try may mend
(`TRANSIENT`). A task that still fails raises `SweepError`, which carries the rows already
gathered: partial results are never silently dropped. Ray is an optional extra
(`pip install 'toolkit[scale]'`); `ray.init()` is called for you if no cluster is
connected (a local one on this machine).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence, Union

import pandas as pd
import torch

RETRIES = 3          # restarts of a dead actor, and retries of a task, before giving up
# Failures worth another try (out of memory, a file system hiccup), unlike a bad request.
TRANSIENT = [RuntimeError, OSError, MemoryError]


class SweepError(RuntimeError):
    """A sweep task failed for good; `partial` holds the rows of the tasks that finished."""

    def __init__(self, message: str, partial: pd.DataFrame) -> None:
        super().__init__(message)
        self.partial = partial


class EngineActor:
    """An engine in a Ray worker process, built from an `LLM.spec`."""

    def __init__(self, spec: dict[str, Any], threads: int) -> None:
        import toolkit

        torch.set_num_threads(threads)
        self.llm = toolkit.load(**{**spec, "progress": False})

    def run(self, task: Callable[[Any], pd.DataFrame]) -> pd.DataFrame:
        return task(self.llm)


class RayExecutor:
    """Runs a sweep's tasks on `workers` engine actors (default: one per GPU of the
    cluster, else one per CPU), each with `gpus` GPUs and `cpus` CPUs, and torch using
    `threads` threads (default: as many as here: a CPU matrix product sums in an order
    that depends on the thread count, so only then are CPU numbers bit-identical to a
    local sweep's)."""

    def __init__(self, workers: Optional[int] = None, cpus: float = 1, gpus: float = 0,
                 threads: Optional[int] = None) -> None:
        self.workers, self.cpus, self.gpus, self.threads = workers, cpus, gpus, threads
        self.actors: list[Any] = []      # kept for the next sweep of the same model
        self._built_for: Any = None
        self.completed = 0               # tasks finished so far (for progress and tests)

    def map(self, llm: Any, tasks: Sequence[Callable[[Any], pd.DataFrame]]
            ) -> Iterator[tuple[int, pd.DataFrame]]:
        """(index, frame) of each task as it finishes. Closing the iterator (or an
        interrupt) cancels what is left; the actors stay for the next sweep of the same
        model until `close()`."""
        ray = _ray()
        self._start(ray, llm)
        self.completed = 0
        queue, pending, finished = list(enumerate(tasks)), {}, []
        try:
            for worker in self.actors:                   # one task per actor at a time
                if queue:
                    k, task = queue.pop(0)
                    pending[self._submit(worker, task)] = (k, worker)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                k, worker = pending.pop(done[0])
                try:
                    frame = ray.get(done[0])
                except ray.exceptions.RayError as err:
                    raise SweepError(f"a task failed for good ({err}); {len(finished)} of "
                                     f"{len(tasks)} tasks finished: their rows are in this "
                                     f"error's .partial",
                                     pd.concat(finished, ignore_index=True) if finished
                                     else pd.DataFrame()) from err
                self.completed += 1
                finished.append(frame)
                yield k, frame
                if queue:
                    k, task = queue.pop(0)
                    pending[self._submit(worker, task)] = (k, worker)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    @staticmethod
    def _submit(worker: Any, task: Callable[[Any], pd.DataFrame]) -> Any:
        return worker.run.options(retry_exceptions=TRANSIENT).remote(task)

    def _start(self, ray: Any, llm: Any) -> None:
        """Engine actors for `llm` (those of the last sweep, if it was of the same model)."""
        threads = self.threads or torch.get_num_threads()
        if self.actors and self._built_for == (llm.spec, threads):
            return
        self.close()
        resources = ray.cluster_resources()
        gpus = self.gpus or (1 if resources.get("GPU") and llm.device.type == "cuda" else 0)
        count = self.workers or int(resources.get("GPU", 0) if gpus
                                    else resources.get("CPU", 1) // self.cpus)
        actor = ray.remote(EngineActor).options(
            num_cpus=self.cpus, num_gpus=gpus, max_restarts=RETRIES, max_task_retries=RETRIES)
        self.actors = [actor.remote(llm.spec, threads) for _ in range(max(1, count))]
        self._built_for = (dict(llm.spec), threads)

    def close(self) -> None:
        """Stop the engine actors."""
        if self.actors:
            ray = _ray()
            for worker in self.actors:
                ray.kill(worker, no_restart=True)
        self.actors, self._built_for = [], None


def each(llm: Any, tasks: Sequence[Callable[[Any], pd.DataFrame]],
         executor: Union[str, RayExecutor, None]) -> Iterator[tuple[int, pd.DataFrame]]:
    """(index, frame) of each task: run here on `llm`, in order, or on an executor's engines
    as they finish ("ray": one made for these tasks alone, stopped after them)."""
    if executor is None:
        for k, task in enumerate(tasks):
            yield k, task(llm)
        return
    owned = RayExecutor() if executor == "ray" else None
    try:
        yield from (owned or executor).map(llm, tasks)
    finally:
        if owned is not None:
            owned.close()


def _ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ImportError("executor='ray' needs Ray: pip install 'toolkit[scale]'") from err
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    return ray
