"""Speculative decoding against plain decoding: the same tokens and logprobs at greedy, the
same draws with a prediction, the target's distribution under a draft (chi-square against a
direct forward), fewer target forwards, and the metrics and records that describe it."""
from __future__ import annotations

import inspect
import json
import textwrap

import numpy as np
import pytest
import torch

import toolkit as tk
from toolkit.errors import InvalidRequestError

from conftest import compiled, make_model_dir
from test_sampling import _chi_square, _chi_square_threshold, reference_distribution

# Held-out code the zoo model continues: the stdlib's own sources (it was trained on them,
# so its greedy continuations follow them for a while, then diverge).
PROMPTS = [inspect.getsource(f)[:400] for f in (json.dumps, textwrap.dedent, np.clip,
                                                inspect.getmembers, pytest.approx)]


def load(name, **options):
    """A zoo model in float32 on any device (bfloat16, a GPU's default, would round a
    several-token verify forward differently from a one-token step), eager."""
    return tk.load(name, dtype="float32", compile=False, **options)


@pytest.fixture(scope="module")
def zoo():
    return load("tiny-code")


@pytest.fixture(scope="module")
def ngram():
    return load("tiny-code", ngram_speculation=True)


@pytest.fixture(scope="module")
def draft():
    return load("tiny-code", draft_model="tiny-code-draft")


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A draft for the random `llm` fixture: same tokenizer and shape, other weights."""
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny-draft", seed=1)


def greedy(llm, prompt, **kw):
    return llm.completions.create(prompt=prompt, max_tokens=48, temperature=0,
                                  logprobs=True, top_logprobs=2, return_token_ids=True,
                                  perf_metrics_in_response=True, **kw)


def assert_same(a, b):
    """Same choices: text, token ids, finish reasons, and logprobs within float32 noise."""
    assert len(a.choices) == len(b.choices)
    for x, y in zip(a.choices, b.choices):
        assert (x.text, x.token_ids, x.finish_reason) == (y.text, y.token_ids,
                                                          y.finish_reason)
        lx = [np.nan if e.logprob is None else e.logprob for e in x.logprobs.content]
        ly = [np.nan if e.logprob is None else e.logprob for e in y.logprobs.content]
        np.testing.assert_allclose(lx, ly, atol=1e-4)
        tx = [[t.token_id for t in e.top_logprobs] for e in x.logprobs.content]
        assert tx == [[t.token_id for t in e.top_logprobs] for e in y.logprobs.content]


def edit(text: str) -> str:
    """The output with a change in its middle: the prediction diverges, then matches."""
    middle = len(text) // 2
    return text[:middle] + "    x = 1\n" + text[middle:]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_is_unchanged_by_every_proposer(zoo, ngram, draft, prompt):
    plain = greedy(zoo, prompt)
    text, ids = plain.choices[0].text, plain.choices[0].token_ids
    for spec in (greedy(zoo, prompt, prediction=text), greedy(zoo, prompt, speculation=edit(text)),
                 greedy(zoo, prompt, speculation=ids[5:]), greedy(ngram, prompt),
                 greedy(draft, prompt)):
        assert_same(plain, spec)
    metrics = greedy(zoo, prompt, speculation=ids).perf_metrics
    steps = int(metrics["speculation-acceptance"].split("/")[1].split(",")[0])
    # every token but the first (from the prefill) and each step's last came from the
    # prediction (save one plain step at the end, where no room for a guess is left)
    assert metrics["speculation-prompt-matched-tokens"] >= \
        len(plain.choices[0].token_ids) - 2 - steps


def test_an_edited_prediction_realigns_after_the_edit(zoo):
    plain = greedy(zoo, PROMPTS[0])
    text = plain.choices[0].text
    spec = greedy(zoo, PROMPTS[0], prediction=edit(text))
    matched = spec.perf_metrics["speculation-prompt-matched-tokens"]
    # the tokens after the edit are found again: far more than the part before it
    before = len(zoo.tokenizer(text[:len(text) // 2], add_special_tokens=False)["input_ids"])
    assert matched > before + 8


def count_forwards(llm):
    """Wrap the target's runner so that every forward (prefill chunk, step, verify) counts."""
    runner, counter = llm.engine.runner, {"n": 0}
    for name in ("prefill", "decode", "extend"):
        method = getattr(runner, name)
        def counted(*args, _method=method, **kw):
            counter["n"] += 1
            return _method(*args, **kw)
        setattr(runner, name, counted)
    return counter


