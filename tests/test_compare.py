"""`tk.compare`: one token sequence under two models sharing a tokenizer, against direct
forward passes."""
from __future__ import annotations

import pytest
import torch
from conftest import forward_logprobs

import toolkit as tk
from toolkit.errors import InvalidRequestError

TEXT = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def pair():
    return (tk.load("tiny-code", dtype="float32", progress=False),
            tk.load("tiny-code-draft", dtype="float32", progress=False))


def test_two_models_against_their_forward_passes(pair, tmp_path):
    a, b = pair
    frame = tk.compare(a, b, TEXT)
    ids = a.tokenizer(TEXT)["input_ids"]
    ref_a, ref_b = (forward_logprobs(llm, ids)[:-1] for llm in (a, b))
    target = torch.tensor(ids[1:])[:, None]
    assert frame.token_id.tolist() == ids[1:]
    assert frame.logprob_a.tolist() == pytest.approx(ref_a.gather(1, target)[:, 0].tolist(),
                                                     abs=1e-4)
    assert frame.logprob_b.tolist() == pytest.approx(ref_b.gather(1, target)[:, 0].tolist(),
                                                     abs=1e-4)
    kl = (ref_a.exp() * (ref_a - ref_b)).sum(-1)
    assert frame.kl.tolist() == pytest.approx(kl.tolist(), abs=1e-3)
    assert frame.agree.tolist() == (ref_a.argmax(-1) == ref_b.argmax(-1)).tolist()
    assert 0 < frame.agree.mean() < 1
    tk.plots.disagreement(frame).savefig(tmp_path / "kl.png")


def test_a_model_against_itself_and_a_response(pair, moe_llm):
    a, _ = pair
    resp = a.completions.create(prompt=TEXT, max_tokens=8, seed=0, return_token_ids=True)
    same = tk.compare(a, a, resp)
    assert len(same) == len(resp.choices[0].prompt_token_ids) + 7
    assert same.kl.abs().max() < 1e-5 and same.agree.all()
    assert (same.logprob_a == same.logprob_b).all()
    moe = tk.compare(moe_llm, moe_llm, [1, 5, 9, 12, 3])
    assert moe.kl.abs().max() < 1e-5 and len(moe) == 4


def test_bad_comparisons_are_invalid(pair, llm):
    a, b = pair
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        tk.compare(a, llm, TEXT)
    with pytest.raises(InvalidRequestError, match="return_token_ids"):
        tk.compare(a, b, a.completions.create(prompt=TEXT, max_tokens=2))
    with pytest.raises(InvalidRequestError, match="two tokens"):
        tk.compare(a, b, [5])
