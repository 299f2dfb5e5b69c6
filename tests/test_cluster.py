"""Sweeps on a local Ray cluster (two CPU workers, started here): the same frame as the local
sweep, also when a worker dies mid-sweep."""
from __future__ import annotations

import threading
import time

import pandas as pd
import pytest

import toolkit as tk
from toolkit.cluster import RayExecutor, SweepError

ray = pytest.importorskip("ray")
PROMPT = "def parse(text):\n    "
GRID = dict(temperature=[0.5, 1.0, 1.5], top_p=[0.8, 1.0])


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def eager(llama_dir):
    # the workers rebuild it from its spec: eager on both sides, so that no number depends
    # on whether a compiled step was ready; on the CPU, where the (GPU-less) workers run
    return tk.load(llama_dir, device="cpu", dtype="float32", compile=False, progress=False)


def _sweep(llm, **kwargs):
    return tk.sweep(llm, PROMPT, n=3, max_tokens=8, seed=2, batch=1, progress=False,
                    **GRID, **kwargs)


def test_a_ray_sweep_equals_the_local_one(cluster, eager):
    executor = RayExecutor(workers=2)
    try:
        remote = _sweep(eager, executor=executor)
        assert len(executor.actors) == 2 and executor.completed == 6
        actors = list(executor.actors)
        again = _sweep(eager, executor=executor)          # the same engines, still up
        assert executor.actors == actors
    finally:
        executor.close()
    local = _sweep(eager)
    pd.testing.assert_frame_equal(remote, local)
    pd.testing.assert_frame_equal(again, local)
    pd.testing.assert_frame_equal(_sweep(eager, executor="ray"), local)   # made and stopped


def test_a_worker_killed_mid_sweep_is_replaced(cluster, eager):
    executor = RayExecutor(workers=2)
    killed_at = []

    def kill_one():
        deadline = time.monotonic() + 120
        while executor.completed < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        killed_at.append(executor.completed)
        ray.kill(executor.actors[0], no_restart=False)       # Ray restarts it

    killer = threading.Thread(target=kill_one)
    killer.start()
    try:
        remote = _sweep(eager, executor=executor)
    finally:
        killer.join()
        executor.close()
    assert killed_at and killed_at[0] < 6                   # it died with work left
    pd.testing.assert_frame_equal(remote, _sweep(eager))


def test_a_task_failing_for_good_keeps_the_finished_rows(cluster, eager):
    bad = tk.sweep(eager, PROMPT, n=2, max_tokens=4, batch=1, progress=False,
                   temperature=[0.5, 1.0])                    # the reference rows
    executor = RayExecutor(workers=1)
    with pytest.raises(SweepError) as err:
        tk.sweep(eager, PROMPT, n=2, max_tokens=4, batch=1, progress=False,
                 temperature=[0.5, 1.0, 3.0], executor=executor)
    executor.close()
    assert "temperature" in str(err.value)
    pd.testing.assert_frame_equal(err.value.partial, bad)


def test_scoring_on_ray_equals_scoring_here(cluster, eager):
    context = "def is_even(n):\n    return n % 2 == "
    choices = ["0", "1", "True", "n", " 0", "None"]
    texts = [PROMPT * 3, "import os\nimport sys\n", "class A:\n    pass\n"]
    executor = RayExecutor(workers=2)
    try:
        pd.testing.assert_frame_equal(
            tk.score(eager, context, choices, detail=True, chunk=2, executor=executor),
            tk.score(eager, context, choices, detail=True))
        pd.testing.assert_frame_equal(tk.score(eager, texts, chunk=1, executor=executor),
                                      tk.score(eager, texts))
    finally:
        executor.close()


def test_a_transiently_failing_task_is_retried(cluster, eager, tmp_path):
    marker = str(tmp_path / "ran")

    def flaky(llm):      # (local functions travel to the workers by value)
        """Fails the first time it runs anywhere (a marker file says it ran), then works."""
        import os

        import pandas

        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("a transient failure")
        return pandas.DataFrame({"model": [llm.name]})

    def bad(llm):
        raise ValueError("a bad request is not retried")

    executor = RayExecutor(workers=1)
    try:
        got = dict(executor.map(eager, [flaky]))
        assert got[0].model[0] == eager.name
        with pytest.raises(SweepError, match="not retried"):
            list(executor.map(eager, [bad]))
    finally:
        executor.close()
