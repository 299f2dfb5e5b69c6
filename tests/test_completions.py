"""`completions.create` end to end: prompts and choices, stopping, streaming, the prefix
cache, errors, interruption and the request log."""
from __future__ import annotations

import json

import pytest
import torch
from wire import check_chunk, check_completion

import toolkit as tk
from toolkit.errors import InvalidRequestError, NotFoundError

PROMPT = "def add(a, b):\n    return a + b\n"


def greedy(llm, **kw):
    return llm.completions.create(prompt=PROMPT, temperature=0, return_token_ids=True, **kw)


def ascii_only(llm) -> dict[str, float]:
    """A logit bias banning every token that is not printable ASCII (and EOS), so a random
    model's greedy text is made of whole, readable tokens."""
    pieces = llm.engine.pieces
    return {str(t): -100 for t in range(len(pieces))
            if not (pieces[t].isascii() and pieces[t].decode().isprintable())
            or t in llm.info.eos_token_ids}


def test_prompt_shapes_and_choice_indices(llm):
    ids = llm.tokenizer("import os")["input_ids"]
    resp = llm.completions.create(prompt=[PROMPT, "import os"], n=3, max_tokens=4, seed=0,
                                  return_token_ids=True)
    assert [c.index for c in resp.choices] == list(range(6))
    assert resp.choices[3].prompt_token_ids == ids
    assert resp.usage.prompt_tokens == len(llm.tokenizer(PROMPT)["input_ids"]) + len(ids)
    assert resp.usage.completion_tokens == sum(len(c.token_ids) for c in resp.choices)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    nested = llm.completions.create(prompt=[ids, ids], max_tokens=4, seed=0)
    assert len(nested.choices) == 2
    check_completion(resp)


def test_stop_string_across_token_boundaries(llm):
    bias = ascii_only(llm)
    free = greedy(llm, max_tokens=30, logprobs=True, logit_bias=bias)
    content = free.choices[0].logprobs.content
    # a stop string made of the end of one token and the start of the next
    k = next(i for i in range(2, len(content)) if len(content[i - 1].token) > 1)
    stop = content[k - 1].token[-1] + content[k].token[0]
    start = free.choices[0].text.find(stop)
    assert 0 <= start < content[k].text_offset
    stopped = greedy(llm, max_tokens=30, stop=[stop, "never-there"], raw_output=True,
                     logit_bias=bias)
    choice = stopped.choices[0]
    assert choice.text == free.choices[0].text[:start]
    assert choice.finish_reason == "stop"
    assert stop in choice.raw_output.completion
    assert free.choices[0].text.startswith(choice.raw_output.completion)


def test_eos_ends_a_choice_unless_ignored(llm):
    eos = llm.info.eos_token_ids[0]
    stopped = greedy(llm, max_tokens=5, logit_bias={eos: 100})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == "" and stopped.usage.completion_tokens == 0
    going = greedy(llm, max_tokens=5, logit_bias={eos: 100}, ignore_eos=True)
    assert going.choices[0].finish_reason == "length"
    assert going.choices[0].token_ids == [eos] * 5


def test_max_tokens_and_the_context_window(llm):
    window = llm.info.context_length
    n_prompt = len(llm.tokenizer(PROMPT)["input_ids"])
    fitted = greedy(llm, max_tokens=10_000, ignore_eos=True)
    assert fitted.usage.completion_tokens == window - n_prompt
    assert fitted.choices[0].finish_reason == "length"
    alias = greedy(llm, max_completion_tokens=3, ignore_eos=True)
    assert alias.usage.completion_tokens == 3
    with pytest.raises(InvalidRequestError) as info:
        greedy(llm, max_tokens=window, context_length_exceeded_behavior="error")
    assert info.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as info:
        llm.completions.create(prompt=[1] * (window + 1), max_tokens=1)
    assert info.value.param == "prompt"
    # the default max_tokens (2048) is clipped to the window too
    assert greedy(llm, ignore_eos=True).usage.completion_tokens == window - n_prompt


