"""Logprobs, alternatives, activations and routing against a direct HF forward pass."""
from __future__ import annotations

import pytest
import torch
from conftest import forward_logprobs
from wire import check_completion

import toolkit as tk
from toolkit.captures import decode_activation, decode_routing
from toolkit.errors import InvalidRequestError

PROMPT = "def add(a, b):\n    return a + b\n"


def all_ids(choice):
    raw = choice.raw_output
    return raw.prompt_token_ids + raw.completion_token_ids[
        len(raw.completion_token_ids) - len(choice.token_ids):]


@pytest.fixture(scope="module", params=["compiled", "lean", "hf"])
def engines(request, llama_dir):
    return tk.load(llama_dir, lean_forward=request.param != "hf", dtype="float32",
                   compile=request.param == "compiled")


def test_engine_kind(engines):
    kind = type(engines.engine.runner).__name__
    assert kind in ("LeanRunner", "HFRunner")
    step = getattr(engines.engine.runner, "step", None)
    assert (step is not None and step.wait(timeout=600)) == (engines.spec["compile"] is True)


def test_generated_and_echoed_logprobs_equal_a_forward_pass(engines):
    resp = engines.completions.create(prompt=PROMPT, max_tokens=12, temperature=0.9, seed=3,
                                      logprobs=True, top_logprobs=5, echo=True,
                                      raw_output=True, return_token_ids=True)
    choice = resp.choices[0]
    ids = all_ids(choice)
    ref = forward_logprobs(engines, ids)
    content = choice.logprobs.content
    assert [c.token_id for c in content] == ids
    assert content[0].logprob is None and content[0].sampling_logprob is None
    for pos in range(1, len(ids)):
        entry = content[pos]
        assert entry.logprob == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)
        expected = ref[pos - 1].topk(5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            expected.values.tolist(), abs=1e-4)
        for alt in entry.top_logprobs:
            assert alt.logprob == pytest.approx(ref[pos - 1, alt.token_id].item(), abs=1e-4)
    prompt_len = len(choice.raw_output.prompt_token_ids)
    assert all(c.sampling_logprob is None for c in content[:prompt_len])
    assert all(c.sampling_logprob is not None for c in content[prompt_len:])
    check_completion(resp)


def test_text_offsets_and_bytes_rebuild_the_text(llm):
    prompt = "s = 'café → ok'\n"          # multi-byte characters split over byte tokens
    resp = llm.completions.create(prompt=prompt, max_tokens=6, logprobs=True, echo=True,
                                  temperature=0)
    choice = resp.choices[0]
    content = choice.logprobs.content
    data = b"".join(bytes(c.bytes) for c in content)
    assert data.decode("utf-8", errors="replace") == choice.text
    assert choice.text.startswith("<|endoftext|>" + prompt)
    partial = [c for c in content if c.token.startswith("bytes:")]
    assert partial                                   # tokens holding part of a character
    for c in partial:
        assert c.token == "bytes:" + "".join(f"\\x{b:02x}" for b in c.bytes)
    for c in content:
        if c not in partial:
            assert choice.text[c.text_offset:].encode().startswith(bytes(c.bytes))
    offsets = [c.text_offset for c in content]
    assert offsets == sorted(offsets)


def test_echo_last_scores_only_the_prompt_suffix(llm):
    ids = llm.tokenizer(PROMPT)["input_ids"]
    resp = llm.completions.create(prompt=PROMPT, max_tokens=0, echo_last=4, logprobs=True)
    content = resp.choices[0].logprobs.content
    assert [c.token_id for c in content] == ids[-4:]
    ref = forward_logprobs(llm, ids)
    for k, c in enumerate(content):
        pos = len(ids) - 4 + k
        assert c.logprob == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 0


def test_legacy_format_always_includes_the_chosen_token(llm):
    resp = llm.completions.create(prompt=PROMPT, max_tokens=5, logprobs=2, temperature=1.5,
                                  seed=0, echo=True)
    lp = resp.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == logprob
        assert 2 <= len(top) <= 3
    text = resp.choices[0].text
    assert [text[o:].startswith(t) or t.startswith("bytes:")
            for o, t in zip(lp.text_offset, lp.tokens)] == [True] * len(lp.tokens)
    check_completion(resp)
    only_chosen = llm.completions.create(prompt=PROMPT, max_tokens=3, logprobs=0, seed=0)
    assert all(len(t) == 1 for t in only_chosen.choices[0].logprobs.top_logprobs)