def test_an_exact_prediction_needs_at_most_a_third_of_the_forwards():
    llm = load("tiny-code")
    counter = count_forwards(llm)
    kw = dict(prompt=PROMPTS[1], max_tokens=120, temperature=0, ignore_eos=True)
    plain = llm.completions.create(**kw)
    plain_forwards, counter["n"] = counter["n"], 0
    spec = llm.completions.create(prediction=plain.choices[0].text, **kw)
    assert spec.choices[0].text == plain.choices[0].text
    assert counter["n"] <= plain_forwards / 3, (counter["n"], plain_forwards)


@pytest.mark.parametrize("knobs", [{"temperature": 1.0}, {"temperature": 0.8, "top_p": 0.9},
                                   {"repetition_penalty": 1.2, "top_k": 20},
                                   {"mirostat_target": 3.0},
                                   {"frequency_penalty": 0.5, "min_p": 0.05}])
def test_sampling_with_a_prediction_draws_what_plain_decoding_draws(zoo, knobs):
    """With a prediction the accept rule takes the same draw as plain decoding and keeps
    the proposal when it equals it: same seed, same choices."""
    kw = dict(prompt=PROMPTS[2], max_tokens=40, n=4, seed=7, logprobs=True,
              return_token_ids=True, **knobs)
    plain = zoo.completions.create(**kw)
    spec = zoo.completions.create(speculation=plain.choices[2].token_ids, **kw)
    assert_same(plain, spec)
    for x, y in zip(plain.choices, spec.choices):
        np.testing.assert_allclose([e.sampling_logprob for e in x.logprobs.content],
                                   [e.sampling_logprob for e in y.logprobs.content],
                                   atol=1e-4)
    assert spec.tokens()["speculated"].sum() > 20


PEAKED = "class Foo:\n    def __init__(self"     # then "," four times in five


def second_tokens(llm, knobs, **kw):
    """(first token, second token) of 2,048 sampled choices, in one batch."""
    requests = [dict(prompt=PEAKED, max_tokens=4, n=128, seed=s, return_token_ids=True,
                     ignore_eos=True, **knobs, **kw) for s in range(16)]
    pairs = [tuple(c.token_ids[:2]) for r in llm.completions.create_batch(requests)
             for c in r.choices]
    return pairs


@pytest.mark.parametrize("knobs", [{"temperature": 1.0}, {"temperature": 1.3, "top_k": 40}])
@pytest.mark.parametrize("source", ["draft", "prediction"])
def test_speculative_sampling_keeps_the_targets_distribution(zoo, draft, knobs, source):
    """The second token goes through the accept rule (the first comes from the prefill):
    given the most common first token, its draws follow the target's processed
    distribution after it, computed by a direct forward."""
    llm, kw = (draft, {}) if source == "draft" else (zoo, {"prediction": ", name, value"})
    pairs = second_tokens(llm, knobs, **kw)
    prompt_ids = zoo.tokenizer(PEAKED)["input_ids"]
    first = max(set(p[0] for p in pairs), key=[p[0] for p in pairs].count)
    seconds = [p[1] for p in pairs if p[0] == first]
    assert len(seconds) > 1000
    probs = reference_distribution(zoo, prompt_ids, [first], knobs).exp()
    counts = torch.bincount(torch.tensor(seconds), minlength=len(probs)).float()
    assert (counts[probs == 0] == 0).all()
    stat, dof = _chi_square(counts, probs, len(seconds))
    assert stat < _chi_square_threshold(dof)
    if source == "draft":       # the test has power: the draft's own distribution fails it
        q = reference_distribution(load("tiny-code-draft"), prompt_ids,
                                   [first], knobs).exp()
        assert _chi_square(counts, q, len(seconds))[0] > _chi_square_threshold(dof)
    steps = llm.completions.create(prompt=PEAKED, max_tokens=4, n=64, seed=0,
                                   perf_metrics_in_response=True, **knobs, **kw)
    assert steps.perf_metrics["speculation-acceptance"].startswith("0:")


