"""Frames: documented columns and dtypes for every response shape, and the same numbers
from a stream, from a response, and from its JSON."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import toolkit.frames as fr
from toolkit.schema import Completion

PROMPT = "def add(a, b):\n    return a + b\n"
TOKEN_DTYPES = {"choice": "int64", "prompt_index": "int64", "position": "int64",
                "segment": "category", "token": "object", "token_id": "int64",
                "text_offset": "int64", "logprob": "float64", "sampling_logprob": "float64",
                "rank": "Int64", "entropy": "float64", "speculated": "bool", "source": "object",
                "finish_reason": "object"}

SHAPES = {
    "new": dict(logprobs=True, top_logprobs=3),
    "legacy": dict(logprobs=2),
    "echo": dict(logprobs=True, top_logprobs=2, echo=True),
    "n>1, prompts": dict(prompt=[PROMPT, "import os\n"], n=3, logprobs=True),
    "captures": dict(logprobs=True, include_last_activation=True),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_token_frame_columns_and_dtypes(llm, shape):
    kw = {"prompt": PROMPT, "max_tokens": 5, "seed": 2, **SHAPES[shape]}
    resp = llm.completions.create(**kw)
    frame = fr.tokens(resp)
    assert {c: str(t) for c, t in frame.dtypes.items()} == TOKEN_DTYPES
    assert len(frame) == sum(len(fr._choices(resp)[i].entries)
                             for i in range(len(resp.choices)))
    streamed = fr.tokens(list(llm.completions.create(stream=True, **kw)))
    pd.testing.assert_frame_equal(frame, streamed)
    pd.testing.assert_frame_equal(resp.tokens(), frame)


def test_token_frame_numbers(llm):
    resp = llm.completions.create(prompt=PROMPT, max_tokens=6, seed=1, logprobs=True,
                                  echo=True, raw_output=True)
    frame = fr.tokens(resp)
    ids = resp.choices[0].raw_output.completion_token_ids
    with torch.no_grad():
        logp = llm.model(input_ids=torch.tensor([ids], device=llm.device)).logits[0].float()
        logp = logp.log_softmax(-1).cpu()
    n_prompt = len(resp.choices[0].raw_output.prompt_token_ids)
    assert (frame.segment == "prompt").sum() == n_prompt
    assert frame.position.tolist() == list(range(len(ids)))
    assert pd.isna(frame.logprob[0]) and pd.isna(frame["rank"][0])
    for pos in range(1, len(ids)):
        row = frame.iloc[pos]
        assert row["rank"] == int((logp[pos - 1] > logp[pos - 1, ids[pos]]).sum()) + 1
        entropy = -(logp[pos - 1].exp() * logp[pos - 1]).sum().item()
        assert row.entropy == pytest.approx(entropy, abs=1e-4)


def test_frames_from_json_keep_what_the_wire_has(llm):
    resp = llm.completions.create(prompt=PROMPT, max_tokens=5, seed=1, logprobs=True,
                                  top_logprobs=5)
    parsed = Completion.model_validate(resp.model_dump(exclude_none=True))
    local, wire = fr.tokens(resp), fr.tokens(parsed)
    pd.testing.assert_series_equal(local.logprob, wire.logprob)
    assert wire.entropy.isna().all()
    in_top = local["rank"] <= 5
    assert (wire["rank"][in_top] == local["rank"][in_top]).all()
    assert wire["rank"][~in_top].isna().all()


def test_top_logprobs_frame(llm):
    resp = llm.completions.create(prompt=PROMPT, max_tokens=4, seed=0, logprobs=True,
                                  top_logprobs=3, n=2)
    top = fr.top_logprobs(resp)
    assert list(top.columns) == ["choice", "position", "rank", "token", "token_id", "logprob"]
    assert len(top) == 2 * 4 * 3
    assert (top.groupby(["choice", "position"]).logprob.apply(
        lambda s: s.is_monotonic_decreasing)).all()
    legacy = fr.top_logprobs(llm.completions.create(prompt=PROMPT, max_tokens=3, logprobs=2))
    assert legacy.token_id.isna().all() and len(legacy) >= 6


def test_activation_frame_and_matrix(llm):
    resp = llm.completions.create(prompt=PROMPT, max_tokens=4, seed=0, logprobs=True,
                                  include_last_activation=True, n=2, echo=True)
    index, matrix = fr.activation_matrix(resp)
    assert matrix.dtype == np.float32
    assert matrix.shape[1] == llm.info.hidden_size
    frame = fr.activations(resp)
    assert frame.index.names == ["choice", "position"]
    assert (frame.dtypes == np.float32).all()
    assert len(frame) == len(fr.tokens(resp)) - 2      # each choice's first token has none


def test_routing_frame(moe_llm):
    resp = moe_llm.completions.create(prompt=PROMPT, max_tokens=3, seed=0,
                                      include_routing_matrix=True)
    frame = fr.routing(resp)
    info = moe_llm.info
    assert list(frame.columns) == ["choice", "position", "layer", "k", "expert", "weight"]
    assert len(frame) == 3 * info.num_moe_layers * info.experts_per_token
    sums = frame.groupby(["position", "layer"]).weight.sum()
    assert np.allclose(sums, 1.0, atol=1e-5)            # Mixtral renormalises its top-k
    parsed = Completion.model_validate(resp.model_dump(exclude_none=True))
    with pytest.raises(ValueError):
        fr.routing(parsed)
    from_wire = fr.routing(parsed, experts_per_token=info.experts_per_token)
    assert from_wire.expert.tolist() == frame.expert.tolist()
    assert from_wire.weight.isna().all()


def test_choices_and_perf_frames(llm):
    resp = llm.completions.create(prompt=[PROMPT, "x"], n=2, max_tokens=4, seed=0,
                                  logprobs=True, echo=True, perf_metrics_in_response=True)
    ch = fr.choices(resp)
    assert ch.prompt_index.tolist() == [0, 0, 1, 1]
    assert (ch.tokens == 4).all()
    tok = fr.tokens(resp)
    done = tok[(tok.choice == 0) & (tok.segment == "completion")]
    assert ch.sum_logprob[0] == pytest.approx(done.logprob.sum())
    assert ch.perplexity[0] == pytest.approx(math.exp(-done.logprob.mean()))
    perf = fr.perf(resp)
    assert len(perf) == 1 and perf["prompt_tokens"][0] == resp.usage.prompt_tokens
    assert all("-" not in column for column in perf.columns)          # one naming rule
    assert perf["server_time_to_first_token"][0] == \
        resp.perf_metrics["server-time-to-first-token"]
    assert perf["cached_prompt_tokens"][0] == resp.perf_metrics["cached-prompt-tokens"]
    assert fr.perf([resp, resp]).shape[0] == 2


def test_frames_and_plots_say_what_a_response_lacks(llm, moe_llm):
    import toolkit.plots as plots
    bare = llm.completions.create(prompt=PROMPT, max_tokens=3, seed=0)
    with pytest.warns(fr.EmptyFrameWarning, match="logprobs=True") as caught:
        assert fr.tokens(bare).empty
    assert caught[0].filename == __file__           # points at the caller's line
    with_lp = llm.completions.create(prompt=PROMPT, max_tokens=3, seed=0, logprobs=True)
    with pytest.warns(fr.EmptyFrameWarning, match="top_logprobs=1..5"):
        assert fr.top_logprobs(with_lp).empty
    with pytest.warns(fr.EmptyFrameWarning, match="include_last_activation=True"):
        assert fr.activations(with_lp).empty
    with pytest.warns(fr.EmptyFrameWarning, match="include_routing_matrix=True"):
        assert fr.routing(moe_llm.completions.create(prompt=PROMPT, max_tokens=2,
                                                     logprobs=True)).empty
    for plot, kw in [(plots.logprob_strip, "logprobs=True"), (plots.entropy_curve, "logprobs"),
                     (plots.top_k_heatmap, "top_logprobs")]:
        with pytest.raises(ValueError, match=kw):
            plot(bare)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # a full response: no warning at all
        full = llm.completions.create(prompt=PROMPT, max_tokens=3, seed=0, logprobs=True,
                                      top_logprobs=2, include_last_activation=True)
        for frame in (fr.tokens, fr.top_logprobs, fr.activations, fr.choices):
            assert not frame(full).empty
        chunks = list(llm.completions.create(prompt=PROMPT, max_tokens=3, seed=0,
                                             logprobs=True, top_logprobs=2, stream=True))
        fr.tokens(chunks[-1]), fr.top_logprobs(chunks[-1])


@pytest.mark.parametrize("lean", [True, False])
def test_activation_layers_are_the_residual_streams(llama_dir, lean):
    import toolkit as tk
    llm = tk.load(llama_dir, lean_forward=lean, compile=False)
    resp = llm.completions.create(prompt=PROMPT, max_tokens=4, seed=0, logprobs=True,
                                  echo=True, raw_output=True, activation_layers=[0, -1])
    ids = resp.choices[0].raw_output.completion_token_ids
    outputs = {}                     # reference: each HF decoder layer's own output
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(
        i, out[0] if isinstance(out, tuple) else out))
        for i, layer in enumerate(llm.model.model.layers)]
    with torch.no_grad():
        llm.model(input_ids=torch.tensor([ids], device=llm.device))
    for hook in hooks:
        hook.remove()
    for layer in (0, -1, 1):
        index, matrix = fr.activation_matrix(resp, layer=layer)
        assert [p for _, p in index] == list(range(1, len(ids)))
        expected = outputs[layer % 2][0, :-1]
        assert np.allclose(matrix, expected.float().cpu().numpy(), atol=1e-4)
    assert "activation_layers" not in str(resp.model_dump(exclude_none=True))
    with pytest.raises(ValueError, match="activation_layers"):
        fr.activations(llm.completions.create(prompt=PROMPT, max_tokens=2, logprobs=True),
                       layer=0)


def test_a_big_response_shows_itself_in_a_few_lines(llm):
    resp = llm.completions.create(prompt=PROMPT, n=12, max_tokens=40, seed=1, logprobs=True,
                                  top_logprobs=5, include_last_activation=True)
    assert len(str(resp.model_dump())) > 100_000
    text = repr(resp)
    assert str(resp) == text and len(text) < 1500 and len(text.splitlines()) == 10
    assert f"{resp.usage.completion_tokens} completion tokens" in text
    assert "4 more choices" in text and "[7] length" in text
    page = resp._repr_html_()
    assert len(page) < 20_000 and page.count("<tr>") == 1 + 8 + 1 + 12
    first = resp.choices[0].logprobs.content[0]
    assert f"{first.logprob:.3f}" in page
    chunk = next(iter(llm.completions.create(prompt=PROMPT, max_tokens=3, stream=True)))
    assert repr(chunk).startswith("LocalChunk(") and len(chunk._repr_html_()) < 2000


def test_displays_show_whitespace():
    from toolkit.display import visible
    assert visible(" x\n\tq\x00") == "·x↵⇥q\\x00"
