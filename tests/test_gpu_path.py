"""The fast decode path: steps replayed as CUDA graphs over pooled, fixed-size KV caches,
and plain decoding drawn several steps ahead of the host.

On a GPU the graphs are what `toolkit.load` gives; on a CPU the same static step runs
eagerly over the same slots, so the bookkeeping (buckets, leases, growth, padding rows) is
tested on every machine, and the capture itself wherever CUDA is.
"""
from __future__ import annotations

import gc
import warnings

import pytest
import torch

import toolkit as tk
from toolkit.engine.graphs import MIN_CAPACITY, GraphStep, bucket
from toolkit.engine.transfer import ToHost

PROMPTS = ["def parse(line):\n", "import os\nimport sys\n\n"]


def graphed(folder, fuse=False, **load):
    """A float32 engine whose decode step is the graph step (captured where CUDA is),
    compiled by inductor first with `fuse`."""
    llm = tk.load(folder, dtype="float32", compile=False, **load)
    runner = llm.engine.runner
    runner.step = GraphStep(runner.lean, capture=runner.lean.device.type == "cuda",
                            fuse=fuse)
    return llm


def same_choices(a, b, tol=1e-4):
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.finish_reason for c in a.choices] == [c.finish_reason for c in b.choices]
    for x, y in zip(a.choices, b.choices):
        got = [t.logprob for t in x.logprobs.content]
        assert got == pytest.approx([t.logprob for t in y.logprobs.content], abs=tol)
        assert [t.top_logprobs[0].token_id for t in x.logprobs.content] == \
            [t.top_logprobs[0].token_id for t in y.logprobs.content]


def test_buckets():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 64, 65)] == [1, 2, 4, 4, 8, 64, 128]
    assert bucket(10, MIN_CAPACITY) == MIN_CAPACITY and bucket(300, MIN_CAPACITY) == 512


@pytest.mark.parametrize("kind", ["llama_dir", "moe_dir"])
def test_graph_steps_decode_as_the_eager_forward(kind, request):
    """Greedy and sampled, several prompts of different lengths with n=3 (6 rows padded
    to 8), with every capture: the same tokens, logprobs and activations."""
    folder = request.getfixturevalue(kind)
    eager = tk.load(folder, dtype="float32", compile=False)
    fast = graphed(folder)
    for knobs in (dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=4)):
        kw = dict(prompt=PROMPTS, n=3, max_tokens=24, logprobs=True, top_logprobs=3,
                  include_last_activation=True, activation_layers=[0, 1],
                  include_routing_matrix=kind == "moe_dir", **knobs)
        a, b = fast.completions.create(**kw), eager.completions.create(**kw)
        same_choices(a, b)
        assert a.activations(layer=1).to_numpy() == pytest.approx(
            b.activations(layer=1).to_numpy(), abs=1e-4)
        if kind == "moe_dir":
            routes = lambda r: [t.routing_matrix for c in r.choices for t in c.logprobs.content]
            assert routes(a) == routes(b) and routes(a)[0] is not None
    assert list(fast.engine.runner.step.idle) == [(8, MIN_CAPACITY)]


@pytest.mark.parametrize("kind", ["llama_dir", "moe_dir"])
def test_the_fused_step_decodes_as_the_eager_forward(kind, request):
    """The static step compiled by inductor (and captured, where CUDA is): the same
    tokens, logprobs, activations and routing as the eager forward, for a first slot size
    and for another one (which compiles again, with dynamic sizes)."""
    folder = request.getfixturevalue(kind)
    eager = tk.load(folder, dtype="float32", compile=False)
    fast = graphed(folder, fuse=True)
    moe = kind == "moe_dir"
    for prompts, n in ((PROMPTS, 3), (PROMPTS[:1], 1)):
        kw = dict(prompt=prompts, n=n, max_tokens=16, logprobs=True, top_logprobs=3,
                  include_last_activation=True, activation_layers=[0],
                  include_routing_matrix=moe, temperature=0.8, seed=3)
        with warnings.catch_warnings():               # no fallback to the uncompiled step
            warnings.filterwarnings("error", "toolkit: the fused decode step")
            a = fast.completions.create(**kw)
        b = eager.completions.create(**kw)
        same_choices(a, b)
        assert a.activations(layer=0).to_numpy() == pytest.approx(
            b.activations(layer=0).to_numpy(), abs=1e-4)
        if moe:
            routes = lambda r: [t.routing_matrix for c in r.choices for t in c.logprobs.content]
            assert routes(a) == routes(b)
    captured = fast.device.type == "cuda"
    assert fast.engine.runner.step.state == \
        ("CUDA graphs" if captured else "static, not captured") + ", fused"
    assert f"decode step {fast.engine.runner.step.state}" in repr(fast)


