"""`logprobs_for_tokens`: the raw logprobs of chosen tokens at every scored position,
whatever their rank, against a direct forward pass."""
from __future__ import annotations

import pytest
from conftest import forward_logprobs
from wire import check_completion

from toolkit.errors import InvalidRequestError

PROMPT = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("fixture", ["llm", "moe_llm"])
def test_tracked_logprobs_equal_a_forward_pass_everywhere(fixture, request):
    llm = request.getfixturevalue(fixture)
    tracked = [3, 17, 42, llm.info.vocab_size - 1]
    resp = llm.completions.create(prompt=PROMPT, max_tokens=6, seed=0, echo=True,
                                  logprobs=True, top_logprobs=5, return_token_ids=True,
                                  raw_output=True, logprobs_for_tokens=tracked)
    choice = resp.choices[0]
    ids = choice.raw_output.prompt_token_ids + choice.token_ids
    ref = forward_logprobs(llm, ids)
    content = choice.logprobs.content
    assert len(content) == len(ids)
    outside = 0
    for pos in range(1, len(ids)):
        entry = content[pos]
        assert [t.token_id for t in entry.logprobs_for_tokens] == tracked
        assert [t.logprob for t in entry.logprobs_for_tokens] == pytest.approx(
            ref[pos - 1, tracked].tolist(), abs=1e-4)
        top = {t.token_id for t in entry.top_logprobs}
        outside += sum(t not in top for t in tracked)
    assert outside > len(ids)                      # most were outside the top 5
    frame = resp.token_logprobs()
    assert len(frame) == len(tracked) * (len(ids) - 1)
    assert frame.logprob.tolist() == [t.logprob for e in content[1:]
                                      for t in e.logprobs_for_tokens]
    streamed = [e for chunk in llm.completions.create(
        prompt=PROMPT, max_tokens=6, seed=0, logprobs_for_tokens=tracked, stream=True)
        for e in chunk.choices[0].logprobs.content]
    assert [t.logprob for e in streamed for t in e.logprobs_for_tokens] == pytest.approx(
        [t.logprob for e in content[-6:] for t in e.logprobs_for_tokens], abs=1e-5)


def test_one_token_strings_and_alone_without_logprobs(llm):
    token = llm.tokenizer.decode([42])
    assert llm.tokenizer(token, add_special_tokens=False)["input_ids"] == [42]
    resp = llm.completions.create(prompt=PROMPT, max_tokens=2, logprobs_for_tokens=[token])
    entry = resp.choices[0].logprobs.content[0]
    assert entry.logprobs_for_tokens[0].token_id == 42 and entry.top_logprobs == []
    check_completion(resp)          # the SDKs parse it (the extension rides as an extra)


@pytest.mark.parametrize("fields", [
    dict(logprobs_for_tokens=["return a + b"]),
    dict(logprobs_for_tokens=[10**6]),
    dict(logprobs_for_tokens=[]),
    dict(logprobs_for_tokens=[1], logprobs=2),
])
def test_bad_tracked_tokens_are_invalid_requests(llm, fields):
    with pytest.raises(InvalidRequestError) as info:
        llm.completions.create(prompt=PROMPT, max_tokens=2, **fields)
    assert info.value.param == "logprobs_for_tokens"