def test_every_request_feature_works_with_speculation(zoo, ngram, draft):
    """n > 1, several prompts, echo, stop strings, max_tokens, streaming, the prefix cache,
    captures: each proposer gives what plain decoding gives."""
    kw = dict(prompt=PROMPTS[3:5], n=2, max_tokens=30, temperature=0, echo_last=3,
              stop=["\n\n\n"], logprobs=True, top_logprobs=3, include_last_activation=True,
              activation_layers=[1], return_token_ids=True, prompt_cache_max_len=None)
    plain = zoo.completions.create(**kw)
    runs = [zoo.completions.create(prediction=plain.choices[0].text[len(PROMPTS[3]):], **kw),
            ngram.completions.create(**kw), draft.completions.create(**kw)]
    runs.append(draft.completions.create(**kw))      # the prefix cache now holds the prompts
    for spec in runs:
        assert_same(plain, spec)
        assert np.allclose(plain.activations().to_numpy(), spec.activations().to_numpy(),
                           atol=1e-4)
    assert runs[-1].usage.prompt_tokens_details.cached_tokens > 0
    chunks = list(draft.completions.create(stream=True, perf_metrics_in_response=True, **kw))
    texts = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i)
             for i in range(4)]
    assert texts == [c.text for c in plain.choices]
    assert "speculation-acceptance" in chunks[-1].perf_metrics


def test_moe_and_routing_with_speculation(moe_dir):
    llm = tk.load(moe_dir, dtype="float32", compile=False)
    spec = tk.load(moe_dir, dtype="float32", compile=False, ngram_speculation=True)
    kw = dict(prompt="def f(x):\n    return x\n" * 3, max_tokens=24, temperature=0,
              include_routing_matrix=True, return_token_ids=True)
    a = llm.completions.create(**kw, logprobs=True)
    b = spec.completions.create(**kw, logprobs=True)
    c = llm.completions.create(**kw, logprobs=True, speculation=a.choices[0].token_ids)
    for other in (b, c):
        assert_same(a, other)
        assert [e.routing_matrix for e in a.choices[0].logprobs.content] == \
            [e.routing_matrix for e in other.choices[0].logprobs.content]


@pytest.mark.parametrize("lean_forward", [True, False])
def test_draft_and_prediction_on_the_compiled_and_hf_runners(llama_dir, draft_dir, llm,
                                                              lean_forward):
    """The random `llm` fixture decodes single rows with its compiled step; the HF runner
    cuts its caches back after a rejection."""
    target = llm if lean_forward else tk.load(llama_dir, dtype="float32", lean_forward=False)
    with_draft = compiled(tk.load(llama_dir, dtype="float32", draft_model=draft_dir,
                                  lean_forward=lean_forward, num_speculative_tokens=3))
    for prompt in ("def f(x):", "import os\n", "class A:\n    pass\n"):
        plain = greedy(target, prompt, ignore_eos=True)
        for spec in (greedy(with_draft, prompt, ignore_eos=True),
                     greedy(target, prompt, ignore_eos=True,
                            speculation=edit(plain.choices[0].text))):
            assert_same(plain, spec)
        sampled = dict(prompt=prompt, max_tokens=24, n=3, seed=1, return_token_ids=True)
        a = target.completions.create(**sampled)
        b = target.completions.create(speculation=a.choices[0].token_ids, **sampled)
        assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]


