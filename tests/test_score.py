"""`tk.score`: log-likelihoods of continuations and of whole texts, against a direct forward
pass of the model."""
from __future__ import annotations

import pytest
import torch
from conftest import forward_logprobs

import toolkit as tk
from toolkit.errors import InvalidRequestError

CONTEXT = "def add(a, b):\n    return "
TEXT = ("import os\nimport sys\n\n\ndef main(argv):\n    for name in argv:\n"
        "        print(os.path.basename(name))\n    return 0\n\n") * 6


def reference(llm, context, continuation):
    """(sum logprob, is_greedy, token logprobs) by a forward over the joined ids."""
    stripped = context.rstrip()
    ctx = llm.tokenizer(stripped)["input_ids"]
    cont = llm.tokenizer(context[len(stripped):] + continuation,
                         add_special_tokens=False)["input_ids"]
    ref = forward_logprobs(llm, ctx + cont)
    rows = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    picked = ref[rows, torch.tensor(cont)]
    greedy = bool((ref[rows].argmax(-1) == torch.tensor(cont)).all())
    return picked.sum().item(), greedy, picked.tolist()


@pytest.mark.parametrize("fixture", ["llm", "moe_llm"])
def test_continuations_equal_a_forward_pass(fixture, request):
    llm = request.getfixturevalue(fixture)
    conts = ["a + b", "a - b\n", "x", " print(a, b)  # sum of both\n" * 3]
    frame = tk.score(llm, CONTEXT, conts, detail=True)
    assert list(frame.prompt_index) == [0] * 4
    for row, cont in zip(frame.itertuples(), conts):
        total, greedy, per_token = reference(llm, CONTEXT, cont)
        assert row.logprob == pytest.approx(total, abs=1e-4)
        assert row.token_logprobs == pytest.approx(per_token, abs=1e-4)
        assert row.is_greedy == greedy
        assert row.perplexity == pytest.approx(torch.tensor(-total / row.tokens).exp().item())
    pairs = tk.score(llm, ["x = ", "def f(", "import"], ["1", "self):", " os"])
    assert list(pairs.prompt_index) == [0, 1, 2]
    for row, (c, k) in zip(pairs.itertuples(), [("x = ", "1"), ("def f(", "self):"),
                                                ("import", " os")]):
        assert row.logprob == pytest.approx(reference(llm, c, k)[0], abs=1e-4)


def test_is_greedy_holds_for_the_models_own_greedy_output():
    """The model's greedy tokens, as text that tokenises back to them, are greedy; with
    their last character changed they are not."""
    llm = tk.load("tiny-code", dtype="float32", progress=False)
    ids = llm.completions.create(prompt=CONTEXT.rstrip(), max_tokens=8, temperature=0,
                                 ignore_eos=True, return_token_ids=True).choices[0].token_ids
    k = max(k for k in range(1, 9) if llm.tokenizer(
        llm.tokenizer.decode(ids[:k]), add_special_tokens=False)["input_ids"] == ids[:k])
    own = llm.tokenizer.decode(ids[:k])
    other = own[:-1] + ("x" if own[-1] != "x" else "y")
    frame = tk.score(llm, CONTEXT.rstrip(), [own, other])
    assert list(frame.is_greedy) == [True, False]
    assert reference(llm, CONTEXT.rstrip(), other)[1] is False


def test_a_shared_context_comes_from_the_prefix_cache(llm):
    context = TEXT[:150]                   # over one 64-token block of the cache
    tk.score(llm, context, ["a", "b", "c"])
    cached = [entry["usage"]["prompt_tokens_details"]["cached_tokens"]
              for entry in llm.request_log.entries[-3:]]
    assert cached[0] >= 0 and min(cached[1:]) >= 64


def test_rolling_windows_score_every_token_once(llm):
    """A text several contexts long (the test model's context is 128 tokens): every token
    but the first scored once, each with up to a full context before it."""
    ids = llm.tokenizer(TEXT)["input_ids"]
    size = llm.info.context_length
    assert len(ids) > 2 * size
    frame = tk.score(llm, [TEXT, TEXT[:50]], detail=True)
    row = frame.iloc[0]
    assert row.tokens == len(ids) - 1 and row.token_ids == ids[1:]
    expected = []
    for start in range(1, len(ids), size - 1):
        end = min(len(ids), start + size - 1)
        window = ids[max(0, end - size):end]
        ref = forward_logprobs(llm, window)
        offset = max(0, end - size)
        expected += [ref[j - 1 - offset, ids[j]].item() for j in range(start, end)]
    assert row.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert row.logprob == pytest.approx(sum(expected), abs=1e-3)
    assert frame.iloc[1].tokens == len(llm.tokenizer(TEXT[:50])["input_ids"]) - 1


@pytest.mark.parametrize("args,param", [
    ((CONTEXT, ["a", ""]), "continuations"),
    ((["a", "b"], ["a", "b", "c"]), "continuations"),
    (([""],), "prompts"),
])
def test_bad_input_is_an_invalid_request(llm, args, param):
    with pytest.raises(InvalidRequestError) as info:
        tk.score(llm, *args)
    assert info.value.param == param