def _collect(chunks):
    texts, ids, content, finish = {}, {}, {}, {}
    for chunk in chunks:
        check_chunk(chunk)
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            ids[c.index] = ids.get(c.index, []) + (c.token_ids or [])
            if c.logprobs is not None:
                content[c.index] = content.get(c.index, []) + c.logprobs.content
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, ids, content, finish


@pytest.mark.parametrize("kw", [
    dict(max_tokens=12, seed=1),
    dict(max_tokens=12, seed=1, n=3, logprobs=True, top_logprobs=2, echo=True),
    dict(max_tokens=30, temperature=0, stop=["e", "\n\n"]),
    dict(max_tokens=16, seed=4, prompt=["x = 1\n", "import os"], n=2, stop=["o"]),
    dict(max_tokens=0, echo=True, logprobs=True),
])
def test_streaming_concatenates_to_the_whole_response(llm, kw):
    kw = {"prompt": PROMPT, "return_token_ids": True, **kw}
    whole = llm.completions.create(**kw)
    chunks = list(llm.completions.create(stream=True, **kw))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    texts, ids, content, finish = _collect(chunks)
    for choice in whole.choices:
        assert texts[choice.index] == choice.text
        assert ids[choice.index] == choice.token_ids
        assert finish[choice.index] == choice.finish_reason
        if choice.logprobs is not None:
            assert content[choice.index] == choice.logprobs.content
    assert chunks[-1].usage == whole.usage and chunks[-1].choices[0].finish_reason


def test_stream_holds_back_a_possible_stop_string(llm):
    bias = ascii_only(llm)
    free = greedy(llm, max_tokens=20, logit_bias=bias)
    text = free.choices[0].text
    stop = text[5:9] + "\x00"                     # matches text[5:9], then never completes
    sent = ""
    for chunk in llm.completions.create(prompt=PROMPT, temperature=0, max_tokens=20,
                                        stream=True, stop=[stop], logit_bias=bias):
        for c in chunk.choices:
            sent += c.text
            if not c.finish_reason and len(sent) > 5:
                assert not stop.startswith(sent[5:])   # the candidate match was held back
    assert sent == text


def test_stream_perf_metrics_in_the_last_chunk(llm):
    chunks = list(llm.completions.create(prompt=PROMPT, max_tokens=3, stream=True,
                                         perf_metrics_in_response=True))
    assert all(c.perf_metrics is None for c in chunks[:-1])
    assert chunks[-1].perf_metrics["prompt-tokens"] == chunks[-1].usage.prompt_tokens


def test_perf_metrics_keys(llm):
    resp = greedy(llm, max_tokens=4, perf_metrics_in_response=True)
    keys = {"prompt-tokens", "cached-prompt-tokens", "server-time-to-first-token",
            "server-processing-time", "tokenizer-queue-duration", "tokenizer-duration",
            "prefill-queue-duration", "prefill-duration", "generation-queue-duration",
            "generation-duration", "num-concurrent-requests", "backend-host", "deployment"}
    perf = resp.perf_metrics
    assert set(perf) == keys
    assert 0 <= perf["server-time-to-first-token"] <= perf["server-processing-time"]
    assert perf["deployment"] == llm.name and perf["num-concurrent-requests"] == 1
    assert greedy(llm, max_tokens=1).perf_metrics is None
    check_completion(resp)


