"""The engine under real notebook habits: open streams, interrupts, threads, abandoned
iterators, extreme but valid knobs, and malformed requests of every kind."""
from __future__ import annotations

import _thread
import gc
import json
import logging
import math
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError

import pytest
from conftest import settled
from wire import check_chunk

import toolkit as tk
from toolkit import completions
from toolkit.engine.engine import CancelScope
from toolkit.errors import InvalidRequestError

PROMPT = "def add(a, b):\n    return a + b\n"


def within(seconds, fn, *args, **kwargs):
    """Run fn in a helper thread; fail (instead of hanging the suite) if it does not
    return in time."""
    out = {}

    def target():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as err:      # noqa: BLE001 - handed back to the test
            out["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} did not return within {seconds} s (deadlock?)"
    if "error" in out:
        raise out["error"]
    return out["value"]


def ids_and_logprobs(resp):
    return [(c.text, [(e.token_id, e.logprob, e.sampling_logprob, e.last_activation)
                      for e in (c.logprobs.content if c.logprobs else [])])
            for c in resp.choices]


# ------------------------------------------------------------------- streams and threads

def test_a_request_while_a_stream_is_open_in_the_same_thread(llm):
    stream = llm.completions.create(prompt=PROMPT, max_tokens=20, stream=True, seed=1)
    first = next(stream)
    other = within(60, llm.completions.create, prompt="import os", max_tokens=2,
                   ignore_eos=True)         # (unseeded: a drawn EOS would end it early)
    assert other.usage.completion_tokens == 2
    rest = list(stream)                    # the stream carries on where it was
    whole = llm.completions.create(prompt=PROMPT, max_tokens=20, seed=1)
    assert "".join(c.choices[0].text for c in [first, *rest] if c.choices) == \
        whole.choices[0].text
    assert settled(llm)


def test_interrupted_stream_then_any_request(llm):
    """The notebook pattern: iterate a stream, Ctrl-C, run another cell."""
    stream = llm.completions.create(prompt=PROMPT, max_tokens=40, stream=True)
    with pytest.raises(KeyboardInterrupt):
        for k, _ in enumerate(stream):
            if k == 2:
                raise KeyboardInterrupt
    resp = within(60, llm.completions.create, prompt=PROMPT, max_tokens=3, temperature=0)
    assert resp.usage.completion_tokens == 3
    del stream
    gc.collect()
    assert settled(llm)


def test_keyboard_interrupt_while_waiting_leaves_no_state(llama_dir, monkeypatch):
    """Ctrl-C arrives in the main thread (as a notebook's stop button sends it) while the
    request is mid-generation."""
    llm = tk.load(llama_dir, compile=False)
    decode, calls = llm.engine.runner.decode, []

    def decode_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            _thread.interrupt_main()
        return decode(*args, **kwargs)

    monkeypatch.setattr(llm.engine.runner, "decode", decode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.completions.create(prompt=PROMPT, max_tokens=100, ignore_eos=True, n=2, seed=0)
        time.sleep(5)       # (were the request to finish first, the interrupt lands here)
    assert settled(llm)
    assert llm.request_log.entries[-1]["status"] == "cancelled"
    assert llm.completions.create(prompt=PROMPT, max_tokens=4, temperature=0,
                                  ignore_eos=True).usage.completion_tokens == 4


def test_ctrl_c_aimed_at_a_request_leaves_an_open_stream_whole(llama_dir, monkeypatch):
    """The interrupt lands while the request's round also steps the stream: it is held
    until the round ends, so the stream goes on exactly as if nothing had happened."""
    llm = tk.load(llama_dir, compile=False)
    kw = dict(prompt="import os\n", max_tokens=40, seed=2, logprobs=True, top_logprobs=2)
    clean = [c.choices[0] for c in llm.completions.create(stream=True, **kw)]
    stream = llm.completions.create(stream=True, **kw)
    chunks = [next(stream).choices[0]]
    decode, states = llm.engine.runner.decode, []

    def decode_then_interrupt(state, *args, **kwargs):
        states.append(state)                # the first call steps the stream (live first)
        if states.count(states[0]) == 3:
            _thread.interrupt_main()        # ... lands while the stream's step runs
        return decode(state, *args, **kwargs)

    monkeypatch.setattr(llm.engine.runner, "decode", decode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.completions.create(prompt=PROMPT, max_tokens=50, ignore_eos=True)
        time.sleep(5)
    try:
        chunks += [c.choices[0] for c in stream]
    except KeyboardInterrupt:
        pytest.fail("the interrupt aimed at the request cut the stream")
    assert chunks == clean
    assert settled(llm)


def test_an_abandoned_stream_is_released_when_collected(llm):
    stream = llm.completions.create(prompt=PROMPT, max_tokens=500, ignore_eos=True,
                                    stream=True)
    next(stream)
    assert llm.engine.in_flight == 1
    del stream
    gc.collect()
    assert settled(llm)


def test_two_threads_and_an_open_stream_match_serial_runs(llm):
    requests = [dict(prompt=PROMPT, max_tokens=12, seed=s, n=2, logprobs=True, top_logprobs=3,
                     include_last_activation=True, prompt_cache_max_len=0,
                     perf_metrics_in_response=True) for s in range(6)]
    serial = [ids_and_logprobs(llm.completions.create(**r)) for r in requests]
    stream_kw = dict(prompt="import os\n", max_tokens=100, seed=9, logprobs=True)
    stream_serial = [c for c in llm.completions.create(stream=True, **stream_kw)]

    stream = llm.completions.create(stream=True, **stream_kw)
    chunks = [next(stream)]
    results: dict[int, list] = {}
    overlap = []

    def worker(k):
        for i in range(k, len(requests), 2):
            resp = llm.completions.create(**requests[i])
            results[i] = ids_and_logprobs(resp)
            overlap.append(resp.perf_metrics["num-concurrent-requests"])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    chunks += list(stream)                 # consumed while the threads run
    for t in threads:
        t.join(120)
        assert not t.is_alive()
    assert max(overlap) >= 2                # they did run together
    assert [results[i] for i in range(len(requests))] == serial
    strip = lambda cs: [(c.choices[0].text, c.choices[0].logprobs) for c in cs if c.choices]
    assert strip(chunks) == strip(stream_serial)
    assert settled(llm)


def test_a_driven_engine_steps_on_its_own_thread(llm):
    """Under `Engine.driven` (as a server runs it) jobs advance on the driver thread, with
    the numbers they get alone; blocks nest; afterwards callers step again."""
    fields = dict(prompt=PROMPT, max_tokens=40, ignore_eos=True, seed=4, logprobs=True)
    alone = ids_and_logprobs(llm.completions.create(**fields))
    stepped_by = set()
    original = llm.engine._round

    def round_():
        stepped_by.add(threading.current_thread().name)
        original()

    llm.engine._round = round_
    try:
        with llm.engine.driven(), llm.engine.driven():
            stream = llm.completions.create(stream=True, **fields)
            next(stream)
            deadline = time.monotonic() + 30     # the driver goes on while nobody reads
            while llm.engine._live and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not llm.engine._live
            rest = list(stream)
            assert rest[-1].choices[0].finish_reason == "length"
            assert ids_and_logprobs(llm.completions.create(**fields)) == alone
        assert stepped_by == {"toolkit-engine"}
        deadline = time.monotonic() + 10
        while llm.engine._driver is not None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        llm.completions.create(**fields)
        assert threading.current_thread().name in stepped_by
    finally:
        del llm.engine._round
    assert settled(llm)


def test_a_cancel_scope_drops_its_requests(llm, monkeypatch):
    """What a server uses to drop the request of a client that went away: once its scope
    is cancelled (here, as the prefill's update arrives), `create` raises CancelledError
    at the next step, the engine keeps nothing and the log says cancelled; a request made
    in the scope afterwards fails at once; one made outside it is served."""
    scope = CancelScope()
    apply = completions._Run.apply
    monkeypatch.setattr(completions._Run, "apply",
                        lambda run, *args: (scope.cancel(), apply(run, *args))[1])
    with scope:
        with pytest.raises(CancelledError):
            llm.completions.create(prompt=PROMPT, max_tokens=50, ignore_eos=True)
        monkeypatch.undo()
        with pytest.raises(CancelledError):
            llm.completions.create(prompt=PROMPT, max_tokens=5)
    assert settled(llm)
    assert [e["status"] for e in llm.request_log.entries[-2:]] == ["cancelled"] * 2
    assert llm.completions.create(prompt=PROMPT, max_tokens=5).choices[0].text


EXIT_MID_REQUEST = """
import threading, time
import toolkit as tk
llm = tk.load("tiny-code", compile=False, progress=False)
def serve():
    with llm.engine.driven():
        llm.completions.create(prompt="def f(x):", max_tokens=900, ignore_eos=True, n=4)
threading.Thread(target=serve, daemon=True).start()
time.sleep({delay})
"""


@pytest.mark.parametrize("delay", [0.05, 0.5])
def test_a_process_exits_cleanly_in_the_middle_of_a_driven_request(delay):
    """A script that serves from a daemon thread and ends while a request decodes (as a
    server stopped with no `stop()` does) exits normally. Before the engine waited for
    the round in progress at exit, every such exit (16 of 16) aborted: the driver thread
    was ended inside a torch kernel ('terminate called without an active exception')."""
    run = subprocess.run([sys.executable, "-c", EXIT_MID_REQUEST.format(delay=delay)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-800:]


# --------------------------------------------------------------------------- extreme knobs

@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-8, 1e-3])
def test_tiny_temperatures_approach_greedy(llm, temperature):
    greedy = llm.completions.create(prompt=PROMPT, max_tokens=6, temperature=0,
                                    logprobs=True)
    cold = llm.completions.create(prompt=PROMPT, max_tokens=6, temperature=temperature,
                                  logprobs=True, seed=5)
    json.dumps(cold.model_dump(exclude_none=True), allow_nan=False)   # valid JSON
    for entry in cold.choices[0].logprobs.content:
        assert math.isfinite(entry.sampling_logprob) and entry.sampling_logprob <= 0
    if temperature <= 1e-8:
        assert cold.choices[0].text == greedy.choices[0].text


def test_sampling_never_picks_a_token_of_zero_probability(llm):
    # one token allowed: whatever the draw, it must be that one
    bias = {str(t): -100 for t in range(llm.info.vocab_size) if t != 42}
    resp = llm.completions.create(prompt=PROMPT, max_tokens=8, logit_bias=bias, seed=3,
                                  n=8, return_token_ids=True, ignore_eos=True)
    assert all(c.token_ids == [42] * 8 for c in resp.choices)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("fields,param", [
    ({"prompt": "def f(x):\ud800"}, "prompt"),
    ({"prompt": ["ok", "x\udfff"]}, "prompt"),
    ({"stop": ["\ud83d"]}, "stop"),
    ({"metadata": {"k": "\udc00"}}, "metadata"),
    ({"self": 1}, "self"),
    ({"fields": 1}, "fields"),
    ({"bad\ud800": 1}, "bad\ud800"),
    ({"n": 10**5000}, "n"),
    ({"seed": 10**5000}, "seed"),
    ({"logit_bias": {10**5000: 1}}, "logit_bias"),
    ({"logit_bias": {"9" * 5000: 1}}, "logit_bias"),
    ({"prompt": [10**5000]}, "prompt"),
    ({"prompt": [[1, 2], [10**5000]]}, "prompt"),
    ({"echo_last": 10**5000, "top_k": 10**5000}, "top_k"),
    ({"temperature": float("nan")}, "temperature"),
    ({"mirostat_target": float("inf")}, "mirostat_target"),
    ({"reasoning_effort": "maximal"}, "reasoning_effort"),
    ({"reasoning_effort": 1.5}, "reasoning_effort"),
    ({"speculation": [10**5000]}, "speculation"),
])
def test_bad_input_is_an_invalid_request_naming_the_field(llm, fields, param):
    with pytest.raises(InvalidRequestError) as info:
        llm.completions.create(**{"prompt": PROMPT, "max_tokens": 2, **fields})
    assert info.value.param == param
    json.dumps(info.value.body)            # the error body is JSON-serialisable
    assert len(str(info.value)) < 400
    assert llm.completions.create(prompt=PROMPT, max_tokens=2).choices


def test_create_batch_rejects_non_dict_requests(llm):
    with pytest.raises(InvalidRequestError) as info:
        llm.completions.create_batch([{"prompt": "x", "max_tokens": 1}, ["prompt", "x"]])
    assert info.value.param == "request"


# ------------------------------------------------------------------------------ the cache

@pytest.mark.parametrize("kind", ["compiled", "eager"])
def test_prefix_cache_reuse_is_bit_identical(llama_dir, kind):
    llm = tk.load(llama_dir, compile=kind == "compiled")
    if kind == "compiled":
        assert llm.engine.runner.step.wait(timeout=600)
    prompt = (PROMPT * 4)[:-7]              # not a whole number of cache blocks
    kw = dict(prompt=prompt, max_tokens=10, logprobs=True, top_logprobs=5, seed=3,
              temperature=0.8, include_last_activation=True, activation_layers=[0])
    for n in (1, 3):
        cold = llm.completions.create(**kw, n=n, prompt_cache_max_len=0)
        llm.completions.create(**kw, n=n)            # stores the prompt's blocks
        warm = llm.completions.create(**kw, n=n)
        assert warm.usage.prompt_tokens_details.cached_tokens >= 32
        assert [c.logprobs for c in warm.choices] == [c.logprobs for c in cold.choices]
        assert (warm.activations(layer=0).to_numpy() ==
                cold.activations(layer=0).to_numpy()).all()
    # echo_last scores prompt tokens that follow a reused prefix
    echo = {**kw, "echo_last": 5}
    assert llm.completions.create(**echo).choices[0].logprobs == \
        llm.completions.create(**echo, prompt_cache_max_len=0).choices[0].logprobs


# -------------------------------------------------------------------- stream conformance

def test_usage_and_perf_ride_on_the_last_finishing_chunk(llm):
    chunks = list(llm.completions.create(prompt=[PROMPT, "x"], n=2, max_tokens=6, seed=2,
                                         stream=True, perf_metrics_in_response=True))
    assert all(c.choices for c in chunks)            # no chunk without choices
    last = chunks[-1]
    assert last.choices[0].finish_reason is not None
    assert last.usage is not None and last.perf_metrics is not None
    assert all(c.usage is None and c.perf_metrics is None for c in chunks[:-1])
    whole = llm.completions.create(prompt=[PROMPT, "x"], n=2, max_tokens=6, seed=2)
    assert last.usage == whole.usage


def test_raw_output_streams_on_each_finishing_chunk(llm):
    kw = dict(prompt=[PROMPT, "import os"], n=2, max_tokens=8, seed=4, logprobs=True,
              raw_output=True, stop=["\n\n"], echo=True)
    whole = llm.completions.create(**kw)
    raw = {}
    for chunk in llm.completions.create(stream=True, **kw):
        check_chunk(chunk)
        for c in chunk.choices:
            assert (c.raw_output is not None) == (c.finish_reason is not None)
            if c.raw_output is not None:
                raw[c.index] = c.raw_output
    assert raw == {c.index: c.raw_output for c in whole.choices}


def test_a_chat_request_is_told_this_is_the_completions_api(llm):
    with pytest.raises(InvalidRequestError) as info:
        llm.completions.create(messages=[{"role": "user", "content": "hi"}])
    assert info.value.param == "messages" and "prompt" in str(info.value)


def test_a_prompt_over_the_window_gets_only_our_error():
    llm = tk.load("tiny-code", compile=False)   # its tokenizer knows the window (and warns
    records = []                                # only once: hence a fresh one)
    listener = logging.Handler()
    listener.emit = records.append
    logging.getLogger("transformers").addHandler(listener)
    try:
        with pytest.raises(InvalidRequestError, match="context window") as info:
            llm.completions.create(prompt="x = 1\n" * 400, max_tokens=1)
    finally:
        logging.getLogger("transformers").removeHandler(listener)
    assert info.value.param == "prompt"
    assert not [r for r in records if "Token indices" in r.getMessage()]
