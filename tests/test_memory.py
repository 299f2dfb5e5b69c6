"""The allocator setting for CPU decoding (`toolkit.engine.memory`): a batch's step-sized
blocks, once freed, are reused by the next step instead of being taken from the system
again, each 4 KB page a minor fault (~20 a token at n=64 with glibc's own thresholds)."""
import resource
import sys

import pytest

import toolkit as tk
from toolkit.engine import memory


def faults_of(fn) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_a_cpu_batch_reuses_the_memory_its_steps_free():
    llm = tk.load("tiny-code", device="cpu", compile=False, progress=False)
    if not memory.keep_freed_memory():          # applied by the engine, where it applies
        pytest.skip("not glibc, or malloc tuned by the environment")
    kw = dict(prompt="def add(a, b):", n=64, max_tokens=16, temperature=1.0, seed=0,
              logprobs=True, top_logprobs=5, ignore_eos=True)
    llm.completions.create(**kw)                 # the heap grows to what a request needs
    tokens = 64 * 16
    # The fewest of three requests: a one-off in one request (the first touch of some
    # library's pages: ~1,800 faults, in about one run in ten) is not what this is about.
    # With glibc's own thresholds each request takes ~8,000; with the engine's, ~10.
    assert min(faults_of(lambda: llm.completions.create(**kw)) for _ in range(3)) < tokens


def test_the_environment_tuning_malloc_is_respected(monkeypatch):
    monkeypatch.setattr(memory, "_applied", False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert memory.keep_freed_memory() is False
