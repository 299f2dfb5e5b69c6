"""The logit lens (`frames.logit_lens`, `plots.logit_lens`): each captured layer's residual
stream read through the final norm and head; its last layer is the model's own output."""
from __future__ import annotations

import pytest

import toolkit as tk

PROMPT = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("fixture", ["llm", "moe_llm"])
def test_the_last_layer_of_the_lens_is_the_models_output(fixture, request, tmp_path):
    llm = request.getfixturevalue(fixture)
    last = llm.info.num_layers - 1
    resp = llm.completions.create(prompt=PROMPT, max_tokens=5, seed=0, echo=True,
                                  logprobs=True, activation_layers=[0, -1])
    lens = resp.logit_lens(llm)
    tokens = resp.tokens().set_index(["choice", "position"])
    assert set(lens.layer) == {0, last}
    final = lens[lens.layer == last].set_index(["choice", "position"])
    assert len(final) == len(tokens) - 1               # the first prompt token: no context
    joined = final.join(tokens.add_suffix("_real"))
    assert joined.logprob.tolist() == pytest.approx(joined.logprob_real.tolist(), abs=1e-4)
    assert (joined["rank"] == joined.rank_real).all()
    assert joined.entropy.tolist() == pytest.approx(joined.entropy_real.tolist(), abs=1e-3)
    assert (lens.top_logprob >= lens.logprob - 1e-6).all() and (lens["rank"] >= 1).all()
    early = lens[lens.layer == 0]
    assert early.logprob.tolist() != pytest.approx(final.logprob.tolist(), abs=1e-3)
    fig = tk.plots.logit_lens(resp, llm)
    fig.savefig(tmp_path / "lens.png")
    assert fig.axes[0].images[0].get_array().shape == (2, min(32, len(final)))


def test_a_response_without_streams_says_what_to_ask(llm):
    resp = llm.completions.create(prompt=PROMPT, max_tokens=2, logprobs=True)
    with pytest.warns(tk.frames.EmptyFrameWarning, match="activation_layers"):
        assert resp.logit_lens(llm).empty
    with pytest.raises(ValueError, match="activation_layers"):
        tk.plots.logit_lens(resp, llm)