def test_records_of_each_step(zoo):
    plain = greedy(zoo, PROMPTS[0])
    spec = greedy(zoo, PROMPTS[0], prediction=edit(plain.choices[0].text))
    entries = spec.choices[0].logprobs.content
    ended = [e for e in entries if e.extra_tokens]
    assert ended, "an edited prediction has rejected proposals"
    for e in ended:
        assert len(e.extra_tokens) == len(e.extra_logprobs)
        # greedy kept the argmax in place of the first rejected proposal
        assert e.extra_tokens[0] != e.token_id and e.extra_logprobs[0] < e.logprob
    wire = spec.model_dump(exclude_none=True)["choices"][0]["logprobs"]["content"]
    assert sum("extra_tokens" in e for e in wire) == len(ended)
    m = spec.perf_metrics
    assert m["speculation-prompt-tokens"] == len(
        zoo.tokenizer(edit(plain.choices[0].text), add_special_tokens=False)["input_ids"])
    assert m["speculation-generated-tokens"] == m["speculation-prompt-matched-tokens"]
    hits, totals = zip(*(tuple(map(int, x.split(":")[1].split("/")))
                         for x in m["speculation-acceptance"].split(",")))
    assert all(h <= t for h, t in zip(hits, totals)) and list(hits) == sorted(hits, reverse=True)
    assert "speculation-prompt-tokens" not in greedy(zoo, PROMPTS[0]).perf_metrics
    # the frames tell the same story as the wire
    steps, tokens = spec.speculation(), spec.tokens()
    assert steps.accepted.sum() == m["speculation-generated-tokens"] == tokens.speculated.sum()
    assert set(tokens.source) == {"prediction", "model"}
    assert ",".join(f"{r.position}:{r.accepted}/{r.proposed}"
                    for r in spec.acceptance().itertuples()) == m["speculation-acceptance"]
    ends = tokens.set_index("position").loc[steps.position + steps.accepted]
    assert not ends.speculated.any()        # each step ends on the model's own token
    rejected = steps[steps.resampled]
    assert [list(ids[a:]) for ids, a in zip(rejected.proposed_ids, rejected.accepted)] == \
        [e.extra_tokens for e in ended]
    assert len(tk.plots.acceptance(spec).axes) == 2


@pytest.mark.parametrize("fields,param", [
    ({"speculation": [5000]}, "speculation"),
    ({"speculation": "x = 1\n" * 1000}, "speculation"),
    ({"prediction": {"type": "content", "content": "x\n" * 2000}}, "speculation"),
])
def test_bad_predictions_are_invalid_requests(zoo, fields, param):
    with pytest.raises(InvalidRequestError) as info:
        zoo.completions.create(prompt="x", max_tokens=2, **fields)
    assert info.value.param == param
    assert zoo.completions.create(prompt="x", max_tokens=2, speculation="y = 2").choices


@pytest.mark.parametrize("options,param", [
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 1.5}, "num_speculative_tokens"),
    ({"draft_model": "tiny-code-draft", "ngram_speculation": True}, "ngram_speculation"),
])
def test_bad_speculation_options_are_invalid(options, param):
    with pytest.raises(InvalidRequestError) as info:
        load("tiny-code", **options)
    assert info.value.param == param


def test_a_draft_with_another_tokenizer_is_refused(llama_dir):
    with pytest.raises(InvalidRequestError) as info:
        load("tiny-code", draft_model=llama_dir)
    assert info.value.param == "draft_model"


def test_a_stop_string_inside_an_accepted_guess_ends_the_choice_there(zoo):
    plain = greedy(zoo, PROMPTS[1])
    ids, text = plain.choices[0].token_ids, plain.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 4]
    a = greedy(zoo, PROMPTS[1], stop=stop)
    b = greedy(zoo, PROMPTS[1], stop=stop, speculation=ids)
    assert a.choices[0].finish_reason == "stop" and len(a.choices[0].token_ids) < len(ids)
    assert_same(a, b)
    assert b.speculation().accepted.sum() > 0


def test_closing_a_speculative_stream_frees_it(draft):
    stream = draft.completions.create(prompt=PROMPTS[0], max_tokens=60, stream=True)
    next(stream), next(stream)
    stream.close()
    assert draft.engine.in_flight == 0
    assert_same(greedy(load("tiny-code"), PROMPTS[0]), greedy(draft, PROMPTS[0]))
