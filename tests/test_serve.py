"""`toolkit serve`: the official SDKs against a server on a loopback port give what the same
request gives in-process; keys, limits, concurrency and dropped clients."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from fireworks import Fireworks

import toolkit as tk
from toolkit import cli
from toolkit.serve import Limits

from conftest import free_port, settled

KEY = "test-key-1234"
PROMPT = "def parse(text):\n    "


@pytest.fixture(scope="module")
def server(llm):
    with tk.serve(llm, port=0, api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def fw(server):
    return Fireworks(base_url=server.url.removesuffix("/v1"), api_key=KEY, max_retries=0)


def post(server, body, key=KEY, **kwargs):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/completions", headers=headers, timeout=60,
                      content=body if isinstance(body, (bytes, str)) else json.dumps(body),
                      **kwargs)


# Every request field of the reference page (and the extensions), spread over requests.
REQUESTS = [
    dict(prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=3, n=2,
         logprobs=True, top_logprobs=3, raw_output=True, return_token_ids=True,
         user="u1", metadata={"run": "a"}, prompt_cache_isolation_key="k",
         prompt_cache_max_len=64),
    dict(prompt=[PROMPT, "import os\n"], max_tokens=10, temperature=0.7, min_p=0.05,
         frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.2, seed=5,
         logprobs=2, echo=True, stop=["\n\n"], logit_bias={"7": 2.0}),
    dict(prompt=[[0, 17, 40, 41], [0, 18]], max_completion_tokens=8, typical_p=0.9,
         mirostat_target=3.0, mirostat_lr=0.1, seed=7, echo_last=2, ignore_eos=True,
         logprobs=True, include_last_activation=True, logprobs_for_tokens=[5, 9],
         context_length_exceeded_behavior="error", perf_metrics_in_response=True),
    dict(prompt=PROMPT, max_tokens=10, temperature=0, logprobs=True,
         prediction={"type": "content", "content": "return text.strip()\n"},
         reasoning_effort=4),
    dict(prompt="{", max_tokens=16, seed=2, response_format={"type": "json_object"},
         logprobs=True),
]
FIRST_CLASS = {"model", "prompt"}


def _comparable(data):
    """A response or chunk as JSON, without what differs between two runs of a request."""
    data = json.loads(json.dumps(data))
    for key in ("id", "created", "perf_metrics"):
        data.pop(key, None)
    return data


def _local(llm, fields):
    out = llm.completions.create(**fields)
    if fields.get("stream"):
        return [_comparable(c.model_dump(exclude_none=True)) for c in out]
    return _comparable(out.model_dump(exclude_none=True))


@pytest.mark.parametrize("fields", REQUESTS, ids=range(len(REQUESTS)))
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_openai_sdk_gets_the_in_process_results(llm, oa, fields, stream):
    fields = {**fields, "stream": stream}
    extra = {k: v for k, v in fields.items() if k not in FIRST_CLASS | {"stream"}}
    out = oa.completions.create(model=llm.name, prompt=fields["prompt"], stream=stream,
                                extra_body=extra)
    got = [_comparable(c.model_dump(exclude_none=True)) for c in out] if stream \
        else _comparable(out.model_dump(exclude_none=True))
    assert got == _local(llm, fields)


@pytest.mark.parametrize("fields", REQUESTS, ids=range(len(REQUESTS)))
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_fireworks_sdk_gets_the_in_process_results(llm, fw, fields, stream):
    fields = {**fields, "stream": stream}
    known = {k: v for k, v in fields.items() if k not in (
        "include_last_activation", "logprobs_for_tokens", "prompt_cache_max_len")}
    extra = {k: v for k, v in fields.items() if k not in known}
    out = fw.completions.create(model=llm.name, **known, extra_body=extra or None)
    got = [_comparable(c.model_dump(exclude_none=True)) for c in out] if stream \
        else _comparable(out.model_dump(exclude_none=True))
    assert got == _local(llm, fields)


def test_routing_matrices_over_http_equal_the_in_process_ones(moe_llm):
    fields = dict(prompt=PROMPT, max_tokens=6, seed=1, logprobs=True, top_logprobs=2,
                  include_routing_matrix=True)
    with tk.serve(moe_llm, port=0) as server:
        client = openai.OpenAI(base_url=server.url, api_key="-", max_retries=0)
        extra = {k: v for k, v in fields.items() if k != "prompt"}
        got = client.completions.create(model=moe_llm.name, prompt=PROMPT, extra_body=extra)
        chunks = client.completions.create(model=moe_llm.name, prompt=PROMPT, stream=True,
                                           extra_body=extra)
        streamed = [_comparable(c.model_dump(exclude_none=True)) for c in chunks]
    assert _comparable(got.model_dump(exclude_none=True)) == _local(moe_llm, fields)
    assert streamed == _local(moe_llm, {**fields, "stream": True})
    assert "routing_matrix" in got.choices[0].logprobs.content[0]


def test_perf_metrics_ride_in_headers_and_on_the_last_chunk(llm, oa):
    raw = oa.completions.with_raw_response.create(model=llm.name, prompt=PROMPT,
                                                  max_tokens=4)
    body = raw.http_response.json()
    assert "perf_metrics" not in body                 # not asked for in the body
    headers = raw.http_response.headers
    assert int(headers["fireworks-prompt-tokens"]) == body["usage"]["prompt_tokens"]
    assert float(headers["fireworks-server-processing-time"]) > 0
    assert headers["fireworks-deployment"] == llm.name
    chunks = list(oa.completions.create(model=llm.name, prompt=PROMPT, max_tokens=4,
                                        stream=True,
                                        extra_body={"perf_metrics_in_response": True}))
    perf = [(c.model_extra or {}).get("perf_metrics") for c in chunks]
    assert [p is not None for p in perf] == [False] * (len(chunks) - 1) + [True]
    assert perf[-1]["prompt-tokens"] == chunks[-1].usage.prompt_tokens
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_lists_the_model_and_its_aliases(llm, oa, server):
    assert [m.id for m in oa.models.list()] == [llm.name]
    assert oa.models.retrieve(llm.name).id == llm.name
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("no-such-model")


def test_keys_are_required_and_checked(server, llm):
    for key in (None, "wrong-key", KEY + "x"):
        resp = post(server, {"prompt": "x", "max_tokens": 1}, key=key)
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="nope", max_retries=0).completions.create(
            model=llm.name, prompt="x", max_tokens=1)


def test_errors_have_the_api_shape_and_status(server, oa, llm):
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model=llm.name, prompt="x", temperature=3)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as err:
        oa.completions.create(model="accounts/x/models/y", prompt="x")
    assert "not found" in err.value.message.lower()
    for body, param in ((b"{not json", None), (b"[1, 2]", None),
                        ({"prompt": "x", "wat": 1}, "wat")):
        resp = post(server, body)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == param
    for resp in (httpx.get(f"{server.url}/nothing"),
                 httpx.get(f"{server.url}/completions",
                           headers={"authorization": f"Bearer {KEY}"})):
        assert resp.status_code in (404, 405)
        assert resp.json()["error"]["object"] == "error"
    assert post(server, {"prompt": "x", "max_tokens": 1}).status_code == 200  # still serving


@pytest.fixture(scope="module")
def long_llm():
    """tiny-code, for its context of 1024: a stream of 1000 tokens runs for a second or
    more, long enough to be still running when a test acts on it."""
    return tk.load("tiny-code", compile=False, progress=False)


def test_a_failure_inside_is_a_500_in_the_api_shape(server, llm, monkeypatch):
    def broken(**fields):
        raise RuntimeError("the engine broke")

    monkeypatch.setattr(llm.completions, "create", broken)
    for stream in (False, True):
        resp = post(server, {"prompt": "x", "stream": stream})
        assert resp.status_code == 500
        assert resp.json()["error"]["message"] == "internal error: the engine broke"
    monkeypatch.undo()
    assert post(server, {"prompt": "x", "max_tokens": 1}).status_code == 200


def test_limits_answer_with_clear_errors(long_llm):
    llm = long_llm
    limits = Limits(max_body_bytes=2000, max_n=2, max_prompts=2, max_concurrent=1)
    with tk.serve(llm, port=0, limits=limits) as small:
        resp = post(small, {"prompt": "x" * 3000})
        assert resp.status_code == 413 and "2000 bytes" in resp.json()["error"]["message"]
        resp = post(small, {"prompt": "x", "n": 3})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "n"
        resp = post(small, {"prompt": ["a", "b", "c"]})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
        body = {"prompt": "x", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{small.url}/completions", json=body) as held:
            lines = held.iter_lines()                 # (kept: dropping it disconnects)
            next(lines)                               # the stream is running
            resp = post(small, {"prompt": "x", "max_tokens": 1})
            assert resp.status_code == 429
            assert resp.json()["error"]["type"] == "rate_limit_error"
        assert settled(llm)
        assert post(small, {"prompt": "x", "max_tokens": 1}).status_code == 200


def test_twenty_clients_decode_together_and_get_their_own_results(llm, oa):
    fields = [dict(prompt=PROMPT, max_tokens=24, ignore_eos=True, seed=k, temperature=1.0,
                   logprobs=True) for k in range(20)]
    firsts, lasts, texts = [0.0] * 20, [0.0] * 20, [""] * 20
    barrier = threading.Barrier(20)

    def client(k):
        barrier.wait()
        extra = {key: v for key, v in fields[k].items() if key != "prompt"}
        for chunk in oa.completions.create(model=llm.name, prompt=PROMPT, stream=True,
                                           extra_body=extra):
            firsts[k] = firsts[k] or time.monotonic()
            texts[k] += chunk.choices[0].text
        lasts[k] = time.monotonic()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # every stream had started before any had ended: none waited behind another
    assert max(firsts) < min(lasts)
    assert texts == [llm.completions.create(**f).choices[0].text for f in fields]


def test_a_client_dropping_mid_stream_frees_its_request(long_llm):
    llm = long_llm
    body = {"prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with tk.serve(llm, port=0) as server:
        with httpx.stream("POST", f"{server.url}/completions", json=body) as resp:
            lines = resp.iter_lines()
            first = json.loads(next(line for line in lines if line)[len("data: "):])
        assert settled(llm)
        entry = next(e for e in reversed(llm.request_log.entries) if e["id"] == first["id"])
        assert entry["status"] == "cancelled"
        assert post(server, {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_client_dropping_a_whole_request_frees_it(long_llm, caplog):
    """A client that gives up on a (non-streaming) response has its request cancelled at
    once, not run to its end (64 choices of 1000 tokens take tens of seconds on a CPU),
    and quietly: it is no failure of the server's."""
    llm = long_llm
    body = {"prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "n": 64}
    with tk.serve(llm, port=0) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/completions", json=body, timeout=0.5)
        assert settled(llm, timeout=5)
        entry = llm.request_log.entries[-1]
        assert entry["params"]["n"] == 64 and entry["status"] == "cancelled"
        assert post(server, {"prompt": "x", "max_tokens": 2}).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_serving_beyond_loopback_needs_a_key(monkeypatch):
    with pytest.raises(SystemExit) as exit:
        cli.main(["serve", "--host", "0.0.0.0"])
    assert exit.value.code == 2
    monkeypatch.delenv("UNSET_KEY_VAR", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["serve", "--api-key-env", "UNSET_KEY_VAR"])
    with pytest.raises(tk.errors.InvalidRequestError):
        tk.serve(None, host="0.0.0.0")


def test_the_command_line_serves_until_interrupted(tmp_path):
    port = free_port()
    env = {**os.environ, "TK_TEST_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", "tiny-code",
                             "--port", str(port), "--api-key-env", "TK_TEST_KEY",
                             "--alias", "accounts/fireworks/models/tiny"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                models = [m.id for m in client.models.list()]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.2)
        assert models == ["tiny-code", "accounts/fireworks/models/tiny"]
        resp = client.completions.create(model="accounts/fireworks/models/tiny",
                                         prompt="def f(x):", max_tokens=4)
        assert resp.model == "accounts/fireworks/models/tiny"
        assert resp.usage.completion_tokens == 4
    finally:
        proc.send_signal(2)                           # Ctrl-C: uvicorn shuts down
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "serving tiny-code" in out