def test_prefix_cache_reuses_kv_and_changes_no_number(llama_dir):
    llm = tk.load(llama_dir, compile=False)
    long_prompt = PROMPT * 4
    kw = dict(prompt=long_prompt, max_tokens=8, logprobs=True, top_logprobs=3, seed=3,
              return_token_ids=True, include_last_activation=True,
              perf_metrics_in_response=True)
    cold = llm.completions.create(**kw)
    warm = llm.completions.create(**kw)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    cached = warm.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % llm.engine.prefix_cache.block_size == 0
    assert warm.perf_metrics["cached-prompt-tokens"] == cached
    assert warm.choices[0].token_ids == cold.choices[0].token_ids
    for a, b in zip(cold.choices[0].logprobs.content, warm.choices[0].logprobs.content):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert a.sampling_logprob == pytest.approx(b.sampling_logprob, abs=1e-5)
        assert a.last_activation is not None
    # another isolation key sees nothing; max_len 0 disables reuse; echo limits it
    assert llm.completions.create(**kw, prompt_cache_isolation_key="tenant-b") \
        .usage.prompt_tokens_details.cached_tokens == 0
    assert llm.completions.create(**kw, prompt_cache_max_len=0) \
        .usage.prompt_tokens_details.cached_tokens == 0
    block = llm.engine.prefix_cache.block_size
    for max_len in (block - 1, block):      # only whole blocks within the limit are reused
        assert llm.completions.create(**kw, prompt_cache_max_len=max_len) \
            .usage.prompt_tokens_details.cached_tokens == max_len // block * block
    echoed = llm.completions.create(**{**kw, "echo": True})
    assert echoed.usage.prompt_tokens_details.cached_tokens == 0
    assert [c.logprob for c in echoed.choices[0].logprobs.content[-8:]] == pytest.approx(
        [c.logprob for c in cold.choices[0].logprobs.content], abs=1e-5)


def test_prefix_cache_stays_under_its_byte_budget(llama_dir):
    llm = tk.load(llama_dir, prefix_cache_bytes=40_000, compile=False)
    for i in range(6):
        llm.completions.create(prompt=f"# file {i}\n" + PROMPT * 3, max_tokens=1)
        assert llm.engine.prefix_cache.bytes <= 40_000
    assert len(llm.engine.prefix_cache) > 0


