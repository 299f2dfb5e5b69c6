"""`reasoning_effort`: thinking budgets, exact, for models whose card declares think tokens;
and the `segment` of every token (prompt, reasoning, completion)."""
from __future__ import annotations

import json

import pytest

import toolkit as tk
from conftest import make_model_dir
from toolkit.errors import InvalidRequestError

THINKING = "def area(r):\n<think>"          # a prompt that ends inside a think block


@pytest.fixture(scope="module")
def zoo():
    return tk.load("tiny-code", dtype="float32", progress=False)


def blocks(ids, start, end, open_at_start=False):
    """The number of tokens inside each think block of a token sequence."""
    sizes, inside = [], open_at_start
    if inside:
        sizes.append(0)
    for t in ids:
        if inside and t == end:
            inside = False
        elif inside:
            sizes[-1] += 1
        elif t == start:
            inside = True
            sizes.append(0)
    return sizes


@pytest.mark.parametrize("budget", [1, 5, 17])
def test_an_integer_budget_is_exact(zoo, budget):
    """The open block gets at most `budget` tokens, then `</think>`: exactly `budget` where
    the model would go on thinking, and where it closes the block sooner on its own, the
    same tokens as without a budget (each choice draws from its own seeded stream)."""
    start, end = zoo.info.think_token_ids
    request = dict(prompt=THINKING, max_tokens=40, n=16, seed=budget, return_token_ids=True)
    resp = zoo.completions.create(**request, reasoning_effort=budget)
    free = zoo.completions.create(**request)
    capped = 0
    for c, f in zip(resp.choices, free.choices):
        sizes = blocks(c.token_ids, start, end, open_at_start=True)
        own = blocks(f.token_ids, start, end, open_at_start=True)[0]
        assert sizes[0] == min(own, budget) and c.token_ids[sizes[0]] == end
        assert c.token_ids[:sizes[0]] == f.token_ids[:sizes[0]]
        assert all(s <= budget for s in sizes)
        capped += own > budget
    assert capped >= 4          # the budget did bind, for a quarter of the choices at least


@pytest.mark.parametrize("effort", [0, False, "none"])
def test_no_effort_closes_an_open_block_at_once(zoo, effort):
    resp = zoo.completions.create(prompt=THINKING, max_tokens=8, n=4, seed=0,
                                  reasoning_effort=effort, return_token_ids=True)
    assert {c.token_ids[0] for c in resp.choices} == {zoo.info.think_token_ids[1]}


def test_named_efforts_use_the_cards_budgets(zoo):
    budgets = zoo.info.reasoning_budgets
    assert budgets == {"low": 32, "medium": 128, "high": 512}
    start, end = zoo.info.think_token_ids
    for effort, budget in (("low", 32), (True, 128)):
        resp = zoo.completions.create(prompt=THINKING, max_tokens=budget + 4, seed=0,
                                      reasoning_effort=effort, return_token_ids=True)
        assert blocks(resp.choices[0].token_ids, start, end, True)[0] == budget


def test_blocks_the_model_opens_itself_are_capped_too(zoo):
    """With `<think>` made likely, rows open blocks of their own, each capped."""
    start, end = zoo.info.think_token_ids
    resp = zoo.completions.create(prompt="x = ", max_tokens=40, n=8, seed=2,
                                  reasoning_effort=3, logit_bias={str(start): 8},
                                  return_token_ids=True)
    sizes = [s for c in resp.choices for s in blocks(c.token_ids, start, end)]
    assert len(sizes) >= 8 and max(sizes) <= 3


def test_segments_in_the_tokens_frame(zoo):
    resp = zoo.completions.create(prompt=THINKING, max_tokens=12, temperature=0,
                                  reasoning_effort=4, logprobs=True, echo=True)
    frame = resp.tokens()
    prompt_len = len(zoo.tokenizer(THINKING)["input_ids"])
    assert list(frame.segment) == (["prompt"] * prompt_len + ["reasoning"] * 5
                                   + ["completion"] * 7)
    assert frame.token.iloc[prompt_len + 4] == "</think>"
    kw = dict(prompt=THINKING, max_tokens=12, temperature=0, reasoning_effort=4)
    streamed = [c for c in zoo.completions.create(**kw, stream=True)]
    assert "".join(c.choices[0].text for c in streamed) == \
        zoo.completions.create(**kw).choices[0].text


def test_reasoning_then_structured_output(zoo):
    """The grammar applies after the think block: free thinking, then valid JSON."""
    start, end = zoo.info.think_token_ids
    resp = zoo.completions.create(prompt=THINKING, max_tokens=60, n=8, seed=1,
                                  reasoning_effort=6, return_token_ids=True,
                                  response_format={"type": "json_object"})
    for c in resp.choices:
        assert blocks(c.token_ids, start, end, open_at_start=True) == [6]
        answer = c.text.split("</think>", 1)[1]
        if c.finish_reason == "stop":
            assert isinstance(json.loads(answer), dict)


def test_models_without_think_tokens_refuse_it(tmp_path):
    llm = tk.load(make_model_dir(tmp_path / "plain", think_tokens=False), dtype="float32")
    assert llm.info.think_token_ids is None
    with pytest.raises(InvalidRequestError) as info:
        llm.completions.create(prompt="x", max_tokens=2, reasoning_effort="low")
    assert info.value.param == "reasoning_effort"
    assert llm.completions.create(prompt="x", max_tokens=2, ignore_eos=True
                                  ).usage.completion_tokens == 2