def test_a_step_that_cannot_be_fused_runs_uncompiled(llama_dir):
    fast = graphed(llama_dir, fuse=True)
    step = fast.engine.runner.step
    step.fused = lambda slot: 1 / 0                   # as if inductor had failed
    kw = dict(prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    with pytest.warns(RuntimeWarning, match="fused decode step is unavailable"):
        got = fast.completions.create(**kw)
    assert step.fused is None and not step.state.endswith("fused")
    same_choices(got, tk.load(llama_dir, dtype="float32", compile=False).completions.create(**kw))


def test_slots_are_reused_and_grow(llama_dir, monkeypatch):
    """A job leases a slot of its size and hands it back; the next job of that size gets
    the same slot (and graph). One that outgrows its capacity moves to longer slots, and
    decodes as the eager forward all the same."""
    from toolkit.engine import graphs

    monkeypatch.setattr(graphs, "MIN_CAPACITY", 16)     # the test model's context is 128
    fast = graphed(llama_dir)
    step = fast.engine.runner.step
    kw = dict(prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=True, top_logprobs=1)
    fast.completions.create(**kw)
    (slot,) = step.idle[(1, 32)]
    graph = slot.graph
    fast.completions.create(**kw)
    assert step.idle[(1, 32)] == [slot] and slot.graph is graph
    long = dict(kw, max_tokens=90, ignore_eos=True)
    same_choices(fast.completions.create(**long),
                 tk.load(llama_dir, dtype="float32", compile=False).completions.create(**long))
    assert {size for size, idle in step.idle.items() if idle} == {(1, 32), (1, 128)}
    # a cache that outgrows its slot moves to a longer one, with its keys and values
    cache = step.new_cache(rows=3, capacity=20)
    kv = torch.randn_like(cache.read(1, 0, 20))
    cache.write(1, 0, kv)
    first = cache.slot
    assert first.size == (4, 32)
    cache.ensure(70)
    assert cache.slot.size == (4, 128) and step.idle[(4, 32)] == [first]
    assert torch.equal(cache.read(1, 0, 20), kv) and cache.k.shape[1] == 3
    del cache
    assert len(step.idle[(4, 128)]) == 1


def test_a_closed_stream_hands_its_slot_back(llama_dir):
    fast = graphed(llama_dir)
    step = fast.engine.runner.step
    stream = fast.completions.create(prompt=PROMPTS[0], max_tokens=100, ignore_eos=True,
                                     stream=True, n=2, seed=0)
    next(stream), next(stream)
    assert not step.idle[(2, MIN_CAPACITY)]           # leased
    stream.close()
    del stream
    gc.collect()
    assert len(step.idle[(2, MIN_CAPACITY)]) == 1
    assert fast.engine.in_flight == 0


KNOBS = [dict(temperature=0.8, repetition_penalty=1.3, frequency_penalty=0.5,
              presence_penalty=0.2, top_k=20),
         dict(temperature=1.0, mirostat_target=3.0),
         dict(temperature=0.7, min_p=0.05, typical_p=0.9, logit_bias={5: 3.0}),
         dict(temperature=0)]


def finishes(resp) -> set[str]:
    """How a response's choices ended: by a stop string, an EOS, or their length."""
    return {"length" if c.finish_reason == "length" else
            "stop string" if c.text != c.raw_output.completion else "eos"
            for c in resp.choices}


@pytest.mark.parametrize("overlap", [False, True], ids=["walked", "overlapped"])
@pytest.mark.parametrize("knobs", KNOBS)
def test_drawing_ahead_changes_nothing(llm, knobs, overlap):
    """Tokens drawn several steps ahead of the host are those drawn one step at a time,
    whatever stop strings and EOS do to rows in the middle of a run (both happen here:
    EOS is made likelier, and the stop strings are taken from the output); streaming
    included. Also when each run is queued before the host walks the one before it
    (`overlap`, a GPU's default), where a row that met a stop string draws a whole run
    more."""
    decoder = llm.engine.decoder
    eos = llm.info.eos_token_ids[0]
    knobs = {**knobs, "logit_bias": {**knobs.get("logit_bias", {}), eos: 3.0}}
    kw = dict(prompt=PROMPTS, n=3, max_tokens=30, seed=7, logprobs=True, top_logprobs=2,
              activation_layers=[0], raw_output=True, **knobs)
    before = decoder.chunk, decoder.overlap
    try:
        decoder.chunk, decoder.overlap = 1, False
        plain = llm.completions.create(**kw)
        kw["stop"] = [c.text[10:13] for c in plain.choices if len(c.text) > 14][:2]
        one = llm.completions.create(**kw)
        assert {"stop string", "eos"} <= finishes(one)
        decoder.overlap = overlap
        for chunk in (1, 3, 8):
            decoder.chunk = chunk
            ahead = llm.completions.create(**kw)
            # (equal up to float noise: an eager batch attends over its longest row, and
            # rows finish at other steps of a run)
            same_choices(ahead, one, tol=1e-5)
            assert ahead.activations(layer=0).to_numpy() == pytest.approx(
                one.activations(layer=0).to_numpy(), abs=1e-5)
        text = {}
        for chunk in llm.completions.create(**kw, stream=True):
            for c in chunk.choices:
                text[c.index] = text.get(c.index, "") + c.text
        assert [text[i] for i in range(len(one.choices))] == [c.text for c in one.choices]
    finally:
        decoder.chunk, decoder.overlap = before


@pytest.mark.parametrize("overlap", [False, True], ids=["walked", "overlapped"])
def test_each_run_is_queued_before_the_host_walks_the_one_before(llm, monkeypatch, overlap):
    """With `overlap`, the device always has the next run of steps queued while the host
    walks one (runs of 1, 2, 4, 8 steps, then 8 until the length: 30 tokens here), and no
    run is queued past the rows' lengths; without it, draws and walks alternate."""
    decoder, events = llm.engine.decoder, []          # a run's steps when drawn; walks
    draw, walk = type(decoder)._draw, type(decoder)._walk_run

    def drawn(*args, **kw):
        run = draw(decoder, *args, **kw)
        events.append(run.steps)
        return run

    monkeypatch.setattr(decoder, "overlap", overlap)
    monkeypatch.setattr(decoder, "_draw", drawn)
    monkeypatch.setattr(decoder, "_walk_run", lambda *a: events.append("walk") or
                        walk(decoder, *a))
    llm.completions.create(prompt=PROMPTS[0], n=2, max_tokens=30, ignore_eos=True,
                           temperature=0.7, seed=1)
    assert events == ([1, 2, "walk", 4, "walk", 8, "walk", 8, "walk", 7, "walk", "walk"]
                      if overlap else
                      [1, "walk", 2, "walk", 4, "walk", 8, "walk", 8, "walk", 7, "walk"])


def test_speculation_runs_on_the_graph_step(llama_dir):
    """A prediction's verify passes run eagerly on the job's leased cache, between graph
    steps: greedy output unchanged."""
    fast = graphed(llama_dir)
    kw = dict(prompt=PROMPTS[0], max_tokens=30, temperature=0, logprobs=True, top_logprobs=1)
    plain = fast.completions.create(**kw)
    edited = plain.choices[0].text[:10] + "x = 1\n" + plain.choices[0].text[10:]
    same_choices(fast.completions.create(**kw, prediction={"type": "content",
                                                           "content": edited}), plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with CUDA")
def test_decoding_waits_for_the_device_once_per_run_of_steps(llama_dir, monkeypatch):
    """No host synchronisation per token: with logprobs, top-5 and activations, the host
    waits for the GPU once per run of 8 steps, and then only for that run's results (an
    event after their copies), never for the whole queue, which holds the next run.
    (Counted as the difference between a long and a short request, so what a request
    waits for once is left out.)"""
    llm = tk.load(llama_dir)
    assert llm.engine.decoder.overlap
    kw = dict(prompt=PROMPTS[0], ignore_eos=True, temperature=0.8, seed=1, logprobs=True,
              top_logprobs=5, include_last_activation=True)
    waits = []
    real_get = ToHost.get
    monkeypatch.setattr(ToHost, "get", lambda self: waits.append(self) or real_get(self))

    def syncs(max_tokens: int) -> tuple[int, int]:
        """(waits for the whole queue, waits for a run's results)"""
        waits.clear()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                llm.completions.create(**kw, max_tokens=max_tokens)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        queue = [w for w in seen if "synchroniz" in str(w.message)]
        return len(queue), len({id(w) for w in waits})

    syncs(96)                                             # graphs captured
    (queue_short, runs_short), (queue_long, runs_long) = syncs(16), syncs(96)
    runs = (96 - 16) // llm.engine.decoder.chunk
    assert queue_long == queue_short
    assert runs <= runs_long - runs_short <= runs + 1


def test_a_step_that_cannot_be_captured_decodes_eagerly(llama_dir):
    """If capturing fails (here: no CUDA at all; on a GPU, an op a graph cannot hold), the
    engine warns once and goes on with the eager forward, with the same results."""
    fast = tk.load(llama_dir, dtype="float32", compile=False)
    runner = fast.engine.runner
    runner.step = GraphStep(runner.lean, capture=True)
    if torch.cuda.is_available():
        runner.step._capture = lambda slot: 1 / 0
    kw = dict(prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    with pytest.warns(RuntimeWarning, match="CUDA graphs are unavailable"):
        first = fast.completions.create(**kw)
    assert runner.step.state == "unavailable" and not runner.step.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = fast.completions.create(**kw)
    eager = tk.load(llama_dir, dtype="float32", compile=False).completions.create(**kw)
    same_choices(first, eager)
    same_choices(again, eager)