@pytest.mark.parametrize("fields,param", [
    ({"temperature": 5}, "temperature"),
    ({"prompt": [10**6]}, "prompt"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"speculation": [10**6]}, "speculation"),
    ({"prediction": "x = 1\n" * 2000}, "speculation"),
    ({"reasoning_effort": -1}, "reasoning_effort"),
    ({"images": ["data:image/png;base64,AAAA"]}, "images"),
    ({"response_format": {"type": "grammar", "grammar": "root ::= missing"}},
     "response_format"),
    ({"activation_layers": [2]}, "activation_layers"),
    ({"include_last_activation": True, "logprobs": 2}, "include_last_activation"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_requests_raise_and_leave_the_engine_usable(llm, fields, param):
    with pytest.raises(InvalidRequestError) as info:
        llm.completions.create(**{"prompt": PROMPT, "max_tokens": 2, **fields})
    assert info.value.param == param
    assert llm.engine.in_flight == 0
    assert greedy(llm, max_tokens=2).choices[0].finish_reason in ("length", "stop")


def test_model_names_and_aliases(llama_dir):
    llm = tk.load(llama_dir, compile=False,
                  aliases=["accounts/fireworks/models/llama-v3p1-8b-instruct"])
    resp = llm.completions.create(model="accounts/fireworks/models/llama-v3p1-8b-instruct",
                                  prompt="x", max_tokens=1)
    assert resp.model == "accounts/fireworks/models/llama-v3p1-8b-instruct"
    assert llm.completions.create(prompt="x", max_tokens=1).model == llm.name
    with pytest.raises(NotFoundError):
        llm.completions.create(model="gpt-4", prompt="x", max_tokens=1)


def test_closing_a_stream_early_frees_the_engine(llm):
    before = len(llm.request_log)
    stream = llm.completions.create(prompt=PROMPT, max_tokens=50, stream=True)
    assert llm.engine.in_flight == 0          # a stream starts when first iterated
    next(stream), next(stream)
    assert llm.engine.in_flight == 1
    stream.close()
    assert llm.request_log.entries[before]["status"] == "cancelled"
    assert greedy(llm, max_tokens=2).usage.completion_tokens == 2
    assert llm.engine.in_flight == 0


def test_an_error_in_the_forward_reaches_the_caller(llama_dir, monkeypatch):
    llm = tk.load(llama_dir, compile=False)
    calls = {"n": 0}
    decode = llm.engine.runner.decode

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return decode(*args, **kwargs)

    monkeypatch.setattr(llm.engine.runner, "decode", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        llm.completions.create(prompt=PROMPT, max_tokens=20, ignore_eos=True)
    assert llm.engine.in_flight == 0
    assert llm.request_log.entries[-1]["status"] == "error"
    assert greedy(llm, max_tokens=4).usage.completion_tokens == 4


def test_request_log_keeps_metadata_and_exports(llm, tmp_path):
    llm.request_log.clear()
    llm.completions.create(prompt=PROMPT, max_tokens=2, user="ada",
                           metadata={"experiment": "e1"}, seed=1)
    llm.completions.create(prompt="x", max_tokens=1)
    frame = llm.request_log.frame()
    assert len(frame) == 2
    assert frame.loc[0, "user"] == "ada" and frame.loc[0, "metadata.experiment"] == "e1"
    assert frame.loc[0, "params.seed"] == 1 and frame.loc[0, "usage.completion_tokens"] == 2
    assert frame.loc[0, "timings.prefill-duration"] >= 0
    path = tmp_path / "log.jsonl"
    llm.request_log.to_jsonl(path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["metadata"] == {"experiment": "e1"} and lines[1]["status"] == "completed"


@pytest.mark.parametrize("kw", [
    {},
    {"logprobs": True, "top_logprobs": 5, "echo": True, "raw_output": True},
    {"logprobs": 3, "echo": True, "n": 2, "return_token_ids": True},
    {"logprobs": 0, "echo_last": 2, "raw_output": True, "perf_metrics_in_response": True},
    {"include_last_activation": True, "raw_output": True, "return_token_ids": True},
    {"prompt": ["a", "b"], "n": 2, "stop": ["\n"], "logprobs": True, "user": "u",
     "metadata": {"k": "v"}},
    {"max_tokens": 0, "echo": True, "logprobs": True, "top_logprobs": 2},
])
def test_every_response_shape_parses_with_the_sdks(llm, moe_llm, kw):
    kw = {"prompt": PROMPT, "max_tokens": 4, "seed": 0, **kw}
    check_completion(llm.completions.create(**kw))
    for chunk in llm.completions.create(stream=True, **kw):
        check_chunk(chunk)
    moe = {**kw, "include_routing_matrix": True} if kw.get("logprobs") in (True, None) else kw
    check_completion(moe_llm.completions.create(**moe))


def test_a_long_request_shows_a_progress_bar_unless_switched_off(llama_dir, monkeypatch,
                                                                  capsys):
    import toolkit.completions
    monkeypatch.setattr(toolkit.completions, "_PROGRESS_AFTER_S", 0)   # "long" at once
    llm = tk.load(llama_dir, compile=False)
    llm.completions.create(prompt=PROMPT, max_tokens=20, n=2, ignore_eos=True)
    err = capsys.readouterr().err
    assert "tiny-llama:" in err and "/40 " in err and "tok/s" in err
    llm.progress = False
    llm.completions.create(prompt=PROMPT, max_tokens=20, ignore_eos=True)
    assert capsys.readouterr().err == ""
    llm.progress = True
    tk.sweep(llm, PROMPT, temperature=[0.5, 1.0], progress=False)    # its own bar only
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the step is CUDA graphs")
def test_the_repr_tells_the_compile_state(llama_dir):
    assert "decode step" not in repr(tk.load(llama_dir, compile=False))
    llm = tk.load(llama_dir, compile=True)
    assert "decode step compiling" in repr(llm) or "decode step compiled" in repr(llm)
    llm.engine.runner.step.wait()
    assert repr(llm).endswith("decode step compiled)")
