"""The cyclic garbage collector is held off while a request builds its objects, and left as
it was found afterwards (`toolkit.engine.collector`)."""
from __future__ import annotations

import gc

import pytest

from toolkit.engine.collector import collector_held

BIG = dict(prompt=["def f(x):\n", "import os\n"], n=16, max_tokens=40, ignore_eos=True,
           seed=0, logprobs=True, top_logprobs=5)


def collections_during(fn):
    """(generation of each automatic collection that ran inside fn, fn's result)."""
    seen = []
    callback = lambda phase, info: phase == "start" and seen.append(info["generation"])
    gc.callbacks.append(callback)
    try:
        out = fn()
    finally:
        gc.callbacks.remove(callback)
    return seen, out


def test_a_large_request_runs_without_collections_and_leaves_the_collector_on(llm):
    assert gc.isenabled()
    llm.completions.create(**BIG)        # warm
    seen, resp = collections_during(lambda: llm.completions.create(**BIG))
    # ~18,000 objects: dozens of young collections if the collector ran; held off, at
    # most the one that runs as the request ends
    assert len(resp.choices) == 32 and len(seen) <= 1, seen
    assert gc.isenabled()
    seen, _ = collections_during(lambda: [[] for _ in range(5000)])
    assert seen, "automatic collection is back on after the request"


def test_a_stream_and_a_batch_leave_the_collector_on(llm):
    for _ in llm.completions.create(**BIG, stream=True):
        pass
    llm.completions.create_batch([BIG, dict(BIG, temperature=0.5)])
    assert gc.isenabled()


def test_a_request_failing_in_the_engine_leaves_the_collector_on(llm, monkeypatch):
    def broken(*args, **kwargs):
        assert not gc.isenabled()         # (held off inside the round)
        raise RuntimeError("a failing step")

    monkeypatch.setattr(llm.engine.runner, "decode", broken)
    with pytest.raises(RuntimeError, match="a failing step"):
        llm.completions.create(**BIG)
    assert gc.isenabled()
    monkeypatch.undo()
    assert len(llm.completions.create(**BIG).choices) == 32


def test_a_collector_switched_off_by_the_user_stays_off(llm):
    gc.disable()
    try:
        llm.completions.create(**BIG)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_blocks_end_with_the_collector_on():
    """Two threads' blocks interleaved (entered A, B; left A, B): the collector is on
    again once the block that turned it off has ended, and stays on."""
    a, b = collector_held(), collector_held()
    a.__enter__()
    b.__enter__()
    assert not gc.isenabled()
    a.__exit__(None, None, None)
    assert gc.isenabled()
    b.__exit__(None, None, None)
    assert gc.isenabled()