def test_legacy_format_says_what_the_new_one_says(llm):
    """The legacy format is built from the tokens, the new one from entries: the same
    seeded request in each gives the same tokens, logprobs, alternatives and offsets, and
    its stream's chunks join into the same legacy lists."""
    kw = dict(prompt=PROMPT, max_tokens=8, temperature=1.0, seed=3, echo=True)
    legacy = llm.completions.create(logprobs=3, **kw).choices[0].logprobs
    content = llm.completions.create(logprobs=True, top_logprobs=3, **kw).choices[0] \
        .logprobs.content
    assert legacy.tokens == [e.token for e in content]
    assert legacy.token_ids == [e.token_id for e in content]
    assert legacy.token_logprobs == [e.logprob for e in content]
    assert legacy.text_offset == [e.text_offset for e in content]
    assert legacy.top_logprobs[0] is None
    for top, e in zip(legacy.top_logprobs[1:], content[1:]):
        assert top == {**{t.token: t.logprob for t in e.top_logprobs}, e.token: e.logprob}
    chunks = [c.choices[0].logprobs for c in llm.completions.create(logprobs=3, stream=True,
                                                                    **kw)]
    joined = lambda name: [x for lp in chunks if lp is not None for x in getattr(lp, name)]
    for name in ("tokens", "token_ids", "token_logprobs", "top_logprobs", "text_offset"):
        assert joined(name) == getattr(legacy, name)


def echoed_run(llm, **capture):
    """A sampled completion with the prompt echoed; (response, every token id)."""
    resp = llm.completions.create(prompt=PROMPT, max_tokens=6, logprobs=True, seed=1,
                                  echo=True, raw_output=True, return_token_ids=True, **capture)
    return resp, all_ids(resp.choices[0])


def test_last_activation_is_the_final_norm_hidden_state(engines):
    resp, ids = echoed_run(engines, include_last_activation=True)
    choice = resp.choices[0]
    with torch.no_grad():
        hidden = engines.model.model(input_ids=torch.tensor(
            [ids], device=engines.device)).last_hidden_state[0].float().cpu()
    content = choice.logprobs.content
    assert content[0].last_activation is None
    for pos in range(1, len(ids)):
        vec = decode_activation(content[pos].last_activation)
        assert vec.dtype.str == "<f4" and vec.shape == (hidden.shape[-1],)
        assert torch.allclose(torch.from_numpy(vec.copy()), hidden[pos - 1], atol=1e-4)
    check_completion(resp)


def test_routing_matrix_is_the_routers_choice(moe_llm):
    resp, ids = echoed_run(moe_llm, include_routing_matrix=True)
    choice = resp.choices[0]
    with torch.no_grad():
        out = moe_llm.model(input_ids=torch.tensor([ids], device=moe_llm.device),
                            output_router_logits=True)
    k = moe_llm.info.experts_per_token
    chosen = torch.stack(list(out.router_logits), 1).topk(k, dim=-1).indices   # [T, L, k]
    content = choice.logprobs.content
    assert content[0].routing_matrix is None
    for pos in range(1, len(ids)):
        matrix = decode_routing(content[pos].routing_matrix, k)
        assert matrix.shape == (moe_llm.info.num_moe_layers, k)
        assert matrix.tolist() == chosen[pos - 1].tolist()
    check_completion(resp)


def test_captures_alone_come_back_in_the_new_format(llm):
    resp = llm.completions.create(prompt=PROMPT, max_tokens=3, include_last_activation=True)
    content = resp.choices[0].logprobs.content
    assert len(content) == 3 and all(c.last_activation for c in content)
    assert llm.completions.create(prompt=PROMPT, max_tokens=3, raw_output=True) \
        .choices[0].raw_output.completion_logprobs is None


def test_routing_matrix_needs_a_moe_model(llm):
    with pytest.raises(InvalidRequestError) as info:
        llm.completions.create(prompt="x", include_routing_matrix=True, logprobs=True)
    assert info.value.param == "include_routing_matrix"


def test_moe_hf_and_lean_runners_agree(moe_dir):
    lean = tk.load(moe_dir, dtype="float32")          # bfloat16 would round the two apart
    hf = tk.load(moe_dir, dtype="float32", lean_forward=False)
    kwargs = dict(prompt=[PROMPT, "import os"], n=2, max_tokens=8, seed=5, logprobs=True,
                  include_routing_matrix=True)
    a, b = lean.completions.create(**kwargs), hf.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    for ca, cb in zip(a.choices, b.choices):
        for ea, eb in zip(ca.logprobs.content, cb.logprobs.content):
            assert ea.logprob == pytest.approx(eb.logprob, abs=1e-4)
            assert ea.routing_matrix == eb.routing_matrix
